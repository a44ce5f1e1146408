"""Named places as stored (migration 017): every version kept, the newest
non-deleted one in force, as policies are (mdm_server/storage/policies.py).

A tenant's stored versions are capped in bytes (``MDM_PLACE_STORE_MB``, 16 MiB by
default): when a new version would take the tenant past the cap, the bodies of its
oldest versions that are not the newest of their place are pruned (number, author
and time stay, marked ``pruned``) until it fits; if even the places in force and
the new version do not fit, the write is refused (:class:`PlaceStoreFull`) and
nothing changes. Bodies are decoded on the policy threads, never on the event loop.
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
    "PlaceStoreFull",
    "PlaceVersion",
    "current_places",
    "delete_place",
    "get_place",
    "get_version",
    "list_places",
    "list_versions",
    "place_exists",
    "store_version",
    "stored_bytes",
]



@dataclass(frozen=True, slots=True)
class PlaceVersion:
    tenant: str
    name: str
    version: int
    body: dict[str, Any] | None  # None: a deletion, a pruned version, or not read
    deleted: bool
    created_at: datetime
    created_by: str
    size: int = 0  # bytes of its body as stored (PostgreSQL's JSON text); 0: none
    pruned: bool = False


class PlaceStoreFull(Exception):
    """The tenant's places in force and the new version would pass the cap."""


def _meta(r: asyncpg.Record) -> PlaceVersion:
    return PlaceVersion(r["tenant_id"], r["name"], r["version"], None, r["deleted"],
                        r["created_at"], r["created_by"], r["body_bytes"],
                        r["pruned_at"] is not None)


def _decode_all(texts: list[str | None]) -> list[Any]:
    return [None if t is None else orjson.loads(t) for t in texts]


async def _with_bodies(rows: list[asyncpg.Record]) -> list[PlaceVersion]:
    bodies = await policy_work(_decode_all, [r["body_json"] for r in rows])
    return [dataclasses.replace(_meta(r), body=b) for r, b in zip(rows, bodies, strict=True)]


async def current_places(conn: asyncpg.Connection, tenant: str,
                         known: set[tuple[str, int]] | None = None) -> list[PlaceVersion]:
    """The places in force (newest version of each, not deleted), by name, with
    their bodies, but for the (name, version) pairs in ``known`` (the caller has
    them already: their ``body`` is None)."""
    names = [n for n, _ in known or ()]
    versions = [v for _, v in known or ()]
    rows = await conn.fetch(
        """SELECT tenant_id, name, version, deleted, created_at, created_by, body_bytes,
                  pruned_at,
                  CASE WHEN (name, version) IN (SELECT * FROM unnest($2::text[], $3::int[]))
                       THEN NULL ELSE body::text END AS body_json
           FROM (SELECT DISTINCT ON (name) * FROM places WHERE tenant_id = $1
                 ORDER BY name, version DESC) newest
           WHERE NOT deleted ORDER BY name""",
        tenant, names, versions)
    return await _with_bodies(rows)


async def list_places(conn: asyncpg.Connection, tenant: str, *, after: str | None,
                      limit: int) -> list[PlaceVersion]:
    """A page of the places in force, by name after ``after``, without bodies."""
    rows = await conn.fetch(
        """SELECT tenant_id, name, version, deleted, created_at, created_by, body_bytes,
                  pruned_at
           FROM (SELECT DISTINCT ON (name) * FROM places WHERE tenant_id = $1
                 ORDER BY name, version DESC) newest
           WHERE NOT deleted AND ($2::text IS NULL OR name > $2) ORDER BY name LIMIT $3""",
        tenant, after, limit)
    return [_meta(r) for r in rows]


async def get_place(conn: asyncpg.Connection, tenant: str, name: str) -> PlaceVersion | None:
    """The place's newest version with its body; None if it has none or is deleted."""
    row = await conn.fetchrow(
        "SELECT tenant_id, name, version, deleted, created_at, created_by, body_bytes, "
        "pruned_at, body::text AS body_json FROM places "
        "WHERE tenant_id = $1 AND name = $2 ORDER BY version DESC LIMIT 1", tenant, name)
    if row is None or row["deleted"]:
        return None
    return (await _with_bodies([row]))[0]


