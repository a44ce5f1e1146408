// The location-history map: the device's own location records drawn as SVG.
// No tiles, no external map: the points are projected into the SVG box
// (equirectangular, longitudes scaled by the cosine of the middle latitude so a
// kilometre is as long east-west as north-south), joined by a polyline in time
// order, with a light grid of latitude/longitude lines and a scale bar. With the
// trips analysis (GET /devices/{device}/trips): named places drawn under it, each
// trip as a track of its own colour, each stop as a marker.

import { fmtTime, h, s } from "./common/ui.js";

const EARTH_M_PER_DEG = 111_320;
// Room taken by the axis labels (11 px text, "-179.0000°"), in the drawing's units,
// at a text scale of 1 (labels drawn larger take proportionally more).
const LABEL_H = 14;
const LAT_LABEL_W = 66;
const LON_LABEL_W = 66;

/** How much larger the map's text must be drawn for it to read at about 11 px when
 * the drawing (`width` units wide) is shown `shownPx` pixels wide (a phone). */
export function textScale(shownPx, width = 800) {
  if (!(shownPx > 0)) return 1;
  return Math.min(Math.max(width / shownPx, 1), 3);
}

/** Points [{lat, lon}] -> {xy: [[x, y]], metresPerPx, bounds} inside width x height. */
export function project(points, width, height, pad = 24) {
  if (!points.length) return { xy: [], metresPerPx: null, bounds: null };
  let minLat = Infinity;
  let maxLat = -Infinity;
  let minLon = Infinity;
  let maxLon = -Infinity;
  for (const p of points) {
    minLat = Math.min(minLat, p.lat);
    maxLat = Math.max(maxLat, p.lat);
    minLon = Math.min(minLon, p.lon);
    maxLon = Math.max(maxLon, p.lon);
  }
  const midLat = (minLat + maxLat) / 2;
  const kx = Math.max(Math.cos((midLat * Math.PI) / 180), 0.01);
  // Metres spanned; at least 200 m so a single point or a still device is not a
  // division by zero nor absurdly zoomed in.
  const spanX = Math.max((maxLon - minLon) * kx * EARTH_M_PER_DEG, 200);
  const spanY = Math.max((maxLat - minLat) * EARTH_M_PER_DEG, 200);
  const innerW = width - 2 * pad;
  const innerH = height - 2 * pad;
  const metresPerPx = Math.max(spanX / innerW, spanY / innerH);
  const cx = (minLon + maxLon) / 2;
  const cy = midLat;
  const xy = points.map((p) => [
    round(width / 2 + ((p.lon - cx) * kx * EARTH_M_PER_DEG) / metresPerPx),
    round(height / 2 - ((p.lat - cy) * EARTH_M_PER_DEG) / metresPerPx),
  ]);
  const toLon = (x) => cx + ((x - width / 2) * metresPerPx) / (kx * EARTH_M_PER_DEG);
  const toLat = (y) => cy - ((y - height / 2) * metresPerPx) / EARTH_M_PER_DEG;
  return { xy, metresPerPx, bounds: { west: toLon(0), east: toLon(width),
                                      north: toLat(0), south: toLat(height) },
           toX: (lon) => width / 2 + ((lon - cx) * kx * EARTH_M_PER_DEG) / metresPerPx,
           toY: (lat) => height / 2 - ((lat - cy) * EARTH_M_PER_DEG) / metresPerPx };
}

function round(v) {
  return Math.round(v * 10) / 10;
}

/** A "nice" step (1, 2 or 5 times a power of ten) near `raw`. */
export function niceStep(raw) {
  const p = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 5, 10]) {
    if (raw <= m * p) return m * p;
  }
  return 10 * p;
}

function fmtDistance(m) {
  return m >= 1000 ? `${m / 1000} km` : `${m} m`;
}

/** Trips get these colours in turn (CSS classes trip-c0 ... trip-c7). */
export const TRIP_COLOURS = 8;

/** The legend under the map: each mark drawn with the very class the map draws it
 * with, so its colour is the map's. */
