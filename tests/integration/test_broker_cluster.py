"""Devices on a private RabbitMQ cluster that asks serve's broker hook.

scripts/cluster starts the nodes (their auth backends: cache -> http, asking the
hook at MDM_BROKER_HOOK_ADDR); `mdm-server serve` runs the hook (and, as ever,
its Mosquitto side), with devices enrolled through its CLI. Devices speak MQTT
3.1.1 to a node's MQTT listener with their enrollment's username and derived
password. What a device may do is judged by what arrives at a subscriber logged
in as the server's user (an MQTT subscription: a queue bound to ``amq.topic``),
and by the device's own connection (RabbitMQ closes a connection on an ACL
denial), never by a PUBACK.

Skipped, with the reason, where RabbitMQ is not installed (scripts/test installs
it). One node for most tests; the three-node test forms a real cluster (about
35-45 s here).
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.cluster import Cluster, rabbitmq_missing, running_cluster
from tests.support.mqtt import publish_all
from tests.support.services import (
    IngestProcess,
    Server,
    device_credentials,
    fetchval,
    free_port,
    served,
    wait_for_count,
)
from tests.support.telemetry import location

_missing = rabbitmq_missing()
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(_missing is not None, reason=_missing or "")]

OBSERVED = "mdm/v1/+/devices/+/#"


@dataclass
class Client:
    """A paho client on a RabbitMQ node, recording what happens to it."""

    client: paho.Client
    connack: list[str] = field(default_factory=list)
    received: list[tuple[str, bytes]] = field(default_factory=list)
    suback: list[list[int]] = field(default_factory=list)
    connected: threading.Event = field(default_factory=threading.Event)
    answered: threading.Event = field(default_factory=threading.Event)
    closed: threading.Event = field(default_factory=threading.Event)
    subscribed: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def topics(self) -> list[str]:
        with self.lock:
            return [t for t, _ in self.received]

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [p for _, p in self.received]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect(host: str, port: int, username: str, password: str, *,
            client_id: str | None = None, timeout: float = 20.0,
            clean_session: bool = True) -> Client:
    """Connect and wait for the CONNACK (or the connection's end): see
    ``c.connected`` and ``c.connack``."""
    pc = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                     client_id=client_id if client_id is not None else username,
                     protocol=paho.MQTTv311, clean_session=clean_session)
    pc.username_pw_set(username, password)
    pc.reconnect_delay_set(60, 60)  # no quick reconnection: a closed connection stays so
    c = Client(pc)

    def on_connect(client: paho.Client, userdata: object, flags: object, rc: object,
                   props: object) -> None:
        c.connack.append(str(rc))
        if not getattr(rc, "is_failure", False):
            c.connected.set()
        c.answered.set()

    def on_disconnect(client: paho.Client, userdata: object, flags: object, rc: object,
                      props: object) -> None:
        c.closed.set()
        c.answered.set()

    def on_message(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        with c.lock:
            c.received.append((msg.topic, msg.payload))

    def on_subscribe(client: paho.Client, userdata: object, mid: int, codes: list[object],
                     props: object) -> None:
        c.suback.append([int(getattr(x, "value", x)) for x in codes])  # type: ignore[call-overload]
        c.subscribed.set()

    pc.on_connect = on_connect
    pc.on_disconnect = on_disconnect
    pc.on_message = on_message
    pc.on_subscribe = on_subscribe
    try:
        pc.connect(host, port, keepalive=30)
    except OSError:
        c.closed.set()
        return c
    pc.loop_start()
    c.answered.wait(timeout)
    return c


def wait_until(pred: object, timeout: float) -> bool:
    assert callable(pred)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return bool(pred())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    hook = f"127.0.0.1:{free_port()}"
    with running_cluster(tmp_path_factory.mktemp("rabbit"), hook, nodes=1) as c:
        yield c


def enroll(srv: Server, tenant: str, *devices: str) -> None:
    for d in devices:
        srv.cli("device", "enroll", "--tenant", tenant, "--device", d,
                "--ownership", "corporate")


@pytest.fixture
def server(tmp_path: Path, cluster: Cluster) -> Iterator[Server]:
    """serve with the hook on the cluster's MDM_BROKER_HOOK_ADDR (and a fresh
    database, its own Mosquitto as ever); a tenant of its own for every test, so that
    no answer a node cached for an earlier test's devices can matter."""
    tenant = "t" + uuid.uuid4().hex[:8]
    with served(tmp_path, tenants=(tenant,), **cluster.server_env()) as srv:
        srv.env["TEST_TENANT"] = tenant
        srv.wait_log("broker hook listening")
        yield srv


