"""Connections to PostgreSQL with the project's type codecs."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson

__all__ = ["connect", "create_pool", "init_connection"]


def _jsonb_encode(value: Any) -> bytes:
    # jsonb binary format: a version byte, then the JSON text.
    return b"\x01" + orjson.dumps(value)


def _jsonb_decode(data: bytes) -> Any:
    return orjson.loads(data[1:])


async def init_connection(conn: asyncpg.Connection) -> None:
    """jsonb in and out through orjson, in binary form (no str round trip)."""
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=_jsonb_encode,
        decoder=_jsonb_decode,
        format="binary",
    )


async def connect(dsn: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)
    return conn


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=init_connection
    )
    assert pool is not None  # create_pool only returns None when awaited lazily
    return pool
