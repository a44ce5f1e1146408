"""From raw MQTT messages to what the sink stores: pure, no I/O.

A batch is kept column-wise, not as an object per message: the hot path of a
100,000-message drain makes only the records' own tuples and dicts. Every
message contributes exactly one outcome: its records (stored rows, check-out
events, suppressed counts, as the policy decides), one dead letter, or (over its
device's rate limit, never decoded) one count of ``rate_limited``. Each
output carries the index of its message in the batch, so the sink can write any
range of messages on its own (it splits a batch the database refuses) and "one
message is written entirely or not at all" holds. The worker acknowledges a
message once the write that holds it is committed. What needs the database (is
the device enrolled?) is answered by the caller through ``is_enrolled``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from agent_protocol import (
    ProtocolError,
    Reason,
    RemoteProtocolError,
    Topic,
    outline_topic,
    parse_topic,
)
from agent_protocol.envelope import decode_records
from mdm_server.agents.events import AgentEvent
from mdm_server.ingest.mqtt import InboundMessage

if TYPE_CHECKING:
    from mdm_server.agents.ingest import ForeignDecoder

__all__ = [
    "CheckoutRow",
    "DeadLetter",
    "DecodedBatch",
    "StageRow",
    "TopicGroup",
    "WriteSet",
    "admit",
    "decode_batch",
]

# A record as staged once a policy has shaped it: (tenant_id, device_id, kind,
# record_id, ts_ms, policy_id, policy_version, data).
StageRow = tuple[str, str, str, str, int, str, int, dict[str, Any]]
# A check-out/check-in event: (tenant_id, device_id, ts_ms, record_id, event).
CheckoutRow = tuple[str, str, int, str, str]
# (tenant_id, device_id, day number) of a location point the policy suppressed;
# (tenant_id, device_id, ts_ms) of a check-in after which stored locations must go.
SuppressedRow = tuple[str, str, int]
CheckinRow = tuple[str, str, int]

@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Bad input as kept: never the payload, and never a topic as it was sent, only
    what of it parsed (``agent_protocol.outline_topic``: tenant and device when
    they parse, so that the tenant's admin sees it and erasure deletes it, and the
    name of the level that failed, never its value) and why."""

    topic: str
    tenant: str | None
    device: str | None
    level: str | None  # the topic level that failed; None when the topic parsed
    reason: str
    detail: str
    payload_bytes: int

    @classmethod
    def of(cls, raw_topic: str, reason: str, detail: str, payload_bytes: int
           ) -> DeadLetter:
        o = outline_topic(raw_topic)
        return cls(o.text, o.tenant, o.device, o.failed, reason, detail, payload_bytes)

    def as_row(self) -> tuple[str, str | None, str | None, str | None, str, str, int]:
        return (self.topic, self.tenant, self.device, self.level, self.reason, self.detail,
                self.payload_bytes)


@dataclass(slots=True)
class TopicGroup:
    """The records of one batch that arrived on one topic (one tenant, device and
    kind), column-wise, in arrival order; ``msgs[i]`` is the index of the message
    that carried record i."""

    topic: Topic
    msgs: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    ts: list[int] = field(default_factory=list)
    datas: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class DecodedBatch:
    """Messages decoded: the good ones' records grouped by topic, the bad ones as
    (message index, topic if it parsed, error). Fill it with :meth:`decode`, in
    order, in as many steps as the caller likes (the worker yields in between)."""

    messages: list[InboundMessage]
    now_ms: int
    errors: list[tuple[int, Topic | None, ProtocolError]] = field(default_factory=list)
    # Messages over their device's rate limit (``msg.limited``): never decoded.
    limited: list[int] = field(default_factory=list)
    # By id(Topic), cheaper to hash than the name: _topic returns one object per
    # name while cached (a group keeps its Topic alive, so an id is never reused).
    _groups: dict[int, TopicGroup] = field(default_factory=dict)
    # Foreign agents' messages (OwnTracks over MQTT; HTTP posts): decoded by this,
    # into the groups above, or a dead letter of its own making
    # (mdm_server/agents/ingest.py); their presence and locate answers; how many
    # were of types the server ignores.
    foreign: ForeignDecoder | None = None
    foreign_dead: list[tuple[int, DeadLetter]] = field(default_factory=list)
    agent_events: list[tuple[int, AgentEvent]] = field(default_factory=list)
    foreign_ignored: int = 0

    @property
    def groups(self) -> list[TopicGroup]:
        return list(self._groups.values())

    def devices(self) -> set[tuple[str, str]]:
        """(tenant, device) of every message that decoded."""
        return {(g.topic.tenant, g.topic.device) for g in self._groups.values()}

    def decode(self, start: int = 0, stop: int | None = None) -> None:
        """Decode messages [start, stop); a bad one is kept with its error, never raises."""
        groups, errors, now_ms = self._groups, self.errors, self.now_ms
        messages, limited = self.messages, self.limited
        for i in range(start, len(messages) if stop is None else min(stop, len(messages))):
            msg = messages[i]
            if msg.limited is not None:
                limited.append(i)
                continue
            if self.foreign is not None and (msg.http is not None
                                             or msg.topic.startswith("owntracks/")):
                self.foreign.decode(self, i, msg)  # a foreign agent's
                continue
            topic: Topic | None = None
            try:
                topic = _topic(msg.topic)
                if topic.channel != "telemetry":
                    raise RemoteProtocolError(Reason.BAD_TOPIC,
                                              "only telemetry topics are ingested")
                records = decode_records(topic, msg.payload, now_ms=now_ms)
            except ProtocolError as err:
                errors.append((i, topic, err))
                continue
            g = groups.get(id(topic))
            if g is None:
                g = groups[id(topic)] = TopicGroup(topic)
            if len(records) == 1:
                rid, ts, data = records[0]
                g.msgs.append(i)
                g.ids.append(rid)
                g.ts.append(ts)
                g.datas.append(data)
            else:
                for rid, ts, data in records:
                    g.msgs.append(i)
                    g.ids.append(rid)
                    g.ts.append(ts)
                    g.datas.append(data)

    def add_record(self, topic: Topic, i: int, rid: str, ts: int, data: dict[str, Any]
                   ) -> None:
        """One record of message ``i`` under ``topic`` (a foreign agent's)."""
        g = self._groups.get(id(topic))
        if g is None:
            g = self._groups[id(topic)] = TopicGroup(topic)
        g.msgs.append(i)
        g.ids.append(rid)
        g.ts.append(ts)
        g.datas.append(data)


