// The HTTP API client both pages use. The bearer token lives in sessionStorage
// (gone when the tab closes) and travels only in the Authorization header: never in
// a URL. Every failure becomes an ApiError whose message is the API's own error text
// (or a plain sentence when the server could not be reached), never a stack trace.

const TOKEN_KEY = "mdm.token";
export const API = "/api/v1";

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(token) {
  sessionStorage.setItem(TOKEN_KEY, token.trim());
}

export function clearToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = body && typeof body.code === "string" ? body.code : null;
    this.issues = body && Array.isArray(body.issues) ? body.issues : [];
  }
}

function authHeaders(extra) {
  const headers = new Headers(extra || {});
  const token = getToken();
  if (token) headers.set("Authorization", `Bearer ${token}`);
  return headers;
}

/** The error an answer carries: the API's {"error"} text, else its status line. */
async function errorOf(resp) {
  let body = null;
  try {
    body = await resp.json();
  } catch {
    body = null;
  }
  const text = body && typeof body.error === "string" && body.error
    ? body.error
    : `the server answered ${resp.status}${resp.statusText ? " " + resp.statusText : ""}`;
  return new ApiError(resp.status, text, body);
}

/** A raw fetch with the token; throws ApiError for a network failure or a non-2xx. */
export async function apiFetch(path, { method = "GET", body, headers, signal } = {}) {
  const h = authHeaders(headers);
  let payload;
  if (body !== undefined) {
    h.set("Content-Type", "application/json");
    payload = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(API + path, { method, headers: h, body: payload, signal,
                                     cache: "no-store", credentials: "omit" });
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new ApiError(0, "could not reach the server: check the connection and try again",
                       null);
  }
  if (!resp.ok) throw await errorOf(resp);
  return resp;
}

/** JSON in, JSON out. */
export async function api(path, options = {}) {
  const resp = await apiFetch(path, options);
  if (resp.status === 204) return null;
  try {
    return await resp.json();
  } catch {
    throw new ApiError(resp.status, "the server's answer could not be read", null);
  }
}

/** A query string from an object, leaving out null, undefined and "" values. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== null && v !== undefined && v !== "") q.set(k, String(v));
  }
  const s = q.toString();
  return s ? "?" + s : "";
}

/** Every page of a list that pages with `next`, up to `max` items. */
export async function allPages(path, params, key, max = 10000) {
  const items = [];
  let cursor = null;
  let truncated = false;
  for (;;) {
    const page = await api(path + query({ ...params, cursor }));
    items.push(...page[key]);
    cursor = page.next;
    if (!cursor) break;
    if (items.length >= max) {
      truncated = true;
      break;
    }
  }
  return { items, truncated };
}

/** A fresh Idempotency-Key for one user action (a retry of it reuses the key). */
export function newRequestId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}
