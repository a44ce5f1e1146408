"""What OwnTracks and OsmAnd / Traccar Client really send (the shared corpus,
tests/support/corpus.py), through the running server (issue 12).

Every OwnTracks ``device_publish*`` and ``valid/*`` record is posted over HTTP
(timestamps moved to now; a ``topic`` in the body set to the login's own, which
the server checks) and the ``device_publish`` ones also published over MQTT:
each is answered 200 and stored exactly as the adapter maps it (same record ids,
same data: docs/agents.md), under a policy that keeps everything. Every
``invalid/*`` record gets the verdict the adapter gives (tests/unit/test_owntracks.py,
``INVALID``, and docs/agents.md, "Where this differs from the apps' own
verdicts"): refused with 400 and a dead letter with that reason, or accepted and
ignored; none stops the ingest. The encrypted vector opens with its key. Every
OsmAnd / Traccar Client request is sent to an OsmAnd and a Traccar Client device
(ids made the device's, timestamps moved to now in the format sent) and stored
exactly as the adapter maps it with each app's speed unit, or refused with the
adapter's reason.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import nacl.secret
import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent_protocol import (
    ProtocolError,
    Reason,
    decode_osmand,
    decode_owntracks,
    parse_owntracks_topic,
)
from mdm_server.agents.secrets import seal_secret
from tests.support.corpus import load_jsonl
from tests.support.services import (
    TEST_MASTER_KEY,
    Server,
    fetch,
    fetch_telemetry,
    served,
    stored_id,
)

pytestmark = pytest.mark.integration

VECTOR_KEY = "123"  # the corpus's encrypted vector's passphrase (FORMAT.md)
OSMAND_TEMPLATES = {19, 22}  # URL and JSON templates with placeholders, not requests


@dataclass
class World:
    server: Server
    setups: dict[str, dict[str, Any]]

    @property
    def db(self) -> str:
        return self.server.env["TEST_DATABASE"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    setups: dict[str, dict[str, Any]] = {}

    def setup(srv: Server) -> None:
        for device, agent in (("cot", "owntracks"), ("cmq", "owntracks"),
                              ("cosm", "osmand"), ("ctrc", "traccar")):
            setups[device] = json.loads(srv.cli(
                "device", "enroll", "--tenant", "acme", "--device", device,
                "--ownership", "corporate", "--agent", agent))
        # The corpus's vector is sealed with "123": make that the devices' passphrase
        # (as the database would hold it had enrollment chosen it).
        for device in ("cot", "cmq"):
            asyncio.run(fetch(
                srv.env["TEST_DATABASE"],
                "UPDATE devices SET agent_secret = $1 WHERE device_id = $2",
                seal_secret(base64.b64decode(TEST_MASTER_KEY), "acme", device, "owntracks",
                            VECTOR_KEY), device))

    with served(tmp_path_factory.mktemp("corpus"), setup=setup) as srv:
        yield World(srv, setups)


# --- OwnTracks ----------------------------------------------------------------------


def ot_corpus() -> list[dict[str, Any]]:
    return load_jsonl("owntracks/payloads.jsonl")


def _seconds(v: object) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float) and 0 < v < 10**10:
        return int(v)
    if isinstance(v, str) and v.isdigit() and 0 < int(v) < 10**10:
        return int(v)
    return None


def _tsts(obj: Any) -> list[int]:
    if isinstance(obj, dict):
        out = [s for k, v in obj.items() if k == "tst" and (s := _seconds(v)) is not None]
        return out + [t for v in obj.values() for t in _tsts(v)]
    if isinstance(obj, list):
        return [t for v in obj for t in _tsts(v)]
    return []


def _rebase(obj: Any, shift: int, topic: str | None) -> Any:
    """``tst`` values (epoch seconds, as numbers or digit strings) moved by ``shift``,
    in the type sent; ``topic`` fields set to ``topic``."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            s = _seconds(v) if k == "tst" else None
            if s is not None:
                out[k] = str(s + shift) if isinstance(v, str) else s + shift
            elif k == "topic" and topic is not None and isinstance(v, str):
                out[k] = topic
            else:
                out[k] = _rebase(v, shift, topic)
        return out
    if isinstance(obj, list):
        return [_rebase(v, shift, topic) for v in obj]
    return obj


def _box() -> nacl.secret.SecretBox:
    return nacl.secret.SecretBox(VECTOR_KEY.encode().ljust(32, b"\0"))


