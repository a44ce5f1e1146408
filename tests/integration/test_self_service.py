"""The device user's API (/api/v1/me), the admin's device reads and the erasure
flow, against the real server and PostgreSQL."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mdm_server.storage.erasure import fulfil_due
from mdm_server.storage.partitions import create_partitions
from mdm_server.storage.pool import connect
from tests.support.services import (
    Server,
    audit_keys_for_tests,
    create_database,
    drop_database,
    fetch,
    fetchval,
    keyring_for,
    running_broker,
    server_env,
)

pytestmark = pytest.mark.integration

TENANT, OTHER = "acme", "globex"
T0 = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
N_LOC = 250
IMEI = "356938035643809"  # a value only p1's telemetry holds


@dataclass
class Env:
    server: Server
    database: str
    alice: str   # admin
    audrey: str  # auditor
    ann: str     # user of p1 (and p2: same e-mail)
    bob: str     # user of c1
    eve: str     # admin of globex

    def get(self, path: str, token: str) -> tuple[int, Any]:
        return self.server.request("GET", path, token)

    def post(self, path: str, token: str, body: object = None) -> tuple[int, Any]:
        return self.server.request("POST", path, token, body)

    def raw(self, path: str, token: str) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.server.base + path)
        req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), resp.read()


async def _seed(database: str) -> None:
    conn = await connect(database)
    try:
        for tenant in (TENANT, OTHER):
            await conn.execute("INSERT INTO tenants (tenant_id) VALUES ($1)", tenant)
            await conn.execute("INSERT INTO policies (tenant_id, name, version, body, "
                               "created_by) VALUES ($1, 'default', 1, '{\"applies_to\": {}}', "
                               "'system')", tenant)
        devices = [(TENANT, "p1", "personal", "ann@example.org"),
                   (TENANT, "p2", "personal", "ann@example.org"),
                   (TENANT, "c1", "corporate", "bob@example.org"),
                   (OTHER, "g1", "corporate", "ann@example.org")]
        for tenant, device, ownership, email in devices:
            await conn.execute(
                "INSERT INTO devices (tenant_id, device_id, ownership, user_email, "
                "mqtt_username, mqtt_generation) VALUES ($1, $2, $3, $4, $5, 1)",
                tenant, device, ownership, email, f"{tenant}.{device}")
    finally:
        await conn.close()
    day = int(T0.timestamp()) // 86400
    conn = await connect(database)
    try:
        await create_partitions(conn, {(k, d) for k in ("location", "identity")
                                       for d in (day, day + 1)})
        rows = [(TENANT, "p1", "location", f"loc-{i:04d}", T0 + timedelta(seconds=60 * i),
                 {"lat": 52.0 + i / 10_000, "lon": 4.3 + i / 10_000, "accuracy_m": 5})
                for i in range(N_LOC)]
        rows.append((TENANT, "p1", "identity", "id-1", T0,
                     {"imei": IMEI, "serial": "SER-P1-0042", "user_name": "Ann Example"}))
        rows += [(TENANT, "c1", "location", f"c-{i}", T0 + timedelta(seconds=i),
                  {"lat": 40.0, "lon": -3.7}) for i in range(5)]
        rows.append((OTHER, "g1", "location", "g-1", T0, {"lat": 1.0, "lon": 2.0}))
        await conn.executemany(
            "INSERT INTO telemetry (tenant_id, device_id, kind, record_id, ts, policy_id, "
            "policy_version, data) VALUES ($1, $2, $3, $4, $5, 'default', 1, $6)", rows)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("self-service")
    database = asyncio.run(create_database())
    try:
        asyncio.run(_seed(database))
        with running_broker(tmp) as broker:
            srv = Server(server_env(database, broker.url), tmp / "serve.log")
            cli = srv.cli
            tokens = [
                cli("admin", "create", "--tenant", TENANT, "--name", "alice").strip(),
                cli("admin", "create", "--tenant", TENANT, "--name", "audrey",
                    "--role", "auditor").strip(),
                cli("user", "token", "--tenant", TENANT, "--device", "p1").strip(),
                cli("user", "token", "--tenant", TENANT, "--device", "c1").strip(),
                cli("admin", "create", "--tenant", OTHER, "--name", "eve").strip(),
            ]
            srv.start()
            try:
                yield Env(srv, database, *tokens)
            finally:
                srv.stop()
    finally:
        asyncio.run(drop_database(database))


def _all_pages(env: Env, path: str, token: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    url = path
    while True:
        status, body = env.get(url, token)
        assert status == 200, body
        out += body["records"]
        if body["next"] is None:
            return out
        url = f"{path}&cursor={body['next']}"


def test_user_sees_own_devices_and_their_data_page_by_page(env: Env) -> None:
    status, mine = env.get("/api/v1/me/devices", env.ann)
    assert status == 200
    assert [d["device"] for d in mine["devices"]] == ["p1", "p2"]  # same e-mail, same tenant
    records = _all_pages(env, "/api/v1/me/devices/p1/data?kind=location&limit=100", env.ann)
    assert [r["id"] for r in records] == [f"loc-{i:04d}" for i in range(N_LOC)]
    assert records[0]["data"] == {"lat": 52.0, "lon": 4.3, "accuracy_m": 5}
    # A time range: [T0 + 10 min, T0 + 20 min).
    frm = (T0 + timedelta(minutes=10)).isoformat()
    to = (T0 + timedelta(minutes=20)).isoformat()
    status, body = env.get(f"/api/v1/me/devices/p1/data?kind=location&from={frm}&to={to}"
                           .replace("+", "%2B"), env.ann)
    assert [r["id"] for r in body["records"]] == [f"loc-{i:04d}" for i in range(10, 20)]
    bad = ["kind=nope", "kind=location&limit=0", "kind=location&limit=501",
           "kind=location&from=yesterday", "kind=location&cursor=garbage",
           "kind=location&from=2026-11-20T00:00:00"]
    for query in bad:
        assert env.get(f"/api/v1/me/devices/p1/data?{query}", env.ann)[0] == 400, query


def test_user_reaches_nothing_that_is_not_theirs(env: Env) -> None:
    for path in ("/api/v1/me/devices/c1/data?kind=location", "/api/v1/me/devices/g1/notices",
                 "/api/v1/me/devices/nosuch/policy", "/api/v1/me/devices/c1/export"):
        assert env.get(path, env.ann)[0] == 404, path
    assert env.post("/api/v1/me/devices/c1/erasure-requests", env.ann)[0] == 404
    for path in ("/api/v1/devices", "/api/v1/devices/p1/data?kind=location",
                 "/api/v1/devices/p1/commands", "/api/v1/audit", "/api/v1/policies"):
        assert env.get(path, env.ann)[0] == 403, path
    assert env.post("/api/v1/devices/p1/commands", env.ann,
                    {"type": "lock", "reason": "x"})[0] == 403
    assert env.get("/api/v1/me/devices", env.alice)[0] == 403  # admins have no /me
    assert env.get("/api/v1/me/devices", "mdu_not-a-token")[0] == 401
    _status, body = env.get("/api/v1/me/devices", env.bob)
    assert [d["device"] for d in body["devices"]] == ["c1"]


def test_admin_reads_are_in_the_users_access_log_and_auditors_only_read(env: Env) -> None:
    status, detail = env.get("/api/v1/devices/p1", env.alice)
    assert status == 200
    assert detail["last"]["identity"]["data"]["imei"] == IMEI
    assert detail["last"]["location"]["id"] == f"loc-{N_LOC - 1:04d}"
    status, _ = env.get("/api/v1/devices/p1/data?kind=location&limit=5", env.audrey)
    assert status == 200
    assert env.get("/api/v1/devices/g1", env.alice)[0] == 404
    assert env.get("/api/v1/devices/p1", env.eve)[0] == 404
    status, log = env.get("/api/v1/me/devices/p1/access-log", env.ann)
    assert status == 200
    seen = [(e["actor"], e["role"], e["what"]) for e in log["entries"]]
    assert ("alice", "admin", "device") in seen
    assert ("audrey", "auditor", "data:location") in seen
    # p2 was never read.
    assert env.get("/api/v1/me/devices/p2/access-log", env.ann)[1]["entries"] == []
    # Auditors change nothing.
    assert env.post("/api/v1/devices/p1/commands", env.audrey,
                    {"type": "lock", "reason": "x"})[0] == 403
    status, listing = env.get("/api/v1/devices", env.audrey)
    assert [d["device"] for d in listing["devices"]] == ["c1", "p1", "p2"]


def test_policy_in_plain_words_and_notices(env: Env) -> None:
    status, policy = env.get("/api/v1/me/devices/p1/policy", env.ann)
    assert status == 200
    # A personal device under only the tenant default gets it merged with the floor.
    assert policy["policy"] == "default+personal-floor" and policy["floor"] == "merged"
    assert policy["collects"]["location"] is False and policy["beyond_floor"] == []
    assert any("location" in line.lower() for line in policy["explanation"])
    status, cmd = env.post("/api/v1/devices/p1/commands", env.alice,
                           {"type": "wipe", "scope": "managed", "reason": "left",
                            "notice": {"text": "Bedrijfsgegevens worden gewist.", "lang": "nl"}})
    assert status == 201
    status, notices = env.get("/api/v1/me/devices/p1/notices", env.ann)
    [n] = [n for n in notices["notices"] if n["command_id"] == cmd["command_id"]]
    assert n["notice"] == {"text": "Bedrijfsgegevens worden gewist.", "lang": "nl"}
    assert n["type"] == "wipe" and n["requested_at"]


def test_export_is_one_zip_of_json_and_csv(env: Env) -> None:
    status, summary = env.get("/api/v1/me/devices/p1/export/summary", env.ann)
    assert summary["records"]["location"] == N_LOC and summary["total"] == N_LOC + 1
    status, headers, body = env.raw("/api/v1/me/devices/p1/export", env.ann)
    assert status == 200 and headers["Content-Type"] == "application/zip"
    assert headers["X-Export-Records"] == str(N_LOC + 1)
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        names = set(zf.namelist())
        assert {"device.json", "policy.json", "notices.json", "access-log.json",
                "telemetry/location.jsonl", "telemetry/location.csv",
                "telemetry/identity.jsonl", "telemetry/identity.csv"} <= names
        lines = zf.read("telemetry/location.jsonl").decode().splitlines()
        assert len(lines) == N_LOC
        assert json.loads(lines[0])["data"]["lat"] == 52.0
        rows = list(csv.DictReader(io.StringIO(zf.read("telemetry/identity.csv").decode())))
        assert rows[0]["imei"] == IMEI
        device = json.loads(zf.read("device.json"))
        assert device["user_email"] == "ann@example.org"
        assert not any(n.startswith("telemetry/c1") for n in names)


def test_erasure_request_fulfilled_leaves_only_the_fact(env: Env) -> None:
    status, req = env.post("/api/v1/me/devices/p1/erasure-requests", env.ann)
    assert status == 201 and req["state"] == "pending"
    due = datetime.fromisoformat(req["due_at"]) - datetime.fromisoformat(req["requested_at"])
    assert due == timedelta(days=30)
    assert env.post("/api/v1/me/devices/p1/erasure-requests", env.ann)[0] == 409
    assert env.post("/api/v1/me/devices/p1/erasure-requests", env.ann, {"why": "x"})[0] == 422
    status, queue = env.get("/api/v1/erasure-requests?state=pending", env.alice)
    assert [r["id"] for r in queue["erasure_requests"]] == [req["id"]]
    assert env.post(f"/api/v1/erasure-requests/{req['id']}:fulfil", env.audrey)[0] == 403
    assert env.post(f"/api/v1/erasure-requests/{req['id']}:fulfil", env.eve)[0] == 404
    status, done = env.post(f"/api/v1/erasure-requests/{req['id']}:fulfil", env.alice)
    assert status == 200 and done["state"] == "fulfilled" and done["decided_by"] == "alice"
    assert done["erased"]["telemetry"] == N_LOC + 1
    # Nothing of p1's personal values in a full dump; c1's data is untouched.
    dump = subprocess.run(["pg_dump", "--no-owner", env.database], capture_output=True,
                          text=True, check=True).stdout
    for value in (IMEI, "SER-P1-0042", "Ann Example", "52.0249", "ann@example.org\tp1"):
        assert value not in dump, value
    assert asyncio.run(fetchval(env.database, "SELECT count(*) FROM telemetry "
                                              "WHERE device_id = 'c1'")) == 5
    # The erasure revoked the user token issued for p1: refused at once.
    assert env.get("/api/v1/me/devices", env.ann)[0] == 401
    # The fact remains: the request, the audit entry, the notice log, for a token
    # the user gets afterwards.
    ann = env.server.cli("user", "token", "--tenant", TENANT, "--device", "p1").strip()
    status, mine = env.get("/api/v1/me/devices/p1/erasure-requests", ann)
    assert mine["erasure_requests"][0]["state"] == "fulfilled"
    assert env.get("/api/v1/me/devices/p1/notices", ann)[1]["notices"]
    actions = [r["action"] for r in asyncio.run(fetch(
        env.database, "SELECT action FROM audit_log WHERE target = 'device:p1' ORDER BY seq"))]
    assert actions[-2:] == ["erasure.request", "erasure.fulfil"] or \
        "erasure.fulfil" in actions
    verify = subprocess.run([sys.executable, "-m", "mdm_server", "audit", "verify"],
                            env=env.server.env, capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert env.get("/api/v1/me/devices/p1/data?kind=location", ann)[1]["records"] == []
    # p2 shared the user's e-mail with p1 and the erasure removed it: a new p1 token
    # covers p1 alone.
    assert [d["device"] for d in env.get("/api/v1/me/devices", ann)[1]["devices"]] == ["p1"]


def test_refusal_needs_a_reason_and_unanswered_requests_are_fulfilled_after_30_days(
        env: Env) -> None:
    # p1's erasure revoked ann's p1 token (and removed the e-mail that linked p1 to
    # p2): her own token for p2 now.
    ann_p2 = env.server.cli("user", "token", "--tenant", TENANT, "--device", "p2").strip()
    assert env.get("/api/v1/me/devices/p2/policy", env.ann)[0] == 401
    status, req = env.post("/api/v1/me/devices/p2/erasure-requests", ann_p2)
    assert status == 201
    url = f"/api/v1/erasure-requests/{req['id']}:refuse"
    assert env.post(url, env.alice, {})[0] == 422
    assert env.post(url, env.alice, {"reason": "ok", "state": "fulfilled"})[0] == 422
    status, refused = env.post(url, env.alice, {"reason": "legal hold on this device"})
    assert status == 200 and refused["refusal_reason"] == "legal hold on this device"
    # A new request for c1 that nobody answers.
    status, req = env.post("/api/v1/me/devices/c1/erasure-requests", env.bob)
    asyncio.run(fetch(env.database, "UPDATE erasure_requests SET requested_at = "
                                    "now() - interval '31 days', due_at = now() - interval "
                                    "'1 day' WHERE request_id = $1::uuid", req["id"]))

    async def run_due() -> int:
        conn = await connect(env.database)
        try:
            return await fulfil_due(conn, keyring_for(env.database), audit_keys_for_tests())
        finally:
            await conn.close()

    assert asyncio.run(run_due()) == 1
    # Fulfilled by the server: bob's token for c1 is revoked with it.
    assert env.get("/api/v1/me/devices/c1/erasure-requests", env.bob)[0] == 401
    status, listed = env.get("/api/v1/erasure-requests", env.alice)
    [done] = [r for r in listed["erasure_requests"] if r["id"] == req["id"]]
    assert done["state"] == "fulfilled" and done["decided_by"].startswith("system")
    assert asyncio.run(fetchval(env.database, "SELECT count(*) FROM telemetry "
                                              "WHERE device_id = 'c1'")) == 0
