"""The audit log: every admin action, append-only and hash-chained.

Admin actions (commands, approvals, policy changes, enrollments, admin tokens,
reads of a user's personal data) each add one entry with :func:`append`, called
inside the transaction of the action itself, so an entry exists exactly when its
action was committed. `mdm-server audit verify` (:func:`verify`) walks the log and
names the first entry that was changed, removed or moved.

**No personal values in entries.** ``target`` and ``details`` hold ids and codes
(``device:phone-7``, a command id, a policy version), never what they point at:
no e-mail addresses, phone numbers, locations or free text a user typed. The log
cannot be edited, so anything put into it could never be erased again.

The chain. One chain for the whole database (all tenants), in ``seq`` order:

    hash = SHA-256(prev_hash || canonical JSON of
                   {"seq", "at", "tenant", "actor", "action", "target", "details"})

``prev_hash`` is the previous entry's ``hash`` (32 zero bytes for entry 1);
``at`` is spelled as an ISO 8601 UTC timestamp with microseconds; canonical JSON is
orjson with sorted keys at every level, and ``details`` is hashed as PostgreSQL
stores it (read back through ``jsonb``), so the verifier recomputes the same bytes.
``seq`` is gap-free (the last seq + 1, taken under an advisory lock that is held
until the caller's transaction ends; a rolled-back action leaves no hole), so a
removed entry shows as a gap, an edited one as a hash mismatch, and moved ones as
a broken ``prev_hash`` or hash. One chain keeps verification a single pass; the
price is that audited actions of all tenants serialise on the lock between their
``append`` and their commit: call ``append`` last in the transaction, and in READ
COMMITTED (the default), so that it sees the entry committed just before.

What the chain cannot show on its own: the removal of the newest entries, and a
rewrite of the whole chain from the changed entry on by someone who can write the
table directly (the owner, with the triggers disabled). Against both, keep the
head (``VerifyResult.head``; `mdm-server audit verify --head` prints it) somewhere
the database's owner cannot write, and compare.

Who may write: the server's role (``mdm_app``, migration 004) may SELECT and
INSERT; UPDATE, DELETE and TRUNCATE are neither granted nor, through triggers,
possible for anyone who cannot disable the table's triggers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

__all__ = [
    "GENESIS",
    "AuditEntry",
    "VerifyResult",
    "append",
    "entry_hash",
    "read",
    "verify",
]

#: prev_hash of the first entry.
GENESIS = bytes(32)

# Two-key advisory lock (its own key space, apart from the one-key locks of
# migrations, policies and signing keys): "mdm", "aud".
_LOCK = (0x6D646D, 0x617564)

_VERIFY = """SELECT seq, at, tenant_id, actor, action, target, details::text AS details,
                    prev_hash, hash
             FROM audit_log ORDER BY seq"""
_READ = """SELECT seq, at, tenant_id, actor, action, target, details::text AS details,
                  prev_hash, hash
           FROM audit_log WHERE tenant_id = $1 AND ($2::bigint IS NULL OR seq < $2)
           ORDER BY seq DESC LIMIT $3"""


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    at: datetime
    tenant: str | None
    actor: str
    action: str
    target: str
    details: dict[str, Any]
    prev_hash: bytes
    hash: bytes

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "at": _timestamp(self.at), "tenant": self.tenant,
                "actor": self.actor, "action": self.action, "target": self.target,
                "details": self.details, "hash": self.hash.hex()}


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of :func:`verify`: ``ok`` with ``count`` entries and the ``head``
    hash, or the first broken entry (``seq``) and what is wrong with it."""

    ok: bool
    count: int
    head: bytes | None = None
    seq: int | None = None
    reason: str | None = None

    def __str__(self) -> str:
        if self.ok:
            return f"audit log OK: {self.count} entries"
        return f"audit log BROKEN at entry {self.seq}: {self.reason}"


