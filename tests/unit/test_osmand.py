"""OsmAnd / Traccar Client requests (agent_protocol.osmand) against what they really send.

The corpus (tests/support/corpus.py says where it lies) holds 23 requests from the
apps' and Traccar's source trees. Their timestamps are years old and the decoder
refuses records older than 400 days, as for our own agents: each test passes a "now"
one minute after the request's own time, which is the same as re-basing the request
to now (the decoder only compares the two).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_protocol import FIELD_TYPES, MAX_FUTURE_MS, Reason, RemoteProtocolError, validate_data
from agent_protocol.errors import LocalProtocolError
from agent_protocol.osmand import OsmAndPoint, SpeedUnit, decode_osmand
from tests.support.corpus import load_jsonl

NOW = 1_795_521_600_000  # 2026-11-24T12:00:00Z
KNOT = 1852 / 3600


def iso(text: str) -> int:
    """An ISO 8601 time -> epoch ms, by the standard library (not the code under test)."""
    dt = datetime.fromisoformat(text)
    return int((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp() * 1000)


def corpus() -> list[dict[str, Any]]:
    records = load_jsonl("osmand/requests.jsonl")
    assert len(records) == 23, "the corpus changed: review these tests against it"
    return records


def request(rec: dict[str, Any]) -> dict[str, Any]:
    """The request as an HTTP server hands it over (query decoded, "+" as space)."""
    query = parse_qsl(urlsplit(rec["target"]).query, keep_blank_values=True)
    return {"method": rec["method"], "query": query,
            "content_type": rec["headers"].get("Content-Type"),
            "body": (rec["body"] or "").encode()}  # fmt: skip


def decode(now_ms: int = NOW, speed_unit: SpeedUnit = "knots", **req: Any) -> list[OsmAndPoint]:
    req = {"method": "GET", "query": [], "content_type": None, "body": b"", **req}
    return decode_osmand(**req, now_ms=now_ms, speed_unit=speed_unit)


def refused(reason: str, path: str | None, **req: Any) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decode(**req)
    assert (info.value.reason, info.value.path) == (reason, path)
    return info.value


LEGACY = {"lat": 0.0, "lon": 0.0, "speed_mps": 0.0, "heading_deg": 0.0, "altitude_m": 0.0}
SDK = {"lat": 37.4219983, "lon": -122.084, "accuracy_m": 5.0, "altitude_m": 5.0,
       "speed_mps": 0.0, "heading_deg": 0.0}  # fmt: skip
TRANSISTORSOFT = {"lat": 37.4219983, "lon": -122.084, "accuracy_m": 5.0, "speed_mps": 0.0,
                  "altitude_m": 5.0}  # fmt: skip
QUERY_60_30 = {"lat": 60.0, "lon": 30.0}

# What each request of the corpus decodes to: (device id, time or None for "now",
# [(kind, data), ...]), or the reason it is refused with and the path. By position in
# requests.jsonl; the comment gives its "expect".
EXPECTED: dict[int, Any] = {
    0: ("48241179", iso("2025-06-15T13:45:12.862Z"), [("location", TRANSISTORSOFT)]),
    1: ("48241179", iso("2025-06-15T13:45:12.862Z"), [("location", TRANSISTORSOFT)]),
    2: ("658765", iso("2025-05-09T04:11:30.579Z"),  # speed and heading -1: unknown
        [("location", {"lat": 37.785834, "lon": -122.406417, "accuracy_m": 5.0,
                       "altitude_m": 0.0})]),
    3: ("8737767034", iso("2021-07-21T08:06:34.444Z"),  # m/s, whatever speed_unit says
        [("location", {"lat": -6.1148096, "lon": 106.6837015, "accuracy_m": 3.8,
                       "speed_mps": 18.67, "heading_deg": 63.0, "altitude_m": 35.7})]),
    4: ("123456", 1_377_177_267_000,  # cells only: one network record each, in order
        [("network", {"mcc": "257", "mnc": "02", "lac": 16, "cell_id": 2224}),
         ("network", {"mcc": "257", "mnc": "02", "lac": 16, "cell_id": 2223,
                      "rssi_dbm": -90.0})]),
    5: (Reason.MISSING_FIELD, "id"),  # rejected (no id -> 400)
    6: ("902064", iso("2016-01-27T18:55:47Z"),  # hdop (OsmAnd: metres) -> accuracy
        [("location", {"lat": 42.06288, "lon": -88.23412, "accuracy_m": 6.0,
                       "altitude_m": 224.0, "speed_mps": 0.0})]),
    7: ("902064", 1_442_068_686_579,  # milliseconds
        [("location", {"lat": 42.06288, "lon": -88.23412, "accuracy_m": 6.0,
                       "altitude_m": 224.0, "speed_mps": 0.0})]),
    8: ("353861053849681", iso("2014-06-04 09:10:11"),  # no zone: UTC
        [("location", {"lat": 49.60688, "lon": 6.15788, "altitude_m": 384.7,
                       "speed_mps": 0.0})]),
    9: ("123456", 1_377_177_267_000,  # hdop 0.0: unknown
        [("location", {**QUERY_60_30, "speed_mps": 0.0, "heading_deg": 0.0,
                       "altitude_m": 0.0})]),
    10: ("123456", 1_377_177_267_000, [("location", QUERY_60_30)]),
    11: ("123456", None,  # deviceid, heading; vacc/hacc dropped
         [("location", {**QUERY_60_30, "speed_mps": 0.0, "heading_deg": 0.0,
                        "altitude_m": 0.0})]),
    12: ("861001000719969", None,  # no timestamp: now
         [("location", {"lat": 41.666667, "lon": -0.883333, "altitude_m": 350.059479,
                        "speed_mps": 0.0})]),
    13: ("123456", 1_377_177_267_000, [("location", QUERY_60_30)]),  # location=lat,lon
    14: ("123456789012345", 1_504_763_810_000,  # 40 knots; ignition, rpm, fuel dropped
         [("location", {"lat": 40.7232948571, "lon": -74.0061408571,
                        "heading_deg": 7.19889788244, "speed_mps": 40 * KNOT})]),
    15: ("123456789012345", 619_315_200_000, [("location", LEGACY)]),  # accuracy 0.0
    16: ("123456789012345", 619_315_200_000, [("location", LEGACY)]),
    17: ("123456789012345", 619_315_200_000, [("location", LEGACY)]),  # alarm dropped
    18: (Reason.BAD_TIMESTAMP, "timestamp"),  # the iOS formatter test's timestamp=0
    20: ("48241179", 1_749_995_112_000, [("location", SDK)]),  # form body
    21: ("48241179", 1_749_995_112_000, [("location", SDK)]),  # JSON array, flat
}  # fmt: skip
TEMPLATES = {19, 22}  # URL and JSON templates, filled in by tests below


def test_every_request_of_the_corpus_has_a_verdict() -> None:
    assert set(EXPECTED) | TEMPLATES == set(range(len(corpus())))
    # Without an "expect": the templates and the two requests built from SDK code.
    assert {i for i, r in enumerate(corpus()) if "expect" not in r} == TEMPLATES | {20, 21}


@pytest.mark.parametrize("index", sorted(EXPECTED))
def test_corpus_request(index: int) -> None:
    rec = corpus()[index]
    expected = EXPECTED[index]
    if isinstance(expected[0], Reason):
        with pytest.raises(RemoteProtocolError) as info:
            decode(**request(rec))
        assert (info.value.reason, info.value.path) == expected
        assert "123456" not in str(info.value)
        return
    device_id, ts_ms, records = expected
    now_ms = NOW if ts_ms is None else ts_ms + 60_000
    [point] = decode(now_ms=now_ms, **request(rec))
    assert point.device_id == device_id
    assert [(kind, r.data) for kind, r in point.records] == [
        (kind, pytest.approx(data)) for kind, data in records
    ]
    assert all(r.ts_ms == (ts_ms or NOW) for _, r in point.records)
    for kind, r in point.records:
        assert validate_data(kind, r.data, now_ms=now_ms) == r.data
        assert set(r.data) <= set(FIELD_TYPES[kind])
        assert r.id.startswith("os-") and len(r.id) <= 64
    assert len({r.id for _, r in point.records}) == len(point.records)


def only_point(index: int, **overrides: Any) -> OsmAndPoint:
    ts_ms = EXPECTED[index][1]
    [point] = decode(now_ms=(ts_ms or NOW) + 60_000, **{**request(corpus()[index]), **overrides})
    return point


def test_same_fix_in_another_wrapper_is_the_same_record() -> None:
    # Extras are dropped, so request 1 stores what request 0 does, under the same id;
    # likewise the SDK's form body and its JSON array.
    assert only_point(0).records == only_point(1).records
    assert only_point(20).records == only_point(21).records
    assert only_point(6).records != only_point(7).records  # another time


def test_speed_unit() -> None:
    [(_, knots)] = only_point(14).records
    [(_, mps)] = only_point(14, method="POST").records  # the method changes nothing
    assert knots == mps
    point = decode(now_ms=1_504_763_870_000, speed_unit="mps", **request(corpus()[14]))[0]
    assert point.records[0][1].data["speed_mps"] == 40.0
    with pytest.raises(LocalProtocolError):
        decode(speed_unit="kmh")  # type: ignore[arg-type]


def test_osmand_app_template_needs_an_id() -> None:
    target = corpus()[19]["target"]
    values = ["52.3731", "4.8922", str(NOW), "12.5", "3.0", "1.5"]
    url = re.sub(r"\{(\d)\}", lambda m: values[int(m[1])], target)
    query = parse_qsl(urlsplit(url).query)
    refused(Reason.MISSING_FIELD, "id", query=query)
    [point] = decode(query=[*query, ("id", "dev-7")], speed_unit="mps")
    assert point.device_id == "dev-7"
    [(_, record)] = point.records
    assert record.ts_ms == NOW  # {2} is milliseconds
    assert record.data == {"lat": 52.3731, "lon": 4.8922, "accuracy_m": 12.5,
                           "altitude_m": 3.0, "speed_mps": 1.5}  # fmt: skip


def test_traccar_client_9_template() -> None:
    template = corpus()[22]["body"]
    values = {"timestamp": "2026-11-24T11:59:30.500Z", "latitude": "52.3731",
              "longitude": "4.8922", "accuracy": "4.5", "speed": "-1", "heading": "-1",
              "altitude": "-2.5", "is_moving": "false", "odometer": "120",
              "event": "motionchange", "battery.level": "0.42", "battery.is_charging": "true",
              "activity.type": "still"}  # fmt: skip
    location = re.sub(r"<%= ([\w.]+) %>", lambda m: values[m[1]], template)
    location = location.replace("<deviceId>", "dev-7")
    body = b'{"location": ' + location.encode() + b', "device_id": "dev-7"}'
    [point] = decode(method="POST", content_type="application/json", body=body)
    assert point.device_id == "dev-7"
    [(kind, record)] = point.records
    assert (kind, record.ts_ms) == ("location", NOW - 29_500)
    assert record.data == {"lat": 52.3731, "lon": 4.8922, "accuracy_m": 4.5,
                           "altitude_m": -2.5}  # fmt: skip


# --- the mapping, parameter by parameter ---------------------------------------------


def q(**params: Any) -> list[tuple[str, str]]:
    base = {"id": "dev-7", "lat": "52.1", "lon": "4.3", "timestamp": str(NOW // 1000)}
    return [(k, str(v)) for k, v in {**base, **params}.items() if v is not None]


def data_of(**req: Any) -> dict[str, Any]:
    [point] = decode(**req)
    [(_, record)] = point.records
    return record.data


@pytest.mark.parametrize(
    ("timestamp", "ts_ms"),
    [
        (str(NOW // 1000), NOW),
        (str(NOW), NOW),
        (f"{NOW // 1000}.25", NOW + 250),
        ("2026-11-24T12:00:00Z", NOW),
        ("2026-11-24T12:00:00.5Z", NOW + 500),
        ("2026-11-24T13:00:00+01:00", NOW),
        ("2026-11-24T07:00:00-0500", NOW),
        ("2026-11-24T12:00:00", NOW),  # no zone: UTC
        ("2026-11-24 12:00:00", NOW),
        ("2026-11-24+12:00:00", NOW),  # "+" left undecoded by the HTTP layer
        ("2026-11-24T12:00", NOW),
        ("", NOW + 1000),  # empty: now
        (None, NOW + 1000),  # absent: now
    ],
)
def test_timestamp_forms(timestamp: str | None, ts_ms: int) -> None:
    [point] = decode(query=q(timestamp=timestamp), now_ms=NOW + 1000)
    assert point.records[0][1].ts_ms == ts_ms


@pytest.mark.parametrize(
    ("timestamp", "reason"),
    [
        ("0", Reason.BAD_TIMESTAMP),
        ("-5", Reason.BAD_TIMESTAMP),
        ("yesterday", Reason.BAD_TIMESTAMP),
        ("2026-13-01 00:00:00", Reason.BAD_TIMESTAMP),
        ("2026-11-24T12:00:00+25:00", Reason.BAD_TIMESTAMP),
        ("2147483647", Reason.BAD_TIMESTAMP),  # from 2^31-1 on, ms (as Traccar): 1970
        (str(NOW // 1000 - 401 * 86_400), Reason.BAD_TIMESTAMP),
        (str(NOW // 1000 + 2 * 86_400), Reason.FUTURE_TIMESTAMP),
        ("9" * 16, Reason.FUTURE_TIMESTAMP),
        ("9" * 17, Reason.BAD_TIMESTAMP),
    ],
)
def test_bad_timestamps(timestamp: str, reason: str) -> None:
    refused(reason, "timestamp", query=q(timestamp=timestamp))


def test_timestamp_zero_is_unset_not_1970() -> None:
    [point] = decode(query=q(timestamp="1"), now_ms=61_000)
    assert point.records[0][1].ts_ms == 1000
    with pytest.raises(RemoteProtocolError) as info:
        decode(query=q(timestamp="0"), now_ms=60_000)
    assert (info.value.reason, info.value.path) == (Reason.BAD_TIMESTAMP, "timestamp")


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"accuracy": "0.0"}, {}),  # legacy Android GPS fixes: unknown
        ({"accuracy": "-1"}, {}),
        ({"accuracy": "7.5", "hdop": "3"}, {"accuracy_m": 7.5}),
        ({"hdop": "3"}, {"accuracy_m": 3.0}),  # the OsmAnd app's accuracy
        ({"speed": "-1", "bearing": "-1"}, {}),
        ({"speed": "10"}, {"speed_mps": 10 * KNOT}),
        ({"heading": "90", "bearing": "45"}, {"heading_deg": 45.0}),
        ({"altitude": "-30.5"}, {"altitude_m": -30.5}),
        ({"batt": "87.0", "charge": "true", "mock": "true", "alarm": "sos", "valid": "1",
          "wifi": "00-14-22-01-23-45,-80", "imei": "356938035643809", "driverUniqueId": "x",
          "notificationToken": "t", "hacc": "3", "ignition": "true"}, {}),
    ],
)
def test_optional_parameters(params: dict[str, str], expected: dict[str, Any]) -> None:
    assert data_of(query=q(**params)) == pytest.approx({"lat": 52.1, "lon": 4.3, **expected})


@pytest.mark.parametrize(
    ("params", "reason", "path"),
    [
        ({"id": None}, Reason.MISSING_FIELD, "id"),
        ({"id": ""}, Reason.MISSING_FIELD, "id"),
        ({"id": "3569\n38035643809"}, Reason.BAD_VALUE, "id"),
        ({"id": "3" * 129}, Reason.BAD_VALUE, "id"),
        ({"deviceid": "356938035643809"}, Reason.BAD_VALUE, "deviceid"),  # id differs
        ({"lat": None}, Reason.MISSING_FIELD, "lat"),
        ({"lat": None, "lon": None}, Reason.MISSING_FIELD, "lat"),
        ({"lat": "52,1"}, Reason.WRONG_TYPE, "lat"),  # a localised number
        ({"lat": "nan"}, Reason.WRONG_TYPE, "lat"),
        ({"lat": "95"}, Reason.OUT_OF_RANGE, "lat"),
        ({"speed": "fast"}, Reason.WRONG_TYPE, "speed"),
        ({"speed": "5000"}, Reason.OUT_OF_RANGE, "speed"),
        ({"bearing": "400"}, Reason.OUT_OF_RANGE, "bearing"),
        ({"lat": None, "lon": None, "location": "52.1"}, Reason.BAD_VALUE, "location"),
        ({"lat": None, "lon": None, "location": "52.1,x"}, Reason.WRONG_TYPE, "location"),
        ({"cell": "257,02,16"}, Reason.BAD_VALUE, "cell"),
        ({"cell": "257,02,16,2224,loud"}, Reason.BAD_VALUE, "cell"),
        ({"cell": "1,02,16,2224"}, Reason.BAD_VALUE, "cell"),  # mcc: 3 digits
    ],
)
def test_bad_parameters(params: dict[str, Any], reason: str, path: str) -> None:
    err = refused(reason, path, query=q(**params))
    assert "3569" not in str(err) and "3333" not in str(err)


def test_repeated_parameters() -> None:
    cells = [("cell", "257,02,16,2224"), ("cell", "257,02,16,2223,-90"),
             ("cell", "257,02,16,2224")]  # fmt: skip
    [point] = decode(query=[*q(), *cells, ("wifi", "00-14-22-01-23-45,-80")])
    kinds = [(kind, r.data.get("cell_id")) for kind, r in point.records]
    assert kinds == [("location", None), ("network", 2224), ("network", 2223)]
    assert data_of(query=[*q(), ("lat", "52.1")]) == {"lat": 52.1, "lon": 4.3}  # same value
    refused(Reason.BAD_VALUE, "lat", query=[*q(), ("lat", "52.2")])
    refused(Reason.BAD_VALUE, "cell[1]", query=[*q(), cells[0], ("cell", "2,0")])


def test_where_the_parameters_come_from() -> None:
    form = "&".join(f"{k}={v}" for k, v in q()).encode()
    assert data_of(method="POST", body=form) == {"lat": 52.1, "lon": 4.3}
    assert data_of(method="POST", body=form,
                   content_type="application/x-www-form-urlencoded") == {"lat": 52.1, "lon": 4.3}
    # A query wins over a body; a JSON content type with an empty body is a query request.
    other = b"id=dev-7&lat=1&lon=2"
    assert data_of(method="POST", query=q(), body=other) == {"lat": 52.1, "lon": 4.3}
    assert data_of(method="POST", query=q(), content_type="application/json") == {
        "lat": 52.1, "lon": 4.3}  # fmt: skip
    refused(Reason.MISSING_FIELD, "id")  # nothing at all
    refused(Reason.BAD_VALUE, None, method="POST", body=b"id=%ff&lat=1")
    refused(Reason.BAD_VALUE, None, method="PUT", query=q())


def test_json_forms() -> None:
    loc = {"timestamp": "2026-11-24T12:00:00Z",
           "coords": {"latitude": 52.1, "longitude": 4.3, "speed": 2, "accuracy": -1}}
    one = {"location": loc, "device_id": "dev-7"}
    json = "application/json; charset=utf-8"
    [point] = decode(method="POST", content_type=json, body=orjson.dumps(one))
    assert point.records[0][1].data == {"lat": 52.1, "lon": 4.3, "speed_mps": 2.0}
    batch = {"location": [loc, {**loc, "timestamp": "2026-11-24T11:00:00Z"}],
             "device_id": "dev-7"}  # fmt: skip
    assert len(decode(method="POST", content_type=json, body=orjson.dumps(batch))) == 2
    flat = [{"id": 7, "lat": "52.1", "lon": 4.3, "timestamp": NOW, "speed": 1}, one]
    points = decode(method="POST", content_type=json, body=orjson.dumps(flat))
    assert [p.device_id for p in points] == ["7", "dev-7"]
    assert points[0].records[0][1].data["speed_mps"] == pytest.approx(KNOT)
    assert decode(method="POST", content_type=json, body=b"[]") == []


@pytest.mark.parametrize(
    ("body", "reason", "path"),
    [
        (b"{", Reason.NOT_JSON, None),
        (b"5", Reason.BAD_ENVELOPE, None),
        (b'[{"id":"dev-7","lat":1,"lon":2}, 5]', Reason.BAD_ENVELOPE, "[1]"),
        (b'{"location":{"coords":{"latitude":1,"longitude":2}}}', Reason.MISSING_FIELD,
         "device_id"),
        (b'{"location":{},"device_id":"d"}', Reason.MISSING_FIELD, "location.coords"),
        (b'{"location":{"coords":[]},"device_id":"d"}', Reason.WRONG_TYPE, "location.coords"),
        (b'{"location":{"coords":{"latitude":1}},"device_id":"d"}', Reason.MISSING_FIELD,
         "location.coords.longitude"),
        (b'{"location":{"coords":{"latitude":1,"longitude":2,"speed":3000}},"device_id":"d"}',
         Reason.OUT_OF_RANGE, "location.coords.speed"),
        (b'{"location":5,"device_id":"d"}', Reason.WRONG_TYPE, "location"),
        (b'{"location":[5],"device_id":"d"}', Reason.WRONG_TYPE, "location[0]"),
        (b'{"location":{"coords":{"latitude":1,"longitude":2}},"device_id":true}',
         Reason.WRONG_TYPE, "device_id"),
        (b'[{"id":"d","lat":1,"lon":2,"timestamp":[1]}]', Reason.WRONG_TYPE, "[0].timestamp"),
    ],
)
def test_bad_json(body: bytes, reason: str, path: str | None) -> None:
    refused(reason, path, method="POST", content_type="application/json", body=body)


def test_size_limits() -> None:
    refused(Reason.TOO_LARGE, None, method="POST", body=b"a" * 262_145)
    cells = [("cell", f"257,02,16,{i}") for i in range(1000)]
    refused(Reason.BATCH_TOO_LARGE, None, query=[*q(), *cells])
    assert len(decode(query=[*q(), *cells[:999]])[0].records) == 1000


# --- never a crash -----------------------------------------------------------------------

NAMES = ["id", "deviceid", "device_id", "timestamp", "lat", "lon", "location", "speed",
         "bearing", "heading", "altitude", "accuracy", "hdop", "cell", "batt", "wifi"]  # fmt: skip
VALUES = st.sampled_from(["", "0", "-1", "52.1", "4.3", "1e999", "nan", "dev-7", str(NOW),
                          str(NOW // 1000), "2026-11-24 12:00:00", "257,02,16,2224",
                          "257,02,16,2224,-90", "60.0,30.0", "999"]) | st.text(max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=15,
)  # fmt: skip
flat = st.dictionaries(st.sampled_from(NAMES), VALUES | json_values, max_size=8)
coords = st.dictionaries(
    st.sampled_from(["latitude", "longitude", "accuracy", "speed", "heading", "altitude"]),
    VALUES | json_values, max_size=6,
)
transistorsoft = st.fixed_dictionaries(
    {"location": st.fixed_dictionaries({"coords": coords | json_values},
                                       optional={"timestamp": VALUES | json_values})
     | json_values},
    optional={"device_id": VALUES | json_values},
)  # fmt: skip
# Near-valid requests, so that the fuzzing also reaches the records it builds.
fixes = st.fixed_dictionaries(
    {"id": st.just("dev-7"), "lat": st.floats(-90, 90).map(str),
     "lon": st.floats(-180, 180).map(str),
     "timestamp": st.integers(NOW // 1000 - 10**7, NOW // 1000 + 10**4).map(str)},
    optional={name: VALUES for name in NAMES[6:]},
)  # fmt: skip
bodies = (
    st.binary(max_size=120) | json_values.map(orjson.dumps) | flat.map(orjson.dumps)
    | transistorsoft.map(orjson.dumps)
    | st.lists(flat | transistorsoft | fixes, max_size=3).map(orjson.dumps)
)  # fmt: skip


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.sampled_from(NAMES) | st.text(max_size=5), VALUES), max_size=10)
    | fixes.map(lambda d: list(d.items())),
    st.sampled_from([None, "application/json", "text/plain"]),
    bodies,
    st.sampled_from(["GET", "POST", "get", "HEAD"]),
    st.sampled_from(["knots", "mps"]),
)
def test_fuzz_only_protocol_errors(
    query: list[tuple[str, str]], content_type: str | None, body: bytes, method: str,
    speed_unit: SpeedUnit,
) -> None:
    try:
        points = decode_osmand(method=method, query=query, content_type=content_type,
                               body=body, now_ms=NOW, speed_unit=speed_unit)  # fmt: skip
    except RemoteProtocolError as err:
        assert err.reason in set(Reason)
        return
    for point in points:
        assert point.device_id and point.records
        for kind, record in point.records:
            assert validate_data(kind, record.data, now_ms=NOW) == record.data
            assert len(record.id) <= 64 and record.ts_ms <= NOW + MAX_FUTURE_MS
