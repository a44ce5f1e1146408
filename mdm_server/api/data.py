"""Reading a device's telemetry over HTTP: the query parameters and the page,
shared by the admin route and the device user's route."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from aiohttp import web

from agent_protocol import KINDS
from mdm_server.storage.keyring import Keyring
from mdm_server.storage.sealing import DeviceReader
from mdm_server.storage.telemetry_read import Cursor, decode_cursor, encode_cursor, read_page

__all__ = ["LIMIT_MAX", "DataQuery", "page_limit", "parse_data_query", "read_data"]

LIMIT_DEFAULT = 100
LIMIT_MAX = 500


def page_limit(request: web.Request) -> int:
    """``?limit=``: 1..LIMIT_MAX (400 otherwise)."""
    raw = request.query.get("limit", str(LIMIT_DEFAULT))
    if not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) <= LIMIT_MAX:
        raise web.HTTPBadRequest(reason=f"limit must be 1-{LIMIT_MAX}")
    return int(raw)


def query_time(request: web.Request, name: str) -> datetime | None:
    """``?name=``: an RFC 3339 time with its zone, in UTC; None if absent (400 if bad)."""
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        t = datetime.fromisoformat(raw)
        if t.tzinfo is None:
            raise web.HTTPBadRequest(reason=f"{name} needs a time zone (Z or +hh:mm)")
        return t.astimezone(UTC)  # OverflowError at the ends of the calendar
    except (ValueError, OverflowError):
        raise web.HTTPBadRequest(reason=f"{name} must be an RFC 3339 timestamp") from None


@dataclass(frozen=True, slots=True)
class DataQuery:
    kind: str
    start: datetime | None
    end: datetime | None
    limit: int
    after: Cursor | None


def parse_data_query(request: web.Request) -> DataQuery:
    kind = request.query.get("kind")
    if kind not in KINDS:
        raise web.HTTPBadRequest(reason="kind must be one of " + ", ".join(KINDS))
    start, end = query_time(request, "from"), query_time(request, "to")
    if start is not None and end is not None and end < start:
        raise web.HTTPBadRequest(reason="to must not be before from")
    cursor = request.query.get("cursor")
    try:
        after = None if cursor is None else decode_cursor(cursor)
    except ValueError:
        raise web.HTTPBadRequest(reason="cursor is not valid") from None
    return DataQuery(kind, start, end, page_limit(request), after)


async def read_data(conn: asyncpg.Connection, keyring: Keyring, tenant: str, device: str,
                    q: DataQuery, *, received_since: datetime | None = None
                    ) -> dict[str, object]:
    reader = await DeviceReader.load(conn, keyring, tenant, device)
    page = await read_page(conn, reader, kind=q.kind, start=q.start, end=q.end,
                           limit=q.limit, after=q.after, received_since=received_since)
    return {"records": page.records,
            "next": None if page.next is None else encode_cursor(page.next)}
