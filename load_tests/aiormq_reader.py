"""The ingest's first AMQP reader, through aio-pika and aiormq: a benchmark reference.

The server reads with its own consumer (mdm_server/ingest/amqp.py), which parses
deliveries as they arrive; this one, which it replaced, stays here only so that
load_tests/bench_amqp_reader.py can measure the two in one run. Same contract
(:class:`mdm_server.ingest.reader.MessageReader`), queue, bindings and log lines.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiormq

from mdm_server.broker.amqp import EXCHANGE, open_connection, routing_key_topic
from mdm_server.broker.hook_config import AmqpSettings
from mdm_server.ingest.amqp import INGEST_BINDINGS, INGEST_QUEUE, QueueReader
from mdm_server.ingest.mqtt import InboundMessage

__all__ = ["AiormqConsumer"]

log = logging.getLogger("mdm_server.ingest.amqp")


async def _ack(channel: aiormq.abc.AbstractChannel, tag: int) -> None:
    await channel.basic_ack(tag, multiple=True)


class AiormqConsumer(QueueReader):
    """Consumes :data:`INGEST_QUEUE` on the first node that answers; acks on demand."""

    def __init__(self, amqp: AmqpSettings, *, on_message: Callable[[InboundMessage], None],
                 prefetch: int = 10_000, queue: str = INGEST_QUEUE,
                 bindings: tuple[str, ...] = INGEST_BINDINGS,
                 label: str = "ingest") -> None:
        super().__init__(amqp, on_message=on_message, prefetch=prefetch, queue=queue,
                         bindings=bindings, label=label)
        self._underlay: aiormq.abc.AbstractChannel | None = None  # acks are written here
        self._acks: set[asyncio.Task[None]] = set()

    async def _on_delivery(self, message: aiormq.abc.DeliveredMessage) -> None:
        """aiormq's consumer callback (its own task per message, started in delivery
        order; nothing here awaits, so messages reach the worker in that order,
        which the acks with ``multiple=True`` rely on). aiormq directly rather than
        aio-pika's consumer: that wraps each message once more, in a second task,
        and halved the drain (measured)."""
        delivery = message.delivery
        tag = getattr(delivery, "delivery_tag", None)
        if tag is None:
            return
        self._on_message(InboundMessage(tag, self.generation,
                                        routing_key_topic(message.routing_key or ""),
                                        message.body))

    async def _consume(self, url: str) -> None:
        """One connection to one node, until it is lost (raises) or cancelled."""
        connection = await open_connection(self._amqp, url)
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=self._prefetch)
            queue = await channel.declare_queue(
                self._queue_name, durable=True, arguments={"x-queue-type": "quorum"})
            for key in self._bindings:
                await queue.bind(EXCHANGE, routing_key=key)
            self.generation += 1
            self._underlay = await channel.get_underlay_channel()
            self._closed.clear()
            channel.close_callbacks.add(lambda *_: self._closed.set())
            connection.close_callbacks.add(lambda *_: self._closed.set())
            await self._underlay.basic_consume(queue.name, self._on_delivery, no_ack=False)
            self._now_subscribed(url)
            await self._closed.wait()
            raise ConnectionError("the AMQP channel or connection closed")
        finally:
            self.connected.clear()
            self._underlay = None
            if not connection.is_closed:
                await connection.close()

    def ack(self, messages: list[InboundMessage]) -> int:
        """Acknowledge a batch (messages of the current channel) with one
        ``basic.ack(multiple=True)`` on its highest delivery tag; how many."""
        underlay = self._underlay
        if underlay is None or not self.connected.is_set():
            return 0
        n, top = self._to_ack(messages)
        if not n:
            return 0
        task = asyncio.get_running_loop().create_task(
            _ack(underlay, top), name=f"{self._label}-ack")
        self._acks.add(task)
        task.add_done_callback(self._acked)
        return n

    def _acked(self, task: asyncio.Task[None]) -> None:
        self._acks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The channel is gone: the broker delivers those messages again.
            log.warning("%s: an AMQP ack was not sent (%s)", self._label,
                        type(task.exception()).__name__)
