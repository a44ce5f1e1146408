"""Erasure requests: a device user asks, an admin fulfils or refuses, and the server
fulfils what is still pending after 30 days (GDPR art. 12(3), art. 17).

Fulfilling first destroys the device's data key (crypto-shredding: every copy of
its telemetry that outlives the erasure, in a backup or a page not yet vacuumed,
is ciphertext under a key that no longer exists; see sealing.py), then removes
everything held about the device's use: its telemetry (every kind), check-out
history, suppressed-point counts, dead letters, and the user's e-mail on the
device record. What remains is the fact: the request (when, by
whom decided, counts of what was removed), the audit entry, and the notice log of
the commands sent to the device (what the user was told, and when). The user
tokens issued for the device are revoked with it (a new one, issued after, shows
only what is recorded from then on), and no other user's token covers it any more
(its e-mail is gone).

Once the erasure has committed, :func:`shred` compacts the key ring
(keyring.py): the surviving keys are re-wrapped under a new epoch and the epoch
the destroyed key was wrapped under is retired, its secret destroyed outside the
database. Only then are the copies of the destroyed key that PostgreSQL itself
keeps (heap pages, WAL) useless too. If that does not happen (a crash), serve's
retention loop catches up (:meth:`Keyring.compact` with ``only_if_due``).
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any

import asyncpg

from mdm_server import audit
from mdm_server.logsafe import describe
from mdm_server.storage.keyring import CompactionReport, Keyring, KeyringError
from mdm_server.storage.sealing import destroy_device_keys
from mdm_server.storage.tokens import revoke_device_user_tokens

__all__ = [
    "ErasureError",
    "erase_device_data",
    "fulfil",
    "fulfil_due",
    "list_requests",
    "refuse",
    "request_erasure",
    "request_json",
    "shred",
    "shred_or_defer",
    "vacuum_keystore",
]

log = logging.getLogger(__name__)

#: The server's name in decisions it takes itself.
SYSTEM = "system (30 days passed)"


class ErasureError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def request_json(r: asyncpg.Record) -> dict[str, Any]:
    def iso(v: Any) -> Any:
        return None if v is None else v.isoformat()

    return {"id": str(r["request_id"]), "device": r["device_id"], "state": r["state"],
            "requested_at": iso(r["requested_at"]), "due_at": iso(r["due_at"]),
            "decided_by": r["decided_by"], "decided_at": iso(r["decided_at"]),
            "refusal_reason": r["refusal_reason"], "erased": r["erased"]}


async def request_erasure(conn: asyncpg.Connection, *, tenant: str, device: str,
                          actor: str, audit_keys: audit.AuditKeys) -> dict[str, Any]:
    """File a request (409 if one is pending already). Call inside a transaction."""
    try:
        async with conn.transaction():
            row = await conn.fetchrow(
                "INSERT INTO erasure_requests (tenant_id, device_id) VALUES ($1, $2) "
                "RETURNING *", tenant, device)
    except asyncpg.UniqueViolationError:
        raise ErasureError(409, "pending_exists",
                           "an erasure request for this device is pending already") from None
    assert row is not None
    await audit.append(conn, audit_keys, tenant=tenant, actor=actor, action="erasure.request",
                       target=f"device:{device}", details={"request_id": str(row["request_id"])})
    return request_json(row)


async def list_requests(conn: asyncpg.Connection, tenant: str, *, device: str | None = None,
                        state: str | None = None, limit: int = 100,
                        since: datetime | None = None) -> list[dict[str, Any]]:
    """Newest first; ``since``: only those requested since then (a user's enrollment)."""
    rows = await conn.fetch(
        "SELECT * FROM erasure_requests WHERE tenant_id = $1 "
        "AND ($2::text IS NULL OR device_id = $2) AND ($3::text IS NULL OR state = $3) "
        "AND ($5::timestamptz IS NULL OR requested_at >= $5) "
        "ORDER BY requested_at DESC LIMIT $4", tenant, device, state, limit, since)
    return [request_json(r) for r in rows]


async def erase_device_data(conn: asyncpg.Connection, tenant: str, device: str
                            ) -> dict[str, int]:
    """Delete everything held about the device's use; counts per table."""

    async def count(sql: str) -> int:
        status: str = await conn.execute(sql, tenant, device)
        return int(status.rsplit(" ", 1)[-1])

    # The key first: its DELETE waits for ingest writes sealing under it to
    # commit, so the DELETEs below see their rows; later writes find it gone and
    # seal under a new key.
    keys = await destroy_device_keys(conn, tenant, device)
    erased = {
        "telemetry": await count(
            "DELETE FROM telemetry WHERE tenant_id = $1 AND device_id = $2"),
        "checkout_events": await count(
            "DELETE FROM checkout_events WHERE tenant_id = $1 AND device_id = $2"),
        "suppressed_locations": await count(
            "DELETE FROM suppressed_locations WHERE tenant_id = $1 AND device_id = $2"),
        "dead_letters": await count(
            "DELETE FROM dead_letters WHERE tenant_id = $1 AND device_id = $2"),
        "device_presence": await count(
            "DELETE FROM device_presence WHERE tenant_id = $1 AND device_id = $2"),
        "data_keys_destroyed": keys,
    }
    await conn.execute("UPDATE devices SET user_email = NULL "
                       "WHERE tenant_id = $1 AND device_id = $2", tenant, device)
    # What the device reported about commands (free text) goes too; what it was
    # told, and when, stays: that is the notice log.
    await conn.execute(
        "UPDATE commands SET outcome_detail = NULL WHERE tenant_id = $1 AND device_id = $2",
        tenant, device)
    await conn.execute(
        """UPDATE command_events e SET detail = NULL FROM commands c
           WHERE c.command_id = e.command_id AND c.tenant_id = $1 AND c.device_id = $2
             AND e.event = 'ack'""", tenant, device)
    return erased


async def _pending(conn: asyncpg.Connection, tenant: str, request_id: uuid.UUID
                   ) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT * FROM erasure_requests WHERE tenant_id = $1 AND request_id = $2 FOR UPDATE",
        tenant, request_id)
    if row is None:
        raise ErasureError(404, "no_such_request", "no such erasure request")
    if row["state"] != "pending":
        raise ErasureError(409, "decided", f"the request is {row['state']} already")
    return row


