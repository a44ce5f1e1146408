"""Dead letters are counted per device, reason, topic and hour (issue 10, migration
013), against real PostgreSQL (and, for the ingest, the project's broker).

- Rows kept before migration 013 become aggregates of their hour: counts and
  sizes add up, the first detail is kept, nothing of a payload appears.
- The ingest turns a stream of bad messages into one row per reason, whose count
  is the number of messages; the server's restricted role writes them.
- Retention removes an hour's row 30 days after the hour.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from agent_protocol import Status, encode_status, status_topic
from mdm_server.retention import run_retention
from mdm_server.storage.migrate import apply_migrations, available_migrations
from mdm_server.storage.pool import connect
from tests.support.mqtt import publish_as_devices
from tests.support.services import (
    Broker,
    IngestProcess,
    Server,
    create_database,
    drop_database,
    enroll,
    fetch,
    server_env,
    wait_for_count,
)
from tests.support.telemetry import location

pytestmark = pytest.mark.integration

LOC = "mdm/v1/acme/devices/dev-1/telemetry/location"
COUNTED = "SELECT coalesce(sum(count), 0) FROM dead_letters"


@pytest.fixture
def unmigrated() -> Iterator[str]:
    url = asyncio.run(create_database(migrate=False))
    try:
        yield url
    finally:
        asyncio.run(drop_database(url))


def test_rows_kept_before_013_become_aggregates_of_their_hour(unmigrated: str) -> None:
    t0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
    old = [  # received_at, tenant, device, topic, level, reason, detail, bytes
        (t0 + timedelta(minutes=5), "acme", "d1", LOC, None, "not_json", "first", 10),
        (t0 + timedelta(minutes=50), "acme", "d1", LOC, None, "not_json", "second", 20),
        (t0 + timedelta(minutes=55), "acme", "d1", LOC, None, "wrong_type", "data.lat", 5),
        (t0 + timedelta(minutes=65), "acme", "d1", LOC, None, "not_json", "next hour", 7),
        (t0 + timedelta(minutes=6), None, None, "{topic}", "prefix", "bad_topic", "t", 3),
        (t0 + timedelta(minutes=7), None, None, "{topic}", "prefix", "bad_topic", "t", 4),
    ]

    async def run() -> list[dict[str, object]]:
        conn = await connect(unmigrated)
        try:
            await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, "
                               "name text NOT NULL, applied_at timestamptz NOT NULL "
                               "DEFAULT now())")
            for m in available_migrations():
                if m.version < 13:
                    async with conn.transaction():
                        await conn.execute(m.sql)
                        await conn.execute("INSERT INTO schema_migrations (version, name) "
                                           "VALUES ($1, $2)", m.version, m.name)
            await conn.executemany(
                "INSERT INTO dead_letters (received_at, tenant_id, device_id, topic, "
                "failed_level, reason, detail, payload_bytes) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)", old)
            await apply_migrations(conn)
            return [dict(r) for r in await conn.fetch(
                "SELECT tenant_id, device_id, topic, failed_level, reason, hour, count, "
                "payload_bytes, first_seen, last_seen, detail FROM dead_letters "
                "ORDER BY first_seen")]
        finally:
            await conn.close()

    rows = asyncio.run(run())
    h = lambda m: t0 + timedelta(minutes=m)  # noqa: E731
    assert [(r["device_id"], r["reason"], r["hour"], r["count"], r["payload_bytes"],
             r["first_seen"], r["last_seen"], r["detail"]) for r in rows] == [
        ("d1", "not_json", t0, 2, 30, h(5), h(50), "first"),
        (None, "bad_topic", t0, 2, 7, h(6), h(7), "t"),
        ("d1", "wrong_type", t0, 1, 5, h(55), h(55), "data.lat"),
        ("d1", "not_json", t0 + timedelta(hours=1), 1, 7, h(65), h(65), "next hour"),
    ]
    assert sum(int(str(r["count"])) for r in rows) == len(old)


def _bad(i: int) -> bytes:
    return orjson.dumps({"v": 1, "id": f"b{i}", "ts": 1, "data": {"lat": "52.1234"}})


def test_the_ingest_counts_a_stream_of_bad_messages_in_a_row_per_reason(
        database: str, broker: Broker, tmp_path: Path) -> None:
    asyncio.run(enroll(database, broker.url, "acme", ["dev-1", "dev-2"]))
    ingest = IngestProcess(server_env(database, broker.url), tmp_path / "ingest.log")
    ingest.start()
    ingest.wait_ready()
    messages = [(LOC, b"junk %d" % i) for i in range(3000)]
    messages += [(LOC, _bad(i)) for i in range(500)]  # ts far too old: bad_timestamp
    messages += [location("acme", "dev-2", i) for i in range(100)]
    try:
        publish_as_devices(broker.port, messages)
        wait_for_count(database, "SELECT count(*) FROM telemetry", 100, proc=ingest)
        assert wait_for_count(database, COUNTED, 3500, proc=ingest, settle=1.0) == 3500
    finally:
        ingest.stop()
    rows = asyncio.run(fetch(database, "SELECT * FROM dead_letters ORDER BY reason, hour"))
    # One row per reason (two if the stream crossed the top of an hour).
    assert len(rows) <= 4 and len({(r["reason"], r["hour"]) for r in rows}) == len(rows)
    counts: dict[tuple[object, ...], int] = {}
    for r in rows:
        key = (r["tenant_id"], r["device_id"], r["topic"], r["reason"])
        counts[key] = counts.get(key, 0) + r["count"]
    assert counts == {("acme", "dev-1", LOC, "bad_timestamp"): 500,
                      ("acme", "dev-1", LOC, "not_json"): 3000}
    assert sum(r["payload_bytes"] for r in rows if r["reason"] == "not_json") == sum(
        len(b"junk %d" % i) for i in range(3000))
    for r in rows:
        assert r["first_seen"] <= r["last_seen"]
        assert r["hour"] == r["first_seen"].replace(minute=0, second=0, microsecond=0)
        assert "junk" not in r["detail"] and "52.1234" not in r["detail"]


def test_retention_removes_an_hours_row_thirty_days_after_the_hour(database: str) -> None:
    async def run() -> list[int]:
        conn = await connect(database)
        try:
            hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
            await conn.execute(
                "INSERT INTO dead_letters (tenant_id, device_id, topic, reason, hour, count, "
                "payload_bytes, first_seen, last_seen, detail) "
                "VALUES ('acme', 'd1', $1, 'not_json', $2, 5, 50, $2, $2, 'x')", LOC, hour)
            left = []
            for days in (30, 31):
                await run_retention(conn, now=hour + timedelta(days=days, minutes=30))
                left.append(await conn.fetchval("SELECT count(*) FROM dead_letters"))
            return left
        finally:
            await conn.close()

    assert asyncio.run(run()) == [1, 0]


def test_a_flood_of_statuses_is_counted_past_the_devices_limit_not_applied(
        database: str, broker: Broker, tmp_path: Path) -> None:
    """Acks and statuses go through the same per-device limit as telemetry: an
    "online" status makes the server re-send the device's unfinished commands, so
    a flood of them would fill the device's own queue on the broker."""
    asyncio.run(enroll(database, broker.url, "acme", ["dev-1"]))
    server = Server(server_env(database, broker.url, MDM_INGEST_DEVICE_RATE="1",
                               MDM_INGEST_DEVICE_BURST="20"), tmp_path / "serve.log")
    server.start()
    try:
        server.wait_log("acks subscribed")
        online = encode_status(Status("online", int(time.time() * 1000)))
        sent = 300
        t0 = time.monotonic()
        publish_as_devices(broker.port, [(status_topic("acme", "dev-1"), online)] * sent)
        elapsed = time.monotonic() - t0
        limited = wait_for_count(database, COUNTED, sent - 20 - int(elapsed) - 2, timeout=30,
                                 idle=3.0, settle=1.0)
    finally:
        server.stop()
    [row] = asyncio.run(fetch(database, "SELECT * FROM dead_letters"))
    assert (row["device_id"], row["reason"], row["topic"]) == (
        "dev-1", "rate_limited", "mdm/v1/acme/devices/dev-1/#")
    # The burst and a token a second went on; everything else was only counted.
    assert sent - 20 - elapsed - 2 <= limited <= sent - 20
    assert "1 messages/s after a burst of 20" in row["detail"]
