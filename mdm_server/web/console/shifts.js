// The shift report: overdue devices first, then the shifts of a time range with
// filters, condition changes marked, and the same report as a CSV download. Reading
// it is written to the access log of every device listed (the API does it).

import { api, apiFetch, query } from "./common/api.js";
import { busy, clear, h, showError, showInfo, showOk, time, timeRange } from "./common/ui.js";
import { durationText, shiftTable, userCell } from "./common/shifts.js";

const PAGE = 100;

function limitText(s) {
  const src = s.source === "tenant"
    ? `set by ${s.updated_by || "an admin"}`
    : s.longest_shift_s === null
      ? "the default: no shift was checked in in the last 30 days"
      : `the default: the longest shift of the last 30 days, ${durationText(s.longest_shift_s)}, ` +
        "plus 1 hour";
  return `A device is overdue when it has been checked out for longer than ` +
         `${durationText(s.overdue_after_s)} (${src}).`;
}

export function shiftsView(view) {
  const limitLine = h("p", { id: "overdue-limit" });
  const hours = h("input", { type: "number", id: "overdue-hours", min: "0.1", max: "2160",
                             step: "any", required: true });
  const save = h("button", { type: "submit", id: "overdue-save" }, "Set the limit");
  const reset = h("button", { type: "button", id: "overdue-default", class: "secondary" },
                  "Use the default");
  const limitForm = h("form", { id: "overdue-form", class: "write" },
    h("label", { for: "overdue-hours" }, "Overdue after (hours)"), hours,
    h("div", { class: "actions" }, save, reset));
  const limitStatus = h("div", { class: "status", role: "status", "aria-live": "polite",
                                 id: "overdue-status" });
  const overdueBox = h("div", { id: "overdue-box" });

  const range = timeRange("shifts", { hours: 24 * 7 });
  const device = h("input", { type: "text", id: "shift-device", maxlength: 64,
                              spellcheck: "false", autocomplete: "off" });
  const user = h("input", { type: "text", id: "shift-user", maxlength: 128,
                            spellcheck: "false", autocomplete: "off" });
  const statusSel = h("select", { id: "shift-status-filter" },
    h("option", { value: "" }, "any"), h("option", { value: "overdue" }, "overdue"),
    h("option", { value: "open" }, "checked out"),
    h("option", { value: "no_check_in" }, "never checked in"),
    h("option", { value: "closed" }, "checked in"));
  const show = h("button", { type: "submit", id: "shift-show" }, "Show");
  const csv = h("button", { type: "button", id: "shift-csv", class: "secondary" },
                "Download CSV");
  const filters = h("form", { id: "shift-filters" }, range.el,
    h("div", { class: "grid2" },
      h("div", {}, h("label", { for: "shift-device" }, "Device"), device),
      h("div", {}, h("label", { for: "shift-user" }, "User id, as stored"), user),
      h("div", {}, h("label", { for: "shift-status-filter" }, "Status"), statusSel)),
    h("div", { class: "actions" }, show, csv));
  const status = h("div", { class: "status", role: "status", "aria-live": "polite",
                            id: "shift-status" });
  const summary = h("p", { id: "shift-summary" });
  const box = h("div", { id: "shift-box" });
  const more = h("button", { type: "button", class: "secondary", id: "shift-more", hidden: true },
                 "More shifts");

  view.append(h("h2", {}, "Shift report"),
    h("p", { class: "hint" }, "A shift is a check-out and the device's next check-in. User ids ",
      "and the condition are shown as stored: a device's policy may have masked, hashed or ",
      "dropped them (\"not stored\"). Every device listed gets this read in its user's ",
      "access log."),
    h("section", { "aria-labelledby": "overdue-h" },
      h("h3", { id: "overdue-h" }, "Overdue devices"), limitLine, limitForm, limitStatus,
      overdueBox),
    h("section", { "aria-labelledby": "shifts-h" },
      h("h3", { id: "shifts-h" }, "Shifts"), filters, status, summary, box,
      h("div", { class: "actions" }, more)));

  const shown = [];
  let next = null;
  let asked = {};

  const params = () => {
    const { from, to } = range.value();
    return { from, to, device: device.value.trim(), user: user.value.trim(),
             status: statusSel.value };
  };

  const renderOverdue = (body) => {
    const list = body.overdue || [];
    clear(overdueBox);
    if (!list.length) {
      overdueBox.append(h("p", { class: "empty", id: "overdue-none" },
                          "No device is overdue."));
      return;
    }
    overdueBox.append(h("table", { id: "overdue-table", class: "overdue" },
      h("caption", {}, `${body.overdue_total} device${body.overdue_total === 1 ? "" : "s"} ` +
        "overdue, longest out first" + (body.overdue_total > list.length
        ? ` (the first ${list.length})` : "")),
      h("thead", {}, h("tr", {}, ["Device", "User", "Checked out", "Out for"].map(
        (t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, list.map((s) => h("tr", { dataset: { device: s.device } },
        h("td", {}, h("a", { href: `#device=${encodeURIComponent(s.device)}` }, s.device)),
        h("td", {}, userCell(s.user)), h("td", {}, time(s.checked_out_at)),
        h("td", {}, durationText(s.duration_s)))))));
  };

  const render = (body) => {
    clear(box).append(shiftTable(`${shown.length} shift${shown.length === 1 ? "" : "s"}` +
      (next ? " (more below)" : ""), shown, { id: "shifts-table",
      empty: next ? "No matching shift in the part examined so far: \u201cMore shifts\u201d " +
                    "looks further."
                  : "No shift in this time range." }));
    clear(summary).append("Shifts that overlap ", time(body.from), " to ", time(body.to),
      ", oldest first.");
    more.hidden = !next;
  };

  const load = async (fromStart) => {
    if (fromStart) {
      asked = params();
      shown.length = 0;
      next = null;
    }
    showInfo(status, "Loading shifts…");
    try {
      const body = await api("/reports/shifts" + query({ ...asked, limit: PAGE, cursor: next }));
      if (fromStart) renderOverdue(body);
      shown.push(...body.shifts);
      next = body.next;
      showInfo(status);
      render(body);
    } catch (err) {
      showError(status, err);
    }
  };

  const loadLimit = async () => {
    try {
      const s = await api("/reports/shifts/settings");
      clear(limitLine).append(limitText(s));
      hours.value = String(Math.round((s.overdue_after_s / 3600) * 100) / 100);
    } catch (err) {
      showError(limitStatus, err);
    }
  };

  const setLimit = (button, seconds) => busy(button, limitStatus, async () => {
    const s = await api("/reports/shifts/settings", { method: "PUT",
                                                      body: { overdue_after_s: seconds } });
    showOk(limitStatus, seconds === null ? "The default limit is in force again."
      : `The limit is now ${durationText(s.overdue_after_s)}.`);
    await loadLimit();
    await load(true);
  });

  const download = () => busy(csv, status, async () => {
    showInfo(status, "Preparing the CSV…");
    const resp = await apiFetch("/reports/shifts" + query({ ...params() }),
                                { headers: { Accept: "text/csv" } });
    const blob = await resp.blob();
    const cd = resp.headers.get("Content-Disposition") || "";
    const m = /filename="([A-Za-z0-9_.-]+)"/.exec(cd);
    const name = m ? m[1] : "shifts.csv";
    const rows = Number(resp.headers.get("X-Shift-Rows") || "0");
    const link = h("a", { href: URL.createObjectURL(blob), download: name,
                          id: "shift-csv-link" }, `Save ${name}`);
    showOk(status, `CSV of ${rows} shift${rows === 1 ? "" : "s"}` +
      (resp.headers.get("X-Next-Cursor") ? " (the first ones only: narrow the range)" : "") +
      ". ", link);
    link.click();
  });

  filters.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(show, status, () => load(true));
  });
  more.addEventListener("click", () => busy(more, status, () => load(false)));
  csv.addEventListener("click", download);
  limitForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    setLimit(save, Math.round(Number(hours.value) * 3600));
  });
  reset.addEventListener("click", () => setLimit(reset, null));
  loadLimit();
  load(true);
}
