"""The personal-device floor and the policy preview, attacked as a tenant's own
admin would (issue 9, parts 1 and 2), through the real server, broker and database.

1. A group policy written without personal devices in mind ("collect location")
   must not lift the floor for a personal device in that group: no location, the
   floor's masks, hashes and drops, every raw value absent from the database.
   Only a policy that names ``ownership: personal`` may relax it, and the user's
   plain-language page then says what it collects beyond the floor.
2. ``:preview`` must not hash under the tenant's key: the preview of a value and
   its stored hash differ; previews are rate-limited per tenant and audited; a
   policy that hashes a value with few possible values gets a warning.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import orjson
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

# Raw values a personal device reports; the floor stores none of them as sent.
RAW = {"imei": "356938035643809", "phone_number": "+31612345678",
       "serial": "SNFLOORTEST0001", "wifi_mac": "a4:5e:60:d1:22:3f",
       "bluetooth_mac": "a4:5e:60:d1:22:40", "user_email": "jo.floor@example.com",
       "user_name": "jo_floor_worker", "first_name": "Jofloorfirst",
       "last_name": "Jofloorlast"}
SIM_RAW = {"iccid": "8931440400000123456", "imsi": "204080123456789"}
IP = "10.20.30.41"
PREVIEW_LIMIT = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    def enroll(srv: Server) -> None:
        for device, ownership in (("byod", "personal"), ("corp", "corporate")):
            srv.cli("device", "enroll", "--tenant", "acme", "--device", device,
                    "--ownership", ownership, "--group", "field")

    with served(tmp_path_factory.mktemp("floor"), setup=enroll,
                MDM_PREVIEW_PER_MIN=str(PREVIEW_LIMIT)) as srv:
        yield srv


@pytest.fixture(scope="module")
def admin(server: Server) -> str:
    return server.cli("admin", "create", "--tenant", "acme", "--name", "alice").strip()


@pytest.fixture(scope="module")
def user(server: Server) -> str:
    return server.cli("user", "token", "--tenant", "acme", "--device", "byod").strip()


def _db(server: Server) -> str:
    return server.env["TEST_DATABASE"]


def _report(server: Server, device: str, tag: str) -> int:
    """Location, identity, SIM and network records from ``device``; how many."""
    now = int(time.time() * 1000)
    messages = []
    for kind, data in zip(KINDS, ({"lat": 52.0801, "lon": 4.3102, "accuracy_m": 5.0},
                                  {**RAW, "model": "Pixel 8"},
                                  {**SIM_RAW, "state": "ready"},
                                  {"ip": IP, "network_type": "wifi"}), strict=True):
        rec = Record(f"{tag}-{kind}", now, data)
        messages.append((telemetry_topic("acme", device, kind),
                         encode_telemetry([rec], device=device, kind=kind)))
    publish_as_devices(int(server.env["BROKER_PORT"]), messages)
    return len(messages)


KINDS = ("location", "identity", "sim", "network")


def _stored(server: Server, device: str, tag: str, n: int) -> dict[str, dict[str, Any]]:
    """The records of one report, by kind, once ``n`` of them are stored (and a moment
    more, so that one stored later would be seen too)."""
    ids = ", ".join(f"'{stored_id('acme', device, f'{tag}-{kind}')}'" for kind in KINDS)
    where = f"device_id = '{device}' AND record_id IN ({ids})"
    wait_for_count(_db(server), f"SELECT count(*) FROM telemetry WHERE {where}", n,
                   timeout=30, settle=1.0)
    rows = asyncio.run(fetch_telemetry(_db(server), where))
    return {r["kind"]: r for r in rows}


def _put(server: Server, admin: str, name: str, doc: dict[str, Any]) -> dict[str, Any]:
    status, body = server.request("PUT", f"/api/v1/policies/{name}", admin, doc)
    assert status in (200, 201), body
    time.sleep(0.5)  # the ingest reloads the tenant's policies on the NOTIFY
    return body  # type: ignore[no-any-return]


def test_a_group_policy_does_not_lift_the_floor(server: Server, admin: str, user: str
                                                ) -> None:
    # The auditor's bypass: "collect location" for a group, nothing about ownership.
    _put(server, admin, "field", {"applies_to": {"groups": ["field"]},
                                  "collect": {"location": True}})
    corp = _stored(server, "corp", "g1", _report(server, "corp", "g1"))
    assert set(corp) == {"location", "identity", "sim", "network"}
    assert corp["identity"]["data"]["imei"] == RAW["imei"]  # as the policy says, for corp
    byod = _stored(server, "byod", "g1", _report(server, "byod", "g1") - 1)
    assert set(byod) == {"identity", "sim", "network"}  # no location: the floor holds
    assert {r["policy_id"] for r in byod.values()} == {"field+personal-floor"}
    ident = byod["identity"]["data"]
    assert ident["imei"] == "*" * 11 + "3809" and ident["phone_number"].endswith("5678")
    for name in ("serial", "wifi_mac", "bluetooth_mac"):
        assert ident[name].startswith("hmac-sha256:"), name
    for name in ("user_email", "user_name", "first_name", "last_name"):
        assert name not in ident, name
    assert ident["model"] == "Pixel 8"
    assert all(byod["sim"]["data"][k].startswith("hmac-sha256:") for k in SIM_RAW)
    assert "ip" not in byod["network"]["data"]

    # Nowhere in the database, sealed or opened: not one raw value of the personal device.
    dump = subprocess.run(["pg_dump", "--no-owner", _db(server)], capture_output=True,
                          text=True, check=True).stdout
    opened = orjson.dumps(asyncio.run(fetch_telemetry(_db(server), "device_id = 'byod'")),
                          default=str).decode()
    for value in [*RAW.values(), *SIM_RAW.values(), IP]:
        assert value not in dump and value not in opened, value

    # The admin sees which policy decides, and why there is no location to show.
    status, listing = server.request("GET", "/api/v1/policies", admin)
    assert status == 200
    assert listing["personal_devices"] == [{"policy": "field+personal-floor", "base": "field",
                                            "version": 1, "floor": "merged",
                                            "devices": ["byod"]}]
    assert listing["personal_floor"]["id"] == "builtin:personal-floor"
    status, device = server.request("GET", "/api/v1/devices/byod", admin)
    assert device["policy"]["floor"] == "merged"
    assert device["policy"]["collects"]["location"] is False
    status, device = server.request("GET", "/api/v1/devices/corp", admin)
    assert device["policy"] == {"policy": "field", "base": "field", "version": 1,
                                "floor": "none", "collects": {
                                    k: True for k in device["policy"]["collects"]}}
    # The user is told the floor applies; nothing is said to be collected beyond it.
    status, mine = server.request("GET", "/api/v1/me/devices/byod/policy", user)
    assert mine["policy"] == "field+personal-floor" and mine["floor"] == "merged"
    assert mine["beyond_floor"] == []
    assert "Your location is not collected." in mine["explanation"]


def test_only_a_policy_for_personal_devices_relaxes_the_floor(server: Server, admin: str,
                                                              user: str) -> None:
    _put(server, admin, "field-byod", {
        "applies_to": {"ownership": "personal", "groups": ["field"]},
        "collect": {"location": True},
        "fields": {"identity.imei": {"action": "mask", "keep_last": 4},
                   "identity.phone_number": {"action": "drop"}},
        "location": {"precision_m": 1000}})
    byod = _stored(server, "byod", "r1", _report(server, "byod", "r1"))
    assert set(byod) == {"location", "identity", "sim", "network"}
    assert {r["policy_id"] for r in byod.values()} == {"field-byod"}
    assert byod["location"]["data"]["accuracy_m"] == 1000.0  # snapped as written
    assert byod["identity"]["data"]["serial"] == RAW["serial"]  # relaxed: as written
    status, mine = server.request("GET", "/api/v1/me/devices/byod/policy", user)
    assert status == 200 and mine["floor"] == "relaxed"
    beyond = mine["beyond_floor"]
    assert "Your location is collected (the minimum for personal devices: not collected)." \
        in beyond
    assert any(line.startswith("Your device serial number is stored as sent") for line in beyond)
    assert not any("IMEI" in line or "phone number" in line for line in beyond)
    status, listing = server.request("GET", "/api/v1/policies", admin)
    assert [(e["policy"], e["floor"]) for e in listing["personal_devices"]] == [
        ("field-byod", "relaxed")]
    # Gone again: the floor is back.
    assert server.request("DELETE", "/api/v1/policies/field-byod", admin)[0] == 204
    time.sleep(0.5)
    byod = _stored(server, "byod", "r2", _report(server, "byod", "r2") - 1)
    assert "location" not in byod


def test_preview_is_no_oracle_for_stored_hashes(server: Server, admin: str) -> None:
    # The floor stored the personal device's serial hashed under the tenant's key.
    [row] = asyncio.run(fetch_telemetry(
        _db(server), "device_id = 'byod' AND record_id = $1",
        stored_id("acme", "byod", "g1-identity")))
    stored = row["data"]["serial"]
    assert stored.startswith("hmac-sha256:")
    draft = {"fields": {"identity.serial": {"action": "hash"},
                        "identity.imei": {"action": "hash"}}}
    payload = {"v": 1, "id": "p", "ts": int(time.time() * 1000),
               "data": {"serial": RAW["serial"], "imei": RAW["imei"]}}
    seen = set()
    for _ in range(2):
        status, out = server.request("POST", "/api/v1/policies/field:preview", admin,
                                     {"kind": "identity", "policy": draft, "payload": payload})
        assert status == 200, out
        [rec] = out["stored"]
        assert rec["data"]["serial"].startswith("hmac-sha256:")
        assert rec["data"]["serial"] != stored  # never the tenant's key
        seen.add(rec["data"]["serial"])
        assert out["hash_key"] == "ephemeral" and "this request only" in out["hash_note"]
        assert [w["path"] for w in out["warnings"]] == ['fields["identity.imei"]']
    assert len(seen) == 2  # a key per request: not even two previews agree
    entries = asyncio.run(fetch(_db(server), "SELECT actor, details FROM audit_log "
                                             "WHERE action = 'policy.preview'"))
    assert len(entries) >= 2 and {e["actor"] for e in entries} == {"alice"}
    assert entries[-1]["details"] == {"kind": "identity", "draft": True, "records": 1}

    # Rate-limited per tenant, apart from the API's own limit.
    codes = [server.request("POST", "/api/v1/policies/field:preview", admin,
                            {"kind": "identity", "policy": draft, "payload": payload})[0]
             for _ in range(PREVIEW_LIMIT)]
    assert codes[-1] == 429 and 200 in codes
    assert server.request("GET", "/api/v1/policies", admin)[0] == 200  # the rest goes on


def test_saving_a_hash_of_few_values_warns(server: Server, admin: str) -> None:
    body = _put(server, admin, "warned", {"applies_to": {"groups": ["nobody"]}, "fields": {
        "sim.iccid": {"action": "hash"}, "identity.serial": {"action": "hash"}}})
    assert [w["path"] for w in body["warnings"]] == ['fields["sim.iccid"]']
    assert "mask" in body["warnings"][0]["message"]
