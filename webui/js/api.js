// The controller's REST API: session cookie + X-CSRF-Token, every error as an ApiError
// carrying the server's own words (never swallowed).

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

const session = { user: null, csrf: null };
const listeners = new Set();

export function currentUser() { return session.user; }
export function onAuthLost(fn) { listeners.add(fn); }

const RANK = { viewer: 1, responder: 2, admin: 3 };
/** Whether the logged-in user's role is at least ``role`` (the API enforces it anyway). */
export function can(role) {
  return !!session.user && RANK[session.user.role] >= RANK[role];
}

export async function api(method, path, body, { headers = {} } = {}) {
  const init = { method, headers: { Accept: "application/json", ...headers },
    credentials: "same-origin" };
  if (method !== "GET" && session.csrf) init.headers["X-CSRF-Token"] = session.csrf;
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(`/api/v1${path}`, init);
  } catch (e) {
    throw new ApiError(0, `cannot reach the controller (${e.message})`);
  }
  const text = await resp.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch { data = { error: text.slice(0, 300) }; }
  }
  if (!resp.ok) {
    let msg = (data && data.error) || `${resp.status} ${resp.statusText}`;
    if (resp.status === 429 && resp.headers.get("Retry-After")) {
      msg += ` (retry in ${resp.headers.get("Retry-After")} s)`;
    }
    if (resp.status === 401 && path !== "/auth/login") {
      session.user = null;
      listeners.forEach((fn) => fn(msg));
    }
    throw new ApiError(resp.status, msg, data);
  }
  return data;
}

/** Restore the session from the cookie (a page reload); false when there is none. */
export async function restore() {
  const me = await api("GET", "/auth/session");
  if (!me.authenticated) return false;
  session.user = { username: me.username, role: me.role };
  session.csrf = me.csrf_token;
  return true;
}

export async function login(username, password) {
  const r = await api("POST", "/auth/login", { username, password });
  session.user = { username: r.username, role: r.role };
  session.csrf = r.csrf_token;
}

export async function logout() {
  try { await api("POST", "/auth/logout"); } finally { session.user = null; session.csrf = null; }
}

/** Query string from an object, skipping empty values. */
export function qs(params) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") p.set(k, v);
  }
  const s = p.toString();
  return s ? `?${s}` : "";
}
