// The admin console: devices, a device with its last known state and location
// history, commands and their approval, policies, erasure requests. Each view is a
// function that renders into #view and may return a function that stops its timers.

import { ApiError, allPages, api, query } from "./common/api.js";
import {
  $, busy, clear, dataList, h, poll, showError, showInfo, signInGate, table, time, timeRange,
} from "./common/ui.js";
import { approvalsView, commandsTable, commandsView } from "./commands.js";
import { erasureView } from "./erasure.js";
import { liveView } from "./live.js";
import { locationMap } from "./map.js";
import { placesView } from "./places.js";
import { FLOOR_WORDS, policiesView } from "./policies.js";
import { loadTrips, tripsSummary } from "./trips.js";
import { shiftsView } from "./shifts.js";

const MAP_MAX_POINTS = 5000;
const KIND_NAMES = {
  location: "Location", identity: "Identity", sim: "SIM", network: "Network",
  apps: "Apps", checkinout: "Check-in/out",
};

let stopView = null;

// --- devices -----------------------------------------------------------------------

function devicesView(view) {
  const status = h("div", { class: "status", role: "status", "aria-live": "polite" });
  const list = h("div", { id: "devices" });
  const more = h("button", { type: "button", class: "secondary", hidden: true }, "More devices");
  view.append(h("h2", {}, "Devices"), status, list, h("div", { class: "actions" }, more));
  const rows = [];
  let next = null;
  const render = () => {
    clear(list).append(table(`${rows.length} device${rows.length === 1 ? "" : "s"}`, [
      { title: "Device", cell: (d) => h("a", { href: `#device=${d.device}` }, d.device) },
      { title: "Ownership", cell: (d) => d.ownership },
      { title: "Groups", cell: (d) => d.groups.join(", ") },
      { title: "Status", cell: (d) => h("span", { class: `state state-${d.status}` }, d.status) },
      { title: "Enrolled", cell: (d) => time(d.enrolled_at) },
      { title: "Last seen", cell: (d) => time(d.last_seen_at) },
    ], rows, { id: "devices-table", empty: "No device is enrolled yet." }));
  };
  const load = async () => {
    try {
      const page = await api("/devices" + query({ limit: 100, cursor: next }));
      rows.push(...page.devices);
      next = page.next || null;
      more.hidden = !next;
      showInfo(status);
      render();
    } catch (err) {
      showError(status, err);
    }
  };
  more.addEventListener("click", () => busy(more, status, load));
  load();
}

// --- one device --------------------------------------------------------------------