@dataclass(slots=True)
class WriteSet:
    """What a batch (or a range of its messages) writes in one transaction. Each
    list has its message indices alongside: ``row_msgs[i]`` is the message of
    ``rows[i]``, and the other lists hold (message index, row) pairs."""

    messages: list[InboundMessage]
    rows: list[StageRow] = field(default_factory=list)
    row_msgs: list[int] = field(default_factory=list)
    dead: list[tuple[int, DeadLetter]] = field(default_factory=list)
    checkouts: list[tuple[int, CheckoutRow]] = field(default_factory=list)
    suppressed: list[tuple[int, SuppressedRow]] = field(default_factory=list)
    enforce_checkins: list[tuple[int, CheckinRow]] = field(default_factory=list)
    # Messages over their device's rate limit: counted, nothing else.
    limited: list[int] = field(default_factory=list)
    # The messages [lo, hi) of ``messages`` this set covers.
    lo: int = 0
    hi: int = -1
    # Foreign agents' presence and locate answers (mdm_server/agents/events.py).
    agent_events: list[tuple[int, AgentEvent]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.hi < 0:
            self.hi = len(self.messages)

    def __len__(self) -> int:
        """Messages covered."""
        return self.hi - self.lo

    def select(self, lo: int, hi: int) -> WriteSet:
        """The outputs of messages [lo, hi) only (for splitting a refused write)."""
        rows, row_msgs = [], []
        for row, m in zip(self.rows, self.row_msgs, strict=True):
            if lo <= m < hi:
                rows.append(row)
                row_msgs.append(m)
        return WriteSet(
            self.messages, rows, row_msgs,
            [d for d in self.dead if lo <= d[0] < hi],
            [c for c in self.checkouts if lo <= c[0] < hi],
            [s for s in self.suppressed if lo <= s[0] < hi],
            [e for e in self.enforce_checkins if lo <= e[0] < hi],
            [i for i in self.limited if lo <= i < hi],
            lo, hi,
            [e for e in self.agent_events if lo <= e[0] < hi],
        )


@lru_cache(maxsize=65536)
def _topic(topic: str) -> Topic:
    return parse_topic(topic)


def decode_batch(messages: list[InboundMessage], now_ms: int) -> DecodedBatch:
    """Decode every message; a bad one is kept with its error, never raises."""
    out = DecodedBatch(messages, now_ms)
    out.decode()
    return out


def _dead(msg: InboundMessage, topic: Topic | None, reason: str, detail: str) -> DeadLetter:
    if topic is not None:  # parsed: every level is one of ours, its ids are valid
        return DeadLetter(str(topic), topic.tenant, topic.device, None, reason, detail,
                          len(msg.payload))
    return DeadLetter.of(msg.topic, reason, detail, len(msg.payload))


def admit(decoded: DecodedBatch, is_enrolled: Callable[[str, str], bool]
          ) -> tuple[list[TopicGroup], WriteSet]:
    """The groups of enrolled devices, and a write set holding a dead letter for
    every other message (undecodable, or from a device not enrolled) and the
    rate-limited ones."""
    msgs = decoded.messages
    out = WriteSet(msgs, limited=decoded.limited)
    dead = out.dead
    for i, t, err in decoded.errors:
        detail = f"{err.path}: {err.detail}" if err.path else err.detail
        dead.append((i, _dead(msgs[i], t, str(err.reason), detail)))
    if decoded.foreign_dead:
        dead += decoded.foreign_dead
    if decoded.agent_events:
        out.agent_events = decoded.agent_events
    admitted = []
    for g in decoded.groups:
        t = g.topic
        if is_enrolled(t.tenant, t.device):
            admitted.append(g)
            continue
        for i in dict.fromkeys(g.msgs):  # each message once, in order
            dead.append((i, _dead(msgs[i], t, str(Reason.UNKNOWN_DEVICE),
                                  "no enrolled device for this topic")))
    if len(dead) > 1:
        dead.sort(key=lambda d: d[0])
    return admitted, out
