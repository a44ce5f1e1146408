// The live map: the last known position of each device of the tenant (or of one
// device, or a group), moving as points are stored. Fed by GET /api/v1/live (SSE):
// what is drawn is what was stored, after the policy. Watching is a read of each
// device's live location: every device user sees it in their access log.

import { query } from "./common/api.js";
import { openStream } from "./common/live.js";
import { clear, fmtTime, h, s, showError, showInfo } from "./common/ui.js";
import { project } from "./map.js";

const WIDTH = 800;
const HEIGHT = 500;

function drawFleet(box, positions) {
  const devices = [...positions.keys()].sort();
  const pts = devices.map((d) => positions.get(d));
  const { xy } = project(pts, WIDTH, HEIGHT);
  const svg = s("svg", { class: "map", id: "live-map", viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
                         role: "img", "aria-labelledby": "live-map-title",
                         "data-devices": devices.length },
    s("title", { id: "live-map-title" },
      `Last known positions of ${devices.length} device${devices.length === 1 ? "" : "s"}`),
    s("rect", { class: "frame", x: 0, y: 0, width: WIDTH, height: HEIGHT }));
  if (!devices.length) {
    svg.append(s("text", { x: WIDTH / 2, y: HEIGHT / 2, "text-anchor": "middle",
                           class: "grid-label" }, "No position stored yet"));
  }
  devices.forEach((d, i) => {
    const p = pts[i];
    svg.append(s("g", { class: "live-marker", "data-device": d, "data-lat": p.lat,
                        "data-lon": p.lon, "data-ts": p.ts },
      s("circle", { class: p.fresh ? "fix end" : "fix", cx: xy[i][0], cy: xy[i][1], r: 6 },
        s("title", {}, `${d} at ${fmtTime(p.ts)}: ${p.lat.toFixed(5)}, ${p.lon.toFixed(5)}` +
          (p.acc !== undefined && p.acc !== null ? ` (±${p.acc} m)` : ""))),
      s("text", { class: "grid-label", x: xy[i][0] + 8, y: xy[i][1] - 8 }, d)));
  });
  clear(box).append(svg);
}

export function liveView(view) {
  const status = h("div", { class: "status", role: "status", "aria-live": "polite",
                            id: "live-status" });
  const device = h("input", { id: "live-device", name: "device", placeholder: "all devices",
                              spellcheck: "false" });
  const group = h("input", { id: "live-group", name: "group", placeholder: "any group",
                             spellcheck: "false" });
  const form = h("form", { id: "live-form" },
    h("label", { for: "live-device" }, "Device"), device,
    h("label", { for: "live-group" }, "or group"), group,
    h("div", { class: "actions" }, h("button", { type: "submit", id: "live-watch" }, "Watch")));
  const box = h("div", { id: "live-box" });
  const count = h("p", { id: "live-count" });
  view.append(h("h2", {}, "Live map"),
    h("p", { class: "hint" }, "The last known position of each device, moving as its ",
      "points are stored (after the policy). Watching is logged in each watched device ",
      "user's access log, from when you start to when you leave this page."),
    form, status, count, box);
  let stream = null;
  const positions = new Map();
  let points = 0;
  const stop = () => {
    if (stream) stream.stop();
    stream = null;
  };
  const watch = () => {
    stop();
    positions.clear();
    points = 0;
    drawFleet(box, positions);
    const q = query({ device: device.value.trim() || undefined,
                      group: group.value.trim() || undefined });
    showInfo(status, "Connecting…");
    stream = openStream(`/live${q}`, (name, data) => {
      if (name === "ready") {
        showInfo(status, `Watching ${data.devices} device${data.devices === 1 ? "" : "s"} ` +
          `since ${fmtTime(data.since)}.`);
      } else if (name === "location") {
        for (const p of data.points) {
          if (!p.data || !Number.isFinite(p.data.lat) || !Number.isFinite(p.data.lon)) continue;
          const old = positions.get(p.device);
          if (old && old.ts > p.ts) continue; // an older point arriving late
          positions.set(p.device, { lat: p.data.lat, lon: p.data.lon, ts: p.ts,
                                    acc: p.data.accuracy_m, fresh: !data.last_known });
          if (!data.last_known) points += 1;
        }
        count.textContent = `${points} live point${points === 1 ? "" : "s"} received.`;
        drawFleet(box, positions);
      } else if (name === "gap" || name === "end") {
        showError(status, new Error(data.error));
      }
    });
    stream.done.then(() => {
      if (stream) showInfo(status, "The stream ended: watch again to resume.");
    }, (err) => showError(status, err));
  };
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    watch();
  });
  watch();
  return stop;
}
