// The API from the browser: the key (sessionStorage only), JSON calls, the error shape, and a
// fetch-based Server-Sent Events reader (EventSource cannot send an Authorization header).
const KEY_NAME = "avatarStudio.apiKey";

export function getKey() { return sessionStorage.getItem(KEY_NAME); }
export function setKey(key) { sessionStorage.setItem(KEY_NAME, key); }
export function clearKey() { sessionStorage.removeItem(KEY_NAME); }

/** An API error: `status`, `code`, `message`, `param` (the field it names, or null). */
export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.code = e.code || "http_error";
    this.param = e.param || null;
  }
}

function headers(extra) {
  const h = { ...(extra || {}) };
  const key = getKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** `api("GET", "/v1/account")`, `api("POST", path, {json})`, `api("POST", path, {form})`. */
export async function api(method, path, { json, form, query } = {}) {
  let url = path;
  if (query) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null && v !== "") q.set(k, String(v));
    const s = q.toString();
    if (s) url += `?${s}`;
  }
  const init = { method, headers: headers(), credentials: "omit", cache: "no-store" };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form; // the browser sets the multipart boundary
  }
  const resp = await fetch(url, init);
  const text = await resp.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = null; }
  if (!resp.ok) throw new ApiError(resp.status, body);
  return { status: resp.status, body };
}

/** Follow `GET {path}` as Server-Sent Events: calls onEvent(name, data) per event until the
 * stream ends or `signal` aborts. Returns when the server closes the stream. */
export async function streamEvents(path, onEvent, signal) {
  const resp = await fetch(path, { headers: headers({ Accept: "text/event-stream" }), signal, credentials: "omit", cache: "no-store" });
  if (!resp.ok) {
    let body = null;
    try { body = await resp.json(); } catch { body = null; }
    throw new ApiError(resp.status, body);
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue; // keep-alive comment
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) {
        let parsed = null;
        try { parsed = JSON.parse(data.join("\n")); } catch { parsed = null; }
        onEvent(name, parsed);
      }
    }
  }
}