async def get_version(conn: asyncpg.Connection, tenant: str, name: str, version: int
                      ) -> PlaceVersion | None:
    row = await conn.fetchrow(
        "SELECT tenant_id, name, version, deleted, created_at, created_by, body_bytes, "
        "pruned_at, body::text AS body_json FROM places "
        "WHERE tenant_id = $1 AND name = $2 AND version = $3", tenant, name, version)
    return None if row is None else (await _with_bodies([row]))[0]


async def place_exists(conn: asyncpg.Connection, tenant: str, name: str) -> bool:
    return bool(await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM places WHERE tenant_id = $1 AND name = $2)",
        tenant, name))


async def list_versions(conn: asyncpg.Connection, tenant: str, name: str, *,
                        after: int | None = None, limit: int | None = None
                        ) -> list[PlaceVersion]:
    """Versions oldest first, after version ``after``; never their bodies."""
    rows = await conn.fetch(
        "SELECT tenant_id, name, version, deleted, created_at, created_by, body_bytes, "
        "pruned_at FROM places WHERE tenant_id = $1 AND name = $2 "
        "AND version > $3 ORDER BY version LIMIT $4", tenant, name, after or 0, limit)
    return [_meta(r) for r in rows]


async def stored_bytes(conn: asyncpg.Connection, tenant: str) -> int:
    return int(await conn.fetchval(
        "SELECT coalesce(sum(body_bytes), 0) FROM places WHERE tenant_id = $1", tenant))


async def _prune(conn: asyncpg.Connection, tenant: str, cap: int) -> int:
    """Prune the oldest bodies that are not the newest of their place until the
    tenant is within ``cap``; how many. PlaceStoreFull if it cannot be."""
    used = await stored_bytes(conn, tenant)
    if used <= cap:
        return 0
    rows = await conn.fetch(
        """WITH old AS (
               SELECT name, version, body_bytes,
                      sum(body_bytes) OVER (ORDER BY created_at, name, version) AS upto
               FROM places p
               WHERE tenant_id = $1 AND body IS NOT NULL
                 AND version < (SELECT max(version) FROM places q
                                WHERE q.tenant_id = $1 AND q.name = p.name))
           UPDATE places p SET body = NULL, pruned_at = now()
           FROM old WHERE p.tenant_id = $1 AND p.name = old.name AND p.version = old.version
             AND old.upto - old.body_bytes < $2
           RETURNING old.body_bytes""", tenant, used - cap)
    if used - sum(r["body_bytes"] for r in rows) > cap:
        raise PlaceStoreFull
    return len(rows)


async def _append(conn: asyncpg.Connection, tenant: str, name: str, body_json: str | None,
                  actor: str, cap: int | None) -> tuple[PlaceVersion, int]:
    async with conn.transaction():
        # The tenant's place writers one at a time: the version number and the room
        # under the cap are ours.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('mdm.places/' || $1))",
                           tenant)
        version = await conn.fetchval(
            "SELECT coalesce(max(version), 0) + 1 FROM places "
            "WHERE tenant_id = $1 AND name = $2", tenant, name)
        row = await conn.fetchrow(
            """INSERT INTO places (tenant_id, name, version, body, deleted, created_by)
               VALUES ($1, $2, $3, $4::text::jsonb, $5, $6)
               RETURNING tenant_id, name, version, deleted, created_at, created_by,
                         body_bytes, pruned_at""",
            tenant, name, version, body_json, body_json is None, actor)
        pruned = await _prune(conn, tenant, cap) if cap is not None and body_json else 0
    return _meta(row), pruned


async def store_version(conn: asyncpg.Connection, tenant: str, name: str, body_json: str,
                        actor: str, *, cap_bytes: int) -> tuple[PlaceVersion, int]:
    """A new version (``body_json``: the validated place as JSON text), pruning old
    versions to stay within ``cap_bytes``; the version (without its body) and how
    many versions were pruned. PlaceStoreFull: nothing changed."""
    return await _append(conn, tenant, name, body_json, actor, cap_bytes)


async def delete_place(conn: asyncpg.Connection, tenant: str, name: str, actor: str
                       ) -> PlaceVersion | None:
    """A deletion, as a version of its own; None when the place is not in force."""
    deleted = await conn.fetchval(
        "SELECT deleted FROM places WHERE tenant_id = $1 AND name = $2 "
        "ORDER BY version DESC LIMIT 1", tenant, name)
    if deleted is None or deleted:
        return None
    v, _ = await _append(conn, tenant, name, None, actor, None)
    return v
