// Remote commands: the form (with the notice the device shows its user), a device's
// commands as they move through their states, a group request's progress, and the
// approval queue where a second admin approves a factory reset.

import { api, newRequestId, query } from "./common/api.js";
import { busy, clear, h, poll, showError, showInfo, showOk, table, time } from "./common/ui.js";

export const TERMINAL = new Set(["completed", "failed", "rejected", "consent_refused",
                                 "expired", "cancelled"]);
const NOTICE_TYPES = new Set(["lock", "locate", "wipe", "factory_reset", "remote_view"]);
const TYPES = [
  ["lock", "Lock"],
  ["locate", "Locate"],
  ["wipe", "Wipe"],
  ["factory_reset", "Factory reset (needs a second admin)"],
  ["sync_policy", "Send the current policy"],
  ["remote_view", "Remote view (the device's user must accept)"],
];

function stateCell(st) {
  return h("span", { class: `state state-${st}`, "data-state": st }, st.replace(/_/g, " "));
}

function typeText(c) {
  if (c.type === "wipe" && c.params && c.params.scope) return `wipe (${c.params.scope})`;
  if (c.type === "remote_view" && c.params) return `remote view (${c.params.mode})`;
  return c.type.replace(/_/g, " ");
}

function noticeCell(c) {
  if (!c.notice) return h("span", { class: "muted" }, "—");
  return h("span", {}, h("span", { class: "notice-text", lang: c.notice.lang }, c.notice.text),
           h("span", { class: "muted" }, ` [${c.notice.lang}]`));
}

/** Render a device's recent commands into `box`; true when none is still moving. */
export async function commandsTable(box, status, device) {
  try {
    const { commands } = await api(
      `/devices/${encodeURIComponent(device)}/commands` + query({ limit: 20 }));
    clear(box).append(table(`Recent commands of ${device}, newest first`, [
      { title: "Requested", cell: (c) => time(c.created_at) },
      { title: "Type", cell: typeText },
      { title: "Reason", cell: (c) => c.reason },
      { title: "Notice", cell: noticeCell },
      { title: "State", cell: (c) => stateCell(c.state) },
      { title: "By", cell: (c) => c.requested_by +
          (c.approved_by ? `, approved by ${c.approved_by}` : "") +
          (c.cancelled_by ? `, cancelled by ${c.cancelled_by}` : "") },
      { title: "Sent", cell: (c) => time(c.sent_at) },
      { title: "Notice shown", cell: (c) => time(c.notice_shown_at) },
      { title: "Finished", cell: (c) => h("span", {}, time(c.finished_at),
          c.outcome_detail ? ` (${c.outcome_detail})` : "") },
    ], commands, { id: "commands-table",
                                          empty: "No command for this device yet." }));
    const rows = box.querySelectorAll("tbody tr");
    commands.forEach((c, i) => rows[i] && (rows[i].dataset.commandId = c.command_id));
    return commands.every((c) => TERMINAL.has(c.state) || c.state === "pending_approval");
  } catch (err) {
    showError(status, err);
    return false;
  }
}

// --- group progress ------------------------------------------------------------------

function batchProgress(box, batchId) {
  const bar = h("progress", { id: "batch-progress", max: 1, value: 0 });
  const text = h("span", { id: "batch-progress-text", "aria-live": "polite" });
  const states = h("p", { id: "batch-states", class: "muted" });
  const refused = h("div", { id: "batch-refused" });
  const status = h("div", { class: "status", role: "status" });
  clear(box).append(h("h3", {}, "Group command progress"),
    h("div", { class: "progress" }, h("label", { for: "batch-progress" }, "Finished"), bar, text),
    states, refused, status);
  return poll(async () => {
    let b;
    try {
      b = await api(`/command-batches/${encodeURIComponent(batchId)}`);
    } catch (err) {
      showError(status, err);
      return false;
    }
    bar.max = Math.max(b.commands, 1);
    bar.value = b.finished;
    text.textContent = `${b.finished} of ${b.commands} device${b.commands === 1 ? "" : "s"} ` +
      (b.done ? "done" : "finished so far");
    states.textContent = Object.entries(b.states).map(([k, v]) => `${k}: ${v}`).join(", ");
    clear(refused);
    if (b.refused && b.refused.length) {
      refused.append(h("p", {}, `Skipped ${b.refused.length} device` +
        `${b.refused.length === 1 ? "" : "s"}: ` +
        b.refused.map((r) => `${r.device} (${r.code.replace(/_/g, " ")})`).join(", ")));
    }
    if (b.done) showOk(status, `The ${b.type.replace(/_/g, " ")} of group ${b.group} is done.`);
    return b.done;
  }, 1000);
}

