"""Faults of a 3-node RabbitMQ cluster under a live stream, with two `serve` hosts.

A private 3-node cluster (scripts/cluster, 30-40 s to form here), real PostgreSQL,
and two ``mdm-server serve`` processes sharing one database and the ingest's
quorum queue ``mdm-ingest`` as competing consumers:

- serve A in this network namespace: the cluster's broker hook (the only one the
  nodes ask), its MDM_AMQP_URL listing the nodes in the order 3, 1, 2, so that it
  declares the queue through node 3 (RabbitMQ 3.10 puts a new quorum queue's leader
  on the declaring client's node);
- serve B in a second network namespace, as a second host would run it (a veth
  pair on a random /30 of 10.213/16: tests.support.netns), MDM_AMQP_URL listing
  nodes 1, 2, 3. PostgreSQL, Mosquitto and the nodes' AMQP listeners listen on
  127.0.0.1 only (and serve refuses plain-text AMQP and MQTT to another host), so
  serve B reaches them as a second host would, through a tunnel: a TCP forwarder on
  the namespace's loopback carries each connection across the veth pair (the
  namespace's only way out) to a forwarder on this side's veth address, which
  connects to the service (tests.support.netns.tunnel). Its API and /metrics listen
  on its veth address; the test reaches them there, from outside.

The first test: what devices publish is split between the two serves, stored once.
The second: devices enrolled through the CLI publish at QoS 1 through the two nodes
that do not hold the queue's leader while the test ``kill -9``s the leader's node
(its beam.smp) mid-stream, serve A's consumer connected to it: the queue elects a
new leader, the consumer fails over to another node, what it had not acknowledged
is delivered again (storage's unique key absorbs the repeats). Every record is
stored exactly once (SQL, and read back through serve B's admin API), and both
serves stored part of the stream (their /metrics). Printed: the time from the kill
to the new leader, to the consumer's failover and to the stream's completion.

Skipped, with the reason, where RabbitMQ is not installed. Where a network
namespace cannot be made (root and iproute2, and the permission to make one, are
needed), serve B runs in this namespace: the first test is skipped, saying why,
and the second runs all the same.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import psutil
import pytest

from tests.support.cluster import Cluster, rabbitmq_missing, running_cluster
from tests.support.mqtt import publish_all
from tests.support.netns import OutsideHost, outside_host, tunnel
from tests.support.services import (
    Server,
    device_credentials,
    fetchval,
    free_port,
    served,
    stored_id,
)
from tests.support.telemetry import location

_missing = rabbitmq_missing()
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(_missing is not None, reason=_missing or "")]

DEVICES = 6
PER_DEVICE = 3000
TOTAL = DEVICES * PER_DEVICE
#: Each device publishes at most this many records a second (the stream lasts 20 s
#: or more, so that the kill falls in the middle of it on any machine).
RATE_PER_DEVICE = 150.0
SUBSCRIBED = "ingest subscribed (AMQP queue mdm-ingest on"
STORED = "mdm_ingest_records_stored_total"
DUPLICATES = "mdm_ingest_duplicates_total"
QUEUE_PATH = f"/api/queues/{quote('/', safe='')}/mdm-ingest"


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    hook = f"127.0.0.1:{free_port()}"
    with running_cluster(tmp_path_factory.mktemp("rabbit3"), hook, nodes=3) as c:
        yield c


def node_name(node: int) -> str:
    return f"mdm-c{node}@localhost"


def amqp_ports(cluster: Cluster) -> list[int]:
    """The AMQP port of each node, in node order."""
    return [int(urlsplit(u).port or 0) for u in cluster.amqp_url.split(",")]


def amqp_url(cluster: Cluster, order: list[int], ports: dict[int, int] | None = None) -> str:
    """MDM_AMQP_URL listing the nodes in ``order`` (ports mapped through ``ports``)."""
    urls = cluster.amqp_url.split(",")
    out = []
    for node in order:
        parts = urlsplit(urls[node - 1])
        port = int(parts.port or 0)
        port = (ports or {}).get(port, port)
        out.append(parts._replace(netloc=parts.netloc.rsplit(":", 1)[0] + f":{port}").geturl())
    return ",".join(out)


def management(cluster: Cluster, path: str, nodes: list[int]) -> Any:
    """GET ``path`` of the management API, from the first of ``nodes`` that answers."""
    urls = cluster.management_url.split(",")
    token = base64.b64encode(f"mdm-server:{cluster.server_password}".encode()).decode()
    last: Exception | None = None
    for node in nodes:
        req = urllib.request.Request(urls[node - 1] + path)
        req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return json.loads(resp.read())
        except OSError as exc:  # URLError and HTTPError among them
            last = exc
    raise AssertionError(f"no management API of nodes {nodes} answered: {last}")


def queue_leader(cluster: Cluster, nodes: list[int]) -> int | None:
    """The node holding ``mdm-ingest``'s leader, as ``nodes`` see it."""
    q = management(cluster, QUEUE_PATH, nodes)
    leader = q.get("leader") or ""
    for node in (1, 2, 3):
        if leader == node_name(node):
            return node
    return None


