"""Crypto-shredding: telemetry is sealed under a key per device, and erasure
destroys the key first, then retires the key-ring epoch it was wrapped under. A
backup taken before the erasure, restored afterwards, holds the erased device's
records as ciphertext nobody can open with the live keystore and key ring (nor
with the backup's own keystore); the other devices' records still open. An
erasure in the middle of a stream loses nothing and leaves nothing under a
destroyed key."""

from __future__ import annotations

import asyncio
import base64
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_protocol import Record, encode_telemetry, telemetry_topic
from mdm_server.storage import erasure
from mdm_server.storage.keyring import Keyring, KeyringError
from mdm_server.storage.pool import connect
from mdm_server.storage.sealing import DeviceReader, SealError
from tests.support.mqtt import publish_as_devices
from tests.support.services import (
    TEST_MASTER_KEY,
    IngestProcess,
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
    stored_id,
    wait_for_count,
)

pytestmark = pytest.mark.integration

MASTER = base64.b64decode(TEST_MASTER_KEY)
IMEI = "356938035643809"
PHONE = "+31612345678"


class Env:
    def __init__(self, database: str, port: int, ingest: IngestProcess) -> None:
        self.database, self.port, self.ingest = database, port, ingest


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("shred")
    database = asyncio.run(create_database())
    with running_broker(tmp) as broker:
        asyncio.run(enroll(database, broker.url, "acme", ["gone", "stays", "busy"]))
        ingest = IngestProcess(server_env(database, broker.url), tmp / "ingest.log")
        ingest.start()
        ingest.wait_ready()
        try:
            yield Env(database, broker.port, ingest)
        finally:
            ingest.stop()
    asyncio.run(drop_database(database))


def _identity(device: str, rid: str) -> tuple[str, bytes]:
    rec = Record(rid, int(time.time() * 1000),
                 {"imei": IMEI, "phone_number": PHONE, "model": "Pixel 8"})
    return (telemetry_topic("acme", device, "identity"),
            encode_telemetry([rec], device=device, kind="identity"))


def _location(device: str, rid: str, lat: float) -> tuple[str, bytes]:
    rec = Record(rid, int(time.time() * 1000), {"lat": lat, "lon": 4.4, "accuracy_m": 5})
    return (telemetry_topic("acme", device, "location"),
            encode_telemetry([rec], device=device, kind="location"))


def _count(env: Env, device: str) -> int:
    return int(asyncio.run(fetchval(  # type: ignore[arg-type]
        env.database, "SELECT count(*) FROM telemetry WHERE device_id = $1", device)))


async def _erase(database: str, device: str) -> dict[str, int]:
    conn = await connect(database)
    try:
        async with conn.transaction():
            req = await erasure.request_erasure(conn, tenant="acme", device=device,
                                                actor=f"user:{device}",
                                                audit_keys=audit_keys_for_tests())
            done = await erasure.fulfil(conn, tenant="acme", request_id=uuid.UUID(req["id"]),
                                        actor="admin:ann", audit_keys=audit_keys_for_tests())
        await erasure.shred(conn, keyring_for(database))
        erased: dict[str, int] = done["erased"]
        return erased
    finally:
        await conn.close()


def _backup(database: str, path: Path, ring: Path) -> None:
    """A backup as README "Erasure and backups" says to take it: the database whole
    (keystore included), and the key ring apart, right after."""
    subprocess.run(["pg_dump", "--no-owner", "--no-privileges", "-f", str(path), database],
                   check=True)
    shutil.copytree(keyring_dir_for(database), ring)


async def _restore(path: Path) -> str:
    url = await create_database("mdm_restored", migrate=False)
    subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(path), url],
                   check=True, capture_output=True)
    return url


