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

__all__ = ["SigningKeyError", "public_keys", "signing_key"]

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
                key = Ed25519PrivateKey.generate()
                key_id = time.strftime("server-%Y%m%d-", time.gmtime()) + secrets.token_hex(4)
                await conn.execute(
                    "INSERT INTO signing_keys (key_id, public_key, private_key_enc) "
                    "VALUES ($1, $2, $3)",
                    key_id, _raw_public(key), encrypt_private_key(key, key_id, master_key))
                return key_id, key
    return row["key_id"], decrypt_private_key(row["private_key_enc"], row["key_id"],
                                              master_key)


async def public_keys(conn: asyncpg.Connection) -> dict[str, str]:
    """key id -> standard base64 of the raw 32-byte public key, for every unretired key."""
    rows = await conn.fetch(
        "SELECT key_id, public_key FROM signing_keys WHERE retired_at IS NULL "
        "ORDER BY created_at, key_id")
    return {r["key_id"]: base64.b64encode(r["public_key"]).decode("ascii") for r in rows}
