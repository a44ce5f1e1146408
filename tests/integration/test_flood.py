"""A junk flood from one device (issue 10): the other devices' ingest rate stays
within 0.8 of normal, the flood ends as a handful of counted rows, and the ingest
stays connected. Real broker (project config), real PostgreSQL, ``mdm-server
serve`` with its default limits.

Twenty devices publish valid telemetry at a steady 1,000 messages/s in all (50
each, as a busy fleet might) for WINDOW_S seconds, twice: alone (the baseline),
then while one enrolled device publishes junk as fast as one connection and the
broker go (a bare MQTT client writing prepared packets: hundreds of thousands of
messages). The others' rate is what the ingest stored of their messages per second
within the window (``received_at``), measured in this same test, so the ratio
does not depend on the machine. Without the limit and the counting, the same
flood made one dead-letter row per message and left the others' messages queued
behind it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent_protocol import Record, encode_telemetry, telemetry_topic
from tests.support.mqtt import RawClient, publish_packet
from tests.support.services import (
    Broker,
    Server,
    device_credentials,
    enroll,
    fetchval,
    server_env,
    wait_for_count,
)

pytestmark = pytest.mark.integration

OTHERS = [f"dev-{i:02d}" for i in range(20)]
FLOODER = "flooder"
RATE = 1000  # messages/s of the others together
WINDOW_S = 12.0
WARMUP_S = 1.5  # of each window, not measured
TICK_S = 0.02
MIN_RATIO = 0.8
JUNK_CHUNK = 10_000  # packets per sendall


def _device(broker: Broker, device: str) -> RawClient:
    user, password = device_credentials("acme", device)
    return RawClient(broker.port, user, user, password)


def _steady(clients: dict[str, RawClient], phase: str) -> tuple[tuple[float, float], int]:
    """RATE messages/s from the others, spread over TICK_S ticks, for WINDOW_S.
    Returns the window (wall clock, seconds since the epoch) and the count sent."""
    per_tick = RATE * TICK_S / len(clients)
    assert per_tick == int(per_tick)
    now_ms = int(time.time() * 1000)
    ticks = int(WINDOW_S / TICK_S)
    packets = {d: [publish_packet(
        telemetry_topic("acme", d, "location"),
        encode_telemetry([Record(f"{phase}-{d}-{i}", now_ms + i,
                                 {"lat": 52.0 + i / 1e5, "lon": 4.3, "accuracy_m": 5.0})],
                         device=d, kind="location"), i % 65535 + 1)
        for i in range(int(per_tick) * ticks)] for d in clients}
    start = time.time()
    for k in range(ticks):
        for d, c in clients.items():
            c.send(b"".join(packets[d][k * int(per_tick):(k + 1) * int(per_tick)]))
        delay = start + (k + 1) * TICK_S - time.time()
        if delay > 0:
            time.sleep(delay)
    return (start, start + ticks * TICK_S), sum(len(p) for p in packets.values())


class Flood:
    """Junk (not JSON) from one device on its own location topic, as fast as one
    connection goes, until stopped."""

    def __init__(self, client: RawClient) -> None:
        topic = telemetry_topic("acme", FLOODER, "location")
        self.blob = b"".join(publish_packet(topic, b"junk %05d" % i, i % 65535 + 1)
                             for i in range(JUNK_CHUNK))
        self.client = client
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.client.send(self.blob)
            self.sent += JUNK_CHUNK

    def start(self) -> Flood:
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=60)
        return self.sent


def _stored_rate(database: str, window: tuple[float, float]) -> float:
    """The others' messages stored per second within the window (after its warm-up)."""
    lo, hi = window[0] + WARMUP_S, window[1]
    n = asyncio.run(fetchval(
        database, "SELECT count(*) FROM telemetry WHERE device_id <> $1 "
        "AND received_at >= $2 AND received_at < $3", FLOODER,
        datetime.fromtimestamp(lo, UTC), datetime.fromtimestamp(hi, UTC)))
    return int(str(n)) / (hi - lo)


@pytest.fixture
def server(database: str, broker: Broker, tmp_path: Path) -> Iterator[Server]:
    asyncio.run(enroll(database, broker.url, "acme", [*OTHERS, FLOODER]))
    srv = Server(server_env(database, broker.url), tmp_path / "serve.log")
    srv.env["TEST_DATABASE"] = database
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_a_junk_flood_leaves_the_other_devices_rate_and_ends_as_a_few_counted_rows(
        server: Server, broker: Broker) -> None:
    database = server.env["TEST_DATABASE"]
    clients = {d: _device(broker, d) for d in OTHERS}
    flooder = _device(broker, FLOODER)
    try:
        base_window, base_n = _steady(clients, "base")
        wait_for_count(database, "SELECT count(*) FROM telemetry", base_n, timeout=60)
        base = _stored_rate(database, base_window)

        flood = Flood(flooder).start()
        time.sleep(2.0)  # the flood at full speed, its burst spent
        flood_window, flood_n = _steady(clients, "flood")
        sent = flood.stop()
        flooding = _stored_rate(database, flood_window)  # may still grow: read again below

        stored = wait_for_count(database, "SELECT count(*) FROM telemetry",
                                base_n + flood_n, timeout=120, settle=1.0)
        assert stored == base_n + flood_n  # nothing of the others lost
        flooding = _stored_rate(database, flood_window)
        ratio = flooding / base
        print(f"\nflood: {sent:,} junk messages; others stored {base:,.0f}/s without, "
              f"{flooding:,.0f}/s during it: ratio {ratio:.3f}")
        assert ratio >= MIN_RATIO, (base, flooding, sent)
        assert sent >= 200_000, f"only {sent:,} junk messages: not a flood"

        # Every junk message the broker accepted is counted, in a handful of rows.
        assert flooder.closed.wait(0) is False
        deadline = time.monotonic() + 60
        while flooder.pubacks < sent:
            assert time.monotonic() < deadline, (flooder.pubacks, sent)
            time.sleep(0.2)
        counted = wait_for_count(database, "SELECT coalesce(sum(count), 0) FROM dead_letters "
                                 f"WHERE device_id = '{FLOODER}'", sent, timeout=120,
                                 settle=1.0)
        assert counted == sent
        rows = asyncio.run(fetchval(database, "SELECT count(*) FROM dead_letters"))
        assert int(str(rows)) <= 4  # not_json and rate_limited (two hours at most)
        admin = server.cli("admin", "create", "--tenant", "acme", "--name", "alice").strip()
        status, body = server.request("GET", "/api/v1/dead-letters", admin)
        assert status == 200
        seen = {r["reason"]: r for r in body["dead_letters"]}
        assert sum(r["count"] for r in body["dead_letters"]) == sent
        assert seen["rate_limited"]["topic"] == f"mdm/v1/acme/devices/{FLOODER}/#"
        assert seen["rate_limited"]["count"] > sent // 2
        assert seen["not_json"]["device"] == FLOODER

        # The ingest stayed connected all along.
        log = server.log_text()
        assert "disconnected from the broker" not in log
        assert "junk 0" not in log
    finally:
        for c in [*clients.values(), flooder]:
            c.close()
