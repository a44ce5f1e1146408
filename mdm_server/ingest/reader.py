"""What the ingest needs of a broker reader: one small interface, two readers.

- :class:`mdm_server.ingest.mqtt.MqttConsumer`: paho on the event loop, a shared
  subscription on Mosquitto (``MDM_MQTT_URL``), PUBACKs after the commit;
- :class:`mdm_server.ingest.amqp.AmqpConsumer` (the minimal AMQP consumer of
  mdm_server/ingest/amqp.py): a quorum queue on a RabbitMQ cluster
  (``MDM_AMQP_URL``), ``basic.ack(multiple=True)`` after the commit.

Both deliver :class:`~mdm_server.ingest.mqtt.InboundMessage` to the worker's
callback on the loop, in arrival order, and acknowledge a batch only when told
(mdm_server/ingest/worker.py): the decode, policy, sealing, COPY and
ack-after-commit core is the same whichever broker the devices use.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from mdm_server.ingest.mqtt import InboundMessage

__all__ = ["MessageReader"]


class MessageReader(Protocol):
    #: Set while the reader is connected (``/healthz`` reports it).
    connected: asyncio.Event
    #: Set once messages are routed to it (the first SUBACK, the queue consumed).
    subscribed: asyncio.Event

    async def run(self) -> None:
        """Connect, read, reconnect; until cancelled."""

    def ack(self, messages: list[InboundMessage]) -> int:
        """Acknowledge these messages (of the current connection); how many."""

    def pause_reading(self) -> None:
        """Stop taking messages in (the worker holds too many bytes)."""

    def resume_reading(self) -> None:
        """Take messages in again."""