def observer(cluster: Cluster, node: int = 1) -> Client:
    """The server's user, subscribed to every device topic (its queue bound to
    amq.topic), as the ingest will be."""
    host, port = cluster.mqtt(node)
    obs = connect(host, port, "mdm-server", cluster.server_password,
                  client_id=f"mdm-observer-{uuid.uuid4().hex[:6]}")
    assert obs.connected.is_set(), obs.connack
    obs.client.subscribe(OBSERVED, qos=1)
    assert obs.subscribed.wait(10) and obs.suback == [[1]], obs.suback
    return obs


def test_a_device_logs_in_and_publishes_only_to_its_own_topics(server: Server,
                                                               cluster: Cluster) -> None:
    tenant = server.env["TEST_TENANT"]
    enroll(server, tenant, "d1", "d2")
    host, port = cluster.mqtt(1)
    obs = observer(cluster)
    user, password = device_credentials(tenant, "d1")
    base = f"mdm/v1/{tenant}/devices"
    try:
        # The derived password logs in; the device's own telemetry reaches amq.topic.
        d1 = connect(host, port, user, password)
        assert d1.connected.is_set(), d1.connack
        marker = uuid.uuid4().hex.encode()
        d1.client.publish(f"{base}/d1/telemetry/location", marker, qos=1)
        assert wait_until(lambda: marker in obs.payloads(), 15), obs.received
        assert f"{base}/d1/telemetry/location" in obs.topics()
        # Its commands: it may subscribe to them (literally), nothing else.
        d1.client.subscribe(f"{base}/d1/commands", qos=1)
        assert d1.subscribed.wait(10) and d1.suback == [[1]], d1.suback
        # Another device's topic: refused, and RabbitMQ closes the connection.
        forged = uuid.uuid4().hex.encode()
        d1.client.publish(f"{base}/d2/telemetry/location", forged, qos=1)
        assert d1.closed.wait(15), "the connection stayed open after a forged publish"
        d1.stop()
        # A positive control after it: d2's own message arrives, the forgery never.
        d2 = connect(host, port, *device_credentials(tenant, "d2"))
        assert d2.connected.is_set(), d2.connack
        control = uuid.uuid4().hex.encode()
        d2.client.publish(f"{base}/d2/telemetry/location", control, qos=1)
        assert wait_until(lambda: control in obs.payloads(), 15)
        time.sleep(1.0)
        assert forged not in obs.payloads()
        # A wildcard subscription to others' commands: refused too.
        d2.client.subscribe(f"{base}/+/commands", qos=1)
        assert wait_until(lambda: d2.closed.is_set() or d2.suback, 15)
        assert d2.closed.is_set() or d2.suback == [[128]], d2.suback
        d2.stop()
    finally:
        obs.stop()


def test_wrong_passwords_and_borrowed_identities_are_refused(server: Server,
                                                            cluster: Cluster) -> None:
    tenant = server.env["TEST_TENANT"]
    enroll(server, tenant, "d1", "d2")
    host, port = cluster.mqtt(1)
    user, password = device_credentials(tenant, "d1")
    for name, pw, client_id in (
        (user, password + "x", None),  # wrong password
        (user, device_credentials(tenant, "d2")[1], None),  # another device's
        (user, "", None),
        (f"{tenant}.nobody", device_credentials(tenant, "nobody")[1], None),  # not enrolled
        ("mdm-server", password, "mdm-x"),  # the server's name, a device's password
    ):
        c = connect(host, port, name, pw, client_id=client_id)
        try:
            assert not c.connected.is_set(), (name, c.connack)
        finally:
            c.stop()
    # The right password still works afterwards.
    ok = connect(host, port, user, password)
    d2 = connect(host, port, *device_credentials(tenant, "d2"))
    try:
        assert ok.connected.is_set(), ok.connack
        assert d2.connected.is_set(), d2.connack
        # d1's own password with d2's client id: it must not take d2's session over.
        thief = connect(host, port, user, password, client_id=f"{tenant}.d2")
        thief.stop()
        assert not thief.connected.is_set(), thief.connack
        time.sleep(1.0)
        assert not d2.closed.is_set(), "a borrowed client id took the device's session"
    finally:
        ok.stop()
        d2.stop()


