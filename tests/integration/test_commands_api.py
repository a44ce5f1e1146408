"""The commands API against the real server and PostgreSQL: guards, approval,
idempotency, cancellation, notices, tenant isolation. Delivery to real agents is
in test_command_delivery.py."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest

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

TENANT, OTHER = "acme", "globex"


@dataclass
class Api:
    server: Server
    database: str
    alice: str  # admin of acme
    bob: str    # second admin of acme
    eve: str    # admin of globex

    def post(self, path: str, token: str, body: object = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        if not headers:
            return self.server.request("POST", path, token, body)
        req = urllib.request.Request(self.server.base + path, method="POST",
                                     data=None if body is None else json.dumps(body).encode())
        req.add_header("Authorization", f"Bearer {token}")
        req.add_header("Content-Type", "application/json")
        for k, v in headers.items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def get(self, path: str, token: str) -> tuple[int, Any]:
        return self.server.request("GET", path, token)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("commands-api")
    database = asyncio.run(create_database())
    try:
        with running_broker(tmp) as broker:
            asyncio.run(enroll_devices(database, broker.url, TENANT, ["corp1", "corp2"]))
            asyncio.run(enroll_devices(database, broker.url, TENANT, ["pers1"], "personal"))
            asyncio.run(enroll_devices(database, broker.url, OTHER, ["g1"]))
            srv = Server(server_env(database, broker.url), tmp / "serve.log")
            tokens = [srv.cli("admin", "create", "--tenant", t, "--name", n).strip()
                      for t, n in ((TENANT, "alice"), (TENANT, "bob"), (OTHER, "eve"))]
            srv.start()
            try:
                yield Api(srv, database, *tokens)
            finally:
                srv.stop()
    finally:
        asyncio.run(drop_database(database))


def _cmds(device: str) -> str:
    return f"/api/v1/devices/{device}/commands"


def test_lock_is_queued_with_the_default_notice_and_shown_to_admins(api: Api) -> None:
    status, cmd = api.post(_cmds("corp1"), api.alice, {"type": "lock", "reason": "lost"})
    assert status == 201, cmd
    assert cmd["state"] in ("queued", "sent")
    assert cmd["notice"]["lang"] == "en" and "locked" in cmd["notice"]["text"]
    assert cmd["requested_by"] == "alice"
    status, again = api.get(f"{_cmds('corp1')}/{cmd['command_id']}", api.alice)
    assert status == 200 and again["command_id"] == cmd["command_id"]
    assert again["events"][0]["event"] == "created"
    status, listing = api.get(_cmds("corp1"), api.alice)
    assert cmd["command_id"] in [c["command_id"] for c in listing["commands"]]


def test_bad_requests_are_refused_with_every_problem_and_nothing_is_queued(api: Api) -> None:
    before = len(asyncio.run(fetch(api.database, "SELECT 1 FROM commands")))
    cases: list[tuple[dict[str, Any], set[str]]] = [
        ({"type": "explode", "reason": "x"}, {"type"}),
        ({"type": "wipe", "reason": "x"}, {"scope"}),
        ({"type": "wipe", "scope": "everything", "reason": "x"}, {"scope"}),
        ({"type": "lock", "scope": "full", "reason": "x"}, {"scope"}),
        ({"type": "lock"}, {"reason"}),
        ({"type": "lock", "reason": ""}, {"reason"}),
        ({"type": "lock", "reason": "x", "state": "completed"}, {"state"}),  # mass assignment
        ({"type": "lock", "reason": "x", "requested_by": "bob"}, {"requested_by"}),
        ({"type": "lock", "reason": "x", "ttl_s": 5}, {"ttl_s"}),
        ({"type": "sync_policy", "reason": "x", "notice": {"text": "t", "lang": "en"}},
         {"notice"}),
        ({"type": "wipe", "scope": "full", "reason": "x", "notice": {"text": ""}},
         {"notice.text"}),
        ({"type": "lock", "reason": "x", "notice": {"text": "hi", "lang": "e n"}},
         {"notice.lang"}),
        # A remote view: a mode, and the notice its user is asked with (no template).
        ({"type": "remote_view", "reason": "x", "notice": {"text": "May we?"}}, {"mode"}),
        ({"type": "remote_view", "mode": "keylogger", "reason": "x",
          "notice": {"text": "May we?"}}, {"mode"}),
        ({"type": "remote_view", "mode": "session", "reason": "x"}, {"notice"}),
        ({"type": "lock", "mode": "session", "reason": "x"}, {"mode"}),
    ]
    for body, paths in cases:
        status, err = api.post(_cmds("corp1"), api.alice, body)
        assert status == 422, (body, err)
        assert {i["path"] for i in err["issues"]} == paths, (body, err)
    status, err = api.post(_cmds("corp1"), api.alice, [1, 2])
    assert status == 400
    after = len(asyncio.run(fetch(api.database, "SELECT 1 FROM commands")))
    assert after == before


def test_personal_device_gets_only_a_managed_wipe(api: Api) -> None:
    for body in ({"type": "wipe", "scope": "full", "reason": "left the company"},
                 {"type": "factory_reset", "reason": "left the company"}):
        status, err = api.post(_cmds("pers1"), api.alice, body)
        assert status == 403, err
        assert err["code"] == "personal_device"
        assert "personally owned" in err["error"]
    status, cmd = api.post(_cmds("pers1"), api.alice,
                           {"type": "wipe", "scope": "managed", "reason": "left the company"})
    assert status == 201, cmd
    assert cmd["params"] == {"scope": "managed"}
    assert "personal apps and data stay" in cmd["notice"]["text"]
    states = asyncio.run(fetch(api.database, "SELECT type, params FROM commands "
                                             "WHERE device_id = 'pers1'"))
    assert [(r["type"], r["params"]) for r in states] == [("wipe", {"scope": "managed"})]


def test_remote_view_carries_its_mode_reason_and_the_admins_notice(api: Api) -> None:
    ask = {"text": "Your admin asks to see your screen. Accept?", "lang": "en"}
    body = {"type": "remote_view", "mode": "session", "reason": "app crashes", "notice": ask}
    for device in ("corp1", "pers1"):  # personal too: its user is asked like any other
        status, cmd = api.post(_cmds(device), api.alice, body)
        assert status == 201, cmd
        assert (cmd["params"], cmd["notice"], cmd["consent_at"]) == (
            {"mode": "session", "reason": "app crashes"}, ask, None)
        # 15 minutes to answer by default: the admin is waiting too.
        ttl = (datetime.fromisoformat(cmd["expires_at"])
               - datetime.fromisoformat(cmd["created_at"])).total_seconds()
        assert 899 <= ttl <= 901, ttl
    status, cmd = api.post(_cmds("corp1"), api.alice, {**body, "ttl_s": 3600})
    assert status == 201
    assert (datetime.fromisoformat(cmd["expires_at"])
            - datetime.fromisoformat(cmd["created_at"])).total_seconds() > 3500
    [entry] = [e for e in api.get("/api/v1/audit?limit=500", api.alice)[1]["entries"]
               if e["details"].get("command_id") == cmd["command_id"]]
    assert entry["details"] == {"command_id": cmd["command_id"], "type": "remote_view",
                                "mode": "session"}  # never the reason or the notice
    # One device at a time: not for a group.
    asyncio.run(fetch(api.database, "UPDATE devices SET groups = '{view-all}' "
                                    "WHERE tenant_id = $1 AND device_id = 'corp2'", TENANT))
    status, err = api.post("/api/v1/groups/view-all/commands", api.alice, body)
    assert status == 403 and err["code"] == "group_remote_view"


def test_factory_reset_waits_for_a_second_admin(api: Api) -> None:
    status, cmd = api.post(_cmds("corp2"), api.alice,
                           {"type": "factory_reset", "reason": "reissue to a new worker"})
    assert status == 201 and cmd["state"] == "pending_approval", cmd
    url = f"{_cmds('corp2')}/{cmd['command_id']}"
    # Nothing is signed while it waits.
    [row] = asyncio.run(fetch(api.database, "SELECT payload FROM commands "
                                            "WHERE command_id = $1::uuid", cmd["command_id"]))
    assert row["payload"] is None
    status, queue = api.get("/api/v1/commands?state=pending_approval", api.alice)
    assert cmd["command_id"] in [c["command_id"] for c in queue["commands"]]
    status, err = api.post(url + ":approve", api.alice)
    assert status == 403 and err["code"] == "same_admin"
    status, err = api.post(url + ":approve", api.eve)  # another tenant's admin
    assert status == 404
    status, approved = api.post(url + ":approve", api.bob)
    assert status == 200, approved
    assert approved["state"] in ("queued", "sent") and approved["approved_by"] == "bob"
    status, err = api.post(url + ":approve", api.bob)
    assert status == 409
    events = api.get(url, api.alice)[1]["events"]
    assert [(e["event"], e["actor"]) for e in events][:2] == [("created", "alice"),
                                                              ("approved", "bob")]


def test_cancel_before_sending_and_not_after(api: Api) -> None:
    status, cmd = api.post(_cmds("corp2"), api.alice,
                           {"type": "factory_reset", "reason": "mistake"})
    url = f"{_cmds('corp2')}/{cmd['command_id']}"
    status, cancelled = api.post(url + ":cancel", api.bob)
    assert status == 200 and cancelled["state"] == "cancelled"
    assert cancelled["cancelled_by"] == "bob"
    assert api.post(url + ":approve", api.bob)[0] == 409  # cancelled stays cancelled
    assert api.post(url + ":cancel", api.alice)[0] == 409


def test_idempotency_key_creates_one_command(api: Api) -> None:
    body = {"type": "wipe", "scope": "managed", "reason": "lost shipment"}
    headers = {"Idempotency-Key": "req-7f3a"}
    first = api.post(_cmds("corp1"), api.alice, body, headers)
    second = api.post(_cmds("corp1"), api.alice, body, headers)
    assert first[0] == 201 and second[0] == 200
    assert first[1]["command_id"] == second[1]["command_id"]
    rows = asyncio.run(fetch(api.database, "SELECT 1 FROM commands "
                                           "WHERE idempotency_key = 'req-7f3a'"))
    assert len(rows) == 1
    status, err = api.post(_cmds("corp1"), api.alice, {**body, "scope": "full"}, headers)
    assert status == 422 and err["code"] == "idempotency_key_reused"
    status, err = api.post(_cmds("corp2"), api.alice, body, headers)  # another device
    assert status == 422
    # Keys are per admin: bob's request with the same key is his own.
    status, bobs = api.post(_cmds("corp1"), api.bob, body, headers)
    assert status == 201 and bobs["command_id"] != first[1]["command_id"]


def test_tenant_notice_template_is_used_when_the_request_has_none(api: Api) -> None:
    status, tpl = api.get("/api/v1/notice-templates/wipe-full", api.alice)
    assert status == 200 and tpl["source"] == "built_in"
    text = "Uw organisatie wist alle gegevens op dit toestel."
    status, _ = api.server.request("PUT", "/api/v1/notice-templates/wipe-full", api.alice,
                                   {"text": text, "lang": "nl"})
    assert status == 200
    status, cmd = api.post(_cmds("corp1"), api.alice,
                           {"type": "wipe", "scope": "full", "reason": "stolen"})
    assert status == 201 and cmd["notice"] == {"text": text, "lang": "nl"}
    # The other tenant still gets the built-in text; an explicit notice wins.
    status, cmd = api.post(_cmds("g1"), api.eve, {"type": "wipe", "scope": "full",
                                                  "reason": "stolen"})
    assert cmd["notice"]["lang"] == "en"
    status, cmd = api.post(_cmds("corp1"), api.alice,
                           {"type": "wipe", "scope": "full", "reason": "stolen",
                            "notice": {"text": "Bye", "lang": "en-GB"}})
    assert cmd["notice"] == {"text": "Bye", "lang": "en-GB"}


def test_other_tenants_devices_and_commands_are_not_found(api: Api) -> None:
    status, cmd = api.post(_cmds("g1"), api.eve, {"type": "locate", "reason": "audit"})
    assert status == 201
    url = f"{_cmds('g1')}/{cmd['command_id']}"
    assert api.post(_cmds("g1"), api.alice, {"type": "lock", "reason": "x"})[0] == 404
    assert api.get(url, api.alice)[0] == 404
    assert api.get(_cmds("g1"), api.alice)[0] == 404
    assert api.post(url + ":cancel", api.alice)[0] == 404
    assert api.post(_cmds("nosuch"), api.alice, {"type": "lock", "reason": "x"})[0] == 404
    assert api.get(_cmds("corp1"), "not-a-token")[0] == 401
    listed = api.get("/api/v1/commands", api.alice)[1]["commands"]
    assert cmd["command_id"] not in [c["command_id"] for c in listed]


def test_group_wipe_makes_one_command_per_device_and_skips_personal_for_full(api: Api) -> None:
    asyncio.run(fetch(api.database, "UPDATE devices SET groups = '{shipment-7}' "
                                    "WHERE tenant_id = $1", TENANT))
    url = "/api/v1/groups/shipment-7/commands"
    headers = {"Idempotency-Key": "lost-shipment-7"}
    body = {"type": "wipe", "scope": "full", "reason": "shipment lost in transit"}
    status, batch = api.post(url, api.alice, body, headers)
    assert status == 201, batch
    assert batch["commands"] == 2
    assert batch["refused"] == [{"device": "pers1", "code": "personal_device"}]
    rows = asyncio.run(fetch(api.database, "SELECT device_id FROM commands "
                                           "WHERE batch_id = $1::uuid ORDER BY device_id",
                             batch["batch_id"]))
    assert [r["device_id"] for r in rows] == ["corp1", "corp2"]
    again = api.post(url, api.alice, body, headers)
    assert again[0] == 200 and again[1]["batch_id"] == batch["batch_id"]
    status, progress = api.get(f"/api/v1/command-batches/{batch['batch_id']}", api.alice)
    assert status == 200 and sum(progress["states"].values()) == 2
    assert api.get(f"/api/v1/command-batches/{batch['batch_id']}", api.eve)[0] == 404
    status, managed = api.post(url, api.alice, {**body, "scope": "managed"})
    assert status == 201 and managed["commands"] == 3 and managed["refused"] == []
    status, err = api.post(url, api.alice, {"type": "factory_reset", "reason": "x"})
    assert status == 403 and err["code"] == "group_factory_reset"
    assert api.post("/api/v1/groups/nobody/commands", api.alice, body)[0] == 404
    assert api.post(url, api.eve, body)[0] == 404  # the group is acme's
