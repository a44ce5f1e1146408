"""Remote view end to end: API -> signed command -> the real agent code asks its
user -> consent acks -> state machine, notice log and audit log. Real server,
PostgreSQL and Mosquitto (the project's config); the devices connect over TLS."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest

from agent_protocol import Ack, encode_ack
from agent_protocol.agent import Action, Outcome
from tests.support.agents import DeviceAgent
from tests.support.services import (
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
ASK = {"text": "Uw beheerder wil één schermafbeelding van dit toestel maken. "
               "Er gebeurt niets zonder uw toestemming.", "lang": "nl"}
REASON = "the scanner app freezes at log-in"


@dataclass
class Setup:
    server: Server
    database: str
    admin: str
    agents: dict[str, DeviceAgent]

    def view(self, device: str, mode: str = "screenshot") -> dict[str, Any]:
        status, cmd = self.server.request(
            "POST", f"/api/v1/devices/{device}/commands", self.admin,
            {"type": "remote_view", "mode": mode, "reason": REASON, "notice": ASK})
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

    def wait_events(self, device: str, command_id: str, n: int) -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while len((cmd := self.command(device, command_id))["events"]) < n:
            assert time.monotonic() < deadline, cmd
            time.sleep(0.1)
        return cmd

    def audit(self, command_id: str) -> list[dict[str, Any]]:
        status, page = self.server.request("GET", "/api/v1/audit?limit=500", self.admin)
        assert status == 200, page
        return [e for e in reversed(page["entries"])
                if e["details"].get("command_id") == command_id]

    def notices(self, device: str, token: str | None = None,
                path: str = "/api/v1/devices") -> list[dict[str, Any]]:
        status, log = self.server.request("GET", f"{path}/{device}/notices",
                                          token or self.admin)
        assert status == 200, log
        return list(log["notices"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("remote-view")
    database = asyncio.run(create_database())
    try:
        with running_broker(tmp) as broker:
            enrolled = asyncio.run(enroll_devices(database, broker.url, TENANT, ["d1", "d2"]))
            enrolled += asyncio.run(enroll_devices(database, broker.url, TENANT, ["p1"],
                                                   "personal"))
            srv = Server(server_env(database, broker.url), tmp / "serve.log")
            admin = srv.cli("admin", "create", "--tenant", TENANT, "--name", "alice").strip()
            agents = {e["device"]: DeviceAgent(e) for e in enrolled}
            srv.start()
            srv.wait_log("acks subscribed")
            for a in agents.values():
                a.start()
            try:
                yield Setup(srv, database, admin, agents)
            finally:
                for a in agents.values():
                    a.stop()
                srv.stop()
    finally:
        asyncio.run(drop_database(database))


def _events(cmd: dict[str, Any]) -> list[tuple[str, str | None, bool]]:
    return [(e["event"], e["to"], e["accepted"]) for e in cmd["events"]]


def test_consent_given_on_a_corporate_device_shows_logs_and_completes(setup: Setup) -> None:
    s = setup
    agent = s.agents["d1"]
    agent.consent = "accept"
    cmd = s.view("d1")
    assert cmd["params"] == {"mode": "screenshot", "reason": REASON}
    done = s.wait_state("d1", cmd["command_id"], "completed")
    # The device showed the notice, asked, and ran the view once, after the yes.
    [shown] = agent.notices
    assert (shown.text, shown.lang) == (ASK["text"], ASK["lang"])
    [question] = agent.questions
    assert (question.params, question.text) == (cmd["params"], ASK["text"])
    assert agent.actions == [Action(cmd["command_id"], "remote_view", cmd["params"])]
    # Every step is a command event, in order: the user's live view reads these.
    assert _events(done) == [
        ("created", "queued", True), ("published", "sent", True),
        ("ack", "received", True), ("ack", "notice_shown", True),
        ("ack", "consent_given", True), ("ack", "completed", True)]
    shown_at, consent_at = (datetime.fromisoformat(done[k])
                            for k in ("notice_shown_at", "consent_at"))
    assert shown_at <= consent_at <= datetime.fromisoformat(done["finished_at"])
    # The notice log, for the admins and for the device's user: the notice as
    # sent, when shown, the user's answer and the outcome.
    user = s.server.cli("user", "token", "--tenant", TENANT, "--device", "d1").strip()
    for entries in (s.notices("d1"), s.notices("d1", user, "/api/v1/me/devices")):
        [entry] = [n for n in entries if n["command_id"] == cmd["command_id"]]
        assert (entry["type"], entry["notice"], entry["state"], entry["consent"]) == (
            "remote_view", ASK, "completed", "given")
        assert (entry["notice_shown_at"], entry["consent_at"]) == (
            done["notice_shown_at"], done["consent_at"])
    # The audit log: the request and the user's answer, codes only (never the
    # notice text or the reason).
    entries = s.audit(cmd["command_id"])
    assert [(e["action"], e["actor"], e["details"]) for e in entries] == [
        ("command.issue", "alice",
         {"command_id": cmd["command_id"], "type": "remote_view", "mode": "screenshot"}),
        ("command.consent", "device:d1",
         {"command_id": cmd["command_id"], "type": "remote_view", "mode": "screenshot",
          "answer": "given"})]
    assert all(e["integrity"] == "verified" for e in entries)


def test_consent_refused_ends_the_command_and_nothing_runs(setup: Setup) -> None:
    s = setup
    agent = s.agents["d2"]
    agent.consent = "refuse"
    cmd = s.view("d2", mode="session")
    done = s.wait_state("d2", cmd["command_id"], "consent_refused")
    assert done["outcome_detail"] == "refused" and done["consent_at"] and done["finished_at"]
    assert agent.actions == []
    [answer] = agent.answers
    assert (answer.outcome, answer.reason) == (Outcome.CONSENT_REFUSED, "refused")
    assert _events(done)[-3:] == [("ack", "received", True), ("ack", "notice_shown", True),
                                  ("ack", "consent_refused", True)]
    [entry] = [n for n in s.notices("d2") if n["command_id"] == cmd["command_id"]]
    assert (entry["state"], entry["consent"], entry["outcome_detail"]) == (
        "consent_refused", "refused", "refused")
    assert s.audit(cmd["command_id"])[-1]["details"] == {
        "command_id": cmd["command_id"], "type": "remote_view", "mode": "session",
        "answer": "refused", "detail": "refused"}
    # The refusal is final: a yes and a completion claimed afterwards change nothing.
    now = int(time.time() * 1000)
    for state in ("consent_given", "completed"):
        agent.publish_ack(encode_ack(Ack(cmd["command_id"], state, now)))
    after = s.wait_events("d2", cmd["command_id"], len(done["events"]) + 2)
    assert after["state"] == "consent_refused"
    assert [e["detail"] for e in after["events"][-2:]] == [
        "consent_given: ignored (terminal)", "completed: ignored (terminal)"]


def test_a_personal_device_without_its_users_yes_is_never_completed(setup: Setup) -> None:
    s = setup
    agent = s.agents["p1"]
    agent.consent = "ask"
    cmd = s.view("p1")
    cid = cmd["command_id"]
    s.wait_state("p1", cid, "notice_shown")
    [question] = agent.wait_questions(1)
    assert question.command_id == cid and agent.actions == []
    # An agent claiming the view done without the user's answer: not believed.
    agent.publish_ack(encode_ack(Ack(cid, "completed", int(time.time() * 1000))))
    waiting = s.wait_events("p1", cid, 5)
    assert waiting["state"] == "notice_shown" and waiting["consent_at"] is None
    assert waiting["events"][-1]["detail"] == "completed: ignored (no_consent)"
    # The database refuses it too, whatever writes it.
    with pytest.raises(Exception, match="commands_remote_view_consent"):
        asyncio.run(fetch(s.database, "UPDATE commands SET state = 'completed' "
                                      "WHERE command_id = $1::uuid", cid))
    # The user says no: refused, and nothing ran.
    result = agent.answer(cid, False)
    assert result.outcome is Outcome.CONSENT_REFUSED
    done = s.wait_state("p1", cid, "consent_refused")
    assert done["outcome_detail"] == "refused" and agent.actions == []
    assert [e["details"].get("answer") for e in s.audit(cid)] == [None, "refused"]


def test_a_remote_view_nobody_answers_expires_and_a_late_yes_runs_nothing(
        setup: Setup) -> None:
    s = setup
    agent = s.agents["d1"]
    agent.consent = "ask"
    before = len(agent.actions)
    cmd = s.view("d1")
    cid = cmd["command_id"]
    s.wait_state("d1", cid, "notice_shown")
    question = next(q for q in agent.wait_questions(2) if q.command_id == cid)
    # Time passes: the expiry and the two minutes' grace for an answer on its way.
    asyncio.run(fetch(s.database, "UPDATE commands SET created_at = now() - interval '1 h', "
                                  "expires_at = now() - interval '121 s' "
                                  "WHERE command_id = $1::uuid", cid))
    done = s.wait_state("d1", cid, "expired")
    assert done["events"][-1] == {**done["events"][-1], "event": "expired",
                                  "from": "notice_shown", "to": "expired"}
    assert done["consent_at"] is None
    # The user taps "accept" after the expiry: the agent refuses it and runs nothing.
    late = agent.answer(cid, True, now_ms=question.expires_at_ms)
    assert (late.outcome, late.reason, late.action) == (
        Outcome.CONSENT_REFUSED, "expired", None)
    after = s.wait_events("d1", cid, len(done["events"]) + 1)
    assert after["state"] == "expired"
    assert after["events"][-1]["detail"] == "consent_refused: ignored (terminal)"
    assert len(agent.actions) == before
    [entry] = [n for n in s.notices("d1") if n["command_id"] == cid]
    assert (entry["state"], entry["consent"]) == ("expired", None)
