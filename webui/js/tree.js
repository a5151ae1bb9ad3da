// A process tree (ancestry, the process, its children) with the details of each process:
// command line, user, hash and network activity, from stored exec/exit/network events.
import { api, can, qs } from "./api.js";
import { respond } from "./respond.js";
import { clear, fmtTime, get, h, kv, showError } from "./ui.js";

function nodeLabel(n) {
  const name = (n.executable || "?").split("/").pop();
  return `${name} [${n.pid ?? "?"}]${n.exit ? " (exited)" : ""}`;
}

/** Draw the tree of ``entityId`` on ``hostId`` into ``el``. */
export async function renderTree(el, hostId, entityId, hostLabel = hostId) {
  clear(el, h("p", { class: "muted" }, "Loading process tree…"));
  let tree;
  try {
    tree = await api("GET", `/hosts/${encodeURIComponent(hostId)}/processes/${
      encodeURIComponent(entityId)}`);
  } catch (e) { showError(e, el); return; }
  const details = h("div", { class: "panel", id: "process-details" });
  const link = (n) => h("a", { class: "node mono", href: `#/host/${encodeURIComponent(hostId)
  }/process/${encodeURIComponent(n.entity_id)}`, title: n.command_line || "" }, nodeLabel(n));
  // Ancestors come parent first: nest them from the root down.
  let inner = h("li", { class: "focus" }, h("span", { class: "node mono" }, nodeLabel(tree.process),
    " ", h("span", { class: "muted" }, tree.process.command_line || "")),
  tree.children.length ? h("ul", {}, tree.children.map((c) => h("li", {}, link(c), " ",
    h("span", { class: "muted mono" }, c.command_line || "")))) : null);
  for (const a of tree.ancestors) inner = h("li", {}, link(a), h("ul", {}, inner));
  clear(el, h("div", { class: "tree", id: "process-tree" }, h("ul", {}, inner)), details);
  await renderDetails(details, hostId, tree.process, hostLabel);
}

async function renderDetails(el, hostId, p, hostLabel) {
  clear(el, h("h2", {}, `Process ${p.pid}`), h("p", { class: "muted" }, "Loading events…"));
  let execs, net;
  try {
    [execs, net] = await Promise.all([
      api("GET", `/events${qs({ host: hostId, entity_id: p.entity_id, action: "exec", limit: 5 })}`),
      api("GET", `/events${qs({ host: hostId, entity_id: p.entity_id, category: "network",
        limit: 50 })}`)]);
  } catch (e) { showError(e, el); return; }
  const ev = execs.events[0] ? execs.events[0].event : {};
  const status = h("div", { class: "cmd-area" });
  const actions = can("responder") && !p.exit ? h("div", { class: "toolbar response" },
    ["kill", "kill-tree", "suspend", "resume"].map((a) => h("button", { type: "button",
      class: a.startsWith("kill") ? "danger" : "", dataset: { action: a },
      onclick: () => respond(hostId, hostLabel, a, { pid: p.pid, entity_id: p.entity_id,
        label: p.executable || "" }, status) }, a))) : null;
  clear(el, h("h2", {}, `Process ${p.pid}`), kv([
    ["Executable", h("code", {}, p.executable || "—")],
    ["Command line", h("code", { class: "cmdline" }, p.command_line || "—")],
    ["User", p.user || get(ev, "user.name") || "—"],
    ["SHA-256", h("code", {}, get(ev, "process.hash.sha256") || "—")],
    ["Working dir", h("code", {}, get(ev, "process.working_directory") || "—")],
    ["Started", fmtTime(p.start)],
    ["Exited", p.exit ? `${fmtTime(p.exit)} (code ${p.exit_code ?? "?"})` : "running"],
    ["Entity id", h("code", {}, p.entity_id)],
  ]), actions, status, h("h2", {}, "Network activity"),
  net.events.length ? h("ul", {}, net.events.map((e) => h("li", { class: "mono" },
    `${fmtTime(e.ts)} ${get(e.event, "event.action") || ""} ${get(e.event, "source.ip") || ""}:${
      get(e.event, "source.port") ?? ""} → ${get(e.event, "destination.ip") || ""}:${
      get(e.event, "destination.port") ?? ""} ${get(e.event, "network.transport") || ""}`)))
    : h("p", { class: "muted" }, "No network events recorded for this process."));
}
