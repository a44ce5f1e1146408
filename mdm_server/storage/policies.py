"""Policies as stored: every version kept, the newest non-deleted one in force."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

__all__ = [
    "DEFAULT_POLICY",
    "PolicyVersion",
    "current_policies",
    "delete_policy",
    "get_policy",
    "list_versions",
    "put_policy",
]

DEFAULT_POLICY = "default"
NOTIFY_CHANNEL = "mdm_policies"


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    tenant: str
    name: str
    version: int
    body: dict[str, Any] | None
    deleted: bool
    created_at: datetime
    created_by: str


def _row(r: asyncpg.Record) -> PolicyVersion:
    return PolicyVersion(r["tenant_id"], r["name"], r["version"], r["body"], r["deleted"],
                         r["created_at"], r["created_by"])


async def current_policies(conn: asyncpg.Connection, tenant: str) -> list[PolicyVersion]:
    """The policies in force for a tenant (newest version of each, not deleted)."""
    rows = await conn.fetch(
        """SELECT * FROM (
               SELECT DISTINCT ON (name) * FROM policies WHERE tenant_id = $1
               ORDER BY name, version DESC) newest
           WHERE NOT deleted ORDER BY name""", tenant)
    return [_row(r) for r in rows]


async def get_policy(conn: asyncpg.Connection, tenant: str, name: str) -> PolicyVersion | None:
    row = await conn.fetchrow(
        "SELECT * FROM policies WHERE tenant_id = $1 AND name = $2 "
        "ORDER BY version DESC LIMIT 1", tenant, name)
    if row is None or row["deleted"]:
        return None
    return _row(row)


async def list_versions(conn: asyncpg.Connection, tenant: str, name: str
                        ) -> list[PolicyVersion]:
    rows = await conn.fetch(
        "SELECT * FROM policies WHERE tenant_id = $1 AND name = $2 ORDER BY version",
        tenant, name)
    return [_row(r) for r in rows]


async def _append(conn: asyncpg.Connection, tenant: str, name: str,
                  body: dict[str, Any] | None, actor: str) -> PolicyVersion:
    async with conn.transaction():
        # Serialise writers of one policy: the next version number is ours.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1 || '/' || $2))",
                           tenant, name)
        version = await conn.fetchval(
            "SELECT coalesce(max(version), 0) + 1 FROM policies "
            "WHERE tenant_id = $1 AND name = $2", tenant, name)
        row = await conn.fetchrow(
            """INSERT INTO policies (tenant_id, name, version, body, deleted, created_by)
               VALUES ($1, $2, $3, $4, $5, $6) RETURNING *""",
            tenant, name, version, body, body is None, actor)
        await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, tenant)
    return _row(row)


async def put_policy(conn: asyncpg.Connection, tenant: str, name: str,
                     body: dict[str, Any], actor: str) -> PolicyVersion:
    """Store a new version (the body must already be validated)."""
    return await _append(conn, tenant, name, body, actor)


async def delete_policy(conn: asyncpg.Connection, tenant: str, name: str, actor: str
                        ) -> PolicyVersion | None:
    """Record a deletion as a version of its own; None when nothing is in force."""
    if await get_policy(conn, tenant, name) is None:
        return None
    return await _append(conn, tenant, name, None, actor)
