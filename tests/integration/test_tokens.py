"""The access lifecycle of API tokens, as an operator and an admin use it: expiry,
`token list` / `token revoke` and the same over the API (audited, tenant-bound),
`admin create` refusing a name in use unless `--rotate`, `last_used_at` written at
most once a minute, and device users' tokens bound to the device's enrollment: the
previous holder of a device reads nothing of the next holder's, nor the next of the
previous one's. Real server, PostgreSQL, Mosquitto and ingest."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest

from mdm_server.storage.devices import start_enrollment
from mdm_server.storage.pool import connect
from tests.support.mqtt import publish_as_devices
from tests.support.services import (
    REPO,
    Broker,
    Server,
    as_server_role,
    create_database,
    drop_database,
    fetch,
    running_broker,
    server_env,
    wait_for_count,
)
from tests.support.telemetry import location

pytestmark = pytest.mark.integration

ACME, GLOBEX = "acme", "globex"


@dataclass
class Env:
    server: Server
    broker: Broker
    database: str
    alice: str   # admin of acme
    audrey: str  # auditor of acme
    eve: str     # admin of globex

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mdm_server", *args],
                              env=self.server.env, cwd=REPO, capture_output=True, text=True,
                              timeout=60)

    def ok(self, *args: str) -> str:
        out = self.cli(*args)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def get(self, path: str, token: str) -> tuple[int, Any]:
        return self.server.request("GET", path, token)

    def tokens(self, tenant: str = ACME, *extra: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in
                self.ok("token", "list", "--tenant", tenant, *extra).splitlines()]

    def id_of(self, token: str) -> str:
        [row] = asyncio.run(fetch(self.database, "SELECT token_id::text AS id FROM api_tokens "
                                                 "WHERE token_sha256 = $1",
                                  hashlib.sha256(token.encode()).digest()))
        return str(row["id"])

    def audit(self, action: str) -> list[dict[str, Any]]:
        return [dict(r) for r in asyncio.run(fetch(
            self.database, "SELECT actor, target, details FROM audit_log WHERE action = $1 "
                           "ORDER BY chain, seq", action))]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("tokens")
    database = asyncio.run(create_database())
    try:
        with running_broker(tmp) as broker:
            srv = Server(server_env(database, broker.url), tmp / "serve.log")
            for tenant in (ACME, GLOBEX):
                srv.cli("tenant", "create", tenant)
            alice = srv.cli("admin", "create", "--tenant", ACME, "--name", "alice").strip()
            audrey = srv.cli("admin", "create", "--tenant", ACME, "--name", "audrey",
                             "--role", "auditor").strip()
            eve = srv.cli("admin", "create", "--tenant", GLOBEX, "--name", "eve").strip()
            srv.start()
            try:
                yield Env(srv, broker, database, alice, audrey, eve)
            finally:
                srv.stop()
    finally:
        asyncio.run(drop_database(database))


def _lifetime(token: dict[str, Any]) -> timedelta:
    return (datetime.fromisoformat(token["expires_at"])
            - datetime.fromisoformat(token["created_at"]))


# --- expiry, listing ----------------------------------------------------------------------

def test_tokens_expire_by_default_or_when_asked_and_are_listed_without_secrets(env: Env
                                                                              ) -> None:
    env.ok("device", "enroll", "--tenant", ACME, "--device", "lst1", "--ownership",
           "corporate")
    user = env.ok("user", "token", "--tenant", ACME, "--device", "lst1").strip()
    week = env.ok("admin", "create", "--tenant", ACME, "--name", "temp", "--expires-in",
                  "7").strip()
    made = env.cli("user", "token", "--tenant", ACME, "--device", "lst1",
                   "--expires-in", "365")
    assert made.returncode == 0 and f"token id {env.id_of(made.stdout.strip())}" in made.stderr
    listed = {t["id"]: t for t in env.tokens()}
    assert set(listed[env.id_of(env.alice)]) == {
        "id", "role", "name", "device", "created_at", "expires_at", "last_used_at",
        "revoked_at", "state"}
    want = {env.alice: ("admin", "alice", None, 90), env.audrey: ("auditor", "audrey", None, 90),
            user: ("user", "user of lst1", "lst1", 30), week: ("admin", "temp", None, 7),
            made.stdout.strip(): ("user", "user of lst1", "lst1", 365)}
    for token, (role, name, device, days) in want.items():
        t = listed[env.id_of(token)]
        assert (t["role"], t["name"], t["device"], t["state"]) == (role, name, device, "active")
        assert _lifetime(t) == timedelta(days=days)
    # Another tenant's tokens are not acme's.
    assert env.id_of(env.eve) not in listed
    # Never the token, nor its digest.
    text = env.ok("token", "list", "--tenant", ACME)
    for token in want:
        assert token not in text and hashlib.sha256(token.encode()).hexdigest() not in text
    for days in ("0", "366", "-1"):
        refused = env.cli("admin", "create", "--tenant", ACME, "--name", f"x{days}",
                          "--expires-in", days)
        assert (refused.returncode, refused.stderr.strip()) == (
            2, "mdm-server: --expires-in is 1-365 days"), refused.stderr
    # Expired (time passed): 401 at once, and listed as expired.
    assert env.get("/api/v1/devices", week)[0] == 200
    asyncio.run(fetch(env.database, "UPDATE api_tokens SET expires_at = now() - interval "
                                    "'1 second' WHERE token_id = $1::uuid", env.id_of(week)))
    assert env.get("/api/v1/devices", week)[0] == 401
    assert [t["name"] for t in env.tokens(ACME, "--state", "expired")] == ["temp"]
    # A name whose token expired may be given a new one without --rotate.
    assert env.ok("admin", "create", "--tenant", ACME, "--name", "temp").startswith("mdm_")


def test_admin_create_refuses_a_name_in_use_unless_rotate(env: Env) -> None:
    first = env.ok("admin", "create", "--tenant", ACME, "--name", "carol").strip()
    again = env.cli("admin", "create", "--tenant", ACME, "--name", "carol")
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.splitlines() == [
        "mdm-server: 'carol' has a working token in tenant 'acme' already: --rotate revokes "
        "it and issues a new one"]
    # Also as an auditor: one working token per name (it is the audit log's actor).
    assert env.cli("admin", "create", "--tenant", ACME, "--name", "carol",
                   "--role", "auditor").returncode == 2
    assert env.get("/api/v1/devices", first)[0] == 200
    rotated = env.cli("admin", "create", "--tenant", ACME, "--name", "carol", "--rotate")
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert new.startswith("mdm_") and new != first
    assert "revoked 1 earlier token(s) of 'carol'" in rotated.stderr
    assert env.get("/api/v1/devices", first)[0] == 401
    assert env.get("/api/v1/devices", new)[0] == 200
    carol = [t for t in env.tokens() if t["name"] == "carol"]
    assert [(t["id"], t["state"]) for t in carol] == [
        (env.id_of(new), "active"), (env.id_of(first), "revoked")]
    entry = [e for e in env.audit("admin.create") if e["target"] == "admin:carol"][-1]
    assert (entry["actor"], entry["target"], entry["details"]["token_id"],
            entry["details"]["revoked_tokens"]) == (
        "cli", "admin:carol", env.id_of(new), [env.id_of(first)])
    # Rotating an auditor's works the same way, and may change the role.
    audit1 = env.ok("admin", "create", "--tenant", ACME, "--name", "dora", "--role",
                    "auditor").strip()
    audit2 = env.ok("admin", "create", "--tenant", ACME, "--name", "dora", "--role",
                    "auditor", "--rotate").strip()
    assert (env.get("/api/v1/devices", audit1)[0], env.get("/api/v1/devices", audit2)[0]) == (
        401, 200)
    # The same name in another tenant is another admin.
    assert env.ok("admin", "create", "--tenant", GLOBEX, "--name", "carol").startswith("mdm_")


def test_tokens_are_listed_and_revoked_over_the_api_and_audited(env: Env) -> None:
    victim = env.ok("admin", "create", "--tenant", ACME, "--name", "mallory").strip()
    vid = env.id_of(victim)
    status, page1 = env.get("/api/v1/tokens?limit=2", env.alice)
    assert status == 200 and len(page1["tokens"]) == 2 and page1["next"]
    status, page2 = env.get(f"/api/v1/tokens?limit=500&cursor={page1['next']}", env.audrey)
    assert status == 200 and page2["next"] is None
    everything = page1["tokens"] + page2["tokens"]
    # The same view as the CLI, newest first.
    assert [(t["id"], t["name"], t["state"]) for t in everything] == [
        (t["id"], t["name"], t["state"]) for t in env.tokens()]
    assert vid in {t["id"] for t in everything}
    status, active = env.get("/api/v1/tokens?state=active", env.alice)
    assert all(t["state"] == "active" for t in active["tokens"])
    assert env.get("/api/v1/tokens?state=dead", env.alice)[0] == 400
    assert env.get("/api/v1/tokens?cursor=not-a-uuid", env.alice)[0] == 400
    assert env.get(f"/api/v1/tokens?cursor={env.id_of(env.eve)}", env.alice)[0] == 400
    status, theirs = env.get("/api/v1/tokens", env.eve)
    assert vid not in {t["id"] for t in theirs["tokens"]}
    # Revoking: admins of the tenant only.
    url = f"/api/v1/tokens/{vid}"
    assert env.server.request("DELETE", url, env.eve)[0] == 404  # another tenant's
    assert env.server.request("DELETE", url, env.audrey)[0] == 403
    assert env.get("/api/v1/devices", victim)[0] == 200
    assert env.server.request("DELETE", url, env.alice)[0] == 204
    assert env.get("/api/v1/devices", victim)[0] == 401  # at once
    assert env.server.request("DELETE", url, env.alice)[0] == 204  # again: nothing changes
    assert env.server.request("DELETE", f"/api/v1/tokens/{env.id_of(env.eve)}",
                              env.alice)[0] == 404
    assert env.get("/api/v1/devices", env.eve)[0] == 200
    [entry] = [e for e in env.audit("token.revoke") if e["target"] == f"token:{vid}"]
    assert (entry["actor"], entry["details"]) == ("alice", {"role": "admin"})
    status, listed = env.get("/api/v1/tokens?state=revoked", env.alice)
    [gone] = [t for t in listed["tokens"] if t["id"] == vid]
    assert gone["revoked_at"] and gone["state"] == "revoked"
    # An admin may revoke their own token: it is refused from the next request on.
    own = env.ok("admin", "create", "--tenant", ACME, "--name", "leaving").strip()
    assert env.server.request("DELETE", f"/api/v1/tokens/{env.id_of(own)}", own)[0] == 204
    assert env.get("/api/v1/token", own)[0] == 401


def test_token_revoke_on_the_command_line(env: Env) -> None:
    victim = env.ok("admin", "create", "--tenant", ACME, "--name", "trent").strip()
    vid = env.id_of(victim)
    assert env.get("/api/v1/token", victim)[0] == 200
    wrong_tenant = env.cli("token", "revoke", "--tenant", GLOBEX, "--id", vid)
    assert (wrong_tenant.returncode, wrong_tenant.stderr.strip()) == (
        2, "mdm-server: no token with that id in tenant 'globex'")
    bad = env.cli("token", "revoke", "--tenant", ACME, "--id", "trent")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert env.get("/api/v1/token", victim)[0] == 200
    done = env.cli("token", "revoke", "--tenant", ACME, "--id", vid)
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert (shown["id"], shown["name"], shown["state"]) == (vid, "trent", "revoked")
    assert env.get("/api/v1/token", victim)[0] == 401
    twice = env.cli("token", "revoke", "--tenant", ACME, "--id", vid)
    assert twice.returncode == 0 and "revoked already" in twice.stderr
    entries = [e for e in env.audit("token.revoke") if e["target"] == f"token:{vid}"]
    assert [(e["actor"], e["details"]) for e in entries] == [("cli", {"role": "admin"})]
    assert env.cli("token", "list", "--tenant", "nope").returncode == 2


def test_last_used_at_is_written_at_most_once_a_minute(env: Env) -> None:
    token = env.ok("admin", "create", "--tenant", ACME, "--name", "lu").strip()
    tid = env.id_of(token)

    def last_used() -> Any:
        [row] = asyncio.run(fetch(env.database, "SELECT last_used_at, xmin::text AS x FROM "
                                                "api_tokens WHERE token_id = $1::uuid", tid))
        return row["last_used_at"], row["x"]

    assert last_used()[0] is None
    assert env.get("/api/v1/token", token)[0] == 200
    first, version = last_used()
    assert first is not None
    for _ in range(20):
        assert env.get("/api/v1/token", token)[0] == 200
    assert last_used() == (first, version)  # not a single write more (same row version)
    asyncio.run(fetch(env.database, "UPDATE api_tokens SET last_used_at = last_used_at - "
                                    "interval '61 seconds' WHERE token_id = $1::uuid", tid))
    assert env.get("/api/v1/token", token)[0] == 200
    assert last_used()[0] > first - timedelta(seconds=1)
    [listed] = [t for t in env.tokens() if t["id"] == tid]
    assert listed["last_used_at"] == last_used()[0].isoformat()


# --- device users and the device's enrollment -----------------------------------------------

def _lats(env: Env, device: str, token: str) -> list[float]:
    status, body = env.get(f"/api/v1/me/devices/{device}/data?kind=location&limit=500", token)
    assert status == 200, body
    return sorted(r["data"]["lat"] for r in body["records"])


def _publish(env: Env, device: str, numbers: range, generation: int) -> None:
    before = asyncio.run(fetch(env.database, "SELECT count(*) AS n FROM telemetry "
                                             "WHERE device_id = $1", device))[0]["n"]
    publish_as_devices(env.broker.port, [location(ACME, device, n) for n in numbers],
                       generations={(ACME, device): generation})
    assert wait_for_count(env.database, f"SELECT count(*) FROM telemetry WHERE device_id = "
                                        f"'{device}'", before + len(numbers)) == \
        before + len(numbers)


def _export_lats(env: Env, device: str, token: str) -> list[float]:
    req = urllib.request.Request(env.server.base + f"/api/v1/me/devices/{device}/export")
    req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=60) as resp:
        body = resp.read()
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        if "telemetry/location.jsonl" not in zf.namelist():
            return []
        return sorted(json.loads(line)["data"]["lat"] for line in
                      zf.read("telemetry/location.jsonl").decode().splitlines())


def test_the_previous_holder_reads_nothing_of_the_next_and_the_next_nothing_before(
        env: Env) -> None:
    for device in ("h1", "h2", "h3"):
        env.ok("device", "enroll", "--tenant", ACME, "--device", device, "--ownership",
               "corporate", "--user-email", "ann@example.org")
    ann1 = env.ok("user", "token", "--tenant", ACME, "--device", "h1").strip()
    ann2 = env.ok("user", "token", "--tenant", ACME, "--device", "h2").strip()
    _publish(env, "h1", range(0, 3), 1)
    _publish(env, "h2", range(10, 13), 1)
    status, mine = env.get("/api/v1/me/devices", ann1)
    assert [d["device"] for d in mine["devices"]] == ["h1", "h2", "h3"]  # same e-mail
    ann_h2 = _lats(env, "h2", ann1)
    assert len(ann_h2) == 3
    status, cmd = env.server.request("POST", "/api/v1/devices/h2/commands", env.alice,
                                     {"type": "locate", "reason": "where is Ann's phone"})
    assert status == 201
    # h2 goes to Bea: a new enrollment, her e-mail, her token.
    again = env.cli("device", "reenroll", "--tenant", ACME, "--device", "h2",
                    "--user-email", "bea@example.org")
    assert again.returncode == 0, again.stderr
    bea = env.ok("user", "token", "--tenant", ACME, "--device", "h2").strip()
    _publish(env, "h2", range(20, 23), 2)
    # Ann's token for h2 was revoked; her token for h1 covers h1 alone.
    assert env.get("/api/v1/me/devices", ann2)[0] == 401
    assert env.get("/api/v1/me/devices/h2/data?kind=location", ann2)[0] == 401
    # h3 is re-enrolled for a holder with the same e-mail (a shared mailbox): a new
    # enrollment all the same, which Ann's token was not issued for.
    env.ok("device", "reenroll", "--tenant", ACME, "--device", "h3", "--user-email",
           "ann@example.org")
    status, mine = env.get("/api/v1/me/devices", ann1)
    assert [d["device"] for d in mine["devices"]] == ["h1"]
    assert env.get("/api/v1/me/devices/h3/policy", ann1)[0] == 404
    for path in ("data?kind=location", "policy", "notices", "access-log", "export/summary",
                 "export", "erasure-requests"):
        assert env.get(f"/api/v1/me/devices/h2/{path}", ann1)[0] == 404, path
    assert len(_lats(env, "h1", ann1)) == 3
    # Bea reads h2 from her enrollment on: none of Ann's records, commands, reads.
    status, hers = env.get("/api/v1/me/devices", bea)
    assert [d["device"] for d in hers["devices"]] == ["h2"]  # not Ann's h1
    assert datetime.fromisoformat(hers["devices"][0]["enrolled_at"]) > \
        datetime.fromisoformat(cmd["created_at"])
    bea_lats = _lats(env, "h2", bea)
    assert len(bea_lats) == 3 and not set(bea_lats) & set(ann_h2)
    assert _export_lats(env, "h2", bea) == bea_lats
    assert env.get("/api/v1/me/devices/h2/export/summary", bea)[1]["total"] == 3
    assert env.get("/api/v1/me/devices/h2/notices", bea)[1]["notices"] == []
    assert env.get("/api/v1/me/devices/h1/data?kind=location", bea)[0] == 404
    # The admin still sees everything h2 holds (6 records).
    status, admin_view = env.get("/api/v1/devices/h2/data?kind=location&limit=500", env.alice)
    assert len(admin_view["records"]) == 6
    # What Bea's h2 token covers ends with her enrollment, however it ends.
    status, _ = env.get("/api/v1/me/devices/h2/policy", bea)
    assert status == 200

    async def next_enrollment() -> None:  # no user token revoked: the binding alone
        conn = await connect(as_server_role(env.database))
        try:
            await start_enrollment(conn, tenant=ACME, device="h2", user_email=None)
        finally:
            await conn.close()

    asyncio.run(next_enrollment())
    assert env.get("/api/v1/me/devices", bea)[0] == 401
    [row] = asyncio.run(fetch(env.database, "SELECT revoked_at FROM api_tokens "
                                            "WHERE token_id = $1::uuid", env.id_of(bea)))
    assert row["revoked_at"] is None
    [entry] = [e for e in env.audit("device.reenroll") if e["target"] == "device:h2"]
    assert entry["details"]["user_tokens_revoked"] == [env.id_of(ann2)]
    assert "ann@example.org" not in json.dumps(entry) and "bea" not in json.dumps(entry)


def test_after_erasure_the_holder_reads_nothing_and_a_new_token_starts_empty(env: Env
                                                                             ) -> None:
    for device in ("e1", "e2"):
        env.ok("device", "enroll", "--tenant", ACME, "--device", device, "--ownership",
               "corporate", "--user-email", "cy@example.org")
    cy1 = env.ok("user", "token", "--tenant", ACME, "--device", "e1").strip()
    cy2 = env.ok("user", "token", "--tenant", ACME, "--device", "e2").strip()
    _publish(env, "e1", range(30, 33), 1)
    status, req = env.server.request("POST", "/api/v1/me/devices/e1/erasure-requests", cy1)
    assert status == 201
    status, done = env.server.request("POST", f"/api/v1/erasure-requests/{req['id']}:fulfil",
                                      env.alice)
    assert status == 200 and done["erased"]["telemetry"] == 3
    assert env.get("/api/v1/me/devices", cy1)[0] == 401  # revoked with the erasure
    # The e-mail that linked e2's token to e1 is gone: e1 is not Cy's there any more.
    assert [d["device"] for d in env.get("/api/v1/me/devices", cy2)[1]["devices"]] == ["e2"]
    assert env.get("/api/v1/me/devices/e1/data?kind=location", cy2)[0] == 404
    [entry] = [e for e in env.audit("erasure.fulfil") if e["target"] == "device:e1"]
    assert entry["details"]["user_tokens_revoked"] == [env.id_of(cy1)]
    # A token issued afterwards works, and shows the fact of the erasure, no data.
    fresh = env.ok("user", "token", "--tenant", ACME, "--device", "e1").strip()
    assert _lats(env, "e1", fresh) == []
    mine = env.get("/api/v1/me/devices/e1/erasure-requests", fresh)[1]["erasure_requests"]
    assert [(r["id"], r["state"]) for r in mine] == [(req["id"], "fulfilled")]
    _publish(env, "e1", range(40, 42), 1)
    assert len(_lats(env, "e1", fresh)) == 2
