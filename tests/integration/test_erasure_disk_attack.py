"""The auditor's attack on erasure, run for real: after a device's erasure, read
every file of the PostgreSQL data directory (heap files and pg_wal) and try to
open the erased device's records with the master key and the key ring as it is
now.

PostgreSQL keeps what it deleted (a deleted tuple stays in its page, VACUUM does
not zero it, the WAL holds every version written), so the erased device's
wrapped key and its sealed records ARE on disk afterwards; the test shows that
first. What makes them useless is the key ring: the epoch the key was wrapped
under is retired (its file destroyed) by the compaction that follows the erasure.
A generic scan of the disk for wrapped keys recovers the surviving device's key
and opens its records (so the scan works), and recovers nothing of the erased
device's. Without the compaction the same scan opens the erased records: the
test can fail.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mdm_server.ingest.batch import WriteSet
from mdm_server.ingest.mqtt import InboundMessage
from mdm_server.ingest.sink import TelemetrySink
from mdm_server.storage import erasure
from mdm_server.storage.keyring import epoch_kek, legacy_kek, unwrap_key
from mdm_server.storage.pool import connect
from mdm_server.storage.sealing import SealError, open_value, ts_ms
from tests.support.services import (
    TEST_MASTER_KEY,
    PrivatePostgres,
    audit_keys_for_tests,
    enroll,
    keyring_dir_for,
    keyring_for,
    private_postgres,
)

pytestmark = pytest.mark.integration

MASTER = base64.b64decode(TEST_MASTER_KEY)
IMEI = "356938035643809"
PHONE = "+31612345678"
GONE, STAYS = "gone", "stays"
# A 60-byte bytea (12-byte nonce + 32-byte key + 16-byte tag) in a heap tuple
# has PostgreSQL's 1-byte varlena header: (1 + 60) << 1 | 1. Full-page images
# and insert/update records in the WAL carry the tuple as stored, header included.
WRAPPED_HEADER = 0x7B
WRAPPED_LEN = 60


@dataclass
class Record:
    kind: str
    record_id: str
    ts_ms: int
    sealed: bytes


@dataclass
class Captured:
    """Privileged state read from the database before the erasure."""

    wrapped: dict[str, bytes] = field(default_factory=dict)  # device -> its wrapped key
    records: dict[str, list[Record]] = field(default_factory=dict)


async def _ingest(database: str) -> None:
    """Telemetry for both devices, through the ingest's own sink (sealing, keys
    made on first use under the key ring's current epoch)."""
    now = int(time.time() * 1000)
    rows: list[tuple[Any, ...]] = []
    for device in (GONE, STAYS):
        rows.append(("acme", device, "identity", f"{device}-id", now, "default", 1,
                     {"imei": IMEI, "phone_number": PHONE, "model": "Pixel 8"}))
        rows += [("acme", device, "location", f"{device}-loc-{i}", now - i * 1000, "default",
                  1, {"lat": 52.0 + i / 1000, "lon": 4.4, "accuracy_m": 5})
                 for i in range(20)]
    msgs = [InboundMessage(i, 1, "t", b"{}") for i in range(len(rows))]
    sink = TelemetrySink(database, keyring_for(database))
    try:
        result = await sink.write(WriteSet(msgs, rows=rows, row_msgs=list(range(len(rows)))))
    finally:
        await sink.close()
    assert result.inserted == len(rows)


async def _capture(database: str) -> Captured:
    conn = await connect(database)
    try:
        out = Captured()
        for r in await conn.fetch("SELECT device_id, wrapped FROM keystore.device_keys"):
            out.wrapped[r["device_id"]] = bytes(r["wrapped"])
        for device in (GONE, STAYS):
            out.records[device] = [
                Record(r["kind"], r["record_id"], ts_ms(r["ts"]), bytes(r["sealed"]))
                for r in await conn.fetch(
                    "SELECT kind, record_id, ts, sealed FROM telemetry WHERE device_id = $1",
                    device)]
        return out
    finally:
        await conn.close()