// --- the form --------------------------------------------------------------------------

function templateKind(type, scope) {
  return type === "wipe" ? `wipe-${scope}` : type;
}

export function commandsView(view, presetDevice) {
  const status = h("div", { class: "status", role: "status", "aria-live": "polite",
                            id: "command-status" });
  const targetDevice = h("input", { type: "radio", name: "target", id: "target-device",
                                    value: "device", checked: true });
  const targetGroup = h("input", { type: "radio", name: "target", id: "target-group",
                                   value: "group" });
  const device = h("select", { id: "cmd-device", name: "device" });
  // Neither field is ever disabled (a disabled Group field ignored a click, with no
  // hint why): using one of them chooses its target.
  const groups = h("datalist", { id: "cmd-groups" });
  const group = h("input", { type: "text", id: "cmd-group", name: "group", list: "cmd-groups",
                             pattern: "[A-Za-z0-9_\\-]{1,64}", autocomplete: "off",
                             placeholder: "a group's name" });
  const type = h("select", { id: "cmd-type", name: "type" },
                 TYPES.map(([v, label]) => h("option", { value: v }, label)));
  const scope = h("select", { id: "cmd-scope", name: "scope" },
    h("option", { value: "managed" }, "Company apps and data only (managed)"),
    h("option", { value: "full" }, "Everything: the whole device (full)"));
  const scopeBox = h("div", { hidden: true }, h("label", { for: "cmd-scope" }, "Wipe scope"),
                     scope);
  const mode = h("select", { id: "cmd-mode", name: "mode" },
    h("option", { value: "screenshot" }, "One screenshot"),
    h("option", { value: "session" }, "A live session, until the user ends it"));
  const modeBox = h("div", { hidden: true }, h("label", { for: "cmd-mode" }, "View"), mode,
    h("p", { class: "hint" }, "The user is asked with the notice below; nothing is seen ",
      "unless they accept, on any device."));
  const reason = h("textarea", { id: "cmd-reason", name: "reason", class: "prose", rows: 2,
                                 maxlength: 500, required: true });
  const noticeText = h("textarea", { id: "cmd-notice", name: "notice", class: "prose",
                                     rows: 3, maxlength: 2000 });
  const noticeLang = h("input", { type: "text", id: "cmd-lang", name: "lang", value: "en",
                                  size: 8, maxlength: 35 });
  const templateHint = h("p", { class: "hint", id: "cmd-template" });
  const noticeLabel = h("label", { for: "cmd-notice" });
  const noticeBox = h("fieldset", {},
    h("legend", {}, "Notice shown on the device before it acts"), noticeLabel,
    noticeText, templateHint,
    h("label", { for: "cmd-lang" }, "Language of the notice (e.g. en, nl, de)"), noticeLang);
  const submit = h("button", { type: "submit", id: "cmd-submit" }, "Send command");
  const form = h("form", { id: "command-form", class: "write" },
    h("fieldset", {}, h("legend", {}, "Send to"),
      targetDevice, h("label", { for: "target-device", class: "inline" }, "One device"),
      targetGroup, h("label", { for: "target-group", class: "inline" }, "A group"),
      h("label", { for: "cmd-device" }, "Device"), device,
      h("label", { for: "cmd-group" }, "Group"), group, groups),
    h("label", { for: "cmd-type" }, "Command"), type, scopeBox, modeBox,
    h("label", { for: "cmd-reason" }, "Reason (why this command is sent; kept in the audit log)"),
    reason, noticeBox, h("div", { class: "actions" }, submit));
  const batchBox = h("div", { id: "batch" });
  const listStatus = h("div", { class: "status", role: "status" });
  const listBox = h("div", { id: "device-commands" });
  const listHead = h("h3", { id: "cmdlist-h" }, "Commands");
  view.append(h("h2", { class: "write" }, "Send a command"), form, status, batchBox,
              h("section", { "aria-labelledby": "cmdlist-h" }, listHead, listStatus, listBox));

  let requestId = newRequestId();
  let stopList = null;
  let stopBatch = null;
  const changed = () => { requestId = newRequestId(); };

  const showList = (dev) => {
    if (stopList) stopList.stop();
    clear(listBox);
    showInfo(listStatus);
    if (!dev) return;
    listHead.textContent = `Commands of ${dev}`;
    stopList = poll(() => commandsTable(listBox, listStatus, dev), 1500);
  };

  let templateSeq = 0;
  const loadTemplate = async () => {
    const seq = ++templateSeq; // an answer for an earlier choice is dropped
    clear(templateHint);
    if (!NOTICE_TYPES.has(type.value)) return;
    if (type.value === "remote_view") {
      templateHint.append("No template: write what the user is asked.");
      return;
    }
    try {
      const t = await api(`/notice-templates/${templateKind(type.value, scope.value)}`);
      if (seq !== templateSeq) return;
      templateHint.append(`Template (${t.source === "tenant" ? "your tenant's" : "built in"},` +
                          ` ${t.lang}): `, h("q", { lang: t.lang }, t.text));
    } catch (err) {
      if (seq === templateSeq) templateHint.append(`(no template shown: ${err.message})`);
    }
  };

  const sync = () => {
    const wipe = type.value === "wipe";
    const view = type.value === "remote_view";
    scopeBox.hidden = !wipe;
    modeBox.hidden = !view;
    noticeBox.hidden = !NOTICE_TYPES.has(type.value);
    noticeText.required = view; // the user is asked with it: no template
    noticeLabel.textContent = view ? "Notice text (required: the user is asked with it)"
                                   : "Notice text (empty: the tenant's template)";
    group.required = targetGroup.checked;
    submit.textContent = type.value === "factory_reset" ? "Request factory reset"
                       : view ? "Ask to view the screen" : "Send command";
    changed();
    loadTemplate();
  };
  for (const el of [type, scope, mode, targetDevice, targetGroup]) {
    el.addEventListener("change", sync);
  }
  for (const el of [device, group, reason, noticeText, noticeLang]) {
    el.addEventListener("input", changed);
  }
  device.addEventListener("change", () => showList(device.value));
  const choose = (radio) => () => {
    if (radio.checked) return;
    radio.checked = true;
    sync();
  };
  group.addEventListener("focus", choose(targetGroup));
  group.addEventListener("input", choose(targetGroup));
  device.addEventListener("focus", choose(targetDevice));
  device.addEventListener("change", choose(targetDevice));

  (async () => {
    try {
      const { devices } = await api("/devices" + query({ limit: 500 }));
      for (const d of devices) {
        device.append(h("option", { value: d.device, selected: d.device === presetDevice },
          `${d.device} (${d.ownership}${d.groups.length ? ", " + d.groups.join(", ") : ""})`));
      }
      if (presetDevice) device.value = presetDevice;
      const known = [...new Set(devices.flatMap((d) => d.groups))].sort();
      groups.append(...known.map((g) => h("option", { value: g })));
      showList(device.value);
    } catch (err) {
      showError(status, err);
    }
  })();
  sync();

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    busy(submit, status, async () => {
      const body = { type: type.value, reason: reason.value };
      if (type.value === "wipe") body.scope = scope.value;
      if (type.value === "remote_view") body.mode = mode.value;
      if (NOTICE_TYPES.has(type.value) && noticeText.value.trim()) {
        body.notice = { text: noticeText.value, lang: noticeLang.value.trim() || "en" };
      }
      const headers = { "Idempotency-Key": requestId };
      showInfo(status, "Sending…");
      if (targetGroup.checked) {
        const g = group.value.trim();
        const batch = await api(`/groups/${encodeURIComponent(g)}/commands`,
                                { method: "POST", body, headers });
        changed();
        showOk(status, `Group request accepted: ${batch.commands} command` +
               `${batch.commands === 1 ? "" : "s"} for group ${batch.group}.`);
        if (stopBatch) stopBatch.stop();
        stopBatch = batchProgress(batchBox, batch.batch_id);
        return;
      }
      const dev = device.value;
      const cmd = await api(`/devices/${encodeURIComponent(dev)}/commands`,
                            { method: "POST", body, headers });
      changed();
      const what = typeText(cmd);
      if (cmd.state === "pending_approval") {
        showOk(status, `The ${what} of ${dev} is waiting for approval by a second admin ` +
               `(command ${cmd.command_id}).`);
      } else {
        showOk(status, `The ${what} of ${dev} is ${cmd.state.replace(/_/g, " ")} ` +
               `(command ${cmd.command_id}).`);
      }
      status.firstChild.dataset.commandId = cmd.command_id;
      showList(dev);
    });
  });
  return () => {
    if (stopList) stopList.stop();
    if (stopBatch) stopBatch.stop();
  };
}

