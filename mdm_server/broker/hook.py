"""The broker asks us: authentication and authorisation answered from the database.

A broker that cannot hold the devices' accounts itself (a RabbitMQ or EMQX
cluster, where Mosquitto's dynamic-security plugin does not exist) asks ``serve``
over HTTP, on the internal address ``MDM_BROKER_HOOK_ADDR``, whether a client may
log in and what it may do. The answers are the same as the Mosquitto accounts'
(mdm_server/broker/identity.py), from the same sources:

- **who**: a device logs in as ``{tenant}.{device}`` with the password derived from
  the master key at its current credential generation
  (mdm_server/broker/credentials.py), compared in constant time; the device must
  be enrolled now (the database is asked at every question: a revoked device's
  next check is refused). Its client id, where the broker says it, must be its
  username (bound, as on Mosquitto). The server logs in with the user and
  password of ``MDM_AMQP_URL``.
- **what**: :func:`mdm_server.broker.rules.device_topics` for a device (its own
  topics, literally), :data:`~mdm_server.broker.rules.SERVER_SUBSCRIBE` and
  :data:`~mdm_server.broker.rules.SERVER_PUBLISH` for the server.

Two dialects (:mod:`mdm_server.broker.hook_http` serves them): RabbitMQ's
``rabbitmq_auth_backend_http`` (its MQTT plugin turns topics into routing keys on
``amq.topic``: :func:`topic_routing_key`) and EMQX's HTTP authentication and
authorisation.

Nothing here logs a password, a username or a topic: counts only.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import asyncpg

from agent_protocol import is_valid_id
from mdm_server.agents import URL_KEY_AGENTS
from mdm_server.broker.credentials import device_password
from mdm_server.broker.rules import (
    SERVER_PUBLISH,
    SERVER_SUBSCRIBE,
    device_topics,
    filter_covers,
)
from mdm_server.storage.devices import device_identities

__all__ = [
    "MQTT_EXCHANGE",
    "Action",
    "BrokerHook",
    "HookStats",
    "Principal",
    "parse_username",
    "server_routing_key",
    "topic_routing_key",
]

log = logging.getLogger(__name__)

#: The exchange RabbitMQ's MQTT plugin publishes to (``mqtt.exchange``).
MQTT_EXCHANGE = "amq.topic"
#: RabbitMQ's MQTT plugin names a client's subscription queue
#: ``mqtt-subscription-{client id}qos{0|1}`` (3.10).
_MQTT_QUEUE_PREFIX = "mqtt-subscription-"
#: Queues the server's own consumers declare (the AMQP ingest).
SERVER_QUEUE_PREFIX = "mdm-"

Action = Literal["publish", "subscribe"]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who asks: the server (``device`` None) or a device, enrolled now."""

    username: str
    tenant: str | None = None
    device: str | None = None
    agent: str = "native"

    @property
    def is_server(self) -> bool:
        return self.device is None


@dataclass
class HookStats:
    """Counters (``serve`` may show them; they name nobody)."""

    logins_allowed: int = 0
    logins_denied: int = 0
    logins_throttled: int = 0
    checks_allowed: int = 0
    checks_denied: int = 0


def parse_username(username: str) -> tuple[str, str] | None:
    """(tenant, device) of a device's MQTT username ``{tenant}.{device}``, or None.
    Ids are [A-Za-z0-9_-], so there is exactly one ``.``."""
    tenant, sep, device = username.partition(".")
    if not sep or not is_valid_id(tenant) or not is_valid_id(device):
        return None
    return tenant, device


def topic_routing_key(topic: str) -> str:
    """The AMQP routing key RabbitMQ's MQTT plugin (3.10, default translation) makes
    of an MQTT topic or filter: ``/`` becomes ``.``, ``+`` becomes ``*``, ``#`` stays,
    and a ``.`` stays a ``.`` (so ``owntracks/acme.d1/d1`` and ``owntracks/acme/d1/d1``
    have one key: questions about keys are answered by comparing keys, never by
    turning a key back into a topic)."""
    return ".".join("*" if level == "+" else level for level in topic.split("/"))


def server_routing_key(pattern: str) -> str:
    """The routing-key pattern of one of the server's MQTT filters, as the keys it
    must match are made: an OwnTracks topic's username level (``{tenant}.{device}``)
    is two words of its key, so ``owntracks/+/+/cmd`` is ``owntracks.*.*.*.cmd``."""
    key = topic_routing_key(pattern)
    if pattern.startswith("owntracks/+/"):
        return "owntracks.*." + key[len("owntracks."):]
    return key


