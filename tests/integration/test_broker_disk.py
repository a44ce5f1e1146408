"""What a device sends never stays on the broker's disk, beyond the server's own queue.

An auditor found a device's raw IMEI in the broker's mosquitto.db: a retained
publish, kept there until someone cleared it. Each test here runs such an attack
against a private Mosquitto started with the project's config (scripts/broker),
with a device account as enrollment makes it, and judges it as the auditor would:
by what a subscriber logged in as the server's user receives, and by reading every
byte of every file in the broker's data directory after the broker saved its state
(an autosave, then a clean stop, which saves again). Every raw value is an
IMEI-like string unique to the test.

A search that cannot find anything proves nothing, so the same search is shown to
find a device's value where the broker does keep it -- queued for the server's
offline persistent session, which the design allows until that session
acknowledges it -- and to find the retained and QoS 2 payloads on a broker run
with the project's config minus the two lines that refuse them. That last broker
then shows the upgrade: restarted with the project's config, the retained and
held payloads it saved are gone while the server's queue survives.

Devices speak raw MQTT 3.1.1 here (a few bytes per packet), so that a test
controls exactly what is sent: a retained flag, a will's flags, a QoS 2 PUBLISH
whose PUBREL never comes.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent_protocol import Record, encode_telemetry
from tests.support.services import (
    Broker,
    broker_only_devices,
    device_credentials,
    running_broker,
    wait_port,
)

pytestmark = pytest.mark.integration

TENANT = "acme"


def _imei() -> bytes:
    """A fresh IMEI-like value (15 digits): found only where this test put it."""
    return b"35%013d" % secrets.randbelow(10**13)


@dataclass(frozen=True)
class Device:
    device: str

    @property
    def user(self) -> str:
        return f"{TENANT}.{self.device}"

    @property
    def base(self) -> str:
        return f"mdm/v1/{TENANT}/devices/{self.device}"

    def identity(self, imei: bytes) -> bytes:
        """Identity telemetry holding ``imei`` raw, as an agent would send it."""
        rec = Record(id=f"r-{uuid.uuid4().hex[:8]}", ts_ms=int(time.time() * 1000),
                     data={"imei": imei.decode(), "model": "test"})
        return encode_telemetry([rec], device=self.device, kind="identity")

    @staticmethod
    def status(imei: bytes) -> bytes:
        """A status (or will) payload: the broker never looks inside."""
        return b'{"v": 1, "state": "offline", "ts": %d, "imei": "%s"}' % (
            int(time.time() * 1000), imei)


def _devices(broker: Broker, *names: str) -> list[Device]:
    """Broker accounts and roles exactly as enrollment gives them."""
    asyncio.run(broker_only_devices(broker.url, TENANT, list(names)))
    return [Device(n) for n in names]


# --- a device speaking raw MQTT 3.1.1 ------------------------------------------------------


def _string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    size, n = b"", len(body)
    while True:
        n, digit = divmod(n, 128)
        size += bytes([digit | (0x80 if n else 0)])
        if not n:
            return bytes([first]) + size + body


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


class RawDevice:
    """A device's MQTT connection, packet by packet."""

    def __init__(self, broker: Broker, dev: Device) -> None:
        self.broker, self.dev = broker, dev
        self.sock: socket.socket | None = None
        self._mid = 0

    def connect(self, *, clean: bool = True, will: Will | None = None) -> bytes:
        """Send CONNECT; return the CONNACK, or b"" if the broker closed the
        connection instead (MQTT 3.1.1 has no code for "retain not supported")."""
        user, password = device_credentials(TENANT, self.dev.device)
        flags = 0x80 | 0x40 | (0x02 if clean else 0)
        payload = _string(user)
        if will is not None:
            flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
            payload += _string(will.topic) + _string(will.payload)
        payload += _string(user) + _string(password)
        self.sock = socket.create_connection(("127.0.0.1", self.broker.port), timeout=10)
        self.sock.sendall(_packet(0x10, _string("MQTT") + bytes([4, flags])
                                  + struct.pack("!H", 60) + payload))
        return self._read()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1,
                retain: bool = False) -> bytes:
        """Send PUBLISH; return the broker's answer (PUBACK, PUBREC), b"" if it
        closed the connection, b"-" if it said nothing (QoS 0)."""
        assert self.sock is not None
        self._mid += 1
        body = _string(topic) + (struct.pack("!H", self._mid) if qos else b"") + payload
        self.sock.sendall(_packet(0x30 | (qos << 1) | int(retain), body))
        return self._read(timeout=5.0 if qos else 1.0, silence=b"-")

    def _read(self, timeout: float = 10.0, silence: bytes | None = None) -> bytes:
        assert self.sock is not None
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4)
        except TimeoutError:
            if silence is not None:
                return silence
            raise
        except ConnectionResetError:
            return b""

    def closed_by_broker(self, timeout: float = 5.0) -> bool:
        return self._read(timeout, silence=b"-") == b""

    def drop(self) -> None:
        """Vanish without DISCONNECT: the broker publishes the will, if any."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None


CONNACK_OK = b"\x20\x02\x00\x00"


def _puback(mid: int) -> bytes:
    return b"\x40\x02" + struct.pack("!H", mid)


def _pubrec(mid: int) -> bytes:
    return b"\x50\x02" + struct.pack("!H", mid)


# --- the server's side ---------------------------------------------------------------------


@dataclass
class ServerClient:
    """A client logged in as the server's user (it alone may read device topics)."""

    broker: Broker
    client_id: str = field(default_factory=lambda: f"test-server-{uuid.uuid4().hex[:8]}")
    clean: bool = True
    received: list[tuple[str, bytes, bool]] = field(default_factory=list)  # topic, payload, retain

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client: paho.Client | None = None

    def start(self, topic_filter: str | None = None) -> ServerClient:
        c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                        client_id=self.client_id, clean_session=self.clean,
                        protocol=paho.MQTTv311)
        c.username_pw_set("mdm-server", self.broker.password)
        connected = threading.Event()
        c.on_connect = lambda *a: connected.set()
        c.on_message = self._on_message
        c.on_subscribe = lambda *a: self._subscribed.set()
        c.connect("127.0.0.1", self.broker.port, keepalive=30)
        c.loop_start()
        assert connected.wait(10), "the server's user could not connect"
        self._client = c
        if topic_filter is not None:
            self._subscribed.clear()
            c.subscribe(topic_filter, qos=1)
            assert self._subscribed.wait(10), "no SUBACK"
        return self

    def _on_message(self, c: paho.Client, u: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.received.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def stop(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def holding(self, value: bytes) -> list[tuple[str, bool]]:
        """(topic, retain flag) of every message received that holds ``value``."""
        with self._lock:
            return [(t, r) for t, p, r in self.received if value in p]

    def wait_for(self, value: bytes, timeout: float = 10.0) -> bool:
        return _wait(lambda: bool(self.holding(value)), timeout)


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def _retained_for_a_new_subscriber(broker: Broker, values: list[bytes]) -> list[bytes]:
    """Subscribe afresh to every device topic (as the server's user); the values
    that arrive within 1.5 s (only a retained message would)."""
    probe = ServerClient(broker).start("mdm/v1/+/devices/+/#")
    try:
        time.sleep(1.5)
        return [v for v in values if probe.holding(v)]
    finally:
        probe.stop()


# --- the broker's disk ---------------------------------------------------------------------


def files_holding(data_dir: Path, value: bytes) -> list[str]:
    """Every file under ``data_dir`` whose bytes hold ``value`` (all bytes, all files:
    the database, its temporary files, the plugin's config, the log)."""
    found = []
    for f in sorted(data_dir.rglob("*")):
        try:
            if f.is_file() and value in f.read_bytes():
                found.append(str(f.relative_to(data_dir)))
        except FileNotFoundError:  # mosquitto.db.new, renamed while we looked
            continue
    return found


def _saves(data_dir: Path) -> int:
    log = data_dir / "mosquitto.log"
    return log.read_text(errors="replace").count("Saving in-memory database") if log.exists() else 0


def _db_inode(data_dir: Path) -> int:
    try:
        return (data_dir / "mosquitto.db").stat().st_ino
    except FileNotFoundError:
        return -1


def wait_for_autosave(data_dir: Path, timeout: float = 30.0) -> None:
    """Block until the broker has begun *and* finished a save after this call: its
    log announces the save before writing, and the save ends by renaming a new
    file over mosquitto.db (another inode than the one there now)."""
    saves, inode = _saves(data_dir), _db_inode(data_dir)
    assert _wait(lambda: _saves(data_dir) > saves and _db_inode(data_dir) != inode, timeout), \
        "the broker did not autosave"


def assert_nowhere_on_disk(broker: Broker, values: dict[str, bytes]) -> None:
    """After an autosave and again after a clean stop (which saves too)."""
    wait_for_autosave(broker.dir)
    found = {what: files_holding(broker.dir, v) for what, v in values.items()}
    assert not any(found.values()), f"on the broker's disk after an autosave: {found}"
    broker.stop(signal.SIGTERM)
    found = {what: files_holding(broker.dir, v) for what, v in values.items()}
    assert not any(found.values()), f"on the broker's disk after a clean stop: {found}"


# --- the attacks, refused -------------------------------------------------------------------


def test_a_retained_publish_from_a_device_is_refused_and_never_reaches_the_disk(
        broker: Broker) -> None:
    (dev,) = _devices(broker, "ret")
    observer = ServerClient(broker).start("mdm/v1/+/devices/+/#")
    attacks = {  # what: (topic, QoS)
        "identity telemetry, QoS 1": (f"{dev.base}/telemetry/identity", 1),
        "identity telemetry, QoS 0": (f"{dev.base}/telemetry/identity", 0),
        "status, QoS 1": (f"{dev.base}/status", 1),
    }
    values = {what: _imei() for what in attacks}
    try:
        for what, (topic, qos) in attacks.items():
            raw = RawDevice(broker, dev)
            assert raw.connect() == CONNACK_OK
            payload = (dev.identity(values[what]) if "telemetry" in topic
                       else dev.status(values[what]))
            answer = raw.publish(topic, payload, qos=qos, retain=True)
            # Disconnected: no PUBACK (QoS 1), the connection closed at once.
            assert answer == b"" or raw.closed_by_broker(), f"{what}: not disconnected"
            raw.drop()
        # The same device, the same messages without the retain flag: delivered,
        # so the observer would have seen the retained ones had they been accepted.
        raw = RawDevice(broker, dev)
        assert raw.connect() == CONNACK_OK
        control = _imei()
        assert raw.publish(f"{dev.base}/telemetry/identity", dev.identity(control)) == _puback(1)
        assert observer.wait_for(control), "the observer receives nothing at all"
        raw.drop()

        leaked = {what: observer.holding(v) for what, v in values.items()}
        assert not any(leaked.values()), f"delivered: {leaked}"
        assert _retained_for_a_new_subscriber(broker, [*values.values(), control]) == []
    finally:
        observer.stop()
    assert_nowhere_on_disk(broker, values)


def test_a_retained_will_is_refused_and_a_will_is_never_saved(broker: Broker) -> None:
    dev, other = _devices(broker, "will", "will-retained")
    observer = ServerClient(broker).start("mdm/v1/+/devices/+/#")
    # The server's persistent session (as ingest's), offline: whatever reaches a
    # device topic while it is away is queued for it -- on disk.
    queue = ServerClient(broker, clean=False).start("mdm/v1/+/devices/+/#")
    queue.stop()
    retained_will, held_will = _imei(), _imei()
    try:
        # A will with the retain flag: the CONNECT is refused, the will dropped.
        raw = RawDevice(broker, other)
        answer = raw.connect(will=Will(f"{other.base}/status", other.status(retained_will),
                                       retain=True))
        assert answer == b"", f"a retained will was let in: {answer!r}"
        raw.drop()
        # A plain will on the device's own status topic, in a persistent session:
        # held while the device is connected -- in memory only.
        holder = RawDevice(broker, dev)
        assert holder.connect(clean=False, will=Will(f"{dev.base}/status",
                                                     dev.status(held_will))) == CONNACK_OK
        wait_for_autosave(broker.dir)
        assert files_holding(broker.dir, held_will) == [], "a held will was saved"
        assert files_holding(broker.dir, retained_will) == []

        # The control: the device vanishes, the broker publishes its will, not
        # retained; the offline server session's queue holds it, and the search
        # finds it there.
        holder.drop()
        assert observer.wait_for(held_will), "the will was not published"
        assert observer.holding(held_will) == [(f"{dev.base}/status", False)]
        wait_for_autosave(broker.dir)
        assert files_holding(broker.dir, held_will) == ["mosquitto.db"]

        assert observer.holding(retained_will) == []
        assert _retained_for_a_new_subscriber(broker, [held_will, retained_will]) == []
    finally:
        observer.stop()
    # Once the server's session has taken the will, nothing of it is left.
    queue.start()
    assert queue.wait_for(held_will)
    time.sleep(0.5)  # its PUBACK
    queue.stop()
    assert_nowhere_on_disk(broker, {"retained will": retained_will, "will": held_will})


def test_qos2_from_a_device_is_refused_and_never_held_on_disk(broker: Broker) -> None:
    """Mosquitto keeps an incoming QoS 2 message in the sender's session until the
    sender's PUBREL; a device that never sends it would keep it on disk."""
    dev, other = _devices(broker, "qos2", "qos2-will")
    observer = ServerClient(broker).start("mdm/v1/+/devices/+/#")
    held, will = _imei(), _imei()
    try:
        raw = RawDevice(broker, dev)
        assert raw.connect(clean=False) == CONNACK_OK
        answer = raw.publish(f"{dev.base}/telemetry/identity", dev.identity(held), qos=2)
        assert answer == b"", f"QoS 2 accepted: {answer!r}"
        raw.drop()
        raw = RawDevice(broker, other)
        assert raw.connect(clean=False, will=Will(f"{other.base}/status", other.status(will),
                                                  qos=2)) == b"", "a QoS 2 will was let in"
        raw.drop()
        time.sleep(1.0)
        assert observer.holding(held) == [] and observer.holding(will) == []
    finally:
        observer.stop()
    assert_nowhere_on_disk(broker, {"QoS 2 publish": held, "QoS 2 will": will})


# --- the controls: where the search does find device values --------------------------------


def test_a_value_queued_for_the_servers_offline_session_is_on_disk_until_acknowledged(
        broker: Broker) -> None:
    """What the design allows, and the proof that the search above can fail."""
    (dev,) = _devices(broker, "queued")
    session = ServerClient(broker, clean=False).start("mdm/v1/+/devices/+/telemetry/+")
    session.stop()
    value = _imei()
    raw = RawDevice(broker, dev)
    assert raw.connect() == CONNACK_OK
    assert raw.publish(f"{dev.base}/telemetry/identity", dev.identity(value)) == _puback(1)
    raw.drop()

    wait_for_autosave(broker.dir)
    assert files_holding(broker.dir, value) == ["mosquitto.db"]

    session.start()  # the server's session comes back and acknowledges it
    assert session.wait_for(value)
    assert session.holding(value) == [(f"{dev.base}/telemetry/identity", False)]
    time.sleep(0.5)  # its PUBACK
    session.stop()
    assert_nowhere_on_disk(broker, {"acknowledged": value})


@contextmanager
def _broker_without_the_refusals(tmp: Path) -> Iterator[tuple[Broker, Callable[[], None]]]:
    """The project's broker (its accounts, data directory and log), run once with
    the project's config minus ``retain_available false`` and ``max_qos 1``: the
    config the auditor met. Yields the broker and a function that stops it; start()
    then brings the broker back through scripts/broker with the project's config."""
    with running_broker(tmp) as broker:
        broker.stop()  # scripts/broker made the data directory and the server's user
        conf = (broker.dir / "mosquitto.conf").read_text()
        old, n = re.subn(r"(?m)^(retain_available|max_qos) .*$", "", conf)
        # retain_available once; max_qos once per listener (plain and TLS).
        assert n == 3, "the project's config changed: update this control"
        (broker.dir / "old.conf").write_text(old)
        proc = subprocess.Popen(["mosquitto", "-c", str(broker.dir / "old.conf")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def stop() -> None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)

        try:
            wait_port(broker.port)
            yield broker, stop
        finally:
            stop()


def test_without_the_refusals_the_values_stay_on_disk_and_the_upgrade_removes_them(
        tmp_path: Path) -> None:
    with _broker_without_the_refusals(tmp_path) as (broker, stop_old):
        (dev,) = _devices(broker, "old")
        # The server's persistent session reads telemetry only: the status topic's
        # retained message is then held by nothing but the retained store.
        session = ServerClient(broker, clean=False).start("mdm/v1/+/devices/+/telemetry/+")
        session.stop()
        retained, held, queued = _imei(), _imei(), _imei()

        raw = RawDevice(broker, dev)
        assert raw.connect(clean=False) == CONNACK_OK
        assert raw.publish(f"{dev.base}/status", dev.status(retained), retain=True) == _puback(1)
        assert raw.publish(f"{dev.base}/telemetry/identity", dev.identity(held),
                           qos=2) == _pubrec(2)  # and no PUBREL, ever
        assert raw.publish(f"{dev.base}/telemetry/identity", dev.identity(queued)) == _puback(3)
        raw.drop()
        # The auditor's finding: a new subscriber gets the raw value, retained...
        assert _retained_for_a_new_subscriber(broker, [retained]) == [retained]
        # ...and the search finds every value on disk.
        wait_for_autosave(broker.dir)
        for value in (retained, held, queued):
            assert files_holding(broker.dir, value) == ["mosquitto.db"]
        stop_old()
        for value in (retained, held, queued):
            assert files_holding(broker.dir, value) == ["mosquitto.db"]

        # The upgrade: scripts/broker with the project's config, same data.
        broker.start()
        assert _retained_for_a_new_subscriber(broker, [retained]) == []
        wait_for_autosave(broker.dir)
        assert files_holding(broker.dir, retained) == []
        assert files_holding(broker.dir, held) == []
        assert files_holding(broker.dir, queued) == ["mosquitto.db"]  # the server's, kept
        session.start()
        assert session.wait_for(queued), "the server's queue did not survive the upgrade"
        assert session.holding(held) == []
        time.sleep(0.5)  # its PUBACK
        session.stop()
        assert_nowhere_on_disk(broker, {"retained": retained, "QoS 2": held,
                                        "acknowledged": queued})
