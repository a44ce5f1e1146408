"""The ack consumer: devices' acks and status messages move commands forward.

Subscribes (shared subscription, persistent session, QoS 1, manual acks) to every
device's ``.../acks`` and ``.../status``; on a RabbitMQ cluster (``MDM_AMQP_URL``)
consumes the quorum queue ``mdm-acks`` bound to them instead (competing consumers,
as the ingest: mdm_server/ingest/amqp.py). A batch of messages is applied in one
transaction and acknowledged to the broker only after the commit, like telemetry:
an ack the broker accepted is never lost.

- An ack moves its command through :mod:`mdm_server.commands.states`; every ack
  becomes a ``command_events`` row, accepted or not. One for an unknown command,
  for a command of another device (the topic names the sender, and the broker lets
  a device publish only under its own topics), or going backwards is ignored with
  its reason and logged without its content.
- A ``trust_key`` command completed: the device trusts the new signing key, which
  signs its commands from then on (key rotation, :mod:`mdm_server.commands.keys`).
- A consent answer (``consent_given``, ``consent_refused``: ``remote_view``) is
  applied with ``consent=True`` (``completed`` only after ``consent_given``),
  recorded in ``consent_at``, and is an audit entry ``command.consent`` in the
  same transaction. The user is asked with the notice, so an answer also records
  the notice as shown when its ``notice_shown`` ack has not arrived.
- ``online`` status: commands the device has not acknowledged receiving (``sent``,
  not expired) are marked for re-sending; the dispatcher publishes the same signed
  bytes again.
- Malformed input is dead-lettered with its reason (never its payload); messages
  over their device's rate limit (``MDM_INGEST_DEVICE_RATE``, as for telemetry)
  are counted (``rate_limited``) and acknowledged, never applied. Dead letters
  are counted per device, reason and hour (ingest/dead_letters.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from agent_protocol import (
    ACKS_FILTER,
    CONSENT_REFUSALS,
    CONSENT_TYPES,
    STATUS_FILTER,
    ProtocolError,
    decode_ack,
    decode_status,
    parse_topic,
    shared_subscription,
)
from mdm_server import audit
from mdm_server.commands import states
from mdm_server.commands.outbox import NOTIFY_CHANNEL
from mdm_server.config import Config
from mdm_server.ingest.batch import DeadLetter
from mdm_server.ingest.dead_letters import DeadLetterTally, store_dead_letters
from mdm_server.ingest.mqtt import InboundMessage, MqttConsumer
from mdm_server.ingest.reader import MessageReader
from mdm_server.ingest.sink import retry_while_away
from mdm_server.ops import metrics

__all__ = ["AckConsumer", "AckStats"]

log = logging.getLogger(__name__)

SHARE_GROUP = "mdm-acks"
_BATCH = 2000
_TS_COLUMN = {"received": "received_at", "notice_shown": "notice_shown_at",
              "consent_given": "consent_at", "consent_refused": "consent_at"}


@dataclass(slots=True)
class AckStats:
    acks_applied: int = 0
    acks_ignored: int = 0
    resends: int = 0
    dead_letters: int = 0


@dataclass(frozen=True, slots=True)
class _Ack:
    tenant: str
    device: str
    command_id: uuid.UUID | None
    state: str
    ts: datetime
    detail: str | None


def _no_reset() -> None:
    """The pool replaces broken connections itself."""


class AckConsumer:
    """One per ``serve`` process; several share the subscription."""

    def __init__(self, config: Config, pool: asyncpg.Pool, *, client_id: str = "mdm-acks-0"
                 ) -> None:
        self._config = config
        self._pool = pool
        self._client_id = client_id
        self._inbox: list[InboundMessage] = []
        self._wake = asyncio.Event()
        self.stats = AckStats()
        self.consumer: MessageReader | None = None
        limiter = config.device_limiter()
        self._limit = limiter.check if limiter is not None else None
        self._audit_keys: audit.AuditKeys | None = None  # made when a consent is audited

    def _keys(self) -> audit.AuditKeys:
        if self._audit_keys is None:
            self._audit_keys = self._config.audit_keys()
        return self._audit_keys

    def _on_message(self, msg: InboundMessage) -> None:
        if self._limit is not None:
            # Over its device's rate limit (a flood of statuses would make the
            # dispatcher re-send the device's commands): counted, not applied.
            msg.limited = self._limit(msg.topic)
        self._inbox.append(msg)
        self._wake.set()

    def _reader(self) -> MessageReader:
        amqp = self._config.amqp
        if amqp is not None:
            from mdm_server.broker.hook import topic_routing_key
            from mdm_server.ingest.amqp import AmqpConsumer

            return AmqpConsumer(amqp, on_message=self._on_message, prefetch=2 * _BATCH,
                                queue=SHARE_GROUP, label="acks",
                                bindings=(topic_routing_key(ACKS_FILTER),
                                          topic_routing_key(STATUS_FILTER)))
        return MqttConsumer(
            self._config.require_mqtt(), client_id=self._client_id,
            subscriptions=[shared_subscription(SHARE_GROUP, ACKS_FILTER),
                           shared_subscription(SHARE_GROUP, STATUS_FILTER)],
            on_message=self._on_message, label="acks")

    async def run(self) -> None:
        self.consumer = self._reader()
        reader = asyncio.create_task(self.consumer.run(), name=f"{self._client_id}-reader")
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._inbox:
                    batch, self._inbox = self._inbox[:_BATCH], self._inbox[_BATCH:]
                    await retry_while_away(functools.partial(self._apply, batch), _no_reset)
                    self.consumer.ack(batch)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    # -- decoding ---------------------------------------------------------------

    def _decode(self, msgs: list[InboundMessage], now_ms: int
                ) -> tuple[list[_Ack], set[tuple[str, str]], DeadLetterTally]:
        acks: list[_Ack] = []
        online: set[tuple[str, str]] = set()
        dead = DeadLetterTally()
        for m in msgs:
            if m.limited is not None:  # over its device's rate limit: counted only
                dead.add_limited(m.limited, 1, len(m.payload))
                continue
            tenant = device = None
            try:
                topic = parse_topic(m.topic)
                tenant, device = topic.tenant, topic.device
                if topic.channel == "status":
                    if decode_status(m.payload).state == "online":
                        online.add((tenant, device))
                    continue
                ack = decode_ack(m.payload, now_ms=now_ms)
            except ProtocolError as exc:
                dead.add(DeadLetter.of(m.topic, str(exc.reason), exc.detail,
                                       len(m.payload)))
                continue
            try:
                command_id: uuid.UUID | None = uuid.UUID(ack.command_id)
            except ValueError:
                command_id = None  # cannot be one of ours
            acks.append(_Ack(tenant, device, command_id, ack.state,
                             datetime.fromtimestamp(ack.ts_ms / 1000, UTC), ack.detail))
        return acks, online, dead

    # -- applying -----------------------------------------------------------------

    async def _apply(self, msgs: list[InboundMessage]) -> None:
        acks, online, dead = self._decode(msgs, int(time.time() * 1000))
        async with self._pool.acquire() as conn, conn.transaction():
            await store_dead_letters(conn, dead)
            if acks:
                await self._apply_acks(conn, acks)
            if online:
                await self._request_resends(conn, online)
        self.stats.dead_letters += dead.messages

    async def _apply_acks(self, conn: asyncpg.Connection, acks: list[_Ack]) -> None:
        ids = list({a.command_id for a in acks if a.command_id is not None})
        rows = await conn.fetch(
            "SELECT command_id, tenant_id, device_id, state, type, params, sent_at "
            "FROM commands "
            "WHERE command_id = ANY($1::uuid[]) ORDER BY command_id FOR UPDATE", ids)
        current = {r["command_id"]: r for r in rows}
        state_of = {r["command_id"]: r["state"] for r in rows}
        events: list[tuple[object, ...]] = []
        changed: dict[uuid.UUID, dict[str, object]] = {}
        answers: list[tuple[asyncpg.Record, _Ack]] = []  # consent answers applied
        for a in acks:
            cid = a.command_id
            row = current.get(cid) if cid is not None else None
            if cid is None or row is None or (row["tenant_id"], row["device_id"]) != (
                    a.tenant, a.device):
                # Unknown, or another device's: nothing of that command is touched.
                self.stats.acks_ignored += 1
                log.info("ack ignored: no command %s for the sending device",
                         a.command_id if a.command_id is not None else "(not a command id)")
                continue
            before = state_of[cid]
            t = states.transition(before, "ack", ack_state=a.state,
                                  consent=row["type"] in CONSENT_TYPES)
            if not t.changed:
                self.stats.acks_ignored += 1
                log.info("ack ignored: command %s is %s, ack says %s (%s)",
                         cid, before, a.state, t.reason)
                events.append((cid, "ack", before, before, False,
                               f"{a.state}: ignored ({t.reason})"))
                continue
            self.stats.acks_applied += 1
            if before == "sent" and row["sent_at"] is not None:  # its first ack
                metrics.ack_latency([(datetime.now(UTC) - row["sent_at"]).total_seconds()])
            state_of[cid] = t.to_state
            upd = changed.setdefault(cid, {})
            upd["state"] = t.to_state
            column = _TS_COLUMN.get(a.state)
            if column is not None:
                upd[column] = a.ts
            if column == "consent_at":
                # Asked with the notice: the notice was shown by then at the latest.
                upd["notice_implied_at"] = a.ts
                answers.append((row, a))
            if t.to_state in states.TERMINAL:
                upd["finished_at"] = a.ts
                upd["outcome_detail"] = a.detail
            events.append((cid, "ack", before, t.to_state, True, a.detail))
        if changed:
            await conn.execute(
                """UPDATE commands c SET
                       state = u.state,
                       received_at = COALESCE(u.received_at, c.received_at),
                       notice_shown_at = COALESCE(u.notice_shown_at, c.notice_shown_at,
                                                  u.notice_implied_at),
                       consent_at = COALESCE(u.consent_at, c.consent_at),
                       finished_at = COALESCE(u.finished_at, c.finished_at),
                       outcome_detail = COALESCE(u.outcome_detail, c.outcome_detail),
                       resend = false
                   FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[],
                               $5::timestamptz[], $6::text[], $7::timestamptz[],
                               $8::timestamptz[])
                        AS u(command_id, state, received_at, notice_shown_at, finished_at,
                             outcome_detail, consent_at, notice_implied_at)
                   WHERE c.command_id = u.command_id""",
                list(changed), [u["state"] for u in changed.values()],
                [u.get("received_at") for u in changed.values()],
                [u.get("notice_shown_at") for u in changed.values()],
                [u.get("finished_at") for u in changed.values()],
                [u.get("outcome_detail") for u in changed.values()],
                [u.get("consent_at") for u in changed.values()],
                [u.get("notice_implied_at") for u in changed.values()])
        trusted = [(current[cid]["tenant_id"], current[cid]["device_id"],
                    current[cid]["params"]["key_id"])
                   for cid, upd in changed.items()
                   if current[cid]["type"] == "trust_key" and upd["state"] == "completed"]
        if trusted:
            # The device confirmed a new signing key: its next commands use it.
            await conn.executemany(
                "UPDATE devices SET trusted_key_ids = array_append(trusted_key_ids, $3) "
                "WHERE tenant_id = $1 AND device_id = $2 AND NOT $3 = ANY(trusted_key_ids)",
                trusted)
        distrusted = [(current[cid]["tenant_id"], current[cid]["device_id"],
                       current[cid]["params"]["key_id"])
                      for cid, upd in changed.items()
                      if current[cid]["type"] == "distrust_key"
                      and upd["state"] == "completed"]
        if distrusted:
            # The device dropped a retired key: it trusts it no more.
            await conn.executemany(
                "UPDATE devices SET trusted_key_ids = array_remove(trusted_key_ids, $3) "
                "WHERE tenant_id = $1 AND device_id = $2", distrusted)
        if events:
            await conn.executemany(
                "INSERT INTO command_events (command_id, event, from_state, to_state, "
                "accepted, detail) VALUES ($1, $2, $3, $4, $5, $6)", events)
        for row, a in answers:
            # The user's answer, reported by their device: tamper-evident, with the
            # command. Codes only (an agent's free text never reaches the log).
            given = a.state == "consent_given"
            await audit.append(
                conn, self._keys(), tenant=row["tenant_id"], actor=f"device:{a.device}",
                action="command.consent", target=f"device:{a.device}",
                details={"command_id": str(row["command_id"]), "type": row["type"],
                         **({"mode": row["params"]["mode"]}
                            if "mode" in row["params"] else {}),
                         "answer": "given" if given else "refused",
                         **({} if given or a.detail not in CONSENT_REFUSALS
                            else {"detail": a.detail})})

    async def _request_resends(self, conn: asyncpg.Connection,
                               online: set[tuple[str, str]]) -> None:
        pairs = sorted(online)
        status = await conn.execute(
            """UPDATE commands c SET resend = true
               FROM unnest($1::text[], $2::text[]) AS o(tenant_id, device_id)
               WHERE c.tenant_id = o.tenant_id AND c.device_id = o.device_id
                 AND c.state = ANY($3::text[]) AND c.expires_at > now() AND NOT c.resend""",
            [p[0] for p in pairs], [p[1] for p in pairs], list(states.from_states("reconnect")))
        count = int(status.rsplit(" ", 1)[-1])
        if count:
            self.stats.resends += count
            await conn.execute("SELECT pg_notify($1, 'resend')", NOTIFY_CHANNEL)
