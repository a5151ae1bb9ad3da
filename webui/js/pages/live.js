// Live events: the websocket stream with host/kind/text filters, pause and click-through.
import { LiveStream } from "../live.js";
import { clear, fmtTime, get, h } from "../ui.js";

const MAX_ROWS = 500;

export async function render(main, _args, params) {
  const host = h("input", { "aria-label": "Host ids (comma-separated)", placeholder: "host id(s)",
    value: params.get("host") || "" });
  const kind = h("input", { "aria-label": "Kinds or actions", placeholder: "kind: exec, alert…",
    value: params.get("kind") || "" });
  const text = h("input", { "aria-label": "Text", placeholder: "text", type: "search",
    value: params.get("text") || "" });
  const pause = h("button", { type: "button", "aria-pressed": "false", id: "pause" }, "Pause");
  const state = h("span", { class: "muted", id: "stream-state" }, "connecting…");
  const body = h("tbody", { id: "live-events" });
  let paused = false, held = [], stream = null, missed = 0;
  const missedEl = h("span", { class: "muted" });

  function row(msg) {
    const d = msg.data, hostId = d.host_id || get(d, "host.id") || "";
    const eid = get(d, "process.entity_id");
    const what = msg.kind === "event" ? get(d, "event.action") : msg.kind;
    const detail = msg.kind === "alert" ? `${d.rule_name} (${d.severity})`
      : msg.kind === "command" ? `${d.action} → ${d.status}`
        : msg.kind === "host" ? (d.online === false ? "went offline" : "heartbeat")
          : get(d, "process.command_line") || get(d, "file.path") || get(d, "destination.ip") || "";
    const go = () => {
      if (msg.kind === "alert") location.hash = `#/alerts/${d.id}`;
      else if (eid) location.hash = `#/host/${encodeURIComponent(hostId)}/process/${
        encodeURIComponent(eid)}`;
      else if (hostId) location.hash = `#/host/${encodeURIComponent(hostId)}`;
    };
    return h("tr", { class: "clickable", tabindex: "0", onclick: go, dataset: { kind: msg.kind,
      action: what || "" }, onkeydown: (ev) => { if (ev.key === "Enter") go(); } },
    h("td", {}, fmtTime(d["@timestamp"] || d.updated_at || d.last_seen || Date.now() / 1000)),
    h("td", {}, what || ""), h("td", {}, d.hostname || get(d, "host.name") || hostId),
    h("td", {}, String(get(d, "process.pid") ?? "")), h("td", { class: "mono" }, detail));
  }
  function add(msg) {
    if (msg.missed) { missed += msg.missed; missedEl.textContent = ` ${missed} missed (slow client)`; }
    if (msg.kind === "host" && !kind.value) return; // heartbeats drown events unless asked for
    body.prepend(row(msg));
    while (body.children.length > MAX_ROWS) body.lastChild.remove();
  }
  function connect() {
    if (stream) stream.close();
    const filter = { host: host.value.trim(), kind: kind.value.trim(), text: text.value.trim() };
    stream = new LiveStream(filter, (m) => (paused ? held.push(m) : add(m)),
      (s) => { state.textContent = s; });
  }
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.setAttribute("aria-pressed", String(paused));
    pause.textContent = paused ? `Resume` : "Pause";
    if (!paused) { held.forEach(add); held = []; }
  });
  let t = null;
  for (const el of [host, kind, text]) {
    el.addEventListener("input", () => { clearTimeout(t); t = setTimeout(connect, 400); });
  }
  main.append(h("h1", {}, "Live events"), h("div", { class: "toolbar" }, host, kind, text, pause,
    h("button", { type: "button", onclick: () => clear(body) }, "Clear"), state, missedEl),
  h("div", { class: "panel events" }, h("table", {}, h("thead", {}, h("tr", {},
    ["Time", "What", "Host", "PID", "Detail"].map((c) => h("th", { scope: "col" }, c)))), body)));
  connect();
  return () => { clearTimeout(t); stream.close(); };
}
