"""The shift report's pure part: a shift as the API shows it, what changed between
check-out and check-in, the CSV rendering, and the page cursor. No I/O (the queries
are mdm_server/storage/shifts.py).

A **shift** is a device's ``check_out`` and the device's next check-in/out event:

- ``closed``: that event is a ``check_in``;
- ``no_check_in``: it is another ``check_out``: the device was never checked in
  after this check-out (the check-in was skipped or never reached us);
- ``open``: there is no later event yet, and it has been out for at most the
  tenant's overdue limit;
- ``overdue``: no later event, out for longer than the limit.

What a side (check-out, check-in) shows is **what is stored**: the record's data
as the device's policy left it (a user id may be masked or hashed, a field
dropped). A field that is not in the stored record is ``null`` and named in
``not_stored``; a record that is not stored at all (its policy does not collect
check-ins/outs, or retention removed it) has ``stored: false``. The times come from
``checkout_events``, kept whatever the policy collects.
"""

from __future__ import annotations

import base64
import csv
import io
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson

__all__ = [
    "CONDITION_FIELDS",
    "CSV_COLUMNS",
    "SIDE_FIELDS",
    "STATUSES",
    "Shift",
    "ShiftCursor",
    "Stored",
    "condition_changes",
    "csv_bytes",
    "csv_cell",
    "decode_cursor",
    "encode_cursor",
    "shift_json",
    "side_json",
]

CONDITION_FIELDS: Final = ("battery_pct", "screen", "case", "notes")
#: What a side shows, in this order; ``not_stored`` names these.
SIDE_FIELDS: Final = ("user_id", "shift_id", *CONDITION_FIELDS)
STATUSES: Final = ("closed", "open", "overdue", "no_check_in")

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A spreadsheet reads a cell starting with one of these as a formula (or, for tab
# and carriage return, may drop them and read what follows as one): OWASP, "CSV
# injection".
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True, slots=True)
class Stored:
    """A check-in/out record as stored, its data opened from its seal."""

    data: Mapping[str, Any]
    policy: str | None
    policy_version: int | None


@dataclass(frozen=True, slots=True)
class Shift:
    device: str
    status: str
    checked_out_at: datetime
    #: The check-out's record id as stored (a keyed digest): the cursor's tiebreak.
    out_record_id: str
    #: The device's next event after the check-out (None: none yet) and its kind.
    next_at: datetime | None
    next_event: str | None
    check_out: Stored | None
    check_in: Stored | None

    @property
    def user(self) -> Any:
        """The user id stored with the check-out (None: not stored)."""
        return None if self.check_out is None else self.check_out.data.get("user_id")


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def _values(stored: Stored | None) -> dict[str, Any]:
    if stored is None:
        return dict.fromkeys(SIDE_FIELDS)
    data = stored.data
    cond = data.get("condition")
    if not isinstance(cond, Mapping):
        cond = {}
    return {"user_id": data.get("user_id"), "shift_id": data.get("shift_id"),
            **{f: cond.get(f) for f in CONDITION_FIELDS}}


def side_json(at: datetime, stored: Stored | None) -> dict[str, Any]:
    """One side of a shift (its check-out or check-in) as stored."""
    values = _values(stored)
    return {
        "at": at.isoformat(),
        "stored": stored is not None,
        "user_id": values["user_id"],
        "shift_id": values["shift_id"],
        "condition": {f: values[f] for f in CONDITION_FIELDS},
        "not_stored": [f for f in SIDE_FIELDS if values[f] is None],
        "policy": None if stored is None else stored.policy,
        "policy_version": None if stored is None else stored.policy_version,
    }


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def condition_changes(out: Stored | None, back: Stored | None) -> list[dict[str, Any]]:
    """What differs between the condition at check-out and at check-in, field by
    field, where both are stored (a field stored on one side only is not a change:
    it is ``not_stored`` on the other). Stored values are compared as stored: two
    notes masked alike are equal."""
    a, b = _values(out), _values(back)
    changes = []
    for f in CONDITION_FIELDS:
        was, now = a[f], b[f]
        if was is None or now is None or was == now:
            continue
        change: dict[str, Any] = {"field": f, "from": was, "to": now}
        if _number(was) and _number(now):
            change["delta"] = round(now - was, 6)
        changes.append(change)
    return changes


