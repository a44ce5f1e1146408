// Small DOM helpers shared by the portal and the console. Text goes in as text
// (textContent), never as HTML: nothing the API returns can inject markup.

import { ApiError, clearToken, getToken, setToken } from "./api.js";
import { conditionText, fieldLabel, fieldText, fmtNumber } from "./fields.js";

/** h("p", {class: "x"}, "text", child): an element. Attributes starting with "on"
 * are listeners; `false`/null attributes are left out. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

const SVG_NS = "http://www.w3.org/2000/svg";

/** The same for SVG elements. */
export function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") {
      el.addEventListener(k.slice(2), v);
    } else if (k === "dataset") {
      Object.assign(el.dataset, v);
    } else {
      el.setAttribute(k, v === true ? "" : String(v));
    }
  }
}

function append(el, children) {
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function $(selector, root = document) {
  return root.querySelector(selector);
}

export function clear(el) {
  el.replaceChildren();
  return el;
}

/** A time as the reader's locale shows it, with the ISO value in a <time>. */
export function time(iso) {
  if (!iso) return h("span", { class: "muted" }, "—");
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return h("span", {}, String(iso));
  return h("time", { datetime: iso, title: iso }, fmtTime(iso));
}

export function fmtTime(iso) {
  const d = new Date(iso);
  return d.toLocaleString(undefined, { year: "numeric", month: "short", day: "numeric",
                                       hour: "2-digit", minute: "2-digit",
                                       second: "2-digit", timeZoneName: "short" });
}

export function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB"];
  let v = n;
  let u = -1;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u += 1;
  }
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[u]}`;
}

/** A record's data, readable: each field as words with its unit ("Accuracy: 12 m",
 * common/fields.js), an apps inventory as a table, a check-out's condition as text. */
export function dataList(data, kind = null) {
  if (data === null || typeof data !== "object") return h("span", {}, String(data));
  if (kind === "apps" && Array.isArray(data.apps) && Object.keys(data).length === 1) {
    return appsTable(data.apps); // the whole record is the list: the table alone
  }
  const dl = h("dl", { class: "data" });
  for (const [k, v] of Object.entries(data)) {
    let value;
    if (kind === "apps" && k === "apps" && Array.isArray(v)) value = appsTable(v);
    else if (kind === "checkinout" && k === "condition") value = conditionText(v);
    else if (v !== null && typeof v === "object") value = JSON.stringify(v);
    else value = kind ? fieldText(kind, k, v) : (typeof v === "number" ? fmtNumber(v) : String(v));
    dl.append(h("dt", { "data-field": k }, kind ? fieldLabel(kind, k) : k),
              h("dd", {}, value));
  }
  return dl;
}

/** An apps inventory ([{package, name, version, installed_at}]) as a table. */
export function appsTable(apps) {
  if (!apps.length) return h("span", { class: "empty" }, "no app listed");
  const cell = (a, f) => (f === "installed_at"
    ? (Number.isFinite(a[f]) ? time(new Date(a[f]).toISOString())
                             : fieldText("apps", `apps.${f}`, a[f]))
    : fieldText("apps", `apps.${f}`, a[f]));
  const cols = ["name", "package", "version", "installed_at"];
  return h("div", { class: "table-wrap" }, h("table", { class: "apps" },
    h("caption", {}, `${apps.length} app${apps.length === 1 ? "" : "s"}`),
    h("thead", {}, h("tr", {}, cols.map((f) => h("th", { scope: "col" },
                                                  fieldLabel("apps", `apps.${f}`))))),
    h("tbody", {}, apps.map((a) => h("tr", {}, cols.map((f) => h("td", {}, cell(a, f))))))));
}

/** A table: columns = [{title, cell(row) -> Node|string, th: {attributes of its th}}],
 * rows = [...]. */
export function table(caption, columns, rows, { empty = "Nothing to show.", id } = {}) {
  if (!rows.length) return h("p", { class: "empty", id }, empty);
  // In a box of its own that scrolls sideways: a wide table never widens the page
  // (a phone's screen).
  return h("div", { class: "table-wrap" }, h("table", { id },
    h("caption", {}, caption),
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", ...(c.th || {}) },
                                                     c.title)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, columns.map((c) => h("td", {}, c.cell(r))))))));
}

/** Show what went wrong in a status region: the API's text and every listed issue. */
export function showError(region, err, prefix = "") {
  clear(region);
  region.classList.remove("ok");
  region.classList.add("error");
  const text = err instanceof ApiError
    ? err.message
    : "something went wrong in this page; reload it and try again";
  if (!(err instanceof ApiError)) console.error(err); // for developers; never shown
  region.append(h("p", {}, (prefix ? prefix + ": " : "") + text));
  if (err instanceof ApiError && err.issues.length) {
    region.append(h("ul", { class: "issues" },
      err.issues.map((i) => h("li", {}, h("code", {}, i.path || "(document)"), " ",
                               i.message))));
  }
  return region;
}

export function showOk(region, ...content) {
  clear(region);
  region.classList.remove("error");
  region.classList.add("ok");
  region.append(h("p", {}, ...content));
  return region;
}

export function showInfo(region, ...content) {
  clear(region);
  region.classList.remove("error", "ok");
  if (content.length) region.append(h("p", {}, ...content));
  return region;
}

/** Run an async action from a button: disabled while it runs, errors shown. */
export async function busy(button, region, fn) {
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try {
    return await fn();
  } catch (err) {
    if (region) showError(region, err);
    return undefined;
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

/** "2024-05-01T10:00" (datetime-local, the reader's zone) <-> RFC 3339. */
export function localInputToIso(value) {
  if (!value) return null;
  const d = new Date(value);
  return Number.isNaN(d.getTime()) ? null : d.toISOString();
}

export function isoToLocalInput(date) {
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}` +
         `T${pad(date.getHours())}:${pad(date.getMinutes())}`;
}

