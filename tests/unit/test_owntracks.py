"""OwnTracks messages (agent_protocol.owntracks) against what the apps really send.

The corpus (tests/support/corpus.py says where it lies) holds 196 messages from the
OwnTracks apps' and servers' source trees. Its timestamps are years old; the decoders
refuse records older than 400 days, as for our own agents. Rather than rewrite each
payload, a test moves "now" to one minute after the record's newest ``tst``: the
decoders only compare the two, so it is the same as re-basing the record to now,
and the expected ``ts_ms`` stays the ``tst`` the corpus shows.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import nacl.secret
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_protocol import FIELD_TYPES, MAX_FUTURE_MS, Reason, RemoteProtocolError, validate_data
from agent_protocol.errors import LocalProtocolError, ProtocolError
from agent_protocol.owntracks import (
    MESSAGE_TYPES,
    SUBTOPICS,
    OwnTracksMessage,
    decode_owntracks,
    parse_owntracks_topic,
)
from tests.support.corpus import load_jsonl, params

NOW = 1_795_521_600_000  # 2026-11-24T12:00:00Z
KEY = b"123"  # the corpus's encrypted vector's passphrase


def corpus() -> list[dict[str, Any]]:
    records = load_jsonl("owntracks/payloads.jsonl")
    assert len(records) == 196, "the corpus changed: review these tests against it"
    return records


def payload_bytes(rec: dict[str, Any]) -> bytes:
    p = rec["payload"]
    return p.encode() if isinstance(p, str) else orjson.dumps(p)


def seal(plaintext: bytes, passphrase: bytes) -> bytes:
    """An encrypted message as the apps build it (our own encryption, for tests)."""
    key = passphrase[:32].ljust(32, b"\0")
    data = base64.b64encode(nacl.secret.SecretBox(key).encrypt(plaintext)).decode()
    return orjson.dumps({"_type": "encrypted", "data": data})


def open_vector(rec: dict[str, Any]) -> bytes:
    """The corpus's encrypted vector opened by PyNaCl directly (not by the code under test)."""
    sealed = base64.b64decode(rec["payload"]["data"])
    return nacl.secret.SecretBox(KEY.ljust(32, b"\0")).decrypt(sealed)


def newest_tst(rec: dict[str, Any]) -> int | None:
    """The newest epoch-seconds ``tst`` of the record's messages (plaintext of the
    encrypted vector, hex field of Greenwich CSV), or None."""
    if rec["kind"] == "device_publish_encrypted":
        text = open_vector(rec)
    elif rec["type"] == "raw" and re.fullmatch(r"\w+,[0-9A-Fa-f]+,\w,[\d,]+", rec["payload"]):
        return int(rec["payload"].split(",")[1], 16)
    else:
        text = payload_bytes(rec)
    found = [int(v) for v in re.findall(rb'"tst": ?"?([0-9]{1,10})\b', text)]
    found = [v for v in found if v > 0]
    return max(found) if found else None


def now_for(rec: dict[str, Any]) -> int:
    tst = newest_tst(rec)
    return NOW if tst is None else tst * 1000 + 60_000


def subtopic_of(rec: dict[str, Any]) -> str | None:
    topic = rec["topic"]
    if topic is None or "<" in topic:  # none given, or a documentation placeholder
        return None
    return parse_owntracks_topic(topic).subtopic


def decode_record(rec: dict[str, Any], secret: bytes | None = KEY) -> list[OwnTracksMessage]:
    return decode_owntracks(
        payload_bytes(rec), subtopic=subtopic_of(rec), now_ms=now_for(rec), secret=secret
    )


def messages_in(obj: Any) -> list[dict[str, Any]]:
    if isinstance(obj, list):
        return [m for m in obj if m]
    return [obj] if isinstance(obj, dict) and obj else []


def strings_in(obj: Any) -> set[str]:
    if isinstance(obj, str):
        return {obj}
    if isinstance(obj, dict):
        return {s for v in obj.values() for s in strings_in(v)}
    if isinstance(obj, list):
        return {s for v in obj for s in strings_in(v)}
    return set()


