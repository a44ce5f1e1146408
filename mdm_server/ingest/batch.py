"""From raw MQTT messages to what the sink stores: pure, no I/O.

Every message becomes exactly one :class:`SinkItem`: its rows, or its dead
letter. The worker acknowledges a message once its item is committed, so
"nothing accepted is lost" holds message by message. What needs the database
(is the device enrolled?) is answered by the caller through ``is_enrolled``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from agent_protocol import (
    ProtocolError,
    Reason,
    RemoteProtocolError,
    Topic,
    parse_topic,
)
from agent_protocol.envelope import RecordTuple, decode_records
from mdm_server.ingest.mqtt import InboundMessage

__all__ = [
    "CheckoutRow",
    "DeadLetter",
    "Decoded",
    "DecodedRow",
    "SinkItem",
    "StageRow",
    "build_items",
    "decode_messages",
]

# (tenant_id, device_id, kind, record_id, ts_ms, data) as decoded, and as staged
# once a policy has shaped it: (..., ts_ms, policy_id, policy_version, data).
DecodedRow = tuple[str, str, str, str, int, dict[str, Any]]
StageRow = tuple[str, str, str, str, int, str, int, dict[str, Any]]
# A check-out/check-in event: (tenant_id, device_id, ts_ms, record_id, event).
CheckoutRow = tuple[str, str, int, str, str]

_MAX_TOPIC_CHARS = 300


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Bad input as kept: never the payload, only where it came from and why."""

    topic: str
    tenant: str | None
    device: str | None
    reason: str
    detail: str
    payload_bytes: int

    def as_row(self) -> tuple[str, str | None, str | None, str, str, int]:
        return (self.topic[:_MAX_TOPIC_CHARS], self.tenant, self.device, self.reason,
                self.detail, self.payload_bytes)


@dataclass(slots=True)
class SinkItem:
    """What one MQTT message contributes, written together or not at all.

    ``decoded`` holds the records as they arrived until the policy shapes them
    into ``rows``; the raw ``decoded`` rows never reach the sink.
    """

    topic: str
    payload_bytes: int
    decoded: list[DecodedRow] = field(default_factory=list)
    rows: list[StageRow] = field(default_factory=list)
    dead: DeadLetter | None = None
    checkouts: list[CheckoutRow] = field(default_factory=list)
    # (tenant, device, day number) of each location point the policy suppressed.
    suppressed: list[tuple[str, str, int]] = field(default_factory=list)
    # (tenant, device, ts_ms) of check-ins after which stored locations must go
    # (a check-in can arrive after locations that followed it).
    enforce_checkins: list[tuple[str, str, int]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Decoded:
    """A message that decoded: its topic and records, or the error that stopped it."""

    message: InboundMessage
    topic: Topic | None
    records: list[RecordTuple] | None
    error: ProtocolError | None


@lru_cache(maxsize=65536)
def _topic(topic: str) -> Topic:
    return parse_topic(topic)


def decode_messages(messages: list[InboundMessage], now_ms: int) -> list[Decoded]:
    """Decode every message; a bad one carries its error, never raises."""
    out: list[Decoded] = []
    for msg in messages:
        topic: Topic | None = None
        try:
            topic = _topic(msg.topic)
            if topic.channel != "telemetry":
                raise RemoteProtocolError(Reason.BAD_TOPIC,
                                          "only telemetry topics are ingested")
            records = decode_records(topic, msg.payload, now_ms=now_ms)
        except ProtocolError as err:
            out.append(Decoded(msg, topic, None, err))
        else:
            out.append(Decoded(msg, topic, records, None))
    return out


def _dead_item(msg: InboundMessage, topic: Topic | None, reason: str, detail: str) -> SinkItem:
    size = len(msg.payload)
    dead = DeadLetter(msg.topic, topic.tenant if topic else None,
                      topic.device if topic else None, reason, detail, size)
    return SinkItem(msg.topic, size, dead=dead)


def build_items(decoded: list[Decoded], is_enrolled: Callable[[str, str], bool]
                ) -> list[SinkItem]:
    """One item per message, in order: rows for enrolled devices, else a dead letter."""
    items: list[SinkItem] = []
    for d in decoded:
        msg, t = d.message, d.topic
        if d.error is not None:
            err = d.error
            detail = f"{err.path}: {err.detail}" if err.path else err.detail
            items.append(_dead_item(msg, t, str(err.reason), detail))
            continue
        assert t is not None and t.kind is not None and d.records is not None
        if not is_enrolled(t.tenant, t.device):
            items.append(_dead_item(msg, t, str(Reason.UNKNOWN_DEVICE),
                                    "no enrolled device for this topic"))
            continue
        tenant, device, kind = t.tenant, t.device, t.kind
        rows = [(tenant, device, kind, rid, ts, data) for rid, ts, data in d.records]
        items.append(SinkItem(msg.topic, len(msg.payload), decoded=rows))
    return items
