"""The server's Ed25519 command-signing keys.

The private key is stored encrypted with AES-256-GCM under a key derived from the
master key (HKDF-SHA256, info ``mdm signing key v1``); the 12-byte nonce is
prepended to the ciphertext and the key id is the associated data, so a
ciphertext cannot be moved to another key id. The master key never reaches the
database. Nothing here logs key material.
"""

from __future__ import annotations

import base64
import secrets
import time

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from mdm_server import audit

__all__ = [
    "KeyRing",
    "SigningKeyError",
    "public_keys",
    "reencrypt_signing_keys",
    "retire_key",
    "rotate_key",
    "signing_key",
]

_INFO = b"mdm signing key v1"
_NONCE_BYTES = 12
_LOCK = "mdm signing keys"


class SigningKeyError(Exception):
    """The signing key cannot be used (no master key, or the wrong one)."""


def _wrapping_key(master_key: bytes) -> AESGCM:
    if len(master_key) != 32:
        raise SigningKeyError("the master key must be 32 bytes")
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(master_key)
    return AESGCM(derived)


def encrypt_private_key(key: Ed25519PrivateKey, key_id: str, master_key: bytes) -> bytes:
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    nonce = secrets.token_bytes(_NONCE_BYTES)
    return nonce + _wrapping_key(master_key).encrypt(nonce, raw, key_id.encode())


def decrypt_private_key(blob: bytes, key_id: str, master_key: bytes) -> Ed25519PrivateKey:
    aead = _wrapping_key(master_key)
    try:
        raw = aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], key_id.encode())
    except InvalidTag:
        raise SigningKeyError(
            f"signing key {key_id} does not decrypt: MDM_MASTER_KEY is not the key "
            "it was stored under") from None
    return Ed25519PrivateKey.from_private_bytes(raw)


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


async def _newest(conn: asyncpg.Connection) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT key_id, private_key_enc FROM signing_keys WHERE retired_at IS NULL "
        "ORDER BY created_at DESC, key_id DESC LIMIT 1")


