"""The location history analysis on a synthetic day through the real ingest (TLS,
the broker, the policy at ingest, sealed storage) and the real server.

The day (tests/support/trips.py): at home, a 5 km trip at 30 km/h with a point every
10 s, a 30-minute stop inside the named place ``depot``, the trip back, at home. Three
corporate devices report the same day:

- ``van1`` under the tenant's default policy (no snapping): 2 trips, each within 5%
  of 5 km, the stop within a minute of 30 minutes, in the depot, with enter and
  leave events; the read is in the device user's access log.
- ``van2`` under a policy that snaps to a 1 km grid: the answer says so (the
  precision, from the policy version stamped on the records, even after the policy
  changed), raises the parameters to it, reports the same 2 trips and no trip
  shorter than the precision; home sits on a boundary between grid rows, so its
  snapped points jump between two cells, and no movement is invented from that.
- ``van3`` under a policy that never stores points inside the depot: the answer
  counts the points the policy suppressed on that day and says so.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import jsonschema_rs
import pytest

from mdm_server.api import openapi
from mdm_server.api.trips import MAX_POINTS
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
    wait_for_count,
)
from tests.support.trips import DEPOT, TRIP_M, Day, square, synthetic_day

pytestmark = pytest.mark.integration

TENANT = "acme"
COARSE = {"applies_to": {"groups": ["coarse"]}, "location": {"precision_m": 1000}}
NO_DEPOT = {"applies_to": {"groups": ["private"]},
            "location": {"never_inside": [square(DEPOT, 600)]}}
DEPOT_PLACE = square(DEPOT, 300)


@dataclass
class Env:
    server: Server
    database: str
    admin: str
    auditor: str
    user: str  # van1's user
    day: Day

    def trips(self, device: str, token: str | None = None, **params: Any
              ) -> tuple[int, Any]:
        query = {"from": (self.day.start - timedelta(hours=1)).isoformat(),
                 "to": (self.day.end + timedelta(hours=1)).isoformat(), **params}
        return self.server.request("GET", f"/api/v1/devices/{device}/trips?"
                                   + urlencode(query), token or self.admin)


async def _policies(database: str) -> None:
    conn = await connect(database)
    try:
        for name, body in (("coarse", COARSE), ("no-depot", NO_DEPOT)):
            await put_policy(conn, TENANT, name,
                             policy_to_doc(parse_policy(body, name=name)), "test")
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("trips")
    database = asyncio.run(create_database())
    try:
        with running_broker(tmp) as broker:
            asyncio.run(enroll(database, broker.url, TENANT, ["van1"]))
            asyncio.run(enroll(database, broker.url, TENANT, ["van2"], groups=("coarse",)))
            asyncio.run(enroll(database, broker.url, TENANT, ["van3"], groups=("private",)))
            asyncio.run(enroll(database, broker.url, TENANT, ["van4"]))
            asyncio.run(_policies(database))
            srv = Server(server_env(database, broker.url), tmp / "serve.log")
            admin = srv.cli("admin", "create", "--tenant", TENANT, "--name", "alice").strip()
            auditor = srv.cli("admin", "create", "--tenant", TENANT, "--name", "audrey",
                              "--role", "auditor").strip()
            user = srv.cli("user", "token", "--tenant", TENANT, "--device", "van1").strip()
            srv.start()
            try:
                start = (datetime.now(UTC) - timedelta(days=1)).replace(
                    hour=7, minute=0, second=0, microsecond=0)
                day = synthetic_day(start)
                messages = [m for d in ("van1", "van2", "van3") for m in
                            day.messages(TENANT, d)]
                publish_as_devices(broker.port, messages)
                n = len(day.points)
                stored = wait_for_count(
                    database, "SELECT count(*) FROM telemetry WHERE device_id <> 'van3'",
                    2 * n, timeout=120)
                assert stored == 2 * n, srv.log_text()[-3000:]
                wait_for_count(database, "SELECT coalesce(sum(count), 0) + (SELECT count(*) "
                               "FROM telemetry WHERE device_id = 'van3') "
                               "FROM suppressed_locations", n, timeout=60)
                status, body = srv.request("PUT", "/api/v1/places/depot", admin, DEPOT_PLACE)
                assert status == 201, body
                yield Env(srv, database, admin, auditor, user, day)
            finally:
                srv.stop()
    finally:
        asyncio.run(drop_database(database))


def _at(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def _conforms(body: Any, schema: str = "Trips") -> None:
    """The answer is what the OpenAPI document says (closed objects: no field more,
    none missing)."""
    root = {"$ref": f"#/components/schemas/{schema}",
            "components": openapi.document()["components"]}
    errors = [e.message for e in jsonschema_rs.validator_for(root).iter_errors(body)]
    assert not errors, errors[:5]


def test_two_trips_and_the_stop_in_the_depot(env: Env) -> None:
    status, body = env.trips("van1")
    assert status == 200, body
    _conforms(body)
    day = env.day
    assert body["precision"]["precision_m"] is None
    assert [(p["policy"], p["known"]) for p in body["precision"]["policies"]] == \
        [("default", True)]
    assert body["points"] == len(day.points)
    assert body["parameters"] == body["asked"] == {
        "stop_radius_m": 200, "min_stop_s": 300, "min_trip_m": 200, "min_trip_s": 180,
        "max_gap_s": 3600}

    trips = body["trips"]
    assert len(trips) == 2, [(t["start"], t["end"], t["distance_m"]) for t in trips]
    for trip in trips:
        assert abs(trip["distance_m"] - TRIP_M) <= 0.05 * TRIP_M, trip["distance_m"]
        assert abs(trip["avg_speed_mps"] - 30 / 3.6) < 1, trip["avg_speed_mps"]
        assert len(trip["path"]) == trip["points"]
    out, back = trips
    assert out["end"]["places"] == ["depot"] and out["start"]["places"] == []
    assert back["start"]["places"] == ["depot"]

    depot = [s for s in body["stops"] if s["places"] == ["depot"]]
    assert len(depot) == 1, body["stops"]
    stop = depot[0]
    true_s = (day.leave_depot - day.at_depot).total_seconds()
    assert abs(stop["duration_s"] - true_s) <= 60, (stop, true_s)
    assert abs((_at(stop["arrival"]) - day.at_depot).total_seconds()) <= 60
    assert abs((_at(stop["departure"]) - day.leave_depot).total_seconds()) <= 60
    assert len(body["stops"]) == 3  # home, depot, home

    events = [(e["place"], e["event"]) for e in body["events"]]
    assert events == [("depot", "enter"), ("depot", "leave")]
    enter, leave = (_at(e["at"]) for e in body["events"])
    assert day.leave_home < enter <= day.at_depot
    assert day.leave_depot - timedelta(seconds=10) <= leave < day.at_home

    (summary,) = body["days"]
    assert summary["date"] == day.start.date().isoformat()
    assert summary["trips"] == 2
    assert abs(summary["distance_m"] - 2 * TRIP_M) <= 0.05 * 2 * TRIP_M
    assert abs(summary["moving_s"] - 1200) <= 60
    (in_depot,) = summary["places"]
    assert in_depot["name"] == "depot" and abs(in_depot["seconds"] - true_s) <= 60
    assert body["places"] == [{"name": "depot", "version": 1,
                               "smaller_than_precision": False}]
    assert body["suppressed"] == {"points": 0, "days": []}
    assert body["notes"] == []


def test_reading_trips_is_in_the_users_access_log(env: Env) -> None:
    before = env.server.request("GET", "/api/v1/me/devices/van1/access-log", env.user)[1]
    assert env.trips("van1", env.auditor)[0] == 200
    status, log = env.server.request("GET", "/api/v1/me/devices/van1/access-log", env.user)
    assert status == 200
    new = log["entries"][:len(log["entries"]) - len(before["entries"])]
    assert [(e["actor"], e["role"], e["what"]) for e in new] == [("audrey", "auditor",
                                                                  "trips")]


def test_under_a_1_km_grid_the_answer_says_so_and_invents_no_movement(env: Env) -> None:
    status, body = env.trips("van2")
    assert status == 200, body
    _conforms(body)
    precision = body["precision"]
    assert precision["precision_m"] == 1000
    assert precision["policies"] == [{"policy": "coarse", "version": 1, "points":
                                      len(env.day.points), "precision_m": 1000,
                                      "known": True}]
    used = body["parameters"]
    assert used["stop_radius_m"] >= 1000 and used["min_trip_m"] >= 1000
    assert body["asked"]["stop_radius_m"] == 200
    assert any("1000 m" in n for n in body["notes"]), body["notes"]
    trips = body["trips"]
    assert trips and all(t["distance_m"] >= 1000 for t in trips), trips
    assert len(trips) == 2, [(t["start"]["at"], t["distance_m"]) for t in trips]
    # Home's points fall in two cells 1 km apart: still one stop each time, no trip.
    assert len(body["stops"]) == 3, body["stops"]
    # The depot (300 m) is smaller than a grid cell: said so.
    assert body["places"] == [{"name": "depot", "version": 1,
                               "smaller_than_precision": True}]
    assert any("depot" in n for n in body["notes"])
    # Even when asked for trips of any length and duration.
    status, loose = env.trips("van2", min_trip_m="0", min_trip_s="0")
    assert status == 200
    assert all(t["distance_m"] >= 1000 for t in loose["trips"])
    assert len(loose["trips"]) == 2, [(t["start"]["at"], t["distance_m"])
                                      for t in loose["trips"]]


def test_the_precision_comes_from_the_versions_stamped_on_the_records(env: Env) -> None:
    """The coarse policy stops snapping today: the day's records were still snapped."""
    status, _ = env.server.request("PUT", "/api/v1/policies/coarse", env.admin,
                                   {"applies_to": {"groups": ["coarse"]}})
    assert status == 200
    try:
        status, body = env.trips("van2")
        assert status == 200
        assert body["precision"]["precision_m"] == 1000
        assert body["precision"]["policies"][0]["version"] == 1
    finally:
        status, _ = env.server.request("PUT", "/api/v1/policies/coarse", env.admin, COARSE)
        assert status == 200


