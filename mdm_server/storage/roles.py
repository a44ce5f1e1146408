"""The server's database role: which roles `serve` refuses, and how `migrate` makes one.

The audit log's append-only triggers hold only against roles that cannot disable
them: a superuser can, and so can the owner of ``audit_log`` (the migrating role)
and the owner of its schema (who may drop the table). The server runs as a LOGIN
role in the group ``mdm_app`` that acts as ``mdm_app`` (migration 004):
``mdm-server migrate --server-role NAME`` creates it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

import asyncpg

__all__ = ["RoleError", "ensure_server_role", "privileged_because", "scram_sha256_verifier"]

_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class RoleError(Exception):
    """The server's role cannot be made as asked; the message says why (no secrets)."""


async def privileged_because(conn: asyncpg.Connection, role: str | None = None
                             ) -> str | None:
    """Why ``role`` (default: this connection's login role) could set the audit
    log's protection aside (disable its triggers, alter or drop the table), or None
    if it cannot."""
    row = await conn.fetchrow(
        """WITH who AS (SELECT coalesce($1::name, session_user) AS r)
           SELECT EXISTS (SELECT 1 FROM pg_roles s
                          WHERE s.rolsuper AND pg_has_role(who.r, s.oid, 'MEMBER'))
                      AS superuser,
                  c.oid IS NOT NULL AND pg_has_role(who.r, c.relowner, 'MEMBER')
                      AS owns_table,
                  c.oid IS NOT NULL AND pg_has_role(who.r, n.nspowner, 'MEMBER')
                      AS owns_schema
           FROM who
           LEFT JOIN pg_class c ON c.oid = to_regclass('audit_log')
           LEFT JOIN pg_namespace n ON n.oid = c.relnamespace""", role)
    assert row is not None
    if row["superuser"]:
        return "is a superuser (or may become one)"
    if row["owns_table"]:
        return "owns the table audit_log (or may act as its owner)"
    if row["owns_schema"]:
        return "owns the schema of audit_log (or the database): it may drop the table"
    return None


def scram_sha256_verifier(password: str, *, salt: bytes | None = None,
                          iterations: int = 4096) -> str:
    """What PostgreSQL stores for a SCRAM-SHA-256 password (RFC 5802/7677), so that
    the password itself never reaches the server (or its statement log)."""
    salt = secrets.token_bytes(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


async def _execute_formatted(conn: asyncpg.Connection, template: str, *args: str) -> None:
    # Role statements take no parameters: PostgreSQL's format() quotes the values.
    sql: str = await conn.fetchval("SELECT format($1::text, VARIADIC $2::text[])",
                                   template, list(args))
    await conn.execute(sql)


async def ensure_server_role(conn: asyncpg.Connection, name: str,
                             password: str | None) -> bool:
    """Make ``name`` the server's role: a LOGIN role, member of ``mdm_app``, acting as
    ``mdm_app`` in every session; created if missing (True), else brought in line.
    ``password`` (printable ASCII, 16+ characters) is set when given, as a SCRAM
    verifier. Needs a superuser (or CREATEROLE and admin of mdm_app); run it after
    the migrations, which create mdm_app."""
    if not _ROLE_NAME.fullmatch(name):
        raise RoleError("the server's role name must be 1-63 characters of a-z 0-9 _ "
                        "(not starting with a digit)")
    if password is not None and not (len(password) >= 16 and password.isascii()
                                     and password.isprintable()):
        raise RoleError("MDM_SERVER_DB_PASSWORD must be at least 16 printable ASCII "
                        "characters")
    if await conn.fetchval("SELECT NOT EXISTS (SELECT 1 FROM pg_roles "
                           "WHERE rolname = 'mdm_app')"):
        raise RoleError("the group role mdm_app does not exist: run the migrations first")
    created = False
    async with conn.transaction():
        exists = await conn.fetchval("SELECT true FROM pg_roles WHERE rolname = $1", name)
        if not exists:
            try:
                async with conn.transaction():
                    await _execute_formatted(conn, "CREATE ROLE %I LOGIN IN ROLE mdm_app",
                                             name)
                created = True
            except (asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
                pass  # made at the same moment by another migrate
        why = await privileged_because(conn, name)
        if why is None and await conn.fetchval(
                "SELECT rolcreaterole OR rolbypassrls FROM pg_roles WHERE rolname = $1", name):
            why = "may create roles or bypass row security"
        if why is not None:
            raise RoleError(f"the role {name} exists and {why}: choose another name for the "
                            "server's role")
        await _execute_formatted(conn, "ALTER ROLE %I LOGIN", name)
        await _execute_formatted(conn, "GRANT mdm_app TO %I", name)
        await _execute_formatted(conn, "ALTER ROLE %I SET role = %L", name, "mdm_app")
        if password is not None:
            await _execute_formatted(conn, "ALTER ROLE %I PASSWORD %L", name,
                                     scram_sha256_verifier(password))
    return created
