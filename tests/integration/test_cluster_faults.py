"""Faults of a 3-node RabbitMQ cluster under a live stream, with two `serve` hosts.

A private 3-node cluster (scripts/cluster, about 40 s to form here), real
PostgreSQL, and two ``mdm-server serve`` processes sharing one database and the
ingest's quorum queue ``mdm-ingest`` as competing consumers:

- serve A in this network namespace: the cluster's broker hook, its MDM_AMQP_URL
  listing the nodes in the order 3, 1, 2 (so that it declares the queue through
  node 3: RabbitMQ 3.10 puts a new quorum queue's leader on the declaring client's
  node);
- serve B in a second network namespace, as a second host would run it (a veth
  pair on a random /30 of 10.213/16, tests.support.netns). PostgreSQL, Mosquitto
  and the RabbitMQ nodes' AMQP listeners listen on 127.0.0.1 only, and serve
  refuses plain-text AMQP, MQTT to another host, so serve B reaches them as a
  second host would through a tunnel: a TCP forwarder on its own loopback carries
  each connection across the veth pair (its only way out) to a forwarder on this
  side's veth address, which connects to the service (tests.support.netns.tunnel).
  Its MDM_AMQP_URL lists the nodes 1, 2, 3; its API and /metrics listen on its
  veth address, and the test reaches them there, from outside.

Devices enrolled through the CLI publish at QoS 1 through the two nodes that do not
hold the queue's leader, while the test ``kill -9``s the leader's node (its
beam.smp) mid-stream, with a consumer connected to it: the queue elects a new
leader, that consumer fails over to another node, what it had not acknowledged is
delivered again (storage's unique key absorbs the repeats). Then every record is
stored exactly once, read back through serve B's admin API, and both serves stored
part of the stream (their /metrics). Printed: the time from the kill to the new
leader, to the consumer's failover and to the stream's completion.

Skipped, with the reason, where RabbitMQ is not installed or a network namespace
cannot be made (root and iproute2 are needed).
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
from dataclasses import dataclass, field
from pathlib import Path
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
    q = management(cluster, f"/api/queues/{quote('/', safe='')}/mdm-ingest", nodes)
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


def consumer_node(srv: Server, ports: dict[int, int], count: int = 1) -> int:
    """The node that ``srv``'s ingest consumed on at its ``count``-th subscription,
    from its log (``ports``: the node of each port it names)."""
    srv.wait_log(SUBSCRIBED, count=count, timeout=120)
    found = re.findall(re.escape(SUBSCRIBED) + r" [^\s:]+:(\d+)\)", srv.log_text())
    return ports[int(found[count - 1])]


def counter(srv: Server, metrics_addr: str, name: str) -> float:
    """A counter of ``srv``'s /metrics (every process of it summed up)."""
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


def test_the_leaders_node_killed_mid_stream_loses_and_doubles_nothing(
        tmp_path: Path, cluster3: Cluster) -> None:
    cluster = cluster3
    print(f"\n3-node cluster formed in {cluster.env['STARTED_IN_S']} s")
    tenant = "t" + uuid.uuid4().hex[:8]
    devices = [f"d{i}" for i in range(DEVICES)]
    ports = amqp_ports(cluster)
    node_of_port = {p: i + 1 for i, p in enumerate(ports)}
    metrics_a = f"127.0.0.1:{free_port()}"

    def enroll(srv: Server) -> None:
        for d in devices:
            srv.cli("device", "enroll", "--tenant", tenant, "--device", d,
                    "--ownership", "corporate")

    env_a = {**cluster.server_env(), "MDM_AMQP_URL": amqp_url(cluster, [3, 1, 2]),
             "MDM_METRICS_ADDR": metrics_a}
    with outside_host() as host, \
            served(tmp_path, tenants=(tenant,), setup=enroll, **env_a) as srv_a:
        srv_a.wait_log("broker hook listening")
        node_a = consumer_node(srv_a, node_of_port)
        database = srv_a.env["TEST_DATABASE"]
        pg = urlsplit(srv_a.env["MDM_DATABASE_URL"]).port or 5432
        mqtt = int(srv_a.env["BROKER_PORT"])
        with tunnel(host, [pg, mqtt, *ports]) as via:
            srv_b = start_second_serve(tmp_path, host, srv_a, cluster, via)
            try:
                run_the_fault(cluster, tenant, devices, database, srv_a, srv_b, host,
                              metrics_a, node_a, node_of_port, via)
            finally:
                srv_b.stop()


def start_second_serve(tmp_path: Path, host: OutsideHost, srv_a: Server, cluster: Cluster,
                       via: dict[int, int]) -> Server:
    """serve B in the namespace: serve A's database, Mosquitto and nodes (1, 2, 3)
    through the tunnel; no hook (the nodes ask serve A's); API and /metrics on its
    veth address."""
    env = dict(srv_a.env)
    for var in ("MDM_DATABASE_URL", "MDM_MQTT_URL"):
        parts = urlsplit(env[var])
        port = int(parts.port or 5432)
        env[var] = parts._replace(
            netloc=parts.netloc.rsplit(":", 1)[0] + f":{via[port]}").geturl()
    env["MDM_AMQP_URL"] = amqp_url(cluster, [1, 2, 3], via)
    for var in ("MDM_BROKER_HOOK_ADDR", "MDM_AMQP_MANAGEMENT_URL"):
        env.pop(var, None)
    env["MDM_HTTP_ADDR"] = f"{host.addr}:{free_port()}"
    env["MDM_METRICS_ADDR"] = f"{host.addr}:{free_port()}"
    srv_b = Server(env, tmp_path / "serve-b.log", prefix=host.prefix)
    srv_b.start()
    srv_b.wait_ready(timeout=60)
    return srv_b


