// Small DOM helpers. Data is only ever inserted as text (textContent), never as HTML.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on") && typeof value === "function") node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// Show a status line: kind is "", "loading", "error" or "ok". An ApiError for a missing
// or revoked key gets a link to the key page.
export function showStatus(node, message, kind = "", error = null) {
  if (!node) return;
  node.replaceChildren();
  node.className = "form-status" + (kind ? " " + kind : "");
  if (!message) return;
  node.append(document.createTextNode(message));
  if (error && (error.status === 401 || error.status === 403) && error.code !== "csrf_failed") {
    const next = encodeURIComponent(location.pathname + location.search);
    node.append(" ", el("a", { href: `/key?next=${next}`, text: "Enter an API key" }));
  }
}

export function fmtNum(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  if (Number.isInteger(value)) return value.toLocaleString("en-US");
  if (value === 0) return "0";
  const abs = Math.abs(value);
  if (abs >= 10 ** digits) return Math.round(value).toLocaleString("en-US");
  if (abs < 10 ** -(digits + 1)) return value.toExponential(digits - 1);
  return String(Number(value.toPrecision(digits)));
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

// Read ?name= or #name= (long texts travel in the fragment, which is never sent to a server).
export function linkParam(name) {
  const fromQuery = new URLSearchParams(location.search).get(name);
  if (fromQuery !== null) return fromQuery;
  return new URLSearchParams(location.hash.slice(1)).get(name);
}

const MAX_QUERY_TEXT = 2000;

// A deep link to `path` carrying `params`; a long `text` goes into the fragment.
export function deepLink(path, params) {
  const query = new URLSearchParams();
  const fragment = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value === null || value === undefined || value === "") continue;
    if (name === "text" && String(value).length > MAX_QUERY_TEXT) fragment.set(name, value);
    else query.set(name, value);
  }
  const q = query.toString();
  const f = fragment.toString();
  return path + (q ? "?" + q : "") + (f ? "#" + f : "");
}
