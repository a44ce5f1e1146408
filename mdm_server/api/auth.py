"""Bearer tokens: who is calling, for which tenant, in which role."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from aiohttp import web

from mdm_server.api.context import POOL
from mdm_server.storage.tenants import hash_token

__all__ = [
    "Principal",
    "require_admin",
    "require_principal",
    "require_reader",
    "require_user",
    "routes",
    "user_devices",
]


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    role: str
    name: str
    device: str | None


def _unauthorized(reason: str) -> web.HTTPUnauthorized:
    return web.HTTPUnauthorized(reason=reason, headers={"WWW-Authenticate": "Bearer"})


async def require_principal(request: web.Request, pool: asyncpg.Pool) -> Principal:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("a bearer token is required")
    if not token.isascii() or not token.strip().isprintable():
        raise _unauthorized("the token is not valid")
    row = await pool.fetchrow(
        "SELECT tenant_id, role, name, device_id FROM api_tokens "
        "WHERE token_sha256 = $1 AND revoked_at IS NULL", hash_token(token.strip()))
    if row is None:
        raise _unauthorized("the token is not valid")
    return Principal(row["tenant_id"], row["role"], row["name"], row["device_id"])


async def require_admin(request: web.Request, pool: asyncpg.Pool) -> Principal:
    who = await require_principal(request, pool)
    if who.role != "admin":
        raise web.HTTPForbidden(reason="this needs an admin of the tenant")
    return who


async def require_reader(request: web.Request, pool: asyncpg.Pool) -> Principal:
    """An admin or an auditor (read-only): the GET routes of the admin API."""
    who = await require_principal(request, pool)
    if who.role not in ("admin", "auditor"):
        raise web.HTTPForbidden(reason="this needs an admin or auditor of the tenant")
    return who


async def require_user(request: web.Request, pool: asyncpg.Pool) -> Principal:
    """A device user: the /api/v1/me routes."""
    who = await require_principal(request, pool)
    if who.role != "user" or who.device is None:
        raise web.HTTPForbidden(reason="this needs a device user's token")
    return who


async def user_devices(conn: asyncpg.Connection, who: Principal) -> list[str]:
    """The devices a user token covers: its own, and the tenant's other devices
    with the same user e-mail (one person, several phones)."""
    rows = await conn.fetch(
        """SELECT d.device_id FROM devices d
           JOIN devices own ON own.tenant_id = d.tenant_id AND own.device_id = $2
           WHERE d.tenant_id = $1 AND (d.device_id = $2 OR (own.user_email IS NOT NULL
                                                            AND d.user_email = own.user_email))
           ORDER BY d.device_id""", who.tenant, who.device)
    return [r["device_id"] for r in rows]


async def token_info(request: web.Request) -> web.Response:
    """GET /api/v1/token: who the caller is (any valid token)."""
    who = await require_principal(request, request.app[POOL])
    return web.json_response({"tenant": who.tenant, "role": who.role, "name": who.name,
                              "device": who.device})


def routes() -> list[web.RouteDef]:
    return [web.get("/api/v1/token", token_info)]
