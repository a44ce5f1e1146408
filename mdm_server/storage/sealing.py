"""Telemetry sealed at rest under a key per device, so that erasure can destroy it
(crypto-shredding).

Every telemetry record the ingest stores is sealed: its ``data`` (as the policy
left it) becomes ``sealed`` = version byte + 12-byte random nonce + AES-256-GCM
ciphertext, under the device's data key, with the row's identity (tenant, device,
kind, record id, event time) as associated data, so a sealed value cannot be
moved to another row. The device's data key is random, made when the device
first reports, and kept in ``keystore.device_keys`` wrapped under the KEK of a
key-ring epoch, derived from the master key AND a secret kept outside the
database (:mod:`mdm_server.storage.keyring`).

Erasing a device deletes its key row first, then its rows; compaction then
re-wraps the surviving keys under a new epoch and destroys the old epoch's
secret. Any copy of the erased rows or of the erased key that outlives the
erasure (a backup, a heap page not yet reused, WAL) is ciphertext under a key
whose wrapping key no longer exists anywhere.

A race with a running ingest is closed by a row lock: every write locks the keys
it sealed under (``FOR KEY SHARE``) before it stores anything, and erasure's
DELETE of a key waits for those writes to commit. A write that finds its key gone
raises :class:`KeysGone`; the sink forgets those keys and seals again under the
device's new key. Nothing accepted is lost, and nothing is stored under a key
that has been destroyed. Compaction's re-wrap does not change a key (nor its
``key_id``), so the ingest's cache stays valid through it.

Random 96-bit nonces keep AES-GCM safe up to 2**32 records per key: a device
reporting ten records a second reaches that in thirteen years.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mdm_server.storage.keyring import Fresh, Keyring, wrap_key

__all__ = [
    "DeviceReader",
    "IngestKeys",
    "KeysGone",
    "SealError",
    "destroy_device_keys",
    "load_readers",
    "open_value",
    "seal_value",
]

log = logging.getLogger(__name__)

_VERSION = b"\x01"
_NONCE = 12
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
# The ingest keeps this many devices' keys in memory; past it, it starts over.
_CACHE_MAX = 200_000

_FETCH = """SELECT key_id, tenant_id, device_id, epoch, wrapped FROM keystore.device_keys
            WHERE (tenant_id, device_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))"""
# $4: the epoch the keys are wrapped under (its row must still exist: foreign key).
_CREATE = """INSERT INTO keystore.device_keys (tenant_id, device_id, wrapped, epoch)
             SELECT t, d, w, $4 FROM unnest($1::text[], $2::text[], $3::bytea[]) AS x(t, d, w)
             ON CONFLICT (tenant_id, device_id) DO NOTHING"""
# Run first in every ingest write: locks the keys it sealed under, so that an
# erasure cannot destroy one until this write has committed; returns those still there.
LOCK_KEYS = """SELECT key_id FROM keystore.device_keys WHERE key_id = ANY($1::int8[])
               FOR KEY SHARE"""


class SealError(Exception):
    """A sealed value does not open: wrong key, or not the row it was sealed for."""


class KeysGone(Exception):
    """Keys a write sealed under were destroyed (the device was erased) meanwhile."""

    def __init__(self, key_ids: set[int]) -> None:
        super().__init__(f"{len(key_ids)} device data key(s) destroyed since sealing")
        self.key_ids = key_ids


def _aad(tenant: str, device: str, kind: str, record_id: str, ts_ms: int) -> bytes:
    return f"{tenant}\x1f{device}\x1f{kind}\x1f{record_id}\x1f{ts_ms}".encode()


def _seal(aead: AESGCM, nonce: bytes, data: Any, aad: bytes) -> bytes:
    return _VERSION + nonce + aead.encrypt(nonce, orjson.dumps(data), aad)


def seal_value(aead: AESGCM, tenant: str, device: str, kind: str, record_id: str,
               ts_ms: int, data: Any) -> bytes:
    """One record sealed (the ingest seals a batch with :meth:`IngestKeys.seal`)."""
    return _seal(aead, os.urandom(_NONCE), data, _aad(tenant, device, kind, record_id, ts_ms))


def open_value(aead: AESGCM, tenant: str, device: str, kind: str, record_id: str,
               ts_ms: int, sealed: bytes) -> Any:
    if sealed[:1] != _VERSION:
        raise SealError("unknown sealed format")
    try:
        plain = aead.decrypt(sealed[1:1 + _NONCE], sealed[1 + _NONCE:],
                             _aad(tenant, device, kind, record_id, ts_ms))
    except InvalidTag:
        raise SealError("a sealed record does not open under its device's key") from None
    return orjson.loads(plain)


def ts_ms(ts: datetime) -> int:
    """Event time as stored, back to the milliseconds it was sealed with."""
    return (ts - _EPOCH) // _MS


class IngestKeys:
    """The ingest's view of device data keys: cached, made on first use (wrapped
    under the key ring's current epoch)."""

    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring
        self._keys: dict[tuple[str, str], tuple[int, AESGCM]] = {}

    async def ensure(self, conn: asyncpg.Connection, devices: Iterable[tuple[str, str]]
                     ) -> None:
        """Have a key for each device, fetching or making the ones not cached.
        ``conn`` must not be in a transaction (keys it makes are committed at once)."""
        missing = [d for d in devices if d not in self._keys]
        if not missing:
            return
        if len(self._keys) + len(missing) > _CACHE_MAX:
            self._keys.clear()
        while missing:  # again only if a key was erased between its INSERT and fetch
            found = await self._fetch(conn, missing)
            new = [d for d in missing if d not in found]
            if new:
                # Two workers may make a key for the same device at once: the first
                # INSERT wins, and both read back the winner.
                await self._create(conn, new)
                found.update(await self._fetch(conn, new))
            self._keys.update(found)
            missing = [d for d in missing if d not in found]

    async def _create(self, conn: asyncpg.Connection, new: Sequence[tuple[str, str]]) -> None:
        while True:
            epoch, kek = await self._keyring.current(conn)
            wrapped = [wrap_key(kek, t, d, AESGCM.generate_key(256)) for t, d in new]
            try:
                await conn.execute(_CREATE, [t for t, _ in new], [d for _, d in new], wrapped,
                                   epoch)
                return
            except asyncpg.ForeignKeyViolationError:
                # A compaction retired the epoch after we read it as current:
                # nothing was stored; wrap under the one it made.
                log.info("key ring epoch %d retired meanwhile; wrapping new keys again", epoch)

    async def _fetch(self, conn: asyncpg.Connection, devices: Sequence[tuple[str, str]]
                     ) -> dict[tuple[str, str], tuple[int, AESGCM]]:
        rows = await conn.fetch(_FETCH, [t for t, _ in devices], [d for _, d in devices])
        raw = await self._keyring.unwrap(conn, rows)
        return {(r["tenant_id"], r["device_id"]): (r["key_id"], AESGCM(raw[r["key_id"]]))
                for r in rows if r["key_id"] in raw}

    def forget(self, key_ids: set[int]) -> None:
        """Drop keys that were destroyed; the next :meth:`ensure` makes new ones."""
        for dev in [d for d, (kid, _) in self._keys.items() if kid in key_ids]:
            del self._keys[dev]

    def seal(self, rows: Sequence[tuple[Any, ...]]) -> tuple[list[tuple[Any, ...]], list[int]]:
        """Rows (tenant, device, kind, record_id, ts_ms, policy_id, version, data) to
        (..., version, key_id, sealed), and the key ids used. Every device must have
        been :meth:`ensure`\\ d."""
        if not rows:
            return [], []
        keys = self._keys
        nonces = os.urandom(_NONCE * len(rows))  # one call for the batch
        out: list[tuple[Any, ...]] = []
        append = out.append
        last_dev = (rows[0][0], rows[0][1])
        key_id, aead = keys[last_dev]
        used = {key_id}
        for i, (t, d, k, rid, ts, pid, ver, data) in enumerate(rows):
            if (t, d) != last_dev:  # rows come grouped by device: look up on change
                last_dev = (t, d)
                key_id, aead = keys[last_dev]
                used.add(key_id)
            o = _NONCE * i
            append((t, d, k, rid, ts, pid, ver, key_id,
                    _seal(aead, nonces[o:o + _NONCE], data, _aad(t, d, k, rid, ts))))
        return out, sorted(used)


