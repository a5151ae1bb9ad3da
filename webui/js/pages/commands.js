// Commands: history with state and result per host; retry of failed or expired ones.
import { api, can, qs } from "../api.js";
import { follow } from "../respond.js";
import { badge, busy, clear, fmtTime, h, showError, table, toast } from "../ui.js";

export async function render(main, _args, params) {
  const host = h("input", { "aria-label": "Host id", placeholder: "host id",
    value: params.get("host") || "" });
  const status = h("select", { "aria-label": "State" }, ["", "queued", "sent", "acknowledged",
    "succeeded", "failed", "expired"].map((s) => h("option", { value: s }, s || "any state")));
  const out = h("div", { id: "command-list" }), progress = h("div", { class: "cmd-area" });
  async function load() {
    try {
      const r = await api("GET", `/commands${qs({ host: host.value.trim(), status: status.value,
        limit: 500 })}`);
      clear(out, table([
        { key: "id", label: "#" }, { key: "created_at", label: "Queued", render: (c) => fmtTime(c.created_at) },
        { key: "host_id", label: "Host", render: (c) => h("a", { href: `#/host/${
          encodeURIComponent(c.host_id)}` }, c.host_id) },
        { key: "action", label: "Action" },
        { key: "args", label: "Arguments", nosort: true, render: (c) => h("code", {}, JSON.stringify(c.args)) },
        { key: "requested_by", label: "By" },
        { key: "status", label: "State", render: (c) => badge(c.status) },
        { key: "output", label: "Result", nosort: true, render: (c) => c.output
          ? h("code", {}, JSON.stringify(c.output)) : "—" },
        { key: "retry", label: "", nosort: true, render: (c) => can("responder") &&
          ["failed", "expired"].includes(c.status) ? (() => { const b = h("button", { type: "button",
            onclick: () => busy(b, async () => {
              try {
                const n = await api("POST", `/commands/${c.id}/retry`);
                toast(`command ${c.id} re-queued as ${n.id}`);
                await load();
                await follow(n, progress);
                await load();
              } catch (e) { showError(e, progress); }
            }) }, "Retry"); return b; })() : c.retry_of ? `retry of ${c.retry_of}` : "" },
      ], r.commands, { sortKey: "id", sortDir: -1, empty: "No commands." }));
    } catch (e) { showError(e, out); }
  }
  host.addEventListener("change", load); status.addEventListener("change", load);
  main.append(h("h1", {}, "Commands"), h("div", { class: "toolbar" }, host, status), progress, out);
  await load();
  const every = setInterval(load, 5000);
  return () => clearInterval(every);
}