def node_pid(cluster: Cluster, node: int) -> int:
    """The OS pid of a node's Erlang VM (beam.smp) of *this* cluster: node names are
    the same in every scripts/cluster cluster, its HOME is not."""
    home = str(cluster.dir / "home")
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if not (proc.info["name"] or "").startswith("beam"):
                continue
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if env.get("HOME") == home and env.get("RABBITMQ_NODENAME") == node_name(node):
            return int(proc.pid)
    raise AssertionError(f"no beam.smp process of node {node} in {cluster.dir}")


def consumer_node(srv: Server, ports: dict[int, int], count: int | None = None) -> int:
    """The node that ``srv``'s ingest consumed on at its ``count``-th subscription
    (by default its latest), from its log (``ports``: the node of each port it names)."""
    srv.wait_log(SUBSCRIBED, count=count or 1, timeout=120)
    found = re.findall(re.escape(SUBSCRIBED) + r" [^\s:]+:(\d+)\)", srv.log_text())
    return ports[int(found[-1 if count is None else count - 1])]


def counter(metrics_addr: str, name: str) -> float:
    """A counter of a serve's /metrics (every process of it summed up)."""
    with urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


@dataclass
class Published:
    """How many messages the devices' publishers have handed to paho so far."""

    count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self) -> None:
        with self.lock:
            self.count += 1


def paced(tenant: str, device: str, published: Published) -> Iterator[tuple[str, bytes]]:
    started = time.monotonic()
    for i in range(PER_DEVICE):
        if i % 10 == 0:
            ahead = started + i / RATE_PER_DEVICE - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        published.add()
        yield location(tenant, device, i)


def read_back(srv: Server, token: str, device: str) -> list[str]:
    """Every location record id of ``device`` through the admin API, page by page."""
    ids: list[str] = []
    cursor = ""
    while True:
        status, body = srv.request(
            "GET", f"/api/v1/devices/{device}/data?kind=location&limit=500{cursor}", token)
        assert status == 200, (status, body)
        ids += [r["id"] for r in body["records"]]
        if body["next"] is None:
            return ids
        cursor = f"&cursor={quote(body['next'], safe='')}"


@dataclass
class Deployment:
    """The cluster, the database and the two serves of this module."""

    cluster: Cluster
    database: str
    srv_a: Server
    srv_b: Server
    #: Where serve B runs: in another namespace (None) or, where none can be made,
    #: here; why not.
    no_netns: str | None
    #: The node of each AMQP port serve A's and serve B's logs name.
    node_of_port_a: dict[int, int]
    node_of_port_b: dict[int, int]
    share_tenant: str
    fault_tenant: str

    def metrics(self, srv: Server, name: str) -> float:
        return counter(srv.env["MDM_METRICS_ADDR"], name)