async def _erase(database: str, *, compact: bool) -> None:
    """An erasure as the server fulfils it (the admin's fulfil through the API:
    the erasure's transaction, then the compaction); ``compact=False`` is a server
    that stopped between the two."""
    conn = await connect(database)
    try:
        async with conn.transaction():
            req = await erasure.request_erasure(conn, tenant="acme", device=GONE,
                                                actor=f"user:{GONE}",
                                                audit_keys=audit_keys_for_tests())
            await erasure.fulfil(conn, tenant="acme", request_id=uuid.UUID(req["id"]),
                                 actor="admin:ann", audit_keys=audit_keys_for_tests())
        if compact:
            await erasure.shred(conn, keyring_for(database))
        else:
            await erasure.vacuum_keystore(conn)  # what erasure did before the key ring
    finally:
        await conn.close()


async def _checkpoint(pg: PrivatePostgres) -> None:
    conn = await connect(pg.admin_url)
    try:
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


def _disk(pg: PrivatePostgres) -> Iterator[tuple[Path, bytes]]:
    """Every file of the cluster's data directory, heap files and pg_wal included."""
    for root, _, files in os.walk(pg.root / "data"):
        for name in files:
            path = Path(root) / name
            yield path, path.read_bytes()


def _keks(ring: Path) -> dict[int, AESGCM]:
    """Every KEK the attacker can derive: the master key with each epoch file in
    the key ring as it is now, and the master key alone (epoch 0)."""
    keks = {0: legacy_kek(MASTER)}
    for f in ring.glob("epoch-*.key"):
        epoch = int(f.name[6:12])
        keks[epoch] = epoch_kek(MASTER, epoch, f.read_bytes())
    return keks


@dataclass
class Scan:
    files: int = 0
    bytes: int = 0
    candidates: int = 0
    recovered: dict[str, set[bytes]] = field(default_factory=dict)  # device -> data keys
    found: dict[bytes, list[str]] = field(default_factory=dict)  # needle -> files


def _scan(pg: PrivatePostgres, ring: Path, needles: list[bytes]) -> Scan:
    """The attack, without prior knowledge of the keys: every 60-byte value behind
    a 0x7B header anywhere on disk is tried as a wrapped key of either device
    under every KEK derivable now. Also records where the ``needles`` (bytes
    captured before the erasure) are found."""
    keks = _keks(ring)
    scan = Scan(recovered={GONE: set(), STAYS: set()})
    candidates: set[bytes] = set()
    for path, data in _disk(pg):
        scan.files += 1
        scan.bytes += len(data)
        i = data.find(WRAPPED_HEADER)
        while i != -1:
            c = data[i + 1:i + 1 + WRAPPED_LEN]
            if len(c) == WRAPPED_LEN:
                candidates.add(c)
            i = data.find(WRAPPED_HEADER, i + 1)
        for n in needles:
            if n in data:
                scan.found.setdefault(n, []).append(str(path.relative_to(pg.root / "data")))
    scan.candidates = len(candidates)
    for c in candidates:
        for kek in keks.values():
            for device in (GONE, STAYS):
                try:
                    scan.recovered[device].add(unwrap_key(kek, "acme", device, c))
                except InvalidTag:
                    pass
    return scan


def _opened(keys: set[bytes], device: str, records: list[Record]) -> list[Any]:
    """Records of ``device`` that open under any of ``keys``."""
    out = []
    for rec in records:
        for key in keys:
            try:
                out.append(open_value(AESGCM(key), "acme", device, rec.kind, rec.record_id,
                                      rec.ts_ms, rec.sealed))
                break
            except SealError:
                pass
    return out


def _setup(pg: PrivatePostgres) -> tuple[str, Captured]:
    database = asyncio.run(pg.create_database())
    asyncio.run(enroll(database, "mqtt://127.0.0.1:1883", "acme", [GONE, STAYS]))
    asyncio.run(_ingest(database))
    captured = asyncio.run(_capture(database))
    assert set(captured.wrapped) == {GONE, STAYS}
    assert [len(captured.records[d]) for d in (GONE, STAYS)] == [21, 21]
    return database, captured


def _needles(captured: Captured, device: str) -> list[bytes]:
    return [captured.wrapped[device], *[r.sealed for r in captured.records[device]]]


