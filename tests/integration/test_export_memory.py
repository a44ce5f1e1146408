"""The export streams: a device with 1,000,000 location rows is exported as one
ZIP while the server's resident memory grows by less than 100 MB."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest

from mdm_server.storage.partitions import create_partitions
from mdm_server.storage.pool import connect
from mdm_server.storage.sealing import IngestKeys
from tests.support.services import (
    Server,
    create_database,
    drop_database,
    enroll_devices,
    keyring_for,
    running_broker,
    server_env,
)

pytestmark = pytest.mark.integration

ROWS = 1_000_000
T0 = datetime(2026, 10, 1, tzinfo=UTC)


async def _fill(database: str) -> None:
    """A million location rows, sealed under the device's key as the ingest seals
    them, so the export opens every one."""
    t0_ms = int(T0.timestamp() * 1000)
    conn = await connect(database)
    try:
        await create_partitions(conn, {("location", d) for d in
                                       range(t0_ms // 86_400_000,
                                             (t0_ms + ROWS * 1000) // 86_400_000 + 1)})
        keys = IngestKeys(keyring_for(database))
        await keys.ensure(conn, [("acme", "big")])
        for lo in range(0, ROWS, 100_000):
            rows = [("acme", "big", "location", f"r{g}", t0_ms + g * 1000, "default", 1,
                     {"lat": 52 + g / 1e7, "lon": 4 + g / 1e7, "accuracy_m": 5})
                    for g in range(lo, min(lo + 100_000, ROWS))]
            sealed, _ = keys.seal(rows)
            await conn.copy_records_to_table(
                "telemetry", records=[(*r[:4], datetime.fromtimestamp(r[4] / 1000, UTC),
                                       *r[5:]) for r in sealed],
                columns=("tenant_id", "device_id", "kind", "record_id", "ts", "policy_id",
                         "policy_version", "key_id", "sealed"))
    finally:
        await conn.close()


class _Peak(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.stop.wait(0.05)


def test_export_of_a_million_rows_keeps_server_memory_flat(tmp_path: Path) -> None:
    database = asyncio.run(create_database())
    try:
        with running_broker(tmp_path) as broker:
            asyncio.run(enroll_devices(database, broker.url, "acme", ["big"], "personal"))
            asyncio.run(_fill(database))
            srv = Server(server_env(database, broker.url), tmp_path / "serve.log")
            token = srv.cli("user", "token", "--tenant", "acme", "--device", "big").strip()
            srv.start()
            try:
                assert srv.proc is not None
                # Warm up the handlers and pools, then take the baseline.
                _, summary = srv.request("GET", "/api/v1/me/devices/big/export/summary",
                                         token)
                assert summary["records"]["location"] == ROWS
                base = psutil.Process(srv.proc.pid).memory_info().rss
                peak = _Peak(srv.proc.pid)
                peak.start()
                out = tmp_path / "export.zip"
                req = urllib.request.Request(srv.base + "/api/v1/me/devices/big/export")
                req.add_header("Authorization", f"Bearer {token}")
                with urllib.request.urlopen(req, timeout=900) as resp, out.open("wb") as f:
                    assert resp.headers["X-Export-Records"] == str(ROWS)
                    f.write(resp.read(1 << 20))
                    # One running export per user: a second one now is refused.
                    status, body = srv.request("GET", "/api/v1/me/devices/big/export", token)
                    assert (status, body["code"]) == (429, "export_running"), (status, body)
                    while chunk := resp.read(1 << 20):
                        f.write(chunk)
                peak.stop.set()
                peak.join()
            finally:
                srv.stop()
        grew_mb = (peak.peak - base) / 1e6
        assert grew_mb < 100, f"server RSS grew by {grew_mb:.0f} MB during the export"
        with zipfile.ZipFile(out) as zf, zf.open("telemetry/location.jsonl") as f:
            assert sum(1 for _ in f) == ROWS
        with zipfile.ZipFile(out) as zf, zf.open("telemetry/location.csv") as f:
            assert sum(1 for _ in f) == ROWS + 1  # with its header
    finally:
        asyncio.run(drop_database(database))
