"""Micro-benchmarks of the ingest's CPU per record, in process (not collected by pytest).

Run: .venv/bin/python -m load_tests.bench_decode [--only decode|pipeline]
    [--messages 100000] [--kinds location] [--repeats 5]

``decode``: the median time per message of ``decode_telemetry`` over several
timeit runs, for a few hand-made payloads.

``pipeline``: CPU time (``time.process_time``) per record of everything the
ingest process does with a message on its own core, except the sockets and the
database: the MQTT reader's PUBLISH fast path on a buffer of real packets, the
worker's intake (with the per-device rate limit's check), decode and
validation, the enrolled-device check, the policy (the tenant's open default,
as the drain benchmark runs it) and what the sink computes before COPY
(gathering rows, partitions, jsonb encoding). Messages
are made like the simulator's (load_tests/fleet_data.py, encode_telemetry with
device and kind: RFC 3339 ``ts``), 20 devices taking turns, in batches of
5,000 as the ingest takes them. Best of ``--repeats`` runs; the machine is
shared, so compare figures taken minutes apart, not across days. The garbage
collector is set up as the ingest worker sets it up.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
import timeit
from collections.abc import Sequence
from datetime import UTC, datetime

import orjson

from agent_protocol import Record, decode_telemetry, encode_telemetry, parse_topic, telemetry_topic
from load_tests.fleet_data import DeviceProfile

NOW = time.time_ns() // 1_000_000
TS = datetime.fromtimestamp((NOW - 5_000) / 1000, UTC).isoformat(timespec="milliseconds")
TS = TS.replace("+00:00", "Z")

LOCATION = orjson.dumps(
    {
        "v": 1,
        "id": "0192f1c2-7d3e-7a4b-9c1d-2e3f4a5b6c7d",
        "ts": NOW - 5_000,
        "data": {
            "lat": 52.373102,
            "lon": 4.892254,
            "accuracy_m": 12.5,
            "altitude_m": 3.2,
            "speed_mps": 1.4,
            "heading_deg": 271.0,
            "source": "fused",
        },
    }
)
LOCATION_RFC3339 = orjson.dumps({**orjson.loads(LOCATION), "ts": TS})
IDENTITY = orjson.dumps(
    {
        "v": 1,
        "id": "0192f1c2-7d3e-7a4b-9c1d-2e3f4a5b6c7e",
        "ts": TS,
        "data": {
            "imei": "356938035643809",
            "serial": "R58M123ABC",
            "wifi_mac": "02:00:00:00:00:00",
            "bluetooth_mac": "AA:BB:CC:DD:EE:FF",
            "phone_number": "+31612345678",
            "device_name": "Pixel van Jan",
            "user_name": "jan",
            "user_email": "jan@example.org",
            "first_name": "Jan",
            "last_name": "de Vries",
            "model": "Pixel 8",
            "os": "android",
            "os_version": "15",
        },
    }
)
BATCH = orjson.dumps(
    {"v": 1, "records": [{**orjson.loads(LOCATION), "id": f"r{i}"} for i in range(100)]}
)

CASES = [
    ("location, epoch-ms ts", "mdm/v1/acme/devices/dev-1/telemetry/location", LOCATION, 1),
    ("location, RFC 3339 ts", "mdm/v1/acme/devices/dev-1/telemetry/location", LOCATION_RFC3339, 1),
    ("identity, 13 fields", "mdm/v1/acme/devices/dev-1/telemetry/identity", IDENTITY, 1),
    ("location batch of 100", "mdm/v1/acme/devices/dev-1/telemetry/location", BATCH, 100),
]


def bench_decode() -> None:
    now = time.time_ns() // 1_000_000
    for name, topic_name, payload, n_records in CASES:
        number = 20_000 // n_records

        def run(topic_name: str = topic_name, payload: bytes = payload) -> None:
            decode_telemetry(parse_topic(topic_name), payload, now_ms=now)

        run()  # fail fast if the payload is invalid
        runs = timeit.repeat(run, number=number, repeat=7)
        per_msg = statistics.median(runs) / number * 1e6
        print(
            f"{name:24s} {len(payload):6d} B  {per_msg:8.2f} µs/message"
            f"  {per_msg / n_records:6.2f} µs/record"
        )


# --- the pipeline ---------------------------------------------------------------------

TENANT = "bench"
DEVICES = 20
BATCH_SIZE = 5_000
AHEAD = 15_000


def make_messages(n: int, kinds: Sequence[str], seed: int = 7) -> list[tuple[str, bytes]]:
    """``n`` (topic, payload) pairs as the simulator publishes them."""
    profiles = [DeviceProfile(f"sim-{i:04d}", seed=seed) for i in range(DEVICES)]
    t0 = int(time.time() * 1000) - n
    out = []
    for i in range(n):
        p = profiles[i % DEVICES]
        kind = kinds[i % len(kinds)]
        ts = t0 + i
        payload = encode_telemetry([Record(f"bench-{i}", ts, p.data(kind, ts))],
                                   device=p.device, kind=kind)
        out.append((telemetry_topic(TENANT, p.device, kind), payload))
    return out


def publish_packets(messages: list[tuple[str, bytes]]) -> bytes:
    """The messages as the broker sends them: MQTT 3.1.1 QoS 1 PUBLISH packets."""
    parts = []
    for mid, (topic, payload) in enumerate(messages, 1):
        t = topic.encode()
        body = len(t).to_bytes(2, "big") + t + (mid % 65535 + 1).to_bytes(2, "big") + payload
        n, length = len(body), bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            length.append(byte | (0x80 if n else 0))
            if not n:
                break
        parts.append(b"\x32" + bytes(length) + body)
    return b"".join(parts)


class _BlobSocket:
    """The broker's side of the socket: ``recv`` returns the next bytes of a blob."""

    def __init__(self, blob: bytes) -> None:
        self._blob = blob
        self._pos = 0

    def empty(self) -> bool:
        return self._pos >= len(self._blob)

    def recv(self, n: int) -> bytes:
        if self.empty():
            raise BlockingIOError
        out = self._blob[self._pos:self._pos + n]
        self._pos += len(out)
        return out

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


