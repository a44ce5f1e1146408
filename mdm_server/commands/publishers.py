"""How the command dispatcher hands a message to the broker: MQTT or AMQP.

The dispatcher (mdm_server/commands/outbox.py) signs and claims commands; a
:class:`CommandPublisher` publishes them at QoS 1, never retained, and tells which
ones the broker has acknowledged (only those become ``sent``):

- :class:`MqttPublisher`: paho on its own thread, to Mosquitto (``MDM_MQTT_URL``);
  the broker's PUBACK is the acknowledgement.
- :class:`AmqpPublisher`: aio-pika, to a RabbitMQ cluster (``MDM_AMQP_URL``):
  ``amq.topic`` with the topic's routing key (``/`` -> ``.``), persistent, with
  publisher confirms; the broker's ``basic.ack`` is the acknowledgement, sent once
  the message is in every queue it was routed to (a device's session queue is a
  quorum queue: replicated before the ack). RabbitMQ's MQTT plugin delivers it at
  QoS 1 to a device subscribed at QoS 1, and keeps it in the session of a device
  that is offline (clean session off), whichever node the device comes back to.

A message routed nowhere (no session for that device yet) is acknowledged and
dropped by either broker; the dispatcher re-sends what a reconnecting device has
not acknowledged (the ``resend`` flag set from its status message).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Protocol

import aio_pika
import paho.mqtt.client as paho
from aio_pika.abc import AbstractExchange
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from mdm_server.broker.amqp import EXCHANGE, LINK_ERRORS, open_connection, run_with_failover
from mdm_server.broker.hook import topic_routing_key
from mdm_server.broker.hook_config import AmqpSettings
from mdm_server.config import Config, MqttSettings
from mdm_server.mqtt_client import configure

__all__ = ["AmqpPublisher", "CommandPublisher", "MqttPublisher", "make_publisher"]

log = logging.getLogger(__name__)


class CommandPublisher(Protocol):
    @property
    def connected(self) -> bool:
        """Whether publishing can be tried now (nothing is claimed otherwise)."""

    def start(self, wake: asyncio.Event) -> None:
        """Connect (and keep reconnecting) in the background; ``wake`` is set on
        every (re)connection, so that the dispatcher tries again at once."""

    async def stop(self) -> None:
        """Disconnect; what was not acknowledged stays queued in the table."""

    async def publish(self, messages: list[tuple[str, bytes]]) -> list[int]:
        """Publish ``(topic, payload)`` at QoS 1, not retained; the indices of those
        the broker acknowledged within the time allowed."""


def make_publisher(config: Config, *, batch: int, ack_timeout_s: float,
                   client_id: str) -> CommandPublisher:
    """AMQP when ``MDM_AMQP_URL`` is set (the devices are on the cluster), else MQTT."""
    if config.amqp is not None:
        return AmqpPublisher(config.amqp, ack_timeout_s=ack_timeout_s)
    return MqttPublisher(config.require_mqtt(), batch=batch, ack_timeout_s=ack_timeout_s,
                         client_id=client_id)


class MqttPublisher:
    """paho's own thread (``loop_start``); ``publish`` is thread-safe and PUBACKs
    come back to the event loop through ``call_soon_threadsafe``. At most ``batch``
    publishes are unacknowledged at any time (paho's message ids are 16-bit)."""

    def __init__(self, settings: MqttSettings, *, batch: int, ack_timeout_s: float,
                 client_id: str) -> None:
        self._settings = settings
        self._batch = batch
        self._ack_timeout_s = ack_timeout_s
        self._client_id = client_id
        self._pending: dict[int, asyncio.Future[bool]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None
        self._wake: asyncio.Event | None = None

    # Callbacks run on paho's thread.

    def _call(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closing during shutdown
                loop.call_soon_threadsafe(fn, *args)

    def _on_connect(self, client: paho.Client, userdata: object, flags: object,
                    rc: ReasonCode, props: object) -> None:
        if rc.is_failure:
            log.error("command dispatch: broker refused the connection: %s", rc)
            return
        log.info("command dispatch connected to the broker")
        if self._wake is not None:
            self._call(self._wake.set)

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: object,
                       rc: ReasonCode, props: object) -> None:
        if rc.is_failure:
            log.warning("command dispatch disconnected from the broker: %s", rc)
        else:  # our own DISCONNECT: a normal stop
            log.info("command dispatch disconnected from the broker")

    def _on_publish(self, client: paho.Client, userdata: object, mid: int,
                    rc: ReasonCode, props: object) -> None:
        self._call(self._acked, mid, not rc.is_failure)

    def _acked(self, mid: int, ok: bool) -> None:
        fut = self._pending.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(ok)

    @property
    def connected(self) -> bool:
        client = self._client
        return client is not None and client.is_connected()

    def start(self, wake: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = wake
        s = self._settings
        c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                        client_id=self._client_id, clean_session=True,
                        protocol=paho.MQTTv311)
        configure(c, s)
        c.max_inflight_messages_set(self._batch)
        c.reconnect_delay_set(min_delay=1, max_delay=5)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.connect_async(s.host, s.port, keepalive=30)
        c.loop_start()  # retries the first connection too
        self._client = c

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            await asyncio.get_running_loop().run_in_executor(None, client.loop_stop)
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()

    async def publish(self, messages: list[tuple[str, bytes]]) -> list[int]:
        client, loop = self._client, self._loop
        if client is None or loop is None:
            return []
        waiting: list[tuple[int, int, asyncio.Future[bool]]] = []
        try:
            for i, (topic, payload) in enumerate(messages):
                info = client.publish(topic, payload, qos=1, retain=False)
                if info.rc != paho.MQTT_ERR_SUCCESS:
                    break  # disconnected: the rest stays queued for the next round
                fut: asyncio.Future[bool] = loop.create_future()
                # Registered before the loop runs any PUBACK callback (same thread).
                self._pending[info.mid] = fut
                waiting.append((i, info.mid, fut))
            if waiting:
                await asyncio.wait([f for _, _, f in waiting], timeout=self._ack_timeout_s)
            return [i for i, _, f in waiting if f.done() and not f.cancelled() and f.result()]
        finally:
            for _, mid, f in waiting:
                if self._pending.get(mid) is f:
                    del self._pending[mid]


class AmqpPublisher:
    """One connection to one node of the cluster at a time (failover between them),
    a channel in confirm mode, ``amq.topic``."""

    def __init__(self, amqp: AmqpSettings, *, ack_timeout_s: float,
                 label: str = "command dispatch") -> None:
        self._amqp = amqp
        self._ack_timeout_s = ack_timeout_s
        self._label = label
        self._exchange: AbstractExchange | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._went = False

    @property
    def connected(self) -> bool:
        return self._exchange is not None

    def start(self, wake: asyncio.Event) -> None:
        self._wake = wake
        self._task = asyncio.get_running_loop().create_task(
            run_with_failover(self._amqp, self._label, self._session, self._worked),
            name="dispatch-amqp")

    def _worked(self) -> bool:
        went, self._went = self._went, False
        return went

    async def _session(self, url: str) -> None:
        connection = await open_connection(self._amqp, url)
        lost = asyncio.Event()
        try:
            channel = await connection.channel(publisher_confirms=True)
            channel.close_callbacks.add(lambda *_: lost.set())
            connection.close_callbacks.add(lambda *_: lost.set())
            self._exchange = await channel.get_exchange(EXCHANGE, ensure=False)
            self._went = True
            log.info("%s connected to the AMQP cluster", self._label)
            if self._wake is not None:
                self._wake.set()
            await lost.wait()
            raise ConnectionError("the AMQP channel or connection closed")
        finally:
            self._exchange = None
            if not connection.is_closed:
                with contextlib.suppress(*LINK_ERRORS):
                    await connection.close()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _one(self, exchange: AbstractExchange, topic: str, payload: bytes) -> None:
        await exchange.publish(
            aio_pika.Message(payload, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                             # The MQTT plugin's own header: delivered at QoS 1.
                             headers={"x-mqtt-publish-qos": 1}),
            routing_key=topic_routing_key(topic), mandatory=False)

    async def publish(self, messages: list[tuple[str, bytes]]) -> list[int]:
        exchange = self._exchange
        if exchange is None:
            return []
        tasks = [asyncio.ensure_future(self._one(exchange, t, p)) for t, p in messages]
        _, late = await asyncio.wait(tasks, timeout=self._ack_timeout_s)
        for t in late:
            t.cancel()
        acked = []
        for i, t in enumerate(tasks):
            if t in late or t.cancelled():
                continue
            exc = t.exception()
            if exc is None:
                acked.append(i)
            elif not isinstance(exc, LINK_ERRORS):
                raise exc  # not the broker's doing: a bug, said loudly
        if len(acked) < len(tasks):
            log.warning("%s: %d of %d commands not confirmed by the cluster; kept queued",
                        self._label, len(tasks) - len(acked), len(tasks))
        return acked