def run_the_fault(cluster: Cluster, tenant: str, devices: list[str], database: str,
                  srv_a: Server, srv_b: Server, host: OutsideHost, metrics_a: str,
                  node_a: int, node_of_port: dict[int, int], via: dict[int, int]) -> None:
    node_b = consumer_node(srv_b, {f: node_of_port[p] for p, f in via.items()
                                   if p in node_of_port})
    victim = queue_leader(cluster, [1, 2, 3])
    assert victim is not None, "mdm-ingest has no leader"
    # The devices publish through the two other nodes; a consumer is on the victim.
    device_nodes = [n for n in (1, 2, 3) if n != victim]
    survivors = device_nodes
    print(f"queue leader on node {victim}; serve A consumes on node {node_a}, serve B "
          f"(other namespace) on node {node_b}; devices publish through nodes "
          f"{device_nodes}")
    assert victim in (node_a, node_b), "no consumer on the leader's node: arranged wrong"
    on_victim = srv_a if node_a == victim else srv_b

    published = Published()
    acked: list[int] = []
    errors: list[BaseException] = []

    def publish(device: str, node: int) -> None:
        try:
            h, p = cluster.mqtt(node)
            user, password = device_credentials(tenant, device)
            acked.append(publish_all(h, p, paced(tenant, device, published), client_id=user,
                                     username=user, password=password, timeout=300))
        except BaseException as exc:
            errors.append(exc)

    count_sql = f"SELECT count(*) FROM telemetry WHERE tenant_id = '{tenant}'"

    def stored() -> int:
        n = asyncio.run(fetchval(database, count_sql))
        assert isinstance(n, int)
        return n

    publishers = [threading.Thread(target=publish, args=(d, device_nodes[k % 2]), daemon=True)
                  for k, d in enumerate(devices)]
    for t in publishers:
        t.start()
    deadline = time.monotonic() + 120
    while stored() < TOTAL // 4:
        assert not errors, errors
        assert time.monotonic() < deadline, "the stream never got going"
        time.sleep(0.1)

    pid = node_pid(cluster, victim)
    psutil.Process(pid).kill()  # kill -9
    killed_at = time.monotonic()
    at_kill = stored()
    published_at_kill = published.count
    print(f"node {victim} (pid {pid}) killed with {at_kill} of {TOTAL} stored, "
          f"{published_at_kill} published")

    leader_s = failover_s = done_s = None
    new_leader = None
    deadline = killed_at + 300
    while done_s is None or leader_s is None or failover_s is None:
        now = time.monotonic()
        assert now < deadline, (f"after 300 s: leader {leader_s}, failover {failover_s}, "
                                f"{stored()} of {TOTAL} stored, errors {errors}")
        if leader_s is None:
            try:
                new_leader = queue_leader(cluster, survivors)
            except AssertionError:
                new_leader = None  # the management API is busy: ask again
            if new_leader in survivors:
                leader_s = time.monotonic() - killed_at
        if failover_s is None and on_victim.log_text().count(SUBSCRIBED) >= 2:
            failover_s = time.monotonic() - killed_at
        if done_s is None and stored() >= TOTAL:
            done_s = time.monotonic() - killed_at
        time.sleep(0.1)
    for t in publishers:
        t.join(timeout=300)
    assert not errors, errors
    assert sum(acked) == TOTAL, acked
    print(f"new leader on node {new_leader} {leader_s:.2f} s after the kill; the "
          f"consumer on it failed over after {failover_s:.2f} s; all {TOTAL} stored "
          f"{done_s:.2f} s after the kill")
    assert published_at_kill < TOTAL, "the kill came after the stream: nothing was tested"
    new_node = consumer_node(on_victim, {**node_of_port, **{
        f: node_of_port[p] for p, f in via.items() if p in node_of_port}}, count=2)
    assert new_node in survivors

    # Exactly once: a while later, still TOTAL rows, TOTAL distinct records.
    time.sleep(2.0)
    assert stored() == TOTAL
    assert asyncio.run(fetchval(
        database, "SELECT count(DISTINCT (device_id, record_id)) FROM telemetry "
                  f"WHERE tenant_id = '{tenant}'")) == TOTAL

    # Both serves stored part of it: their stored counters add up to the stream.
    metrics_b = srv_b.env["MDM_METRICS_ADDR"]
    deadline = time.monotonic() + 30
    while True:
        a = counter(srv_a, metrics_a, "mdm_ingest_records_stored_total")
        b = counter(srv_b, metrics_b, "mdm_ingest_records_stored_total")
        if a + b >= TOTAL or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    dup_a = counter(srv_a, metrics_a, "mdm_ingest_duplicates_total")
    dup_b = counter(srv_b, metrics_b, "mdm_ingest_duplicates_total")
    print(f"stored by serve A: {a:.0f}, by serve B (other namespace): {b:.0f}; "
          f"redeliveries absorbed by the unique key: {dup_a + dup_b:.0f}")
    assert a > 0 and b > 0, (a, b)
    assert a + b == TOTAL, (a, b)

    # Read back through the admin API of serve B, from outside its namespace.
    token = srv_a.cli("admin", "create", "--tenant", tenant, "--name", "ops").strip()
    for d in devices:
        ids = read_back(srv_b, token, d)
        assert len(ids) == PER_DEVICE, (d, len(ids))
        assert set(ids) == {stored_id(tenant, d, f"{d}-{i}") for i in range(PER_DEVICE)}, d
    q = management(cluster, f"/api/queues/{quote('/', safe='')}/mdm-ingest", survivors)
    print(f"queue afterwards: {q.get('messages')} ready or unacknowledged, members "
          f"online {q.get('online')}")
