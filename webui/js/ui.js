// Small DOM helpers shared by the pages: element builder, toasts, confirmation, formatting.

/** Build an element: h("a", {href: "#/x", onclick}, "text", child, ...). Text is never HTML. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, v);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function clear(el, ...children) { el.replaceChildren(); append(el, children); return el; }

export function toast(text, kind = "info", ms = 5000) {
  const t = h("div", { class: `toast ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
  document.getElementById("toasts").append(t);
  setTimeout(() => t.remove(), kind === "error" ? ms * 2 : ms);
}

/** Show an API error in words, in the page (where) and as a toast. */
export function showError(e, where) {
  const msg = e && e.message ? e.message : String(e);
  if (where) clear(where, h("p", { class: "error", role: "alert" }, msg));
  toast(msg, "error");
}

/** Ask before doing something; ``text`` says exactly what will happen. Resolves to a bool. */
export function confirmAction(title, text, okLabel = "Confirm") {
  const dlg = document.getElementById("confirm");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-ok").textContent = okLabel;
  return new Promise((resolve) => {
    dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok"), { once: true });
    dlg.returnValue = "";
    dlg.showModal();
    document.getElementById("confirm-ok").focus();
  });
}

/** Run an async action with a busy button (a long operation shows progress). */
export async function busy(button, fn) {
  const label = button.textContent;
  button.disabled = true;
  button.replaceChildren(h("span", { class: "progress", "aria-hidden": "true" }), ` ${label}`);
  try { return await fn(); } finally { button.disabled = false; button.textContent = label; }
}

export function fmtTime(ts) {
  if (ts === null || ts === undefined || ts === "") return "—";
  const d = typeof ts === "number" ? new Date(ts * 1000) : new Date(ts);
  if (Number.isNaN(d.getTime())) return String(ts);
  return d.toLocaleString(undefined, { hour12: false });
}

export function fmtAgo(ts) {
  if (!ts) return "never";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

export function badge(text, cls = text) { return h("span", { class: `badge ${cls}` }, text); }

/** A tiny SVG line of ``values`` (0..max), for the fleet table. */
export function sparkline(values, max = 100, label = "") {
  const w = 80, hgt = 18;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", w); svg.setAttribute("height", hgt);
  svg.setAttribute("role", "img"); svg.setAttribute("aria-label", label);
  if (values.length > 1) {
    const pts = values.map((v, i) => `${(i / (values.length - 1)) * w},${
      hgt - 1 - (Math.min(v, max) / max) * (hgt - 2)}`);
    const line = document.createElementNS(svg.namespaceURI, "polyline");
    line.setAttribute("points", pts.join(" "));
    line.setAttribute("fill", "none"); line.setAttribute("stroke", "#4da3ff");
    svg.append(line);
  }
  return svg;
}

/** A sortable table: columns [{key, label, render?, sort?}], rows, onRow(row). */
export function table(columns, rows, { onRow, sortKey, sortDir = 1, empty = "Nothing here." } = {}) {
  const wrap = h("div");
  let key = sortKey, dir = sortDir;
  function draw() {
    const sorted = [...rows];
    const col = columns.find((c) => c.key === key);
    if (col) {
      const get = col.sort || ((r) => r[col.key]);
      sorted.sort((a, b) => { const x = get(a), y = get(b);
        return (x > y ? 1 : x < y ? -1 : 0) * dir; });
    }
    const head = h("tr", {}, columns.map((c) => h("th", { scope: "col",
      "aria-sort": c.key === key ? (dir > 0 ? "ascending" : "descending") : undefined },
    c.nosort ? c.label : h("button", { type: "button", onclick: () => {
      dir = key === c.key ? -dir : 1; key = c.key; draw(); } },
    c.label, c.key === key ? (dir > 0 ? " ▲" : " ▼") : ""))));
    const body = sorted.map((r) => {
      const tr = h("tr", onRow ? { class: "clickable", tabindex: "0",
        onclick: (ev) => { if (!ev.target.closest("button,a")) onRow(r); },
        onkeydown: (ev) => { if (ev.key === "Enter" && ev.target === tr) onRow(r); } } : {},
      columns.map((c) => h("td", {}, c.render ? c.render(r) : r[c.key] ?? "—")));
      return tr;
    });
    clear(wrap, h("table", {}, h("thead", {}, head), h("tbody", {}, body)),
      rows.length ? null : h("p", { class: "muted" }, empty));
  }
  draw();
  return wrap;
}

export function kv(pairs) {
  return h("dl", { class: "kv" }, pairs.filter(Boolean).map(([k, v]) =>
    [h("dt", {}, k), h("dd", {}, v ?? "—")]));
}

/** Read a dotted path from an event. */
export function get(obj, path) {
  return path.split(".").reduce((o, k) => (o && typeof o === "object" ? o[k] : undefined), obj);
}