def test_after_an_erasure_and_its_compaction_the_disk_opens_nothing_of_the_erased_device(
        ) -> None:
    started = time.monotonic()
    with private_postgres() as pg:
        database, captured = _setup(pg)
        ring = keyring_dir_for(database)
        epochs_before = sorted(ring.glob("epoch-*.key"))
        asyncio.run(_erase(database, compact=True))
        asyncio.run(_checkpoint(pg))
        pg.stop()  # every page and WAL record on disk, as a copy of the disk would be

        # The retired epoch's file is gone from the key ring; a new one is current.
        epochs_after = sorted(ring.glob("epoch-*.key"))
        assert len(epochs_before) == len(epochs_after) == 1
        assert epochs_before != epochs_after

        scan = _scan(pg, ring, _needles(captured, GONE) + _needles(captured, STAYS))

    # (a) The attack is real: the erased device's wrapped key and its sealed
    # records are still physically on disk (heap pages, WAL) after the erasure.
    assert captured.wrapped[GONE] in scan.found, "the erased key left no residue to attack"
    gone_on_disk = [r for r in captured.records[GONE] if r.sealed in scan.found]
    assert len(gone_on_disk) == 21, "the erased records left no residue to attack"
    assert any(f.startswith("pg_wal/") for f in scan.found[captured.wrapped[GONE]])

    # (b) With the master key and the key ring as it is now, the erased device's
    # key as it was stored does not unwrap, under any epoch's KEK...
    for kek in _keks(ring).values():
        with pytest.raises(InvalidTag):
            unwrap_key(kek, "acme", GONE, captured.wrapped[GONE])

    # (c) ... and a scan of every file for wrapped keys recovers none of the erased
    # device's, so none of its records on disk opens; the same scan recovers the
    # surviving device's key and opens every one of its records.
    # It read the whole cluster (catalogs, heap files, a 16 MB WAL segment).
    assert scan.files > 500 and scan.bytes > 30e6 and scan.candidates > 1000, scan
    assert scan.recovered[GONE] == set()
    all_keys = scan.recovered[GONE] | scan.recovered[STAYS]
    assert _opened(all_keys, GONE, gone_on_disk) == []
    assert len(scan.recovered[STAYS]) == 1
    stays_on_disk = [r for r in captured.records[STAYS] if r.sealed in scan.found]
    assert len(stays_on_disk) == 21
    opened = _opened(scan.recovered[STAYS], STAYS, stays_on_disk)
    assert len(opened) == 21 and {"imei": IMEI, "phone_number": PHONE,
                                  "model": "Pixel 8"} in opened
    print(f"\nscanned {scan.files} files, {scan.bytes / 1e6:.0f} MB, {scan.candidates} "
          f"candidate keys in {time.monotonic() - started:.1f} s")


def test_without_the_compaction_the_same_attack_opens_the_erased_records_until_catch_up(
        ) -> None:
    """A server that stopped between the erasure and its compaction: the retired
    epoch's file is still there, and the attack works (the test above can fail).
    The catch-up serve runs on its retention schedule ends it."""
    with private_postgres() as pg:
        database, captured = _setup(pg)
        ring = keyring_dir_for(database)
        asyncio.run(_erase(database, compact=False))
        asyncio.run(_checkpoint(pg))
        pg.stop()
        scan = _scan(pg, ring, _needles(captured, GONE))
        assert captured.wrapped[GONE] in scan.found
        assert scan.recovered[GONE] != set()
        gone_on_disk = [r for r in captured.records[GONE] if r.sealed in scan.found]
        opened = _opened(scan.recovered[GONE], GONE, gone_on_disk)
        assert len(opened) == len(gone_on_disk) == 21
        assert {"imei": IMEI, "phone_number": PHONE, "model": "Pixel 8"} in opened

        # serve's catch-up: the erasure marked the epoch; the retention run compacts.
        pg.start()

        async def catch_up() -> dict[str, Any]:
            conn = await connect(database)
            try:
                return (await keyring_for(database).compact(conn, only_if_due=True)).to_json()
            finally:
                await conn.close()

        done = asyncio.run(catch_up())
        assert done["epochs_retired"] and done["keys_rewrapped"] == 1
        asyncio.run(_checkpoint(pg))
        pg.stop()
        scan = _scan(pg, ring, _needles(captured, GONE))
    assert captured.wrapped[GONE] in scan.found
    assert scan.recovered[GONE] == set()
    assert len(scan.recovered[STAYS]) == 1
