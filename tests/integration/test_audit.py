"""The audit log on a real PostgreSQL: the chain, its verification, who may write."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from mdm_server import audit
from mdm_server.storage.pool import connect
from tests.support.services import REPO, Broker, Server, fetch, pg_admin_url, server_env

pytestmark = pytest.mark.integration

# `audit verify` needs no broker; the configuration only wants a well-formed URL.
NO_BROKER = "mqtt://127.0.0.1:1"


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mdm_server", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def _as_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


@asynccontextmanager
async def app_login_role(database: str, *, act_as_group: bool = False) -> AsyncIterator[str]:
    """A throwaway LOGIN role in mdm_app (trust auth); yields its URL for ``database``.

    ``act_as_group``: the deployment recipe of migration 004 (ALTER ROLE ... SET
    role = 'mdm_app'), so that what it creates is owned by mdm_app."""
    name = f"mdm_test_app_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_admin_url())
    try:
        await admin.execute(f'CREATE ROLE "{name}" LOGIN IN ROLE mdm_app')
        if act_as_group:
            await admin.execute(f"ALTER ROLE \"{name}\" SET role = 'mdm_app'")
        yield _as_user(database, name)
    finally:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE usename = $1", name)
        db = await asyncpg.connect(database)
        try:
            await db.execute(f'DROP OWNED BY "{name}"')
        finally:
            await db.close()
        await admin.execute(f'DROP ROLE "{name}"')
        await admin.close()


async def _with_conn(url: str, fn: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    conn = await connect(url)
    try:
        return await fn(conn)
    finally:
        await conn.close()


async def _append_some(conn: asyncpg.Connection, n: int, tenant: str = "acme") -> list[int]:
    return [await audit.append(conn, tenant=tenant, actor="alice", action="policy.put",
                               target=f"policy:p{i}", details={"version": i, "ok": True,
                                                               "nested": {"b": [1, "x"],
                                                                          "a": None}})
            for i in range(n)]


def test_appends_form_a_verifiable_chain(database: str) -> None:
    async def run(conn: asyncpg.Connection) -> None:
        assert str(await audit.verify(conn)) == "audit log OK: 0 entries"
        assert await _append_some(conn, 3) == [1, 2, 3]
        # Inside a transaction that rolls back: no entry, and no hole in seq either.
        with pytest.raises(ZeroDivisionError):
            async with conn.transaction():
                await audit.append(conn, tenant="acme", actor="bob", action="policy.delete",
                                   target="policy:p0")
                _ = 1 / 0
        async with conn.transaction():
            assert await audit.append(conn, tenant="other", actor="eve", action="admin.create",
                                      target="admin:eve") == 4
        await _append_some(conn, 2)

        result = await audit.verify(conn, prefetch=2)  # several cursor fetches
        assert result.ok and result.count == 6, result
        rows = await conn.fetch("SELECT seq, hash FROM audit_log ORDER BY seq")
        assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5, 6]
        assert result.head == rows[-1]["hash"]
        assert str(result) == "audit log OK: 6 entries"

        page1 = await audit.read(conn, "acme", limit=3)
        assert [e.seq for e in page1] == [6, 5, 3]
        page2 = await audit.read(conn, "acme", limit=3, before=page1[-1].seq)
        assert [e.seq for e in page2] == [2, 1]
        assert page2[-1].details == {"version": 0, "ok": True,
                                     "nested": {"a": None, "b": [1, "x"]}}
        assert page2[-1].prev_hash == audit.GENESIS
        assert [e.actor for e in await audit.read(conn, "other")] == ["eve"]

    asyncio.run(_with_conn(database, run))


def test_concurrent_appends_still_verify(database: str) -> None:
    async def writer(k: int) -> list[int]:
        conn = await connect(database)
        try:
            seqs = []
            for i in range(25):
                async with conn.transaction():
                    # Other work of the action, then the entry, then the commit.
                    await conn.execute("SELECT pg_sleep(0.001)")
                    seqs.append(await audit.append(
                        conn, tenant=f"t{k}", actor=f"admin{k}", action="command.issue",
                        target=f"device:d{i}", details={"n": i}))
            return seqs
        finally:
            await conn.close()

    async def run() -> None:
        results = await asyncio.gather(*(writer(k) for k in range(8)))
        seqs = sorted(s for r in results for s in r)
        assert seqs == list(range(1, 201))
        result = await _with_conn(database, audit.verify)
        assert result.ok and result.count == 200, result

    asyncio.run(run())


def test_app_role_cannot_change_the_log(database: str) -> None:
    async def run() -> None:
        await _with_conn(database, lambda c: _append_some(c, 2))
        async with app_login_role(database) as app_url:
            conn = await connect(app_url)
            try:
                assert await conn.fetchval("SELECT current_user") != "postgres"
                assert await conn.fetchval("SELECT rolsuper FROM pg_roles "
                                           "WHERE rolname = current_user") is False
                # Appending (SELECT + INSERT) works, as the server does it.
                async with conn.transaction():
                    assert await audit.append(conn, tenant="acme", actor="alice",
                                              action="policy.put", target="policy:x") == 3
                for sql in ("UPDATE audit_log SET actor = 'mallory' WHERE seq = 1",
                            "DELETE FROM audit_log WHERE seq = 1",
                            "TRUNCATE audit_log",
                            "ALTER TABLE audit_log DISABLE TRIGGER USER"):
                    with pytest.raises(asyncpg.InsufficientPrivilegeError) as err:
                        await conn.execute(sql)
                    # Refused by the privileges already, not only by the triggers.
                    assert ("permission denied" in str(err.value)
                            or "must be owner" in str(err.value)), (sql, err.value)
                result = await audit.verify(conn)
                assert result.ok and result.count == 3, result
            finally:
                await conn.close()

        # The triggers refuse the same to a superuser (who would have to disable them).
        async def as_superuser(conn: asyncpg.Connection) -> None:
            for sql in ("UPDATE audit_log SET actor = 'mallory' WHERE seq = 1",
                        "DELETE FROM audit_log WHERE seq = 1", "TRUNCATE audit_log"):
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                    await conn.execute(sql)
            assert await conn.fetchval("SELECT count(*) FROM audit_log") == 3

        await _with_conn(database, as_superuser)

    asyncio.run(run())


async def _untriggered(conn: asyncpg.Connection, *statements: str) -> None:
    """Run ``statements`` as the superuser with the log's triggers disabled."""
    async with conn.transaction():
        await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER USER")
        for sql in statements:
            await conn.execute(sql)
        await conn.execute("ALTER TABLE audit_log ENABLE TRIGGER USER")


