"""Bearer tokens: who is calling, for which tenant, in which role."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from aiohttp import web

from mdm_server.api.context import POOL
from mdm_server.storage.tenants import hash_token

__all__ = [
    "Principal",
    "authenticate",
    "bearer_token",
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


def bearer_token(request: web.Request) -> str | None:
    """The bearer token as every check reads it: ``Bearer`` in any case, a space,
    then the token with the whitespace around it stripped. None: no bearer token.
    ``Bearer abc``, ``bearer  abc`` and ``BEARER abc `` are the same token, so the
    rate limit (mdm_server/api/limits.py) keys them alike."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


# Who the request's token is, once looked up (None: not a valid token).
_RESOLVED: web.RequestKey[Principal | None] = web.RequestKey("mdm_principal")


async def authenticate(request: web.Request, pool: asyncpg.Pool) -> Principal | None:
    """The principal of the request's bearer token; None without a valid one.
    Looked up once per request: the rate limit resolves it before the handler
    runs, and the handler's ``require_*`` reuses it (no second round trip)."""
    if _RESOLVED in request:
        return request[_RESOLVED]
    token = bearer_token(request)
    who = None
    if token is not None and token.isascii() and token.isprintable():
        row = await pool.fetchrow(
            "SELECT tenant_id, role, name, device_id FROM api_tokens "
            "WHERE token_sha256 = $1 AND revoked_at IS NULL", hash_token(token))
        if row is not None:
            who = Principal(row["tenant_id"], row["role"], row["name"], row["device_id"])
    request[_RESOLVED] = who
    return who


async def require_principal(request: web.Request, pool: asyncpg.Pool) -> Principal:
    if bearer_token(request) is None:
        raise _unauthorized("a bearer token is required")
    who = await authenticate(request, pool)
    if who is None:
        raise _unauthorized("the token is not valid")
    return who


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