def test_suppressed_points_are_counted_and_said(env: Env) -> None:
    status, body = env.trips("van3")
    assert status == 200
    stored = body["points"]
    suppressed = body["suppressed"]
    assert suppressed["points"] > 0
    assert stored + suppressed["points"] == len(env.day.points)
    assert suppressed["days"] == [env.day.start.date().isoformat()]
    assert any(f"{suppressed['points']} location points were not stored" in n
               for n in body["notes"]), body["notes"]


def test_parameters_within_their_bounds(env: Env) -> None:
    status, body = env.trips("van1", stop_radius_m="500", min_stop_s="600",
                             tz="Europe/Amsterdam")
    assert status == 200, body
    assert body["parameters"]["stop_radius_m"] == 500
    assert body["tz"] == "Europe/Amsterdam"
    assert len(body["stops"]) == 3  # 20 minutes at home, 30 at the depot: 10 or more
    # The depot stop at a 1 h minimum is no stop: the two trips become one.
    status, body = env.trips("van1", min_stop_s="3600")
    assert status == 200
    assert len(body["trips"]) == 1 and body["stops"] == []
    for params in ({"stop_radius_m": "5"}, {"stop_radius_m": "10001"},
                   {"min_stop_s": "abc"}, {"max_gap_s": "1e9"}, {"tz": "Mars/Olympus"},
                   {"tz": "../../etc/passwd"}):
        status, err = env.trips("van1", **params)
        assert status == 400, (params, status, err)
        assert "passwd" not in err["error"] and "Mars" not in err["error"]
    status, err = env.server.request(
        "GET", "/api/v1/devices/van1/trips?" + urlencode(
            {"from": env.day.start.isoformat(),
             "to": (env.day.start + timedelta(days=32)).isoformat()}), env.admin)
    assert status == 400 and "31 days" in err["error"]
    assert env.server.request("GET", "/api/v1/devices/van1/trips", env.admin)[0] == 400
    assert env.trips("nope")[0] == 404
    assert env.trips("van1", env.user)[0] == 403


