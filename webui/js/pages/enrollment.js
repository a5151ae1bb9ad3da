// Enrollment (admins): create one-time tokens (shown once), list and revoke tokens and
// certificates.
import { api } from "../api.js";
import { badge, busy, clear, confirmAction, fmtTime, h, showError, table, toast } from "../ui.js";

export async function render(main) {
  const ttl = h("input", { type: "number", min: 60, value: 3600, "aria-label": "Lifetime (s)" });
  const uses = h("input", { type: "number", min: 1, value: 1, "aria-label": "Uses" });
  const comment = h("input", { placeholder: "comment (e.g. which host)", "aria-label": "Comment" });
  const create = h("button", { type: "submit" }, "Create token");
  const secret = h("div", { id: "new-token", "aria-live": "polite" });
  const tokens = h("div", { id: "tokens" }), certs = h("div", { id: "certificates" });
  const revokeBtn = (label, text, path) => { const b = h("button", { type: "button", class: "danger",
    onclick: async () => {
      if (!await confirmAction(label, text, "Revoke")) return;
      await busy(b, async () => {
        try { await api("POST", path); toast(`${label}: done`); await load(); }
        catch (e) { showError(e); }
      });
    } }, "Revoke"); return b; };
  async function load() {
    try {
      const [t, c] = await Promise.all([api("GET", "/enrollment/tokens"),
        api("GET", "/enrollment/certificates")]);
      clear(tokens, table([
        { key: "id", label: "Token id" }, { key: "comment", label: "Comment" },
        { key: "status", label: "State", render: (x) => badge(x.status) },
        { key: "uses_count", label: "Used", render: (x) => `${x.uses_count} of ${x.uses_allowed}` },
        { key: "expires_at", label: "Expires", render: (x) => fmtTime(x.expires_at) },
        { key: "r", label: "", nosort: true, render: (x) => x.status === "active" ? revokeBtn(
          "Revoke token", `Revoke enrollment token ${x.id}: no sensor can enroll with it afterwards.`,
          `/enrollment/tokens/${encodeURIComponent(x.id)}/revoke`) : "" },
      ], t.tokens, { sortKey: "expires_at", sortDir: -1, empty: "No tokens." }));
      clear(certs, table([
        { key: "hostname", label: "Host" }, { key: "host_id", label: "Host id" },
        { key: "serial", label: "Serial", render: (x) => h("code", {}, x.serial) },
        { key: "not_after", label: "Valid until", render: (x) => fmtTime(x.not_after) },
        { key: "effective_status", label: "State", render: (x) => badge(x.effective_status) },
        { key: "r", label: "", nosort: true, render: (x) => x.effective_status === "active"
          ? revokeBtn("Revoke certificate", `Revoke the certificate of ${x.hostname} (${x.host_id}):
            its sensor is disconnected at its next handshake and cannot reconnect until enrolled again.`,
          `/enrollment/certificates/${encodeURIComponent(x.host_id)}/revoke`) : "" },
      ], c.certificates, { sortKey: "hostname", empty: "No certificates." }));
    } catch (e) { showError(e, tokens); }
  }
  const form = h("form", { class: "toolbar", onsubmit: (ev) => { ev.preventDefault();
    busy(create, async () => {
      try {
        const r = await api("POST", "/enrollment/tokens", { ttl: Number(ttl.value),
          uses: Number(uses.value), comment: comment.value });
        clear(secret, h("div", { class: "secret" }, h("p", {}, "Copy this token now: it is shown once ",
          "and cannot be read again."), h("code", { id: "token-value" }, r.token), " ",
        h("button", { type: "button", onclick: () => navigator.clipboard.writeText(r.token)
          .then(() => toast("copied"), (e) => showError(e)) }, "Copy"),
        h("p", { class: "muted" }, `On the host: edr-sensor enroll --controller ${location.hostname} --token <token>`)));
        await load();
      } catch (e) { showError(e, secret); }
    }); } }, h("label", {}, "Lifetime (s) ", ttl), h("label", {}, "Uses ", uses), comment, create);
  main.append(h("h1", {}, "Enrollment"), form, secret, h("h2", {}, "Tokens"), tokens,
    h("h2", {}, "Certificates"), certs);
  await load();
  return () => clear(secret); // the secret is gone once the page is left
}
