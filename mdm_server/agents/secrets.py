"""Agent secrets: made at enrollment, kept sealed, opened only by the server.

- OwnTracks: the passphrase the app encrypts its payloads with (libsodium
  secretbox; agent_protocol.owntracks), 32 URL-safe characters (192 bits: the
  app's key is the passphrase zero-padded or truncated to 32 bytes);
- OsmAnd / Traccar Client: the key in the URL the app posts to, 43 URL-safe
  characters (256 bits). The database finds the device by a keyed digest of it
  (``devices.http_key_digest``), never by the key.

Sealed as the command-signing keys are (mdm_server/commands/keys.py): AES-256-GCM
under a key derived from the master key (HKDF-SHA256, its own label), a random
96-bit nonce, the tenant, device and agent as associated data (a sealed secret
copied onto another device's row does not open). ``keys rotate-master`` opens
each under the old key and seals it under the new one, and recomputes the URL
key digests (:func:`rewrap_agent_secrets`). The tenant's admins cannot read a
secret through any API; it is shown once, by ``device enroll``/``reenroll``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets as _random

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "AgentSecretError",
    "new_secret",
    "open_secret",
    "rewrap_agent_secrets",
    "seal_secret",
    "url_key_digest",
]

_SEAL_INFO = b"mdm agent secret v1"
_DIGEST_INFO = b"mdm agent url key digest v1"
_NONCE = 12


class AgentSecretError(Exception):
    """A sealed secret does not open under this master key (message: no secret)."""


def _derive(master_key: bytes, info: bytes) -> bytes:
    if len(master_key) != 32:
        raise ValueError("the master key must be 32 bytes")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master_key)


def _aad(tenant: str, device: str, agent: str) -> bytes:
    return f"{tenant}\0{device}\0{agent}".encode()


def new_secret(agent: str) -> str:
    """A fresh secret for ``agent``: an OwnTracks passphrase, or an OsmAnd URL key."""
    if agent == "owntracks":
        return _random.token_urlsafe(24)  # 32 characters: the app's key is 32 bytes
    return _random.token_urlsafe(32)


def seal_secret(master_key: bytes, tenant: str, device: str, agent: str, secret: str
                ) -> bytes:
    nonce = _random.token_bytes(_NONCE)
    return nonce + AESGCM(_derive(master_key, _SEAL_INFO)).encrypt(
        nonce, secret.encode(), _aad(tenant, device, agent))


def open_secret(master_key: bytes, tenant: str, device: str, agent: str, sealed: bytes
                ) -> str:
    try:
        return AESGCM(_derive(master_key, _SEAL_INFO)).decrypt(
            sealed[:_NONCE], sealed[_NONCE:], _aad(tenant, device, agent)).decode()
    except (InvalidTag, ValueError, UnicodeDecodeError):
        raise AgentSecretError(f"the agent secret of device {device!r} does not open "
                               "under this master key") from None


def url_key_digest(master_key: bytes, key: str) -> bytes:
    """How the database finds a device by the key in its URL (HMAC-SHA256)."""
    return hmac.new(_derive(master_key, _DIGEST_INFO), key.encode(), hashlib.sha256).digest()


async def rewrap_agent_secrets(conn: asyncpg.Connection, old_master: bytes,
                               new_master: bytes) -> int:
    """Master-key rotation: every agent secret opened under ``old_master`` and sealed
    under ``new_master``; URL key digests recomputed. Inside the rotation's
    transaction. Returns how many."""
    rows = await conn.fetch(
        "SELECT tenant_id, device_id, agent, agent_secret, http_key_digest FROM devices "
        "WHERE agent_secret IS NOT NULL FOR UPDATE")
    for r in rows:
        t, d, agent = r["tenant_id"], r["device_id"], r["agent"]
        secret = open_secret(old_master, t, d, agent, r["agent_secret"])
        digest = (url_key_digest(new_master, secret)
                  if r["http_key_digest"] is not None else None)
        await conn.execute(
            "UPDATE devices SET agent_secret = $3, http_key_digest = $4 "
            "WHERE tenant_id = $1 AND device_id = $2",
            t, d, seal_secret(new_master, t, d, agent, secret), digest)
    return len(rows)
