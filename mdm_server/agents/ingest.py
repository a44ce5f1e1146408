"""Foreign agents' messages in the ingest core: OwnTracks over MQTT, and the HTTP
posts of OwnTracks and OsmAnd / Traccar Client handed to the worker.

The worker (mdm_server/ingest/worker.py) asks :class:`ForeignDecoder` which
devices a batch's foreign messages come from (:meth:`ForeignDecoder.devices_of`),
loads them (:meth:`ForeignDecoder.load`: agent, enrollment, the sealed secret
opened), then :class:`~mdm_server.ingest.batch.DecodedBatch` hands each foreign
message to :meth:`ForeignDecoder.decode`, which turns it into the very records our
own agents send (agent_protocol.owntracks / .osmand), grouped under the device's
telemetry topics: from there on the policy, sealing, record-id digests, dead
letters, ack-after-commit and the HTTP answer-after-commit are the native path.

Who a message is from:

- MQTT: the topic ``owntracks/{username}/{device}[/{sub}]``; the username is the
  device's broker username ``{tenant}.{device}`` and must name the same device as
  the topic's second level (the broker lets a device publish only there;
  mdm_server/broker/identity.py), and the device must be enrolled for OwnTracks.
- HTTP: the login (OwnTracks: HTTP Basic; OsmAnd: the URL key), checked by the
  route (mdm_server/api/agents.py) before the post is submitted. What the body
  says of the device must agree: OwnTracks' ``topic``, OsmAnd's ``id``, else the
  post is refused (``topic_mismatch``).

A message is refused whole (one dead letter with its reason) or taken whole.
Cards, waypoints and the other types the server has no use for are counted
(``IngestStats.ignored``) and acknowledged, never an error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import asyncpg

from agent_protocol import (
    ProtocolError,
    Reason,
    RemoteProtocolError,
    Topic,
    decode_osmand,
    decode_owntracks,
    parse_owntracks_topic,
)
from agent_protocol.owntracks import OWNTRACKS_FILTER, OwnTracksTopic
from mdm_server.agents import SPEED_UNITS
from mdm_server.agents.secrets import AgentSecretError, open_secret
from mdm_server.agents.topics import foreign_device, split_username
from mdm_server.ingest.batch import DeadLetter

if TYPE_CHECKING:
    from mdm_server.ingest.batch import DecodedBatch
    from mdm_server.ingest.mqtt import InboundMessage

__all__ = ["OWNTRACKS_PREFIX", "AgentDevice", "ForeignDecoder", "foreign_device",
           "is_foreign", "owntracks_filter"]

log = logging.getLogger(__name__)

OWNTRACKS_PREFIX = "owntracks/"
_KNOWN_TTL_S = 10.0  # as the ingest's device registry (worker.py)
_UNKNOWN_TTL_S = 5.0


def owntracks_filter() -> str:
    return OWNTRACKS_FILTER


def is_foreign(msg: InboundMessage) -> bool:
    return msg.http is not None or msg.topic.startswith(OWNTRACKS_PREFIX)


@lru_cache(maxsize=65536)
def _ot_topic(topic: str) -> OwnTracksTopic:
    return parse_owntracks_topic(topic)


@dataclass(frozen=True, slots=True)
class AgentDevice:
    agent: str
    enrolled: bool
    secret: bytes | None  # OwnTracks' passphrase (UTF-8); None for other agents


class ForeignDecoder:
    """Foreign agents' devices (cached like the ingest's registry) and their messages."""

    def __init__(self, master_key: bytes) -> None:
        self._master = master_key
        self._known: dict[tuple[str, str], AgentDevice] = {}
        self._until: dict[tuple[str, str], float] = {}
        self._topics: dict[tuple[str, str, str], Topic] = {}

    # -- which devices, and loading them -------------------------------------------

    @staticmethod
    def devices_of(messages: Iterable[InboundMessage]) -> set[tuple[str, str]]:
        out: set[tuple[str, str]] = set()
        for m in messages:
            if m.http is not None:
                out.add((m.http.tenant, m.http.device))
            elif m.topic.startswith(OWNTRACKS_PREFIX):
                who = foreign_device(m.topic)
                if who is not None:
                    out.add(who)
        return out

    async def load(self, conn: asyncpg.Connection, keys: set[tuple[str, str]]) -> None:
        now = time.monotonic()
        missing = [k for k in keys if self._until.get(k, 0.0) <= now]
        if not missing:
            return
        rows = await conn.fetch(
            """SELECT d.tenant_id, d.device_id, d.agent, d.status, d.agent_secret
               FROM devices d JOIN unnest($1::text[], $2::text[]) AS k(t, dev)
                 ON d.tenant_id = k.t AND d.device_id = k.dev""",
            [k[0] for k in missing], [k[1] for k in missing])
        found = {(r["tenant_id"], r["device_id"]): r for r in rows}
        if len(self._known) > 200_000:
            self._known.clear()
            self._until.clear()
        for k in missing:
            r = found.get(k)
            if r is None:
                self._known.pop(k, None)
                self._until[k] = now + _UNKNOWN_TTL_S
                continue
            secret = None
            if r["agent"] == "owntracks" and r["agent_secret"] is not None:
                try:
                    secret = open_secret(self._master, k[0], k[1], "owntracks",
                                         r["agent_secret"]).encode()
                except AgentSecretError as exc:  # names the device, never the secret
                    log.error("%s", exc)
            self._known[k] = AgentDevice(r["agent"], r["status"] == "enrolled", secret)
            self._until[k] = now + _KNOWN_TTL_S

    # -- decoding ------------------------------------------------------------------

    def _topic(self, tenant: str, device: str, kind: str) -> Topic:
        key = (tenant, device, kind)
        t = self._topics.get(key)
        if t is None:
            if len(self._topics) > 200_000:
                self._topics.clear()
            t = self._topics[key] = Topic(tenant, device, "telemetry", kind)
        return t

    def decode(self, batch: DecodedBatch, i: int, msg: InboundMessage) -> None:
        """Decode one foreign message into ``batch``: its records into the batch's
        groups, its presence and locate answers into ``batch.agent_events``; or one
        dead letter. Never raises for bad input."""
        http = msg.http
        tenant: str | None = None
        device: str | None = None
        where = msg.topic
        try:
            if http is None:
                try:
                    ot = _ot_topic(msg.topic)
                except ProtocolError:
                    where = "owntracks/?"  # never the topic as sent
                    raise
                who = split_username(ot.user)
                if who is None or who[1] != ot.device:
                    where = "owntracks/?"
                    raise RemoteProtocolError(
                        Reason.BAD_TOPIC, "topic must be owntracks/{username}/{device} of "
                        "one device (username {tenant}.{device})")
                tenant, device = who
                agent, subtopic = "owntracks", ot.subtopic
            else:
                tenant, device, agent, subtopic = http.tenant, http.device, http.agent, None
                where = http.where
            info = self._known.get((tenant, device))
            if info is None or not info.enrolled or info.agent != agent:
                raise RemoteProtocolError(Reason.UNKNOWN_DEVICE,
                                          f"no device enrolled for {agent} here")
            if agent == "owntracks":
                self._owntracks(batch, i, msg, tenant, device, subtopic, info, http is None)
            else:
                self._osmand(batch, i, msg, tenant, device, agent)
        except ProtocolError as err:
            detail = f"{err.path}: {err.detail}" if err.path else err.detail
            batch.foreign_dead.append((i, DeadLetter(where, tenant, device, None,
                                                     str(err.reason), detail,
                                                     len(msg.payload))))

    def _owntracks(self, batch: DecodedBatch, i: int, msg: InboundMessage, tenant: str,
                   device: str, subtopic: str | None, info: AgentDevice, mqtt: bool) -> None:
        messages = decode_owntracks(msg.payload, subtopic=subtopic, now_ms=batch.now_ms,
                                    secret=info.secret)
        if not mqtt:
            base = f"owntracks/{tenant}.{device}/{device}"
            for m in messages:
                if m.topic is not None and m.topic != base:
                    raise RemoteProtocolError(
                        Reason.TOPIC_MISMATCH,
                        "topic must be the login's own owntracks/{username}/{device}",
                        "topic")
        events = batch.agent_events
        for m in messages:
            if m.online is False:
                events.append((i, ("presence", tenant, device, False, "lwt")))
            elif not m.ignored or m.type == "status":
                events.append((i, ("presence", tenant, device, True,
                                   "status" if m.type == "status" else "message")))
            if m.ignored:
                batch.foreign_ignored += 1
                continue
            if m.trigger == "r":
                events.append((i, ("located", tenant, device, 0, "")))
            for kind, rec in m.records:
                batch.add_record(self._topic(tenant, device, kind), i, rec.id, rec.ts_ms,
                                 rec.data)

    def _osmand(self, batch: DecodedBatch, i: int, msg: InboundMessage, tenant: str,
                device: str, agent: str) -> None:
        http = msg.http
        assert http is not None
        points = decode_osmand(method=http.method, query=http.query,
                               content_type=http.content_type, body=msg.payload,
                               now_ms=batch.now_ms, speed_unit=SPEED_UNITS[agent])
        for p in points:
            if p.device_id != device:
                raise RemoteProtocolError(
                    Reason.TOPIC_MISMATCH,
                    "id must be the id of the device this URL was made for", "id")
        if points:
            batch.agent_events.append((i, ("presence", tenant, device, True, "message")))
        for p in points:
            for kind, rec in p.records:
                batch.add_record(self._topic(tenant, device, kind), i, rec.id, rec.ts_ms,
                                 rec.data)
