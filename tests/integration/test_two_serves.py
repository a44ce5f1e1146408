"""Two serves on one Mosquitto and one database, each with its own MDM_INSTANCE.

A second MQTT session with a client id takes the first over, so two serves with the
same ids push each other off the broker for ever (found by the cluster fault
tests). With MDM_INSTANCE each serve's ingest, acks and dispatch sessions have ids
of their own: neither is disconnected, both share the ingest's shared
subscription, and commands and acks flow through either.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.agents import DeviceAgent
from tests.support.mqtt import publish_all
from tests.support.services import (
    Server,
    device_credentials,
    free_port,
    served,
    wait_for_count,
)
from tests.support.telemetry import location

pytestmark = pytest.mark.integration

LOST = "disconnected from the broker"


@dataclass
class Pair:
    a: Server
    b: Server
    admin: str


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    def setup(srv: Server) -> None:
        for d in ("d1", "d2"):
            srv.cli("device", "enroll", "--tenant", "acme", "--device", d,
                    "--ownership", "corporate")

    tmp = tmp_path_factory.mktemp("two")
    with served(tmp, setup=setup, MDM_INSTANCE="a") as a:
        b = Server({**a.env, "MDM_INSTANCE": "b",
                    "MDM_HTTP_ADDR": f"127.0.0.1:{free_port()}"}, tmp / "serve-b.log")
        b.start()
        try:
            admin = a.cli("admin", "create", "--tenant", "acme", "--name", "alice").strip()
            yield Pair(a, b, admin)
        finally:
            b.stop()


def test_neither_serve_pushes_the_other_off_the_broker(pair: Pair) -> None:
    before = [s.log_text().count(LOST) for s in (pair.a, pair.b)]
    time.sleep(6.0)
    after = [s.log_text().count(LOST) for s in (pair.a, pair.b)]
    assert after == before, f"disconnections in 6 s: {after[0] - before[0]}, " \
                            f"{after[1] - before[1]}"


def test_both_ingest_and_nothing_is_stored_twice(pair: Pair) -> None:
    user, password = device_credentials("acme", "d1")
    port = int(pair.a.env["BROKER_PORT"])
    sent = publish_all("127.0.0.1", port, (location("acme", "d1", i) for i in range(2000)),
                       client_id=user, username=user, password=password, timeout=60)
    assert sent == 2000
    db = pair.a.env["TEST_DATABASE"]
    assert wait_for_count(db, "SELECT count(*) FROM telemetry WHERE device_id = 'd1'", 2000,
                          timeout=60, settle=1.0) == 2000
    assert wait_for_count(db, "SELECT count(DISTINCT record_id) FROM telemetry "
                              "WHERE device_id = 'd1'", 2000, timeout=10) == 2000


def test_a_command_through_either_serve_completes(pair: Pair) -> None:
    import json

    enrollment = json.loads(pair.a.cli("device", "reenroll", "--tenant", "acme",
                                       "--device", "d2"))
    agent = DeviceAgent(enrollment)
    agent.start()
    try:
        for srv in (pair.a, pair.b):
            status, cmd = srv.request("POST", "/api/v1/devices/d2/commands", pair.admin,
                                      {"type": "locate", "reason": "test"})
            assert status == 201, cmd
            deadline = time.monotonic() + 30
            while (state := srv.request("GET", f"/api/v1/devices/d2/commands/"
                                        f"{cmd['command_id']}", pair.admin)[1]["state"]
                   ) != "completed":
                assert time.monotonic() < deadline, state
                time.sleep(0.2)
    finally:
        agent.stop()
    assert [a.type for a in agent.actions] == ["locate", "locate"]
