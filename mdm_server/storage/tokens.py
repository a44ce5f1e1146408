"""API tokens: issued with an expiry, listed and revoked by a public id, and a device
user's token bound to the device's enrollment.

- **Secret and id.** The bearer token (``mdm_...`` for admins and auditors,
  ``mdu_...`` for device users, 256 random bits) is shown once and stored only as
  its SHA-256 digest. Its ``token_id`` is a random UUID made by the database:
  public (listed, audited, used to revoke), never derived from the secret.
- **Expiry.** Every token expires: admins and auditors after 90 days, device users
  after 30, unless ``expires_in_days`` (1-365) says otherwise. An expired or
  revoked token is refused on every route (mdm_server/api/auth.py).
- **Names.** An admin or auditor name is the actor of their audit entries, so a
  tenant has at most one working (unexpired, unrevoked) token per name:
  :func:`create_admin_token` refuses a second one unless ``rotate``, which revokes
  the old ones in the same transaction.
- **Device users.** A user token is issued for one device and covers, fixed at
  issue, that device and the tenant's other devices with the same user e-mail,
  each in the enrollment it is in then (``api_token_devices``). It covers a device
  only while that device is still in that enrollment (``device reenroll`` starts a
  new one: a new holder) and, for the other devices, still has that e-mail, and
  shows of it only what was recorded since the enrollment started
  (:func:`covered_devices`). ``device revoke``, ``device reenroll`` and a fulfilled
  erasure revoke the device's user tokens (:func:`revoke_device_user_tokens`).
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from mdm_server.storage.tenants import TenantError, hash_token

__all__ = [
    "ADMIN_DEFAULT_DAYS",
    "EXPIRES_MAX_DAYS",
    "EXPIRES_MIN_DAYS",
    "TOKEN_STATES",
    "USER_DEFAULT_DAYS",
    "Coverage",
    "IssuedToken",
    "covered_devices",
    "create_admin_token",
    "create_user_token",
    "list_tokens",
    "revoke_device_user_tokens",
    "revoke_token",
    "token_json",
]

ADMIN_DEFAULT_DAYS = 90
USER_DEFAULT_DAYS = 30
EXPIRES_MIN_DAYS, EXPIRES_MAX_DAYS = 1, 365
#: What ``state`` a listed token is in (and what a listing may filter on).
TOKEN_STATES = ("active", "expired", "revoked")

_SELECT = """SELECT token_id, role, name, device_id, created_at, expires_at, last_used_at,
                    revoked_at,
                    CASE WHEN revoked_at IS NOT NULL THEN 'revoked'
                         WHEN expires_at <= now() THEN 'expired' ELSE 'active' END AS state
             FROM api_tokens"""
_LIST = _SELECT + """
    WHERE tenant_id = $1
      AND ($2::text IS NULL
           OR ($2 = 'revoked' AND revoked_at IS NOT NULL)
           OR ($2 = 'expired' AND revoked_at IS NULL AND expires_at <= now())
           OR ($2 = 'active' AND revoked_at IS NULL AND expires_at > now()))
      AND ($4::timestamptz IS NULL OR (created_at, token_id) < ($4, $5::uuid))
    ORDER BY created_at DESC, token_id DESC LIMIT $3"""


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A new token: the secret (shown once, never stored) and what is public of it."""

    token: str
    token_id: uuid.UUID
    expires_at: datetime
    revoked: tuple[uuid.UUID, ...] = ()  # earlier tokens of the name (``rotate``)


@dataclass(frozen=True, slots=True)
class Coverage:
    """A device a user token covers, and since when it shows its data (the start of
    the enrollment the token was issued under)."""

    device: str
    since: datetime


def _iso(v: datetime | None) -> str | None:
    return None if v is None else v.isoformat()