SHARE_DEVICES = ["s0", "s1"]
FAULT_DEVICES = [f"d{i}" for i in range(DEVICES)]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory,
               cluster3: Cluster) -> Iterator[Deployment]:
    """serve A here (the hook; nodes 3, 1, 2), then serve B in a second network
    namespace (nodes 1, 2, 3, through the tunnel), sharing a fresh database; the
    devices of both tests enrolled through the CLI. Where no namespace can be made,
    serve B runs here (the test of the second host is skipped, saying why)."""
    cluster = cluster3
    print(f"\n3-node cluster formed in {cluster.env['STARTED_IN_S']} s")
    tmp = tmp_path_factory.mktemp("serves")
    share, fault = "s" + uuid.uuid4().hex[:8], "f" + uuid.uuid4().hex[:8]
    ports = amqp_ports(cluster)
    node_of_port = {p: i + 1 for i, p in enumerate(ports)}

    def enroll(srv: Server) -> None:
        for tenant, devices in ((share, SHARE_DEVICES), (fault, FAULT_DEVICES)):
            for d in devices:
                srv.cli("device", "enroll", "--tenant", tenant, "--device", d,
                        "--ownership", "corporate")

    env_a = {**cluster.server_env(), "MDM_AMQP_URL": amqp_url(cluster, [3, 1, 2]),
             "MDM_METRICS_ADDR": f"127.0.0.1:{free_port()}"}
    with ExitStack() as stack:
        host: OutsideHost | None = None
        no_netns: str | None = None
        try:
            host = stack.enter_context(outside_host())
        except pytest.skip.Exception as why:
            no_netns = str(why)
        srv_a = stack.enter_context(served(tmp, tenants=(share, fault), setup=enroll,
                                           **env_a))
        srv_a.wait_log("broker hook listening")
        consumer_node(srv_a, node_of_port)  # subscribed, so the queue's leader is its node
        env_b = {k: v for k, v in srv_a.env.items()
                 if k not in ("MDM_BROKER_HOOK_ADDR", "MDM_AMQP_MANAGEMENT_URL")}
        env_b["MDM_AMQP_URL"] = amqp_url(cluster, [1, 2, 3])
        if host is None:
            node_of_port_b = node_of_port
            env_b["MDM_HTTP_ADDR"] = f"127.0.0.1:{free_port()}"
            env_b["MDM_METRICS_ADDR"] = f"127.0.0.1:{free_port()}"
            srv_b = Server(env_b, tmp / "serve-b.log")
        else:
            pg = urlsplit(srv_a.env["MDM_DATABASE_URL"]).port or 5432
            via = stack.enter_context(tunnel(host, [pg, int(srv_a.env["BROKER_PORT"]),
                                                    *ports]))
            node_of_port_b = {via[p]: node for p, node in node_of_port.items()}
            for var in ("MDM_DATABASE_URL", "MDM_MQTT_URL"):
                parts = urlsplit(env_b[var])
                env_b[var] = parts._replace(netloc=parts.netloc.rsplit(":", 1)[0]
                                            + f":{via[parts.port or 5432]}").geturl()
            env_b["MDM_AMQP_URL"] = amqp_url(cluster, [1, 2, 3], via)
            env_b["MDM_HTTP_ADDR"] = f"{host.addr}:{free_port()}"
            env_b["MDM_METRICS_ADDR"] = f"{host.addr}:{free_port()}"
            srv_b = Server(env_b, tmp / "serve-b.log", prefix=host.prefix)
        stack.callback(srv_b.stop)
        srv_b.start()
        srv_b.wait_ready(timeout=60)
        yield Deployment(cluster, srv_a.env["TEST_DATABASE"], srv_a, srv_b, no_netns,
                         node_of_port, node_of_port_b, share, fault)


def stored(database: str, tenant: str) -> int:
    n = asyncio.run(fetchval(database, "SELECT count(*) FROM telemetry WHERE tenant_id = $1",
                             tenant))
    assert isinstance(n, int)
    return n


def distinct(database: str, tenant: str) -> int:
    n = asyncio.run(fetchval(database, "SELECT count(DISTINCT (device_id, record_id)) "
                                       "FROM telemetry WHERE tenant_id = $1", tenant))
    assert isinstance(n, int)
    return n