class _Laps:
    """CPU time between calls of :meth:`lap`, summed per stage name."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self._t = time.process_time()

    def lap(self, name: str) -> None:
        t = time.process_time()
        self.cpu[name] = self.cpu.get(name, 0.0) + t - self._t
        self._t = t


async def _pipeline_once(blob: bytes, n: int) -> dict[str, float]:
    # Imported here: the decode benchmark needs none of the server.
    from mdm_server.config import Config, MqttSettings
    from mdm_server.ingest import batch as batch_mod
    from mdm_server.ingest import shaping
    from mdm_server.ingest.mqtt import InboundMessage, MqttConsumer
    from mdm_server.ingest.record_ids import RecordIds, digest_groups
    from mdm_server.ingest.sink import _DAY_MS
    from mdm_server.policy.engine import DeviceProfile as Profile
    from mdm_server.policy.engine import PolicyEngine
    from mdm_server.storage.pool import _jsonb_encode
    from privacy_filters import CompiledPolicy

    cfg = Config(database_url="postgresql://unused", mqtt=MqttSettings("127.0.0.1", 1),
                 master_key=b"k" * 32)
    engine = PolicyEngine(cfg)
    engine._tenants[TENANT] = engine._compile(  # as load() does, without the database
        TENANT, [("default", 1, {"applies_to": {}})], (("default", 1),))
    profile = Profile("corporate", ())
    record_ids = RecordIds(b"k" * 32)
    known = {(TENANT, f"sim-{i:04d}") for i in range(DEVICES)}

    received: list[InboundMessage] = []
    # The worker's intake (IngestWorker._on_message): the per-device rate limit's
    # check on every message (default settings: none of these is over it).
    limiter = cfg.device_limiter()
    assert limiter is not None
    limit, keep = limiter.check, received.append

    def intake(msg: InboundMessage) -> None:
        bucket = limit(msg.topic)
        if bucket is not None:
            msg.limited = bucket
        keep(msg)

    consumer = MqttConsumer(cfg.require_mqtt(), client_id="bench", subscriptions=[],
                            on_message=intake)
    sock = _BlobSocket(blob)
    consumer._client._sock = sock  # type: ignore[assignment]  # recv and fileno suffice

    def read(upto: int) -> None:
        # As the event loop does when the socket is readable: each call reads what
        # one recv returns (256 KiB, about 1,000 messages) and parses it all.
        while len(received) < upto and not sock.empty():
            consumer._readable()

    def is_enrolled(tenant: str, device: str) -> bool:
        return (tenant, device) in known

    def choose(tenant: str, device: str) -> CompiledPolicy:
        return engine.policy_for(tenant, device, profile)

    # The broker keeps up to max_inflight (20,000) unacknowledged messages with the
    # ingest: while one batch is processed, about three more are held.
    laps = _Laps()
    read(AHEAD)
    laps.lap("mqtt read (fast path)")
    done = 0
    for _ in range(0, n, BATCH_SIZE):
        msgs = received[:BATCH_SIZE]
        del received[:BATCH_SIZE]
        read(AHEAD)
        laps.lap("mqtt read (fast path)")
        decoded = batch_mod.decode_batch(msgs, int(time.time() * 1000))
        laps.lap("decode + validate")
        decoded.devices()
        groups, ws = batch_mod.admit(decoded, is_enrolled)
        digest_groups(groups, record_ids)
        laps.lap("batch glue")
        p = shaping.plan(groups, choose, ws)
        shaping.apply(p, ws, {})
        laps.lap("policy (plan, apply)")
        rows = ws.rows
        [d.as_row() for _, d in ws.dead]
        [c for _, c in ws.checkouts]
        [e for _, e in ws.enforce_checkins]
        {(r[2], r[4] // _DAY_MS) for r in rows}
        for r in rows:  # asyncpg calls the jsonb codec once per row
            _jsonb_encode(r[7])
        [m.mid for m in msgs if m.generation == 0]
        sum(len(m.payload) for m in msgs)
        laps.lap("sink prep + ack ids")
        done += len(msgs)
    assert done == n and not received, (done, len(received))
    return laps.cpu


def bench_pipeline(n: int, kinds: Sequence[str], repeats: int) -> None:
    from mdm_server.ingest import worker

    worker._tune_gc()  # as IngestWorker.run does
    messages = make_messages(n, kinds)
    blob = publish_packets(messages)
    del messages
    best: dict[str, float] = {}
    totals = []
    for _ in range(repeats):
        gc.collect()
        cpu = asyncio.run(_pipeline_once(blob, n))
        totals.append(sum(cpu.values()))
        for k, v in cpu.items():
            best[k] = min(best.get(k, v), v)
    print(f"pipeline, {n:,} single-record messages ({','.join(kinds)}), "
          f"batches of {BATCH_SIZE:,}, CPU µs/record (best of {repeats}):")
    for k, v in best.items():
        print(f"  {k:24s} {v / n * 1e6:6.2f}")
    print(f"  {'total (best run)':24s} {min(totals) / n * 1e6:6.2f}"
          f"   (median run {statistics.median(totals) / n * 1e6:.2f})")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m load_tests.bench_decode")
    ap.add_argument("--only", choices=["decode", "pipeline"])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--kinds", default="location")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if args.only in (None, "decode"):
        bench_decode()
    if args.only in (None, "pipeline"):
        bench_pipeline(args.messages, args.kinds.split(","), args.repeats)


if __name__ == "__main__":
    main()