async def _open_restored(restored: str, live: str, device: str) -> tuple[int, int, str]:
    """Open the restored backup's records of ``device`` with the keys the live
    keystore holds now: (how many opened, how many there are, their data)."""
    backup, keystore = await connect(restored), await connect(live)
    try:
        rows = await backup.fetch(
            "SELECT kind, record_id, ts, key_id, sealed, data FROM telemetry "
            "WHERE tenant_id = 'acme' AND device_id = $1", device)
        reader = await DeviceReader.load(keystore, keyring_for(live), "acme", device)
        opened = []
        for r in rows:
            try:
                data = reader.data(r)
            except SealError:
                data = None
            if data is not None:
                opened.append(data)
        return len(opened), len(rows), repr(opened)
    finally:
        await backup.close()
        await keystore.close()


async def _open_with_own_keystore(restored: str, ring: Path, device: str
                                  ) -> tuple[int, int, str]:
    """Open the restored backup's records of ``device`` with the backup's own
    keystore and the key ring in ``ring``."""
    conn = await connect(restored)
    try:
        rows = await conn.fetch(
            "SELECT kind, record_id, ts, key_id, sealed, data FROM telemetry "
            "WHERE tenant_id = 'acme' AND device_id = $1", device)
        reader = await DeviceReader.load(conn, Keyring(ring, MASTER), "acme", device)
        opened = [d for d in map(reader.data, rows) if d is not None]
        return len(opened), len(rows), repr(opened)
    finally:
        await conn.close()


def test_a_backup_taken_before_an_erasure_cannot_be_read_after_it(
        env: Env, tmp_path: Path) -> None:
    msgs = [_identity(d, f"{d}-id") for d in ("gone", "stays")]
    msgs += [_location(d, f"{d}-loc-{i}", 52.0 + i / 1000) for d in ("gone", "stays")
             for i in range(20)]
    publish_as_devices(env.port, msgs)
    wait_for_count(env.database, "SELECT count(*) FROM telemetry "
                   "WHERE device_id IN ('gone', 'stays')", len(msgs), timeout=30,
                   proc=env.ingest)
    backup, ring_backup = tmp_path / "backup.sql", tmp_path / "keyring-backup"
    _backup(env.database, backup, ring_backup)
    text = backup.read_text()
    assert IMEI not in text and PHONE not in text, "records are not sealed at rest"

    # Before the erasure the backup opens with the live keystore: the check below
    # can fail.
    restored = asyncio.run(_restore(backup))
    try:
        opened, total, data = asyncio.run(_open_restored(restored, env.database, "gone"))
        assert (opened, total) == (21, 21)
        assert IMEI in data

        erased = asyncio.run(_erase(env.database, "gone"))
        assert erased["data_keys_destroyed"] == 1
        assert erased["telemetry"] == 21

        opened, total, _ = asyncio.run(_open_restored(restored, env.database, "gone"))
        assert (opened, total) == (0, 21), "an erased device's backed-up records still open"
        opened, total, data = asyncio.run(_open_restored(restored, env.database, "stays"))
        assert (opened, total) == (21, 21)
        assert IMEI in data
        # The backup's own keystore holds the erased key, wrapped under an epoch the
        # live key ring no longer has: it opens nothing (and says why)...
        live_ring = keyring_dir_for(env.database)
        with pytest.raises(KeyringError, match=r"has no epoch-000001\.key"):
            asyncio.run(_open_with_own_keystore(restored, live_ring, "gone"))
        # ... while the key-ring backup taken with it still does: why key-ring
        # backups must not be kept longer than 30 days.
        opened, total, data = asyncio.run(_open_with_own_keystore(restored, ring_backup,
                                                                  "gone"))
        assert (opened, total) == (21, 21) and IMEI in data
    finally:
        asyncio.run(drop_database(restored))

    # The live database keeps no key for the erased device, and none of its values.
    assert asyncio.run(fetchval(env.database, "SELECT count(*) FROM keystore.device_keys "
                                "WHERE device_id = 'gone'")) == 0
    assert _count(env, "gone") == 0
    # What the device sends after its erasure is stored under a new key (the
    # ingest still had the old one cached) and reads back.
    publish_as_devices(env.port, [_identity("gone", "gone-after")])
    wait_for_count(env.database, "SELECT count(*) FROM telemetry WHERE device_id = 'gone'",
                   1, timeout=30, proc=env.ingest)
    (row,) = asyncio.run(fetch_telemetry(env.database, "device_id = 'gone'"))
    assert row["record_id"] == stored_id("acme", "gone", "gone-after")
    assert row["data"]["imei"] == IMEI
    assert "sealing again" in env.ingest.log_text()


