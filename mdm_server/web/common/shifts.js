// Shifts (a check-out and the device's next check-in) as the console and the portal
// show them: what is stored, "not stored" where the policy kept nothing, and the
// condition fields that changed between check-out and check-in marked.

import { h, time } from "./ui.js";

export const STATUS_WORDS = {
  closed: "checked in", open: "checked out", overdue: "overdue",
  no_check_in: "never checked in",
};
const FIELD_WORDS = {
  battery_pct: "battery", screen: "screen", case: "case", notes: "notes",
};
const HASHED = /^hmac-sha256:[0-9a-f]{32}$/;

/** "8 h 05 min", "3 days 2 h", "45 min". */
export function durationText(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const min = Math.floor(seconds / 60);
  const days = Math.floor(min / 1440);
  const hours = Math.floor((min % 1440) / 60);
  const mins = String(min % 60).padStart(2, "0");
  if (days) return `${days} day${days === 1 ? "" : "s"} ${hours} h`;
  if (hours) return `${hours} h ${mins} min`;
  return `${min % 60} min`;
}

export function notStored() {
  return h("span", { class: "not-stored" }, "not stored");
}

/** A user id as stored; a hashed one says so (it is the policy's pseudonym). */
export function userCell(value) {
  if (value === null || value === undefined) return notStored();
  if (HASHED.test(value)) {
    return h("span", { class: "hashed", title: "hashed by the policy: the same user has " +
                       "the same hash" }, h("code", {}, value.slice(12, 20) + "…"),
             " (hashed)");
  }
  return h("span", {}, value);
}

function fieldText(field, value) {
  return field === "battery_pct" ? `${Number(value.toPrecision(15))} %` : String(value);
}

/** One side's condition: each field as stored, "not stored" otherwise; `changed`:
 * the fields that differ from the other side (marked). */
export function conditionCell(side, changed) {
  if (!side) return h("span", { class: "muted" }, "—");
  if (!side.stored) {
    return h("span", { class: "muted not-stored-record" }, "record not stored (its policy " +
             "does not collect check-ins/outs, or it was removed)");
  }
  if (Object.keys(FIELD_WORDS).every((f) => side.condition[f] === null)) {
    return h("span", { class: "not-stored" }, "no condition stored");
  }
  const dl = h("dl", { class: "data" });
  for (const [field, word] of Object.entries(FIELD_WORDS)) {
    const v = side.condition[field];
    const text = v === null || v === undefined ? notStored() : fieldText(field, v);
    dl.append(h("dt", {}, word), h("dd", {}, changed.has(field)
      ? h("mark", { class: "changed-field", "data-field": field }, text) : text));
  }
  return dl;
}

export function changesCell(changes) {
  if (!changes.length) return h("span", { class: "muted" }, "nothing");
  return h("ul", { class: "changes" }, changes.map((c) => h("li", { "data-field": c.field },
    `${FIELD_WORDS[c.field] || c.field}: ${fieldText(c.field, c.from)} → ` +
    `${fieldText(c.field, c.to)}` + (c.field === "battery_pct" && typeof c.delta === "number"
      ? ` (${c.delta > 0 ? "+" : ""}${Number(c.delta.toPrecision(15))})` : ""))));
}

export function statusCell(s) {
  return h("span", { class: `state shift-${s.status}` }, STATUS_WORDS[s.status] || s.status);
}

/** The shifts as a table; each row carries data-device and data-status, and the class
 * `changed` when its condition changed. `columns`: which to show ("device" is left out
 * in the portal). */
export function shiftTable(caption, shifts, { id, empty, device = true } = {}) {
  if (!shifts.length) return h("p", { class: "empty", id }, empty || "No shift.");
  const head = [device && "Device", "User", "Status", "Checked out", "Checked in",
                "Duration", "At check-out", "At check-in", "What changed"].filter(Boolean);
  const rows = shifts.map((s) => {
    const changed = new Set(s.changes.map((c) => c.field));
    const cells = [
      device && h("a", { href: `#device=${encodeURIComponent(s.device)}` }, s.device),
      userCell(s.user), statusCell(s), time(s.checked_out_at),
      s.checked_in_at ? time(s.checked_in_at)
        : s.next_check_out_at ? h("span", {}, "no — out again ", time(s.next_check_out_at))
          : h("span", { class: "muted" }, "not yet"),
      durationText(s.duration_s) + (s.status === "open" || s.status === "overdue"
        ? " so far" : ""),
      conditionCell(s.check_out, changed), conditionCell(s.check_in, changed),
      changesCell(s.changes),
    ].filter((c) => c !== false);
    const tr = h("tr", { class: [changed.size ? "changed" : "", `shift-${s.status}`].join(" ")
                          .trim(),
                         dataset: { device: s.device, status: s.status } },
      cells.map((c) => h("td", {}, c)));
    return tr;
  });
  return h("div", { class: "table-wrap" }, h("table", { id, class: "shifts" },
    h("caption", {}, caption),
    h("thead", {}, h("tr", {}, head.map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, rows)));
}
