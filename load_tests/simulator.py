"""Fleet simulator: enrolls devices and publishes realistic telemetry over MQTT.

CLI::

    python -m load_tests.simulator --devices 200 --rate 5000 --duration 60
    python -m load_tests.simulator --no-enroll --devices 1 --count 200000 --rate 0

Library (benchmarks, tests)::

    enrollments = await enroll_fleet(dsn, mqtt_url, "demo", 100)  # database + broker
    with Fleet(enrollments, mqtt_url) as fleet:
        stats = fleet.publish(100_000, rate=10_000)      # returns once all are PUBACKed
    stats.unique_by_device_kind[("sim-0000", "location")]  # compare with what is stored

Design (measured on this 2-core machine, local Mosquitto, small location messages):
paho's own network thread (``loop_start``) published ~17k msg/s on one connection
and ~6.6k msg/s spread over 64 connections, because the publishing thread and the
network threads fight over the GIL. So the simulator runs paho *without* its
thread: one driver thread builds the messages, publishes them (paho writes to the
socket directly) and reads the PUBACKs of every connection with ``select``; that
reached 32k-37k msg/s. ``Fleet.publish`` blocks the calling thread (use
``Fleet.apublish`` from asyncio, or better run the simulator in its own process so it
does not share a GIL with the system under test).

Outstanding QoS 1 publishes are bounded per connection (``max_inflight``, released in
``on_publish``): paho's message ids are 16-bit and a publisher with more than 65,535
unacknowledged messages overwrites its own pending ones.

Latency: a single-record message's ``ts`` is its publish time (epoch ms, taken just
before the publish call), so publish->commit latency is ``committed_at - ts`` with
nothing extra in the payload. Records of an offline batch carry past timestamps;
for those pass ``track_published_at=True`` to get ``Stats.published_at`` (epoch
seconds per (device, kind, record id); about 200 bytes a record).

Record ids are ``{run_id}-{n}`` with ``n`` counting per device; ``run_id`` is fresh
per ``Fleet`` unless given, so a second run is not deduplicated against the first.

Credentials: the project's broker lets each device in with its own credentials
only, and lets it publish only under its own topics. ``mqtt_url`` carries the
server's MQTT user (``mqtt://mdm-server:PASSWORD@host:port``, as ``MDM_MQTT_URL``):
``enroll_fleet`` uses it to give the enrolled devices their broker clients, as
``mdm-server device enroll`` does; ``--no-enroll`` gives synthetic devices broker
clients of their own (``provision_synthetic``). Every device then connects on a
connection of its own with its own credentials, where its enrollment says: its
``mqtt.url``, over TLS for ``mqtts://``, trusting only the CA in ``mqtt.ca_pem``
when there is one (else the system's CAs), as a real agent does (docs/protocol.md,
"Connecting"). The CLI enrolls with the broker address the server gives devices:
MDM_MQTT_PUBLIC_URL and MDM_MQTT_PUBLIC_CA_FILE, else MDM_MQTT_URL's (``scripts/run``
sets all three). Over TLS the driver thread also reads what the TLS layer has
already decrypted (``pending()``), which ``select`` does not see.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import math
import os
import random
import secrets
import selectors
import signal
import ssl
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from agent_protocol import (
    Record,
    Status,
    acks_topic,
    commands_topic,
    encode_status,
    encode_telemetry,
    status_topic,
    telemetry_topic,
)
from agent_protocol.agent import CommandHandler, Outcome
from load_tests.fleet_data import DEFAULT_KIND_WEIGHTS, KIND_ORDER, DeviceProfile, person_for

__all__ = [
    "CONSENT_POLICIES",
    "DEFAULT_KIND_WEIGHTS",
    "AgentStats",
    "ConsentPolicy",
    "Fleet",
    "SimulatorError",
    "Stats",
    "enroll_fleet",
    "main",
    "provision_synthetic",
    "synthetic_enrollments",
]

DEVICE_PREFIX = "sim-"
BATCH_MIN, BATCH_MAX = 2, 50
MAX_MQTT_INFLIGHT = 65_535  # 16-bit packet ids
DUP_RING = 4096  # recent messages a duplicate is drawn from


class SimulatorError(Exception):
    """The simulator could not do what it was asked (connect, enroll, drain)."""


# --- enrollment -------------------------------------------------------------------------


def device_name(i: int) -> str:
    return f"{DEVICE_PREFIX}{i:04d}"


def _ownership_plan(n: int, personal_share: float, seed: int | None) -> list[bool]:
    """Which of ``n`` devices are personal: exactly round(n * share), chosen by seed."""
    if not 0.0 <= personal_share <= 1.0:
        raise ValueError("personal_share must be within [0, 1]")
    k = round(n * personal_share)
    chosen = set(random.Random(f"{seed!r}/ownership").sample(range(n), k))
    return [i in chosen for i in range(n)]


async def enroll_fleet(
    dsn: str,
    mqtt_url: str,
    tenant: str,
    n: int,
    personal_share: float = 0.0,
    *,
    seed: int | None = None,
    master_key: bytes | None = None,
    device_url: str | None = None,
    ca_pem: str | None = None,
    groups: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Enroll devices ``sim-0000``.. in ``tenant`` (created if missing).

    ``groups``: device i joins ``groups[i % len(groups)]`` (none if empty). Devices
    that are enrolled already get new credentials (``reenroll_device``).
    Personal devices carry their user's e-mail. If ``mqtt_url`` names the server's
    MQTT user, the broker gets the devices' identities (SimulatorError if it cannot
    be told). The enrollments send the devices to ``device_url`` (trusting
    ``ca_pem``), else to ``mqtt_url``'s address. Returns the enrollment JSON of each.
    """
    # Imported here: only enrollment needs the database driver and the server package.
    from mdm_server.broker.identity import sync_or_defer
    from mdm_server.config import MqttSettings, master_key_from_env
    from mdm_server.storage.devices import (
        EnrollmentError,
        enroll_device,
        reenroll_device,
    )
    from mdm_server.storage.pool import connect
    from mdm_server.storage.tenants import ensure_tenant

    # Device MQTT passwords are derived from the master key, and the server's
    # command-signing key is created by the first enrollment, stored encrypted under
    # it: the same MDM_MASTER_KEY the server runs with (``master_key`` if given).
    master_key = master_key or master_key_from_env(os.environ)
    personal = _ownership_plan(n, personal_share, seed)
    out: list[dict[str, Any]] = []
    conn = await connect(dsn)
    try:
        if master_key is None:
            raise RuntimeError("enroll_fleet needs MDM_MASTER_KEY or MDM_MASTER_KEY_FILE in "
                               "the environment, the same as the server's")
        await ensure_tenant(conn, tenant)
        for i in range(n):
            device = device_name(i)
            email = person_for(device, seed).email if personal[i] else None
            try:
                enrollment = await enroll_device(
                    conn, tenant=tenant, device=device,
                    ownership="personal" if personal[i] else "corporate",
                    user_email=email, mqtt_url=device_url or mqtt_url, mqtt_ca_pem=ca_pem,
                    master_key=master_key,
                    groups=(groups[i % len(groups)],) if groups else (),
                )
            except EnrollmentError:
                enrollment = await reenroll_device(
                    conn, tenant=tenant, device=device, mqtt_url=device_url or mqtt_url,
                    mqtt_ca_pem=ca_pem, master_key=master_key,
                )
            if email is not None:
                enrollment.setdefault("user_email", email)
            out.append(enrollment)
        settings = MqttSettings.from_url(mqtt_url)
        if settings.username:
            why = await sync_or_defer(settings, conn, master_key,
                                      [(tenant, e["device"]) for e in out])
            if why is not None:
                raise SimulatorError(f"devices enrolled, but the broker was not updated: {why}")
    finally:
        await conn.close()
    return out


