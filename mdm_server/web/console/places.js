// Named places: the tenant's areas (GeoJSON), which the trips analysis reports
// entering and leaving and time in per day. Listed with their version; an admin
// saves one (a new version; every problem the server finds is listed with its
// path) or deletes it (a deletion version: the old versions stay).

import { api } from "./common/api.js";
import { busy, clear, h, showError, showInfo, showOk, table, time } from "./common/ui.js";

const NAME_RE = /^[A-Za-z0-9_-]{1,64}$/;
const EXAMPLE = {
  type: "Polygon",
  coordinates: [[[4.8790, 52.3700], [4.8850, 52.3700], [4.8850, 52.3740], [4.8790, 52.3740],
                 [4.8790, 52.3700]]],
};

function fmtArea(m2) {
  return m2 >= 1e6 ? `${(m2 / 1e6).toFixed(2)} km²` : `${Math.round(m2)} m²`;
}

export function placesView(view) {
  const status = h("div", { class: "status", role: "status", "aria-live": "polite",
                            id: "places-status" });
  const listBox = h("div", { id: "places" });
  const name = h("input", { type: "text", id: "place-name", maxlength: 64, required: true,
                            pattern: "[A-Za-z0-9_\\-]{1,64}" });
  const geo = h("textarea", { id: "place-geojson", rows: 10, cols: 80, spellcheck: "false",
                              required: true });
  geo.value = JSON.stringify(EXAMPLE, null, 2);
  const save = h("button", { type: "submit", id: "place-save" }, "Save place");
  const formStatus = h("div", { class: "status", role: "status", "aria-live": "polite",
                                id: "place-form-status" });
  const form = h("form", { id: "place-form", class: "write" },
    h("h3", {}, "Add or change a place"),
    h("label", { for: "place-name" }, "Name (letters, digits, _ and -)"), name,
    h("label", { for: "place-geojson" },
      "Area: a GeoJSON Polygon or MultiPolygon, or a Feature of one ([lon, lat])"), geo,
    h("div", { class: "actions" }, save), formStatus);
  view.append(h("h2", {}, "Places"),
    h("p", { class: "hint" }, "Named areas (a depot, a customer's site). A device's trips ",
      "analysis says when it entered and left each, and how long it spent in each per day. ",
      "Every change is a new version; the old ones are kept."),
    status, listBox, form);

  const edit = async (placeName) => {
    try {
      const v = await api(`/places/${encodeURIComponent(placeName)}`);
      name.value = v.name;
      geo.value = JSON.stringify(v.place, null, 2);
      showInfo(formStatus, `Editing ${v.name} (version ${v.version}).`);
      name.focus();
    } catch (err) {
      showError(formStatus, err);
    }
  };

  const load = async () => {
    try {
      const { places, storage } = await api("/places?limit=500");
      clear(listBox).append(table(`${places.length} place${places.length === 1 ? "" : "s"}`, [
        { title: "Name", cell: (p) => p.name },
        { title: "Version", cell: (p) => String(p.version) },
        { title: "Changed", cell: (p) => time(p.created_at) },
        { title: "By", cell: (p) => p.created_by },
        { title: "", cell: (p) => h("span", { class: "write" },
          h("button", { type: "button", class: "secondary",
                        "aria-label": `Edit ${p.name}`, onclick: () => edit(p.name) }, "Edit"),
          " ",
          h("button", { type: "button", class: "secondary",
                        "aria-label": `Delete ${p.name}`,
                        onclick: (ev) => busy(ev.currentTarget, status, async () => {
                          await api(`/places/${encodeURIComponent(p.name)}`,
                                    { method: "DELETE" });
                          showOk(status, `Deleted ${p.name}.`);
                          await load();
                        }) }, "Delete")) },
      ], places, { id: "places-table", empty: "No place yet." }),
      h("p", { class: "hint" }, `Stored versions take ${Math.round(storage.bytes / 1024)} KiB ` +
        `of the ${Math.round(storage.cap_bytes / 1048576)} MiB this tenant may keep.`));
    } catch (err) {
      showError(status, err);
    }
  };

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(save, formStatus, async () => {
      const placeName = name.value.trim();
      const fail = (text) => {
        showInfo(formStatus, text);
        formStatus.classList.add("error");
      };
      if (!NAME_RE.test(placeName)) {
        fail("A name is 1-64 letters, digits, _ and -.");
        return;
      }
      let body;
      try {
        body = JSON.parse(geo.value);
      } catch {
        fail("The area is not valid JSON.");
        return;
      }
      const v = await api(`/places/${encodeURIComponent(placeName)}`,
                          { method: "PUT", body });
      showOk(formStatus, `Saved ${v.name}, version ${v.version} (${fmtArea(v.area_m2)}).`);
      await load();
    });
  });
  load();
}
