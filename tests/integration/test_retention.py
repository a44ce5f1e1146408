"""Retention: `mdm-server retention run` against real partitions and rows."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent_protocol import Record, encode_telemetry, telemetry_topic
from mdm_server.storage.policies import put_policy
from mdm_server.storage.pool import connect
from tests.support.mqtt import publish_as_devices
from tests.support.services import (
    REPO,
    Broker,
    IngestProcess,
    enroll,
    fetch,
    server_env,
    stored_id,
    wait_for_count,
)

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000


async def _set_policies(database: str) -> None:
    conn = await connect(database)
    try:
        await put_policy(conn, "acme", "short", {"applies_to": {"groups": ["short"]},
                                                 "retention_days": {"location": 7}}, "test")
    finally:
        await conn.close()


async def _group(database: str, device: str, group: str) -> None:
    conn = await connect(database)
    try:
        await conn.execute("UPDATE devices SET groups = $3 WHERE tenant_id = $1 AND "
                           "device_id = $2", "acme", device, [group])
    finally:
        await conn.close()


def test_retention_drops_old_partitions_and_deletes_per_policy(
    database: str, broker: Broker, tmp_path: Path
) -> None:
    asyncio.run(enroll(database, broker.url, "acme", ["d-short", "d-default"]))
    asyncio.run(_group(database, "d-short", "short"))
    asyncio.run(_set_policies(database))
    env = server_env(database, broker.url)
    ingest = IngestProcess(env, tmp_path / "ingest.log")
    ingest.start()
    ingest.wait_ready()
    now = int(time.time() * 1000)
    messages = []
    for device in ("d-short", "d-default"):
        for age in (1, 10, 100):
            rec = Record(f"{device}-{age}", now - age * DAY_MS, {"lat": 52.0, "lon": 4.0})
            messages.append((telemetry_topic("acme", device, "location"),
                             encode_telemetry([rec], device=device, kind="location")))
    try:
        publish_as_devices(broker.port, messages)
        assert wait_for_count(database, "SELECT count(*) FROM telemetry", 6,
                              proc=ingest) == 6
    finally:
        ingest.stop()
    old_day = time.strftime("%Y%m%d", time.gmtime((now - 100 * DAY_MS) / 1000))
    out = subprocess.run([sys.executable, "-m", "mdm_server", "retention", "run"], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"telemetry_location_{old_day}" in out.stdout
    left = asyncio.run(fetch(database, "SELECT record_id FROM telemetry"))
    assert sorted(r["record_id"] for r in left) == sorted(
        stored_id("acme", rid.rsplit("-", 1)[0], rid)
        for rid in ("d-default-1", "d-default-10", "d-short-1"))
    gone = asyncio.run(fetch(database, "SELECT 1 FROM pg_class WHERE relname = $1",
                             f"telemetry_location_{old_day}"))
    assert gone == []
