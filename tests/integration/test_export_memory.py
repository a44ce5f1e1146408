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

from mdm_server.ingest.sink import TelemetrySink
from mdm_server.storage.pool import connect
from tests.support.services import (
    Server,
    create_database,
    drop_database,
    enroll_devices,
    running_broker,
    server_env,
)

pytestmark = pytest.mark.integration

ROWS = 1_000_000
T0 = datetime(2026, 10, 1, tzinfo=UTC)


async def _fill(database: str) -> None:
    sink = TelemetrySink(database)
    first = int(T0.timestamp()) // 86400
    last = (int(T0.timestamp()) + ROWS) // 86400
    await sink.ensure_partitions({("location", d) for d in range(first, last + 1)})
    await sink.close()
    conn = await connect(database)
    try:
        await conn.execute(
            """INSERT INTO telemetry (tenant_id, device_id, kind, record_id, ts, policy_id,
                                      policy_version, data)
               SELECT 'acme', 'big', 'location', 'r' || g,
                      $1::timestamptz + g * interval '1 second',
                      'default', 1,
                      jsonb_build_object('lat', 52 + g / 1e7, 'lon', 4 + g / 1e7,
                                         'accuracy_m', 5)
               FROM generate_series(0, $2 - 1) AS g""", T0, ROWS)
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
