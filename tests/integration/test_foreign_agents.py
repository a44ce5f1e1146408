"""OwnTracks (MQTT and HTTP) and OsmAnd / Traccar Client end to end (issue 12):
enrolled with the CLI, reporting through the real broker and ``serve``'s HTTP,
shaped by the tenant's policy, read back through the admin API, the user's
portal API, the export and the trip analysis; the broker's ACL, commands
(``locate`` as OwnTracks' ``reportLocation``, the rest refused), presence,
encryption, and what the logs never hold."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import ssl
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import nacl.secret
import nacl.utils
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.services import Server, fetch, fetchval, served, wait_for_count

pytestmark = pytest.mark.integration

LAT, LON = 52.0907, 5.1214  # Utrecht
FIELD_POLICY = {"applies_to": {"groups": ["field"]}, "collect": {"location": True},
                "location": {"precision_m": 1000}}


@dataclass
class World:
    server: Server
    admin: str
    setups: dict[str, dict[str, Any]]  # device -> its enrollment JSON

    @property
    def db(self) -> str:
        return self.server.env["TEST_DATABASE"]

    def ot(self, device: str) -> dict[str, Any]:
        return self.setups[device]["owntracks"]  # type: ignore[no-any-return]


def _enroll(srv: Server, device: str, agent: str, ownership: str = "corporate",
            group: str = "field") -> dict[str, Any]:
    out = srv.cli("device", "enroll", "--tenant", "acme", "--device", device,
                  "--ownership", ownership, "--group", group, "--agent", agent)
    return json.loads(out)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    setups: dict[str, dict[str, Any]] = {}

    def setup(srv: Server) -> None:
        setups["otm"] = _enroll(srv, "otm", "owntracks")
        setups["oth"] = _enroll(srv, "oth", "owntracks")
        setups["otp"] = _enroll(srv, "otp", "owntracks", ownership="personal")
        setups["other"] = _enroll(srv, "other", "owntracks")
        setups["osm"] = _enroll(srv, "osm", "osmand", group="drivers")
        setups["trc"] = _enroll(srv, "trc", "traccar", group="drivers")

    with served(tmp_path_factory.mktemp("foreign"), setup=setup) as srv:
        admin = srv.cli("admin", "create", "--tenant", "acme", "--name", "alice").strip()
        status, body = srv.request("PUT", "/api/v1/policies/field", admin, FIELD_POLICY)
        assert status in (200, 201), body
        time.sleep(0.5)  # the ingest reloads the tenant's policies on the NOTIFY
        yield World(srv, admin, setups)


# --- clients shaped like the apps ----------------------------------------------------


class OwnTracksMqtt:
    """What the OwnTracks app does in MQTT mode with the enrollment's settings."""

    def __init__(self, setup: dict[str, Any], *, client_id: str | None = None) -> None:
        mqtt = setup["mqtt"]
        self.base = mqtt["topic"]
        self.received: list[tuple[str, bytes]] = []
        self.granted: list[int] = []
        self._subscribed = threading.Event()
        c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                        client_id=client_id or mqtt["client_id"], protocol=paho.MQTTv311,
                        clean_session=True)
        c.username_pw_set(setup["username"], setup["password"])
        ctx = ssl.create_default_context(cadata=mqtt["ca_pem"])
        c.tls_set_context(ctx)
        c.will_set(self.base, json.dumps({"_type": "lwt", "tst": int(time.time())}), qos=1)
        c.on_message = lambda cl, ud, msg: self.received.append((msg.topic, msg.payload))

        def on_subscribe(cl: Any, ud: Any, mid: int, rcs: Any, props: Any) -> None:
            self.granted += [rc.value for rc in rcs]
            self._subscribed.set()

        c.on_subscribe = on_subscribe
        connected = threading.Event()
        c.on_connect = lambda *a: connected.set()
        c.connect(mqtt["host"], mqtt["port"], keepalive=60)
        c.loop_start()
        assert connected.wait(15)
        self.client = c

    def subscribe(self, topic: str) -> int:
        self._subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self._subscribed.wait(10)
        return self.granted[-1]

    def publish(self, payload: dict[str, Any] | bytes, sub: str | None = None,
                topic: str | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = self.client.publish(topic or (self.base + (f"/{sub}" if sub else "")), data,
                                   qos=1)
        info.wait_for_publish(10)

    def drop(self) -> None:
        """Gone without a DISCONNECT: the broker publishes the will."""
        sock = self.client.socket()
        assert sock is not None
        self.client.loop_stop()
        sock.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _http(method: str, url: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _ot_post(setup: dict[str, Any], payload: object, *, password: str | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
    auth = base64.b64encode(f"{setup['username']}:{password or setup['password']}"
                            .encode()).decode()
    status, raw = _http("POST", setup["http"]["url"], json.dumps(payload).encode(),
                        {"Authorization": f"Basic {auth}",
                         "Content-Type": "application/json",
                         "X-Limit-U": setup["username"], "X-Limit-D": setup["device_id"],
                         **(headers or {})})
    return status, json.loads(raw) if raw else None


def _location(dlat: float = 0.0, **extra: Any) -> dict[str, Any]:
    return {"_type": "location", "lat": round(LAT + dlat, 6), "lon": LON, "acc": 12,
            "vel": 36, "cog": 90, "alt": 5, "batt": 80, "tst": int(time.time()), "tid": "tm",
            **extra}


def _seal(secret: str, plain: dict[str, Any]) -> dict[str, Any]:
    key = secret.encode().ljust(32, b"\0")[:32]
    box = nacl.secret.SecretBox(key)
    return {"_type": "encrypted",
            "data": base64.b64encode(bytes(box.encrypt(json.dumps(plain).encode()))).decode()}


def _locations(world: World, device: str) -> list[dict[str, Any]]:
    status, body = world.server.request(
        "GET", f"/api/v1/devices/{device}/data?kind=location&limit=500", world.admin)
    assert status == 200, body
    return body["records"]  # type: ignore[no-any-return]


def _wait_locations(world: World, device: str, n: int) -> list[dict[str, Any]]:
    wait_for_count(world.db, "SELECT count(*) FROM telemetry WHERE device_id = "
                   f"'{device}' AND kind = 'location'", n, timeout=30)
    return _locations(world, device)


# --- OwnTracks over MQTT ------------------------------------------------------------


def test_owntracks_mqtt_points_are_stored_shaped_by_the_policy(world: World) -> None:
    app = OwnTracksMqtt(world.ot("otm"))
    try:
        app.publish(_location())
        app.publish(_location(0.01, SSID="depot-wifi", conn="w"))
        (first, second) = sorted(_wait_locations(world, "otm", 2), key=lambda r: r["ts"])
    finally:
        app.close()
    for rec in (first, second):
        # precision_m 1000: snapped, and the accuracy says so.
        assert rec["data"]["accuracy_m"] == 1000
        assert rec["data"]["lat"] != LAT
        assert abs(rec["data"]["lat"] - LAT) < 0.02
        assert rec["policy"] == "field"
        assert "batt" not in rec["data"]
    # km/h to m/s; cog to heading.
    assert first["data"]["speed_mps"] == pytest.approx(10.0)
    assert first["data"]["heading_deg"] == 90


def test_the_acl_keeps_an_owntracks_device_to_its_own_topics(world: World) -> None:
    app = OwnTracksMqtt(world.ot("otm"))
    try:
        # Another device's base topic, and a native telemetry topic: dropped by the broker.
        app.publish(_location(0.5), topic=world.ot("other")["mqtt"]["topic"])
        app.publish(b'{"v":1}', topic="mdm/v1/acme/devices/other/telemetry/location")
        # Other devices' commands, and the apps' default friends filter: refused.
        assert app.subscribe(world.ot("other")["mqtt"]["topic"] + "/cmd") == 0x80
        assert app.subscribe("owntracks/+/+") == 0x80
        assert app.subscribe(app.base + "/cmd") == 1
        time.sleep(2)
    finally:
        app.close()
    assert asyncio.run(fetchval(world.db, "SELECT count(*) FROM telemetry "
                                          "WHERE device_id = 'other'")) == 0


def test_encrypted_payloads_open_and_a_wrong_key_is_a_dead_letter(world: World) -> None:
    setup = world.ot("otm")
    before = len(_locations(world, "otm"))
    app = OwnTracksMqtt(setup)
    try:
        app.publish(_seal(setup["encryption_key"], _location(0.02)))
        app.publish(_seal("not-the-key", _location(0.03)))
        _wait_locations(world, "otm", before + 1)
        wait_for_count(world.db, "SELECT coalesce(sum(count), 0) FROM dead_letters "
                       "WHERE device_id = 'otm' AND reason = 'bad_encryption'", 1, timeout=30)
    finally:
        app.close()
    (row,) = asyncio.run(fetch(world.db, "SELECT topic, detail FROM dead_letters "
                                         "WHERE reason = 'bad_encryption'"))
    assert row["topic"] == setup["mqtt"]["topic"]


def test_locate_is_reportlocation_and_the_answer_completes_it(world: World) -> None:
    app = OwnTracksMqtt(world.ot("otm"))
    try:
        assert app.subscribe(app.base + "/cmd") == 1
        status, cmd = world.server.request("POST", "/api/v1/devices/otm/commands",
                                           world.admin, {"type": "locate",
                                                         "reason": "lost van"})
        assert status == 201, cmd
        deadline = time.monotonic() + 30
        while not app.received and time.monotonic() < deadline:
            time.sleep(0.1)
        (topic, payload), = app.received
        assert topic == app.base + "/cmd"
        assert json.loads(payload) == {"_type": "cmd", "action": "reportLocation"}
        app.publish(_location(0.04, t="r"))
        _wait_state(world, "otm", cmd["command_id"], "completed")
    finally:
        app.close()
    status, notices = world.server.request("GET", "/api/v1/devices/otm/notices", world.admin)
    assert status == 200
    (entry,) = [n for n in notices["notices"] if n["command_id"] == cmd["command_id"]]
    assert entry["agent_form"] == {"_type": "cmd", "action": "reportLocation"}


def _wait_state(world: World, device: str, command_id: str, state: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        status, got = world.server.request(
            "GET", f"/api/v1/devices/{device}/commands/{command_id}", world.admin)
        assert status == 200
        if got["state"] == state:
            return got  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, got
        time.sleep(0.2)


def test_commands_an_agent_cannot_carry_out_are_refused(world: World) -> None:
    for device, kind in (("otm", "lock"), ("otm", "wipe"), ("osm", "locate"),
                         ("trc", "lock")):
        body: dict[str, Any] = {"type": kind, "reason": "test"}
        if kind == "wipe":
            body["scope"] = "managed"
        status, err = world.server.request("POST", f"/api/v1/devices/{device}/commands",
                                           world.admin, body)
        assert status == 409, (device, kind, err)
        assert err["code"] == "unsupported_by_agent"
        assert err["devices"] == [{"device": device,
                                   "agent": world.setups[device]["agent"]}]
    # A group: the devices that can take it get it, the others are named.
    status, batch = world.server.request("POST", "/api/v1/groups/drivers/commands",
                                         world.admin, {"type": "lock", "reason": "t"})
    assert status == 409 and {d["device"] for d in batch["devices"]} == {"osm", "trc"}
    status, batch = world.server.request("POST", "/api/v1/groups/field/commands",
                                         world.admin, {"type": "lock", "reason": "t"})
    assert status == 409 and batch["code"] == "unsupported_by_agent"
    assert asyncio.run(fetchval(world.db, "SELECT count(*) FROM commands c JOIN devices d "
                                          "USING (tenant_id, device_id) "
                                          "WHERE d.agent <> 'native' AND c.type <> 'locate'")
                       ) == 0


def test_presence_follows_the_will_and_signs_of_life(world: World) -> None:
    app = OwnTracksMqtt(world.ot("other"))
    app.publish({"_type": "status", "android": {"wifi": 1}}, sub="status")
    _wait_presence(world, "other", True)
    app.drop()  # the broker publishes the will: offline
    _wait_presence(world, "other", False)
    status, dev = world.server.request("GET", "/api/v1/devices/other", world.admin)
    assert status == 200
    assert dev["agent"] == "owntracks" and dev["presence"]["source"] == "lwt"


def _wait_presence(world: World, device: str, online: bool) -> None:
    deadline = time.monotonic() + 40
    while True:
        status, dev = world.server.request("GET", f"/api/v1/devices/{device}", world.admin)
        assert status == 200, dev
        if dev["presence"] is not None and dev["presence"]["online"] is online:
            return
        assert time.monotonic() < deadline, dev
        time.sleep(0.2)


# --- OwnTracks over HTTP ------------------------------------------------------------


def test_owntracks_http_answers_after_the_commit(world: World) -> None:
    setup = world.ot("oth")
    status, answer = _ot_post(setup, _location(topic=f"owntracks/{setup['username']}/oth"))
    assert status == 200 and answer == []
    # 200 came after the commit: the point is there now, not eventually.
    assert asyncio.run(fetchval(world.db, "SELECT count(*) FROM telemetry "
                                          "WHERE device_id = 'oth'")) == 1
    # An array (the apps' queue) and an encrypted one.
    status, answer = _ot_post(setup, [_location(0.001), _location(0.002), {"_type": "card"}])
    assert status == 200 and answer == []
    status, _ = _ot_post(setup, _seal(setup["encryption_key"], _location(0.003)))
    assert status == 200
    assert len(_locations(world, "oth")) == 4


def test_owntracks_http_refusals(world: World) -> None:
    setup = world.ot("oth")
    status, _ = _ot_post(setup, _location(), password="wrong-password")
    assert status == 401
    status, err = _ot_post(setup, _location(), headers={"X-Limit-D": "otm"})
    assert status == 403
    status, err = _ot_post(setup, _location(topic="owntracks/acme.otm/otm"))
    assert status == 403 and err["code"] == "topic_mismatch"
    status, err = _ot_post(setup, {"_type": "location", "lat": 91, "lon": 0,
                                   "tst": int(time.time())})
    assert status == 400 and err["code"] == "out_of_range"
    status, err = _ot_post(setup, _seal("not-the-key", _location()))
    assert status == 400 and err["code"] == "bad_encryption"
    # An OsmAnd device's credentials are not an OwnTracks login, nor a native one's.
    status, _ = _ot_post({**setup, "username": "acme.osm"}, _location())
    assert status == 401


def test_owntracks_http_locate_comes_with_the_answer(world: World) -> None:
    setup = world.ot("oth")
    status, cmd = world.server.request("POST", "/api/v1/devices/oth/commands", world.admin,
                                       {"type": "locate", "reason": "where is it"})
    assert status == 201, cmd
    status, answer = _ot_post(setup, _location(0.004))
    assert status == 200 and answer == [{"_type": "cmd", "action": "reportLocation"}]
    status, answer = _ot_post(setup, _location(0.005))
    assert status == 200 and answer == []  # taken once
    status, answer = _ot_post(setup, _location(0.006, t="r"))
    assert status == 200
    done = _wait_state(world, "oth", cmd["command_id"], "completed")
    assert [e["event"] for e in done["events"]][-1] == "located"


def test_a_personal_device_stores_no_location_from_them_either(world: World) -> None:
    setup = world.ot("otp")
    status, answer = _ot_post(setup, _location())
    assert status == 200 and answer == []
    app = OwnTracksMqtt(setup)
    try:
        app.publish(_location(0.01))
        time.sleep(2)
    finally:
        app.close()
    assert asyncio.run(fetchval(world.db, "SELECT count(*) FROM telemetry "
                                          "WHERE device_id = 'otp' AND kind = 'location'")
                       ) == 0


# --- OsmAnd / Traccar Client --------------------------------------------------------


def _trip(start_s: int) -> list[tuple[int, float, float]]:
    """A drive east at ~36 km/h for 10 minutes, a point every 30 s, then 10 minutes
    parked."""
    out = []
    for k in range(21):
        out.append((start_s + 30 * k, LAT, LON + 0.0044 * k))
    for k in range(1, 11):
        out.append((start_s + 600 + 60 * k, LAT, LON + 0.0044 * 20))
    return out


def test_osmand_and_traccar_points_everywhere_a_user_looks(world: World) -> None:
    osm = world.setups["osm"]["osmand"]
    trc = world.setups["trc"]["traccar"]
    start = int(time.time()) - 3600
    for ts, lat, lon in _trip(start):
        url = osm["url"] + "?" + urlencode({"id": "osm", "lat": lat, "lon": lon,
                                            "timestamp": ts * 1000, "speed": 10,
                                            "hdop": 8})
        status, _ = _http("GET", url)
        assert status == 200
    # Traccar Client: knots; the JSON form of Traccar Client 9 too.
    status, _ = _http("POST", trc["server_url"] + "?" + urlencode(
        {"id": "trc", "lat": LAT, "lon": LON, "timestamp": start, "speed": 10}))
    assert status == 200
    body = {"device_id": "trc", "location": {"timestamp": "2020-01-01T00:00:00Z",
                                             "coords": {"latitude": LAT, "longitude": LON}}}
    body["location"]["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                  time.gmtime(start + 60))
    status, _ = _http("POST", trc["server_url"], json.dumps(body).encode(),
                      {"Content-Type": "application/json"})
    assert status == 200

    osm_points = _locations(world, "osm")
    assert len(osm_points) == 31
    assert {r["data"]["speed_mps"] for r in osm_points} == {10.0}  # the OsmAnd app: m/s
    assert osm_points[0]["data"]["accuracy_m"] == 8  # hdop carries the accuracy
    speeds = sorted(r["data"].get("speed_mps", -1) for r in _locations(world, "trc"))
    assert speeds == [-1, pytest.approx(10 * 1852 / 3600)]  # knots

    # The trip analysis.
    q = urlencode({"from": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start - 60)),
                   "to": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start + 1300))})
    status, trips = world.server.request("GET", f"/api/v1/devices/osm/trips?{q}",
                                         world.admin)
    assert status == 200, trips
    assert len(trips["trips"]) == 1 and trips["points"] == 31

    # The user's portal and export.
    user = world.server.cli("user", "token", "--tenant", "acme", "--device", "osm").strip()
    status, mine = world.server.request(
        "GET", "/api/v1/me/devices/osm/data?kind=location&limit=500", user)
    assert status == 200 and len(mine["records"]) == 31
    status, raw = world.server.request("GET", "/api/v1/me/devices/osm/export", user)
    assert status == 200
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        assert len(zf.read("telemetry/location.jsonl").decode().splitlines()) == 31


def test_osmand_refusals_and_the_key_never_logged(world: World) -> None:
    osm = world.setups["osm"]["osmand"]
    key = urlsplit(osm["url"]).path.rsplit("/", 1)[1]
    status, raw = _http("GET", osm["url"] + "?" + urlencode(
        {"id": "trc", "lat": LAT, "lon": LON}))
    assert status == 403 and json.loads(raw)["code"] == "topic_mismatch"
    status, raw = _http("GET", osm["url"] + "?" + urlencode({"lat": LAT, "lon": LON}))
    assert status == 400 and json.loads(raw)["code"] == "missing_field"
    status, raw = _http("GET", osm["url"] + "x?" + urlencode({"id": "osm", "lat": LAT,
                                                               "lon": LON}))
    assert status == 404
    wait_for_count(world.db, "SELECT coalesce(sum(count), 0) FROM dead_letters "
                   "WHERE device_id = 'osm'", 2, timeout=10)
    rows = asyncio.run(fetch(world.db, "SELECT topic, reason, detail FROM dead_letters "
                                       "WHERE device_id = 'osm'"))
    assert {r["topic"] for r in rows} == {"GET /osmand/{key}"}
    assert key not in world.server.log_text()
    assert "GET /osmand/{key}?id&lat&lon" in world.server.log_text()
    assert not any(key in r["topic"] + r["detail"] for r in rows)
