"""The audit log on a real PostgreSQL: keyed per-tenant chains, their verification,
checkpoints, who may write, and what a forged entry gets (nothing)."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest

from mdm_server import audit
from mdm_server.storage.migrate import apply_migrations, available_migrations
from mdm_server.storage.pool import connect
from tests.support.services import (
    REPO,
    TEST_SERVER_ROLE,
    Broker,
    Server,
    as_server_role,
    audit_keys_for_tests,
    create_database,
    drop_database,
    fetch,
    pg_admin_url,
    server_env,
)

pytestmark = pytest.mark.integration

# `audit verify` needs no broker; the configuration only wants a well-formed URL.
NO_BROKER = "mqtt://127.0.0.1:1"
KEYS = audit_keys_for_tests()


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mdm_server", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


async def _with_conn(url: str, fn: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
    conn = await connect(url)
    try:
        return await fn(conn)
    finally:
        await conn.close()


async def _append_some(conn: asyncpg.Connection, n: int, tenant: str | None = "acme"
                       ) -> list[int]:
    return [await audit.append(conn, KEYS, tenant=tenant, actor="alice", action="policy.put",
                               target=f"policy:p{i}", details={"version": i, "ok": True,
                                                               "nested": {"b": [1, "x"],
                                                                          "a": None}})
            for i in range(n)]


async def _untriggered(conn: asyncpg.Connection, *statements: str) -> None:
    """Run ``statements`` as the superuser with the log's triggers disabled: what
    the table's owner can do."""
    async with conn.transaction():
        await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER USER")
        for sql in statements:
            await conn.execute(sql)
        await conn.execute("ALTER TABLE audit_log ENABLE TRIGGER USER")


async def _rechain_without_key(conn: asyncpg.Connection, chain: str, remove: int) -> None:
    """The attack of someone who owns the database but has no master key: remove
    entry ``remove`` from the middle of a chain, renumber the rest and chain them
    again with plain SHA-256 (the format before migration 011)."""
    async with conn.transaction():
        await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER USER")
        await conn.execute("DELETE FROM audit_log WHERE chain = $1 AND seq = $2", chain, remove)
        prev = bytes(await conn.fetchval(
            "SELECT hash FROM audit_log WHERE chain = $1 AND seq = $2", chain, remove - 1))
        for r in await conn.fetch(
                "SELECT seq, at, tenant_id, actor, action, target, details::text AS details "
                "FROM audit_log WHERE chain = $1 AND seq > $2 ORDER BY seq", chain, remove):
            digest = audit.legacy_hash(prev, seq=r["seq"] - 1, at=r["at"],
                                       tenant=r["tenant_id"], actor=r["actor"],
                                       action=r["action"], target=r["target"],
                                       details=orjson.loads(r["details"]))
            await conn.execute(
                "UPDATE audit_log SET seq = $3, prev_hash = $4, hash = $5 "
                "WHERE chain = $1 AND seq = $2", chain, r["seq"], r["seq"] - 1, prev, digest)
            prev = digest
        await conn.execute("ALTER TABLE audit_log ENABLE TRIGGER USER")


# --- the chains --------------------------------------------------------------------

