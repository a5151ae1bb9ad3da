// Host: state, metrics charts, live events, processes and their tree, connections, files,
// and host-wide response actions.
import uPlot from "../../vendor/uplot/uPlot.esm.js";
import { api, can, qs } from "../api.js";
import { LiveStream } from "../live.js";
import { respond } from "../respond.js";
import { renderTree } from "../tree.js";
import { badge, clear, fmtAgo, fmtTime, get, h, kv, showError, table } from "../ui.js";

function eventRow(hostId, e) {
  const eid = get(e, "process.entity_id");
  return h("tr", { dataset: { action: get(e, "event.action") || "" } },
    h("td", {}, fmtTime(e["@timestamp"])), h("td", {}, get(e, "event.action") || ""),
    h("td", {}, eid ? h("a", { href: `#/host/${encodeURIComponent(hostId)}/process/${
      encodeURIComponent(eid)}` }, String(get(e, "process.pid") ?? "?")) : ""),
    h("td", { class: "mono" }, get(e, "process.command_line") || get(e, "file.path") ||
      `${get(e, "destination.ip") || ""}:${get(e, "destination.port") ?? ""}`));
}

function chart(el, title, samples, series) {
  const width = Math.max(300, el.clientWidth - 24);
  const data = [samples.map((s) => s.ts), ...series.map(([, f]) => samples.map(f))];
  return new uPlot({ title, width, height: 160,
    series: [{}, ...series.map(([label], i) => ({ label, stroke: ["#4da3ff", "#3fb950",
      "#d29922"][i], width: 1.5 }))],
    axes: [{ stroke: "#8b98a6", grid: { stroke: "#2a3440" } },
      { stroke: "#8b98a6", grid: { stroke: "#2a3440" } }] }, data, el);
}