def assert_quotes_nothing(err: ProtocolError, payload: Any) -> None:
    text = f"{err.detail} {err.path}"
    for value in strings_in(payload):  # values, not field names or the allowed words
        if len(value) >= 4 and value not in ("location", "transition", "encrypted", "enter"):
            assert value not in text, (value, text)


# --- which records must decode, and the few that cannot ------------------------------

# Records the corpus marks valid (or device-published) that cannot decode, and why.
NOT_DECODABLE = {
    # Schema-valid (base64), but 6 bytes: no nonce, no MAC; nothing can open it.
    ("owntracks/json-schema:test/e.json", "encrypted"): Reason.BAD_ENCRYPTION,
    # The README's excerpt leaves out lon ("lon omitted in doc excerpt").
    ("owntracks/ocli:README.md", "location"): Reason.MISSING_FIELD,
}


def must_decode() -> list[dict[str, Any]]:
    return [r for r in corpus()
            if (r["kind"].startswith("device_publish") or str(r.get("expect")).startswith("valid/"))
            and (r["source"], r["type"]) not in NOT_DECODABLE]  # fmt: skip


def test_the_corpus_has_what_these_tests_expect() -> None:
    records = corpus()
    assert len(must_decode()) == 84  # 40 device_publish*, 46 valid/*, less the 2 below
    assert sum(str(r.get("expect")).startswith("invalid/") for r in records) == 19
    assert sum((r["source"], r["type"]) in NOT_DECODABLE for r in records) == 2


@pytest.mark.parametrize(
    "rec", params(must_decode), ids=lambda r: f"{r['kind']}-{r['source'][-40:]}"
)
def test_device_and_valid_records_decode(rec: dict[str, Any] | None) -> None:
    rec = rec or corpus()[0]  # None: the corpus is missing, corpus() fails saying so
    out = decode_record(rec)
    if rec["kind"] == "device_publish_encrypted":
        sent = messages_in(orjson.loads(open_vector(rec)))
    elif rec["type"] == "raw" and not rec["payload"].strip():
        sent = []
    elif rec["type"] == "raw":  # Greenwich CSV, converted to one location
        sent = [{"_type": "location"}]
    else:
        sent = messages_in(rec["payload"])
    assert len(out) == len(sent)
    for msg, obj in zip(out, sent, strict=True):
        assert msg.type == (obj["_type"] if obj["_type"] in MESSAGE_TYPES else "unknown")
        if msg.type == "location":
            kinds = [k for k, _ in msg.records]
            assert kinds[0] == "location" and set(kinds) <= {"location", "network"}
            loc = msg.records[0][1]
            if "lat" in obj:
                assert loc.data["lat"] == float(obj["lat"]) and loc.data["lon"] == float(obj["lon"])
                assert loc.ts_ms == int(obj["tst"]) * 1000
            assert not msg.ignored and msg.online is None
        elif msg.type == "lwt":
            assert msg.online is False and not msg.records and not msg.ignored
        elif msg.type == "transition":
            assert msg.transition is not None and msg.transition.event == obj["event"]
            # Where it crossed the edge, as a point (none without a position).
            has_position = msg.transition.lat is not None
            assert [k for k, _ in msg.records] == (["location"] if has_position else [])
        elif msg.type == "status":
            assert not msg.ignored and msg.online is None and not msg.records
        else:
            assert msg.ignored and not msg.records and msg.transition is None
        for kind, record in msg.records:  # stored data is the contract's, nothing else
            assert validate_data(kind, record.data, now_ms=now_for(rec)) == record.data
            assert set(record.data) <= set(FIELD_TYPES[kind])


@pytest.mark.parametrize(("key", "reason"), NOT_DECODABLE.items(), ids=str)
def test_valid_records_that_cannot_decode_are_refused(
    key: tuple[str, str], reason: Reason
) -> None:
    [rec] = [r for r in corpus() if (r["source"], r["type"]) == key]
    with pytest.raises(RemoteProtocolError) as info:
        decode_record(rec)
    assert info.value.reason == reason
    assert_quotes_nothing(info.value, rec["payload"])


