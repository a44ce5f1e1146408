"""Day partitions of the telemetry kinds' tables: which exist, and making them.

``telemetry_{kind}`` is partitioned by day (``telemetry_{kind}_{YYYYMMDD}``), owned
by ``mdm_app`` so that any server process, and retention, may add and drop them
(migration 004). Creating one takes its partitioned table's lock, which waits for
readers of that table; a transaction that creates several holds several such locks
and could deadlock with a reader that holds others. So the coming days' partitions
are made ahead, one per transaction (:func:`create_ahead`, run by every migration
and by serve's retention loop), and the ingest creates only those that current
data somehow still lacks (a record from days ago), after checking the catalog.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import asyncpg

from agent_protocol import KINDS

__all__ = ["DAY_MS", "create_ahead", "create_partitions", "existing_partitions",
           "partition_name", "partitions_around"]

DAY_MS = 86_400_000
#: The role that owns the day partitions (migration 004).
_OWNER = "mdm_app"


def partition_name(kind: str, day: int) -> str:
    return f"telemetry_{kind}_{datetime.fromtimestamp(day * 86400, UTC):%Y%m%d}"


def _create_partition(kind: str, day: int) -> str:
    start = datetime.fromtimestamp(day * 86400, UTC)
    return (
        f"CREATE TABLE IF NOT EXISTS {partition_name(kind, day)} "
        f"PARTITION OF telemetry_{kind} FOR VALUES FROM ('{start.isoformat()}') "
        f"TO ('{(start + timedelta(days=1)).isoformat()}')"
    )


def partitions_around(now_ms: int) -> set[tuple[str, int]]:
    """Today's and tomorrow's partition of every kind."""
    today = now_ms // DAY_MS
    return {(k, d) for k in KINDS for d in (today, today + 1)}


async def existing_partitions(conn: asyncpg.Connection) -> set[tuple[str, int]]:
    """The (kind, day) partitions the catalog holds (read without locking the
    partitioned tables)."""
    rows = await conn.fetch(
        """SELECT p.relname AS parent, c.relname AS part
           FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                              JOIN pg_class p ON p.oid = i.inhparent
           WHERE p.relname = ANY($1::text[])""", [f"telemetry_{k}" for k in KINDS])
    out: set[tuple[str, int]] = set()
    for r in rows:
        kind = r["parent"][len("telemetry_"):]
        stamp = r["part"][len(r["parent"]) + 1:]
        with contextlib.suppress(ValueError):
            day = datetime.strptime(stamp, "%Y%m%d").replace(tzinfo=UTC)
            out.add((kind, int(day.timestamp()) // 86400))
    return out


async def create_ahead(conn: asyncpg.Connection, now_ms: int, days: int = 3) -> int:
    """Create today's and the next ``days - 1`` days' partitions of every kind that
    do not exist yet, each in a transaction of its own (so it holds one lock at a
    time and cannot deadlock with a reader), as ``mdm_app`` whichever role is
    logged in (a migrating superuser too); how many were created."""
    today = now_ms // DAY_MS
    have = await existing_partitions(conn)
    todo = sorted({(k, d) for k in KINDS for d in range(today, today + days)} - have)
    for kind, day in todo:
        with contextlib.suppress(asyncpg.DuplicateTableError, asyncpg.UniqueViolationError):
            async with conn.transaction():
                await conn.execute(f"SET LOCAL ROLE {_OWNER}")
                await conn.execute(_create_partition(kind, day))
    return len(todo)


async def create_partitions(conn: asyncpg.Connection, needed: Iterable[tuple[str, int]]
                            ) -> None:
    """Create the (kind, day) partitions that do not exist yet (the ingest: as its
    own role, which acts as ``mdm_app``)."""
    statements = [_create_partition(kind, day) for kind, day in sorted(needed)]
    try:
        # One round trip for all (simple query protocol: one implicit
        # transaction, so one failure undoes them all; then one by one).
        await conn.execute(";\n".join(statements))
    except (asyncpg.DuplicateTableError, asyncpg.UniqueViolationError):
        for sql in statements:
            try:
                await conn.execute(sql)
            except (asyncpg.DuplicateTableError, asyncpg.UniqueViolationError):
                pass  # another worker created it between our check and ours
