"""The project's broker config loses nothing for an offline persistent QoS 1 subscriber.

Real brokers, no mocks: each test starts its own Mosquitto through scripts/broker (the
project's deploy/mosquitto/mosquitto.conf) or, for contrast, with Mosquitto's defaults,
which drop everything past 1000 queued messages and so make the first test fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BROKER_SCRIPT = Path(os.environ.get("MDM_BROKER_SCRIPT") or REPO / "scripts" / "broker")

MESSAGES = 20_000
# Unacknowledged publishes per connection. paho's message ids are 16-bit: never let
# more than 65,535 be outstanding. 1000 keeps the pipe full on localhost.
PUBLISH_WINDOW = 1000
SUBSCRIBER_ID = "probe-sub"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.05)
        else:
            return
    raise TimeoutError(f"broker not listening on port {port} after {timeout}s")


class Broker:
    """A broker process we started; stopped (SIGTERM) at the latest on teardown."""

    def __init__(self, argv: list[str], log: Path, port: int | None = None) -> None:
        self._log: IO[bytes] = log.open("ab")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if port is None else subprocess.DEVNULL,
            stderr=self._log,
        )
        self.host = "127.0.0.1"
        self.port = port or 0
        self.username: str | None = None
        self.password: str | None = None

    def wait_ready(self) -> None:
        """Read the URL that scripts/broker prints (if it does), with the server's
        MQTT user and password: the project's broker lets nobody in anonymously."""
        if self.proc.stdout is not None:
            line = self.proc.stdout.readline().decode().strip()
            assert line.startswith("MDM_MQTT_URL="), "unexpected first line"
            url = urlsplit(line.removeprefix("MDM_MQTT_URL="))
            assert url.scheme == "mqtt" and url.hostname and url.port, url.hostname
            assert url.username == "mdm-server" and url.password
            self.host, self.port = url.hostname, url.port
            self.username, self.password = unquote(url.username), unquote(url.password)
        _wait_for_port(self.port, self.proc)

    def login(self, client: mqtt.Client) -> None:
        if self.username is not None:
            client.username_pw_set(self.username, self.password)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            returncode = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            self._log.close()
        return returncode


@pytest.fixture
def brokers() -> Iterator[list[Broker]]:
    started: list[Broker] = []
    yield started
    for broker in started:
        broker.stop()


def start_project_broker(brokers: list[Broker], data_dir: Path) -> Broker:
    """scripts/broker --port FREE --dir DATA_DIR, reading the URL it prints."""
    data_dir.mkdir(parents=True, exist_ok=True)
    broker = Broker(
        [str(BROKER_SCRIPT), "--port", str(_free_port()), "--dir", str(data_dir)],
        data_dir / "stderr.log",
    )
    brokers.append(broker)
    broker.wait_ready()
    return broker


def start_default_broker(brokers: list[Broker], tmp: Path) -> Broker:
    """Mosquitto with its default limits: just a listener and anonymous access."""
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = _free_port()
    conf = tmp / "default.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    broker = Broker([mosquitto, "-c", str(conf)], tmp / "default.log", port=port)
    brokers.append(broker)
    broker.wait_ready()
    return broker