class DeviceReader:
    """Opens one device's stored records for reading (API pages, export)."""

    def __init__(self, tenant: str, device: str, keys: dict[int, AESGCM]) -> None:
        self.tenant, self.device = tenant, device
        self._keys = keys

    @classmethod
    async def load(cls, conn: asyncpg.Connection, keyring: Keyring, tenant: str,
                   device: str, *, fresh: Fresh | None = None) -> DeviceReader:
        """The device's keys as ``conn`` sees them. In a REPEATABLE READ transaction
        pass ``fresh`` (e.g. ``pool.acquire``): a key read in the snapshot may be
        wrapped under an epoch retired since, and is then read again outside it
        (its bytes and key_id do not change when it is re-wrapped)."""
        rows = await conn.fetch(
            "SELECT key_id, tenant_id, device_id, epoch, wrapped FROM keystore.device_keys "
            "WHERE tenant_id = $1 AND device_id = $2", tenant, device)
        raw = await keyring.unwrap(conn, rows, fresh)
        return cls(tenant, device, {k: AESGCM(v) for k, v in raw.items()})

    def data(self, r: asyncpg.Record | dict[str, Any]) -> Any:
        """The record's data as stored; None if its key was destroyed (an erasure
        running now: the row is about to go). Needs kind, record_id, ts, key_id,
        sealed and data."""
        sealed = r["sealed"]
        if sealed is None:
            return r["data"]  # stored before sealing existed (migration 008)
        aead = self._keys.get(r["key_id"])
        if aead is None:
            return None
        return open_value(aead, self.tenant, self.device, r["kind"], r["record_id"],
                          ts_ms(r["ts"]), sealed)