def wait_stored(database: str, tenant: str, expected: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (n := stored(database, tenant)) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return n


def wait_drained(cluster: Cluster, nodes: list[int], timeout: float = 60.0) -> dict[str, Any]:
    """The queue once nothing in it is ready or unacknowledged (the management API's
    figures are sampled every 5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        q: dict[str, Any] = management(cluster, QUEUE_PATH, nodes)
        if q.get("messages_ready", 1) == 0 and q.get("messages_unacknowledged", 1) == 0:
            return q
        assert time.monotonic() < deadline, q
        time.sleep(0.5)


def test_a_serve_on_a_second_host_shares_the_stream(deployment: Deployment) -> None:
    """serve B, in another network namespace and reaching the database, Mosquitto and
    the nodes only across the veth pair, is a second consumer of ``mdm-ingest``: what
    two devices publish through node 1 is split between the two serves (their
    /metrics), each record stored once; serve B's API answers from outside."""
    if deployment.no_netns is not None:
        pytest.skip(deployment.no_netns)
    dep, tenant = deployment, deployment.share_tenant
    per_device = 1000
    before = [dep.metrics(s, STORED) for s in (dep.srv_a, dep.srv_b)]
    # Both consumers are attached (the queue's consumer count is sampled too).
    deadline = time.monotonic() + 60
    while management(dep.cluster, QUEUE_PATH, [1, 2, 3]).get("consumers") != 2:
        assert time.monotonic() < deadline, "mdm-ingest never had its two consumers"
        time.sleep(0.5)
    host, port = dep.cluster.mqtt(1)
    for d in SHARE_DEVICES:
        user, password = device_credentials(tenant, d)
        assert publish_all(host, port, (location(tenant, d, i) for i in range(per_device)),
                           client_id=user, username=user, password=password,
                           timeout=120) == per_device
    total = per_device * len(SHARE_DEVICES)
    assert wait_stored(dep.database, tenant, total, timeout=120) == total
    deadline = time.monotonic() + 30
    while True:
        a, b = (dep.metrics(s, STORED) - was
                for s, was in zip((dep.srv_a, dep.srv_b), before, strict=True))
        if a + b >= total or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    print(f"{total} records through node 1: serve A stored {a:.0f}, serve B (other "
          f"namespace) {b:.0f}")
    assert a > 0 and b > 0, (a, b)
    assert a + b == total, (a, b)
    time.sleep(1.0)
    assert stored(dep.database, tenant) == total == distinct(dep.database, tenant)
    token = dep.srv_a.cli("admin", "create", "--tenant", tenant, "--name", "ops").strip()
    ids = read_back(dep.srv_b, token, SHARE_DEVICES[0])
    assert sorted(ids) == sorted(stored_id(tenant, SHARE_DEVICES[0], f"{SHARE_DEVICES[0]}-{i}")
                                 for i in range(per_device))


def test_two_serves_keep_their_broker_links(deployment: Deployment) -> None:
    """On a cluster, acks, status and commands go through it as the ingest does
    (shared quorum queues, no MQTT client id of their own): neither serve pushes
    the other off a broker. (Found by this module before: both took the same
    Mosquitto client ids, about 1.5 take-overs a second; on one Mosquitto, serves
    need MDM_INSTANCE: tests/integration/test_two_serves.py.)"""
    serves = (deployment.srv_a, deployment.srv_b)
    lost = ("disconnected from the broker", "lost or unreachable")

    def count(s: Server) -> int:
        text = s.log_text()
        return sum(text.count(x) for x in lost)

    before = [count(s) for s in serves]
    time.sleep(6.0)
    after = [count(s) for s in serves]
    print(f"broker disconnections in 6 s: serve A {after[0] - before[0]}, "
          f"serve B {after[1] - before[1]}")
    assert after == before
    for s in serves:
        text = s.log_text()
        assert "acks subscribed (AMQP queue mdm-acks" in text
        assert "command dispatch connected to the AMQP cluster" in text


def test_the_leaders_node_killed_mid_stream_loses_and_doubles_nothing(
        deployment: Deployment) -> None:
    """Devices publish through the two nodes without the queue's leader; its node is
    SIGKILLed mid-stream with a consumer on it: every record stored once, read back
    through serve B's admin API; both serves stored part of it. (Runs last: the
    module's cluster is left with a node down.)"""
    dep = deployment
    cluster, database, tenant = dep.cluster, dep.database, dep.fault_tenant
    srv_a, srv_b = dep.srv_a, dep.srv_b
    devices = FAULT_DEVICES
    node_a = consumer_node(srv_a, dep.node_of_port_a)
    node_b = consumer_node(srv_b, dep.node_of_port_b)
    victim = queue_leader(cluster, [1, 2, 3])
    assert victim is not None, "mdm-ingest has no leader"
    # The devices publish through the two other nodes; a consumer is on the victim.
    device_nodes = [n for n in (1, 2, 3) if n != victim]
    survivors = device_nodes
    where_b = "here" if dep.no_netns else "other namespace"
    print(f"queue leader on node {victim}; serve A consumes on node {node_a}, serve B "
          f"({where_b}) on node {node_b}; devices publish through nodes {device_nodes}")
    assert victim in (node_a, node_b), "no consumer on the leader's node: arranged wrong"
    on_victim = srv_a if node_a == victim else srv_b
    ports_on_victim = dep.node_of_port_a if node_a == victim else dep.node_of_port_b
    subscriptions = on_victim.log_text().count(SUBSCRIBED)
    before = [dep.metrics(s, STORED) for s in (srv_a, srv_b)]
    dup_before = sum(dep.metrics(s, DUPLICATES) for s in (srv_a, srv_b))

    published = Published()
    acked: list[int] = []
    finished: list[float] = []  # when each publisher had its last PUBACK
    errors: list[BaseException] = []

    def publish(device: str, node: int) -> None:
        try:
            h, p = cluster.mqtt(node)
            user, password = device_credentials(tenant, device)
            acked.append(publish_all(h, p, paced(tenant, device, published), client_id=user,
                                     username=user, password=password, timeout=300))
            finished.append(time.monotonic())
        except BaseException as exc:
            errors.append(exc)

    publishers = [threading.Thread(target=publish, args=(d, device_nodes[k % 2]), daemon=True)
                  for k, d in enumerate(devices)]
    for t in publishers:
        t.start()
    # Mid-stream: a quarter stored, or (should the ingest lag) a third published.
    deadline = time.monotonic() + 120
    while stored(database, tenant) < TOTAL // 4 and published.count < TOTAL // 3:
        assert not errors, errors
        assert time.monotonic() < deadline, "the stream never got going"
        time.sleep(0.1)

    pid = node_pid(cluster, victim)
    psutil.Process(pid).kill()  # kill -9
    killed_at = time.monotonic()
    at_kill = stored(database, tenant)
    published_at_kill = published.count
    print(f"node {victim} (pid {pid}) killed with {at_kill} of {TOTAL} stored, "
          f"{published_at_kill} published")

    leader_s = failover_s = done_s = None
    new_leader = None
    deadline = killed_at + 300
    while done_s is None or leader_s is None or failover_s is None:
        now = time.monotonic()
        assert now < deadline, (f"after 300 s: leader {leader_s}, failover {failover_s}, "
                                f"{stored(database, tenant)} of {TOTAL} stored, errors {errors}")
        if leader_s is None:
            try:
                new_leader = queue_leader(cluster, survivors)
            except AssertionError:
                new_leader = None  # the management API is busy: ask again
            if new_leader in survivors:
                leader_s = time.monotonic() - killed_at
        if failover_s is None and on_victim.log_text().count(SUBSCRIBED) > subscriptions:
            failover_s = time.monotonic() - killed_at
        if done_s is None and stored(database, tenant) >= TOTAL:
            done_s = time.monotonic() - killed_at
        time.sleep(0.1)
    for t in publishers:
        t.join(timeout=300)
    assert not errors, errors
    assert sum(acked) == TOTAL, acked
    published_s = max(finished) - killed_at
    print(f"new leader on node {new_leader} {leader_s:.2f} s after the kill; the "
          f"consumer on it failed over after {failover_s:.2f} s; the devices' last PUBACK "
          f"{published_s:.2f} s after the kill (paced at {RATE_PER_DEVICE:.0f} records/s "
          f"a device); all {TOTAL} stored {done_s:.2f} s after the kill")
    assert published_at_kill < TOTAL, "the kill came after the stream: nothing was tested"
    new_node = consumer_node(on_victim, ports_on_victim, count=subscriptions + 1)
    assert new_node in survivors

    # Exactly once: a while later, still TOTAL rows, TOTAL distinct records.
    time.sleep(2.0)
    assert stored(database, tenant) == TOTAL
    assert distinct(database, tenant) == TOTAL

    # Both serves stored part of it: their stored counters add up to the stream.
    deadline = time.monotonic() + 30
    while True:
        a, b = (dep.metrics(s, STORED) - was
                for s, was in zip((srv_a, srv_b), before, strict=True))
        if a + b >= TOTAL or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    dup = sum(dep.metrics(s, DUPLICATES) for s in (srv_a, srv_b)) - dup_before
    print(f"stored by serve A: {a:.0f}, by serve B ({where_b}): {b:.0f}; redeliveries "
          f"absorbed by the unique key: {dup:.0f}")
    assert a > 0 and b > 0, (a, b)
    assert a + b == TOTAL, (a, b)

    # Read back through serve B's admin API (from outside its namespace).
    token = srv_a.cli("admin", "create", "--tenant", tenant, "--name", "ops").strip()
    for d in devices:
        ids = read_back(srv_b, token, d)
        assert len(ids) == PER_DEVICE, (d, len(ids))
        assert set(ids) == {stored_id(tenant, d, f"{d}-{i}") for i in range(PER_DEVICE)}, d
    q = wait_drained(cluster, survivors)
    assert sorted(q.get("online", [])) == [node_name(n) for n in survivors], q
    print(f"queue drained; members online: {', '.join(sorted(q['online']))}")
