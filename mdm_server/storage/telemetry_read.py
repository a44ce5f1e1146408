"""Reading one device's telemetry back, exactly as stored (opened from its seal),
page by page in time.

Used by the admin API (``/api/v1/devices/{device}/data``), the device user's API
(``/api/v1/me/devices/{device}/data``) and the export. Pages follow the primary
key's order, (ts, record_id) within a kind, with a keyset cursor: any page costs
an index range scan, however deep.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from agent_protocol import KINDS
from mdm_server.storage.sealing import DeviceReader

__all__ = ["Cursor", "Page", "decode_cursor", "encode_cursor", "read_page"]


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where the next page starts: after (ts, record_id)."""

    ts: datetime
    record_id: str


@dataclass(frozen=True, slots=True)
class Page:
    records: list[dict[str, Any]]
    next: Cursor | None


def encode_cursor(c: Cursor) -> str:
    raw = orjson.dumps([c.ts.isoformat(), c.record_id])
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(text: str) -> Cursor:
    """ValueError for anything that is not a cursor this module made."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        ts, record_id = orjson.loads(raw)
        when = datetime.fromisoformat(ts).astimezone(UTC)
        if type(record_id) is not str or "\x00" in record_id or len(record_id) > 200:
            raise ValueError("record id")
        return Cursor(when, record_id)
    except (ValueError, TypeError, OverflowError, orjson.JSONDecodeError):
        raise ValueError("cursor is not valid") from None


def record_json(r: asyncpg.Record, data: Any) -> dict[str, Any]:
    return {"kind": r["kind"], "id": r["record_id"], "ts": r["ts"].isoformat(),
            "received_at": r["received_at"].isoformat(), "policy": r["policy_id"],
            "policy_version": r["policy_version"], "data": data}


async def read_page(conn: asyncpg.Connection, reader: DeviceReader, *, kind: str,
                    start: datetime | None, end: datetime | None, limit: int,
                    after: Cursor | None = None, received_since: datetime | None = None
                    ) -> Page:
    """Records of one kind with start <= ts < end, oldest first, at most ``limit``;
    with ``received_since``, only those received since then (a device user reads
    what was recorded during their enrollment)."""
    if kind not in KINDS:
        raise ValueError("unknown kind")
    tenant, device = reader.tenant, reader.device
    rows = await conn.fetch(
        """SELECT kind, record_id, ts, received_at, policy_id, policy_version, key_id,
                  sealed, data
           FROM telemetry
           WHERE tenant_id = $1 AND device_id = $2 AND kind = $3
             AND ($4::timestamptz IS NULL OR ts >= $4)
             AND ($5::timestamptz IS NULL OR ts < $5)
             AND ($6::timestamptz IS NULL OR (ts, record_id) > ($6, $7))
             AND ($9::timestamptz IS NULL OR received_at >= $9)
           ORDER BY ts, record_id LIMIT $8""",
        tenant, device, kind, start, end,
        None if after is None else after.ts, None if after is None else after.record_id,
        limit + 1, received_since)
    more = len(rows) > limit
    rows = rows[:limit]
    nxt = Cursor(rows[-1]["ts"], rows[-1]["record_id"]) if more and rows else None
    records = []
    for r in rows:
        data = reader.data(r)
        if data is not None:  # None: being erased right now
            records.append(record_json(r, data))
    return Page(records, nxt)
