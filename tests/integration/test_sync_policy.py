"""A policy change sends every device of the tenant one signed ``sync_policy``.

The real server, PostgreSQL and Mosquitto; the devices are plain paho clients
subscribed to their commands topics (persistent sessions, as agents run them).
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion

from agent_protocol import CommandRejected, NonceStore, commands_topic, verify_command
from tests.support.services import (
    Broker,
    Server,
    create_database,
    drop_database,
    enroll_devices,
    fetch,
    running_broker,
    server_env,
)

pytestmark = pytest.mark.integration

TENANT = "acme"
DEVICES = ["d1", "d2", "d3"]


@dataclass
class Devices:
    """One persistent-session subscriber per device, recording what arrives."""

    port: int
    received: dict[str, list[paho.MQTTMessage]] = field(default_factory=dict)
    clients: list[paho.Client] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, enrollments: list[dict[str, Any]]) -> None:
        for e in enrollments:
            d, m = e["device"], e["mqtt"]
            self.received[d] = []
            subscribed = threading.Event()
            # Each device logs in as itself: the broker lets nobody else read its commands.
            c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                            client_id=m["client_id"], clean_session=False,
                            protocol=paho.MQTTv311)
            c.username_pw_set(m["username"], m["password"])
            c.reconnect_delay_set(1, 1)

            def on_connect(c: paho.Client, u: Any, f: Any, rc: Any, p: Any,
                           d: str = d) -> None:
                c.subscribe(commands_topic(TENANT, d), qos=1)

            def on_message(c: paho.Client, u: Any, msg: paho.MQTTMessage, d: str = d) -> None:
                with self.lock:
                    self.received[d].append(msg)

            def on_subscribe(c: paho.Client, u: Any, mid: int, rcs: Any, p: Any,
                             ev: threading.Event = subscribed) -> None:
                ev.set()

            c.on_connect, c.on_message, c.on_subscribe = on_connect, on_message, on_subscribe
            c.connect("127.0.0.1", self.port, keepalive=30)
            c.loop_start()
            assert subscribed.wait(10), "no SUBACK"
            self.clients.append(c)

    def stop(self) -> None:
        for c in self.clients:
            c.disconnect()
            c.loop_stop()

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {d: len(m) for d, m in self.received.items()}

    def messages(self, device: str) -> list[paho.MQTTMessage]:
        with self.lock:
            return list(self.received[device])

    def wait_counts(self, expected: dict[str, int], timeout: float = 30.0,
                    settle: float = 4.0) -> dict[str, int]:
        """Wait until every device has its count, then watch ``settle`` s for extras."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.counts()[d] >= n for d, n in expected.items()):
                break
            time.sleep(0.05)
        time.sleep(settle)  # longer than the dispatcher's poll: a double would show
        return self.counts()


@dataclass
class Setup:
    server: Server
    broker: Broker
    database: str
    admin: str
    enrollments: dict[str, dict[str, Any]]
    devices: Devices


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    database = asyncio.run(create_database())
    try:
        with running_broker(tmp_path) as broker:
            srv = Server(server_env(database, broker.url), tmp_path / "serve.log")
            enrolled = asyncio.run(enroll_devices(database, broker.url, TENANT, DEVICES))
            admin = srv.cli("admin", "create", "--tenant", TENANT, "--name", "alice").strip()
            devices = Devices(broker.port)
            devices.start(enrolled)
            srv.start()
            try:
                yield Setup(srv, broker, database, admin,
                            {e["device"]: e for e in enrolled}, devices)
            finally:
                srv.stop()
                devices.stop()
    finally:
        asyncio.run(drop_database(database))


def _verify(s: Setup, device: str, payload: bytes, as_device: str | None = None) -> Any:
    keys = {k: Ed25519PublicKey.from_public_bytes(base64.b64decode(v))
            for k, v in s.enrollments[device]["server_keys"].items()}
    return verify_command(payload, keys=keys, tenant=TENANT, device=as_device or device,
                          now_ms=int(time.time() * 1000), seen_nonces=NonceStore())


def _states(s: Setup) -> list[tuple[str, str, str]]:
    rows = asyncio.run(fetch(s.database, "SELECT device_id, type, state FROM commands "
                                         "ORDER BY device_id, created_at"))
    return [(r["device_id"], r["type"], r["state"]) for r in rows]


