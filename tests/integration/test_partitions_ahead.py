"""Telemetry day partitions are made ahead, so the ingest meets no DDL.

Creating a partition takes its partitioned table's lock, which waits for every
reader of that table (and, several in one transaction, could deadlock with one).
A migration makes today's and the next two days' partitions of every kind, and
serve's retention loop keeps making them, one per transaction, as ``mdm_app``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path

import asyncpg
import pytest

from agent_protocol import KINDS
from mdm_server.storage.partitions import (
    DAY_MS,
    create_ahead,
    existing_partitions,
    partition_name,
)
from tests.support.mqtt import publish_all
from tests.support.services import (
    Broker,
    IngestProcess,
    as_server_role,
    device_credentials,
    enroll,
    server_env,
    wait_for_count,
)
from tests.support.telemetry import location

pytestmark = pytest.mark.integration


def _today() -> int:
    return int(time.time() * 1000) // DAY_MS


async def _owners(database: str, days: range) -> set[str]:
    conn = await asyncpg.connect(database)
    try:
        names = [partition_name(k, d) for k in KINDS for d in days]
        rows = await conn.fetch("SELECT relname, pg_get_userbyid(relowner) AS owner "
                                "FROM pg_class WHERE relname = ANY($1::text[])", names)
        assert sorted(r["relname"] for r in rows) == sorted(names)
        return {r["owner"] for r in rows}
    finally:
        await conn.close()


def test_a_migrated_database_has_the_coming_days_partitions(database: str) -> None:
    today = _today()
    assert asyncio.run(_owners(database, range(today, today + 3))) == {"mdm_app"}


def test_the_server_role_makes_missing_ones_one_at_a_time(database: str) -> None:
    today = _today()

    async def scenario() -> tuple[int, int, set[tuple[str, int]]]:
        admin = await asyncpg.connect(database)
        try:
            for kind in KINDS:
                await admin.execute(f"DROP TABLE {partition_name(kind, today + 2)}")
        finally:
            await admin.close()
        conn = await asyncpg.connect(as_server_role(database))
        try:
            made = await create_ahead(conn, int(time.time() * 1000))
            again = await create_ahead(conn, int(time.time() * 1000))
            return made, again, await existing_partitions(conn)
        finally:
            await conn.close()

    made, again, have = asyncio.run(scenario())
    assert (made, again) == (len(KINDS), 0)
    assert {(k, today + 2) for k in KINDS} <= have
    assert asyncio.run(_owners(database, range(today + 2, today + 3))) == {"mdm_app"}


def test_a_reader_of_every_kind_does_not_hold_up_the_ingest(
        database: str, broker: Broker, tmp_path: Path) -> None:
    """A long report holds ACCESS SHARE on every kind's table; the ingest starts and
    stores today's records meanwhile (a CREATE ... PARTITION OF would wait for the
    report's end)."""
    asyncio.run(enroll(database, broker.url, "acme", ["d1"]))

    async def hold_and_ingest() -> int:
        reader = await asyncpg.connect(database)
        try:
            tables = ", ".join(f"telemetry_{k}" for k in KINDS)
            await reader.execute(f"BEGIN; LOCK TABLE telemetry, {tables} IN ACCESS SHARE MODE")
            ingest = IngestProcess(server_env(database, broker.url), tmp_path / "ingest.log")
            ingest.start()
            try:
                ingest.wait_ready()
                user, password = device_credentials("acme", "d1")
                sent = await asyncio.to_thread(
                    functools.partial(publish_all, client_id=user, username=user,
                                      password=password, timeout=60),
                    "127.0.0.1", broker.port, (location("acme", "d1", i) for i in range(50)))
                assert sent == 50
                return await asyncio.to_thread(
                    wait_for_count, database, "SELECT count(*) FROM telemetry", 50,
                    timeout=60, proc=ingest)
            finally:
                ingest.stop()
                await reader.execute("ROLLBACK")
        finally:
            await reader.close()

    assert asyncio.run(hold_and_ingest()) == 50
