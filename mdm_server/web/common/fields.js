// Every field of the six kinds of telemetry (docs/protocol.md) as words with its
// unit, for both pages: "accuracy_m: 12" reads "Accuracy: 12 m". Also the words for
// the values of the fixed lists (enums). tests/unit/test_field_labels.py checks that
// every field agent_protocol knows has a label here: keep the FIELDS object plain JSON
// (double quotes, no trailing commas) so that test can read it.

export const FIELDS = {
  "location": {
    "lat": {"label": "Latitude", "unit": "°"},
    "lon": {"label": "Longitude", "unit": "°"},
    "accuracy_m": {"label": "Accuracy", "unit": "m"},
    "altitude_m": {"label": "Altitude", "unit": "m"},
    "speed_mps": {"label": "Speed", "unit": "m/s"},
    "heading_deg": {"label": "Heading", "unit": "°"},
    "source": {"label": "Source"}
  },
  "identity": {
    "imei": {"label": "IMEI"},
    "serial": {"label": "Serial number"},
    "wifi_mac": {"label": "Wi-Fi MAC address"},
    "bluetooth_mac": {"label": "Bluetooth MAC address"},
    "phone_number": {"label": "Phone number"},
    "device_name": {"label": "Device name"},
    "user_name": {"label": "User name"},
    "user_email": {"label": "User e-mail"},
    "first_name": {"label": "First name"},
    "last_name": {"label": "Last name"},
    "model": {"label": "Model"},
    "os": {"label": "Operating system"},
    "os_version": {"label": "OS version"}
  },
  "sim": {
    "state": {"label": "SIM state"},
    "iccid": {"label": "SIM number (ICCID)"},
    "imsi": {"label": "Subscriber id (IMSI)"},
    "carrier": {"label": "Carrier"},
    "mcc": {"label": "Country code (MCC)"},
    "mnc": {"label": "Network code (MNC)"},
    "roaming": {"label": "Roaming"}
  },
  "network": {
    "rssi_dbm": {"label": "Signal strength", "unit": "dBm"},
    "rsrp_dbm": {"label": "Reference signal power", "unit": "dBm"},
    "network_type": {"label": "Network type"},
    "cell_id": {"label": "Cell id"},
    "lac": {"label": "Area code (LAC/TAC)"},
    "mcc": {"label": "Country code (MCC)"},
    "mnc": {"label": "Network code (MNC)"},
    "carrier": {"label": "Carrier"},
    "wifi_ssid": {"label": "Wi-Fi network"},
    "ip": {"label": "IP address"}
  },
  "apps": {
    "apps": {"label": "Installed apps"},
    "apps.package": {"label": "Package"},
    "apps.name": {"label": "App"},
    "apps.version": {"label": "Version"},
    "apps.installed_at": {"label": "Installed"}
  },
  "checkinout": {
    "event": {"label": "Event"},
    "user_id": {"label": "User"},
    "shift_id": {"label": "Shift"},
    "condition": {"label": "Condition"},
    "condition.battery_pct": {"label": "Battery", "unit": "%"},
    "condition.screen": {"label": "Screen"},
    "condition.case": {"label": "Case"},
    "condition.notes": {"label": "Notes"}
  }
};

/** Words for the values of the fixed lists (docs/protocol.md). */
export const VALUE_WORDS = {
  "location.source": { gps: "GPS", network: "mobile network", fused: "GPS and network" },
  "sim.state": { absent: "no SIM card", ready: "ready", pin_required: "PIN required",
                 puk_required: "PUK required", locked: "locked", unknown: "unknown" },
  "network.network_type": { gsm: "2G (GSM)", umts: "3G (UMTS)", lte: "4G (LTE)",
                            nr: "5G (NR)", wifi: "Wi-Fi", none: "none" },
  "checkinout.event": { check_out: "checked out", check_in: "checked in" },
  "checkinout.condition.screen": { ok: "OK", cracked: "cracked", missing: "missing" },
  "checkinout.condition.case": { ok: "OK", damaged: "damaged", missing: "missing" },
};

/** The label of `kind`'s field `path` ("condition.notes"); an unknown field (a newer
 * agent's) shows under its own name. */
export function fieldLabel(kind, path) {
  const f = FIELDS[kind] && FIELDS[kind][path];
  return f ? f.label : path;
}

/** A number as people read it: at most 15 significant digits, so a stored 52.3873
 * reads 52.3873, not 52.387299999999996. */
export function fmtNumber(v) {
  return Number.isInteger(v) ? String(v) : String(Number(v.toPrecision(15)));
}

/** The value of `kind`'s field `path` as text with its unit ("12 m"); null is a field
 * the policy did not store. Objects and lists are left to the caller. */
export function fieldText(kind, path, v) {
  if (v === null || v === undefined) return "not stored";
  const f = (FIELDS[kind] && FIELDS[kind][path]) || {};
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (typeof v === "number") {
    const n = fmtNumber(v);
    if (!f.unit) return n;
    return f.unit === "°" || f.unit === "%" ? `${n}${f.unit === "%" ? " %" : "°"}`
      : `${n} ${f.unit}`;
  }
  if (typeof v === "string") {
    const words = VALUE_WORDS[`${kind}.${path}`];
    return (words && words[v]) || v;
  }
  return JSON.stringify(v);
}

/** A check-out's or check-in's condition as one sentence: "Battery 88 %, screen OK,
 * case damaged; notes: fine". */
export function conditionText(c) {
  if (c === null || c === undefined) return "not stored";
  if (typeof c !== "object") return String(c);
  const parts = [];
  for (const k of ["battery_pct", "screen", "case"]) {
    if (!(k in c)) continue;
    const label = fieldLabel("checkinout", `condition.${k}`);
    parts.push(`${parts.length ? label.toLowerCase() : label} ` +
               `${fieldText("checkinout", `condition.${k}`, c[k])}`);
  }
  let text = parts.join(", ");
  if ("notes" in c) {
    const notes = c.notes === null ? "not stored" : `"${c.notes}"`;
    text += `${text ? "; " : ""}notes: ${notes}`;
  }
  for (const [k, v] of Object.entries(c)) {
    if (!["battery_pct", "screen", "case", "notes"].includes(k)) {
      text += `; ${k}: ${fieldText("checkinout", `condition.${k}`, v)}`;
    }
  }
  return text || "nothing recorded";
}
