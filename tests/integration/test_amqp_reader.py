"""The ingest's own AMQP reader (mdm_server/ingest/amqp.py) against a real
RabbitMQ node: deliveries in order with their tags, a body larger than
``frame_max`` arriving whole, acks with ``multiple=True`` emptying the queue, a
connection closed by the server (through the management API) followed by a
reconnection and the redelivery of what was not acknowledged, the heartbeat and
frame size agreed with the server as the server reports them, and an ``amqps://``
node (a TLS front to the node) trusted through MDM_AMQP_CA_FILE and nothing else.

serve runs as the node's broker hook (and, as ever, consumes ``mdm-ingest``); each
test reads a queue of its own (``mdm-test-...``, a name the server's user may
declare) bound to one device's telemetry key. The device publishes over AMQP
(aio-pika, the device's own login): the server's user may publish commands only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from mdm_server.broker.hook_config import AmqpSettings, amqp_settings
from mdm_server.ingest.amqp import AmqpConsumer
from mdm_server.ingest.mqtt import InboundMessage
from tests.support.cluster import Cluster, rabbitmq_missing, running_cluster
from tests.support.services import Server, device_credentials, free_port, served

_missing = rabbitmq_missing()
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(_missing is not None, reason=_missing or "")]

TENANT = "t" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    hook = f"127.0.0.1:{free_port()}"
    with running_cluster(tmp_path_factory.mktemp("rabbit"), hook, nodes=1) as c:
        yield c


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cluster: Cluster) -> Iterator[Server]:
    tmp: Path = tmp_path_factory.mktemp("serve")
    with served(tmp, tenants=(TENANT,), **cluster.server_env()) as srv:
        srv.wait_log("broker hook listening")
        for d in ("d1", "d2", "d3", "d4"):
            srv.cli("device", "enroll", "--tenant", TENANT, "--device", d,
                    "--ownership", "corporate")
        yield srv


def _settings(cluster: Cluster) -> AmqpSettings:
    amqp = amqp_settings(cluster.server_env())
    assert amqp is not None
    return amqp


def _management(cluster: Cluster, path: str, method: str = "GET") -> Any:
    req = urllib.request.Request(f"{cluster.management_url.split(',')[0]}/api/{path}",
                                 method=method)
    token = base64.b64encode(f"mdm-server:{cluster.server_password}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        body = resp.read()
    return json.loads(body) if body else None


async def _publish(cluster: Cluster, device: str, bodies: list[bytes]) -> str:
    """Publish ``bodies`` as ``device`` over AMQP to its telemetry key (publisher
    confirms: each is in the queues when this returns); the key."""
    user, password = device_credentials(TENANT, device)
    node = urllib.parse.urlsplit(cluster.amqp_url.split(",")[0])
    conn = await aio_pika.connect(host=node.hostname, port=node.port, login=user,
                                  password=password)
    key = f"mdm.v1.{TENANT}.devices.{device}.telemetry.location"
    try:
        channel = await conn.channel()
        exchange = await channel.get_exchange("amq.topic", ensure=False)
        for body in bodies:
            await exchange.publish(aio_pika.Message(
                body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=key)
    finally:
        await conn.close()
    return key


class Reader:
    """A AmqpConsumer on a queue of its own, bound to one device's telemetry,
    running in the test's event loop; what it received, in order."""

    def __init__(self, cluster: Cluster, device: str, **kwargs: Any) -> None:
        self.queue = f"mdm-test-{uuid.uuid4().hex[:8]}"
        self.label = f"test-{uuid.uuid4().hex[:6]}"
        self.received: list[InboundMessage] = []
        self.arrived = asyncio.Event()
        self.consumer = AmqpConsumer(
            _settings(cluster), on_message=self._on_message, queue=self.queue,
            bindings=(f"mdm.v1.{TENANT}.devices.{device}.telemetry.*",), label=self.label,
            **kwargs)
        self.task: asyncio.Task[None] | None = None

    def _on_message(self, msg: InboundMessage) -> None:
        self.received.append(msg)
        self.arrived.set()

    async def start(self) -> None:
        self.task = asyncio.create_task(self.consumer.run())
        await asyncio.wait_for(self.consumer.subscribed.wait(), 30)

    async def wait_for(self, n: int, timeout: float = 30) -> None:
        async def enough() -> None:
            while len(self.received) < n:
                self.arrived.clear()
                await self.arrived.wait()
        await asyncio.wait_for(enough(), timeout)

    async def stop(self, cluster: Cluster) -> None:
        assert self.task is not None
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        _management(cluster, f"queues/%2F/{self.queue}", method="DELETE")