async def _create(conn: asyncpg.Connection, master_key: bytes) -> tuple[str, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    key_id = time.strftime("server-%Y%m%d-", time.gmtime()) + secrets.token_hex(4)
    await conn.execute(
        "INSERT INTO signing_keys (key_id, public_key, private_key_enc) VALUES ($1, $2, $3)",
        key_id, _raw_public(key), encrypt_private_key(key, key_id, master_key))
    return key_id, key


async def signing_key(conn: asyncpg.Connection, master_key: bytes | None
                      ) -> tuple[str, Ed25519PrivateKey]:
    """The newest unretired key (key id, private key); created on first use.

    Race-safe: creators serialise on an advisory lock and look again under it.
    """
    if master_key is None:
        raise SigningKeyError("MDM_MASTER_KEY or MDM_MASTER_KEY_FILE is not set: "
                              "command signing keys are stored encrypted under it")
    row = await _newest(conn)
    if row is None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", _LOCK)
            row = await _newest(conn)
            if row is None:
                return await _create(conn, master_key)
    return row["key_id"], decrypt_private_key(row["private_key_enc"], row["key_id"],
                                              master_key)


async def public_keys(conn: asyncpg.Connection) -> dict[str, str]:
    """key id -> standard base64 of the raw 32-byte public key, for every unretired key."""
    rows = await conn.fetch(
        "SELECT key_id, public_key FROM signing_keys WHERE retired_at IS NULL "
        "ORDER BY created_at, key_id")
    return {r["key_id"]: base64.b64encode(r["public_key"]).decode("ascii") for r in rows}


async def rotate_key(conn: asyncpg.Connection, master_key: bytes, *, actor: str,
                     ttl_s: int = 30 * 86_400) -> tuple[str, int]:
    """Create a new signing key and queue ``trust_key`` for every enrolled device.

    Each ``trust_key`` is signed with a key the device already trusts (the
    dispatcher picks it), so devices keep working under the old key until they
    have confirmed the new one; from then on their commands are signed with the
    new key. Returns (new key id, devices told). Call inside a transaction.
    """
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", _LOCK)
    key_id, key = await _create(conn, master_key)
    params = {"key_id": key_id,
              "public_key": base64.b64encode(_raw_public(key)).decode("ascii")}
    told: int = await conn.fetchval(
        """WITH ins AS (
               INSERT INTO commands (tenant_id, device_id, type, params, state, reason,
                                     requested_by, expires_at)
               SELECT tenant_id, device_id, 'trust_key', $1::jsonb, 'queued',
                      'signing key rotation', $2::text, now() + make_interval(secs => $3)
               FROM devices WHERE status = 'enrolled' AND agent = 'native'
               RETURNING 1)
           SELECT count(*) FROM ins""", params, actor, float(ttl_s))
    await audit.append(conn, audit.AuditKeys.derive(master_key), tenant=None, actor=actor,
                       action="signing_key.rotate",
                       target=f"signing_key:{key_id}", details={"devices": told})
    await conn.execute("SELECT pg_notify('mdm_commands', 'rotate')")
    return key_id, told


async def retire_key(conn: asyncpg.Connection, key_id: str, *, actor: str,
                     audit_keys: audit.AuditKeys, force: bool = False,
                     ttl_s: int = 30 * 86_400) -> tuple[int, int]:
    """Stop signing with ``key_id``, delete its private half, and queue a signed
    ``distrust_key`` for every enrolled device that trusts it (the agent drops the
    key; the server removes it from the device's trusted keys when the device
    confirms). Refused (SigningKeyError) while an enrolled device trusts no other
    unretired key, unless ``force``: those devices then verify nothing until
    re-enrolled, and their agents refuse to drop their last key. Returns (devices
    stranded, devices told). Call inside a transaction."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", _LOCK)
    row = await conn.fetchrow(
        "SELECT retired_at FROM signing_keys WHERE key_id = $1 FOR UPDATE", key_id)
    if row is None:
        raise SigningKeyError("no such signing key")
    if row["retired_at"] is not None:
        raise SigningKeyError("the key is retired already")
    stranded: int = await conn.fetchval(
        """SELECT count(*) FROM devices d
           WHERE d.status = 'enrolled' AND d.agent = 'native' AND NOT EXISTS (
               SELECT 1 FROM signing_keys k
               WHERE k.key_id = ANY(d.trusted_key_ids) AND k.key_id <> $1
                 AND k.retired_at IS NULL)""", key_id)
    if stranded and not force:
        raise SigningKeyError(
            f"{stranded} enrolled device(s) have not confirmed a newer key yet: retiring "
            "this one would leave them unable to verify commands (use --force to do it "
            "anyway)")
    # The private half goes with the retirement: the check in migration 015 allows
    # a NULL only for a retired key.
    await conn.execute("UPDATE signing_keys SET retired_at = now(), private_key_enc = NULL "
                       "WHERE key_id = $1", key_id)
    told: int = await conn.fetchval(
        """WITH ins AS (
               INSERT INTO commands (tenant_id, device_id, type, params, state, reason,
                                     requested_by, expires_at)
               SELECT tenant_id, device_id, 'distrust_key', $1::jsonb, 'queued',
                      'signing key retired', $2::text, now() + make_interval(secs => $3)
               FROM devices WHERE status = 'enrolled' AND agent = 'native'
                 AND $4 = ANY(trusted_key_ids)
               RETURNING 1)
           SELECT count(*) FROM ins""", {"key_id": key_id}, actor, float(ttl_s), key_id)
    await audit.append(conn, audit_keys, tenant=None, actor=actor, action="signing_key.retire",
                       target=f"signing_key:{key_id}",
                       details={"stranded": stranded, "devices": told})
    await conn.execute("SELECT pg_notify('mdm_commands', 'retire')")
    return stranded, told


async def reencrypt_signing_keys(conn: asyncpg.Connection, old_master: bytes,
                                 new_master: bytes) -> int:
    """Master-key rotation: every private key still held, decrypted under the old
    master key and encrypted under the new one (same key id, same key). Call inside
    the rotation's transaction. Returns how many."""
    rows = await conn.fetch("SELECT key_id, private_key_enc FROM signing_keys "
                            "WHERE private_key_enc IS NOT NULL FOR UPDATE")
    for r in rows:
        key = decrypt_private_key(r["private_key_enc"], r["key_id"], old_master)
        await conn.execute("UPDATE signing_keys SET private_key_enc = $2 WHERE key_id = $1",
                           r["key_id"], encrypt_private_key(key, r["key_id"], new_master))
    return len(rows)


class KeyRing:
    """The unretired private keys, decrypted once each; picks a device's key."""

    def __init__(self, master_key: bytes | None) -> None:
        self._master_key = master_key
        self._keys: dict[str, Ed25519PrivateKey] = {}
        self._order: list[str] = []  # newest first

    async def refresh(self, conn: asyncpg.Connection) -> None:
        if self._master_key is None:
            raise SigningKeyError("MDM_MASTER_KEY or MDM_MASTER_KEY_FILE is not set: "
                                  "commands cannot be signed")
        if not self._order:
            await signing_key(conn, self._master_key)  # the first key, if none yet
        rows = await conn.fetch(
            "SELECT key_id, private_key_enc FROM signing_keys WHERE retired_at IS NULL "
            "ORDER BY created_at DESC, key_id DESC")
        for r in rows:
            if r["key_id"] not in self._keys:
                self._keys[r["key_id"]] = decrypt_private_key(
                    r["private_key_enc"], r["key_id"], self._master_key)
        self._order = [r["key_id"] for r in rows]
        for gone in set(self._keys) - set(self._order):  # retired: not even in memory
            del self._keys[gone]

    def for_device(self, trusted: list[str] | None) -> tuple[str, Ed25519PrivateKey] | None:
        """The newest unretired key among ``trusted`` (None: trusts none of them)."""
        if not trusted:
            return None
        for key_id in self._order:
            if key_id in trusted:
                return key_id, self._keys[key_id]
        return None