def synthetic_enrollments(
    tenant: str,
    n: int,
    mqtt_url: str,
    personal_share: float = 0.0,
    *,
    seed: int | None = None,
    prefix: str = DEVICE_PREFIX,
    device_url: str | None = None,
    ca_pem: str | None = None,
) -> list[dict[str, Any]]:
    """Enrollment-shaped dicts without a database (broker-only tests and benchmarks).

    Each device gets the username and client id ``{tenant}.{device}`` and a random
    password, and is sent to ``device_url`` (trusting ``ca_pem``), else to
    ``mqtt_url``'s address; :func:`provision_synthetic` gives them broker clients.
    """
    host, port, _, _ = _parse_mqtt_url(device_url or mqtt_url)
    scheme = (device_url or mqtt_url).split("://", 1)[0]
    personal = _ownership_plan(n, personal_share, seed)
    out = []
    for i in range(n):
        device = f"{prefix}{i:04d}"
        e: dict[str, Any] = {
            "tenant": tenant,
            "device": device,
            "ownership": "personal" if personal[i] else "corporate",
            "mqtt": {
                "url": f"{scheme}://{host}:{port}", "host": host, "port": port,
                "tls": scheme == "mqtts", "ca_pem": ca_pem,
                "username": f"{tenant}.{device}", "password": secrets.token_urlsafe(24),
                "client_id": f"{tenant}.{device}",
            },
            "topics": {"telemetry": f"mdm/v1/{tenant}/devices/{device}/telemetry/{{kind}}"},
        }
        if personal[i]:
            e["user_email"] = person_for(device, seed).email
        out.append(e)
    return out


SYNTHETIC_TEXTNAME = "mdm-simulated"  # not "mdm-device": serve's reconcile leaves them alone


async def provision_synthetic(mqtt_url: str, enrollments: Sequence[Mapping[str, Any]]) -> None:
    """Give synthetic devices broker clients of their own (no database), with the
    same rights an enrolled device gets, through the dynamic-security plugin as
    the server's user named in ``mqtt_url``. A client of the same name is replaced."""
    from mdm_server.broker.dynsec import Dynsec, DynsecError
    from mdm_server.broker.identity import device_acls
    from mdm_server.config import MqttSettings

    commands: list[dict[str, Any]] = []
    for e in enrollments:
        m, role = e["mqtt"], f"mdm-sim:{e['mqtt']['username']}"
        commands += [
            {"command": "deleteClient", "username": m["username"]},
            {"command": "deleteRole", "rolename": role},
            {"command": "createRole", "rolename": role,
             "acls": device_acls(e["tenant"], e["device"])},
            {"command": "createClient", "username": m["username"], "clientid": m["client_id"],
             "password": m["password"], "textname": SYNTHETIC_TEXTNAME,
             "roles": [{"rolename": role}]},
        ]
    try:
        async with Dynsec(MqttSettings.from_url(mqtt_url)) as dynsec:
            responses = await dynsec.call(commands)
    except DynsecError as exc:
        raise SimulatorError(f"cannot give the devices broker clients: {exc}") from None
    refused = [r for c, r in zip(commands, responses, strict=True)
               if "error" in r and not c["command"].startswith("delete")]
    if refused:
        raise SimulatorError(f"the broker refused {refused[0]['command']}: "
                             f"{refused[0]['error']}")


def tls_context(mqtt: Mapping[str, Any]) -> ssl.SSLContext | None:
    """What an agent does with its enrollment's ``mqtt``: None for ``mqtt://``; for
    ``mqtts://`` TLS (1.2 at least) checking the broker's certificate and host name
    against ``ca_pem`` only when given (a private CA), else the system's CAs."""
    if not str(mqtt.get("url", "")).startswith("mqtts://"):
        return None
    ctx = ssl.create_default_context(cadata=mqtt.get("ca_pem") or None)
    if not mqtt.get("ca_pem"):
        ctx.load_default_certs()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _parse_mqtt_url(url: str) -> tuple[str, int, str | None, str | None]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise SimulatorError("MQTT URL must look like mqtt[s]://[user:pass@]host:port")
    return (
        parts.hostname,
        parts.port or (8883 if parts.scheme == "mqtts" else 1883),
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
    )


# --- statistics ---------------------------------------------------------------------------


