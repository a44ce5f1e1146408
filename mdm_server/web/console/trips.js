// The trips analysis of a device's location history (GET /devices/{device}/trips):
// loaded with the places it used (each at the version it used), and shown as a day
// summary, what the analysis says about the data (snapping, suppressed points), the
// trips (each with the colour of its track on the map), the stops and the place
// events. The map itself draws them (map.js).

import { ApiError, api, query } from "./common/api.js";
import { h, table, time } from "./common/ui.js";
import { TRIP_COLOURS } from "./map.js";

const MAX_PLACES = 50;

/** The browser's IANA time zone, for the days (UTC when it has none). */
function localZone() {
  try {
    return Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  } catch {
    return "UTC";
  }
}

/**
 * The analysis of [from, to) (`to` null: now) and the places it used:
 * {analysis, places: [{name, place}], error}. `from` null: nothing asked (the
 * analysis needs a range of at most 31 days); an error of the API is returned, not
 * thrown, so the map of points still shows.
 */
export async function loadTrips(enc, { from, to }) {
  if (!from) {
    return { analysis: null, places: [], error: new ApiError(
      0, "trips need a time range with a start, of at most 31 days", null) };
  }
  const range = { from, to: to || new Date().toISOString() };
  let analysis;
  try {
    try {
      analysis = await api(`/devices/${enc}/trips` + query({ ...range, tz: localZone() }));
    } catch (err) {
      // A zone this server does not know: the days in UTC, said so below.
      if (!(err instanceof ApiError) || err.status !== 400 || !/^tz /.test(err.message)) {
        throw err;
      }
      analysis = await api(`/devices/${enc}/trips` + query(range));
    }
  } catch (err) {
    return { analysis: null, places: [], error: err };
  }
  const wanted = analysis.places.slice(0, MAX_PLACES);
  const places = (await Promise.all(wanted.map(async (p) => {
    try {
      const v = await api(`/places/${encodeURIComponent(p.name)}/versions/${p.version}`);
      return v.place ? { name: p.name, place: v.place } : null;
    } catch {
      return null; // deleted meanwhile: not drawn
    }
  }))).filter(Boolean);
  return { analysis, places, error: null };
}

export function fmtKm(m) {
  return `${(m / 1000).toFixed(1)} km`;
}

export function fmtDuration(s) {
  const m = Math.round(s / 60);
  if (m < 60) return `${m} min`;
  return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} min`;
}

function kmh(mps) {
  return `${Math.round(mps * 3.6)} km/h`;
}

function places(list) {
  return list.length ? list.join(", ") : "—";
}

/** The elements under the map: notes, the day summary, trips, stops, place events. */
export function tripsSummary(a) {
  const out = [];
  if (a.notes.length) {
    out.push(h("ul", { id: "trips-notes", class: "notes" },
      a.notes.map((n) => h("li", {}, n))));
  }
  const totals = a.days.reduce((t, d) => ({ km: t.km + d.distance_m, trips: t.trips + d.trips }),
                               { km: 0, trips: 0 });
  out.push(h("p", { id: "trips-summary" },
    `${a.trips.length} trip${a.trips.length === 1 ? "" : "s"}, ${fmtKm(totals.km)}, `,
    `${a.stops.length} stop${a.stops.length === 1 ? "" : "s"} `,
    `(days in ${a.tz}; stops within ${a.parameters.stop_radius_m} m for ` +
    `${fmtDuration(a.parameters.min_stop_s)} or more, trips from ` +
    `${a.parameters.min_trip_m} m).`));
  out.push(table("Per day", [
    { title: "Day", cell: (d) => d.date },
    { title: "Distance", cell: (d) => fmtKm(d.distance_m) },
    { title: "Moving", cell: (d) => fmtDuration(d.moving_s) },
    { title: "Stopped", cell: (d) => fmtDuration(d.stopped_s) },
    { title: "Trips", cell: (d) => String(d.trips) },
    { title: "Stops", cell: (d) => String(d.stops) },
    { title: "In places", cell: (d) => (d.places.length
      ? d.places.map((p) => `${p.name} ${fmtDuration(p.seconds)}`).join(", ") : "—") },
  ], a.days, { id: "trips-days", empty: "No day in this range." }));
  out.push(table("Trips", [
    { title: "", cell: (t) => h("span", {
      class: `swatch trip-c${a.trips.indexOf(t) % TRIP_COLOURS}`,
      "aria-label": `track ${a.trips.indexOf(t) + 1}` }) },
    { title: "From", cell: (t) => h("span", {}, time(t.start.at), " ", places(t.start.places)) },
    { title: "To", cell: (t) => h("span", {}, time(t.end.at), " ", places(t.end.places)) },
    { title: "Distance", cell: (t) => fmtKm(t.distance_m) },
    { title: "Duration", cell: (t) => fmtDuration(t.duration_s) },
    { title: "Average", cell: (t) => kmh(t.avg_speed_mps) },
    { title: "Top", cell: (t) => kmh(t.max_speed_mps) },
  ], a.trips, { id: "trips-table", empty: "No trip in this range." }));
  out.push(table("Stops", [
    { title: "Arrived", cell: (st) => time(st.arrival) },
    { title: "Left", cell: (st) => time(st.departure) },
    { title: "Stayed", cell: (st) => fmtDuration(st.duration_s) },
    { title: "Place", cell: (st) => places(st.places) },
  ], a.stops, { id: "stops-table", empty: "No stop in this range." }));
  if (a.events.length) {
    out.push(table("Places entered and left", [
      { title: "At", cell: (e) => time(e.at) },
      { title: "Place", cell: (e) => e.place },
      { title: "", cell: (e) => (e.event === "enter" ? "entered" : "left") },
    ], a.events, { id: "place-events" }));
  }
  return out;
}
