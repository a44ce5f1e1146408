// The device user's portal: my devices, my data, my notices, my policy in plain
// words, who read my data, export, erasure request. Talks to /api/v1/me only.

import { ApiError, api, apiFetch, query } from "./common/api.js";
import {
  $, busy, clear, dataList, fmtBytes, h, showError, showInfo, showOk, signInGate, table,
  time, timeRange,
} from "./common/ui.js";
import { openStream } from "./common/live.js";
import { ZipScan } from "./common/zipscan.js";
import { loadShifts } from "./shifts.js";

const KIND_NAMES = {
  location: "Location", identity: "Device and account details", sim: "SIM card",
  network: "Network connection", apps: "Installed apps", checkinout: "Check-in and check-out",
};

const state = {
  device: null,
  range: null,
  cursors: [],     // cursors of the pages shown so far (null: the first page)
  next: null,
  exporting: false,
  now: null,       // the "now" panel's stream
};

const me = (path = "") => `/me/devices/${encodeURIComponent(state.device)}${path}`;

// --- devices ---------------------------------------------------------------------

async function loadDevices() {
  const status = $("#devices-status");
  const box = clear($("#devices"));
  let devices;
  try {
    ({ devices } = await api("/me/devices"));
  } catch (err) {
    if (err instanceof ApiError && err.status === 403) {
      showError(status, err, "This page is for device users");
      status.append(h("p", {}, "Administrators: use the ", h("a", { href: "/console/" },
        "console"), "."));
      return;
    }
    throw err;
  }
  showInfo(status);
  if (!devices.length) {
    box.append(h("p", { class: "empty" }, "No device is linked to this token."));
    return;
  }
  const list = h("ul", { class: "devices" });
  for (const d of devices) {
    list.append(h("li", {},
      h("button", { type: "button", class: "secondary", "data-device": d.device,
                    onclick: () => selectDevice(d.device) }, d.device),
      ` ${d.ownership === "personal" ? "personally owned" : "company owned"}, ` +
      (d.status === "enrolled" ? "enrolled since " : `${d.status}; enrolled `),
      time(d.enrolled_at)));
  }
  box.append(list);
  await selectDevice(devices[0].device);
}

async function selectDevice(device) {
  state.device = device;
  for (const b of document.querySelectorAll("#devices button[data-device]")) {
    b.setAttribute("aria-pressed", String(b.dataset.device === device));
  }
  $("#device").hidden = false;
  $("#data-h").textContent = `Data held about ${device}`;
  watchNow(device);
  clear($("#data-table")).append(h("p", { class: "hint", id: "data-hint" },
    "Choose a kind of data and a time range, then Show: the records are listed as ",
    "stored, oldest first."));
  showInfo($("#data-status"));
  $("#data-next").hidden = true;
  $("#data-first").hidden = true;
  await Promise.all([loadSummary(), loadNotices(), loadPolicy(), loadAccessLog(),
                     loadErasure(), loadShifts(device)]);
}

// --- the summary: what is held, at a glance ------------------------------------------

async function loadSummary() {
  const status = $("#summary-status");
  try {
    const s = await api(me());
    showInfo(status);
    const kinds = Object.keys(KIND_NAMES);
    const show = (kind) => h("button", {
      type: "button", class: "link", "data-kind": kind,
      "aria-label": `Show the ${KIND_NAMES[kind].toLowerCase()} records`,
      onclick: async () => {
        $("#data-kind").value = kind;
        await loadData(true);
        $("#data-h").scrollIntoView();
      },
    }, "show");
    clear($("#summary-counts")).append(
      h("p", { id: "summary-total" }, s.total
        ? `${s.total} record${s.total === 1 ? "" : "s"} received from ${s.device} since `
        : `Nothing has been received from ${s.device} since `, time(s.enrolled_at), "."),
      table("Records held, per kind of data", [
        { title: "Kind of data", cell: (k) => KIND_NAMES[k] },
        { title: "Records", cell: (k) => String(s.records[k] || 0) },
        { title: "Newest", cell: (k) => (s.last[k] ? time(s.last[k].ts)
          : h("span", { class: "muted" }, "—")) },
        { title: "", cell: (k) => (s.records[k] ? show(k) : "") },
      ], kinds, { id: "summary-table" }));
    const box = clear($("#summary-last"));
    const held = kinds.filter((k) => s.last[k]);
    if (!held.length) box.append(h("p", { class: "empty" }, "No data is held."));
    for (const kind of held) {
      box.append(h("div", { class: "card", "data-kind": kind },
        h("h4", {}, KIND_NAMES[kind]), h("p", { class: "muted" }, time(s.last[kind].ts)),
        dataList(s.last[kind].data, kind)));
    }
  } catch (err) {
    showError(status, err);
  }
}

