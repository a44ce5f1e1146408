"""Revoking or re-enrolling a device ends its holder's enrollment: every command not
finished is cancelled (an event and an audit entry each), nothing of them is ever
signed or published again, not even to the next holder on the same client id, and
a factory reset waiting for approval cannot be approved any more. Real server,
PostgreSQL, Mosquitto (the project's config) and agents running the agent code."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent_protocol import commands_topic
from mdm_server.audit import AuditKeys
from mdm_server.commands import outbox, service
from mdm_server.config import MqttSettings
from mdm_server.storage.pool import connect
from tests.support.agents import DeviceAgent
from tests.support.services import (
    REPO,
    TEST_MASTER_KEY,
    Broker,
    Server,
    as_server_role,
    create_database,
    drop_database,
    enroll_devices,
    fetch,
    running_broker,
    server_env,
)

pytestmark = pytest.mark.integration

TENANT = "acme"


@dataclass
class Watcher:
    """The server's MQTT user subscribed to one device's commands topic: everything
    published there, by anyone, arrives here."""

    url: str
    topic: str
    got: list[bytes] = field(default_factory=list)
    client: paho.Client | None = None

    def start(self) -> None:
        m = MqttSettings.from_url(self.url)
        ready = threading.Event()
        c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                        client_id=f"test-watch-{uuid.uuid4().hex[:8]}", clean_session=True,
                        protocol=paho.MQTTv311)
        c.username_pw_set(m.username, m.password)
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(self.topic, qos=1)
        c.on_subscribe = lambda cl, u, mid, rcs, p: ready.set()
        c.on_message = lambda cl, u, msg: self.got.append(msg.payload)
        c.connect(m.host, m.port, keepalive=30)
        c.loop_start()
        self.client = c
        assert ready.wait(10), "the watcher was not subscribed"

    def stop(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()


@dataclass
class Setup:
    server: Server
    broker: Broker
    database: str
    alice: str
    bob: str
    enrollment: dict[str, Any]  # d1's, as its first holder got it
    agents: list[DeviceAgent] = field(default_factory=list)

    def agent(self, enrollment: dict[str, Any]) -> DeviceAgent:
        a = DeviceAgent(enrollment, port=self.broker.port)
        self.agents.append(a)
        return a

    def post(self, path: str, token: str, body: object = None) -> tuple[int, Any]:
        return self.server.request("POST", path, token, body)

    def issue(self, body: dict[str, Any], token: str | None = None) -> dict[str, Any]:
        status, cmd = self.post("/api/v1/devices/d1/commands", token or self.alice, body)
        assert status == 201, cmd
        return cmd

    def state(self, command_id: str) -> str:
        [row] = asyncio.run(fetch(self.database, "SELECT state FROM commands "
                                                 "WHERE command_id = $1::uuid", command_id))
        return str(row["state"])

    def wait_state(self, command_id: str, state: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.state(command_id) != state:
            assert time.monotonic() < deadline, (command_id, self.state(command_id), state)
            time.sleep(0.1)

    def restart(self) -> None:
        """serve again (after _unfinished_commands stopped it), dispatching."""
        self.server.start()
        self.server.wait_log("acks subscribed", 2)
        self.server.wait_log("command dispatch connected to the broker", 2)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mdm_server", *args],
                              env=self.server.env, cwd=REPO, capture_output=True, text=True,
                              timeout=60)

    def enqueue_directly(self, type_: str) -> str:
        async def run() -> str:
            conn = await connect(as_server_role(self.database))
            try:
                async with conn.transaction():
                    made = await outbox.enqueue(conn, tenant=TENANT, device="d1", type=type_,
                                                params={}, reason="stray", requested_by="test")
                return str(made)
            finally:
                await conn.close()
        return asyncio.run(run())

    def issue_while_stopped(self, body: dict[str, Any]) -> str:
        """A command issued by the API's own code while serve (its dispatcher) is
        stopped: it stays queued."""
        async def run() -> str:
            conn = await connect(as_server_role(self.database))
            try:
                async with conn.transaction():
                    made = await service.issue(
                        conn, tenant=TENANT, device="d1", actor="alice", type_=body["type"],
                        params={}, reason=body["reason"], notice=None, ttl_s=86_400,
                        audit_keys=AuditKeys.derive(base64.b64decode(TEST_MASTER_KEY)))
                return str(made.command["command_id"])
            finally:
                await conn.close()
        return asyncio.run(run())


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    database = asyncio.run(create_database())
    try:
        with running_broker(tmp_path) as broker:
            [enrollment] = asyncio.run(enroll_devices(database, broker.url, TENANT, ["d1"]))
            srv = Server(server_env(database, broker.url), tmp_path / "serve.log")
            alice, bob = (srv.cli("admin", "create", "--tenant", TENANT, "--name", n).strip()
                          for n in ("alice", "bob"))
            srv.start()
            srv.wait_log("acks subscribed")
            s = Setup(srv, broker, database, alice, bob, enrollment)
            try:
                yield s
            finally:
                for a in s.agents:
                    a.stop()
                srv.stop()
    finally:
        asyncio.run(drop_database(database))


def _unfinished_commands(s: Setup) -> dict[str, str]:
    """sent (the device took it), sent (queued by the broker for the offline device),
    pending_approval and queued: command id -> the state it is in."""
    first = s.agent(s.enrollment)
    first.start()
    first.hold()  # takes commands without acting or acking: they stay sent
    taken = s.issue({"type": "lock", "reason": "taken, never acked"})
    s.wait_state(taken["command_id"], "sent")
    first.stop()  # its persistent session stays on the broker
    offline = s.issue({"type": "locate", "reason": "queued by the broker"})
    s.wait_state(offline["command_id"], "sent")
    reset = s.issue({"type": "factory_reset", "reason": "returned"})
    assert reset["state"] == "pending_approval"
    s.server.stop()  # no dispatcher: the next one stays queued
    queued = s.issue_while_stopped({"type": "lock", "reason": "never sent"})
    out = {taken["command_id"]: "sent", offline["command_id"]: "sent",
           reset["command_id"]: "pending_approval", queued: "queued"}
    assert {c: s.state(c) for c in out} == out
    return out


def _check_withdrawn(s: Setup, commands: dict[str, str], because: str) -> None:
    rows = asyncio.run(fetch(s.database, """
        SELECT c.command_id::text AS id, c.state, c.cancelled_by, c.finished_at IS NOT NULL
               AS finished, e.event, e.from_state, e.to_state, e.actor, e.detail
        FROM commands c JOIN LATERAL (SELECT * FROM command_events x
                                      WHERE x.command_id = c.command_id
                                      ORDER BY event_id DESC LIMIT 1) e ON true"""))
    got = {r["id"]: (r["state"], r["cancelled_by"], r["finished"], r["event"], r["from_state"],
                     r["to_state"], r["actor"], r["detail"]) for r in rows}
    assert got == {c: ("cancelled", "cli", True, "withdrawn", before, "cancelled", "cli",
                       because) for c, before in commands.items()}
    entries = asyncio.run(fetch(s.database, "SELECT actor, target, details FROM audit_log "
                                            "WHERE action = 'command.cancel'"))
    assert sorted((e["actor"], e["target"], e["details"]["command_id"], e["details"]["state"],
                   e["details"]["because"]) for e in entries) == sorted(
        ("cli", "device:d1", c, before, because) for c, before in commands.items())
    [ended] = asyncio.run(fetch(s.database, "SELECT details FROM audit_log WHERE action = $1",
                                because))
    assert ended["details"]["commands_cancelled"] == len(commands)


def _check_next_holder_gets_nothing_old(s: Setup, enrollment: dict[str, Any],
                                        watcher: Watcher) -> None:
    """The next holder's agent, on the device's client id with a persistent session,
    receives none of the old commands; then a new one, and only that."""
    assert enrollment["mqtt"]["client_id"] == s.enrollment["mqtt"]["client_id"]
    nxt = s.agent(enrollment)
    nxt.start()  # clean_session=False: whatever the broker kept for the id is delivered
    time.sleep(3)  # the dispatcher polls every 2 s; a stored session is delivered at once
    assert (nxt.results, nxt.swallowed, watcher.got) == ([], [], [])
    fresh = s.issue({"type": "lock", "reason": "for the new holder"})
    s.wait_state(fresh["command_id"], "completed")
    assert [a.command_id for a in nxt.actions] == [fresh["command_id"]]
    assert len(watcher.got) == 1  # the watcher does see what is published


def test_revoke_cancels_every_unfinished_command_and_the_next_holder_gets_none(
        setup: Setup) -> None:
    s = setup
    commands = _unfinished_commands(s)
    revoked = s.cli("device", "revoke", "--tenant", TENANT, "--device", "d1")
    assert revoked.returncode == 0, revoked.stderr
    _check_withdrawn(s, commands, "device.revoke")
    s.restart()
    watcher = Watcher(s.broker.url, commands_topic(TENANT, "d1"))
    watcher.start()
    try:
        reset = next(c for c, before in commands.items() if before == "pending_approval")
        # The second admin's approval of the revoked device's factory reset: refused.
        status, err = s.post(f"/api/v1/devices/d1/commands/{reset}:approve", s.bob)
        assert (status, err["code"]) == (409, "device_revoked"), err
        status, err = s.post("/api/v1/devices/d1/commands", s.alice,
                             {"type": "lock", "reason": "x"})
        assert (status, err["code"]) == (409, "device_revoked")
        # A command queued for it by a path that does not check the device (the
        # outbox's own enqueue): never signed, never published.
        stray = s.enqueue_directly("lock")
        time.sleep(2.5)  # a dispatcher round (it polls every 2 s)
        assert watcher.got == []
        [row] = asyncio.run(fetch(s.database, "SELECT state, payload FROM commands "
                                              "WHERE command_id = $1::uuid", stray))
        assert (row["state"], row["payload"]) == ("queued", None)
        again = s.cli("device", "reenroll", "--tenant", TENANT, "--device", "d1")
        assert again.returncode == 0, again.stderr
        _check_next_holder_gets_nothing_old(s, json.loads(again.stdout), watcher)
        status, err = s.post(f"/api/v1/devices/d1/commands/{reset}:approve", s.bob)
        assert (status, err["code"]) == (409, "terminal"), err
    finally:
        watcher.stop()


def test_reenroll_cancels_the_previous_holders_commands(setup: Setup) -> None:
    s = setup
    commands = _unfinished_commands(s)
    again = s.cli("device", "reenroll", "--tenant", TENANT, "--device", "d1")
    assert again.returncode == 0, again.stderr
    _check_withdrawn(s, commands, "device.reenroll")
    s.restart()
    watcher = Watcher(s.broker.url, commands_topic(TENANT, "d1"))
    watcher.start()
    try:
        reset = next(c for c, before in commands.items() if before == "pending_approval")
        status, err = s.post(f"/api/v1/devices/d1/commands/{reset}:approve", s.bob)
        assert (status, err["code"]) == (409, "terminal"), err
        _check_next_holder_gets_nothing_old(s, json.loads(again.stdout), watcher)
    finally:
        watcher.stop()