/** A from/to pair of datetime-local inputs with a few presets; `hours`: how far back
 * "from" starts (null: no start, everything). */
export function timeRange(idPrefix, { hours = 24 * 7 } = {}) {
  const from = h("input", { type: "datetime-local", id: `${idPrefix}-from`,
                            name: "from" });
  const to = h("input", { type: "datetime-local", id: `${idPrefix}-to`, name: "to" });
  const preset = (label, hrs) => h("button", {
    type: "button", class: "link",
    onclick: () => {
      if (hrs === null) {
        from.value = "";
        to.value = "";
      } else {
        const now = new Date();
        from.value = isoToLocalInput(new Date(now.getTime() - hrs * 3600 * 1000));
        to.value = "";
      }
      from.dispatchEvent(new Event("change", { bubbles: true }));
    },
  }, label);
  if (hours !== null) {
    from.value = isoToLocalInput(new Date(Date.now() - hours * 3600 * 1000));
  }
  const el = h("fieldset", { class: "range" },
    h("legend", {}, "Time range"),
    h("label", { for: from.id }, "From"), from,
    h("label", { for: to.id }, "To (not included; empty: now)"), to,
    h("span", { class: "presets" }, "Quick: ", preset("last hour", 1), " ",
      preset("last 24 h", 24), " ", preset("last 7 days", 24 * 7), " ",
      preset("everything", null)));
  return {
    el,
    from,
    to,
    value: () => ({ from: localInputToIso(from.value), to: localInputToIso(to.value) }),
  };
}

/**
 * The sign-in gate. `onSignedIn()` runs with a token in sessionStorage; it throws an
 * ApiError 401 when the token is not valid (then the form shows again with the
 * API's text). The form only ever puts the token into sessionStorage.
 */
export function signInGate({ form, input, status, app, signOut, onSignedIn }) {
  async function enter() {
    form.hidden = true;
    app.hidden = false;
    signOut.hidden = false;
    try {
      await onSignedIn();
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        clearToken();
        leave();
        showError(status, err, "Sign-in failed");
      } else {
        throw err;
      }
    }
  }
  function leave() {
    app.hidden = true;
    signOut.hidden = true;
    form.hidden = false;
    input.value = "";
    input.focus();
  }
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = input.value.trim();
    if (!token) {
      showError(status, new ApiError(0, "paste your access token first", null));
      return;
    }
    setToken(token);
    input.value = "";
    showInfo(status);
    enter();
  });
  signOut.addEventListener("click", () => {
    clearToken();
    showInfo(status, "Signed out.");
    leave();
  });
  if (getToken()) enter();
  else leave();
}

/** Calls `fn` every `ms` until it returns true or `stop()` is called. */
export function poll(fn, ms) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    if (stopped) return;
    let done = false;
    try {
      done = await fn();
    } catch {
      done = false;
    }
    if (!done && !stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return { stop: () => { stopped = true; clearTimeout(timer); } };
}