function deviceView(view, device) {
  const enc = encodeURIComponent(device);
  const status = h("div", { class: "status", role: "status", "aria-live": "polite" });
  const facts = h("div", { id: "device-facts" });
  const last = h("div", { id: "device-last", class: "grid2" });
  const range = timeRange("map", { hours: 24 });
  const mapStatus = h("div", { class: "status", role: "status", "aria-live": "polite" });
  const mapBox = h("div", { id: "map-box" });
  const mapSummary = h("p", { id: "map-summary" });
  const tripsStatus = h("div", { class: "status", role: "status", "aria-live": "polite",
                                 id: "trips-status" });
  const tripsBox = h("div", { id: "trips-box" });
  const show = h("button", { type: "submit", id: "map-show" }, "Show");
  const mapForm = h("form", { id: "map-form" }, range.el, h("div", { class: "actions" }, show));
  const cmdStatus = h("div", { class: "status", role: "status", "aria-live": "polite" });
  const cmdBox = h("div", { id: "device-commands" });
  const noticeBox = h("div", { id: "device-notices" });

  view.append(
    h("p", {}, h("a", { href: "#devices" }, "← All devices")),
    h("h2", {}, `Device ${device}`), status, facts,
    h("section", { "aria-labelledby": "last-h" },
      h("h3", { id: "last-h" }, "Last known state"), last),
    h("section", { "aria-labelledby": "map-h" },
      h("h3", { id: "map-h" }, "Location history"),
      h("p", { class: "hint" }, "Drawn from the location records stored for this device ",
        "(after the policy shaped them). Reading them is logged in the device user's ",
        "access log."),
      mapForm, mapStatus, mapSummary, mapBox,
      h("p", { class: "legend" }, h("span", {}, "● green: first point"),
        h("span", {}, "● red: last point"), h("span", {}, "◆ a stop"),
        h("span", {}, "coloured: trips (see the table)")),
      tripsStatus, tripsBox),
    h("section", { "aria-labelledby": "dcmd-h" },
      h("h3", { id: "dcmd-h" }, "Commands"),
      h("p", { class: "write" }, h("a", { href: `#commands=${device}`, id: "send-command" },
        "Send a command to this device")),
      cmdStatus, cmdBox),
    h("section", { "aria-labelledby": "dnot-h" },
      h("h3", { id: "dnot-h" }, "Notices shown to the user"), noticeBox));

  // The device as loaded: drawMap waits for it (its policy says whether there can be
  // any location at all).
  const loaded = (async () => {
    try {
      const d = await api(`/devices/${enc}`);
      showInfo(status);
      facts.append(h("dl", { class: "facts" },
        h("dt", {}, "Ownership"), h("dd", { id: "fact-ownership" }, d.ownership),
        h("dt", {}, "Groups"), h("dd", {}, d.groups.join(", ") || "—"),
        h("dt", {}, "Status"), h("dd", { id: "fact-status" }, d.status),
        h("dt", {}, "Enrolled"), h("dd", {}, time(d.enrolled_at)),
        h("dt", {}, "User e-mail"), h("dd", {}, d.user_email || "—"),
        h("dt", {}, "Last seen"), h("dd", {}, time(d.last_seen_at)),
        h("dt", {}, "Policy in force"), h("dd", { id: "fact-policy" },
          h("code", {}, d.policy.policy), ` (${FLOOR_WORDS[d.policy.floor] || d.policy.floor})`)));
      const kinds = Object.keys(d.last || {});
      if (!kinds.length) last.append(h("p", { class: "empty" }, "Nothing stored yet."));
      for (const kind of kinds) {
        const rec = d.last[kind];
        last.append(h("div", { class: "card", "data-kind": kind },
          h("h4", {}, KIND_NAMES[kind] || kind), h("p", { class: "muted" }, time(rec.ts)),
          dataList(rec.data, kind)));
      }
      return d;
    } catch (err) {
      showError(status, err);
      return null;
    }
  })();

  const drawMap = async () => {
    const d = await loaded;
    if (d && !d.policy.collects.location) {
      // Nothing to look for: say why, rather than "no location in this time range".
      const why = d.policy.floor === "merged" || d.policy.floor === "only"
        ? `${device} is a personal device, and the personal-device floor collects no ` +
          `location (policy in force: ${d.policy.policy})`
        : `the policy in force, ${d.policy.policy}, does not collect location`;
      showInfo(mapStatus);
      clear(mapBox);
      clear(tripsBox);
      clear(mapSummary).append(h("span", { id: "location-not-collected" },
        `Location is not collected for this device: ${why}.`));
      return;
    }
    const { from, to } = range.value();
    showInfo(mapStatus, "Loading locations…");
    try {
      const [{ items, truncated }, trips] = await Promise.all([
        allPages(`/devices/${enc}/data`, { kind: "location", from, to, limit: 500 },
                 "records", MAP_MAX_POINTS),
        loadTrips(enc, { from, to })]);
      showInfo(mapStatus);
      const n = items.length;
      const label = n
        ? `${n} location point${n === 1 ? "" : "s"} of ${device}`
        : `No location of ${device} in this time range`;
      clear(mapBox).append(locationMap(items, { label, analysis: trips.analysis,
                                                places: trips.places }));
      clear(tripsBox);
      if (trips.error) showError(tripsStatus, trips.error, "Trips");
      else showInfo(tripsStatus);
      if (trips.analysis && n) tripsBox.append(...tripsSummary(trips.analysis));
      clear(mapSummary);
      if (n) {
        mapSummary.append(`${n} point${n === 1 ? "" : "s"} from `, time(items[0].ts), " to ",
                          time(items[n - 1].ts),
                          truncated ? ` (the first ${n} only: narrow the time range)` : "");
      } else {
        mapSummary.append("No location in this time range.");
      }
    } catch (err) {
      showError(mapStatus, err);
    }
  };
  mapForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(show, mapStatus, drawMap);
  });
  drawMap();

  const loadNotices = async () => {
    try {
      const { notices } = await api(`/devices/${enc}/notices`);
      clear(noticeBox).append(table("Notices, newest first", [
        { title: "Requested", cell: (n) => time(n.requested_at) },
        { title: "Type", cell: (n) => n.type },
        { title: "Notice", cell: (n) => (n.notice
          ? h("span", { class: "notice-text", lang: n.notice.lang }, n.notice.text) : "—") },
        { title: "Language", cell: (n) => (n.notice ? n.notice.lang : "") },
        { title: "Sent", cell: (n) => time(n.sent_at) },
        { title: "Shown", cell: (n) => time(n.notice_shown_at) },
        { title: "Outcome", cell: (n) => h("span", { class: `state state-${n.state}` },
                                           n.state) },
      ], notices, { empty: "No notice yet." }));
    } catch (err) {
      showError(clear(noticeBox), err);
    }
  };
  loadNotices();
  const p = poll(async () => {
    const done = await commandsTable(cmdBox, cmdStatus, device);
    return done;
  }, 2000);
  return () => p.stop();
}