def test_a_revoked_device_is_cut_off_within_seconds(server: Server, cluster: Cluster) -> None:
    """A device that only listens for commands asks the broker nothing more once it
    subscribed: revocation closes its connection through the management API, and
    its next log-in is refused."""
    tenant = server.env["TEST_TENANT"]
    enroll(server, tenant, "d1", "d2")
    host, port = cluster.mqtt(1)
    user, password = device_credentials(tenant, "d1")
    d1 = connect(host, port, user, password)
    d2 = connect(host, port, *device_credentials(tenant, "d2"))
    try:
        assert d1.connected.is_set() and d2.connected.is_set(), (d1.connack, d2.connack)
        d1.client.subscribe(f"mdm/v1/{tenant}/devices/d1/commands", qos=1)
        assert d1.subscribed.wait(10) and d1.suback == [[1]]
        started = time.monotonic()
        server.cli("device", "revoke", "--tenant", tenant, "--device", "d1")
        assert d1.closed.wait(15), "the revoked device stayed connected"
        elapsed = time.monotonic() - started
        print(f"revoked device cut off after {elapsed:.2f} s")
        assert not d2.closed.is_set(), "another device was cut off too"
    finally:
        d1.stop()
        d2.stop()
    # Back at once, within the node's cache of its last allowed log-in
    # (auth_cache.cache_ttl, 5 s): it may get in, but does not stay.
    back = connect(host, port, user, password)
    try:
        if back.connected.is_set():
            assert back.closed.wait(20), "the revoked device came back and stayed"
    finally:
        back.stop()
    # Its log-ins: refused once the node's cache of the last allow expired.
    deadline = time.monotonic() + 20
    while True:
        again = connect(host, port, user, password)
        again.stop()
        if not again.connected.is_set():
            break
        assert time.monotonic() < deadline, "the revoked device still logs in"
        time.sleep(0.5)
    print(f"revoked device's log-in refused after {time.monotonic() - started:.2f} s")


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    hook = f"127.0.0.1:{free_port()}"
    with running_cluster(tmp_path_factory.mktemp("rabbit3"), hook, nodes=3) as c:
        yield c


@pytest.mark.slow  # about 65 s, 38 of them forming the cluster: it runs in CI all the same
def test_three_nodes_one_cluster(tmp_path: Path, cluster3: Cluster) -> None:
    """A device logs in on each node of a 3-node cluster; what it publishes through
    one node reaches the server's subscriber on another; a wrong password is
    refused on every node."""
    tenant = "t" + uuid.uuid4().hex[:8]
    print(f"3-node cluster formed in {cluster3.env['STARTED_IN_S']} s")
    with served(tmp_path, tenants=(tenant,), **cluster3.server_env()) as srv:
        srv.wait_log("broker hook listening")
        enroll(srv, tenant, "d1")
        user, password = device_credentials(tenant, "d1")
        obs = observer(cluster3, node=3)
        try:
            for node in (1, 2, 3):
                host, port = cluster3.mqtt(node)
                bad = connect(host, port, user, password + "x")
                assert not bad.connected.is_set(), (node, bad.connack)
                bad.stop()
                dev = connect(host, port, user, password)
                assert dev.connected.is_set(), (node, dev.connack)
                marker = f"via node {node} {uuid.uuid4().hex}".encode()
                dev.client.publish(f"mdm/v1/{tenant}/devices/d1/telemetry/network", marker,
                                   qos=1)
                assert wait_until(lambda m=marker: m in obs.payloads(), 15), node
                dev.stop()
        finally:
            obs.stop()


