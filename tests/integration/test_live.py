"""Live tracking and the device user's live view, through the real broker, ingest,
PostgreSQL (NOTIFY per committed batch) and ``mdm-server serve``.

- A point published over MQTT reaches an admin's SSE stream within 1 s of its
  commit (its ``received_at``, the INSERT's time, is no later than the commit), with
  the values as stored: under a snapping policy the snapped coordinates, never the
  raw ones.
- ``?device=`` and ``?group=`` filters; another tenant's admin sees nothing of it and
  gets 404 for its devices and groups; bad filters 400; roles 401/403.
- The device user's live view shows an admin's watching start and end, a read of
  the data and a command sent; the access log has the watch's start and end, also
  when the admin's connection is cut, and after a server killed mid-watch (the next
  server's sweep logs the end). A revoked token is 401; streams past the limit 429.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from mdm_server.storage.policies import put_policy
from mdm_server.storage.pool import connect
from privacy_filters import parse_policy, policy_to_doc
from tests.support.mqtt import publish_as_devices
from tests.support.services import (
    Server,
    create_database,
    drop_database,
    enroll,
    fetch,
    running_broker,
    server_env,
    stored_id,
)
from tests.support.sse import Event, SseClient

pytestmark = pytest.mark.integration

TENANT, OTHER = "acme", "globex"
COARSE = {"applies_to": {"groups": ["coarse"]}, "location": {"precision_m": 1000}}


@dataclass
class Env:
    server: Server
    database: str
    broker_port: int
    admin: str
    auditor: str
    other_admin: str
    user: str  # van1's user
    n: int = 0

    def stream(self, path: str, token: str | None) -> SseClient:
        return SseClient(self.server.base, path, token)

    def publish(self, device: str, lat: float, lon: float, tenant: str = TENANT) -> str:
        """One location record; returns its id as the agent sent it."""
        self.n += 1
        rid = f"live-{self.n}"
        ts = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        payload = json.dumps({"v": 1, "id": rid, "ts": ts, "data": {
            "lat": lat, "lon": lon, "accuracy_m": 5}}).encode()
        publish_as_devices(self.broker_port, [
            (f"mdm/v1/{tenant}/devices/{device}/telemetry/location", payload)])
        return rid


async def _policy(database: str) -> None:
    conn = await connect(database)
    try:
        await put_policy(conn, TENANT, "coarse",
                         policy_to_doc(parse_policy(COARSE, name="coarse")), "test")
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("live")
    database = asyncio.run(create_database())
    try:
        with running_broker(tmp) as broker:
            asyncio.run(enroll(database, broker.url, TENANT, ["van1"], groups=("field",)))
            asyncio.run(enroll(database, broker.url, TENANT, ["van2"], groups=("coarse",)))
            asyncio.run(enroll(database, broker.url, TENANT, ["van3"]))
            asyncio.run(enroll(database, broker.url, OTHER, ["g1"], groups=("field",)))
            asyncio.run(_policy(database))
            srv = Server(server_env(database, broker.url, MDM_LIVE_STREAMS_PER_TOKEN="3"),
                         tmp / "serve.log")
            admin = srv.cli("admin", "create", "--tenant", TENANT, "--name", "alice").strip()
            auditor = srv.cli("admin", "create", "--tenant", TENANT, "--name", "audrey",
                              "--role", "auditor").strip()
            other = srv.cli("admin", "create", "--tenant", OTHER, "--name", "gus").strip()
            user = srv.cli("user", "token", "--tenant", TENANT, "--device", "van1").strip()
            srv.start()
            srv.wait_log("live feed listening")
            try:
                yield Env(srv, database, broker.port, admin, auditor, other, user)
            finally:
                srv.stop()
    finally:
        asyncio.run(drop_database(database))


def _ready(c: SseClient) -> dict[str, Any]:
    assert c.status == 200, c.body
    ready = c.wait_for("ready")
    c.wait_for("location", lambda d: d["last_known"])  # the last known positions
    data: dict[str, Any] = ready.data
    return data


def _point(c: SseClient, device: str, timeout: float = 20.0) -> tuple[dict[str, Any], Event]:
    """The first live point of ``device`` in the stream."""
    ev = c.wait_for("location", lambda d: not d["last_known"]
                    and any(p["device"] == device for p in d["points"]), timeout)
    point = next(p for p in ev.data["points"] if p["device"] == device)
    return point, ev


def test_a_point_reaches_the_stream_within_a_second_of_its_commit_as_stored(env: Env) -> None:
    c = env.stream("/api/v1/live", env.admin)
    try:
        assert c.headers["Content-Type"].startswith("text/event-stream")
        assert c.headers["Cache-Control"] == "no-store"
        _ready(c)
        rid = env.publish("van1", 52.370216, 4.895168)
        point, ev = _point(c, "van1")
        assert point["id"] == stored_id(TENANT, "van1", rid)  # the keyed digest, as stored
        assert point["data"]["lat"] == 52.370216
        # The commit is at or after the row's received_at (the INSERT's statement
        # time), so this bounds the delay from the commit from above.
        received = datetime.fromisoformat(point["received_at"]).timestamp()
        delay = ev.at - received
        assert 0 <= delay < 1.0, delay
        # van2's policy snaps to a 1 km grid: the stream has what was stored.
        env.publish("van2", 52.370216, 4.895168)
        snapped, _ = _point(c, "van2")
        rows = asyncio.run(_stored(env.database, "van2"))
        assert (snapped["data"]["lat"], snapped["data"]["lon"]) in rows
        assert snapped["data"]["lat"] != 52.370216 and snapped["data"]["lon"] != 4.895168
        assert snapped["data"]["accuracy_m"] >= 1000
    finally:
        c.close()


async def _stored(database: str, device: str) -> set[tuple[float, float]]:
    """The device's stored positions, opened as the server opens them."""
    from mdm_server.storage.sealing import DeviceReader
    from tests.support.services import keyring_for

    conn = await connect(database)
    try:
        reader = await DeviceReader.load(conn, keyring_for(database), TENANT, device)
        rows = await conn.fetch(
            "SELECT kind, record_id, ts, key_id, sealed, data FROM telemetry "
            "WHERE tenant_id = $1 AND device_id = $2 AND kind = 'location'", TENANT, device)
        return {(d["lat"], d["lon"]) for d in (reader.data(r) for r in rows)}
    finally:
        await conn.close()