@dataclass
class Stats:
    """What one ``Fleet.publish`` call did.

    ``messages`` are PUBLISH packets (a batch is one message, a duplicate is one more
    message); ``records`` count every record sent, duplicates included;
    ``unique_records`` / ``unique_by_device_kind`` count distinct (device, kind, id)
    -- what the server should store after deduplication, provided ``unacked == 0``.
    """

    messages: int = 0
    acked: int = 0
    records: int = 0
    unique_records: int = 0
    dup_messages: int = 0
    batch_messages: int = 0
    payload_bytes: int = 0
    elapsed_s: float = 0.0
    reconnects: int = 0
    max_inflight_seen: int = 0
    unique_by_kind: Counter[str] = field(default_factory=Counter)
    unique_by_device_kind: Counter[tuple[str, str]] = field(default_factory=Counter)
    published_at: dict[tuple[str, str, str], float] | None = None
    interrupted: bool = False

    @property
    def unacked(self) -> int:
        return self.messages - self.acked

    @property
    def rate(self) -> float:
        """Messages per second over the whole call (until the last PUBACK)."""
        return self.messages / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def record_rate(self) -> float:
        return self.records / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "acked": self.acked,
            "unacked": self.unacked,
            "records": self.records,
            "unique_records": self.unique_records,
            "dup_messages": self.dup_messages,
            "batch_messages": self.batch_messages,
            "payload_bytes": self.payload_bytes,
            "elapsed_s": round(self.elapsed_s, 3),
            "rate_msgs_per_s": round(self.rate, 1),
            "rate_records_per_s": round(self.record_rate, 1),
            "reconnects": self.reconnects,
            "max_inflight_seen": self.max_inflight_seen,
            "interrupted": self.interrupted,
            "unique_by_kind": dict(sorted(self.unique_by_kind.items())),
        }

    def to_json(self, *, per_device: bool = True) -> bytes:
        doc = self.summary()
        if per_device:
            per: dict[str, dict[str, int]] = {}
            for (dev, kind), n in sorted(self.unique_by_device_kind.items()):
                per.setdefault(dev, {})[kind] = n
            doc["unique_by_device_kind"] = per
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2)


# --- rate limiting -------------------------------------------------------------------------


class TokenBucket:
    """Refills ``rate`` tokens a second up to ``burst``; ``delay(n)`` says how long to wait.

    The long-run rate is exact (tokens come from elapsed monotonic time, not from
    counting sleeps), so oversleeping one wait is made up by the next ones, up to
    ``burst``.
    """

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate * 0.05)
        self._tokens = min(self.burst, max(1.0, rate * 0.005))
        self._last = time.monotonic()

    def refund(self, n: float) -> None:
        self._tokens += n

    def delay(self, n: float, now: float) -> float:
        """0 and take ``n`` tokens if there are enough, else seconds until there will be."""
        tokens = self._tokens + (now - self._last) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self._last = now
        need = min(n, self.burst)  # a batch larger than the bucket waits for a full one
        if tokens >= need:
            self._tokens = tokens - n
            return 0.0
        self._tokens = tokens
        return (need - tokens) / self.rate


# --- connections ------------------------------------------------------------------------------


#: How a simulated device's user answers a remote view: ``accept``, ``refuse``,
#: ``ignore`` (never answers: the server expires it), or the share of users (0..1)
#: who accept, drawn per device from the fleet's seed (the rest refuse).
ConsentPolicy = str | float
CONSENT_POLICIES = ("accept", "refuse", "ignore")


@dataclass
class AgentStats:
    """What the fleet's agents did with the commands they received."""

    received: int = 0  # command messages that arrived
    executed: int = 0  # verified and carried out (each command id once)
    duplicates: int = 0  # arrived again: the first acks repeated, nothing done
    rejected: Counter[str] = field(default_factory=Counter)  # reason -> count
    notices_shown: int = 0
    acks_published: int = 0
    by_type: Counter[str] = field(default_factory=Counter)  # executed, per command type
    # Remote views: each question put to a user, and what they answered
    # (command id -> "given", "refused" or "ignored").
    consent: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"received": self.received, "executed": self.executed,
                "duplicates": self.duplicates, "rejected": dict(self.rejected),
                "notices_shown": self.notices_shown, "acks_published": self.acks_published,
                "by_type": dict(self.by_type),
                "consent": dict(Counter(self.consent.values()))}


def _check_consent(policy: ConsentPolicy) -> None:
    if isinstance(policy, str):
        if policy not in CONSENT_POLICIES:
            raise SimulatorError(f"consent must be one of {', '.join(CONSENT_POLICIES)} "
                                 "or a share from 0 to 1")
    elif not 0.0 <= policy <= 1.0:
        raise SimulatorError("a consent share must be from 0 to 1")


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Agent:
    """A device's agent side: verifies each command with the real agent code
    (agent_protocol.agent.CommandHandler), "shows" the notice (counts it), acts
    (counts it) and publishes the acks. ``online`` on every connection. A remote
    view is put to the device's "user", who answers at once as ``consent`` says."""

    __slots__ = ("acks", "answer", "commands", "handler", "stats", "status")

    def __init__(self, enrollment: Mapping[str, Any], stats: AgentStats,
                 state_dir: Path | None = None, consent: ConsentPolicy = "accept",
                 seed: int | None = None) -> None:
        # Imported here: only agents verify signatures.
        import base64

        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        from load_tests.agent_state import FileStateStore

        tenant, device = enrollment["tenant"], enrollment["device"]
        keys = {k: Ed25519PublicKey.from_public_bytes(base64.b64decode(v))
                for k, v in enrollment.get("server_keys", {}).items()}
        # Accepted nonces and executed commands outlive the process, as a real
        # agent's must (agent_protocol.agent, "Across restarts").
        store = (None if state_dir is None
                 else FileStateStore(state_dir / f"{tenant}.{device}.agent-state.json"))
        self.handler = CommandHandler(tenant, device, keys, store=store)
        self.commands = commands_topic(tenant, device)
        self.acks = acks_topic(tenant, device)
        self.status = status_topic(tenant, device)
        self.stats = stats
        # This user's answer, the same for every question (a share: drawn once, from
        # the seed and the device, so a seeded fleet answers alike every run).
        if isinstance(consent, str):
            self.answer = consent
        else:
            draw = random.Random(f"{seed}:{tenant}:{device}").random()
            self.answer = "accept" if draw < consent else "refuse"

    def handle(self, payload: bytes) -> tuple[bytes, ...]:
        st = self.stats
        st.received += 1
        now = _now_ms()
        result = self.handler.handle(payload, now)
        if result.outcome is Outcome.EXECUTED:
            st.executed += 1
            if result.action is not None:
                st.by_type[result.action.type] += 1
        elif result.outcome is Outcome.DUPLICATE:
            st.duplicates += 1
        elif result.outcome is not Outcome.CONSENT_NEEDED:
            st.rejected[result.reason or "?"] += 1
        if result.notice is not None:
            st.notices_shown += 1
        payloads = result.payloads()
        if result.consent is not None:  # a remote view: the user answers
            cid = result.consent.command_id
            if self.answer == "ignore":
                st.consent[cid] = "ignored"
            else:
                answered = self.handler.answer_consent(cid, given=self.answer == "accept",
                                                       now_ms=now)
                st.consent[cid] = ("given" if answered.outcome is Outcome.EXECUTED
                                   else "refused")
                if answered.action is not None:
                    st.executed += 1
                    st.by_type[answered.action.type] += 1
                payloads += answered.payloads()
        return payloads


