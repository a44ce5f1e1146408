"""The shift report's queries: shifts from ``checkout_events`` (times and events,
kept whatever the policy collects), each side's sealed ``checkinout`` record opened
with its device's key, the overdue devices, and the tenant's overdue limit.

A shift is listed when it overlaps the report's range ``[start, end)``: its
check-out is before ``end``, and it had not ended by ``start`` (a check-out in the
range, or the device's last event before ``start`` is a check-out). Pages follow
(check-out time, device, record id) with a keyset cursor. A check-in that follows
no check-out (a stray one, or a second check-in) starts nothing and is not listed.

The check-out and check-in records are found by their row identity: the ingest
stores an event's record id (a keyed digest) and time in ``checkout_events`` and
in ``telemetry`` alike (mdm_server/ingest/shaping.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mdm_server.reports.shifts import Shift, ShiftCursor, Stored
from mdm_server.storage.keyring import Keyring
from mdm_server.storage.sealing import DeviceReader

__all__ = [
    "DEFAULT_MARGIN",
    "DEFAULT_WINDOW",
    "DEFAULT_WITHOUT_SHIFTS",
    "OVERDUE_MAX_S",
    "OVERDUE_MIN_S",
    "SCAN_MAX",
    "OverdueLimit",
    "ShiftFilter",
    "ShiftPage",
    "longest_shift_s",
    "overdue_limit",
    "overdue_shifts",
    "set_overdue_limit",
    "shift_page",
]

#: The default overdue limit: the longest shift that began in this window ...
DEFAULT_WINDOW = timedelta(days=30)
#: ... plus this margin; without any such shift, DEFAULT_WITHOUT_SHIFTS.
DEFAULT_MARGIN = timedelta(hours=1)
DEFAULT_WITHOUT_SHIFTS = timedelta(hours=24)
#: Bounds of a tenant's own limit (migration 018 checks them too): 5 minutes, 90 days.
OVERDUE_MIN_S = 300
OVERDUE_MAX_S = 90 * 86_400
#: With a user filter (records opened and compared) or a closed/no_check_in status,
#: at most this many check-outs are examined per request; a page may then hold fewer
#: shifts and a ``next``.
SCAN_MAX = 20_000

# The status of a check-out ({c}) whose next event is {n}.
_STATUS = """CASE WHEN {n}.event = 'check_in' THEN 'closed'
                  WHEN {n}.event = 'check_out' THEN 'no_check_in'
                  WHEN {c}.ts <= $9 THEN 'overdue' ELSE 'open' END"""
# The device's next event after a check-out.
_NEXT = """LEFT JOIN LATERAL (
        SELECT e.ts, e.record_id, e.event FROM checkout_events e
        WHERE e.tenant_id = $1 AND e.device_id = {c}.device_id
          AND (e.ts, e.record_id) > ({c}.ts, {c}.record_id)
        ORDER BY e.ts, e.record_id LIMIT 1) n ON true"""
# $1 tenant, $2 start, $3 end, $4 device|NULL, $5 since|NULL, $6-$8 cursor|NULL,
# $9 overdue_before (a check-out at or before it is overdue), $10 limit.
# Two branches, each ordered and limited on its own (the first walks the index
# checkout_events_tenant_outs in order and stops at the limit), then merged: the
# check-outs in the range, and each device's last event before the range when it is
# a check-out (a shift under way at its start).
_PAGE = f"""
SELECT * FROM (
    (SELECT c.device_id, c.ts, c.record_id, n.ts AS next_ts,
            n.record_id AS next_record_id, n.event AS next_event,
            {_STATUS.format(n="n", c="c")} AS status
     FROM checkout_events c
     {_NEXT.format(c="c")}
     WHERE c.tenant_id = $1 AND c.event = 'check_out' AND c.ts >= $2 AND c.ts < $3
       AND ($4::text IS NULL OR c.device_id = $4)
       AND ($5::timestamptz IS NULL OR c.received_at >= $5)
       AND ($6::timestamptz IS NULL OR (c.ts, c.device_id, c.record_id) > ($6, $7, $8))
     ORDER BY c.ts, c.device_id, c.record_id LIMIT $10)
    UNION ALL
    (SELECT p.device_id, p.ts, p.record_id, n.ts, n.record_id, n.event,
            {_STATUS.format(n="n", c="p")}
     FROM devices d
     CROSS JOIN LATERAL (
         SELECT e.device_id, e.ts, e.record_id, e.event, e.received_at FROM checkout_events e
         WHERE e.tenant_id = d.tenant_id AND e.device_id = d.device_id AND e.ts < $2
         ORDER BY e.ts DESC, e.record_id DESC LIMIT 1) p
     {_NEXT.format(c="p")}
     WHERE d.tenant_id = $1 AND ($4::text IS NULL OR d.device_id = $4)
       AND ($6::timestamptz IS NULL OR $6 < $2)  -- a cursor past start: none left here
       AND p.event = 'check_out'
       AND ($5::timestamptz IS NULL OR p.received_at >= $5)
       AND ($6::timestamptz IS NULL OR (p.ts, p.device_id, p.record_id) > ($6, $7, $8))
     ORDER BY p.ts, p.device_id, p.record_id LIMIT $10)
) s
ORDER BY s.ts, s.device_id, s.record_id
LIMIT $10"""  # noqa: S608 (fixed fragments, no value)

# Status open or overdue ($11): a shift with no event after its check-out is its
# device's last event, so one probe per device finds them all (_PAGE would walk
# every check-out of the range to find the few at its end). Otherwise as _PAGE.
_OPEN = """
SELECT p.device_id, p.ts, p.record_id, NULL::timestamptz AS next_ts,
       NULL::text AS next_record_id, NULL::text AS next_event,
       CASE WHEN p.ts <= $9 THEN 'overdue' ELSE 'open' END AS status
