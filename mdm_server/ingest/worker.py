"""The ingest worker: MQTT in, decode, batch, COPY, commit, then ack.

One worker is one MQTT session (client id ``mdm-ingest-{index}``, or
``mdm-{MDM_INSTANCE}-ingest-{index}`` when several serves share a broker) in the shared
subscription ``$share/{group}/mdm/v1/+/devices/+/telemetry/+``, so more workers,
in more processes or on more machines, split the traffic; with ``MDM_AMQP_URL``
(a RabbitMQ cluster) it is one consumer of the ingest's quorum queue instead
(ingest/amqp.py, the reader interface in ingest/reader.py). Everything runs on
one event loop (see ingest/mqtt.py for why).

Order of operations per batch, which is what makes a crash harmless:
decode -> look up unknown devices -> write rows and dead letters in one
transaction -> commit -> ack. A message over its device's rate limit (checked on
arrival, ingest/limits.py) skips the decode; its count is written and committed
with its batch before it is acknowledged. A crash before the ack means redelivery, and the
table's unique key absorbs the repeat.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import time
from collections import deque
from dataclasses import dataclass

import asyncpg

from agent_protocol import TELEMETRY_FILTER, shared_subscription
from mdm_server.agents.events import HttpOutcome, HttpSubmission
from mdm_server.agents.ingest import ForeignDecoder, owntracks_filter
from mdm_server.config import Config
from mdm_server.ingest.batch import DecodedBatch, WriteSet, admit
from mdm_server.ingest.mqtt import InboundMessage, MqttConsumer
from mdm_server.ingest.reader import MessageReader
from mdm_server.ingest.record_ids import RecordIds, digest_groups
from mdm_server.ingest.shaping import Plan, ShapeStats, apply, plan
from mdm_server.ingest.sink import TelemetrySink, retry_while_away
from mdm_server.ops import metrics
from mdm_server.policy.engine import DeviceProfile, PolicyEngine, checked_out_view
from mdm_server.storage.checkouts import checkout_history
from mdm_server.storage.devices import lookup_devices
from mdm_server.storage.keyring import Keyring
from mdm_server.storage.pool import connect
from privacy_filters import CompiledPolicy

__all__ = ["IngestStats", "IngestWorker", "live_line"]

log = logging.getLogger(__name__)

_UNKNOWN_TTL_S = 5.0  # how long "not enrolled" is believed before asking again
# How long "enrolled" is believed: a revoked device's telemetry (published before
# the broker cut it off, or while the broker could not be told) is refused at the
# latest this long after the revocation.
_KNOWN_TTL_S = 10.0
_DECODE_CHUNK = 250  # messages decoded between yields (the write and the reader go on)
_GC_THRESHOLD = 50_000  # allocations before a young collection (CPython's default: 700)


@dataclass(slots=True)
class IngestStats:
    messages: int = 0
    records_stored: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    rate_limited: int = 0  # over their device's rate limit: acknowledged, counted only
    not_collected: int = 0  # records of kinds the policy does not collect
    suppressed: int = 0  # location points the policy kept out of storage
    batches: int = 0
    ignored: int = 0  # foreign agents' messages of types the server has no use for


class _DeviceRegistry:
    """Which (tenant, device) pairs are enrolled, and how (ownership, groups);
    asks the database on a miss, and again once an answer is older than its TTL."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], DeviceProfile] = {}
        self._known_until: dict[tuple[str, str], float] = {}
        self._unknown_until: dict[tuple[str, str], float] = {}

    async def refresh(self, conn: asyncpg.Connection, keys: set[tuple[str, str]]) -> None:
        now = time.monotonic()
        known_until, unknown_until = self._known_until, self._unknown_until
        missing = [k for k in keys
                   if known_until.get(k, 0.0) <= now and unknown_until.get(k, 0.0) <= now]
        if not missing:
            return
        found = await lookup_devices(conn, missing)
        for k in missing:
            info = found.get(k)
            if info is not None and info.enrolled:
                self._known[k] = DeviceProfile(info.ownership, info.groups)
                known_until[k] = now + _KNOWN_TTL_S
                unknown_until.pop(k, None)
            else:  # unknown, or revoked since it was last looked up
                self._known.pop(k, None)
                known_until.pop(k, None)
                unknown_until[k] = now + _UNKNOWN_TTL_S

    def is_enrolled(self, tenant: str, device: str) -> bool:
        return (tenant, device) in self._known

    def profile(self, tenant: str, device: str) -> DeviceProfile:
        return self._known[(tenant, device)]