export function mapLegend({ trips = false, stops = false, places = false } = {}) {
  const key = (...shapes) => s("svg", { class: "key", viewBox: "0 0 24 16", width: 24,
                                        height: 16, "aria-hidden": "true" }, ...shapes);
  const item = (mark, text, cls) => h("span", { class: `legend-item ${cls}` }, mark, text);
  return h("p", { class: "legend", id: "map-legend" },
    item(key(s("circle", { class: "fix start", cx: 12, cy: 8, r: 6 })), "first point",
         "legend-start"),
    item(key(s("circle", { class: "fix end", cx: 12, cy: 8, r: 6 })), "last point",
         "legend-end"),
    item(key(s("polyline", { class: trips ? "track faint" : "track",
                             points: "2,12 10,4 22,10" })),
         trips ? "the points between trips" : "the track, in time order", "legend-track"),
    stops && item(key(s("rect", { class: "stop", x: 7, y: 3, width: 10, height: 10,
                                  transform: "rotate(45 12 8)" })), "a stop", "legend-stop"),
    trips && item(key(s("polyline", { class: "trip trip-c0", points: "2,8 22,8" })),
                  "a trip (each its own colour, as in the trips table)", "legend-trip"),
    places && item(key(s("path", { class: "place", d: "M3,3H21V13H3Z" })), "a named place",
                   "legend-place"));
}

/** The outer and inner rings of a GeoJSON Polygon, MultiPolygon or Feature of one. */
function rings(geo) {
  const g = geo && geo.type === "Feature" ? geo.geometry : geo;
  if (!g) return [];
  if (g.type === "Polygon") return g.coordinates;
  if (g.type === "MultiPolygon") return g.coordinates.flat();
  return [];
}

function fmtMinutes(s) {
  const m = Math.round(s / 60);
  return m >= 60 ? `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} min`
    : `${m} min`;
}

/** The SVG element for the records (oldest first), with an accessible title; with
 * `analysis` (the trips answer) and `places` ([{name, place}]) also trips, stops and
 * places. */
