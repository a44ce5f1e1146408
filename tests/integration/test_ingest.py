"""The ingest core against a real broker (project config) and real PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.mqtt import publish_all
from tests.support.services import (
    Broker,
    IngestProcess,
    enroll,
    fetchval,
    server_env,
    wait_for_count,
)
from tests.support.telemetry import location

pytestmark = pytest.mark.integration

COUNT = "SELECT count(*) FROM telemetry"


def test_duplicates_are_stored_once(database: str, broker: Broker, tmp_path: Path) -> None:
    devices = [f"dev-{i}" for i in range(10)]
    asyncio.run(enroll(database, broker.url, "acme", devices))
    unique = [location("acme", devices[i % 10], i) for i in range(9_000)]
    # 10% of the deliveries are repeats of messages already sent.
    messages = unique + unique[::9]
    assert len(messages) == 10_000
    ingest = IngestProcess(server_env(database, broker.url), tmp_path / "ingest.log")
    ingest.start()
    ingest.wait_ready()
    try:
        publish_all("127.0.0.1", broker.port, messages)
        stored = wait_for_count(database, COUNT, 9_000, settle=1.0, proc=ingest)
    finally:
        ingest.stop()
    assert stored == 9_000
    distinct = asyncio.run(fetchval(
        database, "SELECT count(DISTINCT (device_id, record_id)) FROM telemetry"))
    assert distinct == 9_000
