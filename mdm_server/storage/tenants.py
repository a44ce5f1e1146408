"""Tenants. Their API tokens: mdm_server/storage/tokens.py."""

from __future__ import annotations

import hashlib

import asyncpg

from agent_protocol import is_valid_id

__all__ = [
    "TenantError",
    "create_tenant",
    "ensure_tenant",
    "hash_token",
    "list_tenants",
    "require_tenant",
]


class TenantError(Exception):
    """A tenant operation was refused; the message says why (no secrets in it)."""


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def create_tenant(conn: asyncpg.Connection, name: str) -> None:
    if not is_valid_id(name):
        raise TenantError("tenant names are 1-64 characters of A-Z a-z 0-9 _ -")
    try:
        async with conn.transaction():
            await conn.execute("INSERT INTO tenants (tenant_id) VALUES ($1)", name)
            await _create_default_policy(conn, name)
    except asyncpg.UniqueViolationError:
        raise TenantError(f"tenant {name!r} exists already") from None


async def _create_default_policy(conn: asyncpg.Connection, tenant: str) -> None:
    # Collect everything, keep 90 days: the admin narrows it (docs/policies.md).
    await conn.execute(
        "INSERT INTO policies (tenant_id, name, version, body, created_by) "
        "VALUES ($1, 'default', 1, $2, 'system') ON CONFLICT DO NOTHING",
        tenant, {"applies_to": {}})


async def ensure_tenant(conn: asyncpg.Connection, name: str) -> None:
    if not is_valid_id(name):
        raise TenantError("tenant names are 1-64 characters of A-Z a-z 0-9 _ -")
    async with conn.transaction():
        created = await conn.fetchval(
            "INSERT INTO tenants (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING "
            "RETURNING true", name)
        if created:
            await _create_default_policy(conn, name)


async def require_tenant(conn: asyncpg.Connection, name: str) -> None:
    """TenantError unless the tenant exists (commands that read a tenant say so
    instead of printing nothing)."""
    if not await conn.fetchval("SELECT true FROM tenants WHERE tenant_id = $1", name):
        raise TenantError(f"no tenant {name!r}")


async def list_tenants(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every tenant with its devices (enrolled, revoked) and working admin tokens."""
    return list(await conn.fetch(
        """SELECT t.tenant_id, t.created_at,
                  (SELECT count(*) FROM devices d WHERE d.tenant_id = t.tenant_id
                     AND d.status = 'enrolled') AS devices,
                  (SELECT count(*) FROM devices d WHERE d.tenant_id = t.tenant_id
                     AND d.status <> 'enrolled') AS revoked_devices,
                  (SELECT count(*) FROM api_tokens a WHERE a.tenant_id = t.tenant_id
                     AND a.role IN ('admin', 'auditor') AND a.revoked_at IS NULL
                     AND a.expires_at > now()) AS admins
           FROM tenants t ORDER BY t.tenant_id"""))
