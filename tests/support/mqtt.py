"""A small, exact QoS 1 publisher for tests: every message is PUBACKed or it raises.

The project's broker lets a device publish only under its own topics, and only
on a connection with its own credentials: :func:`publish_as_devices` publishes
each message as the device its topic names, over the broker's TLS listener as
devices do. Remember that a refused publish is still PUBACKed under MQTT 3.1.1:
check what arrived, not the acks.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def device_tls_context(enrollment: Mapping[str, Any]) -> ssl.SSLContext | None:
    """What an agent does with its enrollment's ``mqtt``: None for ``mqtt://``; for
    ``mqtts://`` a TLS context that checks the broker's certificate and host name
    against ``ca_pem`` only (the CA enrollment gave) or, without one, the system's
    trusted CAs (the simulator's agents do the same: load_tests.simulator)."""
    from load_tests.simulator import tls_context

    return tls_context(enrollment["mqtt"])


def publish_all(
    host: str,
    port: int,
    messages: Iterable[tuple[str, bytes]],
    *,
    client_id: str = "",
    username: str | None = None,
    password: str | None = None,
    max_inflight: int = 1000,
    timeout: float = 300.0,
    tls: ssl.SSLContext | None = None,
) -> int:
    """Publish at QoS 1 on one connection (TLS with the ``tls`` context) with at
    most ``max_inflight`` unacknowledged (paho's mids are 16-bit); return the count
    once every one is acknowledged by the broker."""
    window = threading.Semaphore(max_inflight)
    done = threading.Event()
    state = {"sent": 0, "acked": 0, "finished": False}
    lock = threading.Lock()

    def on_publish(client: paho.Client, userdata: object, mid: int, rc: object,
                   props: object) -> None:
        window.release()
        with lock:
            state["acked"] += 1
            if state["finished"] and state["acked"] == state["sent"]:
                done.set()

    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=paho.MQTTv311)
    if username is not None:
        c.username_pw_set(username, password)
    if tls is not None:
        c.tls_set_context(tls)
    c.max_inflight_messages_set(max_inflight)
    c.max_queued_messages_set(0)
    c.on_publish = on_publish
    refused: list[str] = []
    connected = threading.Event()

    def on_connect(client: paho.Client, userdata: object, flags: object, rc: object,
                   props: object) -> None:
        if getattr(rc, "is_failure", False):
            refused.append(str(rc))
        connected.set()

    c.on_connect = on_connect
    c.connect(host, port, keepalive=60)
    c.loop_start()
    if not connected.wait(30) or refused:
        c.loop_stop()
        raise ConnectionRefusedError(f"broker refused {username or 'anonymous'}: {refused}")
    deadline = time.monotonic() + timeout
    try:
        for topic, payload in messages:
            if not window.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise TimeoutError("broker stopped acknowledging publishes")
            info = c.publish(topic, payload, qos=1)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"publish failed: {paho.error_string(info.rc)}")
            with lock:
                state["sent"] += 1
        with lock:
            state["finished"] = True
            if state["acked"] == state["sent"]:
                done.set()
        if not done.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"only {state['acked']} of {state['sent']} acknowledged")
        return state["sent"]
    finally:
        c.disconnect()
        c.loop_stop()


def publish_as_devices(
    port: int,
    messages: Iterable[tuple[str, bytes]],
    *,
    host: str = "127.0.0.1",
    generations: Mapping[tuple[str, str], int] | None = None,
    max_inflight: int = 1000,
    timeout: float = 300.0,
) -> int:
    """Publish each message as the device its topic ``mdm/v1/{tenant}/devices/{device}/...``
    names: one connection per device (client id and username ``{tenant}.{device}``,
    the password its enrollment with the tests' master key gave it, generation 1
    unless ``generations`` says otherwise), each device's messages in order, the
    devices in parallel. Returns the count once every message is acknowledged.

    ``port`` is the broker's plain one (``Broker.port``): when it is a broker of
    this process (tests.support.services), the devices connect as they would in
    production, to its TLS listener, trusting only its CA; any other port is
    published to in plain text on ``host``."""
    from tests.support.services import broker_for, device_credentials

    by_device: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
    for topic, payload in messages:
        parts = topic.split("/")
        if len(parts) < 6 or parts[:2] != ["mdm", "v1"] or parts[3] != "devices":
            raise ValueError(f"not a device topic: {topic!r}")
        by_device.setdefault((parts[2], parts[4]), []).append((topic, payload))
    gens = generations or {}
    broker = broker_for(port)
    tls = None
    if broker is not None:
        port = broker.tls_port
        tls = device_tls_context({"mqtt": {"url": broker.device_url, "ca_pem": broker.ca_pem}})

    def one(key: tuple[str, str]) -> int:
        user, password = device_credentials(*key, gens.get(key, 1))
        return publish_all(host, port, by_device[key], client_id=user, username=user,
                           password=password, max_inflight=max_inflight, timeout=timeout,
                           tls=tls)

    if not by_device:
        return 0
    with ThreadPoolExecutor(max_workers=min(32, len(by_device))) as pool:
        return sum(pool.map(one, list(by_device)))


