"""Writes a batch to PostgreSQL: seals each record under its device's data key
(:mod:`mdm_server.storage.sealing`), COPY into a staging table, then one INSERT
with ON CONFLICT DO NOTHING into the partitioned ``telemetry`` table, and the
batch's dead letters and rate-limited messages, counted per device, reason and
hour (ingest/dead_letters.py), all in one transaction.

Failures are split by who is at fault:
- the database is away (connection lost, shutting down, starting): the write is
  retried with backoff until it succeeds; nothing has been acknowledged, so the
  broker keeps the messages meanwhile;
- the database refuses the data (a value PostgreSQL will not store): the batch
  is split in halves until the offending message is alone, and that message
  becomes a dead letter. One bad message never blocks the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import asyncpg

from mdm_server.agents.events import store_agent_events
from mdm_server.ingest.batch import DeadLetter, WriteSet
from mdm_server.ingest.dead_letters import DeadLetterTally, store_dead_letters
from mdm_server.ingest.limits import DeviceBucket
from mdm_server.live.feed import LIVE_CHANNEL, NOTIFY, location_notices
from mdm_server.storage.keyring import Keyring, KeyringError
from mdm_server.storage.partitions import (
    DAY_MS,
    create_partitions,
    existing_partitions,
    partitions_around,
)
from mdm_server.storage.pool import connect, is_unavailable
from mdm_server.storage.sealing import LOCK_KEYS, IngestKeys, KeysGone, SealError

__all__ = [
    "STORAGE_REFUSED",
    "TelemetrySink",
    "WriteResult",
    "is_transient",
    "retry_while_away",
]

T = TypeVar("T")

# Dead-letter reason for a message the database refused (the protocol's own
# reasons live in agent_protocol.Reason).
STORAGE_REFUSED = "storage_refused"

log = logging.getLogger(__name__)

_STAGE_COLUMNS = ("tenant_id", "device_id", "kind", "record_id", "ts_ms", "policy_id",
                  "policy_version", "key_id", "sealed")
_CREATE_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS ingest_stage (
    tenant_id text, device_id text, kind text, record_id text, ts_ms bigint,
    policy_id text, policy_version integer, key_id bigint, sealed bytea
) ON COMMIT DELETE ROWS"""
# One statement, so that the time it returns is the rows' received_at: the live
# feed's NOTIFY names the batch by it (mdm_server/live/feed.py).
_INSERT = """
WITH stored AS (
    INSERT INTO telemetry (tenant_id, device_id, kind, record_id, ts, received_at,
                           policy_id, policy_version, key_id, sealed)
    SELECT tenant_id, device_id, kind, record_id,
           timestamptz 'epoch' + ts_ms * interval '1 millisecond', statement_timestamp(),
           policy_id, policy_version, key_id, sealed
    FROM ingest_stage
    ON CONFLICT DO NOTHING
    RETURNING kind)
SELECT count(*) AS n, count(*) FILTER (WHERE kind = 'location') AS locations,
       statement_timestamp() AS at
FROM stored"""
_INSERT_CHECKOUTS = """
INSERT INTO checkout_events (tenant_id, device_id, ts, record_id, event)
SELECT t, d, timestamptz 'epoch' + ms * interval '1 millisecond', r, e
FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[]) AS x(t, d, ms, r, e)
ON CONFLICT DO NOTHING"""
_ADD_SUPPRESSED = """
INSERT INTO suppressed_locations (tenant_id, device_id, day, count)
SELECT t, d, date 'epoch' + day::int, n
FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[]) AS x(t, d, day, n)
ON CONFLICT (tenant_id, device_id, day)
DO UPDATE SET count = suppressed_locations.count + EXCLUDED.count"""
# A check-in that arrives after locations that followed it: those locations were
# stored while the device looked checked out; remove them, count them suppressed.
_ENFORCE_CHECKIN = """
WITH gone AS (
    DELETE FROM telemetry
    WHERE kind = 'location' AND tenant_id = $1 AND device_id = $2
      AND ts > timestamptz 'epoch' + $3::int8 * interval '1 millisecond'
      AND ts < coalesce((
          SELECT min(ts) FROM checkout_events
          WHERE tenant_id = $1 AND device_id = $2 AND event = 'check_out'
            AND ts > timestamptz 'epoch' + $3::int8 * interval '1 millisecond'),
          'infinity')
    RETURNING ts)
INSERT INTO suppressed_locations (tenant_id, device_id, day, count)
SELECT $1, $2, (ts AT TIME ZONE 'UTC')::date, count(*) FROM gone GROUP BY 3
ON CONFLICT (tenant_id, device_id, day)
DO UPDATE SET count = suppressed_locations.count + EXCLUDED.count"""

