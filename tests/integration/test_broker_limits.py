"""Per-client limits of the project's broker, against a real Mosquitto 2.0.11.

- A packet larger than ``max_packet_size`` gets its sender disconnected and is
  delivered to nobody; the wire contract's largest valid message passes; no
  other client notices (issue 10).
- The limit holds for the server's own connections too (it is global in 2.0.11):
  its dynamic-security requests are cut to stay below it, so accounts for a fleet
  of devices with the longest ids are still written.

Judged by what arrives at a subscriber logged in as the server's user, never by
acknowledgements alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent_protocol import MAX_PAYLOAD_BYTES, telemetry_topic
from mdm_server.broker.dynsec import Dynsec
from mdm_server.config import MqttSettings
from tests.support.mqtt import RawClient, publish_packet
from tests.support.services import Broker, broker_only_devices, device_credentials
from tests.unit.test_broker_limits import conf_value, largest_valid_publish

pytestmark = pytest.mark.integration

TENANT = "t" * 64  # the longest ids make the longest topics
BIG = "d" * 64


class Observer:
    """The server's user, subscribed to every device topic: what would reach ingest."""

    def __init__(self, broker: Broker) -> None:
        self.seen: list[tuple[str, int, str]] = []  # topic, size, sha256
        self.disconnects = 0
        self._lock = threading.Lock()
        subscribed = threading.Event()
        c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                        client_id="limits-observer", protocol=paho.MQTTv311)
        c.username_pw_set("mdm-server", broker.password)
        c.on_message = self._message
        c.on_subscribe = lambda *a: subscribed.set()
        c.on_disconnect = self._disconnect
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        c.subscribe("mdm/v1/+/devices/+/#", qos=1)
        assert subscribed.wait(10)
        self.client = c

    def _message(self, c: Any, u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.seen.append((msg.topic, len(msg.payload),
                              hashlib.sha256(msg.payload).hexdigest()))

    def _disconnect(self, *args: Any) -> None:
        self.disconnects += 1

    def has(self, payload: bytes) -> bool:
        digest = hashlib.sha256(payload).hexdigest()
        with self._lock:
            return any(d == digest for _, _, d in self.seen)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _wait(pred: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return bool(pred())


def _device(broker: Broker, tenant: str, device: str) -> RawClient:
    user, password = device_credentials(tenant, device)
    return RawClient(broker.port, user, user, password)


def test_a_packet_over_the_limit_disconnects_its_sender_and_nothing_else(
        broker: Broker) -> None:
    asyncio.run(broker_only_devices(broker.url, TENANT, [BIG, "other"]))
    limit = conf_value("max_packet_size")
    topic = telemetry_topic(TENANT, BIG, "checkinout")  # the longest there is
    observer = Observer(broker)
    big, other = _device(broker, TENANT, BIG), _device(broker, TENANT, "other")
    other_topic = telemetry_topic(TENANT, "other", "location")
    try:
        # The contract's largest message passes, and its sender stays connected.
        largest = b"L" * MAX_PAYLOAD_BYTES
        packet = publish_packet(topic, largest, 1)
        assert len(packet) - 3 == largest_valid_publish()  # 3 bytes of remaining length
        big.send(packet)
        assert _wait(lambda: observer.has(largest)), "the largest valid message was refused"
        assert big.pubacks == 1 and not big.closed.is_set()

        # One byte over the limit (Mosquitto compares remaining length + 1).
        over = b"O" * (limit - (1 + 2 + len(topic) + 2) + 1)
        big.send(publish_packet(topic, over, 2))
        assert big.closed.wait(10), "the sender of an oversized packet stayed connected"
        assert big.pubacks == 1  # the oversized one was never acknowledged

        # Nobody else noticed: the other device and the server's session go on.
        after = b'{"after": "the oversized packet"}'
        other.send(publish_packet(other_topic, after, 1))
        assert _wait(lambda: observer.has(after))
        assert other.pubacks == 1 and not other.closed.is_set()
        assert observer.disconnects == 0
        time.sleep(0.5)
        assert not observer.has(over)
        assert not any(size > MAX_PAYLOAD_BYTES for _, size, _ in observer.seen
                       if size != len(largest))
        # The device itself may come back (and is refused again only if it resends).
        again = _device(broker, TENANT, BIG)
        again.close()
    finally:
        big.close()
        other.close()
        observer.stop()


def test_the_servers_dynamic_security_requests_fit_under_the_limit(broker: Broker) -> None:
    """The limit is global: a request larger than it would cost the server its
    admin connection (and time out). 150 devices with 64-character ids make a
    request of 200 commands well over it; they are written in smaller requests."""
    devices = [f"{i:03d}" + "d" * 61 for i in range(150)]
    asyncio.run(broker_only_devices(broker.url, TENANT, devices))

    async def count() -> int:
        async with Dynsec(MqttSettings.from_url(broker.url)) as d:
            (resp,) = await d.call([{"command": "listClients", "count": 1000}])
        return int(resp["data"]["totalCount"])

    assert asyncio.run(count()) == 1 + len(devices)  # and the server's own user
    # The accounts work: the last one logs in.
    _device(broker, TENANT, devices[-1]).close()