function recentNotices(notices) {
  const box = clear($("#summary-notices"));
  if (!notices.length) {
    box.append(h("p", { class: "empty" }, "No command has affected this device."));
    return;
  }
  box.append(h("ul", { id: "recent-notices" }, notices.slice(0, 3).map((n) => h("li", {},
    time(n.requested_at), ` ${commandName(n)}: `, n.notice
      ? h("q", { class: "notice-text", lang: n.notice.lang }, n.notice.text)
      : h("span", { class: "muted" }, "no notice"),
    ` (${(STATE_WORDS[n.state] || n.state.replace(/_/g, " "))})`))),
  notices.length > 3 ? h("p", {}, h("a", { href: "#notices-h" },
    `All ${notices.length} notices`)) : "");
}

// --- now ---------------------------------------------------------------------------

const COMMAND_WORDS = {
  lock: "a lock", locate: "a locate", wipe: "a wipe", factory_reset: "a factory reset",
  remote_view: "a remote view request",
};
const STATE_WORDS = {
  pending_approval: "requested, waiting for a second administrator's approval",
  queued: "requested", sent: "sent to your device", received: "received by your device",
  notice_shown: "shown to you", consent_given: "accepted by you",
  consent_refused: "refused by you", completed: "carried out", failed: "failed",
  rejected: "refused by your device", expired: "expired", cancelled: "cancelled",
};

/** "14:05 UTC": the hour and minute with the reader's time zone. */
function hhmm(iso) {
  const d = new Date(iso);
  const zone = new Intl.DateTimeFormat(undefined, { timeZoneName: "short" }).formatToParts(d)
    .find((p) => p.type === "timeZoneName");
  return `${String(d.getHours()).padStart(2, "0")}:${String(d.getMinutes()).padStart(2, "0")}` +
    (zone ? ` ${zone.value}` : "");
}

function nowLine(name, d) {
  if (name === "stored") {
    return `Your location is being stored (${d.points} point${d.points === 1 ? "" : "s"}).`;
  }
  if (name === "watching") {
    return d.watch === "start"
      ? `An administrator (${d.actor}) is watching your device's live location ` +
        `(since ${hhmm(d.at)}).`
      : `${d.actor} stopped watching your device's live location.`;
  }
  if (name === "read") {
    return `An administrator (${d.actor}) read your device's data (${d.what}).`;
  }
  if (name === "command") {
    const what = COMMAND_WORDS[d.type] || `a ${d.type}`;
    return `${what.charAt(0).toUpperCase()}${what.slice(1)} command: ` +
      `${STATE_WORDS[d.state] || d.state}.`;
  }
  return null;
}

function watchNow(device) {
  if (state.now) state.now.stop();
  const status = $("#now-status");
  const list = clear($("#now-events"));
  const watching = new Map();
  const showWatching = () => {
    const names = [...watching.values()];
    $("#now-watching").textContent = names.length
      ? names.map((w) => `An administrator (${w.actor}) is watching your device's live ` +
          `location (since ${hhmm(w.since)}).`).join(" ")
      : "Nobody is watching your device's live location.";
  };
  showInfo(status);
  state.now = openStream(`/me/devices/${encodeURIComponent(device)}/live`, (name, d) => {
    if (name === "ready") {
      for (const w of d.watching) watching.set(w.watch_id, w);
      showWatching();
      return;
    }
    if (name === "gap" || name === "end") {
      showError(status, new Error(d.error));
      return;
    }
    if (name === "watching") {
      if (d.watch === "start") watching.set(d.watch_id, { actor: d.actor, since: d.at });
      else watching.delete(d.watch_id);
      showWatching();
    }
    const text = nowLine(name, d);
    if (text) {
      list.prepend(h("li", { class: `now-${name}` }, h("time", { datetime: d.at }, hhmm(d.at)),
                     " ", text));
      while (list.children.length > 50) list.lastChild.remove();
    }
  });
  state.now.done.catch((err) => showError(status, err));
}

// --- data --------------------------------------------------------------------------