// --- approval queue --------------------------------------------------------------------

export function approvalsView(view) {
  const status = h("div", { class: "status", role: "status", "aria-live": "polite",
                            id: "approvals-status" });
  const box = h("div", { id: "approvals" });
  const refresh = h("button", { type: "button", class: "secondary" }, "Refresh");
  view.append(h("h2", {}, "Approval queue"),
    h("p", { class: "hint" }, "A factory reset is sent only once a second admin of the tenant ",
      "approves it: not the admin who requested it."),
    h("div", { class: "actions" }, refresh), status, box);

  const act = async (button, c, action) => {
    await busy(button, status, async () => {
      const done = await api(
        `/devices/${encodeURIComponent(c.device)}/commands/${c.command_id}:${action}`,
        { method: "POST" });
      const verb = action === "approve" ? "Approved" : "Cancelled";
      showOk(status, `${verb}: the ${typeText(done)} of ${done.device} is now ` +
             `${done.state.replace(/_/g, " ")}.`);
      await load();
    });
  };

  const load = async () => {
    try {
      const { commands } = await api("/commands" + query({ state: "pending_approval" }));
      clear(box).append(table("Commands waiting for approval, newest first", [
        { title: "Requested", cell: (c) => time(c.created_at) },
        { title: "Device", cell: (c) => h("a", { href: `#device=${c.device}` }, c.device) },
        { title: "Type", cell: typeText },
        { title: "Reason", cell: (c) => c.reason },
        { title: "Notice", cell: noticeCell },
        { title: "Requested by", cell: (c) => c.requested_by },
        { title: "Actions", cell: (c) => {
          const approve = h("button", { type: "button", "data-action": "approve" }, "Approve");
          const cancel = h("button", { type: "button", class: "secondary",
                                       "data-action": "cancel" }, "Cancel");
          approve.setAttribute("aria-label", `Approve the ${typeText(c)} of ${c.device}`);
          cancel.setAttribute("aria-label", `Cancel the ${typeText(c)} of ${c.device}`);
          approve.addEventListener("click", () => act(approve, c, "approve"));
          cancel.addEventListener("click", () => act(cancel, c, "cancel"));
          return h("div", { class: "actions write" }, approve, cancel);
        } },
      ], commands, { id: "approvals-table", empty: "Nothing is waiting for approval." }));
      const rows = box.querySelectorAll("tbody tr");
      commands.forEach((c, i) => rows[i] && (rows[i].dataset.commandId = c.command_id));
    } catch (err) {
      showError(status, err);
    }
  };
  refresh.addEventListener("click", () => busy(refresh, status, async () => {
    showInfo(status);
    await load();
  }));
  load();
}