async def fulfil(conn: asyncpg.Connection, *, tenant: str, request_id: uuid.UUID,
                 actor: str, audit_keys: audit.AuditKeys) -> dict[str, Any]:
    """Erase now. Call inside a transaction: the erasure, the request's new state
    and the audit entry commit together."""
    row = await _pending(conn, tenant, request_id)
    erased = await erase_device_data(conn, tenant, row["device_id"])
    # After the device's row changed (erase_device_data): a user token being issued
    # for it now has committed (and is revoked here) or waits and sees the erasure.
    revoked = await revoke_device_user_tokens(conn, tenant, row["device_id"])
    new = await conn.fetchrow(
        "UPDATE erasure_requests SET state = 'fulfilled', decided_by = $2, decided_at = now(), "
        "erased = $3 WHERE request_id = $1 RETURNING *", request_id, actor, erased)
    await audit.append(conn, audit_keys, tenant=tenant, actor=actor, action="erasure.fulfil",
                       target=f"device:{row['device_id']}",
                       details={"request_id": str(request_id), **erased,
                                "user_tokens_revoked": [str(t) for t in revoked]})
    assert new is not None
    return request_json(new)


async def refuse(conn: asyncpg.Connection, *, tenant: str, request_id: uuid.UUID,
                 actor: str, reason: str, audit_keys: audit.AuditKeys) -> dict[str, Any]:
    row = await _pending(conn, tenant, request_id)
    new = await conn.fetchrow(
        "UPDATE erasure_requests SET state = 'refused', decided_by = $2, decided_at = now(), "
        "refusal_reason = $3 WHERE request_id = $1 RETURNING *", request_id, actor, reason)
    await audit.append(conn, audit_keys, tenant=tenant, actor=actor, action="erasure.refuse",
                       target=f"device:{row['device_id']}",
                       details={"request_id": str(request_id)})
    assert new is not None
    return request_json(new)


async def vacuum_keystore(conn: asyncpg.Connection) -> None:
    """Remove dead key tuples from the keystore's pages now rather than at
    autovacuum's leisure (outside any transaction: VACUUM cannot run in one).
    Housekeeping only: VACUUM does not zero what it frees, and erasure does not
    rely on it (the key ring's retired epoch does that)."""
    await conn.execute("VACUUM keystore.device_keys")


async def shred(conn: asyncpg.Connection, keyring: Keyring) -> CompactionReport:
    """After erasures have committed (outside any transaction): retire the key-ring
    epochs their keys were wrapped under, then vacuum the keystore."""
    report = await keyring.compact(conn)
    await vacuum_keystore(conn)
    return report


async def shred_or_defer(conn: asyncpg.Connection, keyring: Keyring) -> CompactionReport | None:
    """:func:`shred` for a caller whose erasure has committed already (the admin's
    fulfil): a failure is logged, not raised; serve's retention loop catches up."""
    try:
        return await shred(conn, keyring)
    except KeyringError as exc:
        log.error("erasure fulfilled, key ring not compacted yet (%s); serve retries on "
                  "its retention schedule", exc)
    except Exception as exc:
        log.error("erasure fulfilled, key ring not compacted yet; serve retries on its "
                  "retention schedule: %s", describe(exc))
    return None


async def fulfil_due(conn: asyncpg.Connection, keyring: Keyring,
                     audit_keys: audit.AuditKeys) -> int:
    """Fulfil every request still pending at its due date, then :func:`shred`;
    how many."""
    done = 0
    while True:
        async with conn.transaction():
            row = await conn.fetchrow(
                "SELECT tenant_id, request_id FROM erasure_requests "
                "WHERE state = 'pending' AND due_at <= now() "
                "ORDER BY due_at LIMIT 1 FOR UPDATE SKIP LOCKED")
            if row is None:
                break
            await fulfil(conn, tenant=row["tenant_id"], request_id=row["request_id"],
                         actor=SYSTEM, audit_keys=audit_keys)
        done += 1
    if done:
        await shred(conn, keyring)  # once for all the keys destroyed above
    return done
