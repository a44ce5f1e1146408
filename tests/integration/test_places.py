"""Named places (/api/v1/places) against the real server: versioned like policies
(every PUT and DELETE a version, paged versions without bodies, a per-tenant cap that
prunes old bodies first), validated as policy zones are, audited, per tenant."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support.services import (
    Server,
    create_database,
    drop_database,
    fetch,
    running_broker,
    server_env,
)
from tests.support.trips import square

pytestmark = pytest.mark.integration


@dataclass
class Env:
    server: Server
    database: str
    admin: str
    auditor: str
    other: str  # globex's admin

    def call(self, method: str, path: str, token: str | None = None, body: object = None
             ) -> tuple[int, Any]:
        return self.server.request(method, "/api/v1/places" + path, token or self.admin,
                                   body)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("places")
    database = asyncio.run(create_database())
    try:
        with running_broker(tmp) as broker:
            srv = Server(server_env(database, broker.url, MDM_PLACE_STORE_MB="1"),
                         tmp / "serve.log")
            srv.cli("tenant", "create", "acme")
            srv.cli("tenant", "create", "globex")
            admin = srv.cli("admin", "create", "--tenant", "acme", "--name", "alice").strip()
            auditor = srv.cli("admin", "create", "--tenant", "acme", "--name", "audrey",
                              "--role", "auditor").strip()
            other = srv.cli("admin", "create", "--tenant", "globex", "--name", "eve").strip()
            srv.start()
            try:
                yield Env(srv, database, admin, auditor, other)
            finally:
                srv.stop()
    finally:
        asyncio.run(drop_database(database))


def _ring(n: int, centre: tuple[float, float] = (52.0, 5.0), r: float = 0.01
          ) -> dict[str, Any]:
    """A polygon of ``n`` positions (a circle), a few dozen bytes a position."""
    import math

    pts = [[round(centre[1] + r * math.cos(2 * math.pi * k / n), 7),
            round(centre[0] + r * math.sin(2 * math.pi * k / n), 7)] for k in range(n)]
    return {"type": "Polygon", "coordinates": [[*pts, pts[0]]]}


def test_a_place_is_versioned_listed_and_deleted(env: Env) -> None:
    depot = square((52.0, 5.0), 300)
    status, v1 = env.call("PUT", "/depot", body=depot)
    assert status == 201, v1
    assert (v1["name"], v1["version"], v1["deleted"], v1["created_by"]) == ("depot", 1,
                                                                            False, "alice")
    assert v1["place"] == depot and v1["area_m2"] == pytest.approx(90_000, rel=0.02)
    feature = {"type": "Feature", "properties": {"kind": "warehouse"},
               "geometry": square((52.0, 5.0), 500)}
    status, v2 = env.call("PUT", "/depot", body=feature)
    assert status == 200 and v2["version"] == 2
    assert env.call("GET", "/depot", env.auditor)[1]["place"] == feature
    assert env.call("GET", "/depot/versions/1", env.auditor)[1]["place"] == depot
    status, page = env.call("GET", "/depot/versions?limit=1", env.auditor)
    assert status == 200 and [v["version"] for v in page["versions"]] == [1]
    assert "place" not in page["versions"][0]
    status, page = env.call("GET", f"/depot/versions?limit=1&cursor={page['next']}")
    assert [v["version"] for v in page["versions"]] == [2] and page["next"] is None
    env.call("PUT", "/yard", body=square((52.01, 5.0), 100))
    status, listed = env.call("GET", "?limit=1", env.auditor)
    assert status == 200 and [p["name"] for p in listed["places"]] == ["depot"]
    status, rest = env.call("GET", f"?cursor={listed['next']}", env.auditor)
    assert [p["name"] for p in rest["places"]] == ["yard"] and rest["next"] is None
    assert listed["storage"]["cap_bytes"] == 1024 * 1024 and listed["storage"]["bytes"] > 0

    assert env.call("DELETE", "/yard")[0] == 204
    assert env.call("GET", "/yard")[0] == 404
    assert env.call("DELETE", "/yard")[0] == 404
    assert [p["name"] for p in env.call("GET", "")[1]["places"]] == ["depot"]
    versions = env.call("GET", "/yard/versions")[1]["versions"]
    assert [(v["version"], v["deleted"]) for v in versions] == [(1, False), (2, True)]
    # Audited, never with the area itself.
    rows = asyncio.run(fetch(env.database, "SELECT action, target, details FROM audit_log "
                                           "WHERE action LIKE 'place.%' ORDER BY seq"))
    assert [(r["action"], r["target"]) for r in rows] == [
        ("place.put", "place:depot"), ("place.put", "place:depot"),
        ("place.put", "place:yard"), ("place.delete", "place:yard")]
    assert all("coordinates" not in json.dumps(r["details"]) for r in rows)


def test_places_are_the_tenants_own(env: Env) -> None:
    env.call("PUT", "/hq", body=square((52.0, 5.0), 100))
    assert env.call("GET", "/hq", env.other)[0] == 404
    assert env.call("GET", "/hq/versions", env.other)[0] == 404
    assert env.call("DELETE", "/hq", env.other)[0] == 404
    assert "hq" not in [p["name"] for p in env.call("GET", "", env.other)[1]["places"]]
    assert env.call("PUT", "/hq", env.auditor, square((52.0, 5.0), 100))[0] == 403
    assert env.call("DELETE", "/hq", env.auditor)[0] == 403


def test_an_invalid_place_lists_every_problem_and_changes_nothing(env: Env) -> None:
    bow_tie = {"type": "Polygon", "coordinates": [[[5, 52], [5.1, 52.1], [5.1, 52],
                                                   [5, 52.1], [5, 52]]]}
    status, err = env.call("PUT", "/bad", body=bow_tie)
    assert status == 422
    assert err["issues"][0]["path"] == "coordinates"
    assert "Self-intersection" in err["issues"][0]["message"]
    status, err = env.call("PUT", "/bad", body={"type": "Point", "coordinates": [5, 52]})
    assert status == 422 and err["issues"][0]["path"] == "type"
    status, err = env.call("PUT", "/bad", body={"type": "MultiPolygon", "coordinates": [
        [[[5, 52], [5.1, 52], [5.1, 52.1], [5, 52]]], [[[5, 52], [500, 0], [5, 52]]]]})
    assert status == 422
    assert {i["path"] for i in err["issues"]} >= {"coordinates[1][0]"}
    assert env.call("GET", "/bad")[0] == 404
    assert env.call("GET", "/bad/versions")[0] == 404


def test_a_place_body_is_limited_to_1_mib(env: Env) -> None:
    big = json.dumps(_ring(60_000)).encode()
    assert len(big) > 1024 * 1024
    req = urllib.request.Request(env.server.base + "/api/v1/places/huge", data=big,
                                 method="PUT", headers={
                                     "Authorization": f"Bearer {env.admin}",
                                     "Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=30)
        raise AssertionError("accepted")
    except urllib.error.HTTPError as err:
        assert err.code == 413
    assert env.call("GET", "/huge")[0] == 404


def test_the_cap_prunes_old_versions_first_then_refuses(env: Env) -> None:
    """1 MiB for the tenant (MDM_PLACE_STORE_MB=1): versions of ~300 KB each."""
    body = _ring(12_000, (53.0, 6.0))
    assert 280_000 < len(json.dumps(body)) < 340_000
    for _ in range(3):
        status, v = env.call("PUT", "/big", body=body)
        assert status in (200, 201), v
    status, v = env.call("PUT", "/big", body=body)  # 4 x 300 KB: the oldest goes
    assert status == 200, v
    versions = env.call("GET", "/big/versions")[1]["versions"]
    pruned = [x["version"] for x in versions if x["pruned"]]
    assert pruned and pruned == list(range(1, len(pruned) + 1))
    assert versions[-1]["pruned"] is False
    assert env.call("GET", f"/big/versions/{pruned[0]}")[1].get("place") is None
    # The tenant's oldest bodies go first, whichever place's (depot's first version).
    rows = asyncio.run(fetch(env.database, "SELECT details FROM audit_log WHERE "
                                           "action = 'place.put'"))
    gone = asyncio.run(fetch(env.database, "SELECT name, version FROM places "
                                           "WHERE pruned_at IS NOT NULL ORDER BY created_at"))
    assert sum(r["details"].get("pruned_versions", 0) for r in rows) == len(gone)
    assert (gone[0]["name"], gone[0]["version"]) == ("depot", 1)
    assert env.call("GET", "/depot/versions/1")[1]["pruned"] is True
    # Places in force that do not fit with the new one: refused, nothing changed.
    for name in ("big2", "big3"):
        assert env.call("PUT", f"/{name}", body=body)[0] == 201
    status, err = env.call("PUT", "/big4", body=body)
    assert status == 409 and err["code"] == "place_storage_full", err
    assert env.call("GET", "/big4")[0] == 404
    assert env.call("GET", "/big4/versions")[0] == 404
