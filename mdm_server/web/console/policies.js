// The policy editor: the tenant's policies, one as a JSON document to edit, a
// preview of what it would store from a sample payload (nothing is written), and
// Save (a new version; every problem the server finds is listed with its path).

import { ApiError, api } from "./common/api.js";
import { busy, clear, h, showError, showInfo, showOk, table, time } from "./common/ui.js";

const NAME_RE = /^[A-Za-z0-9_-]{1,64}$/;

const SAMPLE_DATA = {
  location: { lat: 52.37312, lon: 4.89225, accuracy_m: 8, source: "gps" },
  identity: { imei: "356938035643809", serial: "R58N12ABCDE", wifi_mac: "3c:5a:b4:01:02:03",
              phone_number: "+31 6 12345678", user_email: "sam@example.org", model: "Pixel 8",
              os: "android", os_version: "14" },
  sim: { state: "ready", iccid: "8931440400012345678", imsi: "204080123456789",
         carrier: "KPN", mcc: "204", mnc: "08", roaming: false },
  network: { rssi_dbm: -67, network_type: "lte", cell_id: 123456, lac: 4321, mcc: "204",
             mnc: "08", carrier: "KPN", wifi_ssid: "depot", ip: "10.1.2.3" },
  apps: { apps: [{ package: "com.example.mail", name: "Mail", version: "5.2" }] },
  checkinout: { event: "check_out", user_id: "u-17", shift_id: "s-3",
                condition: { battery_pct: 88, screen: "ok", case: "ok", notes: "fine" } },
};

export function samplePayload(kind) {
  return { v: 1, id: "sample-1", ts: new Date().toISOString(), data: SAMPLE_DATA[kind] };
}

export const FLOOR_WORDS = {
  none: "as written",
  merged: "merged with the personal-device floor",
  relaxed: "as written, for personal devices (may collect more than the floor)",
  only: "the personal-device floor alone",
};

function warningsList(id, warnings) {
  if (!warnings || !warnings.length) return "";
  return h("ul", { id, class: "warnings" }, warnings.map((w) =>
    h("li", {}, h("code", {}, w.path), `: ${w.message}`)));
}

const NEW_POLICY = {
  applies_to: { ownership: "personal" },
  collect: { location: true, identity: true, sim: true, network: true, apps: false,
             checkinout: true },
  fields: { "identity.imei": { action: "mask", keep_last: 4 } },
  location: { precision_m: 1000 },
  retention_days: { default: 90 },
};

