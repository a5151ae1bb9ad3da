// Audit log (admins): who did what, newest first, paged.
import { api, qs } from "../api.js";
import { busy, clear, fmtTime, h, showError, table } from "../ui.js";

export async function render(main) {
  const actor = h("input", { "aria-label": "Actor", placeholder: "actor" });
  const action = h("input", { "aria-label": "Action", placeholder: "action, e.g. auth.login" });
  const out = h("div", { id: "audit-list" }), more = h("button", { type: "button", hidden: true }, "Older");
  let rows = [], before = null;
  async function load(append) {
    try {
      const r = await api("GET", `/audit${qs({ actor: actor.value.trim(), action: action.value.trim(),
        limit: 200, before_id: append ? before : null })}`);
      rows = append ? rows.concat(r.entries) : r.entries;
      before = r.next_before_id;
      more.hidden = !before;
      clear(out, table([
        { key: "id", label: "#" }, { key: "ts", label: "Time", render: (e) => fmtTime(e.ts) },
        { key: "actor", label: "Actor" }, { key: "action", label: "Action" },
        { key: "target", label: "Target" }, { key: "source", label: "From" },
        { key: "details", label: "Details", nosort: true, render: (e) =>
          h("code", {}, JSON.stringify(e.details)) },
      ], rows, { sortKey: "id", sortDir: -1, empty: "No entries." }));
    } catch (e) { showError(e, out); }
  }
  actor.addEventListener("change", () => load(false));
  action.addEventListener("change", () => load(false));
  more.addEventListener("click", () => busy(more, () => load(true)));
  main.append(h("h1", {}, "Audit log"), h("div", { class: "toolbar" }, actor, action), out, more);
  await load(false);
  return null;
}