def _timestamp(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def entry_hash(prev_hash: bytes, *, seq: int, at: datetime, tenant: str | None, actor: str,
               action: str, target: str, details: Any) -> bytes:
    """The hash of one entry, chained to ``prev_hash``."""
    body = orjson.dumps(
        {"seq": seq, "at": _timestamp(at), "tenant": tenant, "actor": actor,
         "action": action, "target": target, "details": details},
        option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(prev_hash + body).digest()


async def append(conn: asyncpg.Connection, *, tenant: str | None, actor: str, action: str,
                 target: str, details: Mapping[str, Any] | None = None) -> int:
    """Add an entry to the log; return its seq.

    Call it inside the transaction of the action (last, before the commit): the
    entry is committed with the action or not at all. Outside a transaction it
    commits on its own. ``details``: JSON values, ids and codes only (see above).
    """
    text = orjson.dumps(dict(details or {})).decode()
    if not conn.is_in_transaction():
        async with conn.transaction():
            return await _append(conn, tenant, actor, action, target, text)
    return await _append(conn, tenant, actor, action, target, text)


async def _append(conn: asyncpg.Connection, tenant: str | None, actor: str, action: str,
                  target: str, details_text: str) -> int:
    await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", *_LOCK)
    # After the lock, so this statement's snapshot holds the entry committed last.
    row = await conn.fetchrow(
        """SELECT last.seq, last.hash, clock_timestamp() AS at,
                  $1::text::jsonb::text AS details
           FROM (SELECT 1) AS one
           LEFT JOIN LATERAL (SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1)
                AS last ON true""", details_text)
    assert row is not None
    seq = 1 if row["seq"] is None else row["seq"] + 1
    prev = GENESIS if row["hash"] is None else bytes(row["hash"])
    at: datetime = row["at"]
    digest = entry_hash(prev, seq=seq, at=at, tenant=tenant, actor=actor, action=action,
                        target=target, details=orjson.loads(row["details"]))
    try:
        await conn.execute(
            """INSERT INTO audit_log (seq, at, tenant_id, actor, action, target, details,
                                      prev_hash, hash)
               VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb, $8, $9)""",
            seq, at, tenant, actor, action, target, details_text, prev, digest)
    except asyncpg.UniqueViolationError:
        raise RuntimeError("audit.append needs a READ COMMITTED transaction: this one's "
                           "snapshot predates the last audit entry") from None
    return seq


def _broken(count: int, seq: int, reason: str) -> VerifyResult:
    return VerifyResult(ok=False, count=count, seq=seq, reason=reason)


async def verify(conn: asyncpg.Connection, *, prefetch: int = 1000) -> VerifyResult:
    """Walk the whole log in seq order (a server-side cursor: flat memory) and
    return the first broken entry, or OK with the number of entries."""
    if conn.is_in_transaction():
        return await _verify(conn, prefetch)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _verify(conn, prefetch)


async def _verify(conn: asyncpg.Connection, prefetch: int) -> VerifyResult:
    expected, prev, count = 1, GENESIS, 0
    async for r in conn.cursor(_VERIFY, prefetch=prefetch):
        seq: int = r["seq"]
        if seq != expected:
            missing = (f"entry {expected} is missing" if seq == expected + 1
                       else f"entries {expected} to {seq - 1} are missing")
            return _broken(count, seq, f"gap in seq: {missing}")
        if r["prev_hash"] is None or bytes(r["prev_hash"]) != prev:
            what = f"the hash of entry {seq - 1}" if seq > 1 else "the genesis (zero) hash"
            return _broken(count, seq, f"prev_hash mismatch: it is not {what}")
        try:
            details = orjson.loads(r["details"]) if r["details"] is not None else None
            digest = entry_hash(prev, seq=seq, at=r["at"], tenant=r["tenant_id"],
                                actor=r["actor"], action=r["action"], target=r["target"],
                                details=details)
        except (orjson.JSONDecodeError, orjson.JSONEncodeError, TypeError,
                AttributeError, ValueError, OverflowError):
            return _broken(count, seq, "hash mismatch: the entry cannot be read")
        if r["hash"] is None or bytes(r["hash"]) != digest:
            return _broken(count, seq, "hash mismatch: the entry was changed")
        prev, expected, count = digest, expected + 1, count + 1
    return VerifyResult(ok=True, count=count, head=prev if count else None)


async def read(conn: asyncpg.Connection, tenant: str, *, limit: int = 100,
               before: int | None = None) -> list[AuditEntry]:
    """A tenant's entries, newest first: ``limit`` of them with seq below ``before``
    (the smallest seq of the previous page; None for the first page)."""
    rows = await conn.fetch(_READ, tenant, before, max(1, min(limit, 1000)))
    return [AuditEntry(r["seq"], r["at"], r["tenant_id"], r["actor"], r["action"],
                       r["target"], orjson.loads(r["details"]), bytes(r["prev_hash"]),
                       bytes(r["hash"])) for r in rows]