export function policiesView(view, selected) {
  const status = h("div", { class: "status", role: "status", "aria-live": "polite",
                            id: "policies-status" });
  const listBox = h("div", { id: "policies" });
  const newName = h("input", { type: "text", id: "new-policy-name",
                               pattern: "[A-Za-z0-9_\\-]{1,64}", maxlength: 64 });
  const newButton = h("button", { type: "submit", class: "secondary" }, "New policy");
  const newForm = h("form", { id: "new-policy-form", class: "write" },
    h("label", { for: "new-policy-name" }, "Name of a new policy (letters, digits, _ and -)"),
    newName, " ", newButton);
  const editor = h("section", { id: "policy-editor", "aria-labelledby": "editor-h",
                                hidden: true });
  view.append(h("h2", {}, "Policies"),
    h("p", { class: "hint" }, "What is collected from devices and how it is masked before ",
      "it is stored (docs/policies.md). Saving makes a new version and tells the devices."),
    status, listBox, newForm, editor);

  const loadList = async () => {
    try {
      const { policies, personal_floor: floor, personal_devices: personal } =
        await api("/policies");
      clear(listBox).append(table("Policies in force", [
        { title: "Name", cell: (p) => h("a", { href: `#policies=${p.name}` }, p.name) },
        { title: "Version", cell: (p) => String(p.version) },
        { title: "Saved", cell: (p) => time(p.created_at) },
        { title: "By", cell: (p) => p.created_by || "" },
      ], policies, { id: "policies-table", empty: "No policy yet." }),
      h("h3", { id: "personal-h" }, "Personal devices"),
      h("p", { class: "hint" }, "A personally owned device gets the policy that matches it ",
        "merged with the built-in personal-device floor (the stricter of the two for every ",
        "kind and field), unless that policy names ownership: personal in applies_to; ",
        "the floor alone when nothing matches."),
      table("Which policy decides for each personal device", [
        { title: "Policy in force", cell: (d) => h("code", {}, d.policy) },
        { title: "How", cell: (d) => FLOOR_WORDS[d.floor] || d.floor },
        { title: "Devices", cell: (d) => d.devices.map((dev, i) => [
          i ? ", " : "", h("a", { href: `#device=${dev}` }, dev)]).flat() },
      ], personal, { id: "personal-table", empty: "No personal device is enrolled." }),
      h("details", { id: "personal-floor" },
        h("summary", {}, "The personal-device floor, in plain words"),
        h("ul", {}, floor.explanation.map((l) => h("li", {}, l)))));
    } catch (err) {
      showError(status, err);
    }
  };

  newForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const name = newName.value.trim();
    if (!NAME_RE.test(name)) {
      showError(status, new ApiError(0, "a policy name is 1-64 letters, digits, _ or -", null));
      return;
    }
    showInfo(status);
    openEditor(name, { ...NEW_POLICY }, null);
  });

  const openEditor = (name, doc, saved) => {
    const docArea = h("textarea", { id: "policy-doc", rows: 22, spellcheck: "false" },
                      JSON.stringify(doc, null, 2));
    docArea.readOnly = document.body.dataset.role === "auditor";
    const explain = h("ul", { id: "policy-explanation" });
    if (saved) explain.append(...saved.explanation.map((l) => h("li", {}, l)));
    const edStatus = h("div", { class: "status", role: "status", "aria-live": "polite",
                                id: "policy-status" });
    const save = h("button", { type: "button", id: "policy-save" }, "Save");
    const kind = h("select", { id: "preview-kind" },
      Object.keys(SAMPLE_DATA).map((k) => h("option", { value: k }, k)));
    const payload = h("textarea", { id: "preview-payload", rows: 10, spellcheck: "false" });
    const checkedOut = h("input", { type: "checkbox", id: "preview-checked-out",
                                    checked: true });
    const previewBtn = h("button", { type: "button", id: "preview-run" }, "Preview");
    const result = h("div", { id: "preview-result", "aria-live": "polite" });
    const resetPayload = () => {
      payload.value = JSON.stringify(samplePayload(kind.value), null, 2);
    };
    kind.addEventListener("change", resetPayload);
    resetPayload();

    // Which version the editor shows: updated by every save (it said "Not saved
    // yet", or the version opened, until the page was reloaded).
    const versionLine = h("p", { class: "muted", id: "policy-version" });
    const showVersion = (v) => {
      clear(versionLine).append(...(v
        ? [`Version ${v.version}, saved by ${v.created_by || "?"} `, time(v.created_at)]
        : ["Not saved yet"]));
    };
    showVersion(saved);
    // A preview is of the document, kind and sample as they were when it ran: once
    // any of them changes it no longer says what would be stored, so it goes.
    const stalePreview = () => {
      if (!result.firstChild || result.dataset.stale) return;
      clear(result);
      result.classList.remove("error");
      result.dataset.stale = "1";
      result.append(h("p", { class: "hint", id: "preview-stale" }, "The document or the ",
        "sample changed since the last preview: press Preview to see what would be stored."));
    };
    for (const el of [docArea, payload]) el.addEventListener("input", stalePreview);
    // "Saved as version N" is true of the document as it was saved: once it is edited
    // again, the status says the edits are not saved.
    let savedVersion = saved ? saved.version : null;
    docArea.addEventListener("input", () => {
      if (!edStatus.classList.contains("ok")) return;
      showInfo(edStatus, savedVersion === null ? "Not saved yet."
        : `Edited since version ${savedVersion} was saved: Save to keep the changes.`);
      edStatus.firstChild.id = "policy-unsaved";
    });
    for (const el of [kind, checkedOut]) el.addEventListener("change", stalePreview);

    clear(editor).append(
      h("h3", { id: "editor-h" }, `Policy ${name}`),
      versionLine,
      h("div", { class: "grid2" },
        h("div", {},
          h("label", { for: "policy-doc" }, "Policy document (JSON)"), docArea,
          h("div", { class: "actions write" }, save), edStatus,
          h("h4", {}, "In plain words (as saved)"), explain),
        h("div", { class: "write" },
          h("h4", {}, "Preview with a sample payload"),
          h("p", { class: "hint" }, "Runs the document on the left, as edited, over the ",
            "sample: shows what would be stored. Nothing is saved."),
          h("label", { for: "preview-kind" }, "Kind"), kind,
          h("label", { for: "preview-payload" }, "Sample telemetry message (JSON)"), payload,
          h("p", {}, checkedOut, h("label", { for: "preview-checked-out", class: "inline" },
            "The device is checked out")),
          h("div", { class: "actions" }, previewBtn), result)));
    editor.hidden = false;

    const parse = (area, what) => {
      try {
        return JSON.parse(area.value);
      } catch (err) {
        throw new ApiError(0, `the ${what} is not valid JSON: ${err.message}`, null);
      }
    };

    previewBtn.addEventListener("click", () => busy(previewBtn, result, async () => {
      clear(result);
      delete result.dataset.stale;
      const body = { kind: kind.value, payload: parse(payload, "sample"),
                     policy: parse(docArea, "policy document"),
                     checked_out: checkedOut.checked };
      const out = await api(`/policies/${encodeURIComponent(name)}:preview`,
                            { method: "POST", body });
      result.classList.remove("error");
      result.append(
        h("p", { id: "preview-collected" }, out.collected
          ? `${kind.value} is collected under this policy.`
          : `${kind.value} is not collected under this policy: nothing would be stored.`),
        h("h5", {}, "Would be stored"),
        out.stored.length
          ? h("pre", { id: "preview-stored" }, JSON.stringify(out.stored.map((r) => r.data),
                                                               null, 2))
          : h("p", { class: "empty", id: "preview-stored" }, "Nothing."),
        out.suppressed.length
          ? h("p", { id: "preview-suppressed" },
              `Suppressed (not stored at all): ${out.suppressed.join(", ")}`)
          : "",
        h("p", { class: "hint", id: "preview-hash-note" }, out.hash_note),
        warningsList("preview-warnings", out.warnings),
        h("h5", {}, "In plain words"),
        h("ul", { id: "preview-explanation" }, out.explanation.map((l) => h("li", {}, l))));
    }));

    save.addEventListener("click", () => busy(save, edStatus, async () => {
      const doc2 = parse(docArea, "policy document");
      const v = await api(`/policies/${encodeURIComponent(name)}`, { method: "PUT", body: doc2 });
      showOk(edStatus, `Saved ${v.name} as version ${v.version}.`);
      showVersion(v);
      savedVersion = v.version;
      if (v.warnings && v.warnings.length) edStatus.append(warningsList("save-warnings",
                                                                        v.warnings));
      clear(explain).append(...v.explanation.map((l) => h("li", {}, l)));
      if (location.hash !== `#policies=${name}`) history.replaceState(null, "",
                                                                      `#policies=${name}`);
      await loadList();
    }));
  };

  const loadSelected = async (name) => {
    try {
      const p = await api(`/policies/${encodeURIComponent(name)}`);
      const doc = { ...p.policy };
      delete doc.name; // the URL names it
      openEditor(name, doc, p);
    } catch (err) {
      showError(status, err);
    }
  };

  loadList();
  if (selected) loadSelected(selected);
}
