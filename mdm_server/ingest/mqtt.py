"""paho-mqtt driven by the asyncio event loop, with manual acks.

Why not paho's own network thread: messages, acks and database commits then all
live on one thread, so there is no bridge between a callback thread and asyncio
to bound (an unbounded queue grows; a bounded one that drops after acking loses
data), and ``ack`` is never called concurrently with paho's reader.

Why the subclass: paho reads every packet with three or more ``recv`` calls (one
byte of type, the length bytes one by one, then the body) and ``loop_read`` reads
one packet per call. ``_BufferedClient`` serves those small reads from one large
``recv``, and parses whole QoS 1 PUBLISH packets itself (see the class). Over TLS
(``mqtts://``) the socket is paho's ``ssl.SSLSocket``, whose ``recv`` returns one
TLS record at most, and Mosquitto sends one record per packet: the reader takes
every whole record already there (up to the same 256 KiB) in one go, and bytes
already decrypted (``pending()``) count as buffered, since the file descriptor's
readiness does not show them. It
overrides private methods, so pyproject.toml pins paho-mqtt below the next minor
release and tests/integration/test_mqtt_reader.py exercises it against a real
broker with packets of every size.

Flow control: the broker sends at most ``max_inflight_messages`` unacknowledged
QoS 1 messages (deploy/mosquitto), and :meth:`MqttConsumer.pause_reading` stops
reading the socket altogether, so a stalled database stops intake instead of
growing memory.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from mdm_server.config import MqttSettings
from mdm_server.ingest.limits import DeviceBucket
from mdm_server.mqtt_client import configure

if TYPE_CHECKING:
    from mdm_server.agents.events import HttpSubmission

__all__ = ["InboundMessage", "MqttConsumer"]

log = logging.getLogger(__name__)

_RECV_CHUNK = 256 * 1024
_TLS_RECORD = 16 * 1024  # the most plaintext one TLS record holds
_FAST_PACKETS = 64  # PUBLISH packets parsed per call of _packet_read, at most


@dataclass(slots=True)
class InboundMessage:
    mid: int
    generation: int
    topic: str
    payload: bytes
    # Set by a consumer's rate limit (ingest/limits.py): the bucket of the device
    # that was over its limit; such a message is acknowledged but not decoded.
    limited: DeviceBucket | None = None
    # An HTTP post of a foreign agent (mdm_server/agents/events.py), answered after
    # the commit; such a message has no broker to be acknowledged to.
    http: HttpSubmission | None = None


class _BufferedClient(paho.Client):
    """paho Client whose socket reads are served from one large ``recv``, with a
    fast path for whole QoS 1 PUBLISH packets (the ingest's every message).

    The fast path parses the MQTT 3.1.1 PUBLISH layout directly (topic length,
    topic, packet id, payload) and hands (mid, topic, payload) to ``fast_publish``,
    skipping paho's message object, its topic matcher and its debug logging,
    which the profile showed to cost more than our whole decode. Everything else
    (CONNACK, SUBACK, PINGRESP, a packet split across reads) goes through paho.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        self.fast_publish: Callable[[int, bytes, bytes], None] | None = None

    def buffered(self) -> bool:
        """Bytes are waiting that the socket's readiness would not announce: ours,
        or (over TLS) decrypted ones held by the SSL object."""
        if self._rpos < len(self._rbuf):
            return True
        sock = self._sock
        return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0

    def reset_buffer(self) -> None:
        self._rbuf = b""
        self._rpos = 0

    def _tls_recv(self, sock: ssl.SSLSocket) -> bytes:
        """Up to _RECV_CHUNK bytes from TLS records already on the socket. One
        ``recv`` returns one record at most, and Mosquitto writes a record per MQTT
        packet: reading one per call sent every message round the event loop and
        through paho alone (the drain ran at half speed). BlockingIOError if not
        even one whole record is there yet."""
        parts: list[bytes] = []
        size = 0
        while size < _RECV_CHUNK:
            try:
                part = sock.recv(_TLS_RECORD)
            except ssl.SSLWantReadError:  # no whole record (more) yet
                if parts:
                    break
                raise BlockingIOError from None
            except ssl.SSLWantWriteError:  # the session must write first
                self._call_socket_register_write()
                if parts:
                    break
                raise BlockingIOError from None
            if not part:  # end of stream: what came before it first, then b""
                break
            parts.append(part)
            size += len(part)
        return b"".join(parts)

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            sock = self._sock
            if sock is None:
                raise ConnectionError("socket is closed")
            if isinstance(sock, ssl.SSLSocket):
                data = self._tls_recv(sock)
            else:
                data = sock.recv(_RECV_CHUNK)  # BlockingIOError when empty
            if len(data) <= bufsize:
                return data  # includes b"" at end of stream
            self._rbuf = data
            self._rpos = 0
        end = min(self._rpos + bufsize, len(self._rbuf))
        out = self._rbuf[self._rpos:end]
        self._rpos = end
        return out

    def queue_pubacks(self, mids: list[int]) -> None:
        """Queue the PUBACKs of many messages as one write (paho's ``ack`` makes a
        packet and a ``send`` per message). A PUBACK is 0x40 0x02 and the 16-bit
        packet id: as a big-endian 32-bit integer, 0x40020000 | mid."""
        blob = struct.pack(f">{len(mids)}I", *[0x40020000 | mid for mid in mids])
        self._packet_queue(paho.PUBACK, blob, 0, 0)

    def _packet_read(self) -> MQTTErrorCode:
        deliver = self.fast_publish
        if deliver is None or self._in_packet["command"] != 0:
            return super()._packet_read()  # paho is in the middle of a packet
        buf, pos = self._rbuf, self._rpos
        start, end = pos, len(buf)
        # Up to _FAST_PACKETS whole QoS 1 PUBLISH packets (0x32, or 0x3A with DUP;
        # RETAIN may be set) already in our buffer, per call: paho's loop_read
        # around each packet cost more than parsing it. The bound keeps
        # pause_reading prompt (the consumer checks it between calls).
        for _ in range(_FAST_PACKETS):
            if pos >= end or buf[pos] & 0xF6 != 0x32:
                break
            length, shift, i, whole = 0, 0, pos + 1, False
            while i < end and i <= pos + 4:
                byte = buf[i]
                i += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if byte < 0x80:
                    whole = i + length <= end  # else the rest is still on the wire
                    break
            if not whole:
                break  # paho's path waits for the rest (or refuses a bad length)
            if length < 4:  # topic length and packet id are 4 bytes already
                return MQTTErrorCode.MQTT_ERR_PROTOCOL
            mid_at = i + 2 + ((buf[i] << 8) | buf[i + 1])
            if mid_at + 2 > i + length:
                return MQTTErrorCode.MQTT_ERR_PROTOCOL
            pos = self._rpos = i + length
            deliver((buf[mid_at] << 8) | buf[mid_at + 1], buf[i + 2:mid_at],
                    buf[mid_at + 2:pos])
        if pos != start:
            self._last_bytes_received = time.monotonic()
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._packet_read()


class MqttConsumer:
    """A persistent-session QoS 1 subscriber on the event loop, acks on demand.

    ``on_message`` receives :class:`InboundMessage`; the caller acks with
    :meth:`ack` once the message is safe. Acks for messages of an earlier
    connection (``generation``) are dropped: the broker redelivers those, and the
    unique key in storage absorbs the repeat.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        subscriptions: list[str],
        on_message: Callable[[InboundMessage], None],
        keepalive_s: int = 30,
        label: str = "ingest",
    ) -> None:
        self._settings = settings
        self._label = label
        self._subscriptions = subscriptions
        self._deliver = on_message
        self._keepalive = keepalive_s
        self.generation = 0
        self.connected = asyncio.Event()
        self.subscribed = asyncio.Event()  # first SUBACK seen: messages are routed to us
        self._paused = False
        self._reader_fd: int | None = None
        self._writer_fd: int | None = None
        self._busy_connecting = False
        self._closing = False
        self._loop = asyncio.get_running_loop()
        c = _BufferedClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=paho.MQTTv311,
            manual_ack=True,
        )
        configure(c, settings)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write
        c.fast_publish = self._fast_publish
        self._client = c
        self._want_write = False

    # -- paho callbacks (loop thread, except during connect: see _connect) -------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any,
                    props: Any = None) -> None:
        if rc.is_failure:
            log.error("broker refused the connection: %s", rc)
            return
        self.generation += 1
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        self._loop.call_soon_threadsafe(self.connected.set)
        log.info("connected to the broker (session present: %s)", flags.session_present)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any,
                       props: Any = None) -> None:
        self.connected.clear()
        if self._closing:  # our own DISCONNECT: a normal stop
            log.info("%s disconnected from the broker", self._label)
        else:
            log.warning("disconnected from the broker: %s", rc)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, rcs: Any,
                      props: Any = None) -> None:
        if any(rc.is_failure for rc in rcs):
            log.error("the broker refused a subscription: %s", rcs)
        else:
            # "ingest subscribed": tests and benchmarks wait for this line.
            log.info("%s subscribed (%d filters)", self._label, len(rcs))
            self._loop.call_soon_threadsafe(self.subscribed.set)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # the broker should refuse these; dead-letter if not
            topic = "<topic is not UTF-8>"
        self._deliver(InboundMessage(msg.mid, self.generation, topic, bytes(msg.payload)))

    def _fast_publish(self, mid: int, topic: bytes, payload: bytes) -> None:
        try:
            name = topic.decode()
        except UnicodeDecodeError:  # the broker should refuse these; dead-letter if not
            name = "<topic is not UTF-8>"
        self._deliver(InboundMessage(mid, self.generation, name, payload))

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._loop.call_soon_threadsafe(self._watch_read, sock.fileno())

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        fd = sock.fileno()
        if self._busy_connecting:
            self._loop.call_soon_threadsafe(self._unwatch, fd)
        else:  # on the loop thread: unwatch now, before the fd number can be reused
            self._unwatch(fd)

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._want_write = True  # flushed once per batch of acks, see flush()

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        pass

    # -- socket plumbing ------------------------------------------------------

    def _watch_read(self, fd: int) -> None:
        self._reader_fd = fd
        if not self._paused:
            self._loop.add_reader(fd, self._readable)
        self.flush()

    def _unwatch(self, fd: int) -> None:
        if self._reader_fd == fd:
            self._loop.remove_reader(fd)
            self._reader_fd = None
        if self._writer_fd == fd:
            self._loop.remove_writer(fd)
            self._writer_fd = None
        self._client.reset_buffer()

    def _readable(self) -> None:
        c = self._client
        while True:
            rc = c.loop_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._paused or not c.buffered():
                break
        self.flush()

    def _writable(self) -> None:
        self.flush()

    def flush(self) -> None:
        """Write queued packets (acks, pings); wait for the socket if it is full."""
        c = self._client
        if self._busy_connecting or c.socket() is None:
            return
        if self._want_write or c.want_write():
            self._want_write = False
            c.loop_write()
        sock = c.socket()
        if sock is None:
            return
        fd = sock.fileno()
        if c.want_write():
            if self._writer_fd is None:
                self._writer_fd = fd
                self._loop.add_writer(fd, self._writable)
        elif self._writer_fd is not None:
            self._loop.remove_writer(self._writer_fd)
            self._writer_fd = None

    # -- public ---------------------------------------------------------------

    def ack(self, messages: list[InboundMessage]) -> int:
        """Acknowledge messages of the current connection; return how many were sent."""
        if self._busy_connecting or not self.connected.is_set():
            return 0
        gen = self.generation
        mids = [m.mid for m in messages if m.generation == gen]
        if mids:
            self._client.queue_pubacks(mids)
            self.flush()
        return len(mids)

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            if self._reader_fd is not None:
                self._loop.remove_reader(self._reader_fd)

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            if self._reader_fd is not None:
                self._loop.add_reader(self._reader_fd, self._readable)
                if self._client.buffered():
                    self._loop.call_soon(self._readable)

    async def _connect(self) -> None:
        # The TCP connect blocks, so it runs in a thread; the loop leaves the
        # client alone meanwhile (_busy_connecting), and paho's socket callbacks
        # hop back to the loop with call_soon_threadsafe.
        self._busy_connecting = True
        try:
            await self._loop.run_in_executor(
                None, self._client.connect, self._settings.host, self._settings.port,
                self._keepalive,
            )
        finally:
            self._busy_connecting = False
        self.flush()

    async def run(self) -> None:
        """Connect, keep the connection alive, reconnect with backoff; until cancelled."""
        backoff = 0.2
        try:
            while True:
                if self._client.socket() is None:
                    try:
                        await self._connect()
                        backoff = 0.2
                    except OSError as exc:
                        log.warning("broker unreachable (%s); retrying in %.1fs",
                                    type(exc).__name__, backoff)
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, 5.0)
                        continue
                self._client.loop_misc()  # keepalive pings, timeouts
                self.flush()
                await asyncio.sleep(1.0)
        finally:
            self.close()

    def close(self) -> None:
        c = self._client
        sock = c.socket()
        if sock is not None:
            fd = sock.fileno()
            self._closing = True
            c.disconnect()
            self.flush()  # writes DISCONNECT; paho then closes the socket
            self._unwatch(fd)