# The verdict on each invalid/* record: a reason, or what is decoded instead.
INVALID = {
    "card-invalid-b64.json": "ignored",  # cards are ignored: their face is never read
    "cmd-illegal-action.json": "ignored",  # commands go to devices: ignored when received
    "cmd-setWaypoints-illegal.json": Reason.NOT_JSON,  # "tst": 010
    "cmd-without-action.json": "ignored",
    "e-nobase64.json": Reason.BAD_ENCRYPTION,
    "e-nodata.json": Reason.BAD_ENCRYPTION,
    "location-lat-missing.json": Reason.MISSING_FIELD,
    "lwt-notst.json": Reason.MISSING_FIELD,
    "object-empty.json": "empty",  # {}: nothing (the apps' "deleted friend")
    "steps-kaputt.json": "ignored",  # steps are ignored
    "steps-long-invalid.json": "ignored",
    "tour-invalid-request.json": "ignored",  # tour requests are ignored
    "transition-illegal-lat.json": Reason.WRONG_TYPE,
    "untour-illegal.json": "ignored",
    # Android 2026 wants tid or topic; identity comes from the topic or the HTTP login
    # here, and schema-valid locations without either (array-one.json) must decode.
    "invalid_location_message_missing_tid_and_topic.json": "decoded",
    "invalid_location_message_zero_timestamp.json": Reason.BAD_TIMESTAMP,  # tst 0
    "location_empty.json": Reason.MISSING_FIELD,
    "test_device_tracker.py/unsupported": "ignored",  # refused by its topic: below
    "test_device_tracker.py/raw": Reason.NOT_JSON,
}


def invalid_key(rec: dict[str, Any]) -> str:
    name = rec["source"].rsplit("/", 1)[-1]
    return f"{name}/{rec['type']}" if name.endswith(".py") else name


def invalid_records() -> list[dict[str, Any]]:
    return [r for r in corpus() if str(r.get("expect")).startswith("invalid/")]


def test_every_invalid_record_has_a_verdict() -> None:
    keys = [invalid_key(r) for r in invalid_records()]
    assert len(keys) == len(set(keys)) == 19
    assert set(keys) == set(INVALID)


@pytest.mark.parametrize("rec", params(invalid_records), ids=invalid_key)
def test_invalid_records(rec: dict[str, Any] | None) -> None:
    rec = rec or corpus()[0]  # None: the corpus is missing, corpus() fails saying so
    verdict = INVALID[invalid_key(rec)]
    if isinstance(verdict, Reason):
        with pytest.raises(RemoteProtocolError) as info:
            decode_owntracks(payload_bytes(rec), subtopic=None, now_ms=now_for(rec), secret=KEY)
        assert info.value.reason == verdict
        assert_quotes_nothing(info.value, rec["payload"])
        return
    out = decode_owntracks(payload_bytes(rec), subtopic=None, now_ms=now_for(rec), secret=KEY)
    if verdict == "empty":
        assert out == []
    elif verdict == "ignored":
        assert len(out) == 1 and out[0].ignored and not out[0].records
    else:
        assert [k for k, _ in out[0].records] == ["location"]


def test_the_unsupported_subtopic_is_refused_by_its_topic() -> None:
    [rec] = [r for r in invalid_records() if r["type"] == "unsupported"]
    with pytest.raises(RemoteProtocolError) as info:
        parse_owntracks_topic(rec["topic"])
    assert info.value.reason == Reason.BAD_TOPIC


def test_nothing_in_the_corpus_crashes() -> None:
    outcomes = {"decoded": 0, "refused": 0}
    for rec in corpus():
        try:
            decode_owntracks(payload_bytes(rec), subtopic=None, now_ms=now_for(rec), secret=KEY)
            outcomes["decoded"] += 1
        except RemoteProtocolError as err:
            assert_quotes_nothing(err, rec["payload"])
            outcomes["refused"] += 1
    assert outcomes == {"decoded": 176, "refused": 20}


# --- the mapping, on real messages -----------------------------------------------------


def by_source(fragment: str, n: int = 0) -> dict[str, Any]:
    return [r for r in corpus() if fragment in r["source"]][n]


def records_of(msgs: list[OwnTracksMessage]) -> dict[str, dict[str, Any]]:
    [msg] = msgs
    return {kind: rec.data for kind, rec in msg.records}