def token_json(r: asyncpg.Record) -> dict[str, Any]:
    """A token as ``token list`` and ``GET /api/v1/tokens`` show it: never the
    token, nor its digest."""
    return {"id": str(r["token_id"]), "role": r["role"], "name": r["name"],
            "device": r["device_id"], "created_at": r["created_at"].isoformat(),
            "expires_at": r["expires_at"].isoformat(),
            "last_used_at": _iso(r["last_used_at"]), "revoked_at": _iso(r["revoked_at"]),
            "state": r["state"]}


def _days(expires_in_days: int | None, default: int) -> int:
    days = default if expires_in_days is None else expires_in_days
    if not EXPIRES_MIN_DAYS <= days <= EXPIRES_MAX_DAYS:
        raise TenantError(f"--expires-in is {EXPIRES_MIN_DAYS}-{EXPIRES_MAX_DAYS} days")
    return days


async def _insert(conn: asyncpg.Connection, token: str, tenant: str, role: str, name: str,
                  device: str | None, days: int) -> asyncpg.Record:
    row = await conn.fetchrow(
        "INSERT INTO api_tokens (token_sha256, tenant_id, role, name, device_id, expires_at) "
        "VALUES ($1, $2, $3, $4, $5, now() + make_interval(days => $6)) "
        "RETURNING token_id, expires_at",
        hash_token(token), tenant, role, name, device, days)
    assert row is not None
    return row


async def create_admin_token(conn: asyncpg.Connection, *, tenant: str, name: str,
                             role: str = "admin", expires_in_days: int | None = None,
                             rotate: bool = False) -> IssuedToken:
    """An admin (or a read-only ``auditor``) of ``tenant``. Refused if the name has a
    working token in the tenant already, unless ``rotate``: then those are revoked.
    Call inside a transaction (the revocation and the new token commit together)."""
    if not name or len(name) > 200:
        raise TenantError("admin names are 1-200 characters")
    if role not in ("admin", "auditor"):
        raise TenantError("role must be admin or auditor")
    days = _days(expires_in_days, ADMIN_DEFAULT_DAYS)
    # One create per tenant at a time, so two cannot both find the name free. NO KEY
    # UPDATE: inserts that reference the tenant (their foreign key) do not wait.
    if not await conn.fetchval(
            "SELECT true FROM tenants WHERE tenant_id = $1 FOR NO KEY UPDATE", tenant):
        raise TenantError(f"no tenant {tenant!r}")
    live = [r["token_id"] for r in await conn.fetch(
        "SELECT token_id FROM api_tokens WHERE tenant_id = $1 AND name = $2 "
        "AND role IN ('admin', 'auditor') AND revoked_at IS NULL AND expires_at > now() "
        "ORDER BY created_at", tenant, name)]
    if live and not rotate:
        raise TenantError(f"{name!r} has a working token in tenant {tenant!r} already: "
                          "--rotate revokes it and issues a new one")
    if live:
        await conn.execute("UPDATE api_tokens SET revoked_at = now() "
                           "WHERE token_id = ANY($1::uuid[])", live)
    token = "mdm_" + secrets.token_urlsafe(32)
    row = await _insert(conn, token, tenant, role, name, None, days)
    return IssuedToken(token, row["token_id"], row["expires_at"], tuple(live))


async def create_user_token(conn: asyncpg.Connection, *, tenant: str, device: str,
                            expires_in_days: int | None = None) -> IssuedToken:
    """A token for the user of ``device`` (role ``user``, the /api/v1/me API): it
    covers that device and the tenant's other devices with the same user e-mail, in
    their current enrollments (see the module's docstring). Stored only hashed."""
    days = _days(expires_in_days, USER_DEFAULT_DAYS)
    # FOR SHARE: a re-enrollment or an erasure of the device waits for this token
    # (and then revokes it), or this waits and sees their outcome.
    known = await conn.fetchval(
        "SELECT true FROM devices WHERE tenant_id = $1 AND device_id = $2 FOR SHARE",
        tenant, device)
    if not known:
        raise TenantError(f"no device {device!r} in tenant {tenant!r}")
    token = "mdu_" + secrets.token_urlsafe(32)
    row = await _insert(conn, token, tenant, "user", f"user of {device}", device, days)
    await conn.execute(
        """INSERT INTO api_token_devices (token_id, tenant_id, device_id, enrollment_no)
           SELECT $1, d.tenant_id, d.device_id, d.enrollment_no FROM devices d
           JOIN devices own ON own.tenant_id = d.tenant_id AND own.device_id = $3
           WHERE d.tenant_id = $2
             AND (d.device_id = own.device_id
                  OR (own.user_email IS NOT NULL AND d.user_email = own.user_email))""",
        row["token_id"], tenant, device)
    return IssuedToken(token, row["token_id"], row["expires_at"])