_SWAP_CONTENTS = """
    UPDATE audit_log a SET at = b.at, tenant_id = b.tenant_id, actor = b.actor,
           action = b.action, target = b.target, details = b.details,
           prev_hash = b.prev_hash, hash = b.hash
    FROM audit_log b WHERE (a.seq, b.seq) IN ((3, 5), (5, 3))"""

TAMPERING: dict[str, tuple[list[str], int, str]] = {
    "edit actor": (["UPDATE audit_log SET actor = 'mallory' WHERE seq = 3"], 3,
                   "hash mismatch"),
    "edit details": (["""UPDATE audit_log SET details = jsonb_set(details, '{version}', '7')
                         WHERE seq = 3"""], 3, "hash mismatch"),
    "edit time": (["UPDATE audit_log SET at = at + interval '1 microsecond' WHERE seq = 3"],
                  3, "hash mismatch"),
    "edit hash": (["UPDATE audit_log SET hash = sha256(hash) WHERE seq = 3"], 3,
                  "hash mismatch"),
    "delete one": (["DELETE FROM audit_log WHERE seq = 3"], 4,
                   "gap in seq: entry 3 is missing"),
    "delete first": (["DELETE FROM audit_log WHERE seq = 1"], 2,
                     "gap in seq: entry 1 is missing"),
    "swap contents": ([_SWAP_CONTENTS], 3, "prev_hash mismatch"),
    "swap contents, hashes kept": (
        [_SWAP_CONTENTS,  # then put each row's own hashes back
         """UPDATE audit_log a SET prev_hash = b.prev_hash, hash = b.hash
            FROM audit_log b WHERE (a.seq, b.seq) IN ((3, 5), (5, 3))"""],
        3, "hash mismatch"),
    "swap seq": (["UPDATE audit_log SET seq = 1000 WHERE seq = 3",
                  "UPDATE audit_log SET seq = 3 WHERE seq = 5",
                  "UPDATE audit_log SET seq = 5 WHERE seq = 1000"], 3, "prev_hash mismatch"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_is_reported_at_the_first_broken_entry(database: str, case: str) -> None:
    statements, broken_at, reason = TAMPERING[case]
    env = server_env(database, NO_BROKER)

    before = _cli(env, "audit", "verify")
    assert (before.returncode, before.stdout) == (0, "audit log OK: 0 entries\n"), before.stderr

    async def tamper(conn: asyncpg.Connection) -> audit.VerifyResult:
        await _append_some(conn, 6)
        assert (await audit.verify(conn)).ok
        await _untriggered(conn, *statements)
        return await audit.verify(conn)

    result = asyncio.run(_with_conn(database, tamper))
    assert not result.ok
    assert result.seq == broken_at, result
    assert result.reason is not None and result.reason.startswith(reason), result
    assert result.count == broken_at - 1 - (1 if case.startswith("delete") else 0)

    after = _cli(env, "audit", "verify")
    assert after.returncode == 1, after.stderr
    assert after.stdout.startswith(f"audit log BROKEN at entry {broken_at}: {reason}")
    assert after.stdout == str(result) + "\n"


def test_admin_actions_are_logged_when_committed(database: str, broker: Broker,
                                                 tmp_path: Path) -> None:
    """The CLI and the policy API, run as a login role of mdm_app (as a deployment
    runs them), write an entry for each action that happened, and none for one
    that was refused."""
    async def run() -> None:
        async with app_login_role(database, act_as_group=True) as app_url:
            env = server_env(app_url, broker.url)
            for args in (("tenant", "create", "acme"), ("tenant", "create", "acme"),
                         ("device", "enroll", "--tenant", "acme", "--device", "phone-1",
                          "--ownership", "personal", "--user-email", "jo@example.com",
                          "--group", "field"),
                         ("device", "enroll", "--tenant", "nope", "--device", "d1",
                          "--ownership", "corporate")):
                await asyncio.to_thread(_cli, env, *args)
            admin = await asyncio.to_thread(_cli, env, "admin", "create", "--tenant", "acme",
                                            "--name", "alice")
            assert admin.returncode == 0, admin.stderr
            token = admin.stdout.strip()

            server = Server(env, tmp_path / "serve.log")
            await asyncio.to_thread(server.start)
            try:
                status, _ = await asyncio.to_thread(
                    server.request, "PUT", "/api/v1/policies/field", token,
                    {"applies_to": {"groups": ["field"]}})
                assert status == 201, server.log_text()[-2000:]
                status, _ = await asyncio.to_thread(
                    server.request, "PUT", "/api/v1/policies/field", token,
                    {"applies_to": {"groups": ["field"]}, "retention_days": {"default": 30}})
                assert status == 200
                status, _ = await asyncio.to_thread(
                    server.request, "PUT", "/api/v1/policies/bad", token, {"nope": 1})
                assert status == 422
                status, _ = await asyncio.to_thread(
                    server.request, "DELETE", "/api/v1/policies/field", token)
                assert status == 204
            finally:
                await asyncio.to_thread(server.stop)

            verified = await asyncio.to_thread(_cli, env, "audit", "verify", "--head")
            listed = await asyncio.to_thread(_cli, env, "audit", "list", "--tenant", "acme",
                                             "--limit", "2")

        rows = await fetch(database, "SELECT seq, tenant_id, actor, action, target, details "
                                     "FROM audit_log ORDER BY seq")
        assert [tuple(r.values()) for r in rows] == [
            (1, "acme", "cli", "tenant.create", "tenant:acme", {}),
            (2, "acme", "cli", "device.enroll", "device:phone-1",
             {"ownership": "personal", "groups": ["field"]}),
            (3, "acme", "cli", "admin.create", "admin:alice", {}),
            (4, "acme", "alice", "policy.put", "policy:field", {"version": 1}),
            (5, "acme", "alice", "policy.put", "policy:field", {"version": 2}),
            (6, "acme", "alice", "policy.delete", "policy:field", {"version": 3}),
        ]
        dump = await fetch(database, "SELECT details::text || target AS t FROM audit_log")
        assert not any("jo@example.com" in r["t"] for r in dump)
        head = (await fetch(database, "SELECT hash FROM audit_log WHERE seq = 6"))[0]["hash"]
        assert (verified.returncode, verified.stdout) == (
            0, f"audit log OK: 6 entries\nhead {head.hex()}\n"), verified.stderr
        lines = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [(e["seq"], e["action"]) for e in lines] == [(6, "policy.delete"),
                                                            (5, "policy.put")]

    asyncio.run(run())


def test_serve_refuses_a_role_that_could_unprotect_the_log(database: str, broker: Broker,
                                                            tmp_path: Path) -> None:
    superuser = server_env(database, NO_BROKER, superuser=True)
    refused = _cli(superuser, "serve")
    assert refused.returncode == 2
    assert refused.stderr.startswith("mdm-server: serve refuses to start: the database role "
                                     "postgres is a superuser (or may become one)")
    assert "MDM_ALLOW_PRIVILEGED_DB_ROLE=1" in refused.stderr

    # The owner of audit_log, though no superuser, could disable its triggers.
    owner = f"mdm_test_owner_{uuid.uuid4().hex[:8]}"

    async def make_owner(conn: asyncpg.Connection) -> None:
        await conn.execute(f"CREATE ROLE {owner} LOGIN")
        await conn.execute(f"ALTER TABLE audit_log OWNER TO {owner}")

    async def drop_owner(conn: asyncpg.Connection) -> None:
        await conn.execute("ALTER TABLE audit_log OWNER TO postgres")
        await conn.execute(f"DROP ROLE {owner}")

    asyncio.run(_with_conn(database, make_owner))
    try:
        parts = urlsplit(database)
        as_owner = urlunsplit(parts._replace(netloc=f"{owner}@{parts.hostname}:{parts.port}"))
        refused = _cli(server_env(as_owner, NO_BROKER), "serve")
        assert refused.returncode == 2
        assert f"the database role {owner} owns the table audit_log" in refused.stderr
    finally:
        asyncio.run(_with_conn(database, drop_owner))

    # The escape hatch for development: it starts, and says loudly what it allows.
    server = Server(server_env(database, broker.url, superuser=True,
                               MDM_ALLOW_PRIVILEGED_DB_ROLE="1"), tmp_path / "serve.log")
    server.start()
    try:
        assert server.request("GET", "/healthz")[0] == 200
    finally:
        server.stop()
    assert "WARNING: the database role postgres is a superuser" in server.log_text()


def test_migrate_makes_the_server_role(database: str) -> None:
    name = f"mdm_test_role_{uuid.uuid4().hex[:8]}"
    env = server_env(database, NO_BROKER, superuser=True,
                     MDM_SERVER_DB_PASSWORD="a-password-for-tests-only")
    try:
        made = _cli(env, "migrate", "--server-role", name)
        assert made.returncode == 0, made.stderr
        assert made.stdout == f"database is up to date\nserver role {name} created\n"
        again = _cli(env, "migrate", "--server-role", name)
        assert again.stdout.endswith(f"server role {name} is in line\n")
        role = asyncio.run(fetch(database, """
            SELECT r.rolcanlogin, r.rolsuper, pg_has_role(r.oid, 'mdm_app', 'MEMBER') AS member,
                   s.setconfig, a.rolpassword LIKE 'SCRAM-SHA-256$4096:%' AS scram
            FROM pg_roles r JOIN pg_authid a ON a.oid = r.oid
            LEFT JOIN pg_db_role_setting s ON s.setrole = r.oid AND s.setdatabase = 0
            WHERE r.rolname = $1""", name))
        assert [tuple(r.values()) for r in role] == [
            (True, False, True, ["role=mdm_app"], True)]
        # It can do what the server does (here: read and verify the log).
        parts = urlsplit(database)
        url = urlunsplit(parts._replace(netloc=f"{name}@{parts.hostname}:{parts.port}"))
        assert _cli(server_env(url, NO_BROKER), "audit", "verify").returncode == 0
        # A superuser is never made the server's role.
        refused = _cli(env, "migrate", "--server-role", "postgres")
        assert refused.returncode == 2
        assert "the role postgres exists and is a superuser" in refused.stderr
    finally:
        asyncio.run(_drop_role(name))


async def _drop_role(name: str) -> None:
    admin = await asyncpg.connect(pg_admin_url())
    try:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE usename = $1", name)
        await admin.execute(f'DROP ROLE IF EXISTS "{name}"')
    finally:
        await admin.close()