def test_iphone_fix_maps_units_and_names() -> None:
    rec = by_source("demo-iphone.rec#L19")  # acc 5, alt 166, vel 35 km/h, cog 118, batt 88
    [msg] = decode_record(rec)
    [(kind, loc)] = msg.records
    assert kind == "location" and loc.ts_ms == 1_440_403_798_000
    assert loc.data == {"lat": 51.26004282389884, "lon": 12.71026164294473, "accuracy_m": 5.0,
                        "altitude_m": 166.0, "speed_mps": pytest.approx(35 / 3.6),
                        "heading_deg": 118.0}  # fmt: skip


def test_negative_sentinels_mean_unknown() -> None:
    data = records_of(decode_record(by_source("recorder:doc/HOOKS.md")))["location"]
    assert data == {"lat": 48.85833, "lon": 2.29513, "accuracy_m": 5.0, "altitude_m": 0.0}
    queclink = records_of(decode_record(by_source("json-schema:test/l2.json")))["location"]
    assert "accuracy_m" not in queclink  # acc -1
    assert queclink["altitude_m"] == 142.4 and queclink["heading_deg"] == 80.0


def test_lowercase_ssid_of_ios_2025_and_bssid_dropped() -> None:
    rec = next(r for r in corpus() if r["kind"] == "constructed_from_code")
    assert "ssid" in rec["payload"] and "bssid" in rec["payload"]
    out = records_of(decode_record(rec))
    assert out["network"] == {"wifi_ssid": "office", "network_type": "wifi"}
    assert rec["payload"]["bssid"] not in str(out)


def test_android_source_maps_to_location_source() -> None:
    rec = [r for r in corpus() if r["kind"] == "constructed_from_code"][1]
    out = records_of(decode_record(rec))
    assert out["location"]["source"] == "fused"
    assert out["network"] == {"wifi_ssid": "AndroidWifi", "network_type": "wifi"}


def test_encrypted_vector_decrypts_to_its_plaintext() -> None:
    sealed = next(r for r in corpus() if r["kind"] == "device_publish_encrypted")
    plain = by_source("EncryptionProvider", 1)
    assert plain["payload"]["_type"] == "location"
    opened = decode_record(sealed)
    assert opened == decode_record(plain)  # same records, same ids
    assert records_of(opened)["location"]["lat"] == 50.1182933


@pytest.mark.parametrize("secret", [None, b"", b"124", b"123\0"])
def test_encrypted_vector_needs_the_right_secret(secret: bytes | None) -> None:
    sealed = next(r for r in corpus() if r["kind"] == "device_publish_encrypted")
    with pytest.raises(RemoteProtocolError) as info:
        decode_record(sealed, secret=secret if secret != b"123\0" else b"1234")
    assert info.value.reason == Reason.BAD_ENCRYPTION


def test_tampered_ciphertext_is_refused() -> None:
    sealed = next(r for r in corpus() if r["kind"] == "device_publish_encrypted")
    raw = bytearray(base64.b64decode(sealed["payload"]["data"]))
    raw[-1] ^= 1
    payload = orjson.dumps({"_type": "encrypted", "data": base64.b64encode(raw).decode()})
    with pytest.raises(RemoteProtocolError) as info:
        decode_owntracks(payload, subtopic=None, now_ms=NOW, secret=KEY)
    assert info.value.reason == Reason.BAD_ENCRYPTION


