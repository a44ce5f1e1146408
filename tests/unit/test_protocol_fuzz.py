"""Property tests: the decoders either return valid records or raise RemoteProtocolError."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_protocol import (
    KINDS,
    MAX_FUTURE_MS,
    NonceStore,
    Record,
    RemoteProtocolError,
    decode_ack,
    decode_command,
    decode_telemetry,
    parse_topic,
    verify_command,
)
from agent_protocol.envelope import decode_records
from agent_protocol.errors import ProtocolError

NOW = 1_795_521_600_000
TOPICS = [parse_topic(f"mdm/v1/acme/devices/dev-1/telemetry/{k}") for k in KINDS]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
FIELD_NAMES = [
    "lat", "lon", "accuracy_m", "altitude_m", "speed_mps", "heading_deg", "source", "imei",
    "phone_number", "wifi_mac", "state", "iccid", "mcc", "mnc", "roaming", "rssi_dbm",
    "cell_id", "lac", "ip", "network_type", "apps", "package", "installed_at", "event",
    "condition", "battery_pct", "screen", "case", "notes", "user_id",
]  # fmt: skip
field_values = (
    json_values
    | st.sampled_from(["gps", "ready", "lte", "check_in", "ok", "204", "08", "10.0.0.1"])
    | st.floats(-400, 400)
    | st.integers(-300, 300)
)
data_objects = st.dictionaries(
    st.sampled_from(FIELD_NAMES) | st.text(max_size=5),
    field_values
    | st.lists(st.dictionaries(st.sampled_from(FIELD_NAMES), field_values), max_size=3)
    | st.dictionaries(st.sampled_from(FIELD_NAMES), field_values),
    max_size=8,
)
ts_values = (
    st.integers(NOW - 10**12, NOW + 10**9)
    | st.datetimes().map(lambda d: d.isoformat() + "Z")
    | st.sampled_from(["2026-11-24T09:30:00Z", "2026-11-24T09:30:00+01:00"])
    | json_values
)
record_objects = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=70) | json_values,
        "ts": ts_values,
        "data": data_objects | json_values,
    },
)
envelopes = st.one_of(
    record_objects.map(lambda r: {"v": 1, **r}),
    st.lists(record_objects, max_size=4).map(lambda rs: {"v": 1, "records": rs}),
    st.dictionaries(
        st.sampled_from(["v", "id", "ts", "data", "records", "device", "kind"]), json_values
    ),
)


def check_decode(payload: bytes) -> None:
    for topic in TOPICS:
        try:
            out = decode_telemetry(topic, payload, now_ms=NOW)
        except RemoteProtocolError:
            continue
        assert isinstance(out, list) and out
        for rec in out:
            assert isinstance(rec, Record)
            assert rec.ts_ms <= NOW + MAX_FUTURE_MS
            orjson.dumps(rec.data)  # always serialisable for storage


@given(st.binary(max_size=300))
def test_any_bytes(payload: bytes) -> None:
    check_decode(payload)


@given(json_values)
def test_any_json(value: Any) -> None:
    check_decode(orjson.dumps(value))


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(envelopes)
def test_random_envelopes(env: dict[str, Any]) -> None:
    check_decode(orjson.dumps(env))


command_objects = st.fixed_dictionaries(
    {"v": st.just(1) | json_values},
    optional={
        k: json_values | st.text(min_size=8, max_size=12)
        for k in ("command_id", "tenant", "device", "type", "params", "notice", "issued_at",
                  "expires_at", "nonce", "key_id", "sig", "command_id", "state", "ts", "detail")
    },
)  # fmt: skip


@given(st.binary(max_size=200) | command_objects.map(orjson.dumps))
def test_command_and_ack_decoders(payload: bytes) -> None:
    for decode in (decode_command, lambda p: decode_ack(p, now_ms=NOW)):
        try:
            decode(payload)
        except RemoteProtocolError:
            pass
    try:
        verify_command(
            payload, keys={}, tenant="acme", device="dev-1", now_ms=NOW, seen_nonces=NonceStore()
        )
    except RemoteProtocolError:
        pass


def _records_outcome(decode: Any, topic: Any, payload: bytes, now_ms: int) -> object:
    try:
        out = decode(topic, payload, now_ms=now_ms)
    except ProtocolError as err:
        return (type(err), err.reason, err.detail, err.path)
    return [(r.id, r.ts_ms, list(r.data.items())) if isinstance(r, Record)
            else (r[0], r[1], list(r[2].items())) for r in out]


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(envelopes, st.sampled_from([NOW, 5_000, 253_402_300_799_999 - 10**6]))
def test_decode_records_is_decode_telemetry_without_record_objects(
    env: dict[str, Any], now_ms: int
) -> None:
    payload = orjson.dumps(env)
    for topic in TOPICS:
        assert (_records_outcome(decode_records, topic, payload, now_ms)
                == _records_outcome(decode_telemetry, topic, payload, now_ms))