async function loadData(fromStart, cursor = null) {
  const status = $("#data-status");
  const kind = $("#data-kind").value;
  const { from, to } = state.range.value();
  const limit = $("#data-limit").value;
  try {
    const page = await api(me("/data") + query({ kind, from, to, limit, cursor }));
    if (fromStart) state.cursors = [null];
    else state.cursors.push(cursor);
    state.next = page.next;
    const pageNo = state.cursors.length;
    const rows = page.records;
    clear($("#data-table")).append(table(
      `${KIND_NAMES[kind]}: page ${pageNo}, ${rows.length} record${rows.length === 1 ? "" : "s"}`,
      [
        { title: "Time", cell: (r) => time(r.ts) },
        { title: "Received", cell: (r) => time(r.received_at) },
        { title: "Data", cell: (r) => dataList(r.data, kind) },
        { title: "Policy", cell: (r) => `${r.policy} v${r.policy_version}` },
      ],
      rows,
      { id: "data-records", empty: "No records of this kind in this time range." }));
    showInfo(status, rows.length
      ? `Page ${pageNo}: ${rows.length} record${rows.length === 1 ? "" : "s"}` +
        (page.next ? "; more on the next page." : "; no more records.")
      : "");
    $("#data-next").hidden = !page.next;
    $("#data-first").hidden = pageNo <= 1;
  } catch (err) {
    showError(status, err);
  }
}

// --- notices, policy, access log ---------------------------------------------------

function stateCell(st) {
  return h("span", { class: `state state-${st}` }, st.replace(/_/g, " "));
}

function commandName(n) {
  if (n.type === "wipe") return `wipe (${n.params && n.params.scope === "full" ? "everything" :
                                          "company apps and data"})`;
  return n.type.replace(/_/g, " ");
}

async function loadNotices() {
  const status = $("#notices-status");
  try {
    const { notices } = await api(me("/notices"));
    showInfo(status);
    recentNotices(notices);
    clear($("#notices")).append(table("Notices, newest first", [
      { title: "Requested", cell: (n) => time(n.requested_at) },
      { title: "Command", cell: (n) => commandName(n) },
      { title: "Notice", cell: (n) => n.notice
          ? h("span", { class: "notice-text", lang: n.notice.lang }, n.notice.text)
          : h("span", { class: "muted" }, "none") },
      { title: "Language", cell: (n) => (n.notice ? n.notice.lang : "") },
      { title: "Sent", cell: (n) => time(n.sent_at) },
      { title: "Shown", cell: (n) => time(n.notice_shown_at) },
      { title: "Outcome", cell: (n) => h("span", {}, stateCell(n.state),
          n.outcome_detail ? ` (${n.outcome_detail})` : "") },
    ], notices, { id: "notices-table", empty: "No command has affected this device." }));
  } catch (err) {
    showError(status, err);
  }
}

async function loadPolicy() {
  const status = $("#policy-status");
  try {
    const p = await api(me("/policy"));
    showInfo(status);
    clear($("#policy")).append(
      h("p", {}, "Policy in force: ", h("strong", { id: "policy-name" }, p.policy),
        `, version ${p.version}.`),
      h("ul", { id: "policy-explanation" }, p.explanation.map((line) => h("li", {}, line))));
    if (p.floor === "merged" || p.floor === "only") {
      $("#policy").append(h("p", { id: "policy-floor" }, "This is a personal device: it gets ",
        "at least the protection every personal device gets (no location, no list of ",
        "installed apps, identifiers masked or not stored), whatever else the policy says."));
    } else if (p.floor === "relaxed" && !p.beyond_floor.length) {
      $("#policy").append(h("p", { id: "policy-floor" }, "This policy is written for personal ",
        "devices and collects nothing beyond the minimum every personal device gets."));
    } else if (p.floor === "relaxed") {
      $("#policy").append(
        h("p", { id: "policy-floor" }, "This policy is written for personal devices and ",
          "collects more than the minimum every personal device otherwise gets:"),
        h("ul", { id: "policy-beyond-floor" },
          p.beyond_floor.map((line) => h("li", {}, line))));
    }
  } catch (err) {
    showError(status, err);
  }
}

async function loadAccessLog() {
  const status = $("#access-status");
  try {
    const { entries } = await api(me("/access-log"));
    showInfo(status);
    const what = (e) => (e.what === "shifts" ? "shifts (who had the device, its condition)"
      : e.what === "live" ? `live location: ${e.watch === "end" ? "stopped" : "started"} watching`
        : e.action || e.what || "");
    clear($("#access")).append(table("Reads of this device's personal data, newest first", [
      { title: "When", cell: (e) => time(e.at) },
      { title: "Who", cell: (e) => e.actor + (e.role ? ` (${e.role})` : "") },
      // Entries are signed by the server; forged ones never reach this list. Older
      // entries, recorded before signing began, are marked as such.
      { title: "What", cell: (e) => what(e).replace(/^data:/, "data: ") +
          (e.integrity === "legacy" ? " (recorded before entries were signed)" : "") },
    ], entries, { id: "access-table", empty: "Nobody has read this device's personal data." }));
  } catch (err) {
    showError(status, err);
  }
}

// --- export ------------------------------------------------------------------------

