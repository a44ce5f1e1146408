"""The live feed's notices on PostgreSQL's channel ``mdm_live``.

The ingest announces each committed batch's location records with **one** NOTIFY
(more only when a batch's devices do not fit in one payload: NOTIFY takes at most
8,000 bytes), sent inside the batch's transaction, so it is delivered exactly when
the batch commits and never for one that rolled back. It names the rows, it does
not carry them: the tenant, the batch's ``received_at`` (the INSERT's statement
time, the same for every row it stored, in microseconds since the epoch) and per
device the range of event times it stored, ``{"k": "loc", "t": tenant, "r": us,
"d": [[device, first_ms, last_ms], ...]}``. A listener reads exactly those rows
back (:data:`READ_BATCH`): records that were duplicates of earlier ones keep their
old ``received_at`` and are not announced again; what a check-in removed in the
same transaction is not found.

Migration 019's triggers announce access-log entries (``{"k": "read", "t", "d",
"s": seq}``) and command events (``{"k": "cmd", "t", "d", "e": event_id}``) the
same way, in the transaction that writes them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

__all__ = ["LIVE_CHANNEL", "NOTIFY", "PAYLOAD_MAX", "READ_BATCH", "LocationNotice",
           "location_notices", "parse_notice"]

LIVE_CHANNEL = "mdm_live"
NOTIFY = "SELECT pg_notify($1, $2)"
#: PostgreSQL refuses a payload of 8,000 bytes or more; this leaves room.
PAYLOAD_MAX = 7900
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: The rows one notice names: $1 tenant, $2 received_at, $3/$4 the whole range (for
#: partition pruning), $5.. per device.
READ_BATCH = """
SELECT t.device_id, t.kind, t.record_id, t.ts, t.received_at, t.policy_id,
       t.policy_version, t.key_id, t.sealed, t.data
FROM unnest($5::text[], $6::int8[], $7::int8[]) AS x(d, lo, hi)
JOIN telemetry t
  ON t.tenant_id = $1 AND t.kind = 'location' AND t.device_id = x.d
 AND t.ts >= timestamptz 'epoch' + x.lo * interval '1 millisecond'
 AND t.ts <= timestamptz 'epoch' + x.hi * interval '1 millisecond'
 AND t.ts >= $3 AND t.ts <= $4
 AND t.received_at = $2
ORDER BY t.device_id, t.ts, t.record_id"""


def _us(at: datetime) -> int:
    return (at - _EPOCH) // timedelta(microseconds=1)


def location_notices(rows: Sequence[tuple[Any, ...]], received_at: datetime) -> Iterator[str]:
    """The NOTIFY payloads for a committed batch: its location rows (tenant, device,
    kind, record_id, ts_ms, ...) as per-device time ranges, per tenant, each
    payload under :data:`PAYLOAD_MAX` bytes. One pass over the rows."""
    ranges: dict[str, dict[str, list[int]]] = {}
    for r in rows:
        if r[2] != "location":
            continue
        devices = ranges.get(r[0])
        if devices is None:
            devices = ranges[r[0]] = {}
        span = devices.get(r[1])
        ts = r[4]
        if span is None:
            devices[r[1]] = [ts, ts]
        elif ts < span[0]:
            span[0] = ts
        elif ts > span[1]:
            span[1] = ts
    us = _us(received_at)
    for tenant, devices in ranges.items():
        head = orjson.dumps({"k": "loc", "t": tenant, "r": us})[:-1] + b',"d":['
        parts: list[bytes] = []
        size = len(head) + 2
        for device, (lo, hi) in devices.items():
            part = orjson.dumps([device, lo, hi])
            if parts and size + len(part) + 1 > PAYLOAD_MAX:
                yield (head + b",".join(parts) + b"]}").decode()
                parts, size = [], len(head) + 2
            parts.append(part)
            size += len(part) + 1
        yield (head + b",".join(parts) + b"]}").decode()


@dataclass(frozen=True, slots=True)
class LocationNotice:
    tenant: str
    received_at: datetime
    devices: list[str]
    lo: list[int]
    hi: list[int]

    def bounds(self) -> tuple[datetime, datetime]:
        ms = timedelta(milliseconds=1)
        return _EPOCH + min(self.lo) * ms, _EPOCH + max(self.hi) * ms


@dataclass(frozen=True, slots=True)
class EventNotice:
    kind: str  # "read" or "cmd"
    tenant: str
    device: str
    ref: int  # the audit entry's seq, or the command event's id


def parse_notice(payload: str) -> LocationNotice | EventNotice | None:
    """A notice, or None for one this version does not know (or a malformed one)."""
    try:
        n = orjson.loads(payload)
        k = n["k"]
        if k == "loc":
            devices = [str(d[0]) for d in n["d"]]
            if not devices:
                return None
            return LocationNotice(str(n["t"]), _EPOCH + timedelta(microseconds=int(n["r"])),
                                  devices, [int(d[1]) for d in n["d"]],
                                  [int(d[2]) for d in n["d"]])
        if k == "read":
            return EventNotice("read", str(n["t"]), str(n["d"]), int(n["s"]))
        if k == "cmd":
            return EventNotice("cmd", str(n["t"]), str(n["d"]), int(n["e"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, IndexError):
        return None
    return None