export function locationMap(records, { width = 800, height = 500, label = "", analysis = null,
                                       places = [], scale = 1 } = {}) {
  const k = scale;
  const fs = (px) => round(px * k);
  const pts = records
    .filter((r) => r.data && Number.isFinite(r.data.lat) && Number.isFinite(r.data.lon))
    .map((r) => ({ lat: r.data.lat, lon: r.data.lon, ts: r.ts, acc: r.data.accuracy_m }));
  const { xy, metresPerPx, bounds, toX, toY } = project(pts, width, height);
  const titleId = `map-title-${Math.random().toString(36).slice(2, 8)}`;
  const svg = s("svg", {
    class: "map", id: "location-map", viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-labelledby": titleId, "data-points": pts.length,
  }, s("title", { id: titleId }, label || `Location history: ${pts.length} points`),
  s("rect", { class: "frame", x: 0, y: 0, width, height }));
  if (!pts.length) {
    svg.append(s("text", { x: width / 2, y: height / 2, "text-anchor": "middle",
                           class: "grid-label", "font-size": fs(11) },
                 "No location in this time range"));
    return svg;
  }
  // Grid: about six lines each way, at round degree values.
  // Latitudes are labelled along the left edge, longitudes along the bottom: a
  // latitude label too near the bottom row, or a longitude label too near the left
  // column, would overlap the other; one cut by an edge is worse than none.
  const grid = s("g", { "aria-hidden": "true" });
  const latStep = niceStep((bounds.north - bounds.south) / 6);
  for (let lat = Math.ceil(bounds.south / latStep) * latStep; lat <= bounds.north;
    lat += latStep) {
    const y = round(toY(lat));
    grid.append(s("line", { class: "grid", x1: 0, x2: width, y1: y, y2: y }));
    if (y > LABEL_H * k + 3 && y < height - 2 * LABEL_H * k) {
      grid.append(s("text", { class: "grid-label lat-label", x: 4, y: y - 3,
                              "font-size": fs(11) }, `${lat.toFixed(4)}°`));
    }
  }
  const lonStep = niceStep((bounds.east - bounds.west) / 6);
  for (let lon = Math.ceil(bounds.west / lonStep) * lonStep; lon <= bounds.east;
    lon += lonStep) {
    const x = round(toX(lon));
    grid.append(s("line", { class: "grid", x1: x, x2: x, y1: 0, y2: height }));
    if (x > LAT_LABEL_W * k && x < width - LON_LABEL_W * k) {
      grid.append(s("text", { class: "grid-label lon-label", x: x + 3, y: height - fs(4),
                              "font-size": fs(11) }, `${lon.toFixed(4)}°`));
    }
  }
  const at = (lon, lat) => `${round(toX(lon))},${round(toY(lat))}`;
  // Places under everything, each a path of its rings (holes cut out).
  if (places.length) {
    const layer = s("g", { class: "places" });
    for (const { name, place } of places) {
      const d = rings(place).map((ring) => "M" + ring.map(([lon, lat]) => at(lon, lat))
        .join("L") + "Z").join(" ");
      if (!d) continue;
      const first = rings(place)[0][0];
      layer.append(s("path", { class: "place", d, "data-name": name, "fill-rule": "evenodd" },
                     s("title", {}, `Place ${name}`)),
                   s("text", { class: "place-label", x: round(toX(first[0])) + 4,
                               y: round(toY(first[1])) - 4, "font-size": fs(12) }, name));
    }
    svg.append(layer);
  }
  svg.append(grid);
  const trips = analysis ? analysis.trips : [];
  svg.append(s("polyline", { class: trips.length ? "track faint" : "track",
                             id: "location-track",
                             points: xy.map(([x, y]) => `${x},${y}`).join(" ") }));
  if (trips.length) {
    const layer = s("g", { class: "trips" });
    trips.forEach((t, k) => {
      layer.append(s("polyline", {
        class: `trip trip-c${k % TRIP_COLOURS}`, "data-trip": k + 1,
        points: t.path.map(([lon, lat]) => at(lon, lat)).join(" "),
      }, s("title", {}, `Trip ${k + 1}: ${fmtTime(t.start.at)} to ${fmtTime(t.end.at)}, ` +
        `${(t.distance_m / 1000).toFixed(1)} km in ${fmtMinutes(t.duration_s)}`)));
    });
    svg.append(layer);
  }
  const fixes = s("g", { class: "fixes" });
  const small = trips.length ? 2 : 3.5;
  pts.forEach((p, i) => {
    const cls = i === 0 ? "fix start" : i === pts.length - 1 ? "fix end"
      : trips.length ? "fix faint" : "fix";
    fixes.append(s("circle", { class: cls, cx: xy[i][0], cy: xy[i][1],
                               r: i === 0 || i === pts.length - 1 ? 6 : small },
      s("title", {}, `${fmtTime(p.ts)}: ${p.lat.toFixed(5)}, ${p.lon.toFixed(5)}` +
        (p.acc !== undefined ? ` (±${p.acc} m)` : ""))));
  });
  svg.append(fixes);
  if (analysis && analysis.stops.length) {
    const layer = s("g", { class: "stops" });
    analysis.stops.forEach((st, k) => {
      const x = round(toX(st.lon));
      const y = round(toY(st.lat));
      const where = st.places.length ? ` at ${st.places.join(", ")}` : "";
      layer.append(s("rect", {
        class: "stop", "data-stop": k + 1, x: x - 7, y: y - 7, width: 14, height: 14,
        transform: `rotate(45 ${x} ${y})`,
      }, s("title", {}, `Stop ${k + 1}${where}: ${fmtTime(st.arrival)} to ` +
        `${fmtTime(st.departure)} (${fmtMinutes(st.duration_s)})`)));
    });
    svg.append(layer);
  }
  // Scale bar: a round distance about a fifth of the width.
  const metres = niceStep((width / 5) * metresPerPx);
  const px = round(metres / metresPerPx);
  const barY = fs(14) + 6;
  svg.append(s("g", { "aria-hidden": "true" },
    s("line", { class: "scale", x1: width - px - 16, x2: width - 16, y1: barY, y2: barY }),
    s("text", { class: "scale-label", x: width - 16, y: fs(14), "text-anchor": "end",
                "font-size": fs(12) }, fmtDistance(metres))));
  return svg;
}
