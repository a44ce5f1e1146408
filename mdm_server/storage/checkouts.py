"""Check-out history, as the policy engine needs it for one batch."""

from __future__ import annotations

import asyncpg

__all__ = ["checkout_history"]

_HISTORY = """
WITH k AS (SELECT * FROM unnest($1::text[], $2::text[]) AS k(t, d))
SELECT tenant_id, device_id, (extract(epoch FROM ts) * 1000)::int8 AS ts_ms, event
FROM (
    SELECT DISTINCT ON (c.tenant_id, c.device_id) c.*
    FROM checkout_events c JOIN k ON c.tenant_id = k.t AND c.device_id = k.d
    WHERE c.ts <= timestamptz 'epoch' + $3::int8 * interval '1 millisecond'
    ORDER BY c.tenant_id, c.device_id, c.ts DESC
) AS latest_before
UNION ALL
SELECT c.tenant_id, c.device_id, (extract(epoch FROM c.ts) * 1000)::int8, c.event
FROM checkout_events c JOIN k ON c.tenant_id = k.t AND c.device_id = k.d
WHERE c.ts > timestamptz 'epoch' + $3::int8 * interval '1 millisecond'
  AND c.ts <= timestamptz 'epoch' + $4::int8 * interval '1 millisecond'
"""


async def checkout_history(
    conn: asyncpg.Connection, devices: set[tuple[str, str]], from_ms: int, to_ms: int
) -> dict[tuple[str, str], list[tuple[int, bool]]]:
    """Per device, the events that decide its state within [from_ms, to_ms]: the
    last one before, and every one inside; as (ts_ms, is_check_out)."""
    keys = sorted(devices)
    rows = await conn.fetch(_HISTORY, [k[0] for k in keys], [k[1] for k in keys],
                            from_ms, to_ms)
    out: dict[tuple[str, str], list[tuple[int, bool]]] = {}
    for r in rows:
        out.setdefault((r["tenant_id"], r["device_id"]), []).append(
            (r["ts_ms"], r["event"] == "check_out"))
    return out
