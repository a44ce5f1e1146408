"""Commands end to end: API -> outbox -> signed MQTT -> real agent code -> acks ->
state machine. Real server, PostgreSQL and Mosquitto (the project's config)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent_protocol import (
    Ack,
    commands_topic,
    decode_command,
    encode_ack,
    encode_command,
    sign_command,
)
from agent_protocol.agent import Outcome
from mdm_server.commands.keys import signing_key
from mdm_server.storage.pool import connect
from tests.support.agents import DeviceAgent
from tests.support.mqtt import publish_as_server
from tests.support.services import (
    TEST_MASTER_KEY,
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
DEVICES = ["d1", "d2"]


@dataclass
class Setup:
    server: Server
    broker: Broker
    database: str
    admin: str
    agents: dict[str, DeviceAgent]

    def issue(self, device: str, body: dict[str, Any]) -> dict[str, Any]:
        status, cmd = self.server.request("POST", f"/api/v1/devices/{device}/commands",
                                          self.admin, body)
        assert status == 201, cmd
        return cmd

    def command(self, device: str, command_id: str) -> dict[str, Any]:
        status, cmd = self.server.request(
            "GET", f"/api/v1/devices/{device}/commands/{command_id}", self.admin)
        assert status == 200, cmd
        return cmd

    def wait_state(self, device: str, command_id: str, state: str,
                   timeout: float = 20.0) -> dict[str, Any]:
        return self.server.wait_command(self.admin, device, command_id, state, timeout)

    def stored_payload(self, command_id: str) -> bytes:
        [row] = asyncio.run(fetch(self.database, "SELECT payload FROM commands "
                                                 "WHERE command_id = $1::uuid", command_id))
        return bytes(row["payload"])


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    database = asyncio.run(create_database())
    try:
        with running_broker(tmp_path) as broker:
            enrolled = asyncio.run(enroll_devices(database, broker.url, TENANT, DEVICES))
            srv = Server(server_env(database, broker.url), tmp_path / "serve.log")
            admin = srv.cli("admin", "create", "--tenant", TENANT, "--name", "alice").strip()
            agents = {e["device"]: DeviceAgent(e) for e in enrolled}
            srv.start()
            srv.wait_log("acks subscribed")
            for a in agents.values():
                a.start()
            try:
                yield Setup(srv, broker, database, admin, agents)
            finally:
                for a in agents.values():
                    a.stop()
                srv.stop()
    finally:
        asyncio.run(drop_database(database))


def test_wipe_is_verified_shown_executed_once_and_logged_with_its_notice(setup: Setup) -> None:
    s = setup
    notice = {"text": "Uw organisatie wist haar apps en gegevens.", "lang": "nl"}
    cmd = s.issue("d1", {"type": "wipe", "scope": "managed", "reason": "lost",
                         "notice": notice})
    done = s.wait_state("d1", cmd["command_id"], "completed")
    agent = s.agents["d1"]
    [action] = agent.actions
    assert (action.command_id, action.type, dict(action.params)) == (
        cmd["command_id"], "wipe", {"scope": "managed"})
    [shown] = agent.notices
    assert (shown.text, shown.lang) == (notice["text"], notice["lang"])
    # The user-notice log: the text as sent, when sent, when shown, the outcome.
    assert done["notice"] == notice
    assert done["sent_at"] and done["received_at"] and done["notice_shown_at"]
    assert done["finished_at"] and done["send_count"] == 1
    status, log = s.server.request("GET", "/api/v1/devices/d1/notices", s.admin)
    assert status == 200
    [entry] = log["notices"]
    assert (entry["notice"], entry["state"], entry["sent_at"], entry["notice_shown_at"]) == (
        notice, "completed", done["sent_at"], done["notice_shown_at"])
    assert [(e["event"], e["to"]) for e in done["events"]] == [
        ("created", "queued"), ("published", "sent"), ("ack", "received"),
        ("ack", "notice_shown"), ("ack", "completed")]
    assert not s.agents["d2"].results  # nothing reached the other device
    assert agent.retained == 0  # commands are never retained on the broker
    # The bytes the agent verified are the bytes stored (a resend is identical).
    assert decode_command(s.stored_payload(cmd["command_id"])).notice is not None
    # Acks for it again (duplicate, late, backwards) change nothing and are logged.
    now = int(time.time() * 1000)
    for state in ("completed", "received", "notice_shown"):
        agent.publish_ack(encode_ack(Ack(cmd["command_id"], state, now)))
    deadline = time.monotonic() + 10
    while len(s.command("d1", cmd["command_id"])["events"]) < 8:
        assert time.monotonic() < deadline, s.command("d1", cmd["command_id"])
        time.sleep(0.1)
    after = s.command("d1", cmd["command_id"])
    assert after["state"] == "completed" and after["finished_at"] == done["finished_at"]
    ignored = [e for e in after["events"] if not e["accepted"]]
    assert [e["detail"] for e in ignored] == [
        "completed: ignored (duplicate)", "received: ignored (terminal)",
        "notice_shown: ignored (terminal)"]


def test_acks_from_another_device_or_for_unknown_commands_are_ignored(setup: Setup) -> None:
    s = setup
    s.agents["d1"].hold()
    cmd = s.issue("d1", {"type": "lock", "reason": "left at a client's office"})
    s.wait_state("d1", cmd["command_id"], "sent")
    now = int(time.time() * 1000)
    # d2 claims d1's lock completed; garbage and an unknown id follow.
    s.agents["d2"].publish_ack(encode_ack(Ack(cmd["command_id"], "completed", now)))
    s.agents["d2"].publish_ack(encode_ack(Ack("4f1c1b5e-0000-4000-8000-000000000000",
                                              "completed", now)))
    s.agents["d2"].publish_ack(b"{not json")
    deadline = time.monotonic() + 10
    while not asyncio.run(fetch(s.database, "SELECT 1 FROM dead_letters")):
        assert time.monotonic() < deadline, "the malformed ack was not dead-lettered"
        time.sleep(0.1)
    time.sleep(1)  # the acks before it were applied in the same or an earlier batch
    assert s.command("d1", cmd["command_id"])["state"] == "sent"
    [dead] = asyncio.run(fetch(s.database, "SELECT topic, device_id, reason FROM dead_letters"))
    assert (dead["device_id"], dead["reason"]) == ("d2", "not_json")
    assert "ack ignored" in s.server.log_text()


def test_forged_command_is_rejected_by_the_agent_and_reported(setup: Setup) -> None:
    s = setup
    agent = s.agents["d1"]
    agent.hold()
    cmd = s.issue("d1", {"type": "lock", "reason": "test"})
    s.wait_state("d1", cmd["command_id"], "sent")
    [genuine] = agent.swallowed
    agent.hold(False)
    # Same command, its type changed to a factory reset: the signature no longer holds.
    forged = genuine.replace(b'"type":"lock"', b'"type":"factory_reset"')
    _publish_as_server(s, "d1", forged)
    done = s.wait_state("d1", cmd["command_id"], "rejected")
    assert done["outcome_detail"] == "bad_signature"
    assert agent.actions == []
    # The genuine bytes arriving now change nothing on the server: rejected is final.
    _publish_as_server(s, "d1", genuine)
    agent.wait_results(2)
    time.sleep(1)
    assert s.command("d1", cmd["command_id"])["state"] == "rejected"


def test_expired_replayed_and_misaddressed_commands_are_refused(setup: Setup) -> None:
    s = setup
    a1 = s.agents["d1"]
    first = s.issue("d1", {"type": "locate", "reason": "inventory"})
    s.wait_state("d1", first["command_id"], "completed")
    a1.hold()
    second = s.issue("d1", {"type": "lock", "reason": "inventory"})
    for_d2 = s.issue("d2", {"type": "lock", "reason": "inventory"})
    s.wait_state("d1", second["command_id"], "sent")
    s.wait_state("d2", for_d2["command_id"], "completed")
    a1.hold(False)
    key = _server_key(s)
    original = decode_command(s.stored_payload(second["command_id"]))
    now = int(time.time() * 1000)
    # 1. Expired (genuinely signed, but its time is over).
    expired = sign_command(dataclasses.replace(original, issued_at_ms=now - 120_000,
                                               expires_at_ms=now - 60_000), key)
    _publish_as_server(s, "d1", encode_command(expired))
    # 2. Replayed nonce: the first command's nonce under the second's id.
    used = decode_command(s.stored_payload(first["command_id"]))
    replayed = sign_command(dataclasses.replace(original, nonce=used.nonce), key)
    _publish_as_server(s, "d1", encode_command(replayed))
    # 3. Addressed to d2, sent to d1.
    _publish_as_server(s, "d1", s.stored_payload(for_d2["command_id"]))
    results = a1.wait_results(4)[1:]
    assert [(r.outcome, r.reason) for r in results] == [
        (Outcome.REJECTED, "expired"), (Outcome.REJECTED, "replayed_nonce"),
        (Outcome.REJECTED, "not_for_this_device")]
    assert [a.command_id for a in a1.actions] == [first["command_id"]]
    # The second command was reported rejected (first refusal: expired); d2's
    # command is untouched by d1's reject ack for it.
    done = s.wait_state("d1", second["command_id"], "rejected")
    assert done["outcome_detail"] == "expired"
    assert s.command("d2", for_d2["command_id"])["state"] == "completed"


def test_command_is_resent_when_the_device_reconnects_without_it(setup: Setup) -> None:
    s = setup
    agent = s.agents["d1"]
    agent.hold()  # receives the wipe and dies before acting on it
    cmd = s.issue("d1", {"type": "wipe", "scope": "full", "reason": "stolen"})
    s.wait_state("d1", cmd["command_id"], "sent")
    agent.stop()
    agent.hold(False)
    agent.start(clean_session=True)  # a reinstalled agent: its session is gone
    done = s.wait_state("d1", cmd["command_id"], "completed")
    assert done["send_count"] == 2
    assert [e["event"] for e in done["events"]][:3] == ["created", "published", "resent"]
    assert [a.command_id for a in agent.actions] == [cmd["command_id"]]
    # Another reconnect after completion: nothing is sent again, and nothing was
    # retained on the broker for a new subscription to pick up.
    seen = len(agent.results)
    agent.stop()
    agent.start(clean_session=True)
    time.sleep(3)
    assert s.command("d1", cmd["command_id"])["send_count"] == 2
    assert len(agent.results) == seen and agent.retained == 0


def test_wipe_accepted_while_the_broker_is_away_survives_a_server_kill(setup: Setup) -> None:
    s = setup
    s.broker.stop()
    cmd = s.issue("d1", {"type": "wipe", "scope": "managed", "reason": "lost"})
    assert cmd["state"] == "queued"
    s.server.kill()  # SIGKILL: accepted, never sent
    s.broker.start()
    s.server.start()
    done = s.wait_state("d1", cmd["command_id"], "completed", timeout=40)
    events = [e["event"] for e in done["events"]]
    # The outbox publishes it once after the restart. If the device's reconnect is
    # seen after that, the reconnect rule sends it again ("resent"); the agent
    # recognises the command id and acts once.
    assert events[:2] == ["created", "published"] and events.count("published") == 1, events
    assert done["send_count"] == 1 + events.count("resent"), (done["send_count"], events)
    time.sleep(3)
    assert [a.command_id for a in s.agents["d1"].actions] == [cmd["command_id"]]


def test_command_not_received_before_its_expiry_expires(setup: Setup) -> None:
    # A published command expires SENT_EXPIRY_GRACE_S (120 s) after its expiry.
    s = setup
    s.agents["d1"].hold()
    cmd = s.issue("d1", {"type": "lock", "reason": "test"})
    s.wait_state("d1", cmd["command_id"], "sent")
    asyncio.run(fetch(s.database, "UPDATE commands SET created_at = now() - interval '2 h', "
                                  "expires_at = now() - interval '121 s' "
                                  "WHERE command_id = $1::uuid", cmd["command_id"]))
    done = s.wait_state("d1", cmd["command_id"], "expired")
    assert done["events"][-1]["event"] == "expired"
    # A late ack cannot revive it.
    s.agents["d1"].publish_ack(encode_ack(Ack(cmd["command_id"], "completed",
                                              int(time.time() * 1000))))
    time.sleep(2)
    assert s.command("d1", cmd["command_id"])["state"] == "expired"


def test_an_agent_restart_keeps_its_nonces_and_executed_commands(setup: Setup,
                                                                 tmp_path: Path) -> None:
    """The agent's command state outlives its process: a replay of a command it
    executed before a restart is not executed again, and a new command reusing an
    accepted nonce is refused; an agent that kept nothing executes the replay."""
    s = setup
    enrollment = s.agents["d1"].enrollment
    s.agents["d1"].stop()
    state = tmp_path / "d1-agent-state.json"
    first = DeviceAgent(enrollment, port=s.broker.port, state=state)
    first.start()
    try:
        cmd = s.issue("d1", {"type": "lock", "reason": "before the restart"})
        s.wait_state("d1", cmd["command_id"], "completed")
        [action] = first.actions
    finally:
        first.stop()
    assert state.exists() and action.command_id == cmd["command_id"]
    payload = s.stored_payload(cmd["command_id"])
    replay = dataclasses.replace(decode_command(payload),
                                 command_id="0192f1c2-0000-7000-8000-00000000abcd", sig="")
    same_nonce = encode_command(sign_command(replay, _server_key(s)))

    restarted = DeviceAgent(enrollment, port=s.broker.port, state=state)
    restarted.start()
    try:
        _publish_as_server(s, "d1", payload)
        _publish_as_server(s, "d1", same_nonce)
        # (The broker may also hand the restarted session a message the first one
        # took but had not acknowledged yet: one more duplicate.)
        results = restarted.wait_results(2)
        deadline = time.monotonic() + 10
        while replay.command_id not in {r.command_id for r in results}:
            assert time.monotonic() < deadline, "the replay with the same nonce never came"
            results = restarted.wait_results(len(results) + 1)
        by_id = {r.command_id: r for r in results}
        assert all(r.outcome is Outcome.DUPLICATE for r in results
                   if r.command_id == cmd["command_id"])
        assert (by_id[replay.command_id].outcome, by_id[replay.command_id].reason) == (
            Outcome.REJECTED, "replayed_nonce")
        assert restarted.actions == []  # nothing executed again
    finally:
        restarted.stop()
    # The control: an agent that forgot its state executes the same replay again.
    # (A clean session: nothing the broker may still hold for the client id.)
    amnesiac = DeviceAgent(enrollment, port=s.broker.port)
    amnesiac.start(clean_session=True)
    try:
        _publish_as_server(s, "d1", payload)
        [result] = amnesiac.wait_results(1)
        assert result.outcome is Outcome.EXECUTED and len(amnesiac.actions) == 1
    finally:
        amnesiac.stop()


# -- helpers -------------------------------------------------------------------


def _server_key(s: Setup) -> Any:
    async def get() -> Any:
        conn = await connect(s.database)
        try:
            return (await signing_key(conn, base64.b64decode(TEST_MASTER_KEY)))[1]
        finally:
            await conn.close()
    return asyncio.run(get())


def _private_key(s: Setup, key_id: str) -> Any:
    from mdm_server.commands.keys import decrypt_private_key

    [row] = asyncio.run(fetch(s.database, "SELECT private_key_enc FROM signing_keys "
                                          "WHERE key_id = $1", key_id))
    return decrypt_private_key(bytes(row["private_key_enc"]), key_id,
                               base64.b64decode(TEST_MASTER_KEY))


def _publish_as_server(s: Setup, device: str, payload: bytes) -> None:
    """Publish on a device's commands topic with the server's own MQTT identity."""
    publish_as_server(s.server.env["MDM_MQTT_URL"], commands_topic(TENANT, device), payload)


def test_key_rotation_keeps_devices_on_the_old_key_until_they_confirm_the_new(
        setup: Setup) -> None:
    s = setup
    old_key = decode_command(s.stored_payload(
        s.wait_state("d1", s.issue("d1", {"type": "locate", "reason": "before"})["command_id"],
                     "completed")["command_id"])).key_id
    s.agents["d2"].stop()  # d2 is offline while the key rotates
    new_key = s.server.cli("keys", "rotate").strip()
    assert new_key != old_key
    # The device that is online confirms the new key; its next command uses it.
    deadline = time.monotonic() + 20
    while not _trusts(s, "d1", new_key):
        assert time.monotonic() < deadline, "d1 never confirmed the new key"
        time.sleep(0.1)
    after = s.issue("d1", {"type": "lock", "reason": "after"})
    s.wait_state("d1", after["command_id"], "completed")
    assert decode_command(s.stored_payload(after["command_id"])).key_id == new_key
    # d2 has not heard of the new key: its lock is signed with the old one, and the
    # old key cannot be retired while d2 depends on it.
    pending = s.issue("d2", {"type": "lock", "reason": "offline"})
    deadline = time.monotonic() + 20
    while s.command("d2", pending["command_id"])["issued_at"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert decode_command(s.stored_payload(pending["command_id"])).key_id == old_key
    refused = subprocess.run([sys.executable, "-m", "mdm_server", "keys", "retire", old_key],
                             env=s.server.env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "1 enrolled device(s)" in refused.stderr
    # d2 comes back: it gets the new key (signed with the old) and its lock.
    s.agents["d2"].start()
    s.wait_state("d2", pending["command_id"], "completed")
    deadline = time.monotonic() + 20
    while not _trusts(s, "d2", new_key):
        assert time.monotonic() < deadline, "d2 never confirmed the new key"
        time.sleep(0.1)
    old_private = _private_key(s, old_key)  # what a thief of the old key would hold
    s.server.cli("keys", "retire", old_key)
    last = s.issue("d2", {"type": "lock", "reason": "after retirement"})
    s.wait_state("d2", last["command_id"], "completed")
    assert decode_command(s.stored_payload(last["command_id"])).key_id == new_key
    # Every device was sent a signed distrust_key: the agents drop the old key, and
    # the server forgets that they trusted it once they confirm.
    deadline = time.monotonic() + 20
    while _trusts(s, "d1", old_key) or _trusts(s, "d2", old_key):
        assert time.monotonic() < deadline, "a device never confirmed distrust_key"
        time.sleep(0.1)
    for device in DEVICES:
        assert set(s.agents[device].handler.keys) == {new_key}
    distrusts = asyncio.run(fetch(s.database, "SELECT device_id, state, params FROM commands "
                                              "WHERE type = 'distrust_key'"))
    assert sorted((r["device_id"], r["state"], r["params"]["key_id"]) for r in distrusts) == [
        ("d1", "completed", old_key), ("d2", "completed", old_key)]
    # The retired key's private half is gone from the database ...
    [row] = asyncio.run(fetch(s.database, "SELECT private_key_enc FROM signing_keys "
                                          "WHERE key_id = $1", old_key))
    assert row["private_key_enc"] is None
    # ... and a command signed with it (by whoever kept a copy) is refused by the agents.
    forged = decode_command(s.stored_payload(last["command_id"]))
    forged = dataclasses.replace(forged, command_id="0192f1c2-0000-7000-8000-00000000f0f0",
                                 nonce="after-retirement-1", key_id=old_key, sig="")
    before = len(s.agents["d2"].results)
    _publish_as_server(s, "d2", encode_command(sign_command(forged, old_private)))
    [result] = s.agents["d2"].wait_results(before + 1)[before:]
    assert (result.outcome, result.reason) == (Outcome.REJECTED, "unknown_key")
    listed = [json.loads(line) for line in s.server.cli("keys", "list").splitlines()]
    assert {(k["key_id"], k["retired_at"] is None, k["trusted_by_devices"]) for k in listed} \
        == {(old_key, False, 0), (new_key, True, 2)}


def _trusts(s: Setup, device: str, key_id: str) -> bool:
    [row] = asyncio.run(fetch(s.database, "SELECT $2 = ANY(trusted_key_ids) AS t FROM devices "
                                          "WHERE device_id = $1", device, key_id))
    return bool(row["t"])
