"""Policies against abuse (issue 10), through a real server and database.

- ``GET /api/v1/policies/{name}/versions`` is paged and leaves bodies out; one
  version's body is ``GET .../versions/{version}``.
- One tenant's heavy policy requests (versions of thousands of zones) do not stall
  another tenant's API: before, one auditor's request for the versions of such a
  policy held every tenant's requests for as long as it ran (12.5 s measured).
- A tenant's stored versions are capped in bytes: old bodies are pruned to make
  room, and a version that cannot fit is refused (409 ``policy_storage_full``) with
  nothing changed.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support.services import (
    Server,
    create_database,
    drop_database,
    fetch,
    running_broker,
    server_env,
)

pytestmark = pytest.mark.integration

META_KEYS = {"name", "version", "deleted", "pruned", "bytes", "created_at", "created_by"}


def zones_policy(zones: int, vertices: int, *, group: str = "zoned") -> dict[str, Any]:
    """A valid policy excluding ``zones`` polygons of ``vertices`` vertices each."""
    out = []
    for i in range(zones):
        cx, cy = -170 + (i % 300) * 1.1, -80 + (i // 300) * 1.1
        ring = [[round(cx + 0.4 * math.cos(2 * math.pi * k / vertices), 6),
                 round(cy + 0.4 * math.sin(2 * math.pi * k / vertices), 6)]
                for k in range(vertices)]
        out.append({"type": "Polygon", "coordinates": [[*ring, ring[0]]]})
    return {"applies_to": {"groups": [group]}, "location": {"never_inside": out}}


@contextmanager
def _served(tmp: Path, **env: str) -> Iterator[tuple[Server, dict[str, str], str]]:
    database = asyncio.run(create_database())
    try:
        with running_broker(tmp) as broker:
            srv = Server(server_env(database, broker.url, MDM_API_RATE_PER_S="100000",
                                    MDM_API_BURST="1000000", **env), tmp / "serve.log")
            srv.cli("tenant", "create", "acme")
            srv.cli("tenant", "create", "globex")
            tokens = {
                "alice": srv.cli("admin", "create", "--tenant", "acme",
                                 "--name", "alice").strip(),
                "audrey": srv.cli("admin", "create", "--tenant", "acme", "--name", "audrey",
                                  "--role", "auditor").strip(),
                "eve": srv.cli("admin", "create", "--tenant", "globex",
                               "--name", "eve").strip(),
            }
            srv.start()
            try:
                yield srv, tokens, database
            finally:
                srv.stop()
    finally:
        asyncio.run(drop_database(database))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Server, dict[str, str], str]]:
    with _served(tmp_path_factory.mktemp("policy-limits")) as world:
        yield world


def test_versions_are_paged_and_without_bodies(
        served: tuple[Server, dict[str, str], str]) -> None:
    srv, tokens, _ = served
    alice, audrey, eve = tokens["alice"], tokens["audrey"], tokens["eve"]
    for days in (10, 20, 30, 40, 50):
        status, _ = srv.request("PUT", "/api/v1/policies/paged", alice,
                                {"applies_to": {"groups": ["p"]},
                                 "retention_days": {"default": days}})
        assert status in (200, 201)
    assert srv.request("DELETE", "/api/v1/policies/paged", alice)[0] == 204
    base = "/api/v1/policies/paged/versions"
    pages, cursor = [], None
    while True:
        status, page = srv.request("GET", base + "?limit=2" + (f"&cursor={cursor}"
                                                                if cursor else ""), audrey)
        assert status == 200, page
        pages.append(page["versions"])
        cursor = page["next"]
        if cursor is None:
            break
    assert [[v["version"] for v in p] for p in pages] == [[1, 2], [3, 4], [5, 6]]
    every = [v for p in pages for v in p]
    for v in every:
        assert set(v) == META_KEYS, v  # never a body, an explanation or warnings
        assert v["pruned"] is False
    assert [v["deleted"] for v in every] == [False] * 5 + [True]
    assert all(v["bytes"] > 0 for v in every[:5]) and every[5]["bytes"] == 0
    status, whole = srv.request("GET", base, audrey)
    assert status == 200 and whole == {"versions": every, "next": None}
    # One version, with its body: what was stored then.
    status, v3 = srv.request("GET", f"{base}/3", audrey)
    assert status == 200, v3
    assert v3["policy"]["retention_days"]["default"] == 30
    assert v3["explanation"] and v3["warnings"] == []
    assert {k: v3[k] for k in META_KEYS} == every[2]
    status, v6 = srv.request("GET", f"{base}/6", audrey)
    assert status == 200 and set(v6) == META_KEYS and v6["deleted"] is True
    assert srv.request("GET", f"{base}/7", audrey)[0] == 404
    # Another tenant's policy is not there at all.
    assert srv.request("GET", base, eve)[0] == 404
    assert srv.request("GET", f"{base}/3", eve)[0] == 404
    assert srv.request("GET", "/api/v1/policies/nothing/versions?cursor=3", audrey)[0] == 404
    for bad in ("cursor=x", "cursor=-1", "cursor=1e3", "limit=0", "limit=501"):
        assert srv.request("GET", f"{base}?{bad}", audrey)[0] == 400, bad


def _timed(srv: Server, method: str, path: str, token: str) -> tuple[int, Any, float, float]:
    started = time.monotonic()
    status, body = srv.request(method, path, token)
    return status, body, started, time.monotonic()


def test_one_tenants_heavy_policy_requests_do_not_stall_another_tenant(
        served: tuple[Server, dict[str, str], str]) -> None:
    """acme keeps 4 versions of a policy with 10,000 zones (7 MB each, written
    before the cap existed); its auditor reads them all at once. globex's admin is
    answered meanwhile, while they are still being worked on."""
    srv, tokens, database = served
    doc = zones_policy(10_000, 30)
    body = orjson.dumps(doc).decode()
    assert len(body) > 7_000_000
    for version in range(1, 5):
        asyncio.run(fetch(database,
                          "INSERT INTO policies (tenant_id, name, version, body, created_by) "
                          "VALUES ('acme', 'zones', $1, $2::text::jsonb, 'alice')",
                          version, body))
    audrey, eve = tokens["audrey"], tokens["eve"]
    base = "/api/v1/policies/zones"
    # Warm up both tenants' paths (connections, pool) while nothing is heavy.
    assert srv.request("GET", "/api/v1/devices", eve)[0] == 200
    assert srv.request("GET", "/api/v1/policies", eve)[0] == 200
    heavy_paths = [f"{base}/versions", f"{base}/versions/1", f"{base}/versions/2",
                   f"{base}/versions/3", base, "/api/v1/policies"]
    with ThreadPoolExecutor(len(heavy_paths)) as pool:
        heavy: list[Future[tuple[int, Any, float, float]]] = [
            pool.submit(_timed, srv, "GET", p, audrey) for p in heavy_paths]
        time.sleep(1.0)  # they have reached the server and are being worked on
        light = [_timed(srv, "GET", p, eve) for p in ("/api/v1/devices", "/api/v1/policies",
                                                       "/api/v1/token")]
        still_running = sum(not h.done() for h in heavy)
        results = [h.result(timeout=300) for h in heavy]
    assert [s for s, *_ in light] == [200, 200, 200]
    # The other tenant was answered while acme's requests were still being served.
    assert still_running > 0, "the heavy requests finished first: nothing was tested"
    last_light = max(end for *_, end in light)
    assert any(end > last_light for *_, end in results)
    print(f"\nother tenant: {[round(1000 * (e - s)) for *_, s, e in light]} ms while "
          f"acme's took {[round(e - s, 1) for *_, s, e in results]} s")
    # And the heavy answers are whole: the list without bodies, each version with its.
    statuses = [s for s, *_ in results]
    assert statuses == [200] * len(heavy_paths), statuses
    listing = results[0][1]
    assert [v["version"] for v in listing["versions"]] == [1, 2, 3, 4]
    assert all(set(v) == META_KEYS for v in listing["versions"])
    assert len(json.dumps(listing)) < 1000  # 28 MB of zones stay where they are
    for _, answer, *_ in results[1:5]:
        assert len(answer["policy"]["location"]["never_inside"]) == 10_000


def test_stored_versions_are_capped_in_bytes(tmp_path: Path) -> None:
    """A 1 MiB cap: old versions' bodies are pruned, oldest first, to make room;
    what is in force never is; a version that cannot fit is refused, and nothing
    changes."""
    with _served(tmp_path, MDM_POLICY_STORE_MB="1") as (srv, tokens, _):
        cap = 1024 * 1024
        alice = tokens["alice"]

        def put(name: str, doc: dict[str, Any]) -> tuple[int, Any]:
            return srv.request("PUT", f"/api/v1/policies/{name}", alice, doc)

        def versions(name: str) -> list[dict[str, Any]]:
            status, page = srv.request("GET", f"/api/v1/policies/{name}/versions", alice)
            assert status == 200, page
            return list(page["versions"])

        def storage() -> dict[str, int]:
            return dict(srv.request("GET", "/api/v1/policies", alice)[1]["storage"])

        assert storage() == {"bytes": storage()["bytes"], "cap_bytes": cap}
        # Versions of about 300 KB: as many as fit, then one more.
        status, first = put("a", zones_policy(350, 30, group="a1"))
        assert status == 201, first
        size, room = first["bytes"], cap - storage()["bytes"]
        assert 200_000 < size < 400_000, size
        fit = room // size + 1  # the first, and as many more as there is room for
        for i in range(2, fit + 1):
            status, v = put("a", zones_policy(350, 30, group=f"a{i}"))
            assert status == 200 and v["bytes"] == size, v
        assert not any(v["pruned"] for v in versions("a"))
        status, v = put("a", zones_policy(350, 30, group="last"))
        assert status == 200, v
        listed = versions("a")
        assert [x["pruned"] for x in listed] == [True] + [False] * fit
        assert listed[0]["bytes"] == 0
        assert storage()["bytes"] <= cap
        # A pruned version still says who made it and when, not what it said.
        status, old = srv.request("GET", "/api/v1/policies/a/versions/1", alice)
        assert status == 200 and old["pruned"] is True and "policy" not in old
        assert old["created_by"] == "alice"
        status, audit = srv.request("GET", "/api/v1/audit?limit=1", alice)
        assert audit["entries"][0]["action"] == "policy.put"
        assert audit["entries"][0]["details"] == {"version": fit + 1, "pruned_versions": 1}
        # Another policy: room is made from a's old versions, never from what is in force.
        status, b = put("b", zones_policy(350, 30, group="b"))
        assert status == 201, b
        assert versions("a")[-1]["pruned"] is False
        assert srv.request("GET", "/api/v1/policies/a", alice)[1]["policy"][
            "applies_to"]["groups"] == ["last"]
        # The policies in force and a third one of twice the size cannot all fit.
        before = (versions("a"), versions("b"), storage())
        status, refused = put("c", zones_policy(700, 30, group="c"))
        assert size + b["bytes"] + 2 * size > cap  # the test's own arithmetic
        assert status == 409, refused
        assert refused["code"] == "policy_storage_full"
        assert "1 MiB" in refused["error"]
        assert (versions("a"), versions("b"), storage()) == before
        assert srv.request("GET", "/api/v1/policies/c", alice)[0] == 404
        # Deleting a policy makes its versions prunable: then it fits.
        assert srv.request("DELETE", "/api/v1/policies/b", alice)[0] == 204
        status, c = put("c", zones_policy(700, 30, group="c"))
        assert status == 201, c
        assert all(v["pruned"] or v["deleted"] for v in versions("b"))
        assert storage()["bytes"] <= cap
