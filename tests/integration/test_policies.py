"""Policies through the real server: the API, and what ingest stores under them."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent_protocol import Record, encode_telemetry, telemetry_topic
from tests.support.mqtt import publish_as_devices
from tests.support.services import (
    Server,
    fetch,
    fetch_telemetry,
    served,
    stored_id,
    wait_for_count,
)

pytestmark = pytest.mark.integration

IMEI = "356938035643809"
PHONE = "+31612345678"
WIFI_MAC = "a4:5e:60:d1:22:3f"
EMAIL = "jo.worker@example.com"
ICCID = "8931440400000123456"
IP = "10.20.30.40"

# A square around part of The Hague where locations must never be stored.
NEVER_ZONE = {"type": "Polygon", "coordinates": [[[4.25, 52.05], [4.35, 52.05], [4.35, 52.10],
                                                   [4.25, 52.10], [4.25, 52.05]]]}
FIELD_POLICY: dict[str, Any] = {
    "applies_to": {"groups": ["field"]},
    "fields": {
        "identity.imei": {"action": "mask", "keep_last": 4},
        "identity.phone_number": {"action": "mask", "keep_last": 4},
        "identity.serial": {"action": "mask", "keep_first": 2},
        "identity.wifi_mac": {"action": "hash"},
        "identity.user_email": {"action": "drop"},
        "sim.iccid": {"action": "hash"},
        "network.ip": {"action": "drop"},
        "network.rssi_dbm": {"action": "coarsen", "step": 10},
    },
    "location": {"precision_m": 1000, "never_inside": [NEVER_ZONE]},
    "retention_days": {"location": 30, "default": 90},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with served(tmp_path_factory.mktemp("policies"), tenants=("acme", "other")) as srv:
        yield srv


@pytest.fixture(scope="module")
def admin(server: Server) -> str:
    return server.cli("admin", "create", "--tenant", "acme", "--name", "alice").strip()


def _db(server: Server) -> str:
    return server.env["TEST_DATABASE"]


def _publish(server: Server, messages: list[tuple[str, bytes]]) -> None:
    publish_as_devices(int(server.env["BROKER_PORT"]), messages)


# Stored record id (a keyed digest) -> the id the test sent.
_SENT_IDS: dict[str, str] = {}


def _msg(device: str, kind: str, rid: str, data: dict[str, Any], ts_ms: int | None = None
         ) -> tuple[str, bytes]:
    _SENT_IDS[stored_id("acme", device, rid)] = rid
    rec = Record(rid, ts_ms if ts_ms is not None else int(time.time() * 1000), data)
    return telemetry_topic("acme", device, kind), encode_telemetry([rec], device=device,
                                                                   kind=kind)


def _rows(server: Server, device: str) -> dict[str, Any]:
    """The device's rows by the record id the test sent."""
    rows = asyncio.run(fetch_telemetry(_db(server), "device_id = $1", device))
    return {_SENT_IDS[r["record_id"]]: r for r in rows}


def _wait_rows(server: Server, device: str, n: int) -> None:
    wait_for_count(_db(server), f"SELECT count(*) FROM telemetry WHERE device_id = '{device}'",
                   n, timeout=30)


# -- the API -------------------------------------------------------------------

