"""Crashes and outages: nothing accepted is lost, nothing is stored twice."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest

from tests.support.mqtt import DeviceStream
from tests.support.services import (
    Broker,
    IngestProcess,
    enroll,
    fetchval,
    private_postgres,
    server_env,
    wait_for_count,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COUNT = "SELECT count(*) FROM telemetry"
DISTINCT = "SELECT count(DISTINCT (device_id, record_id)) FROM telemetry"
N = 100_000
DEVICES = [f"dev-{i:02d}" for i in range(50)]


def _wait_stored_at_least(database: str, n: int, ingest: IngestProcess) -> None:
    wait_for_count(database, COUNT, n, timeout=120, proc=ingest)


async def _kill_while_commit_is_held(database: str, ingest: IngestProcess) -> None:
    """Hold a lock that makes the worker's INSERT wait, so that its batch is
    decoded and staged but not committed, and SIGKILL it then."""
    conn = await asyncpg.connect(database)
    try:
        await conn.execute("BEGIN; LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")
        deadline = time.monotonic() + 30
        while not await conn.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted"):
            if time.monotonic() > deadline:
                raise TimeoutError("the worker never reached its commit")
            await asyncio.sleep(0.05)
        ingest.kill()
    finally:
        await conn.close()


def _crash_twice(database: str, broker: Broker, tmp_path: Path, *, unsafe: bool
                 ) -> tuple[int, int]:
    asyncio.run(enroll(database, broker.url, "acme", DEVICES))
    extra = {"MDM_TEST_UNSAFE_ACK_BEFORE_COMMIT": "1"} if unsafe else {}
    ingest = IngestProcess(server_env(database, broker.url, **extra), tmp_path / "ingest.log")
    ingest.start()
    ingest.wait_ready()
    try:
        with DeviceStream(broker.port, DEVICES, N):
            # Crash 1: wherever the worker happens to be, a fifth into the stream.
            _wait_stored_at_least(database, N // 5, ingest)
            ingest.kill()
            ingest.start()
            # Crash 2: while a batch is staged and its commit is held up.
            _wait_stored_at_least(database, N // 2, ingest)
            asyncio.run(_kill_while_commit_is_held(database, ingest))
            ingest.start()
        # Every message is published; let the worker drain (or stop moving, which is
        # how loss shows), then look for repeats.
        stored = wait_for_count(database, COUNT, N, timeout=180, idle=15, settle=2.0,
                                proc=ingest)
    finally:
        ingest.stop()
    return stored, int(asyncio.run(fetchval(database, DISTINCT)))  # type: ignore[arg-type]


def test_sigkill_twice_mid_stream_loses_nothing_and_doubles_nothing(
    database: str, broker: Broker, tmp_path: Path
) -> None:
    stored, distinct = _crash_twice(database, broker, tmp_path, unsafe=False)
    assert stored == N
    assert distinct == N


def test_the_crash_test_detects_loss_when_acks_precede_the_commit(
    database: str, broker: Broker, tmp_path: Path
) -> None:
    """Same scenario with the test-only switch that acks before committing: the
    batch held at crash 2 was acknowledged, so the broker never redelivers it."""
    stored, distinct = _crash_twice(database, broker, tmp_path, unsafe=True)
    assert stored < N
    assert distinct == stored


def test_postgres_restart_mid_stream_pauses_ingest_and_loses_nothing(
    broker: Broker, tmp_path: Path
) -> None:
    with private_postgres() as pg:
        database = asyncio.run(pg.create_database())
        asyncio.run(enroll(database, broker.url, "acme", DEVICES))
        ingest = IngestProcess(server_env(database, broker.url), tmp_path / "ingest.log")
        ingest.start()
        ingest.wait_ready()
        try:
            with DeviceStream(broker.port, DEVICES, N):
                _wait_stored_at_least(database, N // 5, ingest)
                pg.stop()
                time.sleep(3)  # the stream goes on; the broker holds it
                pg.start()
            stored = wait_for_count(database, COUNT, N, timeout=180, settle=2.0, proc=ingest)
            distinct = int(asyncio.run(fetchval(database, DISTINCT)))  # type: ignore[arg-type]
        finally:
            ingest.stop()
        assert ingest.proc is None
        assert "database unavailable" in ingest.log_text()  # it did pause
    assert stored == N
    assert distinct == N