class _LookupConnection:
    """The worker's connection for reads on the hot path (devices, policies,
    check-out history); replaced after any error."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: asyncpg.Connection | None = None

    async def get(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await connect(self._dsn)
        return self._conn

    def reset(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


def _tune_gc() -> None:
    """Make the cyclic garbage collector cheap for the ingest's pattern: every
    message leaves a few container objects (message, staged row) alive until its
    batch commits, all freed by reference counting, none in a cycle. With the
    default thresholds (700, 10, 10) the collector ran every few hundred messages
    and, as batches outlive young collections, traversed every object of the
    process in full collections, about a fifth of the ingest's CPU per record
    (load_tests/bench_decode.py, pipeline). Freezing moves what start-up made
    (modules, compiled policies) out of every later collection; a larger first
    threshold lets most records die before a collection sees them. Cycles are
    still collected, later. Process-wide: in ``serve`` it applies to the API too.
    (No gc.collect() first: it costs tens of milliseconds at start for the few
    hundred objects of start-up garbage it would free.)"""
    gc.freeze()
    gc.set_threshold(_GC_THRESHOLD, 10, 10)


class IngestWorker:
    def __init__(self, config: Config, *, index: int = 0) -> None:
        self._config = config
        self.client_id = config.client_id(f"mdm-ingest-{index}")
        self.stats = IngestStats()
        self._pending: list[InboundMessage] = []
        self._held_bytes = 0  # pending plus the batch being written
        self._first_at = 0.0
        self._batch_first_at: deque[float] = deque()  # of batches not yet written (metrics)
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        # A batch ready to write: (messages, what to write, shaping counts).
        self._to_write: asyncio.Queue[tuple[list[InboundMessage], WriteSet, ShapeStats]] = (
            asyncio.Queue(maxsize=1))
        self._sink = TelemetrySink(config.database_url, Keyring.from_config(config))
        self._record_ids = RecordIds(config.require_master_key())
        self._foreign = ForeignDecoder(config.require_master_key())
        self._devices = _DeviceRegistry()
        self._lookup = _LookupConnection(config.database_url)
        self.policies = PolicyEngine(config)
        limiter = config.device_limiter()
        self._limit = limiter.check if limiter is not None else None
        self.consumer: MessageReader
        if config.amqp is not None:
            # A RabbitMQ cluster (MDM_AMQP_URL): the ingest's quorum queue, competing
            # consumers; the broker holds at most two batches unacknowledged for us.
            from mdm_server.ingest.amqp import AmqpConsumer

            self.consumer = AmqpConsumer(config.amqp, on_message=self._on_message,
                                         prefetch=2 * config.batch_max_records)
        else:
            self.consumer = MqttConsumer(
                config.require_mqtt(),
                client_id=self.client_id,
                # Our agents' telemetry, and OwnTracks' topics (mdm_server/agents/ingest.py).
                subscriptions=[shared_subscription(config.share_group, TELEMETRY_FILTER),
                               shared_subscription(config.share_group, owntracks_filter())],
                on_message=self._on_message,
            )

    async def submit(self, msg: InboundMessage, submission: HttpSubmission) -> HttpOutcome:
        """An HTTP post of a foreign agent through this worker's core: rate limit,
        decode, policy, sealing, one transaction with the batch it joins. Returns
        once that transaction has committed (the HTTP answer follows only then)."""
        submission.done = asyncio.get_running_loop().create_future()
        msg.http = submission
        self._on_message(msg)
        return await submission.done

    @property
    def broker_connected(self) -> bool:
        """Connected, and the broker has acknowledged a subscription (so messages
        are routed to this worker; the session keeps it across reconnections)."""
        return self.consumer.connected.is_set() and self.consumer.subscribed.is_set()

    @property
    def pending_bytes(self) -> int:
        return self._held_bytes

    def _on_message(self, msg: InboundMessage) -> None:
        limit = self._limit
        if limit is not None:
            # Over its device's rate limit: it goes with its batch, to be counted
            # and acknowledged after the commit, but is never decoded.
            bucket = limit(msg.topic)
            if bucket is not None:
                msg.limited = bucket
        pending = self._pending
        if not pending:
            self._first_at = time.monotonic()
            self._arrived.set()
        pending.append(msg)
        self._held_bytes += len(msg.payload)
        if len(pending) >= self._config.batch_max_records:
            self._full.set()
        if self._held_bytes > self._config.max_pending_bytes:
            self.consumer.pause_reading()  # the broker holds the rest

    async def run(self) -> None:
        """Run until cancelled. Database outages are waited out, bad input is
        dead-lettered; only a bug ends this."""
        _tune_gc()
        try:
            async with asyncio.TaskGroup() as tg:
                # The broker connection is made while the partitions are prepared:
                # batches wait for _prepare, messages meanwhile wait in _pending.
                tg.create_task(self.consumer.run(), name=f"{self.client_id}-mqtt")
                tg.create_task(self._batches(), name=f"{self.client_id}-batches")
                tg.create_task(self._writes(), name=f"{self.client_id}-writes")
                tg.create_task(self.policies.watch(), name=f"{self.client_id}-policies")
        finally:
            await self._sink.close()
            await self._lookup.close()

    async def _prepare(self) -> None:
        """Today's and tomorrow's partitions, and the lookup connection, at once."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(retry_while_away(
                lambda: self._sink.prepare(int(time.time() * 1000)), self._sink.reset))
            tg.create_task(retry_while_away(self._lookup.get, self._lookup.reset))

    async def _next_batch(self) -> list[InboundMessage]:
        cfg = self._config
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._first_at + cfg.batch_max_delay_s
        while len(self._pending) < cfg.batch_max_records:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._full.clear()
            try:
                await asyncio.wait_for(self._full.wait(), remaining)
            except TimeoutError:
                break
        self._batch_first_at.append(self._first_at)
        n = cfg.batch_max_records
        batch, self._pending = self._pending[:n], self._pending[n:]
        if self._pending:
            self._first_at = time.monotonic()
        return batch

    async def _batches(self) -> None:
        """Decode, check and shape batches in order and hand each to _writes. While
        one batch is written the next is decoded, yielding to the loop between
        chunks so the write's round trips go on; the hand-over waits for the
        previous write, so at most one batch waits for its write."""
        await self._prepare()
        to_write = self._to_write
        while True:
            batch = await self._next_batch()
            foreign = self._foreign.devices_of(batch)
            if foreign:  # their agent and secret before they are decoded
                await retry_while_away(functools.partial(self._load_foreign, foreign),
                                       self._lookup.reset)
            decoded = DecodedBatch(batch, int(time.time() * 1000), foreign=self._foreign)
            for start in range(0, len(batch), _DECODE_CHUNK):
                # Yield first: the writer task has not started the previous batch's
                # write until this task lets it run, and then each of its round
                # trips (and the MQTT reader) goes on between chunks.
                await asyncio.sleep(0)
                decoded.decode(start, start + _DECODE_CHUNK)
            keys = decoded.devices()
            await retry_while_away(functools.partial(self._load, keys), self._lookup.reset)
            groups, ws = admit(decoded, self._devices.is_enrolled)
            self.stats.ignored += decoded.foreign_ignored
            del decoded
            # The agent's record ids go no further than here (record_ids.py).
            digest_groups(groups, self._record_ids)
            p = plan(groups, self._choose, ws)
            if p.needs_checkouts:
                # The history must hold the check-outs the previous batch writes.
                await to_write.join()
            shaped = await self._shape(p, ws)
            del groups, p  # the raw values go no further than the policy
            await to_write.join()
            to_write.put_nowait((batch, ws, shaped))

    async def _writes(self) -> None:
        """Write each batch, then (and only then) acknowledge its messages; in order."""
        to_write = self._to_write
        while True:
            batch, ws, shaped = await to_write.get()
            if self._config.unsafe_ack_before_commit:
                self.consumer.ack(batch)  # test-only: the crash test must catch this
            started = time.monotonic()
            result = await self._sink.write(ws)
            if not self._config.unsafe_ack_before_commit:
                self.consumer.ack(batch)
            done = time.monotonic()
            metrics.batch_committed(len(batch), ws, result, shaped, done - started,
                                    done - (self._batch_first_at.popleft()
                                           if self._batch_first_at else started))
            s = self.stats
            s.messages += len(batch)
            s.records_stored += result.inserted
            s.duplicates += result.duplicates
            s.dead_letters += result.dead_letters
            s.rate_limited += result.rate_limited
            s.not_collected += shaped.not_collected
            s.suppressed += shaped.suppressed
            s.batches += 1
            if any(m.http is not None for m in batch):
                _answer_posts(batch, ws)
            self._held_bytes -= sum(len(m.payload) for m in batch)
            if self._held_bytes <= self._config.max_pending_bytes // 2:
                self.consumer.resume_reading()
            del batch, ws
            to_write.task_done()

    async def _load_foreign(self, keys: set[tuple[str, str]]) -> None:
        await self._foreign.load(await self._lookup.get(), keys)

    async def _load(self, keys: set[tuple[str, str]]) -> None:
        """Devices and the policies of their tenants, from the database if needed."""
        conn = await self._lookup.get()
        await self._devices.refresh(conn, keys)
        await self.policies.load(conn, {t for t, _ in keys})

    def _choose(self, tenant: str, device: str) -> CompiledPolicy:
        return self.policies.policy_for(tenant, device, self._devices.profile(tenant, device))

    async def _shape(self, p: Plan, ws: WriteSet) -> ShapeStats:
        views = {}
        if p.needs_checkouts:
            assert p.location_ts_range is not None
            lo, hi = p.location_ts_range

            async def fetch() -> dict[tuple[str, str], list[tuple[int, bool]]]:
                return await checkout_history(await self._lookup.get(), p.needs_checkouts,
                                              lo, hi)

            history = await retry_while_away(fetch, self._lookup.reset)
            per_tenant: dict[str, dict[str, list[tuple[int, bool]]]] = {}
            for key in p.needs_checkouts | set(p.batch_events):
                events = sorted(history.get(key, []) + p.batch_events.get(key, []))
                per_tenant.setdefault(key[0], {})[key[1]] = events
            views = {t: checked_out_view(ev) for t, ev in per_tenant.items()}
        return apply(p, ws, views)


