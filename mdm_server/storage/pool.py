"""Connections to PostgreSQL with the project's type codecs."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson

__all__ = ["NoWritableHost", "connect", "create_pool", "init_connection", "is_unavailable"]


class NoWritableHost(ConnectionError):
    """Every host of a multi-host DSN with ``target_session_attrs=read-write``
    answered and none is writable: no leader now (a failover under way). An
    OSError, like a connection refused, so that every loop waiting out a lost
    database waits this out too."""

# SQLSTATEs of a database that is away, starting, stopping, or no longer the
# leader (after a failover the old leader comes back as a read-only standby):
# the same operation can succeed later, on the leader then.
_UNAVAILABLE_STATES = frozenset({
    "25006",  # read_only_sql_transaction: connected to a standby
    "53300",  # too_many_connections
    "57P01",  # admin_shutdown
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now: starting, or in recovery
})


def is_unavailable(exc: BaseException) -> bool:
    """True if ``exc`` says the database cannot be reached or written now (down,
    restarting, failing over, a standby), not that the operation is wrong. A
    multi-host ``MDM_DATABASE_URL`` with ``target_session_attrs=read-write`` finds
    the new leader on the next connection (docs/scaling.md)."""
    if isinstance(exc, asyncpg.PostgresError):
        state = str(exc.sqlstate or "")
        # Class 08: connection exception (ConnectionDoesNotExistError: the
        # connection was lost mid-operation, the commit's outcome unknown).
        return state[:2] == "08" or state in _UNAVAILABLE_STATES
    if isinstance(exc, asyncpg.TargetServerAttributeNotMatched):
        return True  # every host answered, none is writable: no leader yet
    if isinstance(exc, asyncpg.InterfaceError):
        # "connection is closed": a pooled connection whose server went away.
        return "closed" in str(exc)
    # Refused, reset, unreachable, timed out (TimeoutError is an OSError).
    return isinstance(exc, OSError)


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


_NO_LEADER = "no host of the database URL is writable now (no leader: a failover under way?)"


async def _asyncpg_connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
    """asyncpg.connect, with "no host is writable" as :class:`NoWritableHost`: for
    our connections and for the pool's (its ``connect``)."""
    try:
        return await asyncpg.connect(*args, **kwargs)
    except asyncpg.TargetServerAttributeNotMatched:
        raise NoWritableHost(_NO_LEADER) from None


async def connect(dsn: str) -> asyncpg.Connection:
    conn = await _asyncpg_connect(dsn)
    await init_connection(conn)
    return conn


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=init_connection,
        connect=_asyncpg_connect,
    )
    assert pool is not None  # create_pool only returns None when awaited lazily
    return pool