def shift_json(s: Shift, now: datetime) -> dict[str, Any]:
    """A shift as the API answers it; ``now`` is the report's time (an open
    shift's duration runs up to it)."""
    closed = s.next_event == "check_in"
    if closed:
        assert s.next_at is not None
        duration: int | None = int((s.next_at - s.checked_out_at).total_seconds())
    elif s.next_event is None:
        duration = max(0, int((now - s.checked_out_at).total_seconds()))
    else:
        duration = None  # checked out again without a check-in: when it ended is unknown
    return {
        "device": s.device,
        "status": s.status,
        "user": s.user,
        "shift_id": _values(s.check_out)["shift_id"],
        "checked_out_at": s.checked_out_at.isoformat(),
        "checked_in_at": _iso(s.next_at) if closed else None,
        "next_check_out_at": _iso(s.next_at) if s.next_event == "check_out" else None,
        "duration_s": duration,
        "check_out": side_json(s.checked_out_at, s.check_out),
        "check_in": side_json(s.next_at, s.check_in) if closed and s.next_at else None,
        "changes": condition_changes(s.check_out, s.check_in) if closed else [],
    }


# --- CSV ---------------------------------------------------------------------------------

CSV_COLUMNS: Final = (
    "device", "status", "user", "shift_id", "checked_out_at", "checked_in_at",
    "next_check_out_at", "duration_s",
    "out_battery_pct", "out_screen", "out_case", "out_notes",
    "in_user", "in_battery_pct", "in_screen", "in_case", "in_notes",
    "changes", "not_stored",
)


def csv_cell(value: Any) -> str:
    """A value as a CSV cell: empty for null, numbers as written in JSON, text as
    it is, but text a spreadsheet would run as a formula (starting with ``=``,
    ``+``, ``-``, ``@``, tab or carriage return) prefixed with ``'``, which makes
    the spreadsheet show it as text. User ids and notes come from devices."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value) and abs(value) < 2**53:
            return str(int(value))
        return repr(value)
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    if text.startswith(_FORMULA_START):
        return "'" + text
    return text


def _change_text(changes: Iterable[Mapping[str, Any]]) -> str:
    return "; ".join(f"{c['field']}: {csv_cell(c['from'])} -> {csv_cell(c['to'])}"
                     for c in changes)


def _not_stored_text(shift: Mapping[str, Any]) -> str:
    parts = []
    for name in ("check_out", "check_in"):
        side = shift[name]
        if side is None:
            continue
        if not side["stored"]:
            parts.append(f"{name}: record")
        elif side["not_stored"]:
            parts.append(f"{name}: {', '.join(side['not_stored'])}")
    return "; ".join(parts)


def _csv_row(s: Mapping[str, Any]) -> list[Any]:
    out, back = s["check_out"], s["check_in"] or {}
    oc, bc = out["condition"], back.get("condition") or {}
    return [s["device"], s["status"], s["user"], s["shift_id"], s["checked_out_at"],
            s["checked_in_at"], s["next_check_out_at"], s["duration_s"],
            oc["battery_pct"], oc["screen"], oc["case"], oc["notes"],
            back.get("user_id"), bc.get("battery_pct"), bc.get("screen"), bc.get("case"),
            bc.get("notes"), _change_text(s["changes"]), _not_stored_text(s)]


def csv_bytes(shifts: Sequence[Mapping[str, Any]]) -> bytes:
    """Shifts (as :func:`shift_json` makes them) as CSV (RFC 4180: a header row,
    CRLF line ends, a field with a comma, quote or line break quoted, quotes
    doubled), UTF-8, every cell through :func:`csv_cell`."""
    buf = io.StringIO()
    w = csv.writer(buf, dialect="excel", lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
    w.writerow(CSV_COLUMNS)
    for s in shifts:
        w.writerow([csv_cell(v) for v in _csv_row(s)])
    return buf.getvalue().encode()


# --- paging ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ShiftCursor:
    """Where the next page starts: after this check-out (time, device, record id)."""

    ts: datetime
    device: str
    record_id: str


def encode_cursor(c: ShiftCursor) -> str:
    raw = orjson.dumps([c.ts.isoformat(), c.device, c.record_id])
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(text: str) -> ShiftCursor:
    """ValueError for anything that is not a cursor :func:`encode_cursor` made."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        ts, device, record_id = orjson.loads(raw)
        if type(ts) is not str or type(device) is not str or type(record_id) is not str:
            raise ValueError("types")
        when = datetime.fromisoformat(ts)
        if when.tzinfo is None:
            raise ValueError("time zone")
        when = when.astimezone(UTC)
        if not _ID.fullmatch(device) or "\x00" in record_id or not 0 < len(record_id) <= 200:
            raise ValueError("ids")
        return ShiftCursor(when, device, record_id)
    except (ValueError, TypeError, OverflowError, orjson.JSONDecodeError):
        raise ValueError("cursor is not valid") from None
