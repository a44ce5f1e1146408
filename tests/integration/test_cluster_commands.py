"""serve on a RabbitMQ cluster alone: no Mosquitto, no MDM_MQTT_URL.

A private 2-node cluster (scripts/cluster) whose nodes ask serve's broker hook;
serve has MDM_AMQP_URL and no MDM_MQTT_URL, so telemetry, OwnTracks messages, acks,
status and commands all go through the cluster over AMQP (devices speak MQTT to
the nodes). Enrollment gives devices node 1's MQTT listener (MDM_MQTT_PUBLIC_URL);
the tests move them to node 2 as a load balancer in front of the nodes would.

Skipped, with the reason, where RabbitMQ is not installed (scripts/test installs it).
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
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.agents import DeviceAgent
from tests.support.cluster import Cluster, rabbitmq_missing, running_cluster
from tests.support.mqtt import publish_all
from tests.support.services import Server, fetchval, free_port, served, wait_for_count
from tests.support.telemetry import location

_missing = rabbitmq_missing()
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(_missing is not None, reason=_missing or "")]

TENANT = "acme"


@dataclass
class World:
    server: Server
    cluster: Cluster
    admin: str

    @property
    def database(self) -> str:
        return self.server.env["TEST_DATABASE"]

    def enroll(self, device: str, agent: str = "native") -> dict[str, Any]:
        out = self.server.cli("device", "enroll", "--tenant", TENANT, "--device", device,
                              "--ownership", "corporate", "--agent", agent)
        return json.loads(out)  # type: ignore[no-any-return]

    def command(self, device: str, command_id: str) -> dict[str, Any]:
        status, cmd = self.server.request(
            "GET", f"/api/v1/devices/{device}/commands/{command_id}", self.admin)
        assert status == 200, cmd
        return cmd  # type: ignore[no-any-return]

    def wait_state(self, device: str, command_id: str, state: str) -> dict[str, Any]:
        return self.server.wait_command(self.admin, device, command_id, state, timeout=30)

    def queue(self, name: str) -> dict[str, Any]:
        """A queue as the management API shows it (as the server's user)."""
        base = self.cluster.management_url.split(",")[0]
        req = urllib.request.Request(f"{base}/api/queues/%2F/{name}")
        token = base64.b64encode(
            f"mdm-server:{self.cluster.server_password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    hook = f"127.0.0.1:{free_port()}"
    with running_cluster(tmp_path_factory.mktemp("rabbit"), hook, nodes=2) as cluster:
        host, port = cluster.mqtt(1)
        env = {**cluster.server_env(),
               # No Mosquitto: the cluster is the only broker.
               "MDM_MQTT_URL": "", "MDM_MQTT_PUBLIC_CA_FILE": "",
               "MDM_MQTT_PUBLIC_URL": f"mqtt://{host}:{port}"}
        with served(tmp_path_factory.mktemp("serve"), tenants=(TENANT,), **env) as srv:
            srv.wait_log("acks subscribed (AMQP queue mdm-acks")
            srv.wait_log("command dispatch connected to the AMQP cluster")
            admin = srv.cli("admin", "create", "--tenant", TENANT, "--name", "alice").strip()
            yield World(srv, cluster, admin)


def test_serve_needs_no_mosquitto_with_a_cluster(world: World) -> None:
    """Ready, and enrollment and revocation need no Mosquitto account (the hook reads
    the database): no warning that the broker could not be told, exit status 0."""
    with urllib.request.urlopen(world.server.base + "/readyz", timeout=10) as resp:
        assert resp.status == 200
    e = world.enroll("n0")
    host, port = world.cluster.mqtt(1)
    assert (e["mqtt"]["host"], e["mqtt"]["port"]) == (host, port)
    text = world.server.log_text()
    assert "ingest subscribed (AMQP queue mdm-ingest" in text
    assert "broker identities reconciled" not in text  # no Mosquitto to reconcile
    out = world.server.cli("device", "revoke", "--tenant", TENANT, "--device", "n0")
    assert json.loads(out)["status"] == "revoked"


def test_telemetry_through_either_node_is_stored_once(world: World) -> None:
    e = world.enroll("t1")
    user, password = e["mqtt"]["username"], e["mqtt"]["password"]
    for node, numbers in ((1, range(0, 200)), (2, range(200, 400))):
        host, port = world.cluster.mqtt(node)
        sent = publish_all(host, port, (location(TENANT, "t1", i) for i in numbers),
                           client_id=user, username=user, password=password, timeout=60)
        assert sent == 200
    where = f"FROM telemetry WHERE tenant_id = '{TENANT}' AND device_id = 't1'"
    assert wait_for_count(world.database, f"SELECT count(*) {where}", 400, timeout=60,
                          settle=1.0) == 400
    status, body = world.server.request(
        "GET", "/api/v1/devices/t1/data?kind=location&limit=500", world.admin)
    assert status == 200, body
    assert len(body["records"]) == 400


def test_an_owntracks_device_reports_through_the_cluster(world: World) -> None:
    """OwnTracks' topic holds the username {tenant}.{device}, whose '.' survives in
    the routing key: the ingest turns the key back into the topic and stores the
    point under the right device."""
    e = world.enroll("ot1", agent="owntracks")["owntracks"]
    host, port = world.cluster.mqtt(2)
    topic = e["mqtt"]["topic"]
    assert topic == "owntracks/acme.ot1/ot1"
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                    client_id=e["mqtt"]["client_id"], protocol=paho.MQTTv311)
    c.username_pw_set(e["username"], e["password"])
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect(host, port, keepalive=30)
    c.loop_start()
    try:
        assert connected.wait(15)
        point = {"_type": "location", "lat": 52.37, "lon": 4.89, "acc": 12,
                 "tst": int(time.time()), "tid": "o1"}
        c.publish(topic, json.dumps(point), qos=1).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()
    assert wait_for_count(world.database, "SELECT count(*) FROM telemetry WHERE device_id "
                          "= 'ot1' AND kind = 'location'", 1, timeout=30) == 1
    status, body = world.server.request(
        "GET", "/api/v1/devices/ot1/data?kind=location", world.admin)
    assert status == 200, body
    [rec] = body["records"]
    assert rec["data"]["lat"] == pytest.approx(52.37, abs=0.01)
    # Nothing was taken for a malformed or unknown topic on the way.
    assert asyncio.run(fetchval(world.database, "SELECT count(*) FROM dead_letters")) == 0


def test_a_command_to_an_offline_device_is_delivered_on_another_node(world: World) -> None:
    """The device's QoS 1 session is a quorum queue on the cluster: a lock sent while
    it is offline waits there, and reaches it when it comes back through node 2; its
    acks, through node 2 too, complete the command (the ack consumer reads them over
    AMQP)."""
    agent = DeviceAgent(world.enroll("c1"), *world.cluster.mqtt(1))
    agent.start(clean_session=False)  # subscribes to its commands: the session exists
    agent.stop()
    status, cmd = world.server.request("POST", "/api/v1/devices/c1/commands", world.admin,
                                       {"type": "lock", "reason": "left on the train"})
    assert status == 201, cmd
    sent = world.wait_state("c1", cmd["command_id"], "sent")
    assert sent["send_count"] == 1
    session = f"mqtt-subscription-{TENANT}.c1qos1"
    deadline = time.monotonic() + 15
    while (q := world.queue(session)).get("messages_ready", 0) < 1:
        assert time.monotonic() < deadline, q
        time.sleep(0.3)
    assert q["type"] == "quorum"
    agent.host, agent.port = world.cluster.mqtt(2)
    agent.start(clean_session=False)
    try:
        done = world.wait_state("c1", cmd["command_id"], "completed")
    finally:
        agent.stop()
    assert [(a.command_id, a.type) for a in agent.actions] == [(cmd["command_id"], "lock")]
    # What the device verified is what the server signed and stored, delivered at QoS 1.
    first = next(r for r in agent.results if r.action is not None)
    assert first.action is not None and first.action.command_id == cmd["command_id"]
    events = [(e["event"], e["to"]) for e in done["events"]]
    assert events[:2] == [("created", "queued"), ("published", "sent")]
    assert ("ack", "completed") in events
    assert agent.retained == 0


def test_a_command_published_as_a_foreign_routing_key_is_refused(world: World) -> None:
    """The server's AMQP user publishes commands only: the hook refuses it a device's
    telemetry key, and RabbitMQ closes the channel (the dispatcher's own channel is
    not that one, and keeps delivering)."""
    import aio_pika

    async def forge() -> str:
        url = world.cluster.amqp_url.split(",")[0]
        conn = await aio_pika.connect(url, timeout=10)
        try:
            ch = await conn.channel(publisher_confirms=True)
            ex = await ch.get_exchange("amq.topic", ensure=False)
            try:
                await ex.publish(aio_pika.Message(b"{}"), mandatory=False, timeout=10,
                                 routing_key=f"mdm.v1.{TENANT}.devices.t1.telemetry.location")
            except Exception as exc:
                return type(exc).__name__
            return "published"
        finally:
            await conn.close()

    assert asyncio.run(forge()) != "published"
    agent = DeviceAgent(world.enroll("c2"), *world.cluster.mqtt(2))
    agent.start(clean_session=False)
    try:
        status, cmd = world.server.request("POST", "/api/v1/devices/c2/commands",
                                           world.admin, {"type": "locate",
                                                         "reason": str(uuid.uuid4())})
        assert status == 201, cmd
        world.wait_state("c2", cmd["command_id"], "completed")
    finally:
        agent.stop()
    assert [a.type for a in agent.actions] == ["locate"]
