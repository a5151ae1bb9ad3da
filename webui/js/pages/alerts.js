// Alerts: the triage queue and one alert with its rule, event, ancestry, comments and actions.
import { api, can, currentUser, qs } from "../api.js";
import { respond } from "../respond.js";
import { badge, busy, clear, confirmAction, fmtTime, get, h, kv, showError, table, toast }
  from "../ui.js";

const STATES = ["new", "acknowledged", "resolved", "false_positive"];

export async function render(main, args, params) {
  if (args[0]) return renderOne(main, Number(args[0]));
  const status = h("select", { "aria-label": "State" }, ["", ...STATES].map((s) =>
    h("option", { value: s, selected: s === (params.get("status") ?? "") }, s || "any state")));
  const severity = h("select", { "aria-label": "Severity" }, ["", "informational", "low", "medium",
    "high", "critical"].map((s) => h("option", { value: s }, s || "any severity")));
  const mine = h("input", { type: "checkbox", id: "mine" });
  const out = h("div", { id: "alert-list" }, h("p", { class: "muted" }, "Loading alerts…"));
  async function load() {
    try {
      const r = await api("GET", `/alerts${qs({ status: status.value, severity: severity.value,
        assignee: mine.checked ? currentUser().username : "", limit: 500 })}`);
      clear(out, table([
        { key: "id", label: "#" },
        { key: "created_at", label: "Raised", render: (a) => fmtTime(a.created_at) },
        { key: "severity", label: "Severity", render: (a) => badge(a.severity) },
        { key: "rule_name", label: "Rule", render: (a) => h("a", { href: `#/alerts/${a.id}` },
          a.rule_name) },
        { key: "host_id", label: "Host", render: (a) => get(a.event, "host.name") || a.host_id },
        { key: "cmd", label: "Process", nosort: true, render: (a) =>
          h("code", {}, get(a.event, "process.command_line") || get(a.event, "file.path") || "") },
        { key: "status", label: "State", render: (a) => badge(a.status) },
        { key: "assignee", label: "Assignee", render: (a) => a.assignee || "—" },
      ], r.alerts, { sortKey: "id", sortDir: -1, empty: "No alerts match.",
        onRow: (a) => { location.hash = `#/alerts/${a.id}`; } }));
    } catch (e) { showError(e, out); }
  }
  for (const el of [status, severity, mine]) el.addEventListener("change", load);
  main.append(h("h1", {}, "Alerts"), h("div", { class: "toolbar" }, status, severity,
    h("label", {}, mine, " assigned to me")), out);
  await load();
  const every = setInterval(load, 10000);
  return () => clearInterval(every);
}