FROM devices d
CROSS JOIN LATERAL (
    SELECT e.device_id, e.ts, e.record_id, e.event, e.received_at FROM checkout_events e
    WHERE e.tenant_id = d.tenant_id AND e.device_id = d.device_id
    ORDER BY e.ts DESC, e.record_id DESC LIMIT 1) p
WHERE d.tenant_id = $1 AND ($4::text IS NULL OR d.device_id = $4)
  AND p.event = 'check_out' AND p.ts < $3 AND $2::timestamptz IS NOT NULL
  AND ($5::timestamptz IS NULL OR p.received_at >= $5)
  AND ($6::timestamptz IS NULL OR (p.ts, p.device_id, p.record_id) > ($6, $7, $8))
  AND $11 = CASE WHEN p.ts <= $9 THEN 'overdue' ELSE 'open' END
ORDER BY p.ts, p.device_id, p.record_id
LIMIT $10"""

# Devices whose last event is a check-out at or before $3: out past the limit.
_OVERDUE = """
SELECT d.device_id, p.ts, p.record_id, NULL::timestamptz AS next_ts,
       NULL::text AS next_record_id, NULL::text AS next_event, 'overdue' AS status,
       count(*) OVER () AS total
FROM devices d
CROSS JOIN LATERAL (
    SELECT e.ts, e.record_id, e.event FROM checkout_events e
    WHERE e.tenant_id = d.tenant_id AND e.device_id = d.device_id
    ORDER BY e.ts DESC, e.record_id DESC LIMIT 1) p
WHERE d.tenant_id = $1 AND ($2::text IS NULL OR d.device_id = $2)
  AND p.event = 'check_out' AND p.ts <= $3
ORDER BY p.ts, d.device_id
LIMIT $4"""

_RECORDS = """
SELECT t.device_id, t.kind, t.record_id, t.ts, t.policy_id, t.policy_version, t.key_id,
       t.sealed, t.data
FROM telemetry t
JOIN unnest($2::text[], $3::timestamptz[], $4::text[]) AS k(d, ts, r)
  ON t.device_id = k.d AND t.ts = k.ts AND t.record_id = k.r
WHERE t.tenant_id = $1 AND t.kind = 'checkinout' AND t.ts >= $5 AND t.ts <= $6
  AND ($7::timestamptz IS NULL OR t.received_at >= $7)"""

_KEYS = """SELECT key_id, tenant_id, device_id, epoch, wrapped FROM keystore.device_keys
           WHERE tenant_id = $1 AND device_id = ANY($2::text[])"""

# Shifts that began in the window and were checked in: the longest one.
_LONGEST = """
SELECT extract(epoch FROM max(next_ts - ts))::float8 FROM (
    SELECT ts, event, lead(ts) OVER w AS next_ts, lead(event) OVER w AS next_event
    FROM checkout_events WHERE tenant_id = $1 AND ts >= $2
    WINDOW w AS (PARTITION BY device_id ORDER BY ts, record_id)) s