async def covered_devices(conn: asyncpg.Connection, token_id: uuid.UUID, tenant: str,
                          device: str) -> list[Coverage]:
    """The devices the user token ``token_id`` (issued for ``device``) covers now, by
    id: those it was issued for that are still in the same enrollment and (but its
    own) still have its device's user e-mail."""
    rows = await conn.fetch(
        """SELECT d.device_id, d.enrollment_started_at FROM api_token_devices c
           JOIN devices d ON d.tenant_id = c.tenant_id AND d.device_id = c.device_id
                         AND d.enrollment_no = c.enrollment_no
           JOIN devices own ON own.tenant_id = c.tenant_id AND own.device_id = $3
           WHERE c.token_id = $1 AND c.tenant_id = $2
             AND (d.device_id = own.device_id
                  OR (own.user_email IS NOT NULL AND d.user_email = own.user_email))
           ORDER BY d.device_id""", token_id, tenant, device)
    return [Coverage(r["device_id"], r["enrollment_started_at"]) for r in rows]


async def list_tokens(conn: asyncpg.Connection, tenant: str, *, state: str | None = None,
                      limit: int | None = None, after: uuid.UUID | None = None
                      ) -> list[asyncpg.Record] | None:
    """The tenant's tokens, newest first (:func:`token_json` shapes them); ``state``
    one of :data:`TOKEN_STATES` or None for all. ``after``: the id of the last token
    of the previous page (None if it is not a token of the tenant)."""
    start = None
    if after is not None:
        start = await conn.fetchrow("SELECT created_at, token_id FROM api_tokens "
                                    "WHERE tenant_id = $1 AND token_id = $2", tenant, after)
        if start is None:
            return None
    return list(await conn.fetch(_LIST, tenant, state, limit,
                                 None if start is None else start["created_at"],
                                 None if start is None else start["token_id"]))


async def revoke_token(conn: asyncpg.Connection, tenant: str, token_id: uuid.UUID
                       ) -> tuple[asyncpg.Record, bool] | None:
    """Revoke one of the tenant's tokens (inside a transaction): the token as listed
    now and whether this revoked it (False: it was revoked already); None if the
    tenant has no such token."""
    row = await conn.fetchrow("SELECT revoked_at FROM api_tokens "
                              "WHERE tenant_id = $1 AND token_id = $2 FOR UPDATE",
                              tenant, token_id)
    if row is None:
        return None
    changed = row["revoked_at"] is None
    if changed:
        await conn.execute("UPDATE api_tokens SET revoked_at = now() WHERE token_id = $1",
                           token_id)
    listed = await conn.fetchrow(_SELECT + " WHERE token_id = $1", token_id)
    assert listed is not None
    return listed, changed


async def revoke_device_user_tokens(conn: asyncpg.Connection, tenant: str, device: str
                                    ) -> list[uuid.UUID]:
    """Revoke the working user tokens issued for ``device`` (its enrollment ended, or
    its data was erased); their ids."""
    rows = await conn.fetch(
        "UPDATE api_tokens SET revoked_at = now() WHERE tenant_id = $1 AND device_id = $2 "
        "AND role = 'user' AND revoked_at IS NULL RETURNING token_id", tenant, device)
    return [r["token_id"] for r in rows]
