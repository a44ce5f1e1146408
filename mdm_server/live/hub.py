"""The fan-out in ``serve``: LISTEN on ``mdm_live``, read what a notice names,
hand it to the streams that may see it.

One connection LISTENs (and holds this process's watch lock, below). Notices are
handled one at a time, in commit order, by one task; a notice nobody here watches
costs a JSON parse. A batch's rows are read once with one query, opened once
(DeviceReader, keys cached per device) and each point encoded once; every stream
then takes the parts of its own devices. A stream that does not keep up (its queue
full) is told so and ended, never waited for: the feed never slows for a client.

**Watches of dead processes.** Each admin stream's watch is a row in
``live_watches`` (migration 019) with this process's ``server_key``; the listener
connection holds a session advisory lock on that key for as long as it lives. A
sweep (at start and every minute) ends, in the audit log, the watches of keys whose
lock nobody holds: their process died without logging the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from mdm_server import audit
from mdm_server.live.feed import (
    LIVE_CHANNEL,
    READ_BATCH,
    EventNotice,
    LocationNotice,
    parse_notice,
)
from mdm_server.logsafe import describe
from mdm_server.storage.keyring import Keyring
from mdm_server.storage.pool import connect
from mdm_server.storage.sealing import DeviceReader

__all__ = ["WATCH_LOCK", "Batch", "LiveHub", "Subscriber", "end_watches", "start_watches"]

log = logging.getLogger(__name__)

#: Two-key advisory lock class of a serving process's watches: "live".
WATCH_LOCK = 0x6C697665
_QUEUE_MAX = 256  # notices a stream may lag behind before it is ended
_READERS_MAX = 10_000
_SWEEP_S = 60.0


@dataclass(slots=True)
class Batch:
    """One committed batch's location points of one tenant, each point encoded
    once as JSON, per device."""

    tenant: str
    received_at: datetime
    points: dict[str, list[bytes]]
    last_ts: dict[str, str]


@dataclass(eq=False)
class Subscriber:
    """A stream: an admin's (``devices`` None: every device of the tenant) or a
    device user's (``user`` true, one device)."""

    tenant: str
    devices: frozenset[str] | None
    user: bool = False
    queue: asyncio.Queue[tuple[str, Any]] = field(
        default_factory=lambda: asyncio.Queue(_QUEUE_MAX))
    overflowed: bool = False

    def wants(self, device: str) -> bool:
        return self.devices is None or device in self.devices

    def offer(self, item: tuple[str, Any]) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            # Nothing more is queued; the stream is told and ends.
            self.end("overflow")

    def end(self, why: str) -> None:
        """The stream's last item: ``overflow`` (it fell behind) or ``shutdown``."""
        self.overflowed = True
        with contextlib.suppress(asyncio.QueueEmpty):
            while True:
                self.queue.get_nowait()
        self.queue.put_nowait((why, None))


async def start_watches(conn: asyncpg.Connection, keys: audit.AuditKeys, *, tenant: str,
                        actor: str, role: str, watch_id: uuid.UUID, devices: list[str],
                        server_key: int) -> datetime:
    """An admin starts watching these devices' live location: a ``live_watches`` row
    and a ``personal_data.read`` entry (``what: live``, ``watch: start``) each, in
    one transaction. Returns when it started."""
    async with conn.transaction():
        started: datetime = await conn.fetchval("SELECT now()")
        await conn.execute(
            """INSERT INTO live_watches (watch_id, tenant_id, device_id, actor, role,
                                         started_at, server_key)
               SELECT $1, $2, d, $4, $5, now(), $6 FROM unnest($3::text[]) AS d
               ON CONFLICT DO NOTHING""",
            watch_id, tenant, devices, actor, role, server_key)
        for device in devices:
            await audit.append(conn, keys, tenant=tenant, actor=actor,
                               action="personal_data.read", target=f"device:{device}",
                               details={"what": "live", "role": role, "watch": "start",
                                        "watch_id": str(watch_id)})
    return started