def test_appends_form_verifiable_chains_one_per_tenant(database: str) -> None:
    async def run(conn: asyncpg.Connection) -> None:
        assert str(await audit.verify(conn, KEYS)) == "audit log OK: 0 entries in 0 chain(s)"
        assert await _append_some(conn, 3) == [1, 2, 3]
        # Inside a transaction that rolls back: no entry, and no hole in seq either.
        with pytest.raises(ZeroDivisionError):
            async with conn.transaction():
                await audit.append(conn, KEYS, tenant="acme", actor="bob",
                                   action="policy.delete", target="policy:p0")
                _ = 1 / 0
        async with conn.transaction():
            # Another tenant's chain starts at 1: its numbers say nothing about acme's.
            assert await audit.append(conn, KEYS, tenant="other", actor="eve",
                                      action="admin.create", target="admin:eve") == 1
        await _append_some(conn, 2)
        assert await _append_some(conn, 1, tenant=None) == [1]  # entries of no tenant

        result = await audit.verify(conn, KEYS, prefetch=2)  # several cursor fetches
        assert result.ok and result.count == 7, result
        assert str(result) == "audit log OK: 7 entries in 3 chain(s)"
        assert [(h.tenant, h.seq) for h in result.heads] == [(None, 1), ("acme", 5),
                                                             ("other", 1)]
        rows = await conn.fetch("SELECT chain, seq, hash FROM audit_log ORDER BY chain, seq")
        assert [(r["chain"], r["seq"]) for r in rows] == [
            ("", 1), ("acme", 1), ("acme", 2), ("acme", 3), ("acme", 4), ("acme", 5),
            ("other", 1)]
        assert result.heads[1].hash == rows[5]["hash"]

        page1 = await audit.read(conn, KEYS, "acme", limit=3)
        assert [e.seq for e in page1] == [5, 4, 3]
        page2 = await audit.read(conn, KEYS, "acme", limit=3, before=page1[-1].seq)
        assert [e.seq for e in page2] == [2, 1]
        assert page2[-1].details == {"version": 0, "ok": True,
                                     "nested": {"a": None, "b": [1, "x"]}}
        assert page2[-1].prev_hash == audit.GENESIS
        assert {e.integrity for e in page1 + page2} == {"verified"}
        assert [e.actor for e in await audit.read(conn, KEYS, "other")] == ["eve"]

        # Under another master key nothing verifies: the MACs are keyed.
        other_keys = audit.AuditKeys.derive(bytes(range(32)))
        assert {e.integrity for e in await audit.read(conn, other_keys, "acme")} == {
            "invalid"}
        wrong = await audit.verify(conn, other_keys)
        assert not wrong.ok
        assert [str(p) for p in wrong.problems] == [
            f"{where}, entry 1: MAC mismatch: the entry was changed, or not written with "
            "this master key" for where in ("entries of no tenant", "tenant acme",
                                            "tenant other")]

    asyncio.run(_with_conn(database, run))


def test_concurrent_appends_still_verify(database: str) -> None:
    """Eight writers in three tenants: each tenant's chain is gap-free and whole."""
    async def writer(k: int) -> list[tuple[str, int]]:
        conn = await connect(database)
        try:
            seqs = []
            for i in range(25):
                async with conn.transaction():
                    # Other work of the action, then the entry, then the commit.
                    await conn.execute("SELECT pg_sleep(0.001)")
                    tenant = f"t{k % 3}"
                    seqs.append((tenant, await audit.append(
                        conn, KEYS, tenant=tenant, actor=f"admin{k}",
                        action="command.issue", target=f"device:d{i}", details={"n": i})))
            return seqs
        finally:
            await conn.close()

    async def run() -> None:
        results = await asyncio.gather(*(writer(k) for k in range(8)))
        by_tenant: dict[str, list[int]] = {}
        for tenant, seq in (s for r in results for s in r):
            by_tenant.setdefault(tenant, []).append(seq)
        # t0 has writers 0, 3, 6; t1 has 1, 4, 7; t2 has 2, 5.
        assert {t: sorted(s) for t, s in by_tenant.items()} == {
            "t0": list(range(1, 76)), "t1": list(range(1, 76)), "t2": list(range(1, 51))}
        result = await _with_conn(database, lambda c: audit.verify(c, KEYS))
        assert result.ok and result.count == 200, result

    asyncio.run(run())


def test_tenants_do_not_wait_for_each_other(database: str) -> None:
    """An action of acme that has appended but not committed holds up acme's next
    audited action, not other's."""
    async def run() -> None:
        first, second, elsewhere = [await connect(database) for _ in range(3)]
        try:
            tx = first.transaction()
            await tx.start()
            assert await audit.append(first, KEYS, tenant="acme", actor="alice",
                                      action="policy.put", target="policy:a") == 1
            assert await asyncio.wait_for(audit.append(
                elsewhere, KEYS, tenant="other", actor="eve", action="policy.put",
                target="policy:b"), timeout=5) == 1
            waiting = asyncio.create_task(audit.append(
                second, KEYS, tenant="acme", actor="bob", action="policy.put",
                target="policy:c"))
            await asyncio.sleep(0.5)
            assert not waiting.done()
            await tx.commit()
            assert await asyncio.wait_for(waiting, timeout=5) == 2
            assert (await audit.verify(elsewhere, KEYS)).ok
        finally:
            for conn in (first, second, elsewhere):
                await conn.close()

    asyncio.run(run())


# --- who may write -------------------------------------------------------------------