def _wait_states(s: Setup, state: str, n: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(1 for *_, st in _states(s) if st == state) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"expected {n} {state}: {_states(s)}")


POLICY = {"applies_to": {}, "collect": {"apps": False}}


def test_policy_change_sends_each_device_one_signed_sync_policy(setup: Setup) -> None:
    s = setup
    status, _ = s.server.request("PUT", "/api/v1/policies/default", s.admin, POLICY)
    assert status == 200
    counts = s.devices.wait_counts({d: 1 for d in DEVICES})
    assert counts == {d: 1 for d in DEVICES}
    for d in DEVICES:
        [msg] = s.devices.messages(d)
        assert msg.retain is False
        assert msg.topic == commands_topic(TENANT, d)
        cmd = _verify(s, d, msg.payload)
        assert (cmd.type, cmd.tenant, cmd.device, cmd.notice) == ("sync_policy", TENANT, d, None)
        assert cmd.key_id in s.enrollments[d]["server_keys"]
        other = next(x for x in DEVICES if x != d)
        with pytest.raises(CommandRejected) as exc:
            _verify(s, d, msg.payload, as_device=other)
        assert exc.value.reason == "not_for_this_device"
        tampered = msg.payload.replace(b'"sync_policy"', b'"factory_reset"')
        with pytest.raises(CommandRejected) as exc:
            _verify(s, d, tampered)
        assert exc.value.reason == "bad_signature"
    _wait_states(s, "sent", 3)
    assert _states(s) == [(d, "sync_policy", "sent") for d in DEVICES]
    rows = asyncio.run(fetch(s.database, "SELECT command_id::text AS id, payload, sent_at, "
                                         "requested_by FROM commands"))
    # The stored bytes are the bytes sent (a resend would be identical).
    by_id = {r["id"]: r for r in rows}
    for d in DEVICES:
        [msg] = s.devices.messages(d)
        cmd = _verify(s, d, msg.payload)
        assert bytes(by_id[cmd.command_id]["payload"]) == msg.payload
        assert by_id[cmd.command_id]["requested_by"] == "alice"
        assert by_id[cmd.command_id]["sent_at"] is not None
    # A deletion is a policy change too.
    s.server.request("PUT", "/api/v1/policies/extra", s.admin, POLICY)
    assert s.server.request("DELETE", "/api/v1/policies/extra", s.admin)[0] == 204
    assert s.devices.wait_counts({d: 3 for d in DEVICES}) == {d: 3 for d in DEVICES}
    # A refused change sends nothing.
    assert s.server.request("PUT", "/api/v1/policies/bad", s.admin, {"collect": 1})[0] == 422
    assert s.server.request("DELETE", "/api/v1/policies/nope", s.admin)[0] == 404
    assert s.devices.wait_counts({d: 3 for d in DEVICES}, settle=3) == {d: 3 for d in DEVICES}


def test_commands_wait_in_the_outbox_while_the_broker_is_away(setup: Setup) -> None:
    s = setup
    s.broker.stop()
    status, _ = s.server.request("PUT", "/api/v1/policies/default", s.admin, POLICY)
    assert status == 200  # the API does not need the broker
    time.sleep(3)  # the dispatcher polls meanwhile: nothing may be lost or marked sent
    assert _states(s) == [(d, "sync_policy", "queued") for d in DEVICES]
    s.broker.start()
    assert s.devices.wait_counts({d: 1 for d in DEVICES}) == {d: 1 for d in DEVICES}
    for d in DEVICES:
        [msg] = s.devices.messages(d)
        assert msg.retain is False
        assert _verify(s, d, msg.payload).type == "sync_policy"
    _wait_states(s, "sent", 3)


def test_a_server_restart_between_accept_and_send_loses_nothing(setup: Setup) -> None:
    s = setup
    s.broker.stop()
    status, _ = s.server.request("PUT", "/api/v1/policies/default", s.admin, POLICY)
    assert status == 200
    s.server.stop()  # SIGINT: accepted, never sent
    assert _states(s) == [(d, "sync_policy", "queued") for d in DEVICES]
    s.server.start()
    s.broker.start()
    assert s.devices.wait_counts({d: 1 for d in DEVICES}) == {d: 1 for d in DEVICES}
    for d in DEVICES:
        [msg] = s.devices.messages(d)
        assert _verify(s, d, msg.payload).type == "sync_policy"
    _wait_states(s, "sent", 3)
    assert s.server.proc is not None and s.server.proc.poll() is None