class _FailureThrottle:
    """Failed log-ins per username: ``burst`` failures, then one every
    ``1/rate`` seconds; while a username has none left, its log-ins are refused
    without being checked. Bounded: the least recently failed are forgotten first."""

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._left: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _tokens(self, key: str, now: float) -> float:
        got = self._left.get(key)
        if got is None:
            return self.burst
        tokens, at = got
        return min(self.burst, tokens + (now - at) * self.rate)

    def blocked(self, key: str, now: float) -> bool:
        return self._tokens(key, now) < 1.0

    def failed(self, key: str, now: float) -> None:
        tokens = self._tokens(key, now) - 1.0
        self._left[key] = (max(tokens, 0.0), now)
        self._left.move_to_end(key)
        if len(self._left) > self._max_keys:
            self._left.popitem(last=False)


class BrokerHook:
    """The answers, broker-neutral. ``pool``: the server's database pool;
    ``server_user``/``server_password``: the server's own broker login (from
    ``MDM_AMQP_URL``; None: no server login is accepted)."""

    def __init__(self, pool: asyncpg.Pool, master_key: bytes, *,
                 server_user: str | None = None, server_password: str | None = None,
                 fail_rate: float = 0.5, fail_burst: float = 10.0,
                 password_cache: int = 100_000) -> None:
        self._pool = pool
        self._master_key = master_key
        self._server_user = server_user if server_password else None
        self._server_password = (server_password or "").encode()
        self._throttle = _FailureThrottle(fail_rate, fail_burst)
        self._passwords: OrderedDict[tuple[str, str, int], bytes] = OrderedDict()
        self._password_cache = password_cache
        self.stats = HookStats()

    # --- who -----------------------------------------------------------------------

    def _derived(self, tenant: str, device: str, generation: int) -> bytes:
        """The device's password at ``generation``, from a bounded cache (a pure
        function of the master key and the ids: nothing to invalidate)."""
        key = (tenant, device, generation)
        pw = self._passwords.get(key)
        if pw is None:
            pw = device_password(self._master_key, tenant, device, generation).encode()
            self._passwords[key] = pw
            if len(self._passwords) > self._password_cache:
                self._passwords.popitem(last=False)
        else:
            self._passwords.move_to_end(key)
        return pw

    async def _enrolled(self, username: str) -> tuple[Principal, int] | None:
        """The device ``username`` names, if enrolled now and its password can be
        derived, with its credential generation."""
        ids = parse_username(username)
        if ids is None:
            return None
        async with self._pool.acquire() as conn:
            found = await device_identities(conn, [ids])
        if not found:
            return None
        dev = found[0]
        if not dev.enrolled or dev.stale or dev.generation < 1 or dev.agent in URL_KEY_AGENTS:
            return None
        return Principal(username, dev.tenant, dev.device, dev.agent), dev.generation

    async def authenticate(self, username: str, password: str,
                           client_id: str | None = None) -> Principal | None:
        """The principal ``username`` logs in as with ``password``, or None. A
        device's ``client_id``, when the broker says it, must be its username.
        Failed log-ins are throttled per username (past the burst, refused
        unchecked), the server's own excepted."""
        now = time.monotonic()
        # Not the server's own user: anyone who reaches the broker could otherwise
        # keep the ingest from logging in by failing under its name.
        throttled = username != self._server_user
        if throttled and self._throttle.blocked(username, now):
            self.stats.logins_throttled += 1
            return None
        who = await self._authenticate(username, password.encode(), client_id)
        if who is None:
            if throttled:
                self._throttle.failed(username, now)
            self.stats.logins_denied += 1
        else:
            self.stats.logins_allowed += 1
        return who

    async def _authenticate(self, username: str, password: bytes,
                            client_id: str | None) -> Principal | None:
        if self._server_user is not None and username == self._server_user:
            ok = hmac.compare_digest(password, self._server_password)
            return Principal(username) if ok else None
        got = await self._enrolled(username)
        if got is None:
            return None
        who, generation = got
        assert who.tenant is not None and who.device is not None
        if not hmac.compare_digest(password, self._derived(who.tenant, who.device,
                                                           generation)):
            return None
        if client_id is not None and client_id != username:
            return None  # bound client id: a device cannot take over another's session
        return who

    async def enrolled_among(self, usernames: list[str]) -> set[str]:
        """Which of ``usernames`` are devices that may log in now (one query)."""
        ids = [k for k in (parse_username(u) for u in usernames) if k is not None]
        if not ids:
            return set()
        async with self._pool.acquire() as conn:
            found = await device_identities(conn, ids)
        return {f"{d.tenant}.{d.device}" for d in found
                if d.enrolled and not d.stale and d.generation >= 1
                and d.agent not in URL_KEY_AGENTS}

    async def principal(self, username: str) -> Principal | None:
        """Who ``username`` is for an authorisation question (the broker
        authenticated it before): the server, or a device enrolled *now*."""
        if self._server_user is not None and username == self._server_user:
            return Principal(username)
        got = await self._enrolled(username)
        return None if got is None else got[0]

    # --- what ----------------------------------------------------------------------

    def may(self, who: Principal, action: Action, topic: str) -> bool:
        """May ``who`` publish to ``topic`` / subscribe to the filter ``topic``? A
        device: its own topics, literally; the server: its role's filters."""
        if who.is_server:
            patterns = SERVER_PUBLISH if action == "publish" else SERVER_SUBSCRIBE
            return any(filter_covers(p, topic) for p in patterns)
        assert who.tenant is not None and who.device is not None
        own = device_topics(who.tenant, who.device, who.agent)
        return topic in (own.publish if action == "publish" else own.subscribe)

    async def check(self, username: str, action: Action, topic: str,
                    client_id: str | None = None) -> bool:
        """An authorisation question, counted."""
        who = await self.principal(username)
        ok = who is not None and (who.is_server or client_id is None
                                  or client_id == username) and self.may(who, action, topic)
        if ok:
            self.stats.checks_allowed += 1
        else:
            self.stats.checks_denied += 1
        return ok

    # --- RabbitMQ's resources ---------------------------------------------------------

    async def rabbit_resource(self, username: str, resource: str, name: str,
                              permission: str) -> bool:
        """RabbitMQ's resource question (vhost already allowed): a device may write
        to and read from (bind on) ``amq.topic`` only (the routing keys are asked
        apart, :meth:`rabbit_topic`), and use its own MQTT subscription queues; the
        server its own queues (``mdm-*``, and MQTT sessions of its ``mdm-*`` client
        ids), never a device's session."""
        who = await self.principal(username)
        ok = False
        if who is not None and resource == "exchange":
            ok = name == MQTT_EXCHANGE and permission in ("read", "write")
        elif who is not None and resource == "queue":
            own = (f"{_MQTT_QUEUE_PREFIX}{who.username}qos0",
                   f"{_MQTT_QUEUE_PREFIX}{who.username}qos1")
            ok = name in own or (who.is_server and name.startswith(
                (SERVER_QUEUE_PREFIX, _MQTT_QUEUE_PREFIX + SERVER_QUEUE_PREFIX)))
        elif who is not None and resource == "topic":
            ok = name == MQTT_EXCHANGE  # the routing key is asked for apart
        if ok:
            self.stats.checks_allowed += 1
        else:
            self.stats.checks_denied += 1
        return ok

    def may_key(self, who: Principal, action: Action, routing_key: str) -> bool:
        """:meth:`may` for RabbitMQ, asked with the routing key (or binding pattern)
        the MQTT plugin made of the topic: compared with the keys of the topics
        allowed (:func:`topic_routing_key`)."""
        if who.is_server:
            patterns = SERVER_PUBLISH if action == "publish" else SERVER_SUBSCRIBE
            return any(filter_covers(server_routing_key(p), routing_key, sep=".", one="*")
                       for p in patterns)
        assert who.tenant is not None and who.device is not None
        own = device_topics(who.tenant, who.device, who.agent)
        allowed = own.publish if action == "publish" else own.subscribe
        return any(routing_key == topic_routing_key(t) for t in allowed)

    async def rabbit_topic(self, username: str, exchange: str, permission: str,
                           routing_key: str, client_id: str | None = None) -> bool:
        """RabbitMQ's topic question: ``write`` is a publish with ``routing_key``,
        ``read`` a binding (a subscription) with it, on ``exchange``."""
        ok = False
        if exchange == MQTT_EXCHANGE and permission in ("read", "write"):
            who = await self.principal(username)
            action: Action = "publish" if permission == "write" else "subscribe"
            ok = who is not None and (who.is_server or client_id is None
                                      or client_id == username) \
                and self.may_key(who, action, routing_key)
        if ok:
            self.stats.checks_allowed += 1
        else:
            self.stats.checks_denied += 1
        return ok
