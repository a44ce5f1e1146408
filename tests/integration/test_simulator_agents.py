"""The fleet simulator's devices run the agent side for real: a group wipe issued
through the API is verified, shown, executed once and acked by each device; a
forged command is refused and reported."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent_protocol import commands_topic
from load_tests.simulator import Fleet, enroll_fleet
from tests.support.mqtt import publish_as_server
from tests.support.services import (
    Server,
    create_database,
    drop_database,
    fetch,
    running_broker,
    server_env,
)

pytestmark = pytest.mark.integration

TENANT = "fleet"


def _states(database: str) -> dict[str, str]:
    rows = asyncio.run(fetch(database, "SELECT device_id, state FROM commands "
                                       "WHERE type = 'wipe'"))
    return {r["device_id"]: r["state"] for r in rows}


def test_simulated_agents_verify_show_execute_and_ack_a_group_wipe(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    from tests.support.services import TEST_MASTER_KEY

    monkeypatch.setenv("MDM_MASTER_KEY", TEST_MASTER_KEY)
    database = asyncio.run(create_database())
    try:
        with running_broker(tmp_path) as broker:
            # Sent to the broker's TLS listener with its CA, as the CLI's enrollment does.
            enrollments = asyncio.run(enroll_fleet(database, broker.url, TENANT, 5,
                                                   personal_share=0.2, seed=7,
                                                   device_url=broker.device_url,
                                                   ca_pem=broker.ca_pem))
            assert {e["mqtt"]["url"] for e in enrollments} == {broker.device_url}
            personal = {e["device"] for e in enrollments if e["ownership"] == "personal"}
            assert len(personal) == 1
            asyncio.run(fetch(database, "UPDATE devices SET groups = '{crate-9}'"))
            srv = Server(server_env(database, broker.url), tmp_path / "serve.log")
            admin = srv.cli("admin", "create", "--tenant", TENANT, "--name", "ops").strip()
            srv.start()
            try:
                srv.wait_log("acks subscribed")
                with Fleet(enrollments, broker.url, agents=True) as fleet:
                    assert fleet.serve_commands(lambda: fleet.agents_subscribed == 5,
                                                timeout=30)
                    status, batch = srv.request(
                        "POST", "/api/v1/groups/crate-9/commands", admin,
                        {"type": "wipe", "scope": "full", "reason": "crate lost"})
                    assert status == 201 and batch["commands"] == 4, batch
                    corporate = {e["device"] for e in enrollments} - personal
                    assert fleet.serve_commands(
                        lambda: set(_states(database)) == corporate
                        and set(_states(database).values()) == {"completed"}, timeout=30)
                    stats = fleet.agent_stats
                    assert (stats.executed, stats.notices_shown, dict(stats.by_type)) == (
                        4, 4, {"wipe": 4})
                    # A command not signed by the server: refused, reported, not run.
                    publish_as_server(srv.env["MDM_MQTT_URL"],
                                      commands_topic(TENANT, sorted(corporate)[0]),
                                      _forged(database))
                    assert fleet.serve_commands(lambda: sum(stats.rejected.values()) == 1,
                                                timeout=15)
                    assert dict(stats.rejected) == {"bad_signature": 1}
                    assert stats.executed == 4
                    status, progress = srv.request(
                        "GET", f"/api/v1/command-batches/{batch['batch_id']}", admin)
                    assert progress["done"] and progress["states"] == {"completed": 4}
            finally:
                srv.stop()
    finally:
        asyncio.run(drop_database(database))


def _forged(database: str) -> bytes:
    [row] = asyncio.run(fetch(database, "SELECT payload FROM commands WHERE type = 'wipe' "
                                        "ORDER BY device_id LIMIT 1"))
    return bytes(row["payload"]).replace(b'"scope":"full"', b'"scope":"managed"')


def test_simulated_users_answer_a_remote_view_as_their_consent_policy_says(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Half the simulated users accept (drawn per device from the seed): each yes
    is a view run once and a completed command, each no a consent_refused one."""
    from tests.support.services import TEST_MASTER_KEY

    monkeypatch.setenv("MDM_MASTER_KEY", TEST_MASTER_KEY)
    database = asyncio.run(create_database())
    try:
        with running_broker(tmp_path) as broker:
            enrollments = asyncio.run(enroll_fleet(database, broker.url, TENANT, 6,
                                                   personal_share=0.5, seed=3,
                                                   device_url=broker.device_url,
                                                   ca_pem=broker.ca_pem))
            srv = Server(server_env(database, broker.url), tmp_path / "serve.log")
            admin = srv.cli("admin", "create", "--tenant", TENANT, "--name", "ops").strip()
            srv.start()
            try:
                srv.wait_log("acks subscribed")
                with Fleet(enrollments, broker.url, agents=True, consent=0.5,
                           seed=3) as fleet:
                    assert fleet.serve_commands(lambda: fleet.agents_subscribed == 6,
                                                timeout=30)
                    ids = {}
                    for e in enrollments:
                        status, cmd = srv.request(
                            "POST", f"/api/v1/devices/{e['device']}/commands", admin,
                            {"type": "remote_view", "mode": "screenshot",
                             "reason": "support call",
                             "notice": {"text": "May we see your screen?", "lang": "en"}})
                        assert status == 201, cmd
                        ids[cmd["command_id"]] = e["device"]

                    def states() -> dict[str, str]:
                        rows = asyncio.run(fetch(database, "SELECT command_id::text AS id, "
                                                           "state FROM commands "
                                                           "WHERE type = 'remote_view'"))
                        return {r["id"]: r["state"] for r in rows}

                    assert fleet.serve_commands(
                        lambda: set(states().values()) <= {"completed", "consent_refused"},
                        timeout=30), states()
                    stats = fleet.agent_stats
                    expected = {cid: {"given": "completed", "refused": "consent_refused"}[a]
                                for cid, a in stats.consent.items()}
                    assert expected == states() and set(states()) == set(ids)
                    answers = sorted(stats.consent.values())
                    assert set(answers) == {"given", "refused"}, answers  # a mix
                    assert stats.by_type["remote_view"] == answers.count("given")
                    assert stats.notices_shown == 6
            finally:
                srv.stop()
    finally:
        asyncio.run(drop_database(database))
