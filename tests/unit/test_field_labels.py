"""The pages show every field of every kind as words with its unit
(mdm_server/web/common/fields.js): no field of the protocol may be missing there, so a
new field gets its label before a user sees its raw name."""

from __future__ import annotations

import json
import re

from agent_protocol import FIELD_TYPES, KINDS
from agent_protocol.kinds import APP
from mdm_server.api.pages import WEB_ROOT

FIELDS_JS = WEB_ROOT / "common" / "fields.js"


def _fields() -> dict[str, dict[str, dict[str, str]]]:
    text = FIELDS_JS.read_text()
    m = re.search(r"export const FIELDS = (\{.*?\n\});", text, re.S)
    assert m, "fields.js must define FIELDS as a plain JSON object"
    found = json.loads(m.group(1))
    assert isinstance(found, dict)
    return found


def test_every_field_of_every_kind_has_a_label() -> None:
    fields = _fields()
    assert list(fields) == list(KINDS)
    for kind in KINDS:
        expected = set(FIELD_TYPES[kind])
        if kind == "apps":  # the entries of the list, field by field
            expected |= {f"apps.{f}" for f in (*APP, "installed_at")}
        assert set(fields[kind]) == expected, kind
        for name, spec in fields[kind].items():
            assert spec["label"].strip() and spec["label"] != name, (kind, name)


def test_a_field_named_with_a_unit_shows_that_unit() -> None:
    units = {"_m": "m", "_mps": "m/s", "_deg": "°", "_dbm": "dBm", "_pct": "%"}
    fields = _fields()
    checked = 0
    for kind in KINDS:
        for name, spec in fields[kind].items():
            for suffix, unit in units.items():
                if name.endswith(suffix):
                    assert spec.get("unit") == unit, (kind, name)
                    checked += 1
    assert checked >= 7  # accuracy, altitude, speed, heading, rssi, rsrp, battery