def _answer_posts(batch: list[InboundMessage], ws: WriteSet) -> None:
    """The batch is committed: tell each HTTP post what became of it."""
    dead = {i: d for i, d in ws.dead}
    for i, m in enumerate(batch):
        if m.http is None:
            continue
        if m.limited is not None:
            m.http.resolve(HttpOutcome("limited"))
        elif i in dead:
            m.http.resolve(HttpOutcome("dead", dead[i].reason, dead[i].detail))
        else:
            m.http.resolve(HttpOutcome("stored"))


async def live_line(stats: IngestStats, label: str, interval_s: float = 1.0) -> None:
    """Log a line of live numbers (records stored per second, and the totals) every
    second while messages arrive, and the totals at a stop if they changed since the
    last line; an idle worker logs nothing."""
    last_stored, last_t = stats.records_stored, time.monotonic()
    last_messages = stats.messages

    def line() -> None:
        nonlocal last_stored, last_t, last_messages
        now = time.monotonic()
        rate = (stats.records_stored - last_stored) / max(now - last_t, 1e-3)
        last_stored, last_t, last_messages = stats.records_stored, now, stats.messages
        log.info("%s: %s records/s  stored=%s duplicates=%s dead_letters=%s rate_limited=%s "
                 "messages=%s", label, f"{rate:,.0f}", f"{stats.records_stored:,}",
                 f"{stats.duplicates:,}", f"{stats.dead_letters:,}",
                 f"{stats.rate_limited:,}", f"{stats.messages:,}")

    try:
        while True:
            await asyncio.sleep(interval_s)
            if stats.messages == last_messages:  # nothing since the last line
                last_stored, last_t = stats.records_stored, time.monotonic()
                continue
            line()
    finally:
        if stats.messages != last_messages:
            line()
