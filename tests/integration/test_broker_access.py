"""Device identity on the broker: a generated access matrix, against the real thing.

A private Mosquitto started with the project's config (scripts/broker: no anonymous
access, the dynamic-security plugin), `mdm-server serve` (ingest, reconcile),
PostgreSQL, and devices enrolled through the real code in two tenants. Intruders
are enrolled devices that try to publish under other devices' and tenants' topics,
subscribe to what is not theirs, leave forged wills, administer the broker, and
log in with wrong, borrowed or pattern-laden names.

Under MQTT 3.1.1 Mosquitto acknowledges a refused QoS 1 publish like an accepted
one, so no case is judged by its PUBACK: each forged message carries a marker,
and the test looks for the markers where they would arrive -- at a subscriber
logged in as the server's user (it sees every device topic, as ingest, the acks
consumer and the dispatcher do), in the ingest's database, at the device whose
topic was forged, and at the intruder. Positive controls (every device's own
traffic, the server's commands) show that the same paths do deliver.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent_protocol import KINDS, Record, Status, encode_status, encode_telemetry, outline_topic
from mdm_server.broker.dynsec import Dynsec
from mdm_server.config import MqttSettings
from tests.support.services import (
    Broker,
    Server,
    create_database,
    device_credentials,
    drop_database,
    enroll_devices,
    fetch,
    fetchval,
    running_broker,
    server_env,
    stored_id,
    wait_for_count,
)

pytestmark = pytest.mark.integration

TENANTS = {"acme": ["a1", "a2", "a3"], "globex": ["g1", "g2"]}
REVOCABLE = {"acme": ["r1", "r2"]}  # not in the matrix: the revocation tests' own
LEGACY = {"acme": ["l1"]}  # not in the matrix: given a role as made before issue 10


@dataclass(frozen=True)
class Dev:
    tenant: str
    device: str

    @property
    def user(self) -> str:
        return f"{self.tenant}.{self.device}"

    @property
    def base(self) -> str:
        return f"mdm/v1/{self.tenant}/devices/{self.device}"

    def __str__(self) -> str:
        return self.user


DEVICES = [Dev(t, d) for t, ds in TENANTS.items() for d in ds]
A1, A2, A3, G1, G2 = DEVICES
INTRUDERS = [A1, G1]  # each attacks a device of its own tenant and one of the other
WILL_INTRUDER = A3  # its own connection, so the others' stay up


def _targets(intruder: Dev) -> list[Dev]:
    same = next(d for d in DEVICES if d.tenant == intruder.tenant and d != intruder)
    other = next(d for d in DEVICES if d.tenant != intruder.tenant)
    return [same, other]


# --- the generated matrix -----------------------------------------------------------------

PUBLISH_CHANNELS = ("telemetry/location", "telemetry/identity", "acks", "status", "commands")
# Sub-topics of a device's own topics that no ACL names (issue 10).
NON_KIND_SUBTOPICS = (
    "telemetry/imei=356938035643809", "telemetry/unknownkind", "telemetry/Location",
    "telemetry/location/extra", "telemetry/location/", "telemetry/", "telemetry",
    "acks/extra", "status/extra", "telemetryx/location", "other",
)
WIDE_FILTERS = (
    "#", "mdm/#", "mdm/v1/+/devices/+/commands", "mdm/v1/+/devices/+/telemetry/+",
    "mdm/v1/+/devices/+/acks", "+/+/+/+/+/+", "$share/x/mdm/v1/+/devices/+/#",
    "$share/mdm-ingest/mdm/v1/+/devices/+/telemetry/+", "$SYS/#",
    "$CONTROL/dynamic-security/#", "$CONTROL/dynamic-security/v1/response",
)


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # publish | subscribe | will | connect | control
    actor: Dev | None = None
    target: Dev | None = None
    topic: str = ""
    username: str | None = None
    password: str | None = None  # "own", "wrong", "", "of:tenant.device", or None
    client_id: str = ""

    @property
    def marker(self) -> str:
        """Unique per case, short enough for a record id."""
        return "forged-" + hashlib.sha256(self.id.encode()).hexdigest()[:16]


def _generate() -> list[Case]:
    cases: list[Case] = []
    for intr in INTRUDERS:
        for tgt in _targets(intr):
            scope = "tenant" if tgt.tenant == intr.tenant else "other-tenant"
            for ch in PUBLISH_CHANNELS:
                cases.append(Case(f"{intr}-publishes-as-{scope}-device-{ch.replace('/', '-')}",
                                  "publish", intr, tgt, f"{tgt.base}/{ch}"))
            for f in (f"{tgt.base}/commands", f"{tgt.base}/#", f"{tgt.base}/telemetry/+",
                      f"mdm/v1/{tgt.tenant}/devices/+/commands", f"mdm/v1/{tgt.tenant}/#",
                      f"$share/x/{tgt.base}/commands"):
                cases.append(Case(f"{intr}-subscribes-{scope}-{f}", "subscribe", intr, tgt, f))
        # Its own topics, but a channel a device must not write: commands to itself.
        cases.append(Case(f"{intr}-publishes-own-commands", "publish", intr, intr,
                          f"{intr.base}/commands"))
        # Its own topics, but sub-topics that are not the protocol's: roles once
        # allowed telemetry/+ (a "kind" like imei=... reached the server), now only
        # the six kinds' literal topics, acks and status.
        for sub in NON_KIND_SUBTOPICS:
            cases.append(Case(f"{intr}-publishes-own-{sub.replace('/', '-')}", "publish",
                              intr, intr, f"{intr.base}/{sub}"))
        for f in WIDE_FILTERS:
            cases.append(Case(f"{intr}-subscribes-{f}", "subscribe", intr, None, f))
        cases.append(Case(f"{intr}-administers-the-broker", "control", intr, None,
                          "$CONTROL/dynamic-security/v1"))
    for tgt, ch in ((A2, "status"), (G1, "telemetry/location"), (G2, "acks")):
        cases.append(Case(f"{WILL_INTRUDER}-will-as-{tgt}-{ch.replace('/', '-')}", "will",
                          WILL_INTRUDER, tgt, f"{tgt.base}/{ch}"))

    def connect(label: str, username: str | None, password: str | None, client_id: str,
                victim: Dev | None = None) -> None:
        cases.append(Case(f"connect-{label}", "connect", None, victim, "", username, password,
                          client_id))

    connect("anonymous", None, None, A1.user, A1)
    connect("anonymous-no-client-id", None, None, "")
    connect("anonymous-as-ingest", None, None, "mdm-ingest-0")
    connect("wrong-password", A1.user, "wrong", A1.user, A1)
    connect("empty-password", A1.user, "", A1.user, A1)
    connect("no-password", A1.user, None, A1.user, A1)
    connect("password-of-tenant-device", A1.user, f"of:{A2}", A1.user, A1)
    connect("password-of-other-tenant-device", A1.user, f"of:{G1}", A1.user, A1)
    connect("client-id-of-tenant-device", A1.user, "own", A2.user, A2)
    connect("client-id-of-other-tenant-device", A1.user, "own", G1.user, G1)
    connect("client-id-of-ingest", A1.user, "own", "mdm-ingest-0")
    connect("client-id-of-dispatcher", A1.user, "own", "mdm-dispatch")
    connect("server-user-wrong-password", "mdm-server", "wrong", "probe")
    connect("server-user-device-password", "mdm-server", "own", "probe")
    connect("never-enrolled-device", "acme.zz", "of:acme.zz", "acme.zz")
    for cid in ("acme.a1/#", "acme.a1/+", "#", "+", "acme/a1", "acme.+", "acme.#",
                "mdm/v1/acme/devices/a2", "acme.a1 "):
        connect(f"client-id-{cid!r}", A1.user, "own", cid)
    for user in ("acme.+", "acme.#", "#", "+", "acme/a1", "acme.a1/#", "acme.a1+",
                 "mdm/v1/+/devices/+", "+.+"):
        connect(f"username-{user!r}", user, "own", A1.user, A1)
        connect(f"username-{user!r}-same-client-id", user, "own", user)
    return cases


CASES = _generate()
assert len({c.id for c in CASES}) == len(CASES)


# --- MQTT clients that record everything -----------------------------------------------------


@dataclass
class Probe:
    """A paho client (MQTT 3.1.1) that records its CONNACK, SUBACKs, messages and
    disconnections."""

    port: int
    client_id: str
    username: str | None = None
    password: str | None = None
    will: tuple[str, bytes] | None = None
    connack: str = ""
    refused: bool = False
    received: list[tuple[str, bytes]] = field(default_factory=list)
    disconnects: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                        client_id=self.client_id, clean_session=True, protocol=paho.MQTTv311)
        if self.username is not None:
            c.username_pw_set(self.username, self.password)
        if self.will is not None:
            c.will_set(self.will[0], self.will[1], qos=1)
        c.reconnect_delay_set(120, 120)  # a refused or cut-off client stays out
        self._connected = threading.Event()
        self._subacks: dict[int, list[int]] = {}
        self._suback = threading.Condition()
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self.client = c

    def _on_connect(self, c: paho.Client, u: Any, flags: Any, rc: Any, p: Any) -> None:
        self.connack, self.refused = str(rc), bool(rc.is_failure)
        self._connected.set()

    def _on_disconnect(self, c: paho.Client, u: Any, flags: Any, rc: Any, p: Any) -> None:
        with self.lock:
            self.disconnects += 1
        self._connected.set()

    def _on_message(self, c: paho.Client, u: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.received.append((msg.topic, bytes(msg.payload)))

    def _on_subscribe(self, c: paho.Client, u: Any, mid: int, rcs: Any, p: Any) -> None:
        with self._suback:
            self._subacks[mid] = [rc.value for rc in rcs]
            self._suback.notify_all()

    def connect(self, timeout: float = 10.0, *, background: bool = True) -> Probe:
        """Connect and wait for the CONNACK; with ``background`` (for clients that
        stay) paho's network thread then runs, else the caller only drops or stops."""
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        if background:
            self.client.loop_start()
            assert self._connected.wait(timeout), f"no CONNACK for {self.client_id!r}"
            if self.refused:
                self.client.loop_stop()
            return self
        deadline = time.monotonic() + timeout
        while not self._connected.is_set():
            assert time.monotonic() < deadline, f"no CONNACK for {self.client_id!r}"
            self.client.loop(timeout=0.05)
        return self

    def attempt(self) -> Probe:
        """A log-in that is expected to be refused: connect, note the CONNACK, close."""
        self.connect(background=False)
        if not self.refused:
            self.client.disconnect()
        self.drop()
        return self

    @property
    def connected(self) -> bool:
        return self.client.is_connected()

    def subscribe(self, topic_filter: str, timeout: float = 10.0) -> int:
        """The SUBACK's code: the granted QoS, or 128 (0x80) when refused."""
        mid = self.client.subscribe(topic_filter, qos=1)[1]
        with self._suback:
            assert self._suback.wait_for(lambda: mid in self._subacks, timeout), "no SUBACK"
            return self._subacks[mid][0]

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def messages(self) -> list[tuple[str, bytes]]:
        with self.lock:
            return list(self.received)

    def drop(self) -> None:
        """Close the socket without DISCONNECT: the broker publishes the will."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _wait(pred: Any, timeout: float = 20.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def _telemetry(dev: Dev, record_id: str, kind: str = "location") -> bytes:
    data: dict[str, Any] = ({"lat": 52.07, "lon": 4.3, "accuracy_m": 5.0} if kind == "location"
                            else {"imei": "356938035643809", "model": "forged"})
    rec = Record(id=record_id, ts_ms=int(time.time() * 1000), data=data)
    return encode_telemetry([rec], device=dev.device, kind=kind)


def _payload(case: Case, target: Dev) -> bytes:
    """What an intruder sends: exactly what the target itself would send, marked."""
    channel = case.topic.removeprefix(target.base + "/")
    if channel in ("telemetry/location", "telemetry/identity"):
        return _telemetry(target, case.marker, channel.split("/", 1)[1])
    if channel.startswith("telemetry"):  # a sub-topic no kind names: a valid envelope
        return json.dumps({"v": 1, "id": case.marker, "ts": _now_ms(),
                           "data": {"lat": 52.07, "lon": 4.3}}).encode()
    if channel == "acks":
        return _ack(case.marker)
    return json.dumps({"v": 1, "state": "online", "ts": _now_ms(),
                       "marker": case.marker}).encode()


def _now_ms() -> int:
    return int(time.time() * 1000)


OWN_WILL = encode_status(Status("offline", _now_ms()))


def _ack(detail: str) -> bytes:
    """A well-formed ack (of a command nobody issued: the server ignores it)."""
    return json.dumps({"v": 1, "command_id": str(uuid.uuid4()), "state": "received",
                       "ts": _now_ms(), "detail": detail}).encode()


# --- the scenario, run once; each case is then judged on its own ----------------------------


@dataclass
class World:
    broker: Broker
    server: Server
    database: str
    passwords: dict[str, str]  # username -> password, from the enrollment JSON
    observer: Probe
    devices: dict[Dev, Probe]
    subacks: dict[str, int] = field(default_factory=dict)
    connacks: dict[str, Probe] = field(default_factory=dict)
    control_before: list[dict[str, Any]] = field(default_factory=list)
    control_after: list[dict[str, Any]] = field(default_factory=list)
    disconnects_before_connect_cases: dict[Dev, int] = field(default_factory=dict)

    def password(self, spec: str | None, username: str | None) -> str | None:
        if spec is None or spec in ("", "wrong"):
            return spec
        if spec == "own":
            return self.passwords.get(username or "", self.passwords[A1.user])
        who = spec.removeprefix("of:")
        if who in self.passwords:
            return self.passwords[who]
        return device_credentials(*who.split("."))[1]  # a device never enrolled

    def everywhere(self) -> list[tuple[str, str, bytes]]:
        """(where, topic, payload) of every message any of our clients received."""
        out = [("observer", t, p) for t, p in self.observer.messages()]
        for dev, probe in self.devices.items():
            out += [(dev.user, t, p) for t, p in probe.messages()]
        return out


async def _dynsec(url: str, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async with Dynsec(MqttSettings.from_url(url)) as dynsec:
        return await dynsec.call(commands)


_CONTROL_QUERY = [{"command": "listClients", "verbose": True},
                  {"command": "listRoles", "verbose": True},
                  {"command": "getDefaultACLAccess"}]


def _strip(responses: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "correlationData"} for r in responses]


def _run_matrix(w: World) -> None:
    port = w.broker.port
    # 1. Intruders publish under the targets' topics and subscribe to what is not theirs.
    for case in CASES:
        probe = w.devices.get(case.actor) if case.actor else None
        if case.kind == "publish":
            assert probe is not None and case.target is not None
            probe.publish(case.topic, _payload(case, case.target))
        elif case.kind == "subscribe":
            assert probe is not None
            w.subacks[case.id] = probe.subscribe(case.topic)
    # 2. A device tries to administer the broker: create a client, promote itself,
    #    open the default access.
    w.control_before = _strip(asyncio.run(_dynsec(w.broker.url, _CONTROL_QUERY)))
    for case in (c for c in CASES if c.kind == "control"):
        assert case.actor is not None
        w.devices[case.actor].publish(case.topic, json.dumps({"commands": [
            {"command": "createClient", "username": "acme.evil", "password": "evil-evil-evil",
             "roles": [{"rolename": "mdm-server"}]},
            {"command": "addClientRole", "username": case.actor.user, "rolename": "mdm-server"},
            {"command": "setDefaultACLAccess",
             "acls": [{"acltype": t, "allow": True} for t in
                      ("publishClientSend", "publishClientReceive", "subscribe")]},
        ]}).encode())
    # 3. Forged wills: a device connects with a will on another device's topic and
    #    vanishes without DISCONNECT, so the broker would publish it. (Its client id is
    #    its own: its usual connection steps aside meanwhile.)
    w.devices[WILL_INTRUDER].stop()
    for case in (c for c in CASES if c.kind == "will"):
        assert case.actor is not None and case.target is not None
        probe = Probe(port, case.actor.user, case.actor.user, w.passwords[case.actor.user],
                      will=(case.topic, _payload(case, case.target))).connect(background=False)
        w.connacks[case.id] = probe
        probe.drop()
        time.sleep(0.2)
    # The control: a will on its own status topic is delivered.
    Probe(port, WILL_INTRUDER.user, WILL_INTRUDER.user, w.passwords[WILL_INTRUDER.user],
          will=(f"{WILL_INTRUDER.base}/status", OWN_WILL)).connect(background=False).drop()
    w.devices[WILL_INTRUDER] = _device_probe(w, WILL_INTRUDER)
    # 4. Log-ins with wrong, borrowed and pattern-laden names.
    w.disconnects_before_connect_cases = {d: p.disconnects for d, p in w.devices.items()}
    for case in (c for c in CASES if c.kind == "connect"):
        w.connacks[case.id] = Probe(port, case.client_id, case.username,
                                    w.password(case.password, case.username)).attempt()
    w.control_after = _strip(asyncio.run(_dynsec(w.broker.url, _CONTROL_QUERY)))
    # 5. Controls: every device's own traffic, and a command from the server to each;
    #    one device publishes a record of every kind, on each kind's topic.
    for dev, probe in w.devices.items():
        probe.publish(f"{dev.base}/telemetry/location", _telemetry(dev, f"own-{dev.user}"))
        if dev in INTRUDERS:
            for kind, payload in _every_kind(dev).items():
                probe.publish(f"{dev.base}/telemetry/{kind}", payload)
        probe.publish(f"{dev.base}/acks", _ack(f"own-ack-{dev.user}"))
        probe.publish(f"{dev.base}/status", encode_status(Status("online", _now_ms())))
        w.observer.publish(f"{dev.base}/commands", f"command-for-{dev.user}".encode())
    assert _wait(lambda: all(any(p == f"command-for-{d.user}".encode()
                                 for _, p in w.devices[d].messages()) for d in DEVICES))
    own = ", ".join(f"'{stored_id(d.tenant, d.device, rid)}'" for d, rid in _own_records())
    wait_for_count(w.database, f"SELECT count(*) FROM telemetry WHERE record_id IN ({own})",
                   len(_own_records()), timeout=60)
    time.sleep(2.0)  # anything forged and late would show by now


def _every_kind(dev: Dev) -> dict[str, bytes]:
    """A valid record of every kind (ids ``own-{kind}-{device}``), as an agent sends them."""
    from load_tests.fleet_data import DeviceProfile

    profile, now = DeviceProfile(dev.device, seed=1), _now_ms()
    return {kind: encode_telemetry([Record(f"own-{kind}-{dev.user}", now,
                                           profile.data(kind, now))],
                                   device=dev.device, kind=kind) for kind in KINDS}


def _own_records() -> list[tuple[Dev, str]]:
    """(device, record id) of everything the controls publish as telemetry."""
    return [(d, f"own-{d.user}") for d in DEVICES] + [
        (d, f"own-{kind}-{d.user}") for d in INTRUDERS for kind in KINDS]


def _device_probe(w: World, dev: Dev) -> Probe:
    probe = Probe(w.broker.port, dev.user, dev.user, w.passwords[dev.user]).connect()
    assert not probe.refused, probe.connack
    assert probe.subscribe(f"{dev.base}/commands") == 1
    return probe


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("access")
    database = asyncio.run(create_database())
    try:
        with running_broker(tmp) as broker:
            passwords: dict[str, str] = {}
            for tenant, devices in {**TENANTS, "acme": TENANTS["acme"] + REVOCABLE["acme"]
                                    + LEGACY["acme"]}.items():
                for e in asyncio.run(enroll_devices(database, broker.url, tenant, devices)):
                    passwords[e["mqtt"]["username"]] = e["mqtt"]["password"]
            server = Server(server_env(database, broker.url), tmp / "serve.log")
            server.start()
            server.wait_log("broker identities reconciled")
            observer = Probe(broker.port, "access-observer", "mdm-server",
                             broker.password).connect()
            assert observer.subscribe("mdm/v1/+/devices/+/#") == 1
            w = World(broker, server, database, passwords, observer, {})
            try:
                w.devices = {d: _device_probe(w, d) for d in DEVICES}
                _run_matrix(w)
                yield w
            finally:
                for p in [observer, *w.devices.values()]:
                    p.stop()
                server.stop()
    finally:
        asyncio.run(drop_database(database))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_access_matrix(world: World, case: Case) -> None:
    w = world
    marker = case.marker.encode()
    leaked = [(where, t) for where, t, p in w.everywhere() if marker in p]
    assert not leaked, f"{case.id}: arrived at {leaked}"
    if case.kind in ("publish", "will"):
        # Stored ids are digests per device: the marker's under the device the topic
        # names (the only one it could be stored under), and under every device.
        outline = outline_topic(case.topic)
        owners = {(d.tenant, d.device) for d in DEVICES}
        if outline.tenant and outline.device:
            owners.add((outline.tenant, outline.device))
        stored = asyncio.run(fetchval(
            w.database, "SELECT count(*) FROM telemetry WHERE record_id = ANY($1::text[])",
            [stored_id(t, d, case.marker) for t, d in sorted(owners)]))
        dead = asyncio.run(fetchval(
            w.database, "SELECT count(*) FROM dead_letters WHERE topic = $1", outline.text))
        assert (stored, dead) == (0, 0), "reached the server"
    elif case.kind == "subscribe":
        assert w.subacks[case.id] == 0x80, "subscription granted"
        assert case.actor is not None
        # Whatever the SUBACK said: nothing but its own commands reached the intruder.
        foreign = [t for t, _ in w.devices[case.actor].messages()
                   if t != f"{case.actor.base}/commands"]
        assert not foreign, foreign
    elif case.kind == "connect":
        probe = w.connacks[case.id]
        assert probe.refused, f"let in: {probe.connack}"
        assert probe.connack in ("Not authorized", "Bad user name or password"), probe.connack
        if case.target is not None:  # the device whose name or client id was tried
            victim = w.devices[case.target]
            assert victim.connected
            assert victim.disconnects == w.disconnects_before_connect_cases[case.target]
    elif case.kind == "control":
        assert w.control_after == w.control_before, "a device changed the broker's accounts"
        assert Probe(w.broker.port, "acme.evil", "acme.evil", "evil-evil-evil").attempt().refused


def test_every_device_gets_its_own_traffic_through_and_only_its_own(world: World) -> None:
    """The controls: the paths the matrix watched do deliver."""
    w = world
    seen = {(t, p) for t, p in w.observer.messages()}
    for dev in DEVICES:
        assert any(t == f"{dev.base}/acks" and f"own-ack-{dev.user}".encode() in p
                   for t, p in seen)
        assert any(t == f"{dev.base}/status" for t, _ in seen)
        assert any(t == f"{dev.base}/telemetry/location" and f"own-{dev.user}".encode() in p
                   for t, p in seen)
        if dev in INTRUDERS:  # the six kinds' literal topics are all open to their device
            for kind in KINDS:
                assert any(t == f"{dev.base}/telemetry/{kind}"
                           and f"own-{kind}-{dev.user}".encode() in p for t, p in seen), kind
        # Exactly the server's command, on its own topic; nothing of anyone else.
        assert w.devices[dev].messages() == [(f"{dev.base}/commands",
                                              f"command-for-{dev.user}".encode())]
    assert (f"{WILL_INTRUDER.base}/status", OWN_WILL) in seen
    rows = asyncio.run(fetch(w.database, "SELECT tenant_id, device_id, record_id FROM telemetry"))
    # Nothing stored under a device but what that device itself sent.
    assert sorted((r["tenant_id"], r["device_id"], r["record_id"]) for r in rows) == sorted(
        (d.tenant, d.device, stored_id(d.tenant, d.device, rid)) for d, rid in _own_records())
    assert asyncio.run(fetchval(w.database, "SELECT count(*) FROM dead_letters")) == 0


def test_the_broker_holds_one_client_and_role_per_device_and_no_passwords(
        world: World) -> None:
    w = world
    doc = json.loads((w.broker.dir / "dynamic-security.json").read_text())
    clients = {c["username"]: c for c in doc["clients"]}
    enrolled = {f"{r['tenant_id']}.{r['device_id']}" for r in asyncio.run(fetch(
        w.database, "SELECT tenant_id, device_id FROM devices WHERE status = 'enrolled'"))}
    assert set(clients) == {"mdm-server", *enrolled}
    for password in w.passwords.values():
        assert password not in json.dumps(doc)
    for user in enrolled:
        c = clients[user]
        assert c["clientid"] == user  # bound: the device cannot use another id, nor anyone its
        assert [r["rolename"] for r in c["roles"]] == [f"mdm-device:{user}"]
    assert doc["defaultACLAccess"] == {"publishClientSend": False, "publishClientReceive": False,
                                       "subscribe": False, "unsubscribe": True}
    assert w.broker.password not in json.dumps(doc)
    # Neither the server's log nor the broker's holds a password.
    logs = w.server.log_text() + (w.broker.dir / "mosquitto.log").read_text()
    for password in [w.broker.password, *w.passwords.values()]:
        assert password not in logs


def _revoked_cli(w: World, dev: Dev) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(w.server.cli("device", "revoke", "--tenant", dev.tenant,
                                                  "--device", dev.device))
    return out


def test_a_revoked_device_is_cut_off_and_cannot_come_back(world: World) -> None:
    w = world
    r1 = Dev("acme", "r1")
    probe = _device_probe(w, r1)
    probe.publish(f"{r1.base}/telemetry/location", _telemetry(r1, "r1-before"))
    wait_for_count(w.database, "SELECT count(*) FROM telemetry WHERE record_id = "
                   f"'{stored_id('acme', 'r1', 'r1-before')}'", 1, timeout=30)

    assert _revoked_cli(w, r1)["status"] == "revoked"
    assert _wait(lambda: not probe.connected, timeout=10), "still connected after revocation"
    probe.stop()
    again = Probe(w.broker.port, r1.user, r1.user, w.passwords[r1.user]).attempt()
    assert again.refused and again.connack == "Not authorized"
    # Revoking again changes nothing and still succeeds.
    assert _revoked_cli(w, r1)["status"] == "revoked"

    # Re-enrollment: new credentials (the next generation); the old ones stay void.
    info = json.loads(w.server.cli("device", "reenroll", "--tenant", "acme", "--device", "r1"))
    new = info["mqtt"]["password"]
    assert new != w.passwords[r1.user]
    assert Probe(w.broker.port, r1.user, r1.user, w.passwords[r1.user]).attempt().refused
    back = Probe(w.broker.port, r1.user, r1.user, new).attempt()
    assert not back.refused, back.connack
    assert asyncio.run(fetchval(w.database, "SELECT mqtt_generation FROM devices "
                                "WHERE device_id = 'r1'")) == 2


def test_a_revocation_the_broker_missed_is_refused_by_ingest_then_enforced(
        world: World) -> None:
    """Revoked in the database while the broker could not be told (the CLI then
    warns and NOTIFYs): ingest refuses the device's telemetry from the next lookup
    on, and serve's reconcile deletes its broker client, which cuts it off."""
    from mdm_server.storage.devices import revoke_device
    from mdm_server.storage.pool import connect

    w = world
    r2 = Dev("acme", "r2")
    probe = _device_probe(w, r2)
    probe.publish(f"{r2.base}/telemetry/location", _telemetry(r2, "r2-before"))
    wait_for_count(w.database, "SELECT count(*) FROM telemetry WHERE record_id = "
                   f"'{stored_id('acme', 'r2', 'r2-before')}'", 1, timeout=30)

    async def revoke_in_database_only(notify: bool) -> None:
        conn = await connect(w.database)
        try:
            if notify:
                await conn.execute("SELECT pg_notify('mdm_broker_identity', '')")
            else:
                await revoke_device(conn, tenant="acme", device="r2")
        finally:
            await conn.close()

    asyncio.run(revoke_in_database_only(notify=False))
    time.sleep(10.5)  # the ingest believes an enrolled device for 10 s at most
    probe.publish(f"{r2.base}/telemetry/location", _telemetry(r2, "r2-after"))
    wait_for_count(w.database, "SELECT count(*) FROM dead_letters WHERE topic = "
                   f"'{r2.base}/telemetry/location'", 1, timeout=30)
    assert asyncio.run(fetchval(w.database, "SELECT count(*) FROM telemetry WHERE record_id "
                                "= $1", stored_id("acme", "r2", "r2-after"))) == 0
    assert probe.connected  # the broker was not told yet

    asyncio.run(revoke_in_database_only(notify=True))
    assert _wait(lambda: not probe.connected, timeout=20), "reconcile did not cut it off"
    probe.stop()
    assert Probe(w.broker.port, r2.user, r2.user, w.passwords[r2.user]).attempt().refused