async def destroy_device_keys(conn: asyncpg.Connection, tenant: str, device: str) -> int:
    """Delete the device's data keys (waits for ingest writes that hold them), and
    mark the epochs they were wrapped under as owing a compaction; how many keys.
    Call before deleting the device's rows, in the same transaction; run
    :meth:`Keyring.compact` once it has committed."""
    n: int = await conn.fetchval(
        """WITH gone AS (
               DELETE FROM keystore.device_keys WHERE tenant_id = $1 AND device_id = $2
               RETURNING epoch),
           marked AS (
               UPDATE keystore.epochs SET shredded = true
               WHERE epoch IN (SELECT epoch FROM gone) RETURNING 1)
           SELECT count(*) FROM gone""", tenant, device)
    return n


async def load_readers(conn: asyncpg.Connection, keyring: Keyring, tenant: str,
                       devices: Sequence[str]) -> dict[str, DeviceReader]:
    """A reader for each of the tenant's ``devices``, with one keystore query (the
    live feed's last known positions of a fleet)."""
    rows = await conn.fetch(
        "SELECT key_id, tenant_id, device_id, epoch, wrapped FROM keystore.device_keys "
        "WHERE tenant_id = $1 AND device_id = ANY($2::text[])", tenant, list(devices))
    raw = await keyring.unwrap(conn, rows)
    keys: dict[str, dict[int, AESGCM]] = {d: {} for d in devices}
    for r in rows:
        if r["key_id"] in raw:
            keys[r["device_id"]][r["key_id"]] = AESGCM(raw[r["key_id"]])
    return {d: DeviceReader(tenant, d, k) for d, k in keys.items()}