async def _queue_empty(cluster: Cluster, name: str, timeout: float = 20) -> dict[str, Any]:
    """The queue once the management API shows nothing ready or unacknowledged in
    it (its statistics lag by up to 5 s)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        q: dict[str, Any] = _management(cluster, f"queues/%2F/{name}")
        if q.get("messages", 1) == 0 and q.get("messages_unacknowledged", 1) == 0:
            return q
        assert asyncio.get_running_loop().time() < deadline, q
        await asyncio.sleep(0.5)


async def _connection(cluster: Cluster, label: str, timeout: float = 30) -> dict[str, Any]:
    """The reader's connection as the management API lists it (by the name it gives
    itself); listed once the statistics were collected (every 5 s)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        for c in _management(cluster, "connections"):
            if c.get("client_properties", {}).get("connection_name") == f"mdm-{label}":
                return dict(c)
        assert asyncio.get_running_loop().time() < deadline, "connection never listed"
        await asyncio.sleep(0.5)


def test_deliveries_arrive_in_order_whole_and_are_acked_together(
        server: Server, cluster: Cluster) -> None:
    """300 messages and, among them, bodies of 300 KB and 1 MB (frame_max here is
    4,096 bytes: 74 and 257 body frames): every one arrives, in the order
    published, whole, with tags 1..N; one ack (multiple=True) on the highest tag
    leaves the queue empty."""
    big = bytes(range(256)) * 1200  # 307,200 bytes
    huge = uuid.uuid4().bytes * 65536  # 1 MiB
    bodies = [f"m{i}".encode() for i in range(300)]
    bodies[100:100] = [big]
    bodies[200:200] = [b""]
    bodies.append(huge)

    async def go() -> None:
        reader = Reader(cluster, "d1", frame_max=4096)
        await reader.start()
        try:
            assert reader.consumer.negotiated[0] == 4096
            key = await _publish(cluster, "d1", bodies)
            await reader.wait_for(len(bodies))
            await asyncio.sleep(0.5)  # nothing more comes
            got = reader.received
            assert [m.payload for m in got] == bodies
            assert [m.mid for m in got] == list(range(1, len(bodies) + 1))
            assert {m.topic for m in got} == {key.replace(".", "/")}
            assert {m.generation for m in got} == {1}
            # Nothing acknowledged yet: all of them wait in the queue.
            unacked = await _unacked(cluster, reader.queue, len(bodies))
            assert unacked == len(bodies)
            assert reader.consumer.ack(got) == len(bodies)
            q = await _queue_empty(cluster, reader.queue)
            assert q["type"] == "quorum" and q["durable"] is True
        finally:
            await reader.stop(cluster)

    asyncio.run(go())


async def _unacked(cluster: Cluster, name: str, n: int, timeout: float = 20) -> int:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        q = _management(cluster, f"queues/%2F/{name}")
        if q.get("messages_unacknowledged") == n or \
                asyncio.get_running_loop().time() > deadline:
            return int(q.get("messages_unacknowledged", -1))
        await asyncio.sleep(0.5)