def test_an_erasure_in_the_middle_of_a_stream_loses_nothing_and_shreds_what_it_erased(
        env: Env) -> None:
    chunks, per_chunk = 30, 100
    done = threading.Event()

    def stream() -> None:
        try:
            for c in range(chunks):
                publish_as_devices(env.port, [_location("busy", f"b-{c}-{i}", 50 + i / 1e4)
                                              for i in range(per_chunk)])
                time.sleep(0.05)
        finally:
            done.set()

    publisher = threading.Thread(target=stream, daemon=True)
    publisher.start()
    wait_for_count(env.database, "SELECT count(*) FROM telemetry WHERE device_id = 'busy'",
                   per_chunk * 5, timeout=60, proc=env.ingest)
    erased = asyncio.run(_erase(env.database, "busy"))
    during = done.is_set()
    publisher.join(timeout=300)
    assert done.is_set()
    assert not during, "the stream ended before the erasure: nothing was tested"
    assert erased["data_keys_destroyed"] == 1 and erased["telemetry"] > 0

    # Every message is either erased or stored after the erasure: none lost...
    left = chunks * per_chunk - erased["telemetry"]
    assert wait_for_count(env.database, "SELECT count(*) FROM telemetry "
                          "WHERE device_id = 'busy'", left, timeout=60, settle=1.0,
                          proc=env.ingest) == left
    # ... and everything stored after it opens: nothing went in under the key
    # the erasure destroyed.
    rows = asyncio.run(fetch_telemetry(env.database, "device_id = 'busy'"))
    assert len(rows) == left
    assert all(r["data"] is not None and "lat" in r["data"] for r in rows)
    assert len({r["key_id"] for r in rows}) == 1


def test_a_wrong_master_key_stops_the_write_and_dead_letters_nothing(env: Env) -> None:
    from mdm_server.ingest.batch import WriteSet
    from mdm_server.ingest.mqtt import InboundMessage
    from mdm_server.ingest.sink import TelemetrySink
    from mdm_server.storage.keyring import Keyring, MasterKeyMismatch

    # "stays" has a key wrapped under the right master key once it has reported;
    # a sink with another master key cannot open it.
    publish_as_devices(env.port, [_identity("stays", "stays-key")])
    wait_for_count(env.database, "SELECT count(*) FROM telemetry WHERE record_id = "
                   f"'{stored_id('acme', 'stays', 'stays-key')}'", 1, timeout=30,
                   proc=env.ingest)
    assert asyncio.run(fetchval(env.database, "SELECT count(*) FROM keystore.device_keys "
                                "WHERE device_id = 'stays'")) == 1
    dead_before = asyncio.run(fetchval(env.database, "SELECT count(*) FROM dead_letters"))
    msg = InboundMessage(1, 1, telemetry_topic("acme", "stays", "location"), b"{}")
    ws = WriteSet([msg], rows=[("acme", "stays", "location", "wrong-key", 1_764_000_000_000,
                                "default", 1, {"lat": 1.0, "lon": 2.0})], row_msgs=[0])

    async def write() -> None:
        sink = TelemetrySink(env.database, Keyring(keyring_dir_for(env.database), b"w" * 32))
        try:
            await sink.write(ws)
        finally:
            await sink.close()

    with pytest.raises(MasterKeyMismatch, match="MDM_MASTER_KEY"):
        asyncio.run(write())
    assert asyncio.run(fetchval(env.database, "SELECT count(*) FROM dead_letters")) == \
        dead_before
    assert asyncio.run(fetchval(env.database, "SELECT count(*) FROM telemetry "
                                "WHERE record_id = 'wrong-key'")) == 0