def test_device_and_group_filters(env: Env) -> None:
    one = env.stream("/api/v1/live?device=van1", env.admin)
    field = env.stream("/api/v1/live?group=field", env.admin)
    try:
        assert _ready(one)["devices"] == 1
        assert _ready(field)["devices"] == 1
        env.publish("van3", 52.1, 4.1)
        env.publish("van1", 52.2, 4.2)
        for c in (one, field):
            _, ev = _point(c, "van1")
            assert all(p["device"] == "van1" for p in ev.data["points"])
        # van3's point was committed before van1's: had it been sent, it came first.
        assert not [e for e in one.drain(1.0) + field.drain(0.1) if e.name == "location"]
    finally:
        one.close()
        field.close()


def test_tenants_are_isolated(env: Env) -> None:
    theirs = env.stream("/api/v1/live", env.other_admin)
    try:
        ready = _ready(theirs)
        assert ready["devices"] == 1  # g1 only
        env.publish("van1", 52.3, 4.3)
        env.publish("g1", 48.1, 11.5, tenant=OTHER)
        _, ev = _point(theirs, "g1")
        assert {p["device"] for p in ev.data["points"]} == {"g1"}
        assert not [e for e in theirs.drain(1.0) if e.name == "location"]
    finally:
        theirs.close()
    for path in ("/api/v1/live?device=van1", "/api/v1/live?group=coarse"):
        c = env.stream(path, env.other_admin)
        assert c.status == 404, (path, c.status)


def test_bad_filters_and_roles(env: Env) -> None:
    for path, status in (("/api/v1/live?device=van1&group=field", 400),
                         ("/api/v1/live?device=a%20b", 400), ("/api/v1/live?group=", 400),
                         ("/api/v1/live?device=nope", 404), ("/api/v1/live?group=nope", 404)):
        c = env.stream(path, env.admin)
        assert c.status == status, (path, c.status, c.body)
        assert "error" in c.body
    assert env.stream("/api/v1/live", None).status == 401
    assert env.stream("/api/v1/live", env.auditor).status == 403
    assert env.stream("/api/v1/live", env.user).status == 403
    assert env.stream("/api/v1/me/devices/van1/live", env.admin).status == 403
    assert env.stream("/api/v1/me/devices/van2/live", env.user).status == 404


def _access_log(env: Env) -> list[dict[str, Any]]:
    status, body = env.server.request("GET", "/api/v1/me/devices/van1/access-log?limit=500",
                                      env.user)
    assert status == 200, body
    entries: list[dict[str, Any]] = body["entries"]
    return entries