def test_the_broker_that_lost_its_state_gets_every_identity_back(tmp_path: Path) -> None:
    database = asyncio.run(create_database())
    try:
        with running_broker(tmp_path) as broker:
            enrolled = asyncio.run(enroll_devices(database, broker.url, "acme", ["k1", "k2"]))
            creds = {e["device"]: (e["mqtt"]["username"], e["mqtt"]["password"])
                     for e in enrolled}
            server = Server(server_env(database, broker.url), tmp_path / "serve.log")
            server.start()
            try:
                server.wait_log("broker identities reconciled")
                server.cli("device", "revoke", "--tenant", "acme", "--device", "k2")
                broker.stop()
                for name in ("dynamic-security.json", "mosquitto.db"):
                    (broker.dir / name).unlink(missing_ok=True)
                broker.start()  # the bootstrap writes the server's user again, nothing else

                def k1_gets_in() -> bool:
                    user, password = creds["k1"]
                    return not Probe(broker.port, user, user, password).attempt().refused

                assert _wait(k1_gets_in, timeout=30, step=0.5), server.log_text()[-3000:]
                user, password = creds["k2"]
                assert Probe(broker.port, user, user, password).attempt().refused
                server.wait_log("created=1", timeout=10)
            finally:
                server.stop()
    finally:
        asyncio.run(drop_database(database))


