"""Topics: parse/format round trip and every invalid form."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_protocol import (
    ACKS_FILTER,
    KINDS,
    STATUS_FILTER,
    TELEMETRY_FILTER,
    LocalProtocolError,
    Reason,
    RemoteProtocolError,
    Topic,
    acks_topic,
    commands_topic,
    is_valid_id,
    parse_topic,
    shared_subscription,
    status_topic,
    telemetry_topic,
)

ids = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-",
    min_size=1,
    max_size=64,
)


@given(tenant=ids, device=ids, kind=st.sampled_from(KINDS))
def test_telemetry_round_trip(tenant: str, device: str, kind: str) -> None:
    topic = telemetry_topic(tenant, device, kind)
    parsed = parse_topic(topic)
    assert parsed == Topic(tenant, device, "telemetry", kind)
    assert str(parsed) == topic


@given(tenant=ids, device=ids)
def test_acks_and_commands_round_trip(tenant: str, device: str) -> None:
    assert parse_topic(acks_topic(tenant, device)) == Topic(tenant, device, "acks", None)
    assert parse_topic(commands_topic(tenant, device)) == Topic(tenant, device, "commands")
    assert str(parse_topic(acks_topic(tenant, device))) == acks_topic(tenant, device)
    assert parse_topic(status_topic(tenant, device)) == Topic(tenant, device, "status")
    assert str(parse_topic(status_topic(tenant, device))) == status_topic(tenant, device)


def test_examples() -> None:
    assert telemetry_topic("acme", "dev-1", "location") == (
        "mdm/v1/acme/devices/dev-1/telemetry/location"
    )
    assert acks_topic("acme", "dev_1") == "mdm/v1/acme/devices/dev_1/acks"
    assert commands_topic("acme", "d") == "mdm/v1/acme/devices/d/commands"
    assert TELEMETRY_FILTER == "mdm/v1/+/devices/+/telemetry/+"
    assert ACKS_FILTER == "mdm/v1/+/devices/+/acks"
    assert STATUS_FILTER == "mdm/v1/+/devices/+/status"
    assert status_topic("acme", "d") == "mdm/v1/acme/devices/d/status"
    assert shared_subscription("ingest", TELEMETRY_FILTER) == (
        "$share/ingest/mdm/v1/+/devices/+/telemetry/+"
    )


BAD_TOPICS = [
    "",
    "/",
    "mdm/v1/acme/devices/dev-1/telemetry/location/",
    "/mdm/v1/acme/devices/dev-1/telemetry/location",
    "mdm/v2/acme/devices/dev-1/telemetry/location",
    "MDM/v1/acme/devices/dev-1/telemetry/location",
    "xmdm/v1/acme/devices/dev-1/telemetry/location",
    "mdm/v1/acme/device/dev-1/telemetry/location",
    "mdm/v1/acme/devices/dev-1/telemetry",
    "mdm/v1/acme/devices/dev-1/telemetry/location/extra",
    "mdm/v1/acme/devices/dev-1/state",
    "mdm/v1/acme/devices/dev-1/status/online",
    "mdm/v1/acme/devices/dev-1/acks/location",
    "mdm/v1/acme/devices/dev-1/commands/x",
    "mdm/v1/acme/devices/dev-1",
    "mdm/v1//devices/dev-1/acks",
    "mdm/v1/acme/devices//acks",
    "mdm/v1/ac+me/devices/dev-1/acks",
    "mdm/v1/acme/devices/dev#1/acks",
    "mdm/v1/acme/devices/+/acks",
    "mdm/v1/+/devices/dev/acks",
    "mdm/v1/acme/devices/#",
    "mdm/v1/acme/devices/dev.1/acks",
    "mdm/v1/acme/devices/dév/acks",
    "mdm/v1/acme/devices/dev 1/acks",
    "mdm/v1/acme/devices/dev\x00/acks",
    "mdm/v1/acme/devices/dev-1\n/acks",
    f"mdm/v1/{'a' * 65}/devices/dev-1/acks",
    f"mdm/v1/acme/devices/{'d' * 65}/acks",
    "mdm/v1/acme/devices/dev-1/telemetry/",
    "mdm/v1/acme/devices/dev-1/telemetry/loc+",
    "mdm/v1/acme/devices/dev-1/telemetry/#",
]


@pytest.mark.parametrize("topic", BAD_TOPICS)
def test_bad_topics(topic: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_topic(topic)
    assert info.value.reason == Reason.BAD_TOPIC


@pytest.mark.parametrize("kind", ["locations", "Location", "battery", "sim_v2"])
def test_unknown_kind(kind: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_topic(f"mdm/v1/acme/devices/dev-1/telemetry/{kind}")
    assert info.value.reason == Reason.UNKNOWN_KIND


def test_longest_ids_accepted() -> None:
    t = parse_topic(f"mdm/v1/{'a' * 64}/devices/{'d' * 64}/telemetry/sim")
    assert t.tenant == "a" * 64 and t.device == "d" * 64 and t.kind == "sim"


def test_parse_topic_rejects_non_str() -> None:
    with pytest.raises(RemoteProtocolError):
        parse_topic(b"mdm/v1/a/devices/b/acks")  # type: ignore[arg-type]


def test_error_never_quotes_topic() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_topic("mdm/v1/acme/devices/356938035643809+/acks")
    assert "356938035643809" not in str(info.value)
    assert "356938035643809" not in repr(info.value)


@pytest.mark.parametrize(
    ("tenant", "device"), [("", "d"), ("t", ""), ("a/b", "d"), ("t", "+"), ("t", "x" * 65)]
)
def test_format_rejects_bad_ids(tenant: str, device: str) -> None:
    for make in (acks_topic, commands_topic, status_topic):
        with pytest.raises(LocalProtocolError):
            make(tenant, device)
    with pytest.raises(LocalProtocolError):
        telemetry_topic(tenant, device, "location")


def test_format_rejects_bad_kind() -> None:
    with pytest.raises(LocalProtocolError) as info:
        telemetry_topic("t", "d", "battery")
    assert info.value.reason == Reason.UNKNOWN_KIND


def test_topic_validates_when_built() -> None:
    with pytest.raises(LocalProtocolError):
        Topic("t", "d", "telemetry", None)
    with pytest.raises(LocalProtocolError):
        Topic("t", "d", "acks", "location")
    with pytest.raises(LocalProtocolError):
        Topic("t", "d", "state")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        Topic("t", "d", "status", "location")
    with pytest.raises(LocalProtocolError):
        Topic("t/x", "d", "acks")


def test_shared_subscription_rejects_bad_group() -> None:
    for group in ("", "a/b", "a+", "#"):
        with pytest.raises(LocalProtocolError):
            shared_subscription(group, ACKS_FILTER)


def test_is_valid_id() -> None:
    assert is_valid_id("A-z_09")
    assert not is_valid_id("")
    assert not is_valid_id("a" * 65)
    assert not is_valid_id("a\n")
    assert not is_valid_id(5)  # type: ignore[arg-type]


# --- what of a topic may be kept ---------------------------------------------------------


@pytest.mark.parametrize(("topic", "tenant", "device", "failed", "text"), [
    ("mdm/v1/acme/devices/phone-7/telemetry/location", "acme", "phone-7", None,
     "mdm/v1/acme/devices/phone-7/telemetry/location"),
    ("mdm/v1/acme/devices/phone-7/acks", "acme", "phone-7", None,
     "mdm/v1/acme/devices/phone-7/acks"),
    ("mdm/v1/acme/devices/phone-7/telemetry/imei=356938035643809", "acme", "phone-7", "kind",
     "mdm/v1/acme/devices/phone-7/telemetry/{kind}"),
    ("mdm/v1/acme/devices/phone-7/telemetry/bogus", "acme", "phone-7", "kind",
     "mdm/v1/acme/devices/phone-7/telemetry/{kind}"),
    ("mdm/v1/acme/devices/phone-7/telemetry", "acme", "phone-7", "kind",
     "mdm/v1/acme/devices/phone-7/telemetry/{kind}"),
    ("mdm/v1/acme/devices/phone-7/telemetry/location/x", "acme", "phone-7", "extra",
     "mdm/v1/acme/devices/phone-7/telemetry/location/{extra}"),
    ("mdm/v1/acme/devices/phone-7/acks/x", "acme", "phone-7", "extra",
     "mdm/v1/acme/devices/phone-7/acks/{extra}"),
    ("mdm/v1/acme/devices/phone-7/+31612345678", "acme", "phone-7", "channel",
     "mdm/v1/acme/devices/phone-7/{channel}"),
    ("mdm/v1/acme/devices/phone-7", "acme", "phone-7", "channel",
     "mdm/v1/acme/devices/phone-7/{channel}"),
    ("mdm/v1/acme/devices/jo@example.com/acks", "acme", None, "device",
     "mdm/v1/acme/devices/{device}"),
    ("mdm/v1/a c/devices/d/acks", None, None, "tenant", "mdm/v1/{tenant}"),
    ("owntracks/jo/phone", None, None, "prefix", "{topic}"),
    ("", None, None, "prefix", "{topic}"),
])
def test_outline_keeps_what_parsed_and_names_what_did_not(
        topic: str, tenant: str | None, device: str | None, failed: str | None,
        text: str) -> None:
    from agent_protocol import outline_topic

    o = outline_topic(topic)
    assert (o.tenant, o.device, o.failed, o.text) == (tenant, device, failed, text)


@given(st.text(max_size=80))
def test_outline_never_raises_and_never_quotes_a_level_that_failed(topic: str) -> None:
    from agent_protocol import outline_topic

    o = outline_topic(topic)
    if o.failed is None:
        assert o.text == topic and parse_topic(topic)  # valid: kept as it is
    else:
        kept = "" if o.failed == "prefix" else o.text.rsplit("/{", 1)[0]
        assert topic.startswith(kept + "/" if kept else "") and o.text.endswith("}")