def test_the_server_role_cannot_change_or_unprotect_the_log(database: str) -> None:
    async def run() -> None:
        await _with_conn(database, lambda c: _append_some(c, 2))
        conn = await connect(as_server_role(database))
        try:
            who = await conn.fetchrow(
                "SELECT session_user AS login, current_user AS acting, "
                "(SELECT rolsuper FROM pg_roles WHERE rolname = session_user) AS super")
            assert tuple(who.values()) == (TEST_SERVER_ROLE, "mdm_app", False)
            # Appending (SELECT + INSERT) works, as the server does it.
            async with conn.transaction():
                assert await audit.append(conn, KEYS, tenant="acme", actor="alice",
                                          action="policy.put", target="policy:x") == 3
            for sql in ("UPDATE audit_log SET actor = 'mallory' WHERE seq = 1",
                        "DELETE FROM audit_log WHERE seq = 1",
                        "TRUNCATE audit_log",
                        "ALTER TABLE audit_log DISABLE TRIGGER USER",
                        "ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_change",
                        "ALTER TABLE audit_log DROP CONSTRAINT audit_log_pkey",
                        "DROP TABLE audit_log",
                        "SET ROLE postgres",
                        # Passing a forged entry off as one written before the keys:
                        """INSERT INTO audit_log (seq, at, tenant_id, actor, action, target,
                                                  prev_hash, hash, legacy_seq)
                           VALUES (9, now(), 'acme', 'bob', 'x', 'y', sha256(''),
                                   sha256(''), 1)"""):
                with pytest.raises(asyncpg.InsufficientPrivilegeError) as err:
                    await conn.execute(sql)
                # Refused by the privileges already, not only by the triggers.
                assert ("permission denied" in str(err.value)
                        or "must be owner" in str(err.value)), (sql, err.value)
            result = await audit.verify(conn, KEYS)
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


# --- tampering by the database's owner -------------------------------------------------

_SWAP_CONTENTS = """
    UPDATE audit_log a SET at = b.at, actor = b.actor, action = b.action,
           target = b.target, details = b.details, prev_hash = b.prev_hash, hash = b.hash
    FROM audit_log b WHERE a.chain = 'acme' AND b.chain = 'acme'
      AND (a.seq, b.seq) IN ((3, 5), (5, 3))"""

