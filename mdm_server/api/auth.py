"""Bearer tokens: who is calling, for which tenant, in which role.

Every request looks its token up again: a revoked or expired token, or a device
user's token whose device was re-enrolled since, is 401 at once, on every route.
``last_used_at`` is written at most once a minute per token (the read tells
whether it is due), so requests stay reads.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg
from aiohttp import web

from mdm_server.api.context import POOL
from mdm_server.storage.tenants import hash_token
from mdm_server.storage.tokens import Coverage, covered_devices

__all__ = [
    "Principal",
    "authenticate",
    "bearer_token",
    "require_admin",
    "require_principal",
    "require_reader",
    "require_user",
    "routes",
    "user_coverage",
    "user_devices",
]

# A request writes last_used_at when it is more than a minute old (or never set).
_LOOKUP = """
    SELECT t.token_id, t.tenant_id, t.role, t.name, t.device_id,
           t.last_used_at IS NULL OR t.last_used_at < now() - interval '1 minute' AS stale
    FROM api_tokens t
    WHERE t.token_sha256 = $1 AND t.revoked_at IS NULL AND t.expires_at > now()
      AND (t.role <> 'user' OR EXISTS (
          SELECT 1 FROM api_token_devices c
          JOIN devices d ON d.tenant_id = c.tenant_id AND d.device_id = c.device_id
          WHERE c.token_id = t.token_id AND c.device_id = t.device_id
            AND d.enrollment_no = c.enrollment_no))"""
_TOUCH = """
    UPDATE api_tokens SET last_used_at = now()
    WHERE token_id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')"""


@dataclass(frozen=True, slots=True)
class Principal:
    tenant: str
    role: str
    name: str
    device: str | None
    token_id: uuid.UUID | None = None


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
        # Unknown, expired, revoked, or a user token whose device was re-enrolled:
        # all the same, no principal.
        row = await pool.fetchrow(_LOOKUP, hash_token(token))
        if row is not None:
            if row["stale"]:
                await pool.execute(_TOUCH, row["token_id"])
            who = Principal(row["tenant_id"], row["role"], row["name"], row["device_id"],
                            row["token_id"])
    request[_RESOLVED] = who
    return who


async def require_principal(request: web.Request, pool: asyncpg.Pool) -> Principal:
    if bearer_token(request) is None:
        raise _unauthorized("a bearer token is required")
    who = await authenticate(request, pool)
    if who is None:
        # One answer for unknown, expired and revoked: it tells a finder nothing.
        raise _unauthorized("the token is not valid (unknown, expired or revoked)")
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


async def user_coverage(conn: asyncpg.Connection, who: Principal) -> list[Coverage]:
    """The devices a user token covers now, each with the start of the enrollment
    it covers (what the user may read of it starts there): its own device, and
    the tenant's devices that had the same user e-mail when it was issued (one
    person, several phones), while each is still in that enrollment and has that
    e-mail (mdm_server/storage/tokens.py)."""
    if who.token_id is None or who.device is None:
        return []
    return await covered_devices(conn, who.token_id, who.tenant, who.device)


async def user_devices(conn: asyncpg.Connection, who: Principal) -> list[str]:
    """The ids of :func:`user_coverage`."""
    return [c.device for c in await user_coverage(conn, who)]


async def token_info(request: web.Request) -> web.Response:
    """GET /api/v1/token: who the caller is (any valid token)."""
    who = await require_principal(request, request.app[POOL])
    return web.json_response({"tenant": who.tenant, "role": who.role, "name": who.name,
                              "device": who.device})


def routes() -> list[web.RouteDef]:
    return [web.get("/api/v1/token", token_info)]