function filenameOf(resp) {
  const cd = resp.headers.get("Content-Disposition") || "";
  const m = /filename="?([A-Za-z0-9_.-]+)"?/.exec(cd);
  return m ? m[1] : `${state.device}-export.zip`;
}

async function startExport() {
  const status = $("#export-status");
  const button = $("#export-start");
  if (state.exporting) return;
  state.exporting = true;
  const box = $("#export-progress-box");
  const bar = $("#export-progress");
  const text = $("#export-progress-text");
  const device = state.device;
  await busy(button, status, async () => {
    try {
      showInfo(status, "Preparing the export…");
      const summary = await api(me("/export/summary"));
      const perKind = summary.records;
      const resp = await apiFetch(me("/export"));
      const total = Number(resp.headers.get("X-Export-Records") || summary.total);
      box.hidden = false;
      bar.max = Math.max(total, 1);
      bar.value = 0;
      const scan = new ZipScan();
      const chunks = [];
      const reader = resp.body.getReader();
      let records = 0;
      const update = (atEnd) => {
        // A kind's records are all in once its JSON Lines entry is complete.
        records = 0;
        for (const name of scan.finished(atEnd)) {
          const m = /^telemetry\/([a-z]+)\.jsonl$/.exec(name);
          if (m && perKind[m[1]] !== undefined) records += perKind[m[1]];
        }
        if (atEnd) records = total;
        bar.value = Math.min(records, total);
        text.textContent = `${records} of ${total} records, ${fmtBytes(scan.bytes)} received`;
      };
      update(false);
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        chunks.push(value);
        scan.push(value);
        update(false);
      }
      update(true);
      const blob = new Blob(chunks, { type: "application/zip" });
      const url = URL.createObjectURL(blob);
      const name = filenameOf(resp);
      const link = h("a", { href: url, download: name, id: "export-download" },
                     `Save ${name} (${fmtBytes(blob.size)})`);
      showOk(status, `Export of ${device} finished: ${total} records, ${fmtBytes(blob.size)}. `,
             link);
      link.click();
    } catch (err) {
      if (err instanceof TypeError) {
        // The stream broke off (connection lost while reading).
        throw new ApiError(0, "the export was interrupted: try again", null);
      }
      throw err;
    } finally {
      state.exporting = false;
    }
  });
}

// --- erasure -------------------------------------------------------------------------

async function loadErasure() {
  const status = $("#erasure-status");
  try {
    const { erasure_requests: list } = await api(me("/erasure-requests"));
    clear($("#erasure-list")).append(table("My erasure requests", [
      { title: "Requested", cell: (r) => time(r.requested_at) },
      { title: "State", cell: (r) => stateCell(r.state) },
      { title: "Due", cell: (r) => time(r.due_at) },
      { title: "Decided", cell: (r) => (r.decided_at ? h("span", {}, time(r.decided_at),
          r.decided_by ? ` by ${r.decided_by}` : "") : h("span", { class: "muted" }, "—")) },
      { title: "Refusal reason", cell: (r) => r.refusal_reason || "" },
    ], list, { id: "erasure-table", empty: "No erasure request for this device." }));
    $("#erasure-submit").disabled = list.some((r) => r.state === "pending");
  } catch (err) {
    showError(status, err);
  }
}

async function requestErasure(ev) {
  ev.preventDefault();
  const status = $("#erasure-status");
  await busy($("#erasure-submit"), status, async () => {
    showInfo(status, "Sending your request…");
    const made = await api(me("/erasure-requests"), { method: "POST" });
    showOk(status, `Your erasure request is ${made.state}. It is due by `,
           time(made.due_at), ".");
  });
  await loadErasure(); // after busy() re-enabled the button: a pending request disables it
}

// --- start -------------------------------------------------------------------------

function start() {
  state.range = timeRange("data", { hours: null }); // all the data held, by default
  $("#data-range").append(state.range.el);
  $("#data-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy($("#data-show"), $("#data-status"), () => loadData(true));
  });
  $("#data-next").addEventListener("click", () => loadData(false, state.next));
  $("#data-first").addEventListener("click", () => loadData(true));
  $("#export-start").addEventListener("click", startExport);
  $("#erasure-form").addEventListener("submit", requestErasure);
  signInGate({
    form: $("#sign-in"), input: $("#token"), status: $("#sign-in-status"),
    app: $("#app"), signOut: $("#sign-out"),
    onSignedIn: async () => {
      $("#device").hidden = true;
      try {
        await loadDevices();
      } catch (err) {
        if (err instanceof ApiError && err.status === 401) throw err;
        showError($("#devices-status"), err);
      }
    },
  });
}

start();