export async function render(main, args) {
  const [hostId, sub, entityId] = args;
  if (!hostId) { location.hash = "#/fleet"; return null; }
  const host = await api("GET", `/hosts/${encodeURIComponent(hostId)}`);
  const label = `${host.hostname} (${host.host_id})`;
  const status = h("div", { class: "cmd-area", id: "host-command" });
  const isoBtn = host.isolated
    ? h("button", { type: "button", dataset: { action: "unisolate" },
      onclick: () => respond(hostId, label, "unisolate", {}, status) }, "Lift isolation")
    : h("button", { type: "button", class: "danger", dataset: { action: "isolate" },
      onclick: () => respond(hostId, label, "isolate", {}, status) }, "Isolate host");
  const path = h("input", { placeholder: "/path/to/file", "aria-label": "File to quarantine" });
  const ip = h("input", { placeholder: "IP or CIDR", "aria-label": "Address to block" });
  const response = can("responder") ? h("div", { class: "toolbar response" }, isoBtn,
    path, h("button", { type: "button", dataset: { action: "quarantine" }, onclick: () =>
      respond(hostId, label, "quarantine", { path: path.value.trim() }, status) }, "Quarantine"),
    ip, h("button", { type: "button", dataset: { action: "block-ip" }, onclick: () =>
      respond(hostId, label, "block-ip", { address: ip.value.trim() }, status) }, "Block IP"))
    : null;
  const charts = h("div", { class: "panel", id: "charts" });
  const liveBody = h("tbody");
  const liveState = h("span", { class: "muted" }, "connecting…");
  const treeEl = h("div", { class: "panel", id: "tree-panel" });
  const procs = h("div", { class: "panel" }, h("p", { class: "muted" }, "Loading processes…"));
  const conns = h("div", { class: "panel" }), files = h("div", { class: "panel" });
  main.append(h("h1", {}, `Host ${host.hostname} `, badge(host.status),
    host.isolated ? [" ", badge("isolated")] : null),
  h("div", { class: "grid" }, h("div", { class: "panel" }, kv([
    ["Host id", h("code", {}, host.host_id)], ["OS", `${host.os} (${host.kernel})`],
    ["Sensor", host.sensor_version],
    ["Capture tier", Object.entries(host.tiers).map(([f, t]) => `${f}: ${t}`).join(", ")],
    ["Drops", `${host.events_dropped} in outbox; ${JSON.stringify(host.drops)}`],
    ["Outbox depth", String(host.outbox_depth)], ["Last seen", fmtAgo(host.last_seen)],
    ["Policy", host.policy_version === null ? "none applied" : `version ${host.policy_version}`],
  ]), response, status), charts),
  h("h2", {}, "Process tree"), treeEl,
  h("div", { class: "grid" },
    h("div", { class: "panel" }, h("h2", {}, "Live events ", liveState),
      h("div", { class: "events" }, h("table", { id: "host-live" }, liveBody))),
    h("div", {}, h("h2", {}, "Recent processes"), procs)),
  h("div", { class: "grid" }, h("div", {}, h("h2", {}, "Connections"), conns),
    h("div", {}, h("h2", {}, "Files touched"), files)));

  if (sub === "process" && entityId) await renderTree(treeEl, hostId, entityId, label);
  else clear(treeEl, h("p", { class: "muted" }, "Pick a process below to see its tree."));

  const plots = [];
  api("GET", `/hosts/${encodeURIComponent(hostId)}/metrics${qs({ since: Date.now() / 1000
    - 6 * 3600, limit: 5000 })}`).then((r) => {
    if (!r.samples.length) { clear(charts, h("p", { class: "muted" }, "No metrics yet.")); return; }
    plots.push(chart(charts, "CPU and memory (%)", r.samples, [
      ["CPU %", (s) => s.metrics.cpu_percent ?? null], ["Memory %", (s) => s.metrics.mem_percent ?? null],
      ["Disk %", (s) => s.metrics.disk_percent ?? null]]));
    plots.push(chart(charts, "Outbox depth (batches)", r.samples, [["Outbox", (s) => s.outbox_depth]]));
  }).catch((e) => showError(e, charts));

  const list = (el, params, cols) => api("GET", `/events${qs({ host: hostId, limit: 100,
    ...params })}`).then((r) => clear(el, table(cols, r.events, { empty: "None recorded." })))
    .catch((e) => showError(e, el));
  const procLink = (e) => { const eid = get(e.event, "process.entity_id");
    return eid ? h("a", { href: `#/host/${encodeURIComponent(hostId)}/process/${
      encodeURIComponent(eid)}` }, String(get(e.event, "process.pid"))) : "—"; };
  list(procs, { action: "exec" }, [
    { key: "ts", label: "Time", render: (e) => fmtTime(e.ts) },
    { key: "pid", label: "PID", render: procLink, sort: (e) => get(e.event, "process.pid") },
    { key: "user", label: "User", render: (e) => get(e.event, "user.name") || "—",
      sort: (e) => get(e.event, "user.name") },
    { key: "cmd", label: "Command line", nosort: true, render: (e) =>
      h("code", {}, get(e.event, "process.command_line") || "") }]);
  list(conns, { category: "network" }, [
    { key: "ts", label: "Time", render: (e) => fmtTime(e.ts) },
    { key: "pid", label: "PID", render: procLink, nosort: true },
    { key: "dst", label: "Connection", nosort: true, render: (e) => h("code", {},
      `${get(e.event, "source.ip") || ""}:${get(e.event, "source.port") ?? ""} → ${
        get(e.event, "destination.ip") || ""}:${get(e.event, "destination.port") ?? ""}`) }]);
  list(files, { category: "file" }, [
    { key: "ts", label: "Time", render: (e) => fmtTime(e.ts) },
    { key: "action", label: "Action", render: (e) => get(e.event, "event.action") || "" },
    { key: "path", label: "Path", nosort: true, render: (e) =>
      h("code", {}, get(e.event, "file.path") || "") }]);

  const stream = new LiveStream({ host: hostId }, (msg) => {
    if (msg.kind !== "event") return;
    liveBody.prepend(eventRow(hostId, msg.data));
    while (liveBody.children.length > 200) liveBody.lastChild.remove();
  }, (s) => { liveState.textContent = s; });
  return () => { stream.close(); plots.forEach((p) => p.destroy()); };
}
