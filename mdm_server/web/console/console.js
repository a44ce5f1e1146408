// The admin console: devices, a device with its last known state and location
// history, commands and their approval, policies, erasure requests. Each view is a
// function that renders into #view and may return a function that stops its timers.

import { ApiError, allPages, api } from "./common/api.js";
import {
  $, busy, clear, dataList, h, poll, showError, showInfo, signInGate, table, time, timeRange,
} from "./common/ui.js";
import { approvalsView, commandsTable, commandsView } from "./commands.js";
import { erasureView } from "./erasure.js";
import { liveView } from "./live.js";
import { locationMap, mapLegend, textScale } from "./map.js";
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

const MAX_DEVICES = 5000;
const DEVICE_SORTS = {
  device: (d) => d.device,
  ownership: (d) => d.ownership,
  groups: (d) => d.groups.join(", "),
  status: (d) => d.status,
  enrolled: (d) => d.enrolled_at,
  seen: (d) => d.last_seen_at || "",
};

/** The devices, searched by id, filtered by group and ownership, sorted by any column.
 * All in the page: every page of GET /devices is read first (up to MAX_DEVICES, said
 * so when there are more), then searching, filtering and sorting ask nothing more. */
function devicesView(view) {
  const status = h("div", { class: "status", role: "status", "aria-live": "polite",
                            id: "devices-status" });
  const list = h("div", { id: "devices" });
  const search = h("input", { type: "search", id: "devices-search", name: "q",
                              placeholder: "part of a device id", spellcheck: "false",
                              autocomplete: "off" });
  const group = h("select", { id: "devices-group", name: "group" },
                  h("option", { value: "" }, "every group"));
  const ownership = h("select", { id: "devices-ownership", name: "ownership" },
    h("option", { value: "" }, "company and personal"),
    h("option", { value: "corporate" }, "company owned (corporate)"),
    h("option", { value: "personal" }, "personally owned"));
  const filters = h("form", { id: "devices-filter", class: "filters", role: "search" },
    h("div", {}, h("label", { for: "devices-search" }, "Search devices"), search),
    h("div", {}, h("label", { for: "devices-group" }, "Group"), group),
    h("div", {}, h("label", { for: "devices-ownership" }, "Ownership"), ownership));
  view.append(h("h2", {}, "Devices"), filters, status, list);
  let rows = [];
  let truncated = false;
  const sort = { key: "device", dir: 1 };

  const header = (title, key) => ({
    title: h("button", { type: "button", class: "sort", "data-sort": key,
                         onclick: () => {
                           sort.dir = sort.key === key ? -sort.dir : 1;
                           sort.key = key;
                           render();
                           // The header was drawn anew: keep the keyboard's place.
                           const again = list.querySelector(`button[data-sort="${key}"]`);
                           if (again) again.focus();
                         } }, title),
    th: { "aria-sort": sort.key === key ? (sort.dir > 0 ? "ascending" : "descending")
                                        : "none" },
  });
  const render = () => {
    const q = search.value.trim().toLowerCase();
    const shown = rows.filter((d) => (!q || d.device.toLowerCase().includes(q)) &&
      (!group.value || d.groups.includes(group.value)) &&
      (!ownership.value || d.ownership === ownership.value));
    const by = DEVICE_SORTS[sort.key];
    shown.sort((a, b) => {
      const x = by(a);
      const y = by(b);
      return (x < y ? -1 : x > y ? 1 : a.device < b.device ? -1 : 1) * sort.dir;
    });
    const all = `${rows.length} device${rows.length === 1 ? "" : "s"}`;
    const filtered = q || group.value || ownership.value;
    clear(list).append(table(filtered ? `${shown.length} of ${all}` : all, [
      { ...header("Device", "device"),
        cell: (d) => h("a", { href: `#device=${encodeURIComponent(d.device)}` }, d.device) },
      { ...header("Ownership", "ownership"), cell: (d) => d.ownership },
      { ...header("Groups", "groups"), cell: (d) => d.groups.join(", ") },
      { ...header("Status", "status"),
        cell: (d) => h("span", { class: `state state-${d.status}` }, d.status) },
      { ...header("Enrolled", "enrolled"), cell: (d) => time(d.enrolled_at) },
      { ...header("Last seen", "seen"), cell: (d) => time(d.last_seen_at) },
    ], shown, { id: "devices-table", empty: rows.length
      ? "No device matches the search and filters." : "No device is enrolled yet." }));
  };
  filters.addEventListener("submit", (ev) => ev.preventDefault());
  search.addEventListener("input", render);
  group.addEventListener("change", render);
  ownership.addEventListener("change", render);
  (async () => {
    try {
      showInfo(status, "Loading the devices…");
      ({ items: rows, truncated } = await allPages("/devices", { limit: 500 }, "devices",
                                                   MAX_DEVICES));
      const known = [...new Set(rows.flatMap((d) => d.groups))].sort();
      group.append(...known.map((g) => h("option", { value: g }, g)));
      if (truncated) {
        showInfo(status, `Only the first ${rows.length} devices (by id) are listed; the `,
                 "search and filters apply to them.");
      } else {
        showInfo(status);
      }
      render();
    } catch (err) {
      showError(status, err);
    }
  })();
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
  const legendBox = h("div", { id: "map-legend-box" });
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
      legendBox,
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
      clear(legendBox);
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
      // Drawn 800 units wide: shown narrower (a phone), its text is drawn larger.
      const scale = textScale(Math.min(mapBox.clientWidth, 896));
      clear(mapBox).append(locationMap(items, { label, analysis: trips.analysis,
                                                places: trips.places, scale }));
      const a = trips.analysis;
      clear(legendBox);
      if (n) {
        legendBox.append(mapLegend({ trips: Boolean(a && a.trips.length),
                                     stops: Boolean(a && a.stops.length),
                                     places: trips.places.length > 0 }));
      }
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