class _Connection:
    """One MQTT connection driven by the fleet's thread (paho without ``loop_start``)."""

    def __init__(
        self, *, index: int, host: str, port: int, client_id: str, username: str | None,
        password: str | None, max_inflight: int, keepalive: int,
        agent: _Agent | None = None, tls: ssl.SSLContext | None = None,
    ) -> None:
        self.index = index
        self.agent = agent
        self.host = host
        self.port = port
        self.max_inflight = max_inflight
        self.inflight = 0
        self.acked = 0  # PUBACKs of telemetry (the agent's own publishes are not counted)
        self.agent_mids: set[int] = set()  # the agent's acks and status, awaiting PUBACK
        self.connected = False
        self.subscribed = False
        self.reconnects = 0
        self.last_error = ""
        self.next_reconnect = 0.0
        self.backoff = 0.1
        self.sock: Any = None
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        if username is not None:
            client.username_pw_set(username, password)
        self.tls = tls is not None
        if tls is not None:
            client.tls_set_context(tls)
        # paho's own limit would queue inside paho; ours (below) bounds the total.
        client.max_inflight_messages_set(max_inflight)
        client.max_queued_messages_set(0)
        client.on_publish = self._on_publish
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        if agent is not None:
            client.will_set(agent.status, encode_status(Status("offline", _now_ms())), qos=1)
            client.on_subscribe = self._on_subscribe
            client.on_message = self._on_message
        self.keepalive = keepalive
        self.client = client

    # paho callbacks (run on the driver thread, inside loop_read)
    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: Any, props: Any
                    ) -> None:
        self.inflight -= 1
        if self.agent_mids and mid in self.agent_mids:
            self.agent_mids.discard(mid)
        else:
            self.acked += 1

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
                    ) -> None:
        if rc.is_failure:
            self.last_error = f"connection refused: {rc}"
            self.connected = False
        else:
            self.connected = True
            self.backoff = 0.1
            if self.agent is not None:
                client.subscribe(self.agent.commands, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: Any,
                      props: Any) -> None:
        # Subscribed: tell the server, which re-sends what this device may lack.
        assert self.agent is not None
        self.subscribed = True
        self._send(self.agent.status, encode_status(Status("online", _now_ms())))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        assert self.agent is not None
        for ack in self.agent.handle(bytes(msg.payload)):
            self._send(self.agent.acks, ack)
            self.agent.stats.acks_published += 1

    def _send(self, topic: str, payload: bytes) -> None:
        # In flight like telemetry (on_publish decrements when the broker PUBACKs), but
        # not counted as telemetry acknowledged.
        info = self.client.publish(topic, payload, qos=1)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.inflight += 1
            self.agent_mids.add(info.mid)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                       props: Any) -> None:
        self.connected = False
        self.subscribed = False
        self.agent_mids.clear()  # a clean session: those will never be acknowledged
        self.last_error = f"disconnected: {rc}"

    def connect(self) -> None:
        try:
            self.client.connect(self.host, self.port, keepalive=self.keepalive)
        except OSError as e:
            raise SimulatorError(f"cannot connect to {self.host}:{self.port}: {e}") from e
        self.sock = self.client.socket()

    def try_reconnect(self, now: float) -> None:
        if now < self.next_reconnect:
            return
        self.next_reconnect = now + self.backoff
        self.backoff = min(self.backoff * 2, 5.0)
        try:
            self.client.reconnect()
        except OSError as e:
            self.last_error = f"reconnect failed: {e}"
            self.sock = None
            return
        self.sock = self.client.socket()
        self.reconnects += 1


class _Device:
    __slots__ = ("conn", "counter", "device", "kind_topics", "profile", "tenant")

    def __init__(self, tenant: str, device: str, conn: _Connection, profile: DeviceProfile
                 ) -> None:
        self.tenant = tenant
        self.device = device
        self.conn = conn
        self.profile = profile
        self.counter = 0
        self.kind_topics = {k: telemetry_topic(tenant, device, k) for k in KIND_ORDER}


def _encode(records: Sequence[tuple[str, int, dict[str, Any]]], device: str, kind: str) -> bytes:
    # device= and kind= go into the envelope so the server can detect a topic/payload
    # mismatch; kind= also makes agent_protocol validate the data before it is sent.
    return encode_telemetry(
        [Record(id=i, ts_ms=ts, data=d) for i, ts, d in records], device=device, kind=kind
    )


# --- the fleet ---------------------------------------------------------------------------------


ProgressFn = Callable[[Stats, int, float], None]


