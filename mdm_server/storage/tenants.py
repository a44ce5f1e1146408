"""Tenants and their API tokens."""

from __future__ import annotations

import hashlib
import secrets

import asyncpg

from agent_protocol import is_valid_id

__all__ = [
    "TenantError",
    "create_admin_token",
    "create_tenant",
    "create_user_token",
    "ensure_tenant",
    "hash_token",
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


async def create_admin_token(conn: asyncpg.Connection, *, tenant: str, name: str,
                             role: str = "admin") -> str:
    """Create an admin (or a read-only ``auditor``) of ``tenant``; return the bearer
    token (stored only hashed)."""
    if not name or len(name) > 200:
        raise TenantError("admin names are 1-200 characters")
    if role not in ("admin", "auditor"):
        raise TenantError("role must be admin or auditor")
    token = "mdm_" + secrets.token_urlsafe(32)
    try:
        await conn.execute(
            "INSERT INTO api_tokens (token_sha256, tenant_id, role, name) "
            "VALUES ($1, $2, $3, $4)",
            hash_token(token),
            tenant,
            role,
            name,
        )
    except asyncpg.ForeignKeyViolationError:
        raise TenantError(f"no tenant {tenant!r}") from None
    return token


async def create_user_token(conn: asyncpg.Connection, *, tenant: str, device: str) -> str:
    """A bearer token for the user of ``device`` (role ``user``): it reads that
    device's data, and that of the tenant's other devices with the same user
    e-mail, through /api/v1/me. Stored only hashed."""
    known = await conn.fetchval(
        "SELECT true FROM devices WHERE tenant_id = $1 AND device_id = $2", tenant, device)
    if not known:
        raise TenantError(f"no device {device!r} in tenant {tenant!r}")
    token = "mdu_" + secrets.token_urlsafe(32)
    await conn.execute(
        "INSERT INTO api_tokens (token_sha256, tenant_id, role, name, device_id) "
        "VALUES ($1, $2, 'user', $3, $4)",
        hash_token(token), tenant, f"user of {device}", device)
    return token
