"""Errors never quote payload values (they may be an IMEI, a phone number, a position)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_protocol import (
    KINDS,
    NonceStore,
    ProtocolError,
    decode_ack,
    decode_command,
    decode_telemetry,
    parse_topic,
    verify_command,
)

NOW = 1_795_521_600_000
IMEI = "356938035643809"
PHONE = "+31612345678"
SECRETS = [IMEI, PHONE, "52.3731234", "Jan de Vries", "jan@example.org"]
FIELDS = [
    "lat", "lon", "accuracy_m", "altitude_m", "speed_mps", "heading_deg", "source", "imei",
    "serial", "wifi_mac", "phone_number", "device_name", "user_email", "state", "iccid",
    "imsi", "mcc", "mnc", "roaming", "rssi_dbm", "rsrp_dbm", "network_type", "cell_id",
    "lac", "ip", "wifi_ssid", "apps", "event", "user_id", "condition",
]  # fmt: skip


def wrongly_placed(secret: str) -> st.SearchStrategy[Any]:
    """The secret as a value of the wrong type or out of range, in various wrappers."""
    as_number: list[Any] = []
    try:
        as_number.append(int(secret.lstrip("+")))
        as_number.append(float(secret.lstrip("+")))
    except ValueError:
        pass
    return st.sampled_from(
        [secret, [secret], {"x": secret}, secret * 30, *as_number, [*as_number, secret]]
    )


def assert_clean(err: ProtocolError, secret: str) -> None:
    for text in (str(err), repr(err), str(err.args)):
        assert secret not in text
        if secret.startswith("+"):
            assert secret[1:] not in text


@given(
    kind=st.sampled_from(KINDS),
    field=st.sampled_from(FIELDS),
    secret=st.sampled_from(SECRETS),
    data=st.data(),
)
def test_telemetry_errors_do_not_leak(kind: str, field: str, secret: str, data: Any) -> None:
    value = data.draw(wrongly_placed(secret))
    topic = parse_topic(f"mdm/v1/acme/devices/dev-1/telemetry/{kind}")
    body: dict[str, Any] = {"lat": 1, "lon": 1, "event": "check_in", field: value}
    if field in ("apps", "condition"):
        body[field] = {"apps": [{"package": 1, "name": value, "installed_at": value}],
                       "condition": {"screen": value, "notes": 5}}[field]  # fmt: skip
    for env in (
        {"v": 1, "id": "r", "ts": NOW, "data": body},
        {"v": 1, "id": value, "ts": NOW, "data": body},
        {"v": 1, "id": "r", "ts": value, "data": body},
        {"v": 1, "id": "r", "ts": NOW, "data": body, "device": value},
        {"v": value, "id": "r", "ts": NOW, "data": body},
        {"v": 1, "records": [{"id": "r", "ts": NOW, "data": {}}, {"id": "r", "ts": value}]},
    ):
        try:
            decode_telemetry(topic, orjson.dumps(env), now_ms=NOW)
        except ProtocolError as err:
            assert_clean(err, secret)


@pytest.mark.parametrize("secret", SECRETS)
def test_timestamp_parse_error_does_not_chain_the_value(secret: str) -> None:
    # datetime.fromisoformat's own ValueError quotes its input; it must not be chained.
    topic = parse_topic("mdm/v1/acme/devices/dev-1/telemetry/location")
    ts = f"2026-11-24T09:30:00.{secret}Z"
    with pytest.raises(ProtocolError) as info:
        decode_telemetry(topic, orjson.dumps({"v": 1, "id": "r", "ts": ts, "data": {}}), now_ms=NOW)
    assert_clean(info.value, secret)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None


@pytest.mark.parametrize("secret", SECRETS)
def test_topic_and_ip_errors_do_not_leak(secret: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_topic(f"mdm/v1/acme/devices/{secret}.x/acks")
    assert_clean(info.value, secret)
    topic = parse_topic("mdm/v1/acme/devices/dev-1/telemetry/network")
    env = {"v": 1, "id": "r", "ts": NOW, "data": {"ip": secret}}
    with pytest.raises(ProtocolError) as info:
        decode_telemetry(topic, orjson.dumps(env), now_ms=NOW)
    assert_clean(info.value, secret)
    assert info.value.__context__ is None


@given(secret=st.sampled_from(SECRETS), data=st.data())
def test_command_and_ack_errors_do_not_leak(secret: str, data: Any) -> None:
    value = data.draw(wrongly_placed(secret))
    field = data.draw(
        st.sampled_from(
            ["command_id", "tenant", "device", "type", "params", "issued_at", "nonce",
             "key_id", "sig", "state", "ts", "detail", "v"]
        )
    )  # fmt: skip
    cmd = {
        "v": 1, "command_id": "c1", "tenant": "acme", "device": "dev-1", "type": "wipe",
        "params": {"scope": value}, "issued_at": NOW, "expires_at": NOW + 1000,
        "nonce": "n" * 16, "key_id": "k1", "sig": "A" * 86 + "==", field: value,
    }  # fmt: skip
    ack = {"v": 1, "command_id": "c1", "state": "received", "ts": NOW, field: value}
    for call in (
        lambda: decode_command(orjson.dumps(cmd)),
        lambda: decode_ack(orjson.dumps(ack), now_ms=NOW),
        lambda: verify_command(
            orjson.dumps(cmd), keys={}, tenant="acme", device="dev-1", now_ms=NOW,
            seen_nonces=NonceStore(),
        ),
    ):  # fmt: skip
        try:
            call()
        except ProtocolError as err:
            assert_clean(err, secret)