class Fleet:
    """A set of enrolled devices, each on an MQTT connection of its own.

    ``connections`` defaults to one per device, which is what the project's broker
    requires: a connection logs in with its device's credentials and client id,
    and the broker lets it publish only under that device's topics. Fewer
    connections than devices multiplex several devices on one connection, logged
    in with the credentials of ``mqtt_url`` if it has any, else those of its first
    device: only an anonymous experimental broker accepts the others' messages
    (the project's broker PUBACKs and drops them).

    ``agents=True``: each device also runs its agent on its commands topic
    (:class:`_Agent`; ``agent_state``: a directory for their saved state), and
    ``consent`` says how its user answers a remote view (:data:`ConsentPolicy`).
    """

    def __init__(
        self,
        enrollments: Sequence[Mapping[str, Any]],
        mqtt_url: str | None = None,
        *,
        connections: int | None = None,
        max_inflight: int = 1000,
        seed: int | None = None,
        run_id: str | None = None,
        keepalive: int = 60,
        agents: bool = False,
        agent_state: Path | None = None,
        consent: ConsentPolicy = "accept",
    ) -> None:
        if not enrollments:
            raise SimulatorError("a fleet needs at least one device")
        _check_consent(consent)
        if agents and connections not in (None, len(enrollments)):
            raise SimulatorError("agents need one connection per device (their own identity)")
        if not 1 <= max_inflight <= MAX_MQTT_INFLIGHT:
            raise SimulatorError(f"max_inflight must be 1..{MAX_MQTT_INFLIGHT} (16-bit ids)")
        n_conn = connections if connections else len(enrollments)
        n_conn = max(1, min(n_conn, len(enrollments)))
        self.seed = seed
        self.run_id = run_id or secrets.token_hex(4)
        self.max_inflight = max_inflight
        url_creds: tuple[str | None, str | None] = (None, None)
        if mqtt_url is not None:
            _, _, u, p = _parse_mqtt_url(mqtt_url)
            url_creds = (u, p)
        groups: list[list[Mapping[str, Any]]] = [[] for _ in range(n_conn)]
        for i, e in enumerate(enrollments):
            groups[i % n_conn].append(e)
        self._conns: list[_Connection] = []
        self.devices: list[_Device] = []
        self.agent_stats = AgentStats()
        for ci, group in enumerate(groups):
            m = group[0]["mqtt"]
            tls = None
            if len(group) == 1 or mqtt_url is None:
                # Where the enrollment sends the device, as its agent would connect.
                host, port = m["host"], int(m["port"])
                tls = tls_context(m)
            else:
                host, port, _, _ = _parse_mqtt_url(mqtt_url)
            if len(group) == 1:
                user, pw, cid = m.get("username"), m.get("password"), m.get("client_id")
            else:
                user, pw = url_creds if url_creds[0] is not None else (
                    m.get("username"), m.get("password"))
                cid = f"{m.get('client_id') or group[0]['device']}-mux{ci}"
            cid = cid or f"{group[0]['tenant']}.{group[0]['device']}"
            self._conns.append(_Connection(
                index=ci, host=host, port=port, client_id=cid, username=user, password=pw,
                max_inflight=max_inflight, keepalive=keepalive,
                agent=(_Agent(group[0], self.agent_stats, agent_state, consent, seed)
                       if agents else None),
                tls=tls,
            ))
        # Devices in enrollment order; device i rides on connection i % n_conn.
        for i, e in enumerate(enrollments):
            profile = DeviceProfile(
                e["device"], seed=seed, ownership=e.get("ownership", "corporate"),
                user_email=e.get("user_email"),
            )
            self.devices.append(_Device(e["tenant"], e["device"], self._conns[i % n_conn],
                                        profile))
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._sel: selectors.DefaultSelector | None = None
        self._started = False
        self._dev_cycle = itertools.cycle(self.devices)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def connections(self) -> int:
        return len(self._conns)

    def connect(self, timeout: float = 10.0) -> None:
        """Open every connection and wait for all CONNACKs."""
        if self._started:
            return
        self._sel = selectors.DefaultSelector()
        for c in self._conns:
            c.connect()
        deadline = time.monotonic() + timeout
        while not all(c.connected for c in self._conns):
            refused = [c.last_error for c in self._conns if c.last_error.startswith("conn")]
            if refused:
                self.close()
                raise SimulatorError(refused[0])
            if time.monotonic() > deadline:
                self.close()
                raise SimulatorError("timed out waiting for CONNACK")
            self._poll(0.05)
        self._started = True

    def close(self) -> None:
        for c in self._conns:
            with contextlib.suppress(Exception):
                c.client.disconnect()
            with contextlib.suppress(Exception):
                c.client.loop_write()
            sock = c.client.socket()
            if sock is not None:
                with contextlib.suppress(Exception):
                    sock.close()
        if self._sel is not None:
            self._sel.close()
            self._sel = None
        self._started = False

    def __enter__(self) -> Fleet:
        self.connect()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def stop(self) -> None:
        """Ask a running ``publish`` to stop and drain (thread- and signal-safe)."""
        self._stop.set()

    def abort(self) -> None:
        """Ask a running ``publish`` to stop without waiting for PUBACKs."""
        self._stop.set()
        self._abort.set()

    @property
    def inflight(self) -> int:
        return sum(c.inflight for c in self._conns)

    @property
    def acked(self) -> int:
        return sum(c.acked for c in self._conns)

    # -- the driver loop -----------------------------------------------------------------

    def _poll(self, timeout: float) -> None:
        """Read PUBACKs, flush pending writes, keep connections alive (one select)."""
        sel = self._sel
        assert sel is not None
        now = time.monotonic()
        watched = 0
        reg = sel.get_map()
        for c in self._conns:
            sock = c.client.socket()
            if sock is None:
                if c.sock is not None and c.sock in reg:
                    sel.unregister(c.sock)
                c.sock = None
                c.connected = False
                c.try_reconnect(now)
                sock = c.client.socket()
                if sock is None:
                    continue
            if sock is not c.sock and c.sock is not None and c.sock in reg:
                sel.unregister(c.sock)
            c.sock = sock
            events = selectors.EVENT_READ
            if c.client.want_write():
                events |= selectors.EVENT_WRITE
            if sock in reg:
                if reg[sock].events != events:
                    sel.modify(sock, events, c)
            else:
                sel.register(sock, events, c)
            watched += 1
        if watched == 0:
            time.sleep(min(timeout, 0.05))
            return
        # TLS: bytes the SSL object decrypted already do not make the socket readable.
        pending = [c for c in self._conns if c.tls and _pending(c.client.socket())]
        read: set[int] = set()
        for key, mask in sel.select(0 if pending else timeout):
            conn: _Connection = key.data
            if mask & selectors.EVENT_READ:
                read.add(conn.index)
                rc = conn.client.loop_read(1000)
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    conn.connected = False
            if mask & selectors.EVENT_WRITE and conn.client.socket() is not None:
                conn.client.loop_write()
        for conn in pending:
            if conn.index not in read and conn.client.socket() is not None:
                if conn.client.loop_read(1000) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    conn.connected = False

    def _keepalive(self) -> None:
        for c in self._conns:
            if c.client.socket() is not None:
                c.client.loop_misc()

    def serve_commands(self, until: Callable[[], bool], *, timeout: float = 60.0,
                       poll_s: float = 0.05) -> bool:
        """Run the agents (receive, verify, ack) until ``until()`` is true or
        ``timeout``; True if ``until()`` became true. ``publish`` runs them too."""
        self.connect()
        deadline = time.monotonic() + timeout
        next_misc = 0.0
        while not until():
            now = time.monotonic()
            if now > deadline:
                return False
            if now >= next_misc:
                self._keepalive()
                next_misc = now + 1.0
            self._poll(poll_s)
        return True

    @property
    def agents_subscribed(self) -> int:
        """How many agents have their commands subscription (and said online)."""
        return sum(1 for c in self._conns if c.agent is not None and c.subscribed)

    def publish(
        self,
        count: int | None = None,
        *,
        rate: float | None = None,
        duration: float | None = None,
        kinds: Iterable[str] | Mapping[str, float] | None = None,
        batch_share: float = 0.0,
        dup_share: float = 0.0,
        drain_timeout: float = 30.0,
        track_published_at: bool = False,
        progress: ProgressFn | None = None,
    ) -> Stats:
        """Publish until ``count`` messages, ``duration`` seconds or ``stop()``.

        ``rate`` is records per second for the whole fleet (None or 0: flat out).
        ``kinds`` is a subset of the kinds (weighted realistically) or an explicit
        weight map. Returns once every message is PUBACKed, or after
        ``drain_timeout`` (then ``Stats.unacked > 0``).
        """
        if not 0.0 <= batch_share <= 1.0 or not 0.0 <= dup_share <= 1.0:
            raise ValueError("batch_share and dup_share must be within [0, 1]")
        weights = _kind_weights(kinds)
        kind_names = list(weights)
        cum = list(itertools.accumulate(weights.values()))
        total_w = cum[-1]
        self.connect()
        self._stop.clear()
        self._abort.clear()

        stats = Stats(published_at={} if track_published_at else None)
        published_at = stats.published_at
        by_dk = stats.unique_by_device_kind
        by_kind = stats.unique_by_kind
        rng = self._rng
        rnd = rng.random
        run_id = self.run_id
        ring: deque[tuple[_Device, str, bytes]] = deque(maxlen=DUP_RING)
        bucket = TokenBucket(rate) if rate else None
        dev_cycle = self._dev_cycle
        poll = self._poll
        clock = time.monotonic
        wall = time.time
        conns = self._conns
        acked_base = sum(c.acked for c in conns)
        reconnects0 = sum(c.reconnects for c in conns)

        t0 = clock()
        deadline = t0 + duration if duration else math.inf
        next_tick = t0 + 1.0
        next_poll_check = 0
        sent = 0
        limit = count if count is not None else -1
        pending: tuple[_Device, str, int, bool, str, bytes] | None = None
        topic, payload = "", b""
        while sent != limit and not self._stop.is_set():
            now = clock()
            if now >= deadline:
                break
            if now >= next_tick:
                next_tick = now + 1.0
                self._keepalive()
                if progress is not None:
                    stats.messages = sent
                    stats.acked = sum(c.acked for c in conns) - acked_base
                    progress(stats, self.inflight, now - t0)
            # Pick the message (kept while it waits for tokens or inflight room):
            # a duplicate of a recent one, or fresh records.
            if pending is None:
                if dup_share and ring and rnd() < dup_share:
                    dev, topic, payload = ring[int(rnd() * len(ring))]
                    pending = (dev, "", _count_records(payload), True, topic, payload)
                else:
                    dev = next(dev_cycle)
                    kind = kind_names[bisect.bisect_right(cum, rnd() * total_w)]
                    n = rng.randint(BATCH_MIN, BATCH_MAX) \
                        if batch_share and rnd() < batch_share else 1
                    pending = (dev, kind, n, False, "", b"")
            dev, kind, n_records, dup, topic, payload = pending
            conn = dev.conn
            # Rate limit in records (a duplicate costs what it carries).
            if bucket is not None:
                wait = bucket.delay(n_records, now)
                if wait > 0:
                    poll(min(wait, 0.05))
                    continue
                if conn.inflight >= conn.max_inflight or not conn.connected:
                    bucket.refund(n_records)
            # Respect the per-connection bound on unacknowledged publishes.
            if conn.inflight >= conn.max_inflight or not conn.connected:
                poll(0.05)
                continue
            pending = None
            if not dup:
                now_ms = int(wall() * 1000)
                profile = dev.profile
                recs = []
                if n_records == 1:
                    dev.counter += 1
                    recs.append((f"{run_id}-{dev.counter}", now_ms, profile.data(kind, now_ms)))
                else:
                    # An agent that was offline: one record every ~30 s, oldest first.
                    step = rng.randint(5_000, 60_000)
                    for j in range(n_records - 1, -1, -1):
                        dev.counter += 1
                        ts = now_ms - j * step
                        recs.append((f"{run_id}-{dev.counter}", ts, profile.data(kind, ts)))
                    stats.batch_messages += 1
                payload = _encode(recs, dev.device, kind)
                topic = dev.kind_topics[kind]
                by_dk[(dev.device, kind)] += n_records
                by_kind[kind] += n_records
                stats.unique_records += n_records
                stats.records += n_records
                if published_at is not None:
                    t_pub = wall()
                    for rid, _, _ in recs:
                        published_at[(dev.device, kind, rid)] = t_pub
                if dup_share:
                    ring.append((dev, topic, payload))
            else:
                stats.dup_messages += 1
                stats.records += n_records
            conn.inflight += 1
            if conn.inflight > stats.max_inflight_seen:
                stats.max_inflight_seen = conn.inflight
            info = conn.client.publish(topic, payload, qos=1)
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                conn.connected = False  # paho keeps the message and resends on reconnect
            elif info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                conn.inflight -= 1
                raise SimulatorError(f"publish failed: {mqtt.error_string(info.rc)}")
            sent += 1
            stats.payload_bytes += len(payload)
            # Read PUBACKs now and then without blocking (a full socket buffer would
            # otherwise stall the broker's writes to us).
            next_poll_check += 1
            if next_poll_check >= 64:
                next_poll_check = 0
                poll(0)
        stats.interrupted = self._stop.is_set()
        stats.messages = sent

        # Drain: wait for every PUBACK (bounded).
        drain_deadline = clock() + drain_timeout
        while self.inflight > 0 and not self._abort.is_set() and clock() < drain_deadline:
            poll(0.05)
            now = clock()
            if now >= next_tick:
                next_tick = now + 1.0
                self._keepalive()
                if progress is not None:
                    stats.acked = sum(c.acked for c in conns) - acked_base
                    progress(stats, self.inflight, now - t0)
        stats.elapsed_s = clock() - t0
        stats.acked = sum(c.acked for c in conns) - acked_base
        stats.reconnects = sum(c.reconnects for c in conns) - reconnects0
        if progress is not None:
            progress(stats, self.inflight, stats.elapsed_s)
        return stats

    async def apublish(self, count: int | None = None, **kwargs: Any) -> Stats:
        """``publish`` in a worker thread, for asyncio callers."""
        return await asyncio.to_thread(self.publish, count, **kwargs)