def test_reconcile_narrows_a_role_that_still_allows_any_telemetry_subtopic(
        world: World) -> None:
    """A role as made before issue 10 (publish to telemetry/+) lets a "kind" like
    imei=... reach the server; serve's reconcile replaces it with the kinds' literal
    topics, after which the same publish never arrives and the kinds still do."""
    from mdm_server.broker.identity import device_acls, device_rolename
    from mdm_server.storage.pool import connect

    w = world
    l1 = Dev("acme", "l1")
    rolename = device_rolename(l1.tenant, l1.device)
    old = [{"command": "removeRoleACL", "rolename": rolename,
            "acltype": "publishClientSend", "topic": f"{l1.base}/telemetry/{kind}"}
           for kind in KINDS]
    old.append({"command": "addRoleACL", "rolename": rolename,
                "acltype": "publishClientSend", "topic": f"{l1.base}/telemetry/+",
                "priority": 0, "allow": True})
    assert not [r for r in asyncio.run(_dynsec(w.broker.url, old)) if "error" in r]
    bad = f"{l1.base}/telemetry/imei=356938035643809"

    def arrived(marker: bytes) -> bool:
        return any(marker in p for _, p in w.observer.messages())

    probe = _device_probe(w, l1)
    probe.publish(bad, b'{"v": 1, "id": "legacy-before", "ts": 1, "data": {}}')
    assert _wait(lambda: arrived(b"legacy-before")), "the old role did not let it through"

    async def notify() -> None:
        conn = await connect(w.database)
        try:
            await conn.execute("SELECT pg_notify('mdm_broker_identity', '')")
        finally:
            await conn.close()

    def acls() -> set[tuple[str, str]]:
        (resp,) = asyncio.run(_dynsec(w.broker.url, [{"command": "getRole",
                                                      "rolename": rolename}]))
        return {(a["acltype"], a["topic"]) for a in resp["data"]["role"]["acls"]}

    asyncio.run(notify())
    want = {(a["acltype"], a["topic"]) for a in device_acls(l1.tenant, l1.device)}
    assert _wait(lambda: acls() == want, timeout=20), acls()
    # Mosquitto 2.0.11 checks a role's ACLs at every publish: the change applies to
    # the connection that is already open (adding or removing an ACL kicks nobody).
    assert probe.connected
    try:
        probe.publish(bad, b'{"v": 1, "id": "legacy-after", "ts": 1, "data": {}}')
        probe.publish(f"{l1.base}/telemetry/location", _telemetry(l1, "legacy-control"))
        assert _wait(lambda: arrived(b"legacy-control"))
        time.sleep(1.0)  # published before the control: it would have arrived by now
        assert not arrived(b"legacy-after")
    finally:
        probe.stop()