def ot_payload(rec: dict[str, Any], to: int, topic: str | None) -> bytes:
    """The record's payload with its newest ``tst`` moved to ``to`` (seconds)."""
    p = rec["payload"]
    if rec["kind"] == "device_publish_encrypted":
        plain = json.loads(_box().decrypt(base64.b64decode(p["data"])))
        newest = max(_tsts(plain))
        sealed = _box().encrypt(orjson.dumps(_rebase(plain, to - newest, topic)))
        return orjson.dumps({**p, "data": base64.b64encode(bytes(sealed)).decode()})
    if isinstance(p, str):
        m = re.fullmatch(r"(\w+),([0-9A-Fa-f]+),(.*)", p)
        if m and rec["type"] == "raw":  # Greenwich CSV: hex epoch seconds
            return f"{m.group(1)},{to:X},{m.group(3)}".encode()
        return p.encode()
    tsts = _tsts(p)
    shift = to - max(tsts) if tsts else 0
    return orjson.dumps(_rebase(p, shift, topic))


def must_store() -> list[dict[str, Any]]:
    return [r for r in ot_corpus() if r["kind"].startswith("device_publish")
            or str(r.get("expect")).startswith("valid/")]


def invalid() -> list[dict[str, Any]]:
    return [r for r in ot_corpus() if str(r.get("expect")).startswith("invalid/")]


