// Policy: edit allow/deny lists and automated responses (JSON document, validated by the
// controller), see which version each host applied; Sigma rules: upload, enable, load errors.
import { api, can } from "../api.js";
import { badge, busy, clear, fmtTime, h, showError, table, toast } from "../ui.js";

export async function render(main) {
  const [pol, hosts, rules] = await Promise.all([api("GET", "/policy"),
    api("GET", "/policy/hosts"), api("GET", "/rules")]);
  const admin = can("admin");
  const doc = h("textarea", { rows: 18, id: "policy-doc", "aria-label": "Policy document (JSON)",
    readonly: !admin }, JSON.stringify(pol.document, null, 2));
  const comment = h("input", { placeholder: "why this change", "aria-label": "Change comment", size: 40 });
  const save = h("button", { type: "submit" }, "Save and push to all hosts");
  const msg = h("div", { id: "policy-msg" });
  const form = h("form", { onsubmit: (ev) => { ev.preventDefault(); busy(save, async () => {
    let parsed;
    try { parsed = JSON.parse(doc.value); } catch (e) {
      showError(new Error(`the policy is not valid JSON: ${e.message}`), msg); return; }
    try {
      const r = await api("PUT", "/policy", { document: parsed, comment: comment.value,
        base_version: pol.version ?? 0 });
      toast(`policy version ${r.version} saved; hosts receive it now`);
      location.hash = `#/policy?v=${r.version}`;
    } catch (e) { showError(e, msg); }
  }); } }, doc, admin ? h("div", { class: "toolbar" }, comment, save) : null, msg);

  const ruleMsg = h("div", { id: "rule-msg" });
  const toggle = (r) => { const b = h("button", { type: "button", onclick: () => busy(b, async () => {
    try {
      await api("POST", `/rules/${encodeURIComponent(r.id)}/${r.enabled ? "disable" : "enable"}`);
      location.hash = `#/policy?r=${Date.now()}`;
    } catch (e) { showError(e, ruleMsg); }
  }) }, r.enabled ? "Disable" : "Enable"); return b; };
  const file = h("input", { type: "file", accept: ".yml,.yaml", "aria-label": "Sigma rule file" });
  const yaml = h("textarea", { rows: 8, id: "rule-yaml", "aria-label": "Sigma rule YAML",
    placeholder: "…or paste a Sigma rule here" });
  file.addEventListener("change", async () => { if (file.files[0]) yaml.value = await file.files[0].text(); });
  const upload = h("button", { type: "submit" }, "Upload rule");
  const upForm = admin ? h("form", { onsubmit: (ev) => { ev.preventDefault(); busy(upload, async () => {
    try {
      const r = await api("POST", "/rules", { yaml: yaml.value,
        filename: file.files[0] ? file.files[0].name : undefined });
      toast(`uploaded ${r.filename}: ${r.rules.map((x) => x.title).join(", ")}`);
      location.hash = `#/policy?r=${Date.now()}`;
    } catch (e) {
      const problems = e.body && e.body.problems ? e.body.problems.map((p) => p.message) : [];
      showError(e, ruleMsg);
      if (problems.length) ruleMsg.append(h("ul", {}, problems.map((p) => h("li", {}, p))));
    }
  }); } }, h("h2", {}, "Upload a Sigma rule"), file, yaml, h("p", {}, upload)) : null;

  main.append(h("h1", {}, "Policy and rules"), h("div", { class: "grid" },
    h("div", { class: "panel" }, h("h2", {}, `Policy ${pol.version === null ? "(none saved yet)"
      : `version ${pol.version}`}`), pol.author ? h("p", { class: "muted" },
      `by ${pol.author} at ${fmtTime(pol.created_at)}: ${pol.comment}`) : null, form),
    h("div", { class: "panel" }, h("h2", {}, "Applied per host"), table([
      { key: "hostname", label: "Host", render: (x) => h("a", { href: `#/host/${
        encodeURIComponent(x.host_id)}` }, x.hostname) },
      { key: "policy_version", label: "Applied version", render: (x) => x.policy_version ?? "none" },
      { key: "current", label: "Current?", render: (x) => x.current ? badge("yes", "succeeded")
        : badge("behind", "queued") },
      { key: "policy_applied_at", label: "Applied at", render: (x) => fmtTime(x.policy_applied_at) },
    ], hosts.hosts, { sortKey: "hostname", empty: "No hosts." }))),
  h("h2", {}, "Detection rules"), ruleMsg,
  rules.problems && rules.problems.length ? h("div", { class: "panel", id: "rule-problems" },
    h("h2", { class: "error" }, "Load errors"), h("ul", {}, rules.problems.map((p) =>
      h("li", { class: "mono" }, p.message)))) : h("p", { class: "muted" }, "Every rule loaded."),
  table([
    { key: "title", label: "Rule" }, { key: "level", label: "Level", render: (r) => badge(r.level) },
    { key: "category", label: "Category" },
    { key: "enabled", label: "Enabled", render: (r) => r.enabled ? "yes" : "no" },
    { key: "path", label: "File", render: (r) => h("code", {}, r.path.split("/").pop()) },
    { key: "t", label: "", nosort: true, render: (r) => admin ? toggle(r) : "" },
  ], rules.rules, { sortKey: "title" }), upForm);
  return null;
}
