"""Numbered SQL migrations (``migrations/NNN_name.sql``), applied in order, once each.

Each file runs in its own transaction under an advisory lock, so two servers
starting at once do not race.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from importlib import resources

import asyncpg

from mdm_server.storage.partitions import create_ahead

__all__ = ["Migration", "apply_migrations", "available_migrations"]

_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x6D646D  # "mdm"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("mdm_server.storage.migrations").iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError("two migrations share a number")
    return found


async def apply_migrations(conn: asyncpg.Connection) -> list[Migration]:
    """Apply the migrations not yet applied, and make the coming days' telemetry
    partitions; return the migrations applied now."""
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for mig in available_migrations():
            if mig.version in done:
                continue
            async with conn.transaction():
                await conn.execute(mig.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    mig.version,
                    mig.name,
                )
            applied.append(mig)
        # Today's and the next days' telemetry partitions, before serve starts: the
        # ingest then meets no DDL at start (mdm_server/storage/partitions.py).
        await create_ahead(conn, int(time.time() * 1000))
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