def publish_as_server(mqtt_url: str, topic: str, payload: bytes) -> None:
    """Publish one QoS 1 message with the server's own MQTT identity (``mqtt_url`` as
    in MDM_MQTT_URL): forged or replayed commands on a device's commands topic."""
    from mdm_server.config import MqttSettings

    m = MqttSettings.from_url(mqtt_url)
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                    client_id=f"test-server-{time.monotonic_ns()}", protocol=paho.MQTTv311)
    if m.username:
        c.username_pw_set(m.username, m.password)
    c.connect(m.host, m.port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


# --- a bare MQTT 3.1.1 client, for what paho will not do --------------------------------


def _packet(first_byte: int, body: bytes) -> bytes:
    """An MQTT packet: fixed header (type and flags, remaining length) and body."""
    n, length = len(body), bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        length.append(byte | (0x80 if n else 0))
        if not n:
            return bytes([first_byte]) + bytes(length) + body


def _string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


def publish_packet(topic: str, payload: bytes, mid: int = 1) -> bytes:
    """A QoS 1 PUBLISH, not retained (``mid`` 1..65535)."""
    return _packet(0x32, _string(topic) + mid.to_bytes(2, "big") + payload)


class RawClient:
    """A bare MQTT 3.1.1 client on a plain socket: CONNECT, then whatever bytes the
    test writes; a reader thread counts the PUBACKs and notices the broker closing
    the connection. For exact packet sizes, and for floods sent as fast as one
    ``sendall`` of prepared packets goes (paho spends ~30 us a message in Python)."""

    def __init__(self, port: int, client_id: str, username: str, password: str, *,
                 host: str = "127.0.0.1") -> None:
        import socket

        self.sock = socket.create_connection((host, port), timeout=10)
        self.pubacks = 0
        self.closed = threading.Event()
        body = (_string("MQTT") + bytes([4, 0xC2]) + (0).to_bytes(2, "big")  # no keepalive
                + _string(client_id) + _string(username) + _string(password))
        self.sock.sendall(_packet(0x10, body))
        connack = self._read_exactly(4)
        if connack[:2] != b"\x20\x02" or connack[3] != 0:
            self.sock.close()
            raise ConnectionRefusedError(f"CONNACK {connack.hex()}")
        self.sock.settimeout(None)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read_exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed by the broker")
            out += chunk
        return out

    def _read(self) -> None:
        buf = b""
        try:
            while True:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
                # PUBACKs (0x40 0x02 mid mid) are all the broker sends a publisher
                # without keepalive: every fourth byte starts one.
                whole = len(buf) - len(buf) % 4
                self.pubacks += buf[0:whole:4].count(0x40)
                buf = buf[whole:]
        except OSError:
            pass
        finally:
            self.closed.set()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        import socket

        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(timeout=5)


class DeviceStream:
    """``n`` location records from ``devices`` (round robin, tenant ``acme``),
    published as those devices in a background thread (:func:`publish_as_devices`)
    while the ``with`` block runs; its end waits for the last PUBACK and re-raises
    what went wrong. ``done_at``: when the last was acknowledged (``time.time()``)."""

    def __init__(self, port: int, devices: list[str], n: int, *,
                 join_timeout: float = 600.0) -> None:
        self.error: BaseException | None = None
        self.done_at: float | None = None
        self._join_timeout = join_timeout
        self._thread = threading.Thread(target=self._run, args=(port, devices, n),
                                        daemon=True)

    def _run(self, port: int, devices: list[str], n: int) -> None:
        from tests.support.telemetry import location

        try:
            publish_as_devices(port, (location("acme", devices[i % len(devices)], i)
                                      for i in range(n)))
            self.done_at = time.time()
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> DeviceStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(timeout=self._join_timeout)
        assert self.error is None, self.error
