"""What foreign agents' messages change besides telemetry, written in the ingest's
own transaction (mdm_server/ingest/sink.py), so that it is committed exactly when
the message is and a redelivery changes nothing twice:

- **presence** (``device_presence``): OwnTracks' last will (``lwt``, published by
  the broker when the app is gone) sets the device offline; any other message
  from it, a sign of life, sets it online (``status`` messages say nothing more:
  neither app's status holds an online flag). A row changes only when the state
  does; ``changed_at`` is when it did.
- **locate completed**: OwnTracks answers ``reportLocation`` with a location whose
  trigger ``t`` is ``r``; that completes the device's ``locate`` commands that
  were sent (over MQTT, or in the answer to an HTTP post).

And :class:`HttpSubmission`: an HTTP post handed to the in-process ingest worker
(``IngestWorker.submit``), answered once its batch has committed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

import asyncpg

__all__ = ["AgentEvent", "HttpOutcome", "HttpSubmission", "store_agent_events"]

# ("presence", tenant, device, online, source) or ("located", tenant, device, ts_ms, "")
AgentEvent = tuple[str, str, str, object, str]


@dataclass(frozen=True, slots=True)
class HttpOutcome:
    """What became of a post: ``stored`` (its records, maybe none: all ignored, or
    kept out by the policy), ``dead`` (refused: ``reason`` and ``detail``, kept as a
    dead letter) or ``limited`` (over the device's rate limit: counted, not stored)."""

    status: Literal["stored", "dead", "limited"]
    reason: str | None = None
    detail: str | None = None


@dataclass(slots=True)
class HttpSubmission:
    """One HTTP request of a foreign agent, authenticated as ``tenant``/``device``.
    ``where`` names the route for its dead letter (never the URL key)."""

    agent: str
    tenant: str
    device: str
    where: str
    method: str = "POST"
    query: list[tuple[str, str]] = field(default_factory=list)
    content_type: str | None = None
    done: asyncio.Future[HttpOutcome] | None = None

    def resolve(self, outcome: HttpOutcome) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(outcome)


_PRESENCE = """
INSERT INTO device_presence AS p (tenant_id, device_id, online, source, changed_at)
SELECT t, d, o, s, now()
FROM unnest($1::text[], $2::text[], $3::bool[], $4::text[]) AS x(t, d, o, s)
JOIN devices dv ON dv.tenant_id = x.t AND dv.device_id = x.d
ON CONFLICT (tenant_id, device_id) DO UPDATE
SET online = EXCLUDED.online, source = EXCLUDED.source, changed_at = EXCLUDED.changed_at
WHERE p.online IS DISTINCT FROM EXCLUDED.online"""

_LOCATED = """
WITH done AS (
    UPDATE commands c SET state = 'completed', finished_at = now(),
                          received_at = coalesce(c.received_at, now())
    FROM unnest($1::text[], $2::text[]) AS x(t, d)
    WHERE c.tenant_id = x.t AND c.device_id = x.d AND c.type = 'locate'
      AND c.state = 'sent'
    RETURNING c.command_id)
INSERT INTO command_events (command_id, event, from_state, to_state, accepted, detail)
SELECT command_id, 'located', 'sent', 'completed', true,
       'a location answering reportLocation arrived' FROM done"""


async def store_agent_events(conn: asyncpg.Connection, events: list[AgentEvent]) -> None:
    """Apply the events, in message order (inside the caller's transaction): per
    device, the last presence of the batch counts."""
    presence: dict[tuple[str, str], tuple[bool, str]] = {}
    located: dict[tuple[str, str], None] = {}
    for what, tenant, device, value, source in events:
        if what == "presence":
            presence[(tenant, device)] = (bool(value), source)
        else:
            located[(tenant, device)] = None
    if presence:
        keys = sorted(presence)  # one lock order for concurrent workers
        await conn.execute(_PRESENCE, [k[0] for k in keys], [k[1] for k in keys],
                           [presence[k][0] for k in keys], [presence[k][1] for k in keys])
    if located:
        keys = sorted(located)
        await conn.execute(_LOCATED, [k[0] for k in keys], [k[1] for k in keys])
