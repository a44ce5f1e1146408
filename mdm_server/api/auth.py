"""Bearer tokens: who is calling, for which tenant, in which role."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
from aiohttp import web

from mdm_server.storage.tenants import hash_token

__all__ = ["Principal", "require_admin", "require_principal"]


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