def _queue(cluster: Cluster, name: str) -> dict[str, Any]:
    """The queue as the management API shows it (as the server's user)."""
    req = urllib.request.Request(f"{cluster.management_url.split(',')[0]}/api/queues/%2F/{name}")
    token = base64.b64encode(f"mdm-server:{cluster.server_password}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        body: dict[str, Any] = json.loads(resp.read())
        return body


def test_the_ingest_drains_the_cluster_over_amqp(server: Server, cluster: Cluster) -> None:
    """With MDM_AMQP_URL, serve's ingest consumes a quorum queue bound to amq.topic:
    what devices publish through a node's MQTT listener is stored, once, and
    acknowledged after the commit (nothing left unacknowledged in the queue)."""
    tenant = server.env["TEST_TENANT"]
    database = server.env["TEST_DATABASE"]
    devices = ("d1", "d2", "d3")
    enroll(server, tenant, *devices)
    host, port = cluster.mqtt(1)
    per_device = 1500
    for d in devices:
        user, password = device_credentials(tenant, d)
        sent = publish_all(host, port, (location(tenant, d, i) for i in range(per_device)),
                           client_id=user, username=user, password=password, timeout=120)
        assert sent == per_device
    total = per_device * len(devices)
    where = f"FROM telemetry WHERE tenant_id = '{tenant}'"
    assert wait_for_count(database, f"SELECT count(*) {where}", total, timeout=120,
                          settle=1.0) == total
    assert asyncio.run(fetchval(database, f"SELECT count(DISTINCT (device_id, record_id)) "
                                          f"{where}")) == total
    # Acknowledged after the commit: nothing waits or is unacknowledged in the queue.
    deadline = time.monotonic() + 15
    while True:
        q = _queue(cluster, "mdm-ingest")
        if q.get("messages", 1) == 0 and q.get("messages_unacknowledged", 1) == 0:
            break
        assert time.monotonic() < deadline, q
        time.sleep(0.5)
    assert q["type"] == "quorum" and q["durable"] is True
    assert "ingest subscribed (AMQP queue mdm-ingest" in server.log_text()


async def _kill_while_commit_is_held(database: str, ingest: IngestProcess) -> None:
    """Hold a lock that makes the workers' INSERT wait (their batches decoded and
    staged, not committed), and SIGKILL the ingest process once *its* write waits
    (serve's worker may be waiting too: it is not the one killed)."""
    import psutil

    assert ingest.proc is not None
    conn = await asyncpg.connect(database)
    try:
        await conn.execute("BEGIN; LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")
        deadline = time.monotonic() + 60
        while True:
            ports = {c.laddr.port
                     for c in psutil.Process(ingest.proc.pid).net_connections(kind="tcp")
                     if c.raddr}
            waiting = {r["client_port"] for r in await conn.fetch(
                "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                "WHERE NOT l.granted")}
            if ports & waiting:
                break
            assert time.monotonic() < deadline, "the ingest process never reached its commit"
            await asyncio.sleep(0.05)
        ingest.kill()
    finally:
        await conn.close()


@pytest.mark.parametrize("unsafe", [False, True], ids=["ack-after-commit",
                                                       "ack-before-commit"])
def test_sigkill_of_an_amqp_consumer_mid_stream_loses_and_doubles_nothing(
        server: Server, cluster: Cluster, tmp_path: Path, unsafe: bool) -> None:
    """Two competing consumers of the ingest queue (serve's worker and an `mdm-server
    ingest` process); the second is SIGKILLed twice while devices publish through a
    node, once while its batch waits for its commit. What it had not acknowledged
    is delivered again: every record stored, none twice. With the test-only switch
    that acknowledges before the commit, the held batch is lost: the test sees it."""
    tenant = server.env["TEST_TENANT"]
    database = server.env["TEST_DATABASE"]
    devices = [f"d{i}" for i in range(10)]
    enroll(server, tenant, *devices)
    n = 30_000
    host, port = cluster.mqtt(1)
    errors: list[BaseException] = []

    def stream() -> None:
        try:
            for k, d in enumerate(devices):
                user, password = device_credentials(tenant, d)
                publish_all(host, port, (location(tenant, d, i)
                                         for i in range(k, n, len(devices))),
                            client_id=user, username=user, password=password, timeout=240)
        except BaseException as exc:
            errors.append(exc)

    env = {**server.env, **({"MDM_TEST_UNSAFE_ACK_BEFORE_COMMIT": "1"} if unsafe else {})}
    ingest = IngestProcess(env, tmp_path / "ingest.log", index=1)
    ingest.start()
    ingest.wait_ready()
    count = f"SELECT count(*) FROM telemetry WHERE tenant_id = '{tenant}'"
    publisher = threading.Thread(target=stream, daemon=True)
    publisher.start()
    try:
        wait_for_count(database, count, n // 5, timeout=120)
        ingest.kill()
        at_first_kill = int(asyncio.run(fetchval(database, count)))  # type: ignore[arg-type]
        ingest.start()
        wait_for_count(database, count, n // 2, timeout=120)
        asyncio.run(_kill_while_commit_is_held(database, ingest))
        ingest.start()
        publisher.join(timeout=300)
        assert not errors, errors
        stored = wait_for_count(database, count, n, timeout=180, idle=15, settle=2.0)
    finally:
        ingest.stop()
    print(f"AMQP consumer killed at {at_first_kill} and ~{n // 2} of {n} stored")
    assert at_first_kill < n, "the first kill came after the drain: nothing was tested"
    if unsafe:
        assert stored < n
        return
    assert stored == n
    assert asyncio.run(fetchval(database, f"SELECT count(DISTINCT (device_id, record_id)) "
                                          f"FROM telemetry WHERE tenant_id = '{tenant}'")) == n


def test_a_sweep_closes_what_a_missed_notification_left_open(server: Server,
                                                             cluster: Cluster) -> None:
    """A revocation serve did not hear of (made while it was away: here, a bare
    UPDATE without NOTIFY) is caught by the sweep serve runs at start, every minute
    and after its database connection comes back: the connections of devices that
    are no longer enrolled are closed, the others' kept."""
    import aiohttp

    from mdm_server.broker.hook import BrokerHook
    from mdm_server.broker.hook_config import amqp_settings
    from mdm_server.broker.hook_revoke import ConnectionCloser
    from mdm_server.storage.pool import create_pool
    from tests.support.services import TEST_MASTER_KEY

    tenant = server.env["TEST_TENANT"]
    database = server.env["TEST_DATABASE"]
    enroll(server, tenant, "d1", "d2")
    host, port = cluster.mqtt(1)
    d1 = connect(host, port, *device_credentials(tenant, "d1"))
    d2 = connect(host, port, *device_credentials(tenant, "d2"))
    try:
        assert d1.connected.is_set() and d2.connected.is_set()
        asyncio.run(fetchval(database, "UPDATE devices SET status = 'revoked' "
                                       "WHERE tenant_id = $1 AND device_id = 'd1' "
                                       "RETURNING 1", tenant))

        async def sweep() -> int:
            amqp = amqp_settings(cluster.server_env())
            assert amqp is not None
            pool = await create_pool(database)
            try:
                hook = BrokerHook(pool, base64.b64decode(TEST_MASTER_KEY),
                                  server_user=amqp.username, server_password=amqp.password)
                async with aiohttp.ClientSession() as session:
                    return await ConnectionCloser(database, hook, amqp).sweep(session)
            finally:
                await pool.close()

        # The management API lists connections from its statistics, collected every
        # 5 s: a connection a few seconds old may not be listed yet.
        deadline = time.monotonic() + 20
        while asyncio.run(sweep()) == 0:
            assert time.monotonic() < deadline, "the sweep never found the connection"
            time.sleep(1.0)
        assert d1.closed.wait(10), "the revoked device stayed connected"
        time.sleep(0.5)
        assert not d2.closed.is_set()
    finally:
        d1.stop()
        d2.stop()


def test_a_persistent_session_keeps_a_command_for_an_offline_device(
        server: Server, cluster: Cluster) -> None:
    """A device's QoS 1 session (clean session off) is a durable quorum queue of its
    own: a message the server publishes to its commands topic while it is offline
    is delivered when it comes back. (The server's user publishes here as a bare
    MQTT client: the broker's own mechanism; serve's dispatcher over AMQP is
    tests/integration/test_cluster_commands.py.)"""
    tenant = server.env["TEST_TENANT"]
    enroll(server, tenant, "d1")
    host, port = cluster.mqtt(1)
    user, password = device_credentials(tenant, "d1")
    topic = f"mdm/v1/{tenant}/devices/d1/commands"
    d1 = connect(host, port, user, password, clean_session=False)
    assert d1.connected.is_set(), d1.connack
    d1.client.subscribe(topic, qos=1)
    assert d1.subscribed.wait(10) and d1.suback == [[1]], d1.suback
    d1.stop()
    q = _queue(cluster, f"mqtt-subscription-{user}qos1")
    assert q["type"] == "quorum" and q["durable"] is True
    srv = connect(host, port, "mdm-server", cluster.server_password,
                  client_id=f"mdm-dispatch-{uuid.uuid4().hex[:6]}")
    try:
        assert srv.connected.is_set(), srv.connack
        marker = uuid.uuid4().hex.encode()
        srv.client.publish(topic, marker, qos=1).wait_for_publish(10)
    finally:
        srv.stop()
    back = connect(host, port, user, password, clean_session=False)
    try:
        assert back.connected.is_set(), back.connack
        assert wait_until(lambda: marker in back.payloads(), 15), back.received
    finally:
        back.stop()
