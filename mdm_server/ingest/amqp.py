"""The ingest's reader on a RabbitMQ cluster: AMQP 0-9-1, competing consumers, acks after commit.

With ``MDM_AMQP_URL`` set, devices speak MQTT to the cluster's nodes (RabbitMQ's
MQTT plugin publishes what they send to ``amq.topic``, the topic turned into a
routing key: ``/`` -> ``.``), and the ingest reads over AMQP instead of MQTT:
RabbitMQ has no MQTT shared subscriptions. One durable **quorum** queue,
``mdm-ingest`` (replicated on the cluster's nodes: a node's loss loses nothing it
acknowledged), bound to ``amq.topic`` with ``mdm.v1.*.devices.*.telemetry.*`` and
OwnTracks' topics (:data:`INGEST_BINDINGS`); every ingest worker of every
``serve`` consumes it (competing consumers: the broker hands each message to one
of them). The ack consumer reads ``mdm-acks``, bound to acks and status, the same
way (mdm_server/commands/acks.py). A routing key is turned back into its topic by
:func:`mdm_server.broker.amqp.routing_key_topic` (exact for both agents' topics).

The same contract as the MQTT reader (:class:`mdm_server.ingest.mqtt.MqttConsumer`,
:class:`mdm_server.ingest.reader.MessageReader`): messages go to ``on_message``
as :class:`~mdm_server.ingest.mqtt.InboundMessage` (``mid`` is the delivery tag,
``generation`` the channel's), the worker acknowledges a batch once its
transaction has committed; a lost connection or channel makes the broker deliver
again what was not acknowledged, and storage's unique key absorbs the repeat.

Why a consumer of our own: aiormq (load_tests/aiormq_reader.py, the reader this
one replaced, kept as the benchmark's reference) reads every frame with
``readexactly`` behind a lock, passes it through an ``asyncio.Queue`` to the
channel's task, decodes it with pamqp, builds a ``DeliveredMessage`` and starts a
task per consumer callback: per message, that cost more than our whole core (the
AMQP drain ran at 0.42-0.56 of the Mosquitto one, load_tests/RESULTS.md).
:class:`AmqpConsumer` speaks a minimal AMQP 0-9-1 itself, on an
``asyncio.Protocol``, as the MQTT reader parses PUBLISH packets itself
(mdm_server/ingest/mqtt.py):

- **Setup** (Connection.Start/StartOk with PLAIN, Tune/TuneOk, Open, Channel.Open,
  Basic.Qos, Queue.Declare of the durable quorum queue, Queue.Bind, Basic.Consume):
  rare frames, encoded and decoded with pamqp.
- **Deliveries**: the Basic.Deliver method frame, the content header and the body
  frame(s) (a body larger than the negotiated ``frame_max`` comes in several) are
  parsed by hand (``struct`` on the bytes received), and each message goes to
  ``on_message`` synchronously from ``data_received``, in arrival order: no task,
  no queue, no message object but the :class:`InboundMessage`.
- **Acks**: ``basic.ack(multiple=True)`` on a batch's highest delivery tag, written
  straight to the transport; a batch of an earlier connection is not acknowledged
  (the broker delivers it again; storage's unique key absorbs the repeat).
- **Heartbeats**: sent at the negotiated interval; a server silent for two
  intervals counts as lost. Connection.Close (answered with CloseOk),
  Channel.Close or Basic.Cancel from the server: the connection is lost, and
  :func:`mdm_server.broker.amqp.run_with_failover` goes on to the next node.
  Connection.Blocked and Channel.Flow are ignored: the prefetch bounds the flow.
- TLS for ``amqps://`` nodes (:func:`mdm_server.broker.amqp.ssl_context`).

Logs name the node and the queue, never a payload, routing key or device.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from pamqp import commands as spec
from pamqp import frame as pframe
from pamqp.base import Frame
from pamqp.exceptions import PAMQPException

from agent_protocol import TELEMETRY_FILTER
from agent_protocol.owntracks import OWNTRACKS_FILTER
from mdm_server.broker.amqp import EXCHANGE, routing_key_topic, run_with_failover, ssl_context
from mdm_server.broker.hook import server_routing_key, topic_routing_key
from mdm_server.broker.hook_config import AmqpSettings
from mdm_server.ingest.mqtt import InboundMessage

__all__ = ["INGEST_BINDINGS", "INGEST_QUEUE", "AmqpConsumer", "FrameParser", "QueueReader"]

log = logging.getLogger(__name__)

#: The ingest's queue: quorum, durable, shared by every worker of every serve.
INGEST_QUEUE = "mdm-ingest"
#: What it is bound to: our agents' telemetry and OwnTracks' topics (whose username
#: level is two words; ``#`` matches zero or more words, as in the MQTT filter).
INGEST_BINDINGS = (topic_routing_key(TELEMETRY_FILTER), server_routing_key(OWNTRACKS_FILTER))

_PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
_FRAME_END = 0xCE
_METHOD, _HEADER, _BODY, _HEARTBEAT = 1, 2, 3, 8
_CHANNEL = 1
_HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"
_FRAME_HEAD = struct.Struct(">BHI")  # type, channel, payload size
_DELIVER = b"\x00\x3c\x00\x3c"  # Basic (60) . Deliver (60)
_ACK = struct.Struct(">BHIHHQBB")  # a whole Basic.Ack frame
_TOPICS_CACHED = 50_000  # routing key -> topic, bounded (device ids are many)
_FRAME_MIN = 4096  # the protocol's smallest frame_max


class ProtocolError(ConnectionError):
    """The server sent something this reader cannot make sense of."""


class HeartbeatTimeout(ConnectionError):
    """The server sent nothing for two heartbeat intervals."""


class ServerClosed(ConnectionError):
    """The server closed the connection or the channel, or cancelled the consumer."""


class FrameParser:
    """Frames out of a byte stream; deliveries parsed by hand, the rest by pamqp.

    ``feed(data)`` for each chunk received, frames in any split. Deliveries on the
    channel go to ``deliver(tag, routing_key, body)`` as soon as their last body
    frame is complete; any other frame (method frames but Basic.Deliver, heartbeats)
    to ``other(channel, frame)``, decoded by pamqp.
    """

    def __init__(self, deliver: Callable[[int, bytes, bytes], None],
                 other: Callable[[int, Frame | None], None]) -> None:
        self._deliver = deliver
        self._other = other
        self._buf = b""
        self._pos = 0
        self._parts: list[bytes] = []  # chunks waiting for the rest of a frame
        self._have = 0  # their size
        self._need = 0  # bytes the frame under way needs from _pos, 0: unknown
        # The delivery under way: its tag and key, then its body's size and parts.
        self._tag = -1
        self._key = b""
        self._size = -1  # body size from the content header; -1: header awaited
        self._body: list[bytes] = []
        self._got = 0

    def feed(self, data: bytes) -> None:
        if self._parts:  # a frame was incomplete: wait until it is whole
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return
            data = b"".join(self._parts)
            self._parts = []
        elif self._pos < len(self._buf):
            data = self._buf[self._pos:] + data
        self._buf, self._pos = data, 0
        self._parse()

    def _parse(self) -> None:
        buf = self._buf
        end = len(buf)
        pos = self._pos
        head = _FRAME_HEAD.unpack_from
        while end - pos >= 7:
            kind, channel, size = head(buf, pos)
            stop = pos + 7 + size
            if stop >= end:  # the frame (and its end octet) is not all here yet
                self._pos = pos
                self._need = stop + 1 - pos
                self._parts = [buf[pos:]]
                self._have = end - pos
                self._buf, self._pos = b"", 0
                return
            if buf[stop] != _FRAME_END:
                raise ProtocolError("an AMQP frame does not end with 0xCE")
            start = pos + 7
            pos = stop + 1
            if kind == _BODY:
                if self._size < 0:
                    raise ProtocolError("a body frame without a delivery")
                if self._got == 0 and size == self._size:  # the usual: one frame
                    body = buf[start:stop]
                else:
                    self._body.append(buf[start:stop])
                    self._got += size
                    if self._got < self._size:
                        continue
                    if self._got > self._size:
                        raise ProtocolError("a body longer than its content header said")
                    body = b"".join(self._body)
                    self._body = []
                    self._got = 0
                self._size = -1
                self._deliver(self._tag, self._key, body)
            elif kind == _METHOD and buf[start:start + 4] == _DELIVER:
                # consumer tag (short string), delivery tag (64 bits), redelivered
                # (octet), exchange (short string), routing key (short string).
                i = start + 4
                i += 1 + buf[i]
                if i + 10 > stop:
                    raise ProtocolError("a short Basic.Deliver frame")
                self._tag = int.from_bytes(buf[i:i + 8], "big")
                i += 9
                i += 1 + buf[i]
                if i >= stop or i + 1 + buf[i] > stop:
                    raise ProtocolError("a short Basic.Deliver frame")
                self._key = buf[i + 1:i + 1 + buf[i]]
                self._size = -2  # the content header next
            elif kind == _HEADER:
                if self._size != -2 or size < 14:
                    raise ProtocolError("a content header without a delivery")
                # class id, weight (2 octets each), body size (64 bits), properties.
                body_size = int.from_bytes(buf[start + 4:start + 12], "big")
                if body_size == 0:
                    self._size = -1
                    self._deliver(self._tag, self._key, b"")
                else:
                    self._size = body_size
            elif kind == _HEARTBEAT:
                self._other(channel, None)
            else:
                try:
                    _, _, value = pframe.unmarshal(buf[pos - size - 8:pos])
                except (PAMQPException, ValueError, struct.error) as exc:
                    raise ProtocolError(f"an AMQP frame pamqp cannot decode "
                                        f"({type(exc).__name__})") from None
                if isinstance(value, Frame):
                    self._other(channel, value)
        self._pos = pos
        self._need = 0


class _Connection(asyncio.Protocol):
    """One connection's protocol: setup frames to the session coroutine, deliveries
    to the consumer, heartbeats and the server's closes handled here."""

    def __init__(self, deliver: Callable[[int, bytes, bytes], None], label: str) -> None:
        self._label = label
        self._loop = asyncio.get_running_loop()
        self.parser = FrameParser(deliver, self._other)
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self._replies: asyncio.Queue[Frame] = asyncio.Queue()
        self.last_read = self._loop.time()

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.last_read = self._loop.time()
        try:
            self.parser.feed(data)
        except ConnectionError as exc:
            self.fail(exc)

    def eof_received(self) -> bool | None:
        self.fail(ConnectionError("the AMQP server closed the TCP connection"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_exception(ConnectionError("the AMQP connection was lost")
                                    if exc is None or not isinstance(exc, ConnectionError)
                                    else exc)
        self.transport = None

    # -- frames -------------------------------------------------------------------

    def fail(self, exc: ConnectionError) -> None:
        if not self.lost.done():
            self.lost.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def write(self, value: Frame, channel: int = _CHANNEL) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(pframe.marshal(value, channel))

    def _other(self, channel: int, value: Frame | None) -> None:
        if value is None:
            return  # a heartbeat: data_received noted the time
        if isinstance(value, (spec.Connection.Close, spec.Channel.Close)):
            # The server's reason (e.g. 403 ACCESS_REFUSED naming our user or queue):
            # about the server's own link, never a device's or a payload.
            log.warning("%s: the AMQP server closed the %s: %s %s", self._label,
                        "channel" if isinstance(value, spec.Channel.Close) else "connection",
                        value.reply_code, value.reply_text)
        if isinstance(value, spec.Connection.Close):
            self.write(spec.Connection.CloseOk(), 0)
            self.fail(ServerClosed(f"the server closed the connection ({value.reply_code} "
                                   f"{value.reply_text})"))
        elif isinstance(value, spec.Channel.Close):
            self.write(spec.Channel.CloseOk(), channel)
            self.fail(ServerClosed(f"the server closed the channel ({value.reply_code} "
                                   f"{value.reply_text})"))
        elif isinstance(value, spec.Basic.Cancel):
            self.fail(ServerClosed("the server cancelled the consumer"))
        elif isinstance(value, (spec.Channel.Flow, spec.Connection.Blocked,
                                spec.Connection.Unblocked)):
            pass  # the prefetch bounds the flow
        else:
            self._replies.put_nowait(value)

    async def expect(self, kind: type[Frame], timeout: float) -> Frame:
        """The server's next setup reply, which must be a ``kind``."""
        getter = asyncio.ensure_future(self._replies.get())
        waits: set[asyncio.Future[Any]] = {getter, self.lost}
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if self.lost in done:
            self.lost.result()  # raises why
        if getter not in done:
            raise TimeoutError(f"no {kind.name} from the AMQP server")
        value = getter.result()
        if not isinstance(value, kind):
            raise ProtocolError(f"{value.name} from the AMQP server, {kind.name} expected")
        return value


class QueueReader:
    """What an AMQP queue reader shares, whatever client it reads with: its settings,
    the events the ingest and /readyz watch, failover between the nodes (:meth:`run`),
    and which of a batch's messages one ``basic.ack(multiple=True)`` covers.
    A subclass provides ``_consume(url)`` (one connection, until lost) and ``ack``."""

    def __init__(self, amqp: AmqpSettings, *, on_message: Callable[[InboundMessage], None],
                 prefetch: int, queue: str, bindings: tuple[str, ...], label: str) -> None:
        self._amqp = amqp
        self._on_message = on_message
        self._prefetch = prefetch
        self._queue_name = queue
        self._bindings = bindings
        self._label = label
        self.generation = 0  # one a connection: a delivery tag means nothing on the next
        self.connected = asyncio.Event()
        self.subscribed = asyncio.Event()
        self._closed = asyncio.Event()
        self._went = False  # subscribed since run_with_failover last asked

    async def _consume(self, url: str) -> None:
        raise NotImplementedError

    def _now_subscribed(self, url: str) -> None:
        """The consumer is registered on ``url``'s node: say so and count it."""
        self.connected.set()
        # "ingest subscribed": tests and benchmarks wait for this line, as for MQTT.
        log.info("%s subscribed (AMQP queue %s on %s)", self._label, self._queue_name,
                 urlsplit(url).netloc)
        self.subscribed.set()
        self._went = True

    async def run(self) -> None:
        """Consume, fail over between the nodes, reconnect with backoff; until cancelled."""
        await run_with_failover(self._amqp, self._label, self._consume, self._worked)

    def _worked(self) -> bool:
        went, self._went = self._went, False
        return went

    def _to_ack(self, messages: list[InboundMessage]) -> tuple[int, int]:
        """How many of a batch's messages came from this connection (not over HTTP,
        not from one lost since), and the highest delivery tag among them (-1: none)."""
        gen = self.generation
        top = -1
        n = 0
        for m in messages:
            if m.generation == gen and m.http is None:
                n += 1
                if m.mid > top:
                    top = m.mid
        return n, top

    def pause_reading(self) -> None:
        """Nothing to do: the channel's prefetch bounds what arrives unacknowledged."""

    def resume_reading(self) -> None:
        """Nothing to do (see :meth:`pause_reading`)."""

    def close(self) -> None:
        self._closed.set()


class AmqpConsumer(QueueReader):
    """Consumes a quorum queue on the first node that answers; acks on demand.

    The :class:`mdm_server.ingest.reader.MessageReader` contract, with deliveries
    parsed on the event loop as they arrive.
    """

    def __init__(self, amqp: AmqpSettings, *, on_message: Callable[[InboundMessage], None],
                 prefetch: int = 10_000, queue: str = INGEST_QUEUE,
                 bindings: tuple[str, ...] = INGEST_BINDINGS,
                 label: str = "ingest", heartbeat_s: int = 60, frame_max: int = 131_072,
                 timeout_s: float = 10.0) -> None:
        super().__init__(amqp, on_message=on_message, prefetch=prefetch, queue=queue,
                         bindings=bindings, label=label)
        self._heartbeat = heartbeat_s
        self._frame_max = frame_max
        self._timeout = timeout_s
        #: What the last connection agreed with the server: (frame_max, heartbeat s).
        self.negotiated: tuple[int, int] = (0, 0)
        self._conn: _Connection | None = None
        self._topics: dict[bytes, str] = {}

    def _deliver(self, tag: int, key: bytes, body: bytes) -> None:
        topic = self._topics.get(key)
        if topic is None:
            if len(self._topics) >= _TOPICS_CACHED:
                self._topics.clear()
            try:
                topic = routing_key_topic(key.decode())
            except UnicodeDecodeError:  # the broker should refuse these; dead-letter if not
                topic = "<topic is not UTF-8>"
            self._topics[key] = topic
        self._on_message(InboundMessage(tag, self.generation, topic, body))

    def _negotiate(self, ours: int, theirs: int) -> int:
        """The smaller of two limits, 0 meaning none."""
        if ours == 0 or theirs == 0:
            return ours or theirs
        return min(ours, theirs)

    async def _open(self, url: str) -> _Connection:
        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        tls = parts.scheme == "amqps"
        port = parts.port or (5671 if tls else 5672)
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(loop.create_connection(
            lambda: _Connection(self._deliver, self._label), host, port,
            ssl=ssl_context(self._amqp) if tls else None,
            server_hostname=host if tls else None), self._timeout)
        self._conn = conn
        assert conn.transport is not None
        conn.transport.write(_PROTOCOL_HEADER)
        t = self._timeout
        start = await conn.expect(spec.Connection.Start, t)
        assert isinstance(start, spec.Connection.Start)
        if b"PLAIN" not in (start.mechanisms or "").encode().split():
            raise ProtocolError("the AMQP server does not offer PLAIN")
        conn.write(spec.Connection.StartOk(
            client_properties={"product": "mdm-server", "platform": "Python asyncio",
                               "connection_name": f"mdm-{self._label}",
                               "capabilities": {"consumer_cancel_notify": True,
                                                "connection.blocked": False}},
            mechanism="PLAIN", response=f"\0{self._amqp.username}\0{self._amqp.password}"), 0)
        tune = await conn.expect(spec.Connection.Tune, t)
        assert isinstance(tune, spec.Connection.Tune)
        frame_max = self._negotiate(self._frame_max, tune.frame_max)
        heartbeat = self._negotiate(self._heartbeat, tune.heartbeat)
        if frame_max and frame_max < _FRAME_MIN:
            raise ProtocolError("the AMQP server's frame_max is below the protocol's minimum")
        conn.write(spec.Connection.TuneOk(channel_max=_CHANNEL, frame_max=frame_max,
                                          heartbeat=heartbeat), 0)
        self.negotiated = (frame_max, heartbeat)
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        conn.write(spec.Connection.Open(virtual_host=vhost), 0)
        await conn.expect(spec.Connection.OpenOk, t)
        conn.write(spec.Channel.Open())
        await conn.expect(spec.Channel.OpenOk, t)
        conn.write(spec.Basic.Qos(prefetch_count=self._prefetch))
        await conn.expect(spec.Basic.QosOk, t)
        conn.write(spec.Queue.Declare(queue=self._queue_name, durable=True,
                                      arguments={"x-queue-type": "quorum"}))
        await conn.expect(spec.Queue.DeclareOk, t)
        for key in self._bindings:
            conn.write(spec.Queue.Bind(queue=self._queue_name, exchange=EXCHANGE,
                                       routing_key=key))
            await conn.expect(spec.Queue.BindOk, t)
        return conn

    async def _consume(self, url: str) -> None:
        """One connection to one node, until it is lost (raises) or cancelled."""
        try:
            conn = await self._open(url)
            self.generation += 1  # deliveries may follow ConsumeOk in the same read
            conn.write(spec.Basic.Consume(queue=self._queue_name,
                                          consumer_tag=f"mdm-{self._label}"))
            await conn.expect(spec.Basic.ConsumeOk, self._timeout)
            self._closed.clear()
            self._now_subscribed(url)
            await self._watch(conn)
        finally:
            self.connected.clear()
            opened, self._conn = self._conn, None  # set as soon as the socket was
            if opened is not None:
                self._hang_up(opened)

    async def _watch(self, conn: _Connection) -> None:
        """Send heartbeats, notice a silent server; until the connection is lost."""
        interval = self.negotiated[1]
        closed = asyncio.ensure_future(self._closed.wait())
        waits: set[asyncio.Future[Any]] = {conn.lost, closed}
        try:
            while True:
                done, _ = await asyncio.wait(waits,
                                             timeout=interval or None,
                                             return_when=asyncio.FIRST_COMPLETED)
                if conn.lost in done:
                    conn.lost.result()  # raises why
                if closed in done:
                    raise ConnectionError("the AMQP reader was closed")
                if conn.transport is not None:
                    conn.transport.write(_HEARTBEAT_FRAME)
                if asyncio.get_running_loop().time() - conn.last_read > 2 * interval:
                    conn.fail(HeartbeatTimeout("the AMQP server sent nothing for two "
                                               "heartbeat intervals"))
        finally:
            closed.cancel()

    def _hang_up(self, conn: _Connection) -> None:
        """Close politely (Connection.Close, then the socket), without waiting."""
        transport = conn.transport
        if transport is not None and not transport.is_closing():
            conn.write(spec.Connection.Close(reply_code=200, reply_text="bye",
                                             class_id=0, method_id=0), 0)
            transport.close()
        if not conn.lost.done():
            conn.lost.cancel()
        elif not conn.lost.cancelled():
            conn.lost.exception()  # retrieved: asyncio logs no "never retrieved"

    def ack(self, messages: list[InboundMessage]) -> int:
        """Acknowledge a batch (messages of the current connection) with one
        ``basic.ack(multiple=True)`` on its highest delivery tag; how many."""
        conn = self._conn
        if conn is None or conn.transport is None or conn.transport.is_closing() \
                or not self.connected.is_set():
            return 0
        n, top = self._to_ack(messages)
        if n:
            conn.transport.write(_ACK.pack(_METHOD, _CHANNEL, 13, 60, 80, top, 1, _FRAME_END))
        return n