def _pending(sock: Any) -> bool:
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0


def _count_records(payload: bytes) -> int:
    if b'"records"' not in payload:
        return 1
    doc = orjson.loads(payload)
    return len(doc.get("records", ())) or 1


def _kind_weights(kinds: Iterable[str] | Mapping[str, float] | None) -> dict[str, float]:
    if kinds is None:
        return dict(DEFAULT_KIND_WEIGHTS)
    if isinstance(kinds, Mapping):
        weights = {str(k): float(v) for k, v in kinds.items()}
    else:
        names = list(kinds)
        weights = {k: DEFAULT_KIND_WEIGHTS.get(k, 0.0) for k in names}
    unknown = [k for k in weights if k not in KIND_ORDER]
    if unknown:
        raise ValueError(f"unknown kinds: {', '.join(unknown)} (known: {', '.join(KIND_ORDER)})")
    weights = {k: w for k, w in weights.items() if w > 0}
    if not weights:
        raise ValueError("no kind with a positive weight")
    return weights


# --- CLI -----------------------------------------------------------------------------------


class _LiveLine:
    """``sim: sent=... acked=... rate=.../s inflight=...`` once a second on stderr."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = (0.0, 0)
        self.dirty = False

    def __call__(self, stats: Stats, inflight: int, elapsed: float) -> None:
        sent = stats.messages
        t_prev, n_prev = self.last
        dt = elapsed - t_prev
        rate = (stats.records - n_prev) / dt if dt > 0 else 0.0
        self.last = (elapsed, stats.records)
        line = (f"sim: sent={sent} acked={stats.acked} rate={rate:.0f}/s "
                f"inflight={inflight} t={elapsed:.0f}s")
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
            self.dirty = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.dirty:
            self.stream.write("\n")
            self.stream.flush()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m load_tests.simulator",
        description="Enroll a simulated fleet and publish realistic telemetry over MQTT.",
    )
    p.add_argument("--tenant", default="demo")
    p.add_argument("--devices", type=int, default=10, help="devices sim-0000.. (default 10)")
    p.add_argument("--personal-share", type=float, default=0.0,
                   help="share of personal devices (with a user e-mail); default 0")
    p.add_argument("--rate", type=float, default=100.0,
                   help="records/s for the whole fleet; 0 = flat out (default 100)")
    p.add_argument("--duration", type=float, default=0.0,
                   help="seconds; 0 = until --count, Ctrl-C or SIGTERM")
    p.add_argument("--count", type=int, default=None, help="total messages, then stop")
    p.add_argument("--kinds", default=",".join(KIND_ORDER),
                   help="comma-separated kinds (default all six, realistically weighted)")
    p.add_argument("--batch-share", type=float, default=0.0,
                   help=f"share of messages sent as offline batches of {BATCH_MIN}..{BATCH_MAX}")
    p.add_argument("--dup-share", type=float, default=0.0,
                   help="share of messages re-published with the same record ids")
    p.add_argument("--max-inflight", type=int, default=1000,
                   help="unacknowledged publishes per connection (max 65535)")
    p.add_argument("--connections", type=int, default=None,
                   help="MQTT connections (default one per device, which the project's "
                        "broker requires; fewer only for an anonymous broker)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible data")
    p.add_argument("--run-id", default=None, help="record id prefix (default random)")
    p.add_argument("--json-stats", default=None, metavar="FILE",
                   help="write the final statistics as JSON to FILE")
    p.add_argument("--mqtt-url", default=None, help="default: $MDM_MQTT_URL")
    p.add_argument("--database-url", default=None, help="default: $MDM_DATABASE_URL")
    p.add_argument("--no-enroll", action="store_true",
                   help="skip the database: synthetic devices, given broker clients of "
                        "their own through the server's MQTT user in --mqtt-url")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds to wait for PUBACKs at shutdown (default 30)")
    p.add_argument("--quiet", action="store_true", help="no live line")
    p.add_argument("--groups", default="",
                   help="comma-separated groups; device i joins the (i mod n)-th at enrollment")
    p.add_argument("--agents", action="store_true",
                   help="each device also runs its agent: verifies the server's signed "
                        "commands, shows their notices, acts and acks (one connection per "
                        "device)")
    p.add_argument("--agent-state", default=None, metavar="DIR",
                   help="with --agents: where agents keep accepted nonces and executed "
                        "commands across restarts")
    p.add_argument("--enroll-only", action="store_true",
                   help="enroll the fleet, then exit (with --save-enrollments)")
    p.add_argument("--save-enrollments", default=None, metavar="FILE",
                   help="write the enrollments (device credentials: kept private, mode "
                        "0600) to FILE")
    p.add_argument("--enrollments", default=None, metavar="FILE",
                   help="use the enrollments saved in FILE instead of enrolling (enrolling "
                        "again would give the devices new credentials and end their "
                        "users' tokens)")
    return p.parse_args(argv)


def _save_enrollments(path: str, enrollments: Sequence[Mapping[str, Any]]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(orjson.dumps(list(enrollments)))


def _load_enrollments(path: str) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        doc = orjson.loads(f.read())
    if not isinstance(doc, list) or not all(isinstance(e, dict) for e in doc):
        raise SimulatorError(f"{path}: not a list of enrollments (--save-enrollments writes one)")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    from mdm_server.config import ConfigError, device_broker_from

    args = _parse_args(argv)
    err = sys.stderr
    mqtt_url = args.mqtt_url or os.environ.get("MDM_MQTT_URL")
    if not mqtt_url:
        print("sim: set MDM_MQTT_URL (or --mqtt-url): the broker and the server's MQTT user, "
              "as scripts/broker prints it", file=err)
        return 2
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    try:
        _kind_weights(kinds)
    except ValueError as e:
        print(f"sim: {e}", file=err)
        return 2
    if args.devices < 1:
        print("sim: --devices must be at least 1", file=err)
        return 2
    # Where devices are sent: as the server's enrollment does (Config.device_broker).
    try:
        device = device_broker_from({**os.environ, "MDM_MQTT_URL": mqtt_url})
    except ConfigError as e:
        print(f"sim: {e}", file=err)
        return 2
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    if args.enrollments:
        try:
            enrollments = _load_enrollments(args.enrollments)
        except (OSError, ValueError, SimulatorError) as e:
            print(f"sim: cannot read the enrollments: {e}", file=err)
            return 2
    elif args.no_enroll:
        enrollments = synthetic_enrollments(
            args.tenant, args.devices, mqtt_url, args.personal_share, seed=args.seed,
            device_url=device.url, ca_pem=device.ca_pem)
        if _parse_mqtt_url(mqtt_url)[2] is not None:
            try:
                asyncio.run(provision_synthetic(mqtt_url, enrollments))
            except SimulatorError as e:
                print(f"sim: {e}", file=err)
                return 1
    else:
        dsn = args.database_url or os.environ.get("MDM_DATABASE_URL")
        if not dsn:
            print("sim: set MDM_DATABASE_URL (or --database-url), or use --no-enroll", file=err)
            return 2
        print(f"sim: enrolling {args.devices} devices in tenant {args.tenant!r}...", file=err)
        enrollments = asyncio.run(enroll_fleet(
            dsn, mqtt_url, args.tenant, args.devices, args.personal_share, seed=args.seed,
            device_url=device.url, ca_pem=device.ca_pem, groups=groups))
    if args.save_enrollments:
        _save_enrollments(args.save_enrollments, enrollments)
    if args.enroll_only:
        print(f"sim: enrolled {len(enrollments)} devices", file=err)
        return 0

    try:
        fleet = Fleet(enrollments, mqtt_url, connections=args.connections,
                      max_inflight=args.max_inflight, seed=args.seed, run_id=args.run_id,
                      agents=args.agents,
                      agent_state=Path(args.agent_state) if args.agent_state else None)
    except SimulatorError as e:
        print(f"sim: {e}", file=err)
        return 2
    signals = [0]

    def on_signal(signum: int, frame: FrameType | None) -> None:
        signals[0] += 1
        if signals[0] == 1:
            fleet.stop()  # finish: drain PUBACKs, disconnect, summary
        else:
            fleet.abort()  # second signal: do not wait

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    live = _LiveLine(err)
    try:
        try:
            fleet.connect()
        except SimulatorError as e:
            print(f"sim: {e}", file=err)
            return 1
        print(f"sim: {len(fleet.devices)} devices on {fleet.connections} connections, "
              f"run id {fleet.run_id}, rate {'flat out' if not args.rate else args.rate}",
              file=err)
        stats = fleet.publish(
            args.count, rate=args.rate or None, duration=args.duration or None, kinds=kinds,
            batch_share=args.batch_share, dup_share=args.dup_share,
            drain_timeout=args.drain_timeout, progress=None if args.quiet else live,
        )
    finally:
        live.done()
        fleet.close()
        for s, h in old.items():
            signal.signal(s, h)
    summary = stats.summary()
    print("sim: done " + " ".join(f"{k}={v}" for k, v in summary.items()
                                  if k != "unique_by_kind"), file=err)
    print("sim: unique records by kind " + " ".join(
        f"{k}={v}" for k, v in summary["unique_by_kind"].items()), file=err)
    if args.agents:
        a = fleet.agent_stats
        print(f"sim: agents received {a.received} commands, executed {a.executed} "
              f"({' '.join(f'{k}={v}' for k, v in sorted(a.by_type.items())) or 'none'}), "
              f"showed {a.notices_shown} notices, published {a.acks_published} acks, "
              f"rejected {sum(a.rejected.values())}", file=err)
    if args.json_stats:
        with open(args.json_stats, "wb") as f:
            f.write(stats.to_json())
    return 0 if stats.unacked == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