async function renderOne(main, id) {
  const alert = await api("GET", `/alerts/${id}`);
  const ev = alert.event || {};
  const hostId = alert.host_id;
  const hostLabel = `${get(ev, "host.name") || hostId} (${hostId})`;
  const eid = get(ev, "process.entity_id"), pid = get(ev, "process.pid");
  const cmdStatus = h("div", { class: "cmd-area", id: "alert-command" });
  const msg = h("div", { id: "alert-msg" });

  async function patch(body, btn) {
    await busy(btn, async () => {
      try {
        await api("PATCH", `/alerts/${id}`, body);
        toast(`alert ${id} updated`);
        location.hash = `#/alerts/${id}?t=${Date.now()}`; // redraw with the stored state
      } catch (e) { showError(e, msg); }
    });
  }
  const triage = can("responder") ? h("div", { class: "toolbar", id: "triage" },
    ["acknowledged", "resolved", "false_positive"].filter((s) => s !== alert.status).map((s) => {
      const b = h("button", { type: "button", dataset: { status: s },
        onclick: () => patch({ status: s }, b) }, s === "acknowledged" ? "Acknowledge"
        : s === "resolved" ? "Resolve" : "False positive");
      return b;
    }),
    (() => { const b = h("button", { type: "button", id: "assign-me",
      onclick: () => patch({ assignee: currentUser().username }, b) }, "Assign to me"); return b; })(),
    alert.assignee ? (() => { const b = h("button", { type: "button",
      onclick: () => patch({ assignee: null }, b) }, "Unassign"); return b; })() : null) : null;

  const held = can("responder") && pid ? h("div", { class: "toolbar response", id: "held" },
    h("span", {}, `Process ${pid}: `),
    h("button", { type: "button", dataset: { action: "resume" }, onclick: () => respond(hostId,
      hostLabel, "resume", { pid, entity_id: eid, label: get(ev, "process.executable") || "" },
      cmdStatus) }, "Approve (resume)"),
    h("button", { type: "button", class: "danger", dataset: { action: "kill" }, onclick: () =>
      respond(hostId, hostLabel, "kill", { pid, entity_id: eid,
        label: get(ev, "process.executable") || "" }, cmdStatus) }, "Kill")) : null;

  const safe = can("admin") ? (() => {
    const b = h("button", { type: "button", id: "mark-safe", onclick: async () => {
      const what = get(ev, "process.hash.sha256") ? `the hash ${get(ev, "process.hash.sha256")}`
        : get(ev, "process.executable") ? `the executable ${get(ev, "process.executable")}`
          : `the path ${get(ev, "file.path")}`;
      if (!await confirmAction("Mark safe", `Add ${what} to the policy's allow list (a new policy
        version pushed to every host, which silences detection for it fleet-wide) and close this
        alert as a false positive.`, "Mark safe")) return;
      await busy(b, async () => {
        try {
          const r = await api("POST", `/alerts/${id}/mark-safe`, {});
          toast(`marked safe${r.policy_version ? `: policy version ${r.policy_version}` : ""}`);
          location.hash = `#/alerts/${id}?t=${Date.now()}`;
        } catch (e) { showError(e, msg); }
      });
    } }, "Mark safe");
    return b;
  })() : null;

  const comment = h("textarea", { rows: 3, "aria-label": "Comment", id: "comment" });
  const post = h("button", { type: "submit" }, "Add comment");
  const comments = can("responder") ? h("form", { onsubmit: async (e) => {
    e.preventDefault();
    if (!comment.value.trim()) { showError(new Error("the comment is empty"), msg); return; }
    await busy(post, async () => {
      try {
        await api("POST", `/alerts/${id}/comments`, { text: comment.value });
        location.hash = `#/alerts/${id}?t=${Date.now()}`;
      } catch (err) { showError(err, msg); }
    });
  } }, comment, post) : null;

  main.append(h("p", {}, h("a", { href: "#/alerts" }, "← all alerts")),
    h("h1", {}, `Alert ${id}: ${alert.rule_name} `, badge(alert.severity), " ",
      h("span", { id: "alert-status" }, badge(alert.status))),
    msg,
    h("div", { class: "grid" }, h("div", { class: "panel" }, kv([
      ["Rule", [alert.rule_name, " ", h("code", {}, alert.rule_id)]],
      ["Host", h("a", { href: `#/host/${encodeURIComponent(hostId)}` }, hostLabel)],
      ["Raised", fmtTime(alert.created_at)], ["Updated", fmtTime(alert.updated_at)],
      ["Assignee", alert.assignee || "nobody"],
      ["Process", eid ? h("a", { id: "open-tree", href: `#/host/${encodeURIComponent(hostId)
      }/process/${encodeURIComponent(eid)}` }, `open process tree of ${pid}`) : "—"],
      ["Command line", h("code", {}, get(ev, "process.command_line") || "—")],
      ["User", get(ev, "user.name") || "—"],
      ["SHA-256", h("code", {}, get(ev, "process.hash.sha256") || "—")],
      ["File", h("code", {}, get(ev, "file.path") || "—")],
    ]), triage, held, cmdStatus, safe),
    h("div", { class: "panel" }, h("h2", {}, "Ancestry"), alert.ancestry.length
      ? h("ol", {}, alert.ancestry.map((a) => h("li", { class: "mono" },
        `${a.pid} ${a.user || ""} ${a.command_line || a.executable || ""}`)))
      : h("p", { class: "muted" }, "No ancestry recorded."),
    h("h2", {}, "Comments"), alert.comments.length ? h("ul", { id: "comments" },
      alert.comments.map((c) => h("li", {}, h("strong", {}, c.author), ` ${fmtTime(c.ts)}: `,
        c.text))) : h("p", { class: "muted" }, "No comments."), comments)),
    h("h2", {}, "Matched event"), h("pre", { class: "panel mono" }, JSON.stringify(ev, null, 2)));
  return null;
}