def test_a_connection_closed_by_the_server_is_reopened_and_unacked_redelivered(
        server: Server, cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    """50 messages received, the first 20 acknowledged; the management API closes
    the reader's connection (as the broker does on a refusal): the reader
    reconnects, the 30 others come again (redelivered, a new generation), an ack
    of the old generation is not sent, and one of the new empties the queue. The
    heartbeat and frame size are the ones agreed, as the server reports them."""
    import logging

    caplog.set_level(logging.WARNING, logger="mdm_server")
    bodies = [f"r{i}".encode() for i in range(50)]

    async def go() -> None:
        reader = Reader(cluster, "d2", heartbeat_s=5, frame_max=65536)
        await reader.start()
        try:
            assert reader.consumer.negotiated == (65536, 5)
            await _publish(cluster, "d2", bodies)
            await reader.wait_for(50)
            first = list(reader.received)
            assert reader.consumer.ack(first[:20]) == 20
            conn = await _connection(cluster, reader.label)
            assert conn["timeout"] == 5 and conn["frame_max"] == 65536, conn
            reader.consumer.subscribed.clear()
            _management(cluster, "connections/" + urllib.parse.quote(conn["name"], safe=""),
                        method="DELETE")
            await asyncio.wait_for(reader.consumer.subscribed.wait(), 30)
            # Connection.Close from the server (320 CONNECTION_FORCED), answered.
            assert f"{reader.label}: the AMQP server closed the connection: 320" \
                in caplog.text
            await reader.wait_for(80)
            again = reader.received[50:]
            assert [m.payload for m in again] == bodies[20:]
            assert {m.generation for m in again} == {2}
            assert reader.consumer.ack(first) == 0  # the old connection's: not sent
            await asyncio.sleep(1.0)
            assert await _unacked(cluster, reader.queue, 30) == 30
            assert reader.consumer.ack(again) == 30
            await _queue_empty(cluster, reader.queue)
        finally:
            await reader.stop(cluster)

    asyncio.run(go())


def _node_pid(cluster: Cluster) -> int:
    """The OS pid of this cluster's one node (its Erlang VM, by the HOME
    scripts/cluster gave it)."""
    import psutil

    home = str(cluster.dir / "home")
    for proc in psutil.process_iter(["name"]):
        try:
            if (proc.info["name"] or "").startswith("beam") and \
                    proc.environ().get("HOME") == home:
                return int(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no beam.smp process of the cluster in {cluster.dir}")


def test_heartbeats_keep_an_idle_connection_and_a_silent_server_is_left(
        server: Server, cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    """A 1 s heartbeat: an idle reader keeps its connection (its heartbeats reach
    the server, which would otherwise close it after two intervals); the node
    frozen (SIGSTOP: its sockets stay open, it sends nothing) is noticed by the
    heartbeat alone and the connection dropped; the node thawed, the reader
    subscribes again and reads what is published."""
    import logging
    import os
    import signal

    caplog.set_level(logging.WARNING, logger="mdm_server.broker.amqp")

    async def go() -> None:
        reader = Reader(cluster, "d3", heartbeat_s=1, timeout_s=3)
        await reader.start()
        pid = _node_pid(cluster)
        try:
            assert reader.consumer.negotiated[1] == 1
            await asyncio.sleep(5)  # idle for five intervals
            assert reader.consumer.connected.is_set() and reader.consumer.generation == 1
            reader.consumer.subscribed.clear()
            os.kill(pid, signal.SIGSTOP)
            try:
                async def lost() -> None:
                    while reader.consumer.connected.is_set():
                        await asyncio.sleep(0.1)
                await asyncio.wait_for(lost(), 30)
            finally:
                os.kill(pid, signal.SIGCONT)
            # Noticed by the heartbeat (run_with_failover logs the error's type).
            assert "lost or unreachable (HeartbeatTimeout)" in caplog.text
            await asyncio.wait_for(reader.consumer.subscribed.wait(), 90)
            assert reader.consumer.generation >= 2
            await _publish(cluster, "d3", [b"after"])
            await reader.wait_for(1)
            assert [m.payload for m in reader.received] == [b"after"]
            assert reader.received[0].generation == reader.consumer.generation
            assert reader.consumer.ack(reader.received) == 1
            await _queue_empty(cluster, reader.queue)
        finally:
            await reader.stop(cluster)

    asyncio.run(go())


async def _tls_front(node: str, directory: Path) -> tuple[asyncio.AbstractServer, int, Path]:
    """A TLS listener on 127.0.0.1 (a certificate of a CA made here, with
    mdm_server.broker.certs, as scripts/broker makes Mosquitto's) that carries each
    connection to the node's plain AMQP port: the node as an ``amqps://`` node is
    reached. Returns the server, its port and the CA file."""
    import ssl

    from mdm_server.broker.certs import ensure

    ensure(directory)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(directory / "server.crt", directory / "server.key")
    target = urllib.parse.urlsplit(node)

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            w.close()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection(target.hostname, target.port)
        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    return server, port, directory / "ca.crt"


def test_an_amqps_node_is_trusted_by_its_ca_file_and_by_nothing_else(
        server: Server, cluster: Cluster, tmp_path: Path) -> None:
    """``amqps://`` with MDM_AMQP_CA_FILE: the reader subscribes through TLS and
    receives; without the CA (the system's trusted CAs only) the node's certificate
    is refused and nothing is ever subscribed."""
    import dataclasses

    async def go() -> None:
        front, port, ca = await _tls_front(cluster.amqp_url.split(",")[0],
                                           tmp_path / "tls")
        try:
            base = _settings(cluster)
            url = f"amqps://127.0.0.1:{port}"
            untrusted = Reader(cluster, "d4")
            untrusted.consumer = AmqpConsumer(
                dataclasses.replace(base, urls=(url,), ca_file=None),
                on_message=untrusted._on_message, queue=untrusted.queue,
                bindings=("mdm.v1.nobody.devices.nobody.telemetry.*",),
                label=untrusted.label)
            untrusted.task = asyncio.create_task(untrusted.consumer.run())
            reader = Reader(cluster, "d4")
            reader.consumer = AmqpConsumer(
                dataclasses.replace(base, urls=(url,), ca_file=ca),
                on_message=reader._on_message, queue=reader.queue,
                bindings=(f"mdm.v1.{TENANT}.devices.d4.telemetry.*",), label=reader.label)
            await reader.start()
            try:
                await _publish(cluster, "d4", [b"over tls"])
                await reader.wait_for(1)
                assert [m.payload for m in reader.received] == [b"over tls"]
                # Meanwhile the reader without the CA never got in (it kept trying).
                await asyncio.sleep(1.0)
                assert not untrusted.consumer.subscribed.is_set()
                assert not untrusted.task.done()
            finally:
                if untrusted.task is not None:
                    untrusted.task.cancel()
                await reader.stop(cluster)
        finally:
            front.close()

    asyncio.run(go())