def test_a_range_over_the_point_limit_is_refused_before_anything_is_read(env: Env) -> None:
    """MAX_POINTS + 1 rows (plain, as before sealing: only their count matters) in one
    hour of van4's day: 422 too_many_points, and no read in the audit log."""
    start = env.day.start
    asyncio.run(fetch(env.database, """
        INSERT INTO telemetry (tenant_id, device_id, kind, record_id, ts, data)
        SELECT 'acme', 'van4', 'location', 'bulk-' || i,
               $1::timestamptz + i * interval '10 milliseconds', '{"lat": 1, "lon": 2}'
        FROM generate_series(0, $2) AS i""", start, MAX_POINTS))
    try:
        reads = "SELECT count(*) AS n FROM audit_log WHERE target = 'device:van4'"
        status, err = env.trips("van4")
        assert status == 422 and err["code"] == "too_many_points", err
        assert str(MAX_POINTS) in err["error"]
        assert asyncio.run(fetch(env.database, reads))[0]["n"] == 0
        # A shorter range holding fewer points is answered.
        status, body = env.server.request("GET", "/api/v1/devices/van4/trips?" + urlencode(
            {"from": start.isoformat(), "to": (start + timedelta(seconds=60)).isoformat()}),
            env.admin)
        assert status == 200 and body["points"] == 6000
        assert asyncio.run(fetch(env.database, reads))[0]["n"] == 1
    finally:
        asyncio.run(fetch(env.database, "DELETE FROM telemetry WHERE device_id = 'van4'"))
