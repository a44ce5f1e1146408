"""The command outbox: commands are rows first, broker messages second.

``enqueue`` inserts a ``queued`` row inside the caller's transaction (so a command
exists exactly when the change that asked for it was committed) and NOTIFYs
``mdm_commands``. The :class:`CommandDispatcher` signs queued commands, stores the
signed bytes (a resend is byte-identical, so the agent's nonce check absorbs a
duplicate), publishes them at QoS 1 (never retained) and marks a command ``sent``
only once the broker has acknowledged it (Mosquitto, or a RabbitMQ cluster when
``MDM_AMQP_URL`` is set: mdm_server/commands/publishers.py). While the broker is
away commands stay queued; a server restart loses nothing, because the queue is
the table.

Nothing is signed or published for a revoked device: both claims read the
device's status, and revoking (or re-enrolling) a device withdraws its unfinished
commands (:func:`mdm_server.commands.service.withdraw_unfinished`) after locking
them, so a claim either holds them first (the revocation waits for its commit,
then cancels what it sent) or skips them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson

from agent_protocol import (
    COMMAND_TYPES,
    CONSENT_TYPES,
    Command,
    LocalProtocolError,
    Notice,
    commands_topic,
    encode_command,
    sign_command,
)
from mdm_server.agents.commands import owntracks_cmd_topic, owntracks_form
from mdm_server.commands import states
from mdm_server.commands.keys import KeyRing
from mdm_server.commands.publishers import make_publisher
from mdm_server.config import Config
from mdm_server.storage.pool import connect

__all__ = ["NOTIFY_CHANNEL", "CommandDispatcher", "check_command", "enqueue",
           "enqueue_sync_policy"]

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "mdm_commands"
DEFAULT_TTL_S = 86_400
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ms(dt: datetime) -> int:
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def _dt(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def check_command(tenant: str, device: str, type_: str, params: Mapping[str, Any],
                  notice: Mapping[str, str] | None = None) -> None:
    """Refuse what could never be signed, before it is queued (ValueError).
    ``notice``: the notice it will carry (None: not checked; it may come from a
    template), required for a command its user must accept."""
    if type_ not in COMMAND_TYPES:
        raise ValueError(f"command type must be one of {', '.join(COMMAND_TYPES)}")
    if type_ in CONSENT_TYPES and notice is None:
        raise ValueError(f"a {type_} needs a notice: its user is asked with it")
    try:
        Command(command_id="check", tenant=tenant, device=device, type=type_,
                params=dict(params),
                notice=None if notice is None else Notice(notice["text"], notice["lang"]),
                issued_at_ms=0, expires_at_ms=1, nonce="checking", key_id="check")
    except LocalProtocolError as exc:
        raise ValueError(str(exc)) from None


async def enqueue(conn: asyncpg.Connection, *, tenant: str, device: str, type: str,
                  params: Mapping[str, Any], reason: str | None, requested_by: str,
                  ttl_s: int = DEFAULT_TTL_S) -> uuid.UUID:
    """Queue one command for one device; call inside the caller's transaction."""
    check_command(tenant, device, type, params)
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    command_id: uuid.UUID = await conn.fetchval(
        """INSERT INTO commands (tenant_id, device_id, type, params, state, reason,
                                 requested_by, expires_at)
           VALUES ($1, $2, $3, $4, 'queued', $5, $6, now() + make_interval(secs => $7))
           RETURNING command_id""",
        tenant, device, type, dict(params), reason, requested_by, float(ttl_s))
    await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, tenant)
    return command_id


async def enqueue_sync_policy(conn: asyncpg.Connection, tenant: str, actor: str,
                              ttl_s: int = DEFAULT_TTL_S) -> int:
    """Queue ``sync_policy`` for every enrolled device of ``tenant``; return how many.

    One statement, inside the caller's transaction (the policy write)."""
    count: int = await conn.fetchval(
        """WITH ins AS (
               INSERT INTO commands (tenant_id, device_id, type, params, state, reason,
                                     requested_by, expires_at)
               SELECT tenant_id, device_id, 'sync_policy', $2::jsonb, 'queued',
                      'policy changed', $3::text, now() + make_interval(secs => $4::float8)
               FROM devices WHERE tenant_id = $1 AND status = 'enrolled'
                 AND agent = 'native'  -- other agents take no policy (mdm_server/agents)
               RETURNING 1)
           SELECT count(*) FROM ins""",
        tenant, {"reason": "policy changed"}, actor, float(ttl_s))
    if count:
        await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, tenant)
    return count


