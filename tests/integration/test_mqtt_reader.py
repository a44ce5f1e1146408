"""The ingest's MQTT reader (buffered socket reads, its own PUBLISH fast path)
against a real broker: every message arrives intact, whatever its size, in plain
text and over TLS (mqtts://, where reads come out of the TLS layer a record at a
time and decrypted bytes wait in it unseen by the event loop)."""

from __future__ import annotations

import asyncio
import hashlib
import random

import pytest

from agent_protocol import MAX_PAYLOAD_BYTES
from mdm_server.config import MqttSettings
from mdm_server.ingest.mqtt import InboundMessage, MqttConsumer
from tests.support.mqtt import publish_as_devices
from tests.support.services import Broker, broker_only_devices

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("transport", ["plain", "tls"])
def test_every_size_of_message_arrives_intact_and_in_full(broker: Broker, transport: str
                                                          ) -> None:
    rng = random.Random(7)
    # Sizes from empty to larger than one 256 KiB socket read (the contract's
    # largest payload, with its headers; the broker refuses larger packets), so
    # packets split across reads (paho's path) mix with whole ones (the fast path).
    sizes = [rng.choice([0, 1, 2, 100, 1000, 65_000, MAX_PAYLOAD_BYTES])
             for _ in range(1500)]
    sent = [(f"mdm/v1/t/devices/d{i % 7}/telemetry/location", rng.randbytes(n))
            for i, n in enumerate(sizes)]
    got: list[InboundMessage] = []

    async def main() -> None:
        await broker_only_devices(broker.url, "t", [f"d{i}" for i in range(7)])
        settings = MqttSettings.from_url(broker.url) if transport == "plain" else \
            MqttSettings.from_url(broker.tls_url, ca_file=broker.ca_file)
        consumer = MqttConsumer(settings, client_id="reader",
                                subscriptions=["$share/g/mdm/v1/+/devices/+/telemetry/+"],
                                on_message=got.append)
        task = asyncio.create_task(consumer.run())
        await asyncio.wait_for(consumer.subscribed.wait(), 10)
        loop = asyncio.get_running_loop()
        publishing = loop.run_in_executor(None, lambda: publish_as_devices(
            broker.port, sent, max_inflight=200))
        acked = 0
        for _ in range(600):
            await asyncio.sleep(0.05)
            batch, got_now = got[acked:], len(got)
            consumer.ack(batch)
            acked = got_now
            if acked >= len(sent) and publishing.done():
                break
        await publishing
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    digest = lambda t, p: (t, hashlib.sha256(p).hexdigest())  # noqa: E731
    assert sorted(digest(m.topic, m.payload) for m in got) == sorted(
        digest(t, p) for t, p in sent)