def test_the_user_sees_the_watch_a_read_and_a_command(env: Env) -> None:
    mine = env.stream("/api/v1/me/devices/van1/live", env.user)
    try:
        assert mine.status == 200, mine.body
        assert mine.wait_for("ready").data["watching"] == []
        admin = env.stream("/api/v1/live?device=van1", env.admin)
        _ready(admin)
        start = mine.wait_for("watching").data
        assert (start["watch"], start["actor"], start["role"]) == ("start", "alice", "admin")
        # The point is stored: the user is told, without the values.
        env.publish("van1", 52.4, 4.4)
        stored = mine.wait_for("stored").data
        assert stored["kind"] == "location" and stored["points"] == 1
        assert "lat" not in json.dumps(stored)
        # A second stream opened now says who is watching, since when.
        again = env.stream("/api/v1/me/devices/van1/live", env.user)
        watching = again.wait_for("ready").data["watching"]
        again.close()
        assert [w["actor"] for w in watching] == ["alice"]
        since = datetime.fromisoformat(watching[0]["since"])
        assert abs((since - datetime.fromisoformat(start["at"])).total_seconds()) < 1
        # An admin reads the device: the user sees the read.
        status, _ = env.server.request("GET", "/api/v1/devices/van1", env.admin)
        assert status == 200
        read = mine.wait_for("read").data
        assert (read["actor"], read["what"]) == ("alice", "device")
        # A lock: the user sees it requested.
        status, cmd = env.server.request("POST", "/api/v1/devices/van1/commands", env.admin,
                                         {"type": "lock", "reason": "lost"})
        assert status == 201, cmd
        sent = mine.wait_for("command").data
        assert (sent["command_id"], sent["type"]) == (cmd["command_id"], "lock")
        admin.close()
        end = mine.wait_for("watching", lambda d: d["watch"] == "end").data
        assert (end["watch_id"], end["ended"]) == (start["watch_id"], "disconnected")
    finally:
        mine.close()
    live = [e for e in _access_log(env) if e["what"] == "live"]
    assert [e["watch"] for e in live[:2]] == ["end", "start"]  # newest first
    assert {e["actor"] for e in live} == {"alice"}


def test_a_cut_connection_ends_the_watch_in_the_access_log(env: Env) -> None:
    before = sum(e["watch"] == "end" for e in _access_log(env))
    c = env.stream("/api/v1/live?device=van1", env.admin)
    _ready(c)
    c.close()  # no goodbye: the socket is shut
    deadline = time.monotonic() + 10
    while sum(e["watch"] == "end" for e in _access_log(env)) == before:
        assert time.monotonic() < deadline, "no end of the watch logged"
        time.sleep(0.2)
    rows = asyncio.run(fetch(env.database, "SELECT count(*) AS n FROM live_watches"))
    assert rows[0]["n"] == 0


def test_streams_are_limited_per_token(env: Env) -> None:
    open_ = [env.stream("/api/v1/live?device=van3", env.admin) for _ in range(3)]
    try:
        assert [c.status for c in open_] == [200, 200, 200]
        extra = env.stream("/api/v1/live?device=van3", env.admin)
        assert extra.status == 429
        assert extra.body["code"] == "too_many_streams"
        assert extra.headers.get("Retry-After")
    finally:
        for c in open_:
            c.close()


def test_a_revoked_token_is_401(env: Env) -> None:
    token = env.server.cli("user", "token", "--tenant", TENANT, "--device", "van1").strip()
    c = env.stream("/api/v1/me/devices/van1/live", token)
    assert c.status == 200
    c.close()
    listed = json.loads(env.server.cli("token", "list", "--tenant", TENANT).splitlines()[0])
    env.server.cli("token", "revoke", "--tenant", TENANT, "--id", listed["id"])
    c = env.stream("/api/v1/me/devices/van1/live", token)
    assert c.status == 401
    assert c.headers.get("WWW-Authenticate") == "Bearer"


def test_a_watch_of_a_killed_server_is_ended_by_the_next(env: Env) -> None:
    """Last in the module: it kills the server."""
    c = env.stream("/api/v1/live?device=van3", env.admin)
    _ready(c)
    env.server.kill()  # SIGKILL: no finally runs
    c.close()
    rows = asyncio.run(fetch(env.database, "SELECT device_id FROM live_watches"))
    assert [r["device_id"] for r in rows] == ["van3"]
    env.server.start()
    deadline = time.monotonic() + 30
    while asyncio.run(fetch(env.database, "SELECT 1 FROM live_watches")):
        assert time.monotonic() < deadline, "the watch was not ended"
        time.sleep(0.3)
    ended = asyncio.run(fetch(
        env.database, "SELECT details FROM audit_log WHERE target = 'device:van3' "
        "AND details->>'what' = 'live' ORDER BY seq DESC LIMIT 1"))
    details = ended[0]["details"]
    details = json.loads(details) if isinstance(details, str) else details
    assert (details["watch"], details["ended"]) == ("end", "server_stopped")