#: A command already published is expired this long after its expires_at: an agent
#: may have accepted it just in time and its ``received`` ack still be on the way.
SENT_EXPIRY_GRACE_S = 120


async def expire_due(conn: asyncpg.Connection) -> int:
    """Mark expired the commands whose time ran out before the device received them,
    and those its user must accept that got no answer in time (``remote_view``).
    One the device may have (published) gets ``SENT_EXPIRY_GRACE_S`` more: its
    ``received`` ack, or its user's answer, may be on the way."""
    status: str = await conn.execute(
        """WITH due AS (
               SELECT command_id, state FROM commands
               WHERE (state = ANY($1::text[])
                      OR (type = ANY($3::text[]) AND state = ANY($4::text[])))
                 AND expires_at + CASE WHEN state = ANY($5::text[])
                                       THEN make_interval(secs => $2)
                                       ELSE interval '0' END <= now()
               FOR UPDATE SKIP LOCKED),
           exp AS (
               UPDATE commands c SET state = 'expired', finished_at = now()
               FROM due WHERE c.command_id = due.command_id
               RETURNING c.command_id, due.state AS old_state)
           INSERT INTO command_events (command_id, event, from_state, to_state, accepted)
           SELECT command_id, 'expired', old_state, 'expired', true FROM exp""",
        list(states.EXPIRE_FROM_STATES), float(SENT_EXPIRY_GRACE_S), sorted(CONSENT_TYPES),
        list(states.CONSENT_EXPIRE_FROM_STATES), list(states.ACK_FROM_STATES))
    return int(status.rsplit(" ", 1)[-1])


