"""The master key: which one this database's secrets are under, and its rotation.

Everything secret the server keeps hangs off ``MDM_MASTER_KEY``, which is never in
the database:

- **wrapped** under keys derived from it: the command-signing private keys
  (commands/keys.py) and, with the key ring's epoch secrets, the device data keys
  (storage/keyring.py);
- **derived** from it: the audit log's MAC keys (audit.py), the tenants' hash keys
  (policies' ``hash``), the record-id digest keys (ingest/record_ids.py), the
  devices' MQTT passwords (broker/credentials.py).

``master_key.fingerprint`` (migration 016) names the key in use: a process started
with another key refuses at once (:func:`check_master_key`) instead of writing
audit entries nobody can verify or failing on the first device key.

:func:`rotate_master_key` moves the database to a new key in one transaction, with
every server process stopped: signing keys re-encrypted, device keys re-wrapped
under a new key-ring epoch whose KEK derives from the new key (the old epochs
retired: their files destroyed after the commit), the audit log's keyed entries
MAC'd again under the new key after verifying under the old one, the fingerprint
replaced. What is derived and cannot be carried over changes meaning, as
docs/architecture.md ("Rotating the master key") says: hashes made before do not
match those made after; a record redelivered across the rotation gets another
digest; checkpoints taken before no longer verify; and devices' MQTT passwords
stay as they are on the broker (the device keeps working) but can no longer be
derived, so each device is marked ``mqtt_stale`` until it is re-enrolled.
"""

from __future__ import annotations

import hmac
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mdm_server import audit
from mdm_server.agents.secrets import rewrap_agent_secrets
from mdm_server.commands.keys import reencrypt_signing_keys
from mdm_server.storage.keyring import Keyring

__all__ = [
    "MasterKeyError",
    "RotationReport",
    "check_master_key",
    "fingerprint",
    "rotate_master_key",
]

_INFO = b"mdm master key fingerprint v1"


class MasterKeyError(Exception):
    """The master key is not this database's, or a rotation cannot run now. The
    message says what to do; it never holds key material."""


def fingerprint(master_key: bytes) -> bytes:
    """16 bytes that name the key and reveal nothing of it."""
    if len(master_key) != 32:
        raise ValueError("the master key must be 32 bytes")
    return HKDF(algorithm=hashes.SHA256(), length=16, salt=None, info=_INFO).derive(master_key)


async def check_master_key(conn: asyncpg.Connection, master_key: bytes) -> None:
    """Refuse a master key that is not the one this database's secrets are under;
    record it if the database has none yet (its first process)."""
    mine = fingerprint(master_key)
    try:
        known = await conn.fetchval("SELECT fingerprint FROM master_key")
        if known is None:
            await conn.execute("INSERT INTO master_key (fingerprint) VALUES ($1) "
                               "ON CONFLICT (only_one) DO NOTHING", mine)
            known = await conn.fetchval("SELECT fingerprint FROM master_key")
    except asyncpg.InsufficientPrivilegeError:
        raise MasterKeyError(
            "this database role may not read the master key's fingerprint (table "
            "master_key): run mdm-server as the server's role (a member of mdm_app) or as "
            "the role migrations run as") from None
    if not hmac.compare_digest(bytes(known), mine):
        raise MasterKeyError(
            "MDM_MASTER_KEY is not this database's master key (its fingerprint differs): "
            "use the key the database was set up or last rotated with")


@dataclass
class RotationReport:
    signing_keys: int = 0
    agent_secrets: int = 0  # foreign agents' secrets sealed again (mdm_server/agents)
    device_keys: int = 0
    epoch: int = 0
    epochs_retired: list[int] = field(default_factory=list)
    files_destroyed: int = 0
    audit_entries: int = 0
    devices_to_reenroll: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


async def _others_connected(conn: asyncpg.Connection) -> int:
    n: int = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND backend_type = 'client backend'")
    return n


async def _can_rewrite_audit_log(conn: asyncpg.Connection) -> bool:
    ok: bool = await conn.fetchval(
        """SELECT r.rolsuper OR pg_has_role(current_user, c.relowner, 'USAGE')
           FROM pg_class c, pg_roles r
           WHERE c.oid = 'audit_log'::regclass AND r.rolname = current_user""")
    return ok


async def rotate_master_key(conn: asyncpg.Connection, keyring_dir: Path, old: bytes,
                            new: bytes) -> RotationReport:
    """Move every secret from ``old`` to ``new`` (see the module doc). ``conn``:
    the database's owner (the role migrations run as: the audit log is MAC'd
    again), outside a transaction, with no other connection to the database
    (every server process stopped). Raises :class:`MasterKeyError`, or ValueError
    when the audit log does not verify under ``old``."""
    if old == new:
        raise MasterKeyError("the new master key is the current one")
    await check_master_key(conn, old)
    others = await _others_connected(conn)
    if others:
        raise MasterKeyError(
            f"{others} other connection(s) to the database: stop serve, every ingest "
            "worker and any other mdm-server command first")
    if not await _can_rewrite_audit_log(conn):
        raise MasterKeyError(
            "run it as the database's owner (the role migrations run as): the audit log's "
            "entries are MAC'd again under the new key")
    report = RotationReport()
    ring = Keyring(keyring_dir, old)
    async with ring.locked_for_rotation(conn):
        async with conn.transaction():
            report.signing_keys = await reencrypt_signing_keys(conn, old, new)
            report.agent_secrets = await rewrap_agent_secrets(conn, old, new)
            report.epoch, report.device_keys, report.epochs_retired = \
                await ring.rewrap_under_master(conn, new)
            report.audit_entries = await audit.rekey(conn, audit.AuditKeys.derive(old),
                                                     audit.AuditKeys.derive(new))
            status = await conn.execute(
                "UPDATE devices SET mqtt_stale = true WHERE mqtt_generation >= 1 "
                "AND status = 'enrolled' "
                "AND agent NOT IN ('osmand', 'traccar')")  # no broker password
            report.devices_to_reenroll = int(status.rsplit(" ", 1)[-1])
            await conn.execute("UPDATE master_key SET fingerprint = $1, since = now()",
                               fingerprint(new))
            await audit.append(conn, audit.AuditKeys.derive(new), tenant=None, actor="cli",
                               action="master_key.rotate", target="master_key",
                               details={"signing_keys": report.signing_keys,
                                        "device_keys": report.device_keys,
                                        "epoch": report.epoch,
                                        "devices_to_reenroll": report.devices_to_reenroll})
        # Committed: nothing is wrapped under the retired epochs any more.
        report.files_destroyed = ring.retire_files(report.epochs_retired)
    return report
