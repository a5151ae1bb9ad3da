// The console's shell: session restore, login, role-aware navigation and a hash router.
import { api, can, currentUser, login, logout, onAuthLost, restore } from "./api.js";
import { clear, h, showError } from "./ui.js";
import * as fleet from "./pages/fleet.js";
import * as host from "./pages/host.js";
import * as live from "./pages/live.js";
import * as search from "./pages/search.js";
import * as alerts from "./pages/alerts.js";
import * as commands from "./pages/commands.js";
import * as policy from "./pages/policy.js";
import * as enrollment from "./pages/enrollment.js";
import * as audit from "./pages/audit.js";

// route → [module, label, role needed to see it]
const ROUTES = {
  fleet: [fleet, "Fleet", "viewer"],
  host: [host, null, "viewer"],
  live: [live, "Live events", "viewer"],
  search: [search, "Search", "viewer"],
  alerts: [alerts, "Alerts", "viewer"],
  commands: [commands, "Commands", "viewer"],
  policy: [policy, "Policy & rules", "viewer"],
  enrollment: [enrollment, "Enrollment", "admin"],
  audit: [audit, "Audit log", "admin"],
};

const main = document.getElementById("main");
let current = null; // the shown page's cleanup function

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query = ""] = raw.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { name: parts[0] || "fleet", args: parts.slice(1), params: new URLSearchParams(query) };
}

function drawNav(name) {
  const nav = document.getElementById("nav");
  clear(nav, Object.entries(ROUTES).filter(([, [, label, role]]) => label && can(role))
    .map(([key, [, label]]) => h("a", { href: `#/${key}`,
      "aria-current": key === name || (name === "host" && key === "fleet") ? "page" : undefined },
    label)));
  const user = currentUser();
  document.getElementById("whoami").textContent = `${user.username} (${user.role})`;
  document.getElementById("top").hidden = false;
}

async function route() {
  if (current) { try { current(); } catch { /* a page's cleanup never blocks navigation */ } }
  current = null;
  if (!currentUser()) { showLogin(); return; }
  const { name, args, params } = parseHash();
  const entry = ROUTES[name];
  drawNav(name);
  clear(main);
  if (!entry) { main.append(h("h1", {}, "Not found"), h("p", {}, `No page called “${name}”.`)); return; }
  if (!can(entry[2])) {
    main.append(h("h1", {}, "Not allowed"), h("p", {}, `This page needs the ${entry[2]} role.`));
    return;
  }
  try {
    current = (await entry[0].render(main, args, params)) || null;
  } catch (e) {
    showError(e, main);
  }
  main.focus({ preventScroll: true });
}

function showLogin(message) {
  document.getElementById("top").hidden = true;
  const err = h("p", { class: "error", role: "alert", id: "login-error" }, message || "");
  const user = h("input", { id: "username", name: "username", autocomplete: "username",
    required: true, autofocus: true });
  const pass = h("input", { id: "password", name: "password", type: "password",
    autocomplete: "current-password", required: true });
  const submit = h("button", { type: "submit" }, "Log in");
  const form = h("form", { class: "login panel", onsubmit: async (ev) => {
    ev.preventDefault();
    submit.disabled = true;
    err.textContent = "";
    try {
      await login(user.value, pass.value);
      if (!location.hash || location.hash === "#/login") location.hash = "#/fleet";
      await route();
    } catch (e) {
      err.textContent = e.message;
      pass.value = "";
      pass.focus();
    } finally { submit.disabled = false; }
  } }, h("h1", {}, "EDR console"), h("label", { for: "username" }, "User name"), user,
  h("label", { for: "password" }, "Password"), pass, h("p", {}, submit), err);
  clear(main, form);
  user.focus();
}

onAuthLost((msg) => { if (current) { current(); current = null; }
  showLogin(`Your session ended: ${msg}. Log in again.`); });

document.getElementById("logout").addEventListener("click", async () => {
  try { await logout(); } catch (e) { showError(e); }
  if (current) { current(); current = null; }
  showLogin("Logged out.");
});

window.addEventListener("hashchange", route);

(async () => {
  try {
    if (await restore()) await route();
    else showLogin();
  } catch (e) {
    showLogin(`Cannot check the session: ${e.message}`);
  }
})();

export { api };