# SQLSTATE classes that mean "the server is away or busy", not "the data is bad".
_TRANSIENT_CLASSES = ("08", "53", "57", "58", "40")


async def retry_while_away(op: Callable[[], Awaitable[T]], reset: Callable[[], None]) -> T:
    """Run ``op`` until it succeeds, waiting out a database that is away (with
    backoff, calling ``reset`` to drop the broken connection); any other error
    is raised at once."""
    backoff = 0.1
    while True:
        try:
            return await op()
        except Exception as exc:
            if not is_transient(exc):
                raise
            reset()
            log.warning("database unavailable (%s); retrying in %.1fs",
                        type(exc).__name__, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)


def is_transient(exc: BaseException) -> bool:
    """The database is away or busy (retry), rather than refusing the data. During
    a failover: connections refused or lost (the outcome of a commit in flight
    unknown: the retry's ON CONFLICT DO NOTHING absorbs what it did store), a
    server starting or in recovery, no host writable yet, a standby's read-only
    error (the old leader come back as one)."""
    if isinstance(exc, asyncpg.DataError):  # client-side: a value asyncpg cannot encode
        return False
    if is_unavailable(exc):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate or "")[:2] in _TRANSIENT_CLASSES
    return isinstance(exc, asyncpg.InterfaceError)


@dataclass(slots=True)
class WriteResult:
    inserted: int = 0
    offered: int = 0
    dead_letters: int = 0
    refused: int = 0  # messages the database refused, stored as dead letters
    rate_limited: int = 0  # messages over their device's rate limit, counted only

    @property
    def duplicates(self) -> int:
        return self.offered - self.inserted


def _columns(rows: Sequence[tuple[object, ...]]) -> list[list[object]]:
    """Rows to column arrays, for INSERT ... SELECT FROM unnest($1, $2, ...)."""
    return [list(col) for col in zip(*rows, strict=True)]


