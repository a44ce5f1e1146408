"""Policies as stored: every version kept, the newest non-deleted one in force.

A tenant's stored versions are capped in bytes (``MDM_POLICY_STORE_MB``, 64 MiB by
default; migration 014): when a new version would take the tenant past the cap, the
bodies of its oldest versions that are not the newest of their policy are pruned
(their number, author and time stay, marked ``pruned``) until it fits; if even the
policies in force and the new version do not fit, the write is refused
(:class:`PolicyStoreFull`) and nothing changes.

Bodies are decoded from JSON on the policy threads (mdm_server/policy/offload.py),
never on the event loop: a policy with thousands of zones is megabytes of JSON.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from mdm_server.policy.offload import policy_work

__all__ = [
    "DEFAULT_POLICY",
    "PolicyStoreFull",
    "PolicyVersion",
    "current_policies",
    "delete_policy",
    "get_policy",
    "get_version",
    "list_versions",
    "policy_exists",
    "put_policy",
    "store_version",
    "stored_bytes",
]

DEFAULT_POLICY = "default"
NOTIFY_CHANNEL = "mdm_policies"

# Queries select every column but the body (jsonb: the pool's codec would decode it
# on the loop), and the body as text where it is wanted (body_json).


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    tenant: str
    name: str
    version: int
    body: dict[str, Any] | None  # None: a deletion, a pruned version, or not read
    deleted: bool
    created_at: datetime
    created_by: str
    size: int = 0  # bytes of its body as stored (PostgreSQL's JSON text); 0: none
    pruned: bool = False  # its body was dropped to keep the tenant under the cap


class PolicyStoreFull(Exception):
    """The tenant's policies in force and the new version would pass the cap."""

    def __init__(self, needed: int, cap: int) -> None:
        super().__init__(f"{needed} bytes needed, cap {cap}")
        self.needed = needed
        self.cap = cap


def _meta(r: asyncpg.Record) -> PolicyVersion:
    return PolicyVersion(r["tenant_id"], r["name"], r["version"], None, r["deleted"],
                         r["created_at"], r["created_by"], r["body_bytes"],
                         r["pruned_at"] is not None)


def _decode_all(texts: list[str | None]) -> list[Any]:
    return [None if t is None else orjson.loads(t) for t in texts]


async def _with_bodies(rows: list[asyncpg.Record]) -> list[PolicyVersion]:
    """Rows that carry ``body_json`` (the body as text), their bodies decoded off
    the loop."""
    bodies = await policy_work(_decode_all, [r["body_json"] for r in rows])
    return [dataclasses.replace(_meta(r), body=b) for r, b in zip(rows, bodies, strict=True)]


async def current_policies(conn: asyncpg.Connection, tenant: str, *, bodies: bool = True
                           ) -> list[PolicyVersion]:
    """The policies in force for a tenant (newest version of each, not deleted);
    without their bodies unless ``bodies``."""
    rows = await conn.fetch(
        """SELECT tenant_id, name, version, deleted, created_at, created_by, body_bytes,
                  pruned_at, CASE WHEN $2 THEN body::text END AS body_json
           FROM (SELECT DISTINCT ON (name) * FROM policies WHERE tenant_id = $1
                 ORDER BY name, version DESC) newest
           WHERE NOT deleted ORDER BY name""", tenant, bodies)
    return await _with_bodies(rows) if bodies else [_meta(r) for r in rows]


async def get_policy(conn: asyncpg.Connection, tenant: str, name: str) -> PolicyVersion | None:
    """The policy's newest version with its body; None if it has none or is deleted."""
    row = await conn.fetchrow(
        "SELECT tenant_id, name, version, deleted, created_at, created_by, body_bytes, "
        "pruned_at, body::text AS body_json FROM policies "
        "WHERE tenant_id = $1 AND name = $2 ORDER BY version DESC LIMIT 1", tenant, name)
    if row is None or row["deleted"]:
        return None
    return (await _with_bodies([row]))[0]


async def get_version(conn: asyncpg.Connection, tenant: str, name: str, version: int
                      ) -> PolicyVersion | None:
    """One version with its body (None for a deletion or a pruned version)."""
    row = await conn.fetchrow(
        "SELECT tenant_id, name, version, deleted, created_at, created_by, body_bytes, "
        "pruned_at, body::text AS body_json FROM policies "
        "WHERE tenant_id = $1 AND name = $2 AND version = $3", tenant, name, version)
    return None if row is None else (await _with_bodies([row]))[0]


async def policy_exists(conn: asyncpg.Connection, tenant: str, name: str) -> bool:
    """Whether the policy has any version (deleted or not)."""
    return bool(await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM policies WHERE tenant_id = $1 AND name = $2)",
        tenant, name))


