// Search / timeline: stored events by time range and fields, full text, on a timeline.
import { api, qs } from "../api.js";
import { busy, clear, fmtTime, get, h, showError, table } from "../ui.js";

const FIELDS = [["host", "Host id"], ["action", "Action (exec, connect…)"],
  ["category", "Category"], ["executable", "Executable"], ["path", "File path"], ["ip", "IP"],
  ["port", "Port"], ["pid", "PID"]];

function localInput(ts) {
  const d = new Date(ts * 1000 - new Date().getTimezoneOffset() * 60000);
  return d.toISOString().slice(0, 16);
}

export async function render(main, _args, params) {
  const now = Date.now() / 1000;
  const since = h("input", { type: "datetime-local", "aria-label": "From",
    value: localInput(now - 3600) });
  const until = h("input", { type: "datetime-local", "aria-label": "Until", value: localInput(now + 60) });
  const text = h("input", { type: "search", placeholder: "full text: command lines, paths",
    "aria-label": "Full text", size: 40, value: params.get("q") || "" });
  const inputs = Object.fromEntries(FIELDS.map(([k, l]) => [k, h("input", { "aria-label": l,
    placeholder: l, size: 14, value: params.get(k) || "" })]));
  const go = h("button", { type: "submit" }, "Search");
  const timeline = h("div", { class: "timeline", "aria-label": "events over time" });
  const out = h("div", { id: "search-results" });
  let cursor = null, rows = [];
  const more = h("button", { type: "button", hidden: true }, "Load more");

  function draw() {
    const ts = rows.map((r) => r.ts);
    const lo = Math.min(...ts), hi = Math.max(...ts), n = 60;
    const buckets = new Array(n).fill(0);
    rows.forEach((r) => { buckets[Math.min(n - 1, Math.floor(((r.ts - lo) / (hi - lo || 1)) * n))]++; });
    const top = Math.max(1, ...buckets);
    clear(timeline, rows.length ? buckets.map((b) => h("span", { style: `height:${(b / top) * 100}%`,
      title: `${b} event(s)` })) : null);
    clear(out, table([
      { key: "ts", label: "Time", render: (e) => fmtTime(e.ts) },
      { key: "host_id", label: "Host", render: (e) => h("a", { href: `#/host/${
        encodeURIComponent(e.host_id)}` }, get(e.event, "host.name") || e.host_id) },
      { key: "action", label: "Action", sort: (e) => get(e.event, "event.action"),
        render: (e) => get(e.event, "event.action") || "" },
      { key: "pid", label: "Process", sort: (e) => get(e.event, "process.pid"), render: (e) => {
        const eid = get(e.event, "process.entity_id");
        return eid ? h("a", { href: `#/host/${encodeURIComponent(e.host_id)}/process/${
          encodeURIComponent(eid)}` }, String(get(e.event, "process.pid"))) : "—"; } },
      { key: "detail", label: "Detail", nosort: true, render: (e) => h("code", {},
        get(e.event, "process.command_line") || get(e.event, "file.path") ||
        `${get(e.event, "destination.ip") || ""}:${get(e.event, "destination.port") ?? ""}`) },
    ], rows, { empty: "No events match." }), h("p", { class: "muted" }, `${rows.length} event(s)`));
    more.hidden = !cursor;
  }
  async function run(append) {
    const p = { q: text.value.trim(), limit: 200, cursor: append ? cursor : null,
      since: since.value ? new Date(since.value).getTime() / 1000 : null,
      until: until.value ? new Date(until.value).getTime() / 1000 : null };
    for (const [k, el] of Object.entries(inputs)) p[k] = el.value.trim();
    try {
      const r = await api("GET", `/events${qs(p)}`);
      rows = append ? rows.concat(r.events) : r.events;
      cursor = r.next_cursor;
      draw();
    } catch (e) { showError(e, out); }
  }
  const form = h("form", { class: "toolbar", onsubmit: (ev) => { ev.preventDefault();
    busy(go, () => run(false)); } }, since, until, text, Object.values(inputs), go);
  more.addEventListener("click", () => busy(more, () => run(true)));
  main.append(h("h1", {}, "Search and timeline"), form, timeline, out, more);
  if ([...params.keys()].length) await run(false);
  return null;
}