WHERE event = 'check_out' AND next_event = 'check_in'"""


@dataclass(frozen=True, slots=True)
class OverdueLimit:
    """The tenant's overdue limit in force, and where it comes from."""

    seconds: int
    #: ``tenant``: set by an admin; ``default``: the longest shift of the last 30
    #: days plus 1 hour (24 hours when there was none).
    source: str
    setting_s: int | None
    longest_shift_s: int | None
    updated_at: datetime | None
    updated_by: str | None

    def to_json(self) -> dict[str, Any]:
        return {"overdue_after_s": self.seconds, "source": self.source,
                "setting_s": self.setting_s, "longest_shift_s": self.longest_shift_s,
                "default_s": self.default_s,
                "updated_at": None if self.updated_at is None else self.updated_at.isoformat(),
                "updated_by": self.updated_by}

    @property
    def default_s(self) -> int:
        if self.longest_shift_s is None:
            return int(DEFAULT_WITHOUT_SHIFTS.total_seconds())
        return self.longest_shift_s + int(DEFAULT_MARGIN.total_seconds())


async def longest_shift_s(conn: asyncpg.Connection, tenant: str, now: datetime
                          ) -> int | None:
    """The longest shift (check-out to check-in) that began in the DEFAULT_WINDOW
    before ``now``, in seconds; None without one. A scan of that window's events:
    callers cache it (mdm_server/api/reports.py)."""
    longest = await conn.fetchval(_LONGEST, tenant, now - DEFAULT_WINDOW)
    return None if longest is None else int(longest)


async def overdue_limit(conn: asyncpg.Connection, tenant: str, longest_s: int | None
                        ) -> OverdueLimit:
    """The limit in force: the tenant's setting, else the default from ``longest_s``
    (:func:`longest_shift_s`)."""
    row = await conn.fetchrow("SELECT overdue_after_s, updated_at, updated_by "
                              "FROM shift_settings WHERE tenant_id = $1", tenant)
    setting = None if row is None else row["overdue_after_s"]
    updated_at = None if row is None else row["updated_at"]
    updated_by = None if row is None else row["updated_by"]
    default = OverdueLimit(0, "default", None, longest_s, None, None).default_s
    return OverdueLimit(setting if setting is not None else default,
                        "tenant" if setting is not None else "default", setting, longest_s,
                        updated_at, updated_by)


async def set_overdue_limit(conn: asyncpg.Connection, tenant: str, seconds: int | None,
                            actor: str) -> None:
    """Set (None: back to the default) the tenant's limit; the caller audits it."""
    await conn.execute(
        """INSERT INTO shift_settings (tenant_id, overdue_after_s, updated_by)
           VALUES ($1, $2, $3)
           ON CONFLICT (tenant_id) DO UPDATE
           SET overdue_after_s = EXCLUDED.overdue_after_s, updated_at = now(),
               updated_by = EXCLUDED.updated_by""", tenant, seconds, actor)


@dataclass(frozen=True, slots=True)
class ShiftFilter:
    start: datetime
    end: datetime
    device: str | None = None
    #: The check-out's user id exactly as stored (a hashed one by its hash).
    user: str | None = None
    status: str | None = None
    #: Only check-outs and records received since then: a device user sees what
    #: was recorded during their own enrollment only.
    since: datetime | None = None


@dataclass(frozen=True, slots=True)
class ShiftPage:
    shifts: list[Shift]
    next: ShiftCursor | None


async def _readers(conn: asyncpg.Connection, keyring: Keyring, tenant: str,
                   devices: Sequence[str]) -> dict[str, DeviceReader]:
    """Every device's reader with one query (a page may hold hundreds of devices)."""
    rows = await conn.fetch(_KEYS, tenant, list(devices))
    raw = await keyring.unwrap(conn, rows)
    keys: dict[str, dict[int, AESGCM]] = {d: {} for d in devices}
    for r in rows:
        if r["key_id"] in raw:
            keys[r["device_id"]][r["key_id"]] = AESGCM(raw[r["key_id"]])
    return {d: DeviceReader(tenant, d, k) for d, k in keys.items()}