class Subscriber:
    """A persistent-session QoS 1 subscriber that can leave and come back."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.received: set[int] = set()
        self.deliveries = 0
        self.session_present: bool | None = None
        self._lock = threading.Lock()
        self._last_message = time.monotonic()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._errors: list[str] = []

    def _client(self) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=SUBSCRIBER_ID,
            clean_session=False,
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._errors.append(f"connect refused: {reason_code}")
        self.session_present = flags.session_present
        self._connected.set()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if [rc.value for rc in reason_codes] != [1]:
            self._errors.append(f"subscription not granted at QoS 1: {reason_codes}")
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.received.add(int(message.payload))
            self.deliveries += 1
            self._last_message = time.monotonic()

    def _connect(self, client: mqtt.Client, broker: Broker) -> None:
        broker.login(client)
        self._connected.clear()
        client.connect(broker.host, broker.port, keepalive=30)
        client.loop_start()
        assert self._connected.wait(10), "subscriber did not connect"
        assert not self._errors, self._errors

    def subscribe_then_leave(self, broker: Broker) -> None:
        client = self._client()
        self._connect(client, broker)
        client.subscribe(self.topic, qos=1)
        assert self._subscribed.wait(10), "no SUBACK"
        assert not self._errors, self._errors
        client.disconnect()
        client.loop_stop()

    def come_back(self, broker: Broker, expected: int, idle: float = 3.0) -> set[int]:
        """Resume the session; collect until `expected` arrived or `idle` s of silence."""
        client = self._client()
        with self._lock:
            self._last_message = time.monotonic()
        self._connect(client, broker)
        deadline = time.monotonic() + 45
        try:
            while time.monotonic() < deadline:
                with self._lock:
                    if len(self.received) >= expected:
                        break
                    if time.monotonic() - self._last_message > idle:
                        break
                time.sleep(0.05)
        finally:
            client.disconnect()
            client.loop_stop()
        with self._lock:
            return set(self.received)


def publish(broker: Broker, topic: str, count: int) -> None:
    """Publish payloads "0".."count-1" at QoS 1 and wait for every PUBACK."""
    window = threading.BoundedSemaphore(PUBLISH_WINDOW)
    acked = 0
    all_acked = threading.Event()
    lock = threading.Lock()

    def on_publish(
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        nonlocal acked
        with lock:
            acked += 1
            if acked == count:
                all_acked.set()
        window.release()

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"probe-pub-{uuid.uuid4().hex[:8]}",
        clean_session=True,
        protocol=MQTTProtocolVersion.MQTTv311,
    )
    broker.login(client)
    client.max_inflight_messages_set(PUBLISH_WINDOW)
    client.on_publish = on_publish
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    try:
        for i in range(count):
            assert window.acquire(timeout=30), f"no PUBACK for 30 s after {acked} acks"
            info = client.publish(topic, str(i).encode(), qos=1)
            assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish {i}: {info.rc}"
        assert all_acked.wait(60), f"only {acked} of {count} publishes acknowledged"
    finally:
        client.disconnect()
        client.loop_stop()


def _topic() -> str:
    # A device's commands topic: on the project's broker the server's user (the
    # credentials scripts/broker prints) may both publish and subscribe there.
    return f"mdm/v1/probe/devices/{uuid.uuid4().hex}/commands"


def test_project_config_keeps_a_large_backlog_for_an_offline_subscriber(
    brokers: list[Broker], tmp_path: Path
) -> None:
    broker = start_project_broker(brokers, tmp_path / "broker")
    subscriber = Subscriber(_topic())
    subscriber.subscribe_then_leave(broker)

    publish(broker, subscriber.topic, MESSAGES)
    received = subscriber.come_back(broker, MESSAGES)

    assert subscriber.session_present is True
    assert len(received) == MESSAGES, f"{MESSAGES - len(received)} of {MESSAGES} lost"
    assert received == set(range(MESSAGES))


def test_default_mosquitto_limits_drop_most_of_the_same_backlog(
    brokers: list[Broker], tmp_path: Path
) -> None:
    # The control: the same procedure against Mosquitto's defaults
    # (max_queued_messages 1000) must lose messages, or the test above proves nothing.
    broker = start_default_broker(brokers, tmp_path)
    subscriber = Subscriber(_topic())
    subscriber.subscribe_then_leave(broker)

    publish(broker, subscriber.topic, MESSAGES)
    received = subscriber.come_back(broker, MESSAGES)

    assert subscriber.session_present is True  # the session survived; its queue did not
    assert 0 < len(received) < MESSAGES
    assert len(received) <= 2000, f"defaults kept {len(received)}: did they change?"


def test_clean_restart_keeps_the_queued_backlog(brokers: list[Broker], tmp_path: Path) -> None:
    data_dir = tmp_path / "broker"
    backlog = 5_000
    broker = start_project_broker(brokers, data_dir)
    subscriber = Subscriber(_topic())
    subscriber.subscribe_then_leave(broker)
    publish(broker, subscriber.topic, backlog)

    assert broker.stop(signal.SIGTERM) == 0
    assert (data_dir / "mosquitto.db").is_file()

    restarted = start_project_broker(brokers, data_dir)
    received = subscriber.come_back(restarted, backlog)

    assert subscriber.session_present is True
    assert len(received) == backlog, f"{backlog - len(received)} of {backlog} lost"
    assert received == set(range(backlog))


@pytest.mark.parametrize("busy", ["plain", "tls"])
def test_a_port_in_use_is_one_line_and_no_url(tmp_path: Path, busy: str) -> None:
    """scripts/broker with a listener's port taken: the reason, and no URL that would
    send the server or devices to whoever holds that port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1" if busy == "plain" else "0.0.0.0", 0))
        taken.listen()
        held = taken.getsockname()[1]
        args = ["--port", str(held)] if busy == "plain" else [
            "--port", str(_free_port()), "--tls-port", str(held)]
        out = subprocess.run([str(BROKER_SCRIPT), *args, "--dir", str(tmp_path / "b")],
                             capture_output=True, text=True, timeout=120,
                             stdin=subprocess.DEVNULL)
    assert out.returncode != 0
    assert "MDM_MQTT_URL" not in out.stdout + out.stderr
    where = "127.0.0.1" if busy == "plain" else "0.0.0.0"
    assert f"cannot listen on {where}:{held}: Address already in use" in out.stderr
    assert "Traceback" not in out.stderr