// --- router ------------------------------------------------------------------------

const VIEWS = {
  devices: (view) => devicesView(view),
  device: (view, arg) => deviceView(view, arg),
  commands: (view, arg) => commandsView(view, arg),
  approvals: (view) => approvalsView(view),
  policies: (view, arg) => policiesView(view, arg),
  places: (view) => placesView(view),
  erasure: (view) => erasureView(view),
  shifts: (view) => shiftsView(view),
  live: (view) => liveView(view),
};

function route() {
  const raw = decodeURIComponent(location.hash.replace(/^#/, ""));
  const eq = raw.indexOf("=");
  let name = eq < 0 ? raw : raw.slice(0, eq);
  const arg = eq < 0 ? null : raw.slice(eq + 1);
  if (!VIEWS[name]) name = "devices";
  if ((name === "commands" || name === "live") && document.body.dataset.role === "auditor") {
    name = "devices"; // the live map is for admins
  }
  if (stopView) stopView();
  stopView = null;
  const view = clear($("#view"));
  const navName = name === "device" ? "devices" : name;
  for (const b of document.querySelectorAll("#nav button")) {
    if (b.dataset.view === navName) b.setAttribute("aria-current", "page");
    else b.removeAttribute("aria-current");
  }
  const stop = VIEWS[name](view, arg);
  if (typeof stop === "function") stopView = stop;
}

function start() {
  for (const b of document.querySelectorAll("#nav button")) {
    b.addEventListener("click", () => {
      if (location.hash === `#${b.dataset.view}`) route();
      else location.hash = b.dataset.view;
    });
  }
  window.addEventListener("hashchange", () => {
    if (!$("#app").hidden) route();
  });
  signInGate({
    form: $("#sign-in"), input: $("#token"), status: $("#sign-in-status"),
    app: $("#app"), signOut: $("#sign-out"),
    onSignedIn: async () => {
      const nav = $("#nav");
      const appStatus = $("#app-status");
      clear($("#view"));
      showInfo(appStatus);
      nav.hidden = true;
      delete document.body.dataset.role;
      clear($("#who"));
      let who;
      try {
        who = await api("/token");
        if (who.role !== "admin" && who.role !== "auditor") {
          throw new ApiError(403, "this needs an admin or auditor of the tenant", null);
        }
      } catch (err) {
        if (err instanceof ApiError && err.status === 401) throw err;
        showError(appStatus, err, err.status === 403 ? "This console is for admins and auditors"
                                                     : "");
        if (err.status === 403) {
          appStatus.append(h("p", {}, "Device users: your data is in the ",
                             h("a", { href: "/portal/" }, "portal"), "."));
        }
        return;
      }
      document.body.dataset.role = who.role;
      $("#who").append(`${who.name} (${who.role}${who.role === "auditor" ? ", read-only" : ""})`);
      nav.hidden = false;
      route();
    },
  });
  $("#sign-out").addEventListener("click", () => {
    if (stopView) stopView();
    stopView = null;
    delete document.body.dataset.role;
    clear($("#who"));
    $("#nav").hidden = true;
    clear($("#view"));
    showInfo($("#app-status"));
  });
}

start();
