// The server's public API as the page uses it: bearer keys from this tab's session storage, the
// contract's error shape turned into ApiError, and OpenAI's server-sent events read from a fetch body
// (EventSource cannot POST).

const KEYS = { api: "reft.apiKey", admin: "reft.adminKey" };

export class ApiError extends Error {
  constructor(status, message, type) {
    super(message);
    this.status = status;
    this.type = type || "error";
  }
}

export const keys = {
  get api() { return sessionStorage.getItem(KEYS.api) || ""; },
  get admin() { return sessionStorage.getItem(KEYS.admin) || ""; },
  set(api, admin) {
    for (const [name, value] of [[KEYS.api, api], [KEYS.admin, admin]]) {
      if (value) sessionStorage.setItem(name, value); else sessionStorage.removeItem(name);
    }
  },
};

// Called with (ApiError, admin) on every 401, so the page can ask for a key.
export const hooks = { unauthorized: () => {} };

async function errorOf(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  let type;
  try {
    const body = await resp.json();
    if (body && body.error) ({ message, type } = body.error);
  } catch {
    // not JSON: the status line says it
  }
  return new ApiError(resp.status, message, type);
}

/** fetch() against the API: a JSON `body` or a FormData `form`; throws ApiError on any non-2xx answer. */
export async function request(path, { method = "GET", body, form, admin = false, signal } = {}) {
  const headers = {};
  // The admin key authorises every call; the API key never authorises an admin one.
  const key = admin ? keys.admin || keys.api : keys.api || keys.admin;
  if (key) headers.Authorization = `Bearer ${key}`;
  let payload;
  if (form) payload = form;
  else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const resp = await fetch(path, { method, headers, body: payload, signal, cache: "no-store" });
  if (!resp.ok) {
    const err = await errorOf(resp);
    if (resp.status === 401) hooks.unauthorized(err, admin);
    throw err;
  }
  return resp;
}

export async function json(path, options) {
  const resp = await request(path, options);
  return resp.status === 204 ? null : resp.json();
}

/** The `data:` payloads of a server-sent event stream, one string per event. */
export async function* events(resp) {
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    // Lines may end in \r\n, \n or \r; a \r at the end of a read may be the first half of a \r\n.
    let text = buf + value;
    const held = text.endsWith("\r");
    if (held) text = text.slice(0, -1);
    buf = text.replace(/\r\n?/g, "\n") + (held ? "\r" : "");
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
      if (data.length) yield data.join("\n");
    }
  }
}

/** Prometheus text format -> Map(name -> [{labels, value}]). */
export function parseMetrics(text) {
  const families = new Map();
  for (const line of text.split("\n")) {
    // A family is declared before its first sample: a counter with labels and none yet counts as 0.
    const declared = line.match(/^# TYPE (\S+) (\S+)/);
    if (declared) families.set(declared[1] + (declared[2] === "counter" ? "_total" : ""), []);
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/([\w]+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    if (!families.has(m[1])) families.set(m[1], []);
    families.get(m[1]).push({ labels, value: Number(m[3]) });
  }
  return families;
}

/** The sum of a family's samples (every label set), or null when the server does not export it. */
export function total(families, name) {
  const samples = families.get(name);
  return samples ? samples.reduce((sum, s) => sum + s.value, 0) : null;
}

export async function metrics() {
  const resp = await request("/metrics", { admin: true });
  return parseMetrics(await resp.text());
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v === true) node.setAttribute(k, "");
    else if (v !== false && v != null) node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

export function show(node, message, kind = "error") {
  node.textContent = message || "";
  node.hidden = !message;
  node.classList.toggle("ok", kind === "ok");
}
