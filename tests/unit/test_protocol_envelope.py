"""Telemetry envelope: single and batch forms, limits, timestamps, topic checks."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_protocol import (
    MAX_AGE_MS,
    MAX_BATCH_RECORDS,
    MAX_FUTURE_MS,
    MAX_PAYLOAD_BYTES,
    LocalProtocolError,
    Reason,
    Record,
    RemoteProtocolError,
    Topic,
    decode_telemetry,
    encode_telemetry,
    parse_topic,
)

NOW = 1_795_521_600_000  # 2026-11-24T12:00:00Z
LOC = parse_topic("mdm/v1/acme/devices/dev-1/telemetry/location")
DATA = {"lat": 52.37, "lon": 4.89, "accuracy_m": 12.5}


def enc(obj: Any) -> bytes:
    return orjson.dumps(obj)


def single(**over: Any) -> dict[str, Any]:
    return {"v": 1, "id": "r1", "ts": "2026-11-24T09:30:00.123Z", "data": DATA, **over}


def reason_of(payload: bytes, topic: Topic = LOC) -> tuple[str, str | None]:
    with pytest.raises(RemoteProtocolError) as info:
        decode_telemetry(topic, payload, now_ms=NOW)
    return info.value.reason, info.value.path


def test_single() -> None:
    [rec] = decode_telemetry(LOC, enc(single()), now_ms=NOW)
    assert rec == Record("r1", 1_795_512_600_123, DATA)


def test_batch() -> None:
    recs = [{"id": f"r{i}", "ts": NOW - i, "data": DATA} for i in range(MAX_BATCH_RECORDS)]
    out = decode_telemetry(LOC, enc({"v": 1, "records": recs}), now_ms=NOW)
    assert [r.id for r in out] == [f"r{i}" for i in range(MAX_BATCH_RECORDS)]
    assert out[5].ts_ms == NOW - 5


def test_batch_too_large() -> None:
    recs = [{"id": "r", "ts": NOW, "data": {}}] * (MAX_BATCH_RECORDS + 1)
    assert reason_of(enc({"v": 1, "records": recs})) == ("batch_too_large", "records")


def test_empty_batch() -> None:
    assert reason_of(enc({"v": 1, "records": []})) == ("empty_batch", "records")


def test_payload_too_large_checked_before_parsing() -> None:
    assert reason_of(b"x" * (MAX_PAYLOAD_BYTES + 1))[0] == "too_large"
    big = enc(single(pad="p" * MAX_PAYLOAD_BYTES))
    assert reason_of(big)[0] == "too_large"


def test_payload_at_limit_is_fine() -> None:
    base = enc(single(pad=""))
    payload = enc(single(pad="p" * (MAX_PAYLOAD_BYTES - len(base))))
    assert len(payload) == MAX_PAYLOAD_BYTES
    assert len(decode_telemetry(LOC, payload, now_ms=NOW)) == 1


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"{",
        b"not json",
        b'{"v": 1, "id": "r", "ts": 1, "data": {"lat": NaN, "lon": 1}}',
        b'{"v": 1, "id": "r", "ts": 1, "data": {"lat": Infinity, "lon": 1}}',
        b'{"v": 1, "id": "r", "ts": 1, "data": {"lat": 1e400, "lon": 1}}',
        b'{"v": 1, "id": "\xff\xfe", "ts": 1, "data": {}}',
        b'{"v": 1, "id": "\\ud800", "ts": 1, "data": {}}',
        b'{"v": 1,}',
    ],
)
def test_not_json(payload: bytes) -> None:
    assert reason_of(payload)[0] == "not_json"


@pytest.mark.parametrize(
    "obj",
    [
        [],
        "str",
        1,
        None,
        {"id": "r", "ts": NOW, "data": DATA},
        {"v": 2, "id": "r", "ts": NOW, "data": DATA},
        {"v": "1", "id": "r", "ts": NOW, "data": DATA},
        {"v": True, "id": "r", "ts": NOW, "data": DATA},
        {"v": 1.0, "id": "r", "ts": NOW, "data": DATA},
        {"v": 1, "records": {"id": "r"}},
        {"v": 1, "records": None},
        {"v": 1, "records": ["r"]},
        {"v": 1, "records": [{"id": "r", "ts": NOW, "data": DATA}], "id": "r"},
    ],
)
def test_bad_envelope(obj: Any) -> None:
    assert reason_of(enc(obj))[0] == "bad_envelope"


@pytest.mark.parametrize(
    ("over", "reason", "path"),
    [
        ({"id": None}, "missing_field", "id"),
        ({"id": ""}, "bad_value", "id"),
        ({"id": "x" * 65}, "bad_value", "id"),
        ({"id": 5}, "wrong_type", "id"),
        ({"ts": None}, "missing_field", "ts"),
        ({"data": None}, "missing_field", "data"),
        ({"data": [1]}, "wrong_type", "data"),
        ({"data": {"lat": 91, "lon": 0}}, "out_of_range", "data.lat"),
    ],
)
def test_record_fields(over: dict[str, Any], reason: str, path: str) -> None:
    obj = {k: v for k, v in single(**over).items() if v is not None}
    assert reason_of(enc(obj)) == (reason, path)


def test_id_at_limit() -> None:
    [rec] = decode_telemetry(LOC, enc(single(id="x" * 64)), now_ms=NOW)
    assert rec.id == "x" * 64


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2026-11-24T09:30:00.123Z", 1_795_512_600_123),
        ("2026-11-24T09:30:00Z", 1_795_512_600_000),
        ("2026-11-24t09:30:00z", 1_795_512_600_000),
        ("2026-11-24T10:30:00.123+01:00", 1_795_512_600_123),
        ("2026-11-24T04:30:00.5-05:00", 1_795_512_600_500),
        ("2026-11-24T09:30:00.123456789Z", 1_795_512_600_123),
        (1_795_512_600_123, 1_795_512_600_123),
        (NOW + MAX_FUTURE_MS, NOW + MAX_FUTURE_MS),
        (NOW - MAX_AGE_MS, NOW - MAX_AGE_MS),
    ],
)
def test_timestamps(ts: object, expected: int) -> None:
    [rec] = decode_telemetry(LOC, enc(single(ts=ts)), now_ms=NOW)
    assert rec.ts_ms == expected


@pytest.mark.parametrize(
    ("ts", "reason"),
    [
        ("2026-11-24T09:30:00.123", "bad_timestamp"),  # naive
        ("2026-11-24 09:30:00", "bad_timestamp"),
        ("2026-11-24", "bad_timestamp"),
        ("20261124T093000Z", "bad_timestamp"),
        ("2026-W48-2T09:30:00Z", "bad_timestamp"),
        ("2026-11-24T09:30Z", "bad_timestamp"),
        ("2026-13-24T09:30:00Z", "bad_timestamp"),
        ("2026-11-24T09:30:00+25:00", "bad_timestamp"),
        ("2026-11-24T09:30:00.123+0100", "bad_timestamp"),
        ("yesterday at noon, roughly", "bad_timestamp"),
        ("", "bad_timestamp"),
        ("1969-12-31T23:59:59Z", "bad_timestamp"),
        ("0001-01-01T00:00:00+01:00", "bad_timestamp"),
        ("9999-12-31T23:59:59-01:00", "bad_timestamp"),
        ("9999-12-31T23:59:59Z", "future_timestamp"),
        ("2026-11-25T12:00:00.001Z", "future_timestamp"),
        (NOW + MAX_FUTURE_MS + 1, "future_timestamp"),
        (NOW - MAX_AGE_MS - 1, "bad_timestamp"),
        (-1, "bad_timestamp"),
        (2**64 - 1, "bad_timestamp"),
        (1_795_512_600_123.0, "wrong_type"),
        (True, "wrong_type"),
        ([2026], "wrong_type"),
    ],
)
def test_bad_timestamps(ts: object, reason: str) -> None:
    assert reason_of(enc(single(ts=ts))) == (reason, "ts")


def test_batch_error_names_record_and_fails_whole_message() -> None:
    recs: list[Any] = [{"id": f"r{i}", "ts": NOW, "data": DATA} for i in range(5)]
    recs[3] = {"id": "r3", "ts": NOW, "data": {"lat": 1, "lon": "east"}}
    assert reason_of(enc({"v": 1, "records": recs})) == ("wrong_type", "records[3].data.lon")
    recs[3] = {"id": "r3", "ts": NOW + MAX_FUTURE_MS + 1, "data": DATA}
    assert reason_of(enc({"v": 1, "records": recs})) == ("future_timestamp", "records[3].ts")
    recs[3] = "r3"
    assert reason_of(enc({"v": 1, "records": recs})) == ("bad_envelope", "records[3]")


def test_unknown_envelope_fields_ignored() -> None:
    out = decode_telemetry(LOC, enc(single(agent="1.2", extra={"a": 1})), now_ms=NOW)
    assert out[0].data == DATA


def test_unknown_data_fields_dropped() -> None:
    [rec] = decode_telemetry(LOC, enc(single(data={**DATA, "ssid_list": ["a"]})), now_ms=NOW)
    assert rec.data == DATA


def test_device_and_kind_extension() -> None:
    ok = enc(single(device="dev-1", kind="location"))
    assert len(decode_telemetry(LOC, ok, now_ms=NOW)) == 1
    assert reason_of(enc(single(device="dev-2"))) == ("topic_mismatch", "device")
    assert reason_of(enc(single(kind="sim"))) == ("topic_mismatch", "kind")
    assert reason_of(enc(single(device=7))) == ("wrong_type", "device")
    assert reason_of(enc(single(kind=["location"]))) == ("wrong_type", "kind")
    batch = {"v": 1, "device": "dev-9", "records": [{"id": "r", "ts": NOW, "data": DATA}]}
    assert reason_of(enc(batch)) == ("topic_mismatch", "device")


def test_decode_needs_telemetry_topic() -> None:
    with pytest.raises(LocalProtocolError):
        decode_telemetry(parse_topic("mdm/v1/a/devices/b/acks"), enc(single()), now_ms=NOW)


def test_encode_forms() -> None:
    r1 = Record("a", 1_795_512_600_123, DATA)
    r2 = Record("b", 1_795_512_600_000, DATA)
    one = orjson.loads(encode_telemetry([r1]))
    assert one == {"v": 1, "id": "a", "ts": "2026-11-24T09:30:00.123Z", "data": DATA}
    two = orjson.loads(encode_telemetry([r1, r2], device="dev-1", kind="location"))
    assert two["device"] == "dev-1" and two["kind"] == "location"
    assert [r["ts"] for r in two["records"]] == [
        "2026-11-24T09:30:00.123Z",
        "2026-11-24T09:30:00.000Z",
    ]


def test_encode_limits() -> None:
    rec = Record("a", NOW, {})
    with pytest.raises(LocalProtocolError) as info:
        encode_telemetry([])
    assert info.value.reason == Reason.EMPTY_BATCH
    with pytest.raises(LocalProtocolError) as info:
        encode_telemetry([rec] * (MAX_BATCH_RECORDS + 1))
    assert info.value.reason == Reason.BATCH_TOO_LARGE
    with pytest.raises(LocalProtocolError) as info:
        encode_telemetry([Record("a", NOW, {"x": "y" * MAX_PAYLOAD_BYTES})])
    assert info.value.reason == Reason.TOO_LARGE
    with pytest.raises(LocalProtocolError) as info:
        encode_telemetry([Record("a", NOW, {"lat": 95, "lon": 0})], kind="location")
    assert (info.value.reason, info.value.path) == ("out_of_range", "data.lat")
    with pytest.raises(LocalProtocolError):
        encode_telemetry([rec], kind="battery")
    with pytest.raises(LocalProtocolError):
        encode_telemetry([rec], device="a/b")
    with pytest.raises(LocalProtocolError):
        encode_telemetry([Record("a", NOW, {"x": object()})])


@pytest.mark.parametrize(
    "args",
    [
        ("", NOW, {}),
        ("x" * 65, NOW, {}),
        (5, NOW, {}),
        ("a", -1, {}),
        ("a", True, {}),
        ("a", 1.5, {}),
        ("a", NOW, []),
        ("a\x00", NOW, {}),
    ],
)
def test_record_validates_when_built(args: tuple[Any, Any, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        Record(*args)


finite = st.floats(allow_nan=False, allow_infinity=False)
location_data = st.fixed_dictionaries(
    {"lat": st.floats(-90, 90), "lon": st.floats(-180, 180)},
    optional={
        "accuracy_m": st.floats(0, 1e6),
        "heading_deg": st.floats(0, 360),
        "source": st.sampled_from(["gps", "network", "fused"]),
    },
)
records = st.builds(
    Record,
    id=st.text(min_size=1, max_size=64).filter(lambda s: "\x00" not in s),
    ts_ms=st.integers(NOW - MAX_AGE_MS, NOW + MAX_FUTURE_MS),
    data=location_data,
)


@given(st.lists(records, min_size=1, max_size=20), st.booleans())
def test_round_trip(recs: list[Record], with_meta: bool) -> None:
    meta: dict[str, Any] = {"device": "dev-1", "kind": "location"} if with_meta else {}
    payload = encode_telemetry(recs, **meta)
    assert decode_telemetry(LOC, payload, now_ms=NOW) == recs
