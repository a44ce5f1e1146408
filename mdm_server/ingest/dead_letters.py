"""Dead letters are counted, never kept one row each (issue 10, migration 013).

A write's dead letters are summed by (tenant, device, reason, topic outline) here,
then added to their row of the current UTC hour in ``dead_letters`` in one
statement: count, total size, first and last seen, and the detail of the first
(it names fields, never values). A flood of junk from one device is a handful of
rows, whatever its size. Used by the ingest's sink and by the acks consumer,
inside the transaction that also stores what else the batch holds, so a message
is acknowledged only once its count is committed.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from mdm_server.ingest.batch import DeadLetter
from mdm_server.ingest.limits import RATE_LIMITED, DeviceBucket

__all__ = ["DeadLetterTally", "store_dead_letters"]

# (tenant, device, reason, topic outline)
_Key = tuple[str | None, str | None, str, str]

_UPSERT = """
INSERT INTO dead_letters AS d (tenant_id, device_id, reason, topic, failed_level, detail,
                               count, payload_bytes, hour, first_seen, last_seen)
SELECT t, dv, r, tp, lv, det, n, b, date_trunc('hour', now(), 'UTC'), now(), now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::int8[], $8::int8[]) AS x(t, dv, r, tp, lv, det, n, b)
ON CONFLICT ON CONSTRAINT dead_letters_per_hour DO UPDATE
SET count = d.count + EXCLUDED.count,
    payload_bytes = d.payload_bytes + EXCLUDED.payload_bytes,
    last_seen = EXCLUDED.last_seen"""


@dataclass(slots=True)
class _Count:
    level: str | None
    detail: str  # the first one's
    count: int
    size: int


class DeadLetterTally:
    """The dead letters of one write, summed per (tenant, device, reason, topic)."""

    __slots__ = ("_rows", "messages")

    def __init__(self) -> None:
        self._rows: dict[_Key, _Count] = {}
        self.messages = 0

    def __bool__(self) -> bool:
        return self.messages > 0

    def _add(self, key: _Key, level: str | None, detail: str, count: int,
             size: int) -> None:
        row = self._rows.get(key)
        if row is None:
            self._rows[key] = _Count(level, detail, count, size)
        else:
            row.count += count
            row.size += size
        self.messages += count

    def add(self, d: DeadLetter) -> None:
        self._add((d.tenant, d.device, d.reason, d.topic), d.level, d.detail, 1,
                  d.payload_bytes)

    def add_limited(self, bucket: DeviceBucket, count: int, size: int) -> None:
        """``count`` messages of ``size`` bytes in all, dropped by the rate limit."""
        self._add((bucket.tenant, bucket.device, RATE_LIMITED, bucket.topic), None,
                  bucket.detail, count, size)

    def columns(self) -> list[list[object]]:
        """The upsert's arrays, in key order: two transactions that add to the same
        rows lock them in the same order (no deadlock between workers)."""
        keys = sorted(self._rows, key=lambda k: (k[0] or "", k[1] or "", k[2], k[3]))
        rows = [(*k, c.level, c.detail, c.count, c.size)
                for k, c in ((k, self._rows[k]) for k in keys)]
        return [list(col) for col in zip(*rows, strict=True)]


async def store_dead_letters(conn: asyncpg.Connection, tally: DeadLetterTally) -> None:
    """Add the tally to this hour's rows (inside the caller's transaction)."""
    if tally:
        await conn.execute(_UPSERT, *tally.columns())