async def _shifts(conn: asyncpg.Connection, keyring: Keyring, tenant: str,
                  rows: Sequence[asyncpg.Record], since: datetime | None) -> list[Shift]:
    """The page's rows with both sides' records opened (None where not stored)."""
    if not rows:
        return []
    wanted: list[tuple[str, datetime, str]] = []
    for r in rows:
        wanted.append((r["device_id"], r["ts"], r["record_id"]))
        if r["next_event"] == "check_in":
            wanted.append((r["device_id"], r["next_ts"], r["next_record_id"]))
    found = await conn.fetch(_RECORDS, tenant, [w[0] for w in wanted], [w[1] for w in wanted],
                             [w[2] for w in wanted], min(w[1] for w in wanted),
                             max(w[1] for w in wanted), since)
    readers = await _readers(conn, keyring, tenant, sorted({r["device_id"] for r in found}))
    stored: dict[tuple[str, datetime, str], Stored] = {}
    for f in found:
        data = readers[f["device_id"]].data(f)
        if isinstance(data, dict):  # None: its key is gone, an erasure is running
            stored[(f["device_id"], f["ts"], f["record_id"])] = Stored(
                data, f["policy_id"], f["policy_version"])
    return [Shift(device=r["device_id"], status=r["status"], checked_out_at=r["ts"],
                  out_record_id=r["record_id"], next_at=r["next_ts"],
                  next_event=r["next_event"],
                  check_out=stored.get((r["device_id"], r["ts"], r["record_id"])),
                  check_in=stored.get((r["device_id"], r["next_ts"], r["next_record_id"]))
                  if r["next_event"] == "check_in" else None)
            for r in rows]


async def shift_page(conn: asyncpg.Connection, keyring: Keyring, tenant: str,
                     f: ShiftFilter, *, overdue_before: datetime, limit: int,
                     after: ShiftCursor | None = None) -> ShiftPage:
    """Up to ``limit`` shifts after ``after``, oldest check-out first.

    Open and overdue shifts are found per device (their device's last event). Any
    other filter (a ``closed`` or ``no_check_in`` status, a user, whose records must
    be opened to compare) examines the range's check-outs in order, in batches, until
    the page is full or SCAN_MAX were examined; ``next`` then continues the scan, so
    one request's work is bounded however rare the matches."""
    out: list[Shift] = []
    scanned = 0
    by_device = f.status in ("open", "overdue")
    scanning = f.user is not None or (f.status is not None and not by_device)
    while True:
        want = limit - len(out)
        n = max(1, min(max(want, 2000), SCAN_MAX - scanned)) if scanning else want
        args = [tenant, f.start, f.end, f.device, f.since,
                None if after is None else after.ts, None if after is None else after.device,
                None if after is None else after.record_id, overdue_before, n + 1]
        rows = await conn.fetch(_OPEN, *args, f.status) if by_device else \
            await conn.fetch(_PAGE, *args)
        more = len(rows) > n
        rows = rows[:n]
        kept = [r for r in rows if f.status is None or r["status"] == f.status]
        opened = iter(await _shifts(conn, keyring, tenant, kept, f.since))
        for i, r in enumerate(rows):
            scanned += 1
            after = ShiftCursor(r["ts"], r["device_id"], r["record_id"])
            if f.status is not None and r["status"] != f.status:
                continue
            s = next(opened)
            if f.user is None or s.user == f.user:
                out.append(s)
                if len(out) == limit:
                    return ShiftPage(out, after if more or i < len(rows) - 1 else None)
        if not more:
            return ShiftPage(out, None)
        if scanned >= SCAN_MAX:
            return ShiftPage(out, after)


async def overdue_shifts(conn: asyncpg.Connection, keyring: Keyring, tenant: str, *,
                         device: str | None, user: str | None, overdue_before: datetime,
                         limit: int) -> tuple[list[Shift], int]:
    """Devices out past the limit now (their last event is a check-out at or before
    ``overdue_before``), longest out first: at most ``limit`` of them, and how many
    there are (without a user filter; with one, how many of those examined match)."""
    rows = await conn.fetch(_OVERDUE, tenant, device, overdue_before,
                            limit if user is None else SCAN_MAX)
    total = int(rows[0]["total"]) if rows else 0
    shifts = await _shifts(conn, keyring, tenant, rows, None)
    if user is not None:
        shifts = [s for s in shifts if s.user == user]
        total = len(shifts)
    return shifts[:limit], total