def _post_ot(world: World, device: str, body: bytes) -> tuple[int, Any]:
    s = world.setups[device]["owntracks"]
    auth = base64.b64encode(f"{s['username']}:{s['password']}".encode()).decode()
    req = urllib.request.Request(s["http"]["url"], data=body, method="POST", headers={
        "Authorization": f"Basic {auth}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        raw = err.read()
        return err.code, json.loads(raw) if raw else None


def _expected(payload: bytes, subtopic: str | None, now_ms: int
              ) -> list[tuple[str, str, int, dict[str, Any]]] | ProtocolError:
    """(kind, adapter id, ts_ms, data) the adapter maps the payload to, or its error."""
    try:
        msgs = decode_owntracks(payload, subtopic=subtopic, now_ms=now_ms,
                                secret=VECTOR_KEY.encode())
    except ProtocolError as err:
        return err
    return [(k, r.id, r.ts_ms, r.data) for m in msgs for k, r in m.records]


def _stored(world: World, device: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    rows = asyncio.run(fetch_telemetry(
        world.db, "tenant_id = 'acme' AND device_id = $1 AND record_id = ANY($2::text[])",
        device, [stored_id("acme", device, i) for i in ids]))
    return {r["record_id"]: r for r in rows}


def _check_stored(world: World, device: str,
                  expected: list[tuple[str, str, int, dict[str, Any]]]) -> None:
    stored = _stored(world, device, [e[1] for e in expected])
    for kind, rid, ts_ms, data in expected:
        row = stored.get(stored_id("acme", device, rid))
        assert row is not None, (kind, data)
        assert row["kind"] == kind
        assert int(row["ts"].timestamp() * 1000) == ts_ms
        assert row["data"] == pytest.approx(data)


def test_the_corpus_is_what_this_test_expects() -> None:
    assert len(ot_corpus()) == 196
    assert len(must_store()) == 86 and len(invalid()) == 19


def test_every_device_and_valid_owntracks_record_is_stored_over_http(world: World) -> None:
    s = world.setups["cot"]["owntracks"]
    own = f"owntracks/{s['username']}/cot"
    base = int(time.time()) - 7200
    stored = refused = 0
    for j, rec in enumerate(must_store()):
        payload = ot_payload(rec, base + 10 * j, own)
        expected = _expected(payload, None, int(time.time() * 1000))
        status, answer = _post_ot(world, "cot", payload)
        if isinstance(expected, ProtocolError):
            # The two the adapter cannot take (docs/agents.md): refused, never stored.
            assert (rec["source"], rec["type"]) in {
                ("owntracks/json-schema:test/e.json", "encrypted"),
                ("owntracks/ocli:README.md", "location")}, rec["source"]
            assert status == 400 and answer["code"] == expected.reason
            refused += 1
            continue
        assert status == 200 and isinstance(answer, list), (rec["source"], answer)
        _check_stored(world, "cot", expected)
        stored += len(expected)
    # Records, not messages: lwt, status, cards and the like map to none.
    assert refused == 2 and stored >= 50


def test_the_encrypted_vector_opens_with_its_key(world: World) -> None:
    [rec] = [r for r in ot_corpus() if r["kind"] == "device_publish_encrypted"]
    # As it is: it opens (with "123"), and then its 2019 fix is too old to store.
    status, answer = _post_ot(world, "cot", orjson.dumps(rec["payload"]))
    assert status == 400 and answer["code"] == Reason.BAD_TIMESTAMP
    s = world.setups["cot"]["owntracks"]
    payload = ot_payload(rec, int(time.time()) - 30, f"owntracks/{s['username']}/cot")
    expected = _expected(payload, None, int(time.time() * 1000))
    assert not isinstance(expected, ProtocolError) and expected
    status, _ = _post_ot(world, "cot", payload)
    assert status == 200
    _check_stored(world, "cot", expected)


def test_every_invalid_owntracks_record_gets_its_verdict(world: World) -> None:
    base = int(time.time()) - 3600
    reasons: dict[str, int] = {}
    for j, rec in enumerate(invalid()):
        payload = ot_payload(rec, base + 10 * j, None)
        expected = _expected(payload, None, int(time.time() * 1000))
        status, answer = _post_ot(world, "cot", payload)
        if isinstance(expected, ProtocolError):
            assert status == 400, (rec["source"], answer)
            assert answer["code"] == expected.reason
            reasons[str(expected.reason)] = reasons.get(str(expected.reason), 0) + 1
        else:  # ignored (cards, commands, steps, tours), {} or a location: accepted
            assert status == 200, (rec["source"], answer)
            _check_stored(world, "cot", expected)
    assert set(reasons) == {"not_json", "bad_encryption", "missing_field", "wrong_type",
                            "bad_timestamp"}
    rows = asyncio.run(fetch(world.db, "SELECT reason, sum(count) AS n FROM dead_letters "
                                       "WHERE device_id = 'cot' GROUP BY reason"))
    held = {r["reason"]: r["n"] for r in rows}
    for reason, n in reasons.items():
        assert held.get(reason, 0) >= n
    # The ingest is still there.
    status, _ = _post_ot(world, "cot", orjson.dumps(
        {"_type": "location", "lat": 1, "lon": 2, "tst": int(time.time())}))
    assert status == 200


class _Publisher:
    def __init__(self, setup: dict[str, Any]) -> None:
        mqtt = setup["mqtt"]
        self.c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=mqtt["client_id"], protocol=paho.MQTTv311)
        self.c.username_pw_set(setup["username"], setup["password"])
        self.c.tls_set_context(ssl.create_default_context(cadata=mqtt["ca_pem"]))
        up = threading.Event()
        self.c.on_connect = lambda *a: up.set()
        self.c.connect(mqtt["host"], mqtt["port"])
        self.c.loop_start()
        assert up.wait(15)
        self.base = mqtt["topic"]

    def publish(self, sub: str | None, payload: bytes) -> None:
        self.c.publish(self.base + (f"/{sub}" if sub else ""), payload, qos=1
                       ).wait_for_publish(10)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_device_publish_records_over_mqtt(world: World) -> None:
    base = int(time.time()) - 5400
    pub = _Publisher(world.setups["cmq"]["owntracks"])
    want: list[tuple[str, str, int, dict[str, Any]]] = []
    try:
        for j, rec in enumerate(r for r in ot_corpus() if r["kind"].startswith(
                "device_publish") and r["kind"] != "device_publish_http"):
            topic = rec["topic"]
            sub = None if topic is None or "<" in topic else \
                parse_owntracks_topic(topic).subtopic
            payload = ot_payload(rec, base + 10 * j, None)
            expected = _expected(payload, sub, int(time.time() * 1000))
            pub.publish(sub, payload)
            if isinstance(expected, ProtocolError):  # the README excerpt without lon
                assert rec["source"] == "owntracks/ocli:README.md"
                assert expected.reason == Reason.MISSING_FIELD
                continue
            want += expected
    finally:
        pub.close()
    deadline = time.monotonic() + 30
    while len(_stored(world, "cmq", [w[1] for w in want])) < len({w[1] for w in want}):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    _check_stored(world, "cmq", want)
    rows = asyncio.run(fetch(world.db, "SELECT reason, count FROM dead_letters "
                                       "WHERE device_id = 'cmq'"))
    assert [(r["reason"], r["count"]) for r in rows] == [("missing_field", 1)]


# --- OsmAnd / Traccar Client --------------------------------------------------------


def os_corpus() -> list[dict[str, Any]]:
    return load_jsonl("osmand/requests.jsonl")


def _now_like(value: str, at: datetime) -> str:
    """``at`` written the way ``value`` writes a time (epoch s or ms, ISO 8601, or
    ``yyyy-MM-dd HH:mm:ss``); 0 (unset) stays."""
    if value.strip() in ("", "0"):
        return value
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", value):
        seconds = at.timestamp()
        return str(int(seconds * 1000) if float(value) >= 2**31 - 1 else int(seconds))
    if "T" in value:
        frac = f".{at.microsecond // 1000:03d}" if "." in value else ""
        return at.strftime("%Y-%m-%dT%H:%M:%S") + frac + "Z"
    return at.strftime("%Y-%m-%d %H:%M:%S")


def _fix_json(obj: Any, device: str, at: datetime) -> Any:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k in ("id", "deviceid", "device_id") and isinstance(v, str | int):
                out[k] = device
            elif k == "timestamp" and isinstance(v, str | int | float):
                new = _now_like(str(v), at)
                out[k] = new if isinstance(v, str) else float(new) if "." in new else int(new)
            else:
                out[k] = _fix_json(v, device, at)
        return out
    if isinstance(obj, list):
        return [_fix_json(v, device, at) for v in obj]
    return obj


def _fix_pairs(pairs: list[tuple[str, str]], device: str, at: datetime
               ) -> list[tuple[str, str]]:
    return [(k, device if k in ("id", "deviceid", "device_id") else
             _now_like(v, at) if k == "timestamp" else v) for k, v in pairs]


def os_request(rec: dict[str, Any], device: str, at: datetime
               ) -> tuple[str, list[tuple[str, str]], str | None, bytes]:
    """(method, query, content type, body) of the request, made the device's, at ``at``."""
    query = _fix_pairs(parse_qsl(urlsplit(rec["target"]).query, keep_blank_values=True),
                       device, at)
    ctype = rec["headers"].get("Content-Type")
    body = (rec["body"] or "").encode()
    if body.strip() and ctype and ctype.startswith("application/json"):
        body = orjson.dumps(_fix_json(json.loads(body), device, at))
    elif body.strip():
        body = urlencode(_fix_pairs(parse_qsl(body.decode(), keep_blank_values=True),
                                    device, at)).encode()
    return rec["method"], query, ctype, body


@pytest.mark.parametrize("device", ["cosm", "ctrc"])
def test_every_osmand_request_is_stored_as_mapped(world: World, device: str) -> None:
    setup = world.setups[device]
    agent = setup["agent"]
    url = setup[agent]["url"]
    unit = "mps" if agent == "osmand" else "knots"
    start = time.time() - 3000
    for i, rec in enumerate(os_corpus()):
        if i in OSMAND_TEMPLATES:
            continue
        at = datetime.fromtimestamp(int(start) + 60 * i, UTC)
        method, query, ctype, body = os_request(rec, device, at)
        before = {r["record_id"] for r in asyncio.run(fetch(
            world.db, f"SELECT record_id FROM telemetry WHERE device_id = '{device}'"))}
        now_ms = int(time.time() * 1000)
        try:
            points = decode_osmand(method=method, query=query, content_type=ctype,
                                   body=body, now_ms=now_ms, speed_unit=unit)
            expected: list[tuple[str, dict[str, Any]]] | ProtocolError = [
                (k, r.data) for p in points for k, r in p.records]
        except ProtocolError as err:
            expected = err
        req = urllib.request.Request(url + ("?" + urlencode(query) if query else ""),
                                     data=body if method == "POST" else None,
                                     method=method,
                                     headers={"Content-Type": ctype} if ctype else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        if isinstance(expected, ProtocolError):
            assert status == 400, (i, raw)
            assert json.loads(raw)["code"] == expected.reason
            continue
        assert status == 200, (i, raw)
        new = [r for r in asyncio.run(fetch_telemetry(
            world.db, f"device_id = '{device}'")) if r["record_id"] not in before]
        got = sorted((r["kind"], orjson.dumps(r["data"], option=orjson.OPT_SORT_KEYS))
                     for r in new)
        assert got == sorted((k, orjson.dumps(d, option=orjson.OPT_SORT_KEYS))
                             for k, d in expected), i
