// "My shifts with this device": the device's shifts of the last 31 days (the most the
// API gives at once), oldest first, a page at a time; the condition out and back as
// stored, what changed marked.

import { api, query } from "./common/api.js";
import { $, busy, clear, showError, showInfo } from "./common/ui.js";
import { shiftTable } from "./common/shifts.js";

const DAYS = 31;
const PAGE = 50;
const state = { device: null, from: null, next: null, shown: [], wired: false };

async function loadPage() {
  const status = $("#shifts-status");
  const enc = encodeURIComponent(state.device);
  try {
    const body = await api(`/me/devices/${enc}/shifts` +
                           query({ from: state.from, limit: PAGE, cursor: state.next }));
    state.shown.push(...body.shifts);
    state.next = body.next;
    showInfo(status);
    const n = state.shown.length;
    clear($("#shifts")).append(shiftTable(
      `${n} shift${n === 1 ? "" : "s"} of the last ${DAYS} days, oldest first`, state.shown,
      { id: "shifts-table", device: false,
        empty: `This device was not checked out in the last ${DAYS} days.` }));
    $("#shifts-more").hidden = !state.next;
  } catch (err) {
    showError(status, err);
  }
}

/** Show the shifts of `device` (the portal calls it when a device is chosen). */
export async function loadShifts(device) {
  if (!state.wired) {
    const more = $("#shifts-more");
    more.addEventListener("click", () => busy(more, $("#shifts-status"), loadPage));
    state.wired = true;
  }
  Object.assign(state, { device, next: null, shown: [],
                         from: new Date(Date.now() - DAYS * 86400 * 1000).toISOString() });
  await loadPage();
}