def test_long_passphrases_are_truncated_to_32_bytes_and_arrays_sealed_whole() -> None:
    passphrase = "ünïcode passphrase that is longer than 32 bytes".encode()
    msgs = [{"_type": "location", "tst": NOW // 1000, "lat": 1, "lon": 2},
            {"_type": "lwt", "tst": 1}]
    payload = seal(orjson.dumps(msgs), passphrase)
    out = decode_owntracks(payload, subtopic=None, now_ms=NOW, secret=passphrase[:32] + b"x")
    assert [m.type for m in out] == ["location", "lwt"]


def test_encryption_inside_encryption_is_refused() -> None:
    inner = seal(b'{"_type":"lwt","tst":1}', KEY)
    with pytest.raises(RemoteProtocolError) as info:
        decode_owntracks(seal(inner, KEY), subtopic=None, now_ms=NOW, secret=KEY)
    assert info.value.reason == Reason.BAD_ENCRYPTION


def test_greenwich_csv_becomes_a_location() -> None:
    rec = next(r for r in corpus() if r["kind"] == "device_publish_raw")
    [(kind, loc)] = records_of_msg(decode_record(rec))
    assert kind == "location" and loc.ts_ms == 0x542A46AA * 1000
    assert loc.data == {"lat": 30.365854, "lon": 7.575769, "heading_deg": 260.0,
                        "speed_mps": pytest.approx(4 / 3.6), "altitude_m": 70.0}  # fmt: skip


def records_of_msg(msgs: list[OwnTracksMessage]) -> tuple[tuple[str, Any], ...]:
    [msg] = msgs
    return msg.records


def test_transitions() -> None:
    [msg] = decode_record(by_source("json-schema:test/transition.json"))
    t = msg.transition
    assert t is not None
    assert (t.event, t.ts_ms, t.lat, t.lon, t.accuracy_m, t.desc, t.rid, t.tid) == (
        "enter", 1_701_264_368_000, 61.195709, 9.688233, 6.0, "blukii", "c00b92", "SG")
    # The point where it crossed is a location record; the region's name is not in it.
    [(kind, point)] = msg.records
    assert kind == "location" and point.ts_ms == t.ts_ms
    assert point.data == {"lat": 61.195709, "lon": 9.688233, "accuracy_m": 6.0}
    assert point.id.startswith("ot-")
    [beacon] = decode_record(by_source("test_device_tracker.py", 1))  # iBeacon: 0.0, 0.0
    assert beacon.transition is not None and beacon.transition.event == "enter"
    assert beacon.transition.lat is None and beacon.transition.lon is None
    assert beacon.records == ()


def test_a_locations_trigger_is_passed_on_when_the_apps_document_it() -> None:
    def trigger(t: object) -> str | None:
        body = {"_type": "location", "lat": 1.0, "lon": 2.0, "tst": 1_795_521_600, "t": t}
        [msg] = decode_owntracks(orjson.dumps(body), subtopic=None,
                                 now_ms=1_795_521_600_000)
        return msg.trigger

    assert trigger("r") == "r" and trigger("p") == "p"
    assert trigger("rr") is None and trigger("z") is None and trigger(1) is None


def test_status_and_lwt() -> None:
    [status] = decode_record(by_source("json-schema:test/status.json"))
    assert (status.type, status.online, status.ignored) == ("status", None, False)
    assert status.records == () and status.transition is None
    [lwt] = decode_record(by_source("demo-iphone.rec#L3"))  # tst as a string
    assert (lwt.type, lwt.online) == ("lwt", False)


def test_http_topic_field_is_passed_on() -> None:
    [msg] = decode_record(by_source("booklet:docs/tech/http.md", 1))
    assert msg.topic == "owntracks/jane/phone"


# --- the mapping, field by field -----------------------------------------------------


def loc(**fields: Any) -> bytes:
    base = {"_type": "location", "tst": NOW // 1000, "lat": 52.1, "lon": 4.3}
    return orjson.dumps({**base, **fields})


def decode(payload: bytes, subtopic: str | None = None) -> list[OwnTracksMessage]:
    return decode_owntracks(payload, subtopic=subtopic, now_ms=NOW)


def refused(payload: bytes, reason: str, path: str | None) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decode(payload)
    assert (info.value.reason, info.value.path) == (reason, path)
    try:
        sent = orjson.loads(payload)
    except orjson.JSONDecodeError:
        sent = payload.decode(errors="replace")
    assert_quotes_nothing(info.value, sent)
    return info.value


def test_numbers_as_strings_and_floats_are_taken() -> None:
    out = records_of(decode(loc(lat="52.25", lon="-4", tst=str(NOW // 1000), acc="12.5",
                                alt="3", vel="36.0", cog=90.5)))  # fmt: skip
    assert out["location"] == {"lat": 52.25, "lon": -4.0, "accuracy_m": 12.5, "altitude_m": 3.0,
                               "speed_mps": 10.0, "heading_deg": 90.5}  # fmt: skip
    [msg] = decode(loc(tst=NOW / 1000 + 0.25))
    assert msg.records[0][1].ts_ms == NOW + 250


@pytest.mark.parametrize(
    ("fields", "reason", "path"),
    [
        ({"tst": 0}, Reason.BAD_TIMESTAMP, "tst"),
        ({"tst": -5}, Reason.BAD_TIMESTAMP, "tst"),
        ({"tst": "0"}, Reason.BAD_TIMESTAMP, "tst"),
        ({"tst": True}, Reason.WRONG_TYPE, "tst"),
        ({"tst": "17e8"}, Reason.WRONG_TYPE, "tst"),
        ({"tst": None}, Reason.MISSING_FIELD, "tst"),
        ({"tst": NOW // 1000 - 401 * 86_400}, Reason.BAD_TIMESTAMP, "tst"),
        ({"tst": NOW // 1000 + 2 * 86_400}, Reason.FUTURE_TIMESTAMP, "tst"),
        ({"tst": NOW}, Reason.FUTURE_TIMESTAMP, "tst"),  # milliseconds
        ({"tst": 10**19}, Reason.FUTURE_TIMESTAMP, "tst"),
        ({"lat": None}, Reason.MISSING_FIELD, "lat"),
        ({"lat": "north"}, Reason.WRONG_TYPE, "lat"),
        ({"lat": "nan"}, Reason.WRONG_TYPE, "lat"),
        ({"lat": " 52"}, Reason.WRONG_TYPE, "lat"),
        ({"lat": "1e999"}, Reason.OUT_OF_RANGE, "lat"),
        ({"lat": True}, Reason.WRONG_TYPE, "lat"),
        ({"lat": 91}, Reason.OUT_OF_RANGE, "lat"),
        ({"lon": [4.3]}, Reason.WRONG_TYPE, "lon"),
        ({"vel": 7300}, Reason.OUT_OF_RANGE, "vel"),  # > 2000 m/s
        ({"cog": 361}, Reason.OUT_OF_RANGE, "cog"),
        ({"acc": {}}, Reason.WRONG_TYPE, "acc"),
        ({"alt": -20_000}, Reason.OUT_OF_RANGE, "alt"),
    ],
)
def test_bad_fields_are_refused_naming_the_apps_field(
    fields: dict[str, Any], reason: str, path: str
) -> None:
    refused(loc(**fields), reason, path)


def test_tst_zero_is_unset_not_1970() -> None:
    fix = {"_type": "location", "lat": 52.1, "lon": 4.3}
    [msg] = decode_owntracks(orjson.dumps({**fix, "tst": 1}), subtopic=None, now_ms=61_000)
    assert msg.records[0][1].ts_ms == 1000
    with pytest.raises(RemoteProtocolError) as info:
        decode_owntracks(orjson.dumps({**fix, "tst": 0}), subtopic=None, now_ms=60_000)
    assert (info.value.reason, info.value.path) == (Reason.BAD_TIMESTAMP, "tst")


def test_detail_names_the_app_field_and_ours() -> None:
    err = refused(loc(vel=9000), Reason.OUT_OF_RANGE, "vel")
    assert "speed_mps" in err.detail and "vel" in err.detail


def test_unknown_and_unmapped_fields_are_dropped() -> None:
    out = records_of(decode(loc(batt="75", bs=9, BSSID="ca:fe:ed:40:81:5b", tid="JJ", m=1,
                                p=101.3, inregions=["home"], vac=-1, source="satellite",
                                image="/9j/4AAQ", created_at=1, driver="Saul")))  # fmt: skip
    assert out == {"location": {"lat": 52.1, "lon": 4.3}}


@pytest.mark.parametrize(
    ("fields", "network"),
    [
        ({"conn": "w", "SSID": "office"}, {"network_type": "wifi", "wifi_ssid": "office"}),
        ({"conn": "o"}, {"network_type": "none"}),
        ({"conn": "m"}, None),  # mobile: our enum wants gsm/umts/lte/nr
        ({"conn": "TestConn"}, None),
        ({"SSID": '"quoted"'}, {"wifi_ssid": "quoted"}),
        ({"SSID": "<unknown ssid>"}, None),
        ({"SSID": ""}, None),
        ({"SSID": 5}, None),
        ({"SSID": "x" * 65}, None),
        ({"ssid": "home", "conn": "w"}, {"wifi_ssid": "home", "network_type": "wifi"}),
    ],
)
def test_network_record(fields: dict[str, Any], network: dict[str, Any] | None) -> None:
    out = records_of(decode(loc(**fields)))
    assert out.get("network") == network


def test_record_ids_are_stable_distinct_and_short() -> None:
    base = {"_type": "location", "tst": NOW // 1000, "lat": 52.1, "lon": 4.3, "conn": "w"}
    [first] = decode(orjson.dumps(base))
    [again] = decode(orjson.dumps(base))
    [resent] = decode(orjson.dumps({**base, "_id": "0d871a61", "created_at": 5,
                                    "topic": "owntracks/u/d", "lat": "52.1"}))  # fmt: skip
    [later] = decode(orjson.dumps({**base, "tst": NOW // 1000 + 1}))
    [moved] = decode(orjson.dumps({**base, "lat": 52.2}))
    ids = [r.id for _, r in first.records]
    assert len(ids) == 2 and ids[0] != ids[1]
    assert [r.id for _, r in again.records] == ids == [r.id for _, r in resent.records]
    assert all(i.startswith("ot-") and len(i) <= 64 for i in ids)
    assert later.records[0][1].id != ids[0] and moved.records[0][1].id != ids[0]


# --- envelope, topics, subtopics -----------------------------------------------------


@pytest.mark.parametrize("payload", [b"", b" \n\t", b"null", b"{}", b"[]", b"[{}]"])
def test_empty_bodies_give_nothing(payload: bytes) -> None:
    assert decode(payload) == []


@pytest.mark.parametrize(
    ("payload", "reason", "path"),
    [
        (b"5", Reason.BAD_ENVELOPE, None),
        (b'"location"', Reason.BAD_ENVELOPE, None),
        (b'[{"_type":"lwt","tst":1}, 3]', Reason.BAD_ENVELOPE, "[1]"),
        (b"[[]]", Reason.BAD_ENVELOPE, "[0]"),
        (b"{", Reason.NOT_JSON, None),
        (b'{"lat": NaN}', Reason.NOT_JSON, None),
        (b"\xff\xfe", Reason.NOT_JSON, None),
        (b'[{"_type":"lwt","tst":1},{"_type":"location","tst":1}]', Reason.BAD_TIMESTAMP,
         "[1].tst"),
        (b'{"_type":"transition","tst":1795521600,"lat":1,"lon":2,"event":"dwell"}',
         Reason.BAD_VALUE, "event"),
        (b'{"_type":"transition","tst":1795521600,"lat":1,"lon":2}', Reason.MISSING_FIELD,
         "event"),
        (b'{"_type":"transition","tst":1795521600,"lat":1,"event":"leave"}',
         Reason.MISSING_FIELD, "lon"),
        (b'{"_type":"lwt","tst":"yesterday"}', Reason.WRONG_TYPE, "tst"),
    ],
)
def test_bad_payloads(payload: bytes, reason: str, path: str | None) -> None:
    refused(payload, reason, path)


def test_size_limits() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode(b'{"_type":"card","face":"' + b"A" * 262_144 + b'"}')
    assert info.value.reason == Reason.TOO_LARGE
    with pytest.raises(RemoteProtocolError) as info:
        decode(orjson.dumps([{"_type": "lwt", "tst": 1}] * 1001))
    assert info.value.reason == Reason.BATCH_TOO_LARGE
    assert len(decode(orjson.dumps([{"_type": "lwt", "tst": 1}] * 1000))) == 1000


def test_messages_to_the_device_are_ignored() -> None:
    [msg] = decode(loc(), subtopic="cmd")
    assert msg.ignored and not msg.records and msg.type == "location"
    with pytest.raises(LocalProtocolError):
        decode(loc(), subtopic="nonsense")


def test_unknown_types_are_ignored_without_passing_the_type_on() -> None:
    for payload in (b'{"_type":"356938035643809"}', b'{"_type":null}', b'{"_type":[1]}',
                    b'{"some":"invalid message"}'):  # fmt: skip
        [msg] = decode(payload)
        assert (msg.type, msg.ignored) == ("unknown", True)


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("owntracks/jane/phone", ("jane", "phone", None)),
        ("owntracks/acme.dev-7/dev-7/event", ("acme.dev-7", "dev-7", "event")),
        ("owntracks/ckrey/22A67880-15C3-41A6-9157-25545C7993AC",
         ("ckrey", "22A67880-15C3-41A6-9157-25545C7993AC", None)),
        *((f"owntracks/u/d/{sub}", ("u", "d", sub)) for sub in SUBTOPICS),
    ],
)
def test_topics(topic: str, expected: tuple[str, str, str | None]) -> None:
    parsed = parse_owntracks_topic(topic)
    assert parsed == expected and parsed.subtopic == expected[2]


@pytest.mark.parametrize(
    "topic",
    [
        "owntracks/356938035643809", "owntracks/u/356938035643809/event/x",
        "OwnTracks/u/356938035643809", "owntracks//356938035643809",
        "owntracks/u/356938035643809/unsupported", "owntracks/u/35693 8035643809",
        "owntracks/u/+", "owntracks/u/#", "owntracks/u/356938035643809/", "",
        "owntracks/u/" + "3" * 130, "mdm/v1/acme/devices/356938035643809/telemetry/location",
    ],
)
def test_bad_topics_are_refused_without_quoting_them(topic: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_owntracks_topic(topic)
    assert info.value.reason == Reason.BAD_TOPIC
    assert "3569380" not in str(info.value) and "33333" not in str(info.value)


# --- never a crash -----------------------------------------------------------------------

json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
FIELDS = ["_type", "tst", "lat", "lon", "acc", "alt", "vel", "cog", "SSID", "ssid", "conn",
          "source", "event", "desc", "rid", "tid", "topic", "data", "batt"]  # fmt: skip
TYPES = ["location", "lwt", "transition", "status", "encrypted", "card", "cmd", "waypoints"]
field_values = (
    json_values
    | st.sampled_from([*TYPES, "w", "m", "o", "enter", "leave", "fused", "1795521600", "52.1",
                       "-1", "<unknown ssid>", '"x"', "", "1e999", "YWJjZGUK"])
    | st.integers(NOW // 1000 - 10**8, NOW // 1000 + 10**6)
    | st.floats(-400, 400)
    | st.integers(-2, 400)
)  # fmt: skip
messages = st.fixed_dictionaries(
    {"_type": st.sampled_from(TYPES) | json_values},
    optional={name: field_values for name in FIELDS[1:]},
)
# Near-valid messages, so that the fuzzing also reaches the records it builds.
fixes = st.fixed_dictionaries(
    {"_type": st.sampled_from(["location", "transition"]),
     "tst": st.integers(NOW // 1000 - 10**7, NOW // 1000 + 10**4) | st.just(str(NOW // 1000)),
     "lat": st.floats(-90, 90) | st.just("52.1"), "lon": st.floats(-180, 180),
     "event": st.sampled_from(["enter", "leave"])},
    optional={name: field_values for name in FIELDS[4:] if name != "event"},
)  # fmt: skip
payloads = (
    fixes.map(orjson.dumps)
    | st.lists(fixes, max_size=3).map(lambda ms: seal(orjson.dumps(ms), KEY))
    | st.binary(max_size=200)
    | json_values.map(orjson.dumps)
    | messages.map(orjson.dumps)
    | st.lists(messages, max_size=4).map(orjson.dumps)
    | messages.map(lambda m: seal(orjson.dumps(m), KEY))
    | st.lists(messages, max_size=3).map(lambda ms: seal(orjson.dumps(ms), KEY))
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(payloads, st.sampled_from([None, *SUBTOPICS]), st.sampled_from([None, KEY, b"other"]))
def test_fuzz_only_protocol_errors(
    payload: bytes, subtopic: str | None, secret: bytes | None
) -> None:
    try:
        out = decode_owntracks(payload, subtopic=subtopic, now_ms=NOW, secret=secret)
    except RemoteProtocolError as err:
        assert err.reason in set(Reason)
        return
    for msg in out:
        assert msg.type in MESSAGE_TYPES
        for kind, record in msg.records:
            assert validate_data(kind, record.data, now_ms=NOW) == record.data
            assert len(record.id) <= 64 and record.ts_ms <= NOW + MAX_FUTURE_MS
            orjson.dumps(record.data)