def test_invalid_policy_gets_422_with_the_path_of_every_error(server: Server, admin: str
                                                              ) -> None:
    bad = {"collect": {"location": True, "bogus": True},
           "fields": {"identity.imei": {"action": "scramble"},
                      "identity.nope": {"action": "drop"}},
           "location": {"precision_m": 0,
                        "only_inside": [{"type": "Polygon", "coordinates": [
                            [[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}]}}
    status, body = server.request("PUT", "/api/v1/policies/broken", admin, bad)
    assert status == 422
    paths = " ".join(i["path"] for i in body["issues"])
    for fragment in ("collect", "bogus", "identity.imei", "identity.nope", "precision_m",
                     "only_inside"):
        assert fragment in paths, (fragment, body)
    assert len(body["issues"]) >= 5
    assert server.request("GET", "/api/v1/policies/broken", admin)[0] == 404


def test_every_version_is_kept_and_delete_is_a_version(server: Server, admin: str) -> None:
    doc = {"applies_to": {"ownership": "corporate"}, "collect": {"apps": False}}
    s1, v1 = server.request("PUT", "/api/v1/policies/versioned", admin, doc)
    s2, v2 = server.request("PUT", "/api/v1/policies/versioned", admin,
                            {**doc, "retention_days": {"default": 30}})
    assert (s1, v1["version"], s2, v2["version"]) == (201, 1, 200, 2)
    status, current = server.request("GET", "/api/v1/policies/versioned", admin)
    assert status == 200
    assert current["version"] == 2
    assert current["policy"]["retention_days"]["default"] == 30
    assert any("apps" in s.lower() for s in current["explanation"])
    assert server.request("DELETE", "/api/v1/policies/versioned", admin)[0] == 204
    assert server.request("GET", "/api/v1/policies/versioned", admin)[0] == 404
    status, versions = server.request("GET", "/api/v1/policies/versioned/versions", admin)
    assert status == 200
    assert [(v["version"], v["deleted"]) for v in versions["versions"]] == [
        (1, False), (2, False), (3, True)]
    assert server.request("DELETE", "/api/v1/policies/default", admin)[0] == 409


def test_policies_are_per_tenant_and_admin_only(server: Server, admin: str) -> None:
    other = server.cli("admin", "create", "--tenant", "other", "--name", "eve").strip()
    server.request("PUT", "/api/v1/policies/acme-only", admin, {"applies_to": {}})
    assert server.request("GET", "/api/v1/policies/acme-only", other)[0] == 404
    assert server.request("GET", "/api/v1/policies/acme-only")[0] == 401
    assert server.request("GET", "/api/v1/policies/acme-only", "mdm_forged")[0] == 401
    names = [p["name"] for p in server.request("GET", "/api/v1/policies", other)[1]["policies"]]
    assert names == ["default"]


def test_preview_shows_what_would_be_stored(server: Server, admin: str) -> None:
    before = asyncio.run(fetch(_db(server), "SELECT count(*) AS n FROM telemetry"))[0]["n"]
    status, body = server.request("POST", "/api/v1/policies/field:preview", admin, {
        "policy": FIELD_POLICY, "kind": "identity",
        "payload": {"v": 1, "id": "p1", "ts": int(time.time() * 1000),
                    "data": {"imei": IMEI, "user_email": EMAIL, "model": "Pixel 8"}}})
    assert status == 200, body
    [stored] = body["stored"]
    assert stored["data"]["imei"] == "*" * 11 + IMEI[-4:]
    assert "user_email" not in stored["data"]
    assert stored["data"]["model"] == "Pixel 8"
    status, body = server.request("POST", "/api/v1/policies/field:preview", admin, {
        "policy": FIELD_POLICY, "kind": "location",
        "payload": {"v": 1, "id": "p2", "ts": int(time.time() * 1000),
                    "data": {"lat": 52.07, "lon": 4.30}}})
    assert (status, body["stored"], body["suppressed"]) == (200, [], ["p2"])
    # Nothing was written by a preview.
    assert asyncio.run(fetch(_db(server), "SELECT count(*) AS n FROM telemetry"))[0]["n"] == before


# -- ingest under a policy -----------------------------------------------------

def test_each_field_action_and_location_rule_shapes_the_stored_row(server: Server,
                                                                   admin: str) -> None:
    assert server.request("PUT", "/api/v1/policies/field", admin, FIELD_POLICY)[0] in (200, 201)
    server.cli("device", "enroll", "--tenant", "acme", "--device", "f1", "--ownership",
               "corporate", "--group", "field")
    time.sleep(1.0)  # the NOTIFY reaches the worker
    _publish(server, [
        _msg("f1", "identity", "i1", {"imei": IMEI, "phone_number": PHONE, "serial": "R58M12AB",
                                      "wifi_mac": WIFI_MAC, "user_email": EMAIL,
                                      "model": "Pixel 8"}),
        _msg("f1", "sim", "s1", {"state": "ready", "iccid": ICCID, "carrier": "KPN"}),
        _msg("f1", "network", "n1", {"rssi_dbm": -67, "ip": IP, "network_type": "lte"}),
        _msg("f1", "location", "in-zone", {"lat": 52.0712345, "lon": 4.3012345}),
        _msg("f1", "location", "outside", {"lat": 52.3712345, "lon": 4.8912345,
                                           "accuracy_m": 8}),
    ])
    _wait_rows(server, "f1", 4)
    time.sleep(0.5)
    rows = _rows(server, "f1")
    assert set(rows) == {"i1", "s1", "n1", "outside"}  # in-zone was suppressed
    ident = rows["i1"]["data"]
    assert ident["imei"] == "*" * 11 + "3809"
    assert ident["phone_number"].endswith("5678")
    assert ident["phone_number"].count("*") == len(PHONE) - 4
    assert ident["serial"] == "R5" + "*" * 6
    assert ident["wifi_mac"].startswith("hmac-sha256:")
    assert "user_email" not in ident
    assert ident["model"] == "Pixel 8"
    assert rows["s1"]["data"]["iccid"].startswith("hmac-sha256:")
    assert rows["n1"]["data"]["rssi_dbm"] == -70
    assert "ip" not in rows["n1"]["data"]
    loc = rows["outside"]["data"]
    assert abs(loc["lat"] - 52.3712345) <= 0.0046  # half a 1 km cell
    assert abs(loc["lon"] - 4.8912345) <= 0.0046 / math.cos(math.radians(52.37))
    assert (loc["lat"], loc["lon"]) != (52.3712345, 4.8912345)
    assert loc["accuracy_m"] >= 1000
    assert {r["policy_id"] for r in rows.values()} == {"field"}
    suppressed = asyncio.run(fetch(_db(server), "SELECT count FROM suppressed_locations "
                                                "WHERE device_id = 'f1'"))
    assert [r["count"] for r in suppressed] == [1]


def test_only_while_checked_out_by_event_time(server: Server, admin: str) -> None:
    policy = {"applies_to": {"groups": ["shift"]},
              "location": {"only_while_checked_out": True}}
    assert server.request("PUT", "/api/v1/policies/shift", admin, policy)[0] in (200, 201)
    server.cli("device", "enroll", "--tenant", "acme", "--device", "s1", "--ownership",
               "corporate", "--group", "shift")
    time.sleep(1.0)
    t0 = int(time.time() * 1000) - 60_000
    out = {"event": "check_out", "user_id": "w-17"}
    back = {"event": "check_in", "user_id": "w-17"}
    # Published out of order: the check-in comes last but happened before loc-3.
    _publish(server, [_msg("s1", "location", "before", {"lat": 52.1, "lon": 4.3}, t0)])
    _publish(server, [_msg("s1", "checkinout", "out", out, t0 + 1000),
                      _msg("s1", "location", "during", {"lat": 52.1, "lon": 4.3}, t0 + 2000),
                      _msg("s1", "location", "after", {"lat": 52.1, "lon": 4.3}, t0 + 4000)])
    _wait_rows(server, "s1", 3)
    _publish(server, [_msg("s1", "checkinout", "in", back, t0 + 3000)])
    _wait_rows(server, "s1", 4)
    time.sleep(1.0)
    rows = _rows(server, "s1")
    assert {k for k, r in rows.items() if r["kind"] == "location"} == {"during"}
    assert {k for k, r in rows.items() if r["kind"] == "checkinout"} == {"out", "in"}


def test_personal_device_under_the_default_gets_the_floor(server: Server) -> None:
    server.cli("device", "enroll", "--tenant", "acme", "--device", "byod", "--ownership",
               "personal", "--user-email", EMAIL)
    _publish(server, [
        _msg("byod", "identity", "i", {"imei": IMEI, "phone_number": PHONE, "model": "X"}),
        _msg("byod", "location", "l", {"lat": 52.1, "lon": 4.3}),
        _msg("byod", "apps", "a", {"apps": [{"package": "com.example.game"}]}),
        _msg("byod", "network", "n", {"network_type": "wifi"}),
    ])
    _wait_rows(server, "byod", 2)
    time.sleep(1.0)
    rows = _rows(server, "byod")
    assert set(rows) == {"i", "n"}  # no location, no apps inventory
    assert rows["i"]["data"]["imei"].endswith("3809")
    assert IMEI not in rows["i"]["data"]["imei"]
    assert PHONE not in rows["i"]["data"]["phone_number"]
    # A policy for every device (keep everything; here "acme-only", which an earlier
    # test made and which wins the tie with "default" by name) merged with the floor.
    assert {r["policy_id"] for r in rows.values()} == {"acme-only+personal-floor"}


def test_policy_change_while_messages_flow(server: Server, admin: str) -> None:
    """Every record is shaped by exactly one version, and stamped with it."""
    keep = {"applies_to": {"groups": ["flow"]}}
    mask = {"applies_to": {"groups": ["flow"]},
            "fields": {"identity.imei": {"action": "mask", "keep_last": 4}}}
    server.request("PUT", "/api/v1/policies/flow", admin, keep)
    for d in ("w1", "w2"):
        server.cli("device", "enroll", "--tenant", "acme", "--device", d, "--ownership",
                   "corporate", "--group", "flow")
    time.sleep(1.0)
    n = 6000
    msgs = [_msg(f"w{1 + i % 2}", "identity", f"r{i}", {"imei": IMEI}) for i in range(n)]
    import threading

    publisher = threading.Thread(target=_publish, args=(server, msgs))
    publisher.start()
    time.sleep(0.3)
    status, changed = server.request("PUT", "/api/v1/policies/flow", admin, mask)
    assert status == 200
    publisher.join()
    wait_for_count(_db(server), "SELECT count(*) FROM telemetry WHERE device_id IN "
                   "('w1', 'w2')", n, timeout=60)
    rows = asyncio.run(fetch_telemetry(_db(server), "device_id IN ('w1', 'w2')"))
    by_version: dict[int, set[str]] = {}
    for r in rows:
        by_version.setdefault(r["policy_version"], set()).add(r["data"]["imei"])
    masked = "*" * 11 + "3809"
    v_keep, v_mask = changed["version"] - 1, changed["version"]
    assert by_version.get(v_keep, {IMEI}) == {IMEI}
    assert by_version.get(v_mask, {masked}) == {masked}
    assert set(by_version) <= {v_keep, v_mask}
    assert v_mask in by_version  # the change reached the running worker


def test_only_inside_keeps_points_in_the_work_zones_only(server: Server, admin: str) -> None:
    work = {"type": "MultiPolygon", "coordinates": [
        [[[5.0, 51.0], [5.1, 51.0], [5.1, 51.1], [5.0, 51.1], [5.0, 51.0]]],
        [[[6.0, 52.0], [6.1, 52.0], [6.1, 52.1], [6.0, 52.1], [6.0, 52.0]]]]}
    policy = {"applies_to": {"groups": ["zoned"]}, "location": {"only_inside": [work]}}
    assert server.request("PUT", "/api/v1/policies/zoned", admin, policy)[0] in (200, 201)
    server.cli("device", "enroll", "--tenant", "acme", "--device", "z1", "--ownership",
               "corporate", "--group", "zoned")
    time.sleep(1.0)
    _publish(server, [
        _msg("z1", "location", "site-a", {"lat": 51.05, "lon": 5.05}),
        _msg("z1", "location", "site-b", {"lat": 52.05, "lon": 6.05}),
        _msg("z1", "location", "edge", {"lat": 51.0, "lon": 5.05}),  # on the boundary
        _msg("z1", "location", "home", {"lat": 51.5, "lon": 5.5}),
    ])
    _wait_rows(server, "z1", 3)
    time.sleep(1.0)
    rows = _rows(server, "z1")
    assert set(rows) == {"site-a", "site-b", "edge"}
    assert rows["site-a"]["data"] == {"lat": 51.05, "lon": 5.05}  # no snapping asked
    counts = asyncio.run(fetch(_db(server), "SELECT count FROM suppressed_locations "
                                            "WHERE device_id = 'z1'"))
    assert [r["count"] for r in counts] == [1]
