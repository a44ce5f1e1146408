"""The key ring (MDM_KEYRING_DIR) under real use: compaction while the ingest makes
keys and readers read, the `keys compact` command, serve's compaction after an
erasure and its catch-up, keys from before the key ring, and the errors a wrong
or missing key ring gives."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mdm_server.ingest.batch import WriteSet
from mdm_server.ingest.mqtt import InboundMessage
from mdm_server.ingest.sink import TelemetrySink
from mdm_server.storage import erasure
from mdm_server.storage.keyring import Keyring, KeyringError, legacy_kek, wrap_key
from mdm_server.storage.migrate import apply_migrations, available_migrations
from mdm_server.storage.pool import connect, create_pool
from mdm_server.storage.sealing import DeviceReader, IngestKeys, seal_value
from tests.support.services import (
    REPO,
    TEST_MASTER_KEY,
    Server,
    audit_keys_for_tests,
    create_database,
    drop_database,
    enroll,
    fetch_telemetry,
    fetchval,
    keyring_dir_for,
    keyring_for,
    running_broker,
    server_env,
)

pytestmark = pytest.mark.integration

MASTER = base64.b64decode(TEST_MASTER_KEY)


@pytest.fixture
def database() -> Iterator[str]:
    url = asyncio.run(create_database())
    yield url
    asyncio.run(drop_database(url))


def _rows(devices: list[str], per_device: int, tag: str) -> list[tuple[Any, ...]]:
    now = int(time.time() * 1000)
    return [("acme", d, "location", f"{tag}-{d}-{i}", now - i, "default", 1,
             {"lat": 52.0, "lon": 4.4, "n": i})
            for d in devices for i in range(per_device)]


async def _write(sink: TelemetrySink, rows: list[tuple[Any, ...]]) -> int:
    msgs = [InboundMessage(i, 1, "t", b"{}") for i in range(len(rows))]
    result = await sink.write(WriteSet(msgs, rows=rows, row_msgs=list(range(len(rows)))))
    return result.inserted


async def _state(database: str) -> dict[str, Any]:
    conn = await connect(database)
    try:
        return {
            "epochs": [r["epoch"] for r in
                       await conn.fetch("SELECT epoch FROM keystore.epochs ORDER BY 1")],
            "key_epochs": sorted({r["epoch"] for r in
                                  await conn.fetch("SELECT epoch FROM keystore.device_keys")}),
            "keys": await conn.fetchval("SELECT count(*) FROM keystore.device_keys"),
            "rows": await conn.fetchval("SELECT count(*) FROM telemetry"),
        }
    finally:
        await conn.close()


def _files(ring: Path) -> list[str]:
    return sorted(p.name for p in ring.glob("epoch-*.key"))


def test_compactions_during_a_stream_of_new_devices_lose_nothing(database: str) -> None:
    """Four writers store batches for devices reporting for the first time (each
    makes keys under the epoch it reads as current) while compactions run back to
    back: every accepted row is stored and opens, and every key is under the one
    epoch left, whose file is the only one in the key ring."""
    writers, batches, devices_per_batch = 4, 25, 8

    async def run() -> tuple[int, list[dict[str, Any]]]:
        stop = asyncio.Event()
        reports: list[dict[str, Any]] = []

        async def writer(w: int) -> int:
            sink = TelemetrySink(database, keyring_for(database))
            try:
                n = 0
                for b in range(batches):
                    devs = [f"w{w}-b{b}-d{i}" for i in range(devices_per_batch)]
                    n += await _write(sink, _rows(devs, 3, "s"))
                return n
            finally:
                await sink.close()

        async def compactor() -> None:
            ring = keyring_for(database)  # another process's view, as `keys compact`
            conn = await connect(database)
            try:
                while not stop.is_set():
                    reports.append((await ring.compact(conn)).to_json())
            finally:
                await conn.close()

        task = asyncio.create_task(compactor())
        try:
            stored = sum(await asyncio.gather(*(writer(w) for w in range(writers))))
        finally:
            stop.set()
            await task
        return stored, reports

    stored, reports = asyncio.run(run())
    offered = writers * batches * devices_per_batch * 3
    assert stored == offered
    assert len(reports) >= 5, "the compactions did not overlap the stream"
    state = asyncio.run(_state(database))
    assert state["rows"] == offered
    assert state["keys"] == writers * batches * devices_per_batch
    current = reports[-1]["epoch"]
    assert state["epochs"] == [current] and state["key_epochs"] == [current]
    assert _files(keyring_dir_for(database)) == [f"epoch-{current:06d}.key"]
    rows = asyncio.run(fetch_telemetry(database, "true"))
    assert len(rows) == offered and all(r["data"] is not None for r in rows)


def test_a_key_made_under_an_epoch_being_retired_is_rewrapped_or_made_again(
        database: str, caplog: pytest.LogCaptureFixture) -> None:
    """The race itself, forced: the ingest reads epoch E as current and its INSERT
    is held up; a compaction makes E+1 and tries to retire E while it is held; then
    both go on. Whichever gets E's row first, the key ends up under E+1 (made
    again by the ingest, or re-wrapped by the compaction's second attempt), E is
    retired and its file destroyed, and the key the ingest holds is the stored one."""
    caplog.set_level(logging.INFO, logger="mdm_server")

    async def run() -> tuple[int, dict[str, Any], bytes, bytes]:
        opener = await connect(database)
        blocker = await connect(database)
        ingest_conn = await connect(database)
        compact_conn = await connect(database)
        try:
            old = await keyring_for(database).open(opener)
            # A transaction holding a key row for the device, under E: the ingest's
            # INSERT of the same device waits for it, and so does the retiring
            # DELETE of E (the row's foreign key check locks E).
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute(
                "INSERT INTO keystore.device_keys (tenant_id, device_id, wrapped, epoch) "
                "VALUES ('acme', 'racer', $1, $2)", b"\0" * 60, old)
            keys = IngestKeys(keyring_for(database))
            ingest = asyncio.create_task(keys.ensure(ingest_conn, [("acme", "racer")]))
            await _until_waiting(opener, 1)
            compaction = asyncio.create_task(keyring_for(database).compact(compact_conn))
            await _until_waiting(opener, 2)
            await tx.rollback()
            await ingest
            report = (await compaction).to_json() | {"attempts": (await compaction).attempts}
            held = keys._keys[("acme", "racer")][1]  # the AESGCM the ingest seals with
            probe = seal_value(held, "acme", "racer", "sim", "r", 1, {"x": 1})
            reader = await DeviceReader.load(opener, keyring_for(database), "acme", "racer")
            return old, report, probe, reader.data(
                {"kind": "sim", "record_id": "r", "ts": _ts(1), "sealed": probe,
                 "key_id": keys._keys[("acme", "racer")][0], "data": None})
        finally:
            for c in (opener, blocker, ingest_conn, compact_conn):
                await c.close()

    old, report, _, opened = asyncio.run(run())
    assert opened == {"x": 1}
    assert report["epochs_retired"] == [old]
    state = asyncio.run(_state(database))
    assert state["epochs"] == [report["epoch"]] == state["key_epochs"]
    assert _files(keyring_dir_for(database)) == [f"epoch-{report['epoch']:06d}.key"]
    # One of the two paths was taken (which one is up to the lock manager).
    made_again = "wrapping new keys again" in caplog.text
    assert made_again != (report["attempts"] == 2), (made_again, report)


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


async def _until_waiting(conn: asyncpg.Connection, n: int) -> None:
    """Until ``n`` other sessions of this database wait for a lock."""
    for _ in range(200):
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'")
        if waiting >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{n} session(s) never waited for a lock")


def test_a_reader_whose_snapshot_predates_a_compaction_still_opens_everything(
        database: str) -> None:
    """The export reads in a REPEATABLE READ snapshot; a compaction that retires
    the epoch its snapshot's keys are wrapped under (file destroyed) commits after
    the snapshot began and before the keys are read: the reader reads them again
    outside the snapshot and opens every record."""

    async def run() -> tuple[int, int, str]:
        sink = TelemetrySink(database, keyring_for(database))
        try:
            await _write(sink, _rows(["reader"], 50, "r"))
        finally:
            await sink.close()
        pool = await create_pool(database)
        try:
            async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                                readonly=True):
                before = await conn.fetchval("SELECT count(*) FROM telemetry")  # snapshot
                other = await connect(database)
                try:
                    report = await keyring_for(database).compact(other)
                finally:
                    await other.close()
                assert report.epochs_retired and report.files_destroyed >= 1
                # Without a way out of the snapshot it is a bug, and says so.
                with pytest.raises(KeyringError, match="fresh="):
                    await DeviceReader.load(conn, keyring_for(database), "acme", "reader")
                reader = await DeviceReader.load(conn, keyring_for(database), "acme",
                                                 "reader", fresh=pool.acquire)
                rows = await conn.fetch("SELECT kind, record_id, ts, key_id, sealed, data "
                                        "FROM telemetry")
                opened = [reader.data(r) for r in rows]
                return before, sum(d is not None for d in opened), repr(opened)
        finally:
            await pool.close()

    before, opened, text = asyncio.run(run())
    assert before == opened == 50
    assert '"n"' in text or "'n'" in text


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mdm_server", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_keys_compact_retires_the_epoch_and_its_file_now(database: str) -> None:
    async def fill() -> None:
        sink = TelemetrySink(database, keyring_for(database))
        try:
            await _write(sink, _rows(["c1", "c2", "c3"], 4, "k"))
        finally:
            await sink.close()

    asyncio.run(fill())
    ring = keyring_dir_for(database)
    assert _files(ring) == ["epoch-000001.key"]
    env = server_env(database, "mqtt://127.0.0.1:1883")
    out = _cli(env, "keys", "compact")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"epoch": 2, "epochs_retired": [1], "keys_rewrapped": 3,
                                      "files_destroyed": 1}
    assert _files(ring) == ["epoch-000002.key"]
    assert (ring / "epoch-000002.key").stat().st_mode & 0o777 == 0o600
    assert asyncio.run(_state(database))["key_epochs"] == [2]
    rows = asyncio.run(fetch_telemetry(database, "true"))
    assert len(rows) == 12 and all(r["data"]["lat"] == 52.0 for r in rows)


@pytest.mark.parametrize("case", ["unset", "relative", "other_database", "empty",
                                  "epoch_file_missing", "epoch_file_replaced"])
def test_a_wrong_or_missing_key_ring_is_refused_clearly(database: str, tmp_path: Path,
                                                        case: str) -> None:
    """Every command that reads or writes telemetry refuses to run with a key ring
    that is not set, not this database's, or incomplete: exit 2, a message that
    says what is wrong and names no secret, no traceback, nothing stored."""
    env = server_env(database, "mqtt://127.0.0.1:1883")
    ring = keyring_dir_for(database)
    for _ in range(2):  # the key ring exists, epoch 1 retired, epoch 2 current
        assert _cli(env, "keys", "compact").returncode == 0
    assert _files(ring) == ["epoch-000002.key"]
    expected = {
        "unset": "MDM_KEYRING_DIR is not set",
        "relative": "MDM_KEYRING_DIR must be an absolute path",
        "other_database": "belongs to another database",
        "empty": "holds no key ring",
        "epoch_file_missing": "has no epoch-000002.key",
        "epoch_file_replaced": "epoch-000002.key is not this database's epoch 2",
    }[case]
    other: str | None = None
    if case == "unset":
        del env["MDM_KEYRING_DIR"]
    elif case == "relative":
        env["MDM_KEYRING_DIR"] = "var/keyring"
    elif case == "other_database":
        other = asyncio.run(create_database())
        env2 = server_env(other, "mqtt://127.0.0.1:1883")
        assert _cli(env2, "keys", "compact").returncode == 0
        env["MDM_KEYRING_DIR"] = env2["MDM_KEYRING_DIR"]
    elif case == "empty":
        env["MDM_KEYRING_DIR"] = str(tmp_path / "new")
    elif case == "epoch_file_missing":
        moved = tmp_path / "ring"
        shutil.copytree(ring, moved)
        (moved / "epoch-000002.key").unlink()
        env["MDM_KEYRING_DIR"] = str(moved)
    else:
        copy = tmp_path / "ring"
        shutil.copytree(ring, copy)
        (copy / "epoch-000002.key").write_bytes(os.urandom(32))
        env["MDM_KEYRING_DIR"] = str(copy)
    try:
        for args in (("keys", "compact"), ("ingest",), ("serve",)):
            out = _cli(env, *args)
            assert out.returncode == 2, (args, out.stdout, out.stderr[-2000:])
            assert expected in out.stderr, (args, out.stderr[-2000:])
            assert "Traceback" not in out.stderr
            secret = (ring / "epoch-000002.key").read_bytes()
            assert secret.hex() not in out.stderr and TEST_MASTER_KEY not in out.stderr
    finally:
        if other is not None:
            asyncio.run(drop_database(other))
    # Nothing was retired by the refused commands: the database's ring still works.
    assert _files(ring) == ["epoch-000002.key"]
    assert asyncio.run(_state(database))["epochs"] == [2]


def test_a_sink_without_this_databases_key_ring_stores_and_dead_letters_nothing(
        database: str, tmp_path: Path) -> None:
    other = Keyring(tmp_path / "ring", MASTER)

    async def run() -> None:
        # This database's ring is made first (as serve would at start).
        conn = await connect(database)
        try:
            await keyring_for(database).open(conn)
        finally:
            await conn.close()
        sink = TelemetrySink(database, other)
        try:
            await _write(sink, _rows(["lost?"], 5, "x"))
        finally:
            await sink.close()

    with pytest.raises(KeyringError, match="holds no key ring"):
        asyncio.run(run())
    assert asyncio.run(fetchval(database, "SELECT count(*) FROM telemetry")) == 0
    assert asyncio.run(fetchval(database, "SELECT count(*) FROM dead_letters")) == 0
    assert not (tmp_path / "ring").exists()


def test_keys_from_before_the_key_ring_open_until_compaction_rewraps_them(
        tmp_path: Path) -> None:
    """A database migrated before 010 whose keys are wrapped under the master key
    alone: migration 010 puts them in epoch 0, they keep opening, and the first
    compaction re-wraps them under an epoch with a file and retires epoch 0."""
    url = asyncio.run(create_database(migrate=False))

    async def before_and_after() -> tuple[Any, Any, list[int]]:
        conn = await connect(url)
        try:
            await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, "
                               "name text NOT NULL, applied_at timestamptz NOT NULL "
                               "DEFAULT now())")
            for m in available_migrations():
                if m.version < 10:
                    async with conn.transaction():
                        await conn.execute(m.sql)
                        await conn.execute("INSERT INTO schema_migrations (version, name) "
                                           "VALUES ($1, $2)", m.version, m.name)
            raw = AESGCM.generate_key(256)
            key_id = await conn.fetchval(
                "INSERT INTO keystore.device_keys (tenant_id, device_id, wrapped) "
                "VALUES ('acme', 'old', $1) RETURNING key_id",
                wrap_key(legacy_kek(MASTER), "acme", "old", raw))
            sealed = seal_value(AESGCM(raw), "acme", "old", "sim", "r1", 1_764_000_000_000,
                                {"iccid": "8931"})
            await apply_migrations(conn)  # 010 and later
            row = {"kind": "sim", "record_id": "r1", "ts": _ts(1_764_000_000_000),
                   "key_id": key_id, "sealed": sealed, "data": None}
            ring = keyring_for(url)
            legacy = (await DeviceReader.load(conn, ring, "acme", "old")).data(row)
            epochs = [r["epoch"] for r in await conn.fetch("SELECT epoch FROM keystore.epochs")]
            report = await ring.compact(conn)
            assert report.epochs_retired == [0] and report.keys_rewrapped == 1
            after = (await DeviceReader.load(conn, keyring_for(url), "acme", "old")).data(row)
            return legacy, after, epochs
        finally:
            await conn.close()

    try:
        legacy, after, epochs = asyncio.run(before_and_after())
    finally:
        asyncio.run(drop_database(url))
    assert epochs == [0]
    assert legacy == after == {"iccid": "8931"}


def test_serve_compacts_after_an_erasure_and_catches_up_after_a_crash(
        database: str, tmp_path: Path) -> None:
    """An erasure committed by a server that stopped before compacting is caught
    up by serve's first retention run; an admin's fulfil through the API retires
    the epoch before it answers."""
    ring = keyring_dir_for(database)
    with running_broker(tmp_path) as broker:
        asyncio.run(enroll(database, broker.url, "acme", ["e1", "e2", "keep"]))

        async def prepare() -> list[str]:
            sink = TelemetrySink(database, keyring_for(database))
            try:
                await _write(sink, _rows(["e1", "e2", "keep"], 3, "p"))
            finally:
                await sink.close()
            conn = await connect(database)
            try:
                ids = []
                for d in ("e1", "e2"):
                    async with conn.transaction():
                        ids.append((await erasure.request_erasure(
                            conn, tenant="acme", device=d, actor=f"user:{d}",
                            audit_keys=audit_keys_for_tests()))["id"])
                async with conn.transaction():  # fulfilled; the process "dies" here
                    await erasure.fulfil(conn, tenant="acme", request_id=uuid.UUID(ids[0]),
                                         actor="admin:ann", audit_keys=audit_keys_for_tests())
                return ids
            finally:
                await conn.close()

        ids = asyncio.run(prepare())
        assert _files(ring) == ["epoch-000001.key"]
        srv = Server(server_env(database, broker.url), tmp_path / "serve.log")
        srv.start()
        try:
            srv.wait_log("key ring caught up")
            assert _files(ring) == ["epoch-000002.key"]
            token = srv.cli("admin", "create", "--tenant", "acme", "--name", "ann").strip()
            status, body = srv.request("POST", f"/api/v1/erasure-requests/{ids[1]}:fulfil",
                                       token)
            assert status == 200 and body["state"] == "fulfilled", body
            assert _files(ring) == ["epoch-000003.key"]
            assert asyncio.run(_state(database))["epochs"] == [3]
            status, body = srv.request("GET", "/api/v1/devices/keep/data?kind=location",
                                       token)
            assert status == 200 and len(body["records"]) == 3
        finally:
            srv.stop()
    assert "Traceback" not in srv.log_text()