# name: (statements as the owner, chain label, broken entry, reason)
TAMPERING: dict[str, tuple[list[str], str, int, str]] = {
    "edit actor": (["UPDATE audit_log SET actor = 'mallory' WHERE chain = 'acme' AND seq = 3"],
                   "tenant acme", 3, "MAC mismatch"),
    "edit details": (["""UPDATE audit_log SET details = jsonb_set(details, '{version}', '7')
                         WHERE chain = 'acme' AND seq = 3"""], "tenant acme", 3, "MAC mismatch"),
    "edit time": (["UPDATE audit_log SET at = at + interval '1 microsecond' "
                   "WHERE chain = 'acme' AND seq = 3"], "tenant acme", 3, "MAC mismatch"),
    "edit hash": (["UPDATE audit_log SET hash = sha256(hash) WHERE chain = 'acme' AND seq = 3"],
                  "tenant acme", 3, "MAC mismatch"),
    "move to another tenant": (
        ["UPDATE audit_log SET tenant_id = 'other', seq = 7 WHERE chain = 'acme' AND seq = 6"],
        "tenant other", 7, "prev_hash mismatch"),
    "delete one": (["DELETE FROM audit_log WHERE chain = 'acme' AND seq = 3"], "tenant acme", 4,
                   "gap in seq: entry 3 is missing"),
    "delete first": (["DELETE FROM audit_log WHERE chain = 'acme' AND seq = 1"], "tenant acme",
                     2, "gap in seq: entry 1 is missing"),
    "swap contents": ([_SWAP_CONTENTS], "tenant acme", 3, "prev_hash mismatch"),
    "swap contents, hashes kept": (
        [_SWAP_CONTENTS,  # then put each row's own hashes back
         """UPDATE audit_log a SET prev_hash = b.prev_hash, hash = b.hash
            FROM audit_log b WHERE a.chain = 'acme' AND b.chain = 'acme'
              AND (a.seq, b.seq) IN ((3, 5), (5, 3))"""],
        "tenant acme", 3, "MAC mismatch"),
    "swap seq": (["UPDATE audit_log SET seq = 1000 WHERE chain = 'acme' AND seq = 3",
                  "UPDATE audit_log SET seq = 3 WHERE chain = 'acme' AND seq = 5",
                  "UPDATE audit_log SET seq = 5 WHERE chain = 'acme' AND seq = 1000"],
                 "tenant acme", 3, "prev_hash mismatch"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_is_reported_at_the_first_broken_entry(database: str, case: str) -> None:
    statements, chain, broken_at, reason = TAMPERING[case]
    env = server_env(database, NO_BROKER)

    before = _cli(env, "audit", "verify")
    assert (before.returncode, before.stdout) == (
        0, "audit log OK: 0 entries in 0 chain(s)\n"), before.stderr

    async def tamper(conn: asyncpg.Connection) -> audit.VerifyResult:
        await _append_some(conn, 6)
        await _append_some(conn, 6, tenant="other")
        assert (await audit.verify(conn, KEYS)).ok
        await _untriggered(conn, *statements)
        return await audit.verify(conn, KEYS)

    result = asyncio.run(_with_conn(database, tamper))
    assert not result.ok
    [problem] = result.problems  # the other chain is intact
    assert (problem.where, problem.seq) == (chain, broken_at), result
    assert problem.reason.startswith(reason), result

    after = _cli(env, "audit", "verify")
    assert after.returncode == 1, after.stderr
    assert after.stdout == f"audit log BROKEN: {chain}, entry {broken_at}: {problem.reason}\n"


def test_an_owner_without_the_master_key_cannot_rechain(database: str) -> None:
    """The auditor's attack on the old format: a superuser removes an entry from the
    middle and re-chains the rest with plain SHA-256. Keyed, it is found at once."""
    env = server_env(database, NO_BROKER)

    async def run(conn: asyncpg.Connection) -> None:
        await _append_some(conn, 6)
        await _rechain_without_key(conn, "acme", remove=3)
        assert await conn.fetchval("SELECT count(*) FROM audit_log") == 5

    asyncio.run(_with_conn(database, run))
    result = _cli(env, "audit", "verify")
    assert (result.returncode, result.stdout) == (
        1, "audit log BROKEN: tenant acme, entry 3: MAC mismatch: the entry was changed, "
           "or not written with this master key\n"), result.stderr


# --- checkpoints -----------------------------------------------------------------------

def test_checkpoints_catch_what_the_chains_alone_cannot(database: str, tmp_path: Path
                                                        ) -> None:
    env = server_env(database, NO_BROKER)
    cp = tmp_path / "audit.checkpoint"

    async def append(tenant: str | None, n: int) -> None:
        await _with_conn(database, lambda c: _append_some(c, n, tenant=tenant))

    asyncio.run(append("acme", 6))
    asyncio.run(append("other", 2))
    asyncio.run(append(None, 1))
    made = _cli(env, "audit", "checkpoint", "--out", str(cp))
    assert made.returncode == 0, made.stderr
    assert "checkpoint: 9 entries in 3 chain(s), written to" in made.stderr
    doc = json.loads(cp.read_text())
    assert [(c["tenant"], c["seq"]) for c in doc["chains"]] == [(None, 1), ("acme", 6),
                                                                ("other", 2)]
    # To stdout, the same heads.
    printed = _cli(env, "audit", "checkpoint")
    assert printed.returncode == 0
    assert json.loads(printed.stdout)["chains"] == doc["chains"]

    # Untouched: it holds; and entries appended after it verify too.
    ok = _cli(env, "audit", "verify", "--checkpoint", str(cp))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    asyncio.run(append("acme", 2))
    asyncio.run(append("newco", 1))
    ok = _cli(env, "audit", "verify", "--checkpoint", str(cp))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("audit log OK: 12 entries in 4 chain(s)\ncheckpoint of ")

    # The newest entries removed (here: all those after the checkpoint, and one of
    # it): the chain still verifies on its own, the checkpoint shows the loss.
    asyncio.run(_with_conn(database, lambda c: _untriggered(
        c, "DELETE FROM audit_log WHERE chain = 'acme' AND seq >= 6")))
    alone = _cli(env, "audit", "verify")
    assert alone.returncode == 0, alone.stdout  # what a chain cannot show by itself
    truncated = _cli(env, "audit", "verify", "--checkpoint", str(cp))
    assert (truncated.returncode, truncated.stdout) == (
        1, "audit log BROKEN: tenant acme: the newest entries are missing: the chain ends "
           "at entry 5, the checkpoint has entry 6\n")

    # A whole chain removed.
    asyncio.run(_with_conn(database, lambda c: _untriggered(
        c, "DELETE FROM audit_log WHERE chain = 'other'")))
    gone = _cli(env, "audit", "verify", "--checkpoint", str(cp))
    assert gone.returncode == 1
    assert "audit log BROKEN: tenant other: the chain is missing: the checkpoint has 2 " \
           "entries in it\n" in gone.stdout

    # A checkpoint of a broken log is refused: it would bless the damage.
    asyncio.run(_with_conn(database, lambda c: _untriggered(
        c, "UPDATE audit_log SET actor = 'mallory' WHERE chain = 'acme' AND seq = 2")))
    refused = _cli(env, "audit", "checkpoint", "--out", str(tmp_path / "new.checkpoint"))
    assert refused.returncode == 1
    assert "no checkpoint of a log that does not verify" in refused.stderr
    assert not (tmp_path / "new.checkpoint").exists()


def test_a_changed_entry_before_the_checkpoint_fails(database: str, tmp_path: Path) -> None:
    env = server_env(database, NO_BROKER)
    cp = tmp_path / "audit.checkpoint"
    asyncio.run(_with_conn(database, lambda c: _append_some(c, 4)))
    assert _cli(env, "audit", "checkpoint", "--out", str(cp)).returncode == 0
    asyncio.run(_with_conn(database, lambda c: _untriggered(
        c, "UPDATE audit_log SET target = 'policy:other' WHERE chain = 'acme' AND seq = 2")))
    result = _cli(env, "audit", "verify", "--checkpoint", str(cp))
    assert result.returncode == 1
    assert result.stdout.startswith("audit log BROKEN: tenant acme, entry 2: MAC mismatch")


def test_a_forged_checkpoint_is_refused(database: str, tmp_path: Path) -> None:
    env = server_env(database, NO_BROKER)
    cp = tmp_path / "audit.checkpoint"
    asyncio.run(_with_conn(database, lambda c: _append_some(c, 4)))
    assert _cli(env, "audit", "checkpoint", "--out", str(cp)).returncode == 0
    doc = json.loads(cp.read_text())

    def refused(text: str) -> subprocess.CompletedProcess[str]:
        forged = tmp_path / "forged.checkpoint"
        forged.write_text(text)
        return _cli(env, "audit", "verify", "--checkpoint", str(forged))

    # Edited to allow a truncation (seq lowered), its MAC left as it was.
    edited = {**doc, "chains": [{**doc["chains"][0], "seq": 2}]}
    out = refused(json.dumps(edited))
    assert (out.returncode, out.stdout) == (
        1, "audit checkpoint REFUSED: its signature does not verify: it was edited, or "
           "not made with this master key\n")
    # Made under another master key (e.g. by someone who guessed the format).
    other = {**server_env(database, NO_BROKER),
             "MDM_MASTER_KEY": base64.b64encode(bytes(range(32))).decode()}
    elsewhere = _cli(other, "audit", "checkpoint")
    # Not this database's master key: refused before anything is read or written.
    assert elsewhere.returncode == 2
    assert "not this database's master key" in elsewhere.stderr
    forged = audit.Checkpoint.loads(cp.read_bytes(), KEYS).dumps(
        audit.AuditKeys.derive(bytes(range(32))))
    assert refused(forged.decode()).returncode == 1
    assert refused("not a checkpoint").stdout.startswith("audit checkpoint REFUSED: it is "
                                                         "not an audit checkpoint")
    # A file that is not there is a usage error.
    missing = _cli(env, "audit", "verify", "--checkpoint", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert "the checkpoint file cannot be read" in missing.stderr


# --- entries written before migration 011 ------------------------------------------------

async def _database_with_legacy_entries() -> tuple[str, list[bytes]]:
    """A database migrated up to (not including) 011 with five entries written by
    the old rule (one global chain, plain SHA-256), then migrated to the end."""
    url = await create_database(migrate=False)
    conn = await connect(url)
    try:
        await conn.execute("""CREATE TABLE schema_migrations (
                                  version integer PRIMARY KEY, name text NOT NULL,
                                  applied_at timestamptz NOT NULL DEFAULT now())""")
        for mig in available_migrations():
            if mig.version >= 11:
                break
            async with conn.transaction():
                await conn.execute(mig.sql)
                await conn.execute("INSERT INTO schema_migrations (version, name) "
                                   "VALUES ($1, $2)", mig.version, mig.name)
        prev, hashes = audit.GENESIS, []
        for seq, tenant in enumerate(["acme", "other", "acme", None, "acme"], start=1):
            at = datetime.now(UTC)
            fields: dict[str, Any] = {"tenant": tenant, "actor": "cli",
                                      "action": "tenant.create", "target": f"n:{seq}",
                                      "details": {"n": seq}}
            digest = audit.legacy_hash(prev, seq=seq, at=at, **fields)
            await conn.execute(
                "INSERT INTO audit_log (seq, at, tenant_id, actor, action, target, details, "
                "prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                seq, at, tenant, "cli", "tenant.create", f"n:{seq}", {"n": seq}, prev, digest)
            prev = digest
            hashes.append(digest)
        await apply_migrations(conn)
    finally:
        await conn.close()
    return url, hashes


async def _rewrite_legacy(conn: asyncpg.Connection) -> None:
    """Change legacy entry 2 and re-chain every legacy entry by the old rule: what
    anyone who could write the table could always do to the old format."""
    await _untriggered(conn, "UPDATE audit_log SET actor = 'mallory' WHERE legacy_seq = 2")
    prev = audit.GENESIS
    for r in await conn.fetch(
            "SELECT legacy_seq, at, tenant_id, actor, action, target, details::text AS d "
            "FROM audit_log WHERE legacy_seq IS NOT NULL ORDER BY legacy_seq"):
        digest = audit.legacy_hash(prev, seq=r["legacy_seq"], at=r["at"],
                                   tenant=r["tenant_id"], actor=r["actor"],
                                   action=r["action"], target=r["target"],
                                   details=orjson.loads(r["d"]))
        await _untriggered(conn, f"UPDATE audit_log SET prev_hash = '\\x{prev.hex()}', "
                                 f"hash = '\\x{digest.hex()}' "
                                 f"WHERE legacy_seq = {r['legacy_seq']}")
        prev = digest


def test_legacy_entries_keep_their_rule_and_are_pinned_by_the_keyed_chain() -> None:
    async def run() -> None:
        url, hashes = await _database_with_legacy_entries()
        try:
            conn = await connect(url)
            try:
                rows = await conn.fetch("SELECT chain, seq, legacy_seq FROM audit_log "
                                        "ORDER BY legacy_seq")
                # Numbered per tenant now; the global number kept for the old rule.
                assert [tuple(r.values()) for r in rows] == [
                    ("acme", 1, 1), ("other", 1, 2), ("acme", 2, 3), ("", 1, 4), ("acme", 3, 5)]
                result = await audit.verify(conn, KEYS)
                assert str(result) == ("audit log OK: 5 entries in 3 chain(s), 5 of them "
                                       "legacy (unkeyed, written before migration 011)")
                assert result.legacy == audit.LegacyHead(5, hashes[-1])

                # New entries continue each tenant's numbers; the first keyed entry
                # of a chain names the last legacy hash.
                assert await audit.append(conn, KEYS, tenant="acme", actor="alice",
                                          action="policy.put", target="policy:p") == 4
                assert await audit.append(conn, KEYS, tenant="newco", actor="cli",
                                          action="tenant.create", target="tenant:newco") == 1
                first = await conn.fetch("SELECT prev_hash FROM audit_log "
                                         "WHERE legacy_seq IS NULL")
                assert {bytes(r["prev_hash"]) for r in first} == {hashes[-1]}
                assert (await audit.verify(conn, KEYS)).ok
                assert [e.integrity for e in await audit.read(conn, KEYS, "acme")] == [
                    "verified", "legacy", "legacy", "legacy"]

                # Rewritten consistently by the old rule, the legacy entries alone
                # would pass; the keyed entries that pinned them do not.
                await _rewrite_legacy(conn)
                broken = await audit.verify(conn, KEYS)
                assert [str(p) for p in broken.problems] == [
                    f"{where}: prev_hash mismatch: it is not the hash of the last legacy "
                    "entry (the legacy entries were rewritten, or this entry was)"
                    for where in ("tenant acme, entry 4", "tenant newco, entry 1")]
            finally:
                await conn.close()
        finally:
            await drop_database(url)

    asyncio.run(run())


def test_legacy_entries_alone_are_only_as_strong_as_the_old_rule() -> None:
    """Before any keyed entry pins them, a consistent rewrite of the legacy entries
    passes `verify` (what docs/architecture.md says); a checkpoint taken after the
    migration catches it."""
    async def run() -> None:
        url, _ = await _database_with_legacy_entries()
        try:
            conn = await connect(url)
            try:
                _, checkpoint = await audit.make_checkpoint(conn, KEYS)
                assert checkpoint is not None
                await _rewrite_legacy(conn)
                assert (await audit.verify(conn, KEYS)).ok
                result = await audit.verify(conn, KEYS, checkpoint=checkpoint)
                # Legacy entry 2 (tenant other's) was changed: every chain whose
                # checkpointed head came after it differs from the checkpoint.
                assert [str(p) for p in result.problems] == [
                    "the legacy entries (written before migration 011): not those of the "
                    "checkpoint: they were rewritten"] + [
                    f"{where}: not the entry of the checkpoint: the log was rewritten at or "
                    "before this entry" for where in ("entries of no tenant, entry 1",
                                                      "tenant acme, entry 3",
                                                      "tenant other, entry 1")]
            finally:
                await conn.close()
        finally:
            await drop_database(url)

    asyncio.run(run())


# --- through the real server ---------------------------------------------------------

def test_a_forged_read_never_reaches_the_users_access_log(database: str, broker: Broker,
                                                          tmp_path: Path) -> None:
    """The server's own role appends "bob read data:location": the user's access
    log does not show it, the admins' listing flags it, `audit verify` names it.
    Also: each tenant's admins see their own numbering, untouched by others."""
    env = server_env(database, broker.url)
    assert urlsplit(env["MDM_DATABASE_URL"]).username == TEST_SERVER_ROLE
    for args in (("tenant", "create", "acme"), ("tenant", "create", "other"),
                 ("device", "enroll", "--tenant", "acme", "--device", "phone-1",
                  "--ownership", "personal", "--user-email", "jo@example.com")):
        assert _cli(env, *args).returncode == 0
    alice = _cli(env, "admin", "create", "--tenant", "acme", "--name", "alice").stdout.strip()
    eve = _cli(env, "admin", "create", "--tenant", "other", "--name", "eve").stdout.strip()
    jo = _cli(env, "user", "token", "--tenant", "acme", "--device", "phone-1").stdout.strip()

    server = Server(env, tmp_path / "serve.log")
    server.start()
    try:
        status, others_before = server.request("GET", "/api/v1/audit", eve)
        assert status == 200
        assert [(e["seq"], e["action"]) for e in others_before["entries"]] == [
            (2, "admin.create"), (1, "tenant.create")]

        assert server.request("GET", "/api/v1/devices/phone-1", alice)[0] == 200

        async def forge() -> int:
            conn = await connect(as_server_role(database))
            try:
                last = await conn.fetchrow("SELECT seq, hash FROM audit_log "
                                           "WHERE chain = 'acme' ORDER BY seq DESC LIMIT 1")
                seq, at = last["seq"] + 1, datetime.now(UTC)
                fields: dict[str, Any] = {
                    "tenant": "acme", "actor": "bob", "action": "personal_data.read",
                    "target": "device:phone-1",
                    "details": {"what": "data:location", "role": "admin"}}
                digest = audit.legacy_hash(bytes(last["hash"]), seq=seq, at=at, **fields)
                await conn.execute(
                    "INSERT INTO audit_log (seq, at, tenant_id, actor, action, target, "
                    "details, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    seq, at, "acme", "bob", "personal_data.read", "device:phone-1",
                    fields["details"], bytes(last["hash"]), digest)
                return int(seq)
            finally:
                await conn.close()

        forged_seq = asyncio.run(forge())
        # A genuine read after the forged entry: chained onto it, still genuine.
        assert server.request("GET", "/api/v1/devices/phone-1/data?kind=location",
                              alice)[0] == 200

        status, log = server.request("GET", "/api/v1/me/devices/phone-1/access-log", jo)
        assert status == 200
        assert [(e["actor"], e["what"], e["integrity"]) for e in log["entries"]] == [
            ("alice", "data:location", "verified"), ("alice", "device", "verified")]

        status, listing = server.request("GET", "/api/v1/audit?limit=3", alice)
        assert status == 200
        assert [(e["seq"], e["actor"], e["integrity"]) for e in listing["entries"]] == [
            (forged_seq + 1, "alice", "verified"), (forged_seq, "bob", "invalid"),
            (forged_seq - 1, "alice", "verified")]
        assert listing["next"] == str(forged_seq - 1)

        # Tenant acme's activity changed nothing in other's numbering.
        status, others_after = server.request("GET", "/api/v1/audit", eve)
        assert others_after == others_before
        assert server.request("PUT", "/api/v1/policies/field", eve,
                              {"applies_to": {"groups": ["field"]}})[0] == 201
        status, others_now = server.request("GET", "/api/v1/audit?limit=1", eve)
        assert [(e["seq"], e["action"]) for e in others_now["entries"]] == [(3, "policy.put")]
        assert others_now["next"] == "3"
    finally:
        server.stop()

    verified = _cli(env, "audit", "verify")
    assert (verified.returncode, verified.stdout) == (
        1, f"audit log BROKEN: tenant acme, entry {forged_seq}: MAC mismatch: the entry was "
           "changed, or not written with this master key\n")
    listed = _cli(env, "audit", "list", "--tenant", "acme", "--limit", "2")
    assert [(e["actor"], e["integrity"]) for e in map(json.loads, listed.stdout.splitlines())
            ] == [("alice", "verified"), ("bob", "invalid")]
    dump = asyncio.run(fetch(database, "SELECT details::text || target AS t FROM audit_log"))
    assert not any("jo@example.com" in r["t"] for r in dump)


def test_admin_actions_are_logged_when_committed(database: str, broker: Broker,
                                                 tmp_path: Path) -> None:
    """The CLI and the policy API, run as the server's role (as a deployment runs
    them), write an entry for each action that happened, and none for one that was
    refused."""
    env = server_env(database, broker.url)
    for args in (("tenant", "create", "acme"), ("tenant", "create", "acme"),
                 ("device", "enroll", "--tenant", "acme", "--device", "phone-1",
                  "--ownership", "personal", "--user-email", "jo@example.com",
                  "--group", "field"),
                 ("device", "enroll", "--tenant", "nope", "--device", "d1",
                  "--ownership", "corporate")):
        _cli(env, *args)
    admin = _cli(env, "admin", "create", "--tenant", "acme", "--name", "alice")
    assert admin.returncode == 0, admin.stderr
    token = admin.stdout.strip()

    server = Server(env, tmp_path / "serve.log")
    server.start()
    try:
        status, _ = server.request("PUT", "/api/v1/policies/field", token,
                                   {"applies_to": {"groups": ["field"]}})
        assert status == 201, server.log_text()[-2000:]
        status, _ = server.request("PUT", "/api/v1/policies/field", token,
                                   {"applies_to": {"groups": ["field"]},
                                    "retention_days": {"default": 30}})
        assert status == 200
        assert server.request("PUT", "/api/v1/policies/bad", token, {"nope": 1})[0] == 422
        assert server.request("DELETE", "/api/v1/policies/field", token)[0] == 204
    finally:
        server.stop()

    verified = _cli(env, "audit", "verify")
    listed = _cli(env, "audit", "list", "--tenant", "acme", "--limit", "2")
    rows = asyncio.run(fetch(database, "SELECT seq, tenant_id, actor, action, target, details "
                                       "FROM audit_log ORDER BY chain, seq"))
    [alice] = asyncio.run(fetch(database, "SELECT token_id::text AS id, expires_at "
                                          "FROM api_tokens"))
    assert [tuple(r.values()) for r in rows] == [
        (1, "acme", "cli", "tenant.create", "tenant:acme", {}),
        (2, "acme", "cli", "device.enroll", "device:phone-1",
         {"ownership": "personal", "groups": ["field"], "agent": "native"}),
        (3, "acme", "cli", "admin.create", "admin:alice",
         {"token_id": alice["id"], "expires_at": alice["expires_at"].isoformat()}),
        (4, "acme", "alice", "policy.put", "policy:field", {"version": 1}),
        (5, "acme", "alice", "policy.put", "policy:field", {"version": 2}),
        (6, "acme", "alice", "policy.delete", "policy:field", {"version": 3}),
    ]
    assert (verified.returncode, verified.stdout) == (
        0, "audit log OK: 6 entries in 1 chain(s)\n"), verified.stderr
    lines = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(e["seq"], e["action"], e["integrity"]) for e in lines] == [
        (6, "policy.delete", "verified"), (5, "policy.put", "verified")]


# --- the role the server runs as ---------------------------------------------------

def test_serve_refuses_a_role_that_could_unprotect_the_log(database: str, broker: Broker,
                                                            tmp_path: Path) -> None:
    superuser = server_env(database, NO_BROKER, superuser=True)
    refused = _cli(superuser, "serve")
    assert refused.returncode == 2
    # (Before it, the tests' published master key is let through with a WARNING.)
    [last] = refused.stderr.splitlines()[-1:]
    assert last.startswith("mdm-server: serve refuses to start: the database role "
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


def test_audited_commands_need_the_master_key(database: str) -> None:
    env = server_env(database, NO_BROKER)
    del env["MDM_MASTER_KEY"]
    for args in (("tenant", "create", "acme"), ("audit", "verify"), ("audit", "checkpoint")):
        result = _cli(env, *args)
        assert result.returncode == 2, args
        assert result.stderr == ("mdm-server: MDM_MASTER_KEY or MDM_MASTER_KEY_FILE must be "
                                 "set: audit entries are signed (HMAC) under a key derived "
                                 "from it\n"), args
    assert asyncio.run(fetch(database, "SELECT * FROM tenants")) == []