async def end_watches(conn: asyncpg.Connection, keys: audit.AuditKeys, *, tenant: str,
                      watch_id: uuid.UUID, devices: list[str] | None,
                      ended: str) -> int:
    """The watch ended (``ended``: ``disconnected``, ``server_stopped``): for each of
    its devices still listed, the row removed and a ``watch: end`` entry written,
    in one transaction. ``devices`` None: all of the watch's. Returns how many."""
    async with conn.transaction():
        rows = await conn.fetch(
            """DELETE FROM live_watches WHERE watch_id = $1 AND tenant_id = $2
                 AND ($3::text[] IS NULL OR device_id = ANY($3::text[]))
               RETURNING device_id, actor, role""", watch_id, tenant, devices)
        for r in sorted(rows, key=lambda r: r["device_id"]):
            await audit.append(conn, keys, tenant=tenant, actor=r["actor"],
                               action="personal_data.read", target=f"device:{r['device_id']}",
                               details={"what": "live", "role": r["role"], "watch": "end",
                                        "watch_id": str(watch_id), "ended": ended})
    return len(rows)


class LiveHub:
    """The process's listener and its streams."""

    def __init__(self, dsn: str, pool: asyncpg.Pool, keyring: Keyring,
                 keys: audit.AuditKeys) -> None:
        self._dsn = dsn
        self._pool = pool
        self._keyring = keyring
        self._keys = keys
        self.server_key = secrets.randbelow(2**31 - 1) + 1
        self._subs: dict[str, set[Subscriber]] = {}
        self._inbox: asyncio.Queue[str] = asyncio.Queue()
        self._readers: dict[tuple[str, str], DeviceReader] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: set[asyncio.Task[Any]] = set()
        self.listening = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._listen(), name="live-listen"),
                       asyncio.create_task(self._dispatch(), name="live-dispatch"),
                       asyncio.create_task(self._sweep_loop(), name="live-sweep")]

    async def stop(self) -> None:
        """After the streams' handlers were cancelled: wait for the ends they are
        logging (before the pool closes), then stop listening."""
        if self._pending:
            await asyncio.wait(self._pending, timeout=30)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    def keep(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run ``coro`` to its end even if its caller is cancelled (a stream's end
        logged while its handler is cancelled); :meth:`stop` waits for it."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    # --- streams --------------------------------------------------------------------

    def subscribe(self, sub: Subscriber) -> None:
        self._subs.setdefault(sub.tenant, set()).add(sub)

    def unsubscribe(self, sub: Subscriber) -> None:
        subs = self._subs.get(sub.tenant)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.tenant]

    def close_streams(self) -> None:
        """The server is stopping (on_shutdown): every stream ends now, so that its
        watch's end is logged while the pool is still open."""
        for subs in self._subs.values():
            for sub in subs:
                sub.end("shutdown")

    def streams(self) -> int:
        return sum(len(s) for s in self._subs.values())

    # --- listening --------------------------------------------------------------------

    def _on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        self._inbox.put_nowait(str(payload))

    async def _listen(self) -> None:
        backoff = 0.5
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await connect(self._dsn)
                await conn.execute("SELECT pg_advisory_lock($1, $2)", WATCH_LOCK,
                                   self.server_key)
                await conn.add_listener(LIVE_CHANNEL, self._on_notify)
                self.listening.set()
                backoff = 0.5
                log.info("live feed listening")
                while not conn.is_closed():
                    await asyncio.sleep(1.0)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await conn.execute("SELECT 1", timeout=10)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database away: listen again
                log.warning("live feed: listener lost (%s); again in %.1fs",
                            describe(exc), backoff)
            finally:
                self.listening.clear()
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            # Notices committed meanwhile are not delivered to this connection.
            for subs in self._subs.values():
                for sub in subs:
                    sub.offer(("gap", None))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _dispatch(self) -> None:
        while True:
            payload = await self._inbox.get()
            try:
                await self._handle(payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one notice that fails must not stop the feed
                log.error("live feed: a notice failed (%s)", describe(exc))

    async def _handle(self, payload: str) -> None:
        notice = parse_notice(payload)
        if notice is None:
            return
        subs = self._subs.get(notice.tenant)
        if not subs:
            return
        if isinstance(notice, LocationNotice):
            wanted = [s for s in subs if any(s.wants(d) for d in notice.devices)]
            if wanted:
                batch = await self._read_batch(notice)
                if batch.points:
                    for s in wanted:
                        s.offer(("location", batch))
            return
        users = [s for s in subs if s.user and s.wants(notice.device)]
        if not users:
            return
        item = await (self._read_entry(notice) if notice.kind == "read"
                      else self._read_command(notice))
        if item is not None:
            for s in users:
                s.offer(item)

    # --- reading what a notice names ----------------------------------------------------

    async def _reader(self, conn: asyncpg.Connection, tenant: str, device: str,
                      again: bool = False) -> DeviceReader:
        key = (tenant, device)
        reader = self._readers.get(key)
        if reader is None or again:
            if len(self._readers) >= _READERS_MAX:
                self._readers.clear()
            reader = await DeviceReader.load(conn, self._keyring, tenant, device)
            self._readers[key] = reader
        return reader

    async def _read_batch(self, n: LocationNotice) -> Batch:
        lo, hi = n.bounds()
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(READ_BATCH, n.tenant, n.received_at, lo, hi,
                                    n.devices, n.lo, n.hi)
            points: dict[str, list[bytes]] = {}
            last: dict[str, str] = {}
            device, reader = "", None
            for r in rows:
                if r["device_id"] != device:
                    device = r["device_id"]
                    reader = await self._reader(conn, n.tenant, device)
                assert reader is not None
                data = reader.data(r)
                if data is None:  # a key made since it was cached? read them again
                    reader = await self._reader(conn, n.tenant, device, again=True)
                    data = reader.data(r)
                    if data is None:  # erased right now
                        continue
                ts = r["ts"].isoformat()
                points.setdefault(device, []).append(orjson.dumps({
                    "device": device, "id": r["record_id"], "ts": ts,
                    "received_at": r["received_at"].isoformat(), "policy": r["policy_id"],
                    "policy_version": r["policy_version"], "data": data}))
                last[device] = ts
        return Batch(n.tenant, n.received_at, points, last)

    async def _read_entry(self, n: EventNotice) -> tuple[str, Any] | None:
        async with self._pool.acquire() as conn:
            found = await audit.read(conn, self._keys, n.tenant, limit=1, before=n.ref + 1)
        if not found or found[0].seq != n.ref or found[0].integrity == "invalid":
            return None  # not written by the server: never shown to the user as a read
        e = found[0]
        if e.action != "personal_data.read" or e.target != f"device:{n.device}":
            return None
        return ("read", e)

    async def _read_command(self, n: EventNotice) -> tuple[str, Any] | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(
                """SELECT e.at, e.event, e.from_state, e.to_state, e.accepted,
                          c.command_id, c.type, c.params, c.state, c.created_at
                   FROM command_events e JOIN commands c USING (command_id)
                   WHERE e.event_id = $1 AND c.tenant_id = $2 AND c.device_id = $3""",
                n.ref, n.tenant, n.device)
        if row is None or not row["accepted"]:
            return None
        return ("command", row)

    # --- watches of processes that died ---------------------------------------------------

    async def _sweep_loop(self) -> None:
        await self.listening.wait()
        while True:
            try:
                ended = await self.sweep()
                if ended:
                    log.info("live feed: ended %d watch(es) of a server that stopped", ended)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("live feed: sweep failed (%s)", describe(exc))
            await asyncio.sleep(_SWEEP_S)

    async def sweep(self) -> int:
        """End the watches whose process no longer holds its lock."""
        total = 0
        async with self._pool.acquire() as conn:
            keys = [r["server_key"] for r in await conn.fetch(
                "SELECT DISTINCT server_key FROM live_watches WHERE server_key <> $1",
                self.server_key)]
            for key in keys:
                async with conn.transaction():
                    if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1, $2)",
                                               WATCH_LOCK, key):
                        continue  # its process is alive
                    watches = await conn.fetch(
                        "SELECT DISTINCT watch_id, tenant_id FROM live_watches "
                        "WHERE server_key = $1", key)
                    for w in watches:
                        total += await end_watches(conn, self._keys, tenant=w["tenant_id"],
                                                   watch_id=w["watch_id"], devices=None,
                                                   ended="server_stopped")
        return total