class CommandDispatcher:
    """Signs and publishes queued commands; one per ``serve`` process.

    Several dispatchers (several servers) may run against one database: rows are
    claimed with ``FOR UPDATE SKIP LOCKED``. The broker side is a
    :class:`~mdm_server.commands.publishers.CommandPublisher`: Mosquitto over MQTT,
    or a RabbitMQ cluster over AMQP when ``MDM_AMQP_URL`` is set; either way a
    command is ``sent`` only once the broker has acknowledged it, and at most
    ``batch`` publishes are unacknowledged at any time.
    """

    def __init__(self, config: Config, pool: asyncpg.Pool, *, batch: int = 500,
                 poll_s: float = 2.0, ack_timeout_s: float = 10.0,
                 client_id: str = "mdm-dispatch") -> None:
        self._config = config
        self._pool = pool
        self._batch = batch
        self._poll_s = poll_s
        self._wake = asyncio.Event()
        self._publisher = make_publisher(config, batch=batch, ack_timeout_s=ack_timeout_s,
                                         client_id=client_id)
        self._started = False
        self._keys = KeyRing(config.master_key)
        self.sent = 0

    @property
    def broker_connected(self) -> bool:
        return self._started and self._publisher.connected

    # -- the loop --------------------------------------------------------------

    def _notified(self, conn: object, pid: int, channel: str, payload: str) -> None:
        self._wake.set()

    async def _listen(self) -> asyncpg.Connection | None:
        try:
            conn = await connect(self._config.database_url)
            await conn.add_listener(NOTIFY_CHANNEL, self._notified)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("command dispatch cannot LISTEN (%s); polling", type(exc).__name__)
            return None
        return conn

    async def run(self) -> None:
        """Dispatch until cancelled: on NOTIFY, on (re)connection, and every poll_s."""
        self._publisher.start(self._wake)
        self._started = True
        listen: asyncpg.Connection | None = None
        try:
            while True:
                if listen is None or listen.is_closed():
                    listen = await self._listen()
                self._wake.clear()
                try:
                    more = await self.dispatch_once()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                        TimeoutError) as exc:
                    log.warning("command dispatch failed (%s); retrying",
                                type(exc).__name__)
                    more = False
                if not more:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._poll_s)
        finally:
            self._started = False
            await self._publisher.stop()
            if listen is not None and not listen.is_closed():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(listen.close(), 5)

    async def dispatch_once(self) -> bool:
        """Sign what is unsigned, publish one batch; True if more may be waiting."""
        async with self._pool.acquire() as conn:
            await expire_due(conn)  # time runs out whether or not the broker is there
            if not self.broker_connected:
                return False  # nothing is claimed while the broker is away
            await self._sign_queued(conn)
            more = await self._publish_signed(conn)
            return await self._publish_foreign(conn) or more

    async def _publish_foreign(self, conn: asyncpg.Connection) -> bool:
        """OwnTracks devices' commands in the app's own form (unsigned: the app
        verifies nothing; only ``locate`` is ever queued for it, the API refuses
        the rest), on ``owntracks/{username}/{device}/cmd``, QoS 1, not retained;
        ``sent`` with what was sent (``agent_form``) once the broker has it. One
        taken meanwhile by the device's HTTP post (``fetched_at``) is not sent."""
        async with conn.transaction():
            rows = await conn.fetch(
                """SELECT c.command_id, c.tenant_id, c.device_id, c.type
                   FROM commands c JOIN devices d USING (tenant_id, device_id)
                   WHERE c.state = 'queued' AND d.status = 'enrolled'
                     AND d.agent = 'owntracks' AND c.fetched_at IS NULL
                   ORDER BY c.created_at LIMIT $1 FOR UPDATE OF c SKIP LOCKED""",
                self._batch)
            if not rows:
                return False
            forms = [owntracks_form(r["type"]) for r in rows]
            acked = await self._publisher.publish([
                (owntracks_cmd_topic(f"{r['tenant_id']}.{r['device_id']}", r["device_id"]),
                 orjson.dumps(f)) for r, f in zip(rows, forms, strict=True)])
            if acked:
                await conn.execute(
                    """WITH upd AS (
                           UPDATE commands c SET state = 'sent', sent_at = now(),
                                  send_count = send_count + 1, agent_form = s.form
                           FROM unnest($1::uuid[], $2::jsonb[]) AS s(command_id, form)
                           WHERE c.command_id = s.command_id
                           RETURNING c.command_id)
                       INSERT INTO command_events (command_id, event, from_state, to_state,
                                                   accepted, detail)
                       SELECT command_id, 'published', 'queued', 'sent', true,
                              'in the OwnTracks app''s form' FROM upd""",
                    [rows[i]["command_id"] for i in acked], [forms[i] for i in acked])
                self.sent += len(acked)
            return len(acked) == len(rows) == self._batch

    async def _sign_queued(self, conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            rows = await conn.fetch(
                """SELECT c.command_id, c.tenant_id, c.device_id, c.type, c.params, c.notice,
                          c.expires_at, d.trusted_key_ids
                   FROM commands c JOIN devices d USING (tenant_id, device_id)
                   WHERE c.state = 'queued' AND c.payload IS NULL AND d.status = 'enrolled'
                     AND d.agent = 'native'
                   ORDER BY c.created_at LIMIT $1 FOR UPDATE OF c SKIP LOCKED""", self._batch)
            if not rows:
                return
            await self._keys.refresh(conn)
            now_ms = _ms(datetime.now(UTC))
            signed: list[tuple[uuid.UUID, bytes, str, datetime, str]] = []
            failed: list[tuple[uuid.UUID, str]] = []
            for r in rows:
                notice = r["notice"]
                chosen = self._keys.for_device(r["trusted_key_ids"])
                if chosen is None:
                    log.error("command %s: the device trusts no current signing key; "
                              "marked failed (re-enroll the device)", r["command_id"])
                    failed.append((r["command_id"], "the device trusts no current signing "
                                   "key: re-enroll it"))
                    continue
                key_id, key = chosen
                try:
                    cmd = sign_command(Command(
                        command_id=str(r["command_id"]), tenant=r["tenant_id"],
                        device=r["device_id"], type=r["type"], params=r["params"],
                        notice=None if notice is None else Notice(notice["text"],
                                                                  notice["lang"]),
                        issued_at_ms=now_ms, expires_at_ms=_ms(r["expires_at"]),
                        nonce=secrets.token_urlsafe(16), key_id=key_id), key)
                    payload = encode_command(cmd)
                except (LocalProtocolError, KeyError, TypeError) as exc:
                    # Never leaves this server: a bug or a bad row, not the device's.
                    log.error("command %s cannot be signed (%s); marked failed",
                              r["command_id"], type(exc).__name__)
                    failed.append((r["command_id"], "the command could not be signed"))
                    continue
                signed.append((r["command_id"], payload, cmd.nonce, _dt(now_ms), key_id))
            if signed:
                await conn.execute(
                    """UPDATE commands c SET payload = s.payload, nonce = s.nonce,
                              key_id = s.key_id, issued_at = s.issued_at
                       FROM unnest($1::uuid[], $2::bytea[], $3::text[], $4::timestamptz[],
                                   $5::text[])
                            AS s(command_id, payload, nonce, issued_at, key_id)
                       WHERE c.command_id = s.command_id""",
                    *(list(col) for col in zip(*signed, strict=True)))
            if failed:
                await conn.executemany(
                    """WITH f AS (UPDATE commands SET state = 'failed', finished_at = now(),
                                                     outcome_detail = $2
                                  WHERE command_id = $1 RETURNING command_id)
                       INSERT INTO command_events (command_id, event, from_state, to_state,
                                                   accepted, detail)
                       SELECT command_id, 'sign_failed', 'queued', 'failed', true, $2 FROM f""",
                    failed)

    async def _publish_signed(self, conn: asyncpg.Connection) -> bool:
        async with conn.transaction():
            # First sends, then re-sends owed to devices that reconnected before
            # acknowledging receipt (same signed bytes: the agent's nonce and
            # executed-command checks absorb a copy it did get).
            rows = await conn.fetch(
                """SELECT c.command_id, c.tenant_id, c.device_id, c.payload, c.state
                   FROM commands c JOIN devices d USING (tenant_id, device_id)
                   WHERE ((c.state = 'queued' AND c.payload IS NOT NULL)
                          OR (c.state = ANY($2::text[]) AND c.resend AND c.expires_at > now()))
                     AND d.status = 'enrolled'
                   ORDER BY c.created_at LIMIT $1 FOR UPDATE OF c SKIP LOCKED""",
                self._batch, list(states.from_states("reconnect")))
            if not rows:
                return False
            acked = await self._publisher.publish(
                [(commands_topic(r["tenant_id"], r["device_id"]), r["payload"])
                         for r in rows])
            if acked:
                ids = [rows[i]["command_id"] for i in acked]
                await conn.execute(
                    """WITH upd AS (
                           UPDATE commands c
                           SET state = CASE WHEN c.state = 'queued' THEN 'sent'
                                            ELSE c.state END,
                               resend = false, send_count = send_count + 1,
                               sent_at = CASE WHEN c.state = 'queued' THEN now()
                                              ELSE c.sent_at END
                           FROM (SELECT command_id, state AS old_state FROM commands
                                 WHERE command_id = ANY($1::uuid[])) o
                           WHERE c.command_id = o.command_id
                           RETURNING c.command_id, o.old_state)
                       INSERT INTO command_events (command_id, event, from_state, to_state,
                                                   accepted)
                       SELECT command_id, CASE WHEN old_state = 'queued' THEN 'published'
                                               ELSE 'resent' END,
                              old_state, CASE WHEN old_state = 'queued' THEN 'sent'
                                              ELSE old_state END, true FROM upd""", ids)
                self.sent += len(acked)
            return len(acked) == len(rows) == self._batch
