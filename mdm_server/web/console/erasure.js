// Erasure requests of device users: fulfil (erase now) or refuse with a reason.

import { api, query } from "./common/api.js";
import { busy, clear, h, showError, showInfo, showOk, table, time } from "./common/ui.js";

export function erasureView(view) {
  const status = h("div", { class: "status", role: "status", "aria-live": "polite",
                            id: "erasure-status" });
  const filter = h("select", { id: "erasure-state" },
    h("option", { value: "pending" }, "pending"),
    h("option", { value: "fulfilled" }, "fulfilled"),
    h("option", { value: "refused" }, "refused"),
    h("option", { value: "" }, "all"));
  const box = h("div", { id: "erasure-requests" });
  view.append(h("h2", {}, "Erasure requests"),
    h("p", { class: "hint" }, "Fulfilling erases the device's telemetry and its data key at ",
      "once; only the fact is kept. A pending request is fulfilled automatically on its due ",
      "date."),
    h("label", { for: "erasure-state" }, "Show requests that are"), filter, status, box);

  const fulfil = (button, r) => busy(button, status, async () => {
    showInfo(status, `Erasing the data of ${r.device}…`);
    const done = await api(`/erasure-requests/${r.id}:fulfil`, { method: "POST" });
    const erased = done.erased && typeof done.erased === "object"
      ? " Erased: " + Object.entries(done.erased).map(([k, v]) => `${k} ${v}`).join(", ") + "."
      : "";
    showOk(status, `The data of ${done.device} is erased (request ${done.state}).${erased}`);
    await load();
  });

  const refuse = (button, input, r) => busy(button, status, async () => {
    const done = await api(`/erasure-requests/${r.id}:refuse`,
                           { method: "POST", body: { reason: input.value } });
    showOk(status, `The erasure request for ${done.device} is ${done.state}.`);
    await load();
  });

  const load = async () => {
    try {
      const { erasure_requests: list } = await api("/erasure-requests" +
                                                   query({ state: filter.value }));
      clear(box).append(table("Erasure requests, newest first", [
        { title: "Device", cell: (r) => h("a", { href: `#device=${r.device}` }, r.device) },
        { title: "Requested", cell: (r) => time(r.requested_at) },
        { title: "Due", cell: (r) => time(r.due_at) },
        { title: "State", cell: (r) => h("span", { class: `state state-${r.state}` }, r.state) },
        { title: "Decided", cell: (r) => (r.decided_at
          ? h("span", {}, time(r.decided_at), r.decided_by ? ` by ${r.decided_by}` : "")
          : "—") },
        { title: "Refusal reason", cell: (r) => r.refusal_reason || "" },
        { title: "Actions", cell: (r) => {
          if (r.state !== "pending") return "";
          const id = `refuse-${r.id}`;
          const input = h("input", { type: "text", id, maxlength: 1000 });
          const ok = h("button", { type: "button", class: "danger" }, "Fulfil (erase now)");
          const no = h("button", { type: "button", class: "secondary" }, "Refuse");
          ok.setAttribute("aria-label", `Fulfil the erasure request for ${r.device}`);
          no.setAttribute("aria-label", `Refuse the erasure request for ${r.device}`);
          ok.addEventListener("click", () => fulfil(ok, r));
          no.addEventListener("click", () => refuse(no, input, r));
          return h("div", { class: "write" }, h("div", { class: "actions" }, ok),
            h("label", { for: id }, "Reason for a refusal"), input, " ", no);
        } },
      ], list, { id: "erasure-table", empty: "No erasure request in this state." }));
    } catch (err) {
      showError(status, err);
    }
  };
  filter.addEventListener("change", load);
  load();
}
