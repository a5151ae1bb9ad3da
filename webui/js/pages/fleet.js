// Fleet: every host with online state, tiers, drops, isolation, last seen and sparklines.
import { api, qs } from "../api.js";
import { badge, clear, fmtAgo, h, showError, sparkline, table } from "../ui.js";

export async function render(main, _args, params) {
  const q = h("input", { type: "search", placeholder: "Filter by name or id", "aria-label":
    "Filter hosts by name or id", value: params.get("q") || "" });
  const status = h("select", { "aria-label": "Online state" },
    ["", "online", "offline"].map((v) => h("option", { value: v }, v || "any state")));
  const isolated = h("select", { "aria-label": "Isolation" },
    [["", "isolated or not"], ["true", "isolated"], ["false", "not isolated"]].map(([v, l]) =>
      h("option", { value: v }, l)));
  const out = h("div", { id: "fleet" }, h("p", { class: "muted" }, "Loading hosts…"));
  const spark = new Map(); // host_id → {cpu: [], mem: []}
  main.append(h("h1", {}, "Fleet"),
    h("div", { class: "toolbar" }, q, status, isolated), out);

  async function loadSparks(hosts) {
    const since = Date.now() / 1000 - 1800;
    await Promise.all(hosts.map(async (host) => {
      try {
        const r = await api("GET", `/hosts/${encodeURIComponent(host.host_id)}/metrics${
          qs({ since, limit: 120 })}`);
        spark.set(host.host_id, {
          cpu: r.samples.map((s) => s.metrics.cpu_percent ?? 0),
          mem: r.samples.map((s) => s.metrics.mem_percent ?? 0) });
      } catch { spark.set(host.host_id, { cpu: [], mem: [] }); }
    }));
  }

  async function load() {
    try {
      const r = await api("GET", `/hosts${qs({ q: q.value.trim(), status: status.value,
        isolated: isolated.value })}`);
      await loadSparks(r.hosts);
      const sp = (id, k) => sparkline((spark.get(id) || {})[k] || [], 100, `${k} percent`);
      clear(out, table([
        { key: "hostname", label: "Host", render: (x) => h("a", {
          href: `#/host/${encodeURIComponent(x.host_id)}` }, x.hostname) },
        { key: "status", label: "State", render: (x) => badge(x.status) },
        { key: "tiers", label: "Capture tier", sort: (x) => JSON.stringify(x.tiers),
          render: (x) => Object.entries(x.tiers).map(([f, t]) => `${f}: ${t}`).join(", ") || "—" },
        { key: "events_dropped", label: "Drops", render: (x) => {
          const total = x.events_dropped + Object.values(x.drops).reduce((a, b) => a + b, 0);
          return total ? h("span", { class: "error", title: JSON.stringify(x.drops) },
            String(total)) : "0"; } },
        { key: "isolated", label: "Isolation", render: (x) => x.isolated ? badge("isolated") : "no" },
        { key: "last_seen", label: "Last seen", render: (x) => fmtAgo(x.last_seen) },
        { key: "cpu", label: "CPU (30 min)", nosort: true, render: (x) => [sp(x.host_id, "cpu"),
          ` ${x.metrics.cpu_percent ?? "—"}%`] },
        { key: "mem", label: "Memory", nosort: true, render: (x) => [sp(x.host_id, "mem"),
          ` ${x.metrics.mem_percent ?? "—"}%`] },
        { key: "sensor_version", label: "Sensor" },
      ], r.hosts, { sortKey: "hostname", empty: "No hosts match.",
        onRow: (x) => { location.hash = `#/host/${encodeURIComponent(x.host_id)}`; } }),
      h("p", { class: "muted" }, `${r.total} host(s)`));
    } catch (e) { showError(e, out); }
  }
  let timer = null;
  const reload = () => { clearTimeout(timer); timer = setTimeout(load, 250); };
  q.addEventListener("input", reload);
  status.addEventListener("change", load);
  isolated.addEventListener("change", load);
  await load();
  const every = setInterval(load, 10000);
  return () => { clearInterval(every); clearTimeout(timer); };
}