class TelemetrySink:
    def __init__(self, dsn: str, keyring: Keyring) -> None:
        self._dsn = dsn
        self._keys = IngestKeys(keyring)
        self._conn: asyncpg.Connection | None = None
        self._partitions: set[tuple[str, int]] = set()

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = None
            conn = await connect(self._dsn)
            await conn.execute(_CREATE_STAGE)
            self._conn = conn
        return self._conn

    async def ensure_partitions(self, needed: set[tuple[str, int]]) -> None:
        todo = needed - self._partitions
        if todo:
            conn = await self._connection()
            # Made meanwhile by migrate, the retention loop or another worker: no
            # DDL for those (a CREATE takes its partitioned table's lock).
            self._partitions |= await existing_partitions(conn)
            todo -= self._partitions
        if todo:
            await create_partitions(conn, todo)
            self._partitions.update(todo)

    async def prepare(self, now_ms: int) -> None:
        """Create today's and tomorrow's partitions ahead of the traffic."""
        await self.ensure_partitions(partitions_around(now_ms))

    async def write(self, ws: WriteSet) -> WriteResult:
        """Store the write set durably; returns once committed. Retries while the
        database is away; never raises for bad data."""
        while True:
            try:
                return await retry_while_away(lambda: self._write_splitting(ws), self.reset)
            except KeysGone as gone:
                # A device was erased since its key was cached: seal again under
                # its new key (the write rolled back; nothing was stored).
                log.info("%s; sealing again", gone)
                self._keys.forget(gone.key_ids)

    def reset(self) -> None:
        """Forget the connection (after an error); the next write reconnects."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def _write_splitting(self, ws: WriteSet) -> WriteResult:
        try:
            return await self._write_once(ws)
        except Exception as exc:
            # A device key that does not unwrap means the master key is wrong, or
            # the key ring is not this database's or incomplete: nothing can be
            # stored, and dead-lettering it all would lose it. The worker stops;
            # the broker keeps every unacknowledged message.
            if is_transient(exc) or isinstance(exc, KeysGone | SealError | KeyringError):
                raise
            if len(ws) > 1:
                mid = ws.lo + len(ws) // 2
                a = await self._write_splitting(ws.select(ws.lo, mid))
                b = await self._write_splitting(ws.select(mid, ws.hi))
                return WriteResult(a.inserted + b.inserted, a.offered + b.offered,
                                   a.dead_letters + b.dead_letters, a.refused + b.refused,
                                   a.rate_limited + b.rate_limited)
            if not ws.rows and not ws.checkouts:  # a lone dead letter or count refused: a bug
                raise
            # The failed transaction has rolled back; the connection is usable.
            msg = ws.messages[ws.lo]
            sqlstate = getattr(exc, "sqlstate", None) or type(exc).__name__
            log.warning("database refused a message (%s); dead-lettered", sqlstate)
            dead = DeadLetter.of(msg.topic, STORAGE_REFUSED,
                                 f"the database refused a value ({sqlstate})",
                                 len(msg.payload))
            result = await self._write_once(
                WriteSet(ws.messages, dead=[(ws.lo, dead)], lo=ws.lo, hi=ws.hi))
            result.refused = 1
            return result

    async def _write_once(self, ws: WriteSet) -> WriteResult:
        rows = ws.rows
        dead = DeadLetterTally()
        for _, d in ws.dead:
            dead.add(d)
        if ws.limited:
            msgs = ws.messages
            by_bucket: dict[DeviceBucket, list[int]] = {}
            for i in ws.limited:
                bucket = msgs[i].limited
                assert bucket is not None
                n = by_bucket.get(bucket)
                if n is None:
                    by_bucket[bucket] = [1, len(msgs[i].payload)]
                else:
                    n[0] += 1
                    n[1] += len(msgs[i].payload)
            for bucket, (count, size) in by_bucket.items():
                dead.add_limited(bucket, count, size)
        checkouts = [c for _, c in ws.checkouts]
        enforce = [e for _, e in ws.enforce_checkins]
        suppressed = Counter(s for _, s in ws.suppressed)
        if rows:
            await self.ensure_partitions({(r[2], r[4] // DAY_MS) for r in rows})
        conn = await self._connection()
        inserted = 0
        if rows:
            await self._keys.ensure(conn, {(r[0], r[1]) for r in rows})
            sealed, key_ids = self._keys.seal(rows)
        async with conn.transaction():
            if rows:
                held = await conn.fetch(LOCK_KEYS, key_ids)
                if len(held) != len(key_ids):
                    raise KeysGone(set(key_ids) - {r[0] for r in held})
                await conn.copy_records_to_table(
                    "ingest_stage", records=sealed, columns=_STAGE_COLUMNS
                )
                done = await conn.fetchrow(_INSERT)
                assert done is not None
                inserted = done["n"]
                if done["locations"]:
                    # Announced at commit, once per batch (split only past
                    # NOTIFY's payload limit): serve's live streams read the rows.
                    for payload in location_notices(rows, done["at"]):
                        await conn.execute(NOTIFY, LIVE_CHANNEL, payload)
            await store_dead_letters(conn, dead)
            if ws.agent_events:  # foreign agents: presence, locate answers
                await store_agent_events(conn, [e for _, e in ws.agent_events])
            if checkouts:
                await conn.execute(_INSERT_CHECKOUTS, *_columns(checkouts))
            if suppressed:
                await conn.execute(_ADD_SUPPRESSED, *_columns(
                    [(t, d, day, n) for (t, d, day), n in suppressed.items()]))
            if enforce:
                await conn.executemany(_ENFORCE_CHECKIN, enforce)
        return WriteResult(inserted=inserted, offered=len(rows), dead_letters=len(ws.dead),
                           rate_limited=len(ws.limited))