async def list_versions(conn: asyncpg.Connection, tenant: str, name: str, *,
                        after: int | None = None, limit: int | None = None
                        ) -> list[PolicyVersion]:
    """Versions oldest first, after version ``after``, at most ``limit``; never
    their bodies."""
    rows = await conn.fetch(
        "SELECT tenant_id, name, version, deleted, created_at, created_by, body_bytes, "
        "pruned_at FROM policies WHERE tenant_id = $1 AND name = $2 "
        "AND version > $3 ORDER BY version LIMIT $4",
        tenant, name, after or 0, limit)
    return [_meta(r) for r in rows]


async def stored_bytes(conn: asyncpg.Connection, tenant: str) -> int:
    """What the tenant's stored versions take, as counted against the cap."""
    return int(await conn.fetchval(
        "SELECT coalesce(sum(body_bytes), 0) FROM policies WHERE tenant_id = $1", tenant))


async def _prune(conn: asyncpg.Connection, tenant: str, cap: int) -> int:
    """Prune the oldest bodies that are not the newest of their policy until the
    tenant is within ``cap``; the number pruned. PolicyStoreFull if it cannot be."""
    used = await stored_bytes(conn, tenant)
    if used <= cap:
        return 0
    rows = await conn.fetch(
        """WITH old AS (
               SELECT name, version, body_bytes,
                      sum(body_bytes) OVER (ORDER BY created_at, name, version) AS upto
               FROM policies p
               WHERE tenant_id = $1 AND body IS NOT NULL
                 AND version < (SELECT max(version) FROM policies q
                                WHERE q.tenant_id = $1 AND q.name = p.name))
           UPDATE policies p SET body = NULL, pruned_at = now()
           FROM old WHERE p.tenant_id = $1 AND p.name = old.name AND p.version = old.version
             AND old.upto - old.body_bytes < $2
           RETURNING old.body_bytes""", tenant, used - cap)
    left = used - sum(r["body_bytes"] for r in rows)
    if left > cap:
        raise PolicyStoreFull(left, cap)
    return len(rows)


async def _append(conn: asyncpg.Connection, tenant: str, name: str, body_json: str | None,
                  actor: str, cap: int | None) -> tuple[PolicyVersion, int]:
    async with conn.transaction():
        # Serialise the tenant's policy writers: the next version number is ours,
        # and so is the room under the cap.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('mdm.policies/' || $1))",
                           tenant)
        version = await conn.fetchval(
            "SELECT coalesce(max(version), 0) + 1 FROM policies "
            "WHERE tenant_id = $1 AND name = $2", tenant, name)
        # The body goes in as text (jsonb's codec would encode it on the loop).
        row = await conn.fetchrow(
            """INSERT INTO policies (tenant_id, name, version, body, deleted, created_by)
               VALUES ($1, $2, $3, $4::text::jsonb, $5, $6)
               RETURNING tenant_id, name, version, deleted, created_at, created_by,
                         body_bytes, pruned_at""",
            tenant, name, version, body_json, body_json is None, actor)
        pruned = await _prune(conn, tenant, cap) if cap is not None and body_json else 0
        await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, tenant)
    return _meta(row), pruned


async def store_version(conn: asyncpg.Connection, tenant: str, name: str, body_json: str,
                        actor: str, *, cap_bytes: int) -> tuple[PolicyVersion, int]:
    """Store a new version (``body_json``: the validated policy's canonical JSON),
    pruning old versions to stay within ``cap_bytes``; the version (without its
    body) and how many versions were pruned. PolicyStoreFull: nothing changed."""
    return await _append(conn, tenant, name, body_json, actor, cap_bytes)


async def put_policy(conn: asyncpg.Connection, tenant: str, name: str,
                     body: dict[str, Any], actor: str) -> PolicyVersion:
    """Store a new version (the body must already be validated), without the cap:
    for set-up code and tests; the API uses :func:`store_version`."""
    v, _ = await _append(conn, tenant, name, orjson.dumps(body).decode(), actor, None)
    return dataclasses.replace(v, body=body)


async def delete_policy(conn: asyncpg.Connection, tenant: str, name: str, actor: str
                        ) -> PolicyVersion | None:
    """Record a deletion as a version of its own; None when nothing is in force."""
    deleted = await conn.fetchval(
        "SELECT deleted FROM policies WHERE tenant_id = $1 AND name = $2 "
        "ORDER BY version DESC LIMIT 1", tenant, name)
    if deleted is None or deleted:
        return None
    v, _ = await _append(conn, tenant, name, None, actor, None)
    return v
