"""Property: no raw value of a masked, hashed or dropped field survives filtering."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_protocol import validate_data
from privacy_filters import compile_policy, hash_value, mask, parse_policy

KEY = b"tenant-secret-0123456789"
NOW = 1_795_521_600_000

# Lone surrogates cannot reach us: orjson refuses them when decoding a payload.
TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"),
    max_size=40,
)
MAC = st.from_regex(r"[0-9A-Fa-f]{2}(?:[:-][0-9A-Fa-f]{2}){5}", fullmatch=True)
STRATEGIES: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "identity": {
        "imei": st.from_regex(r"[0-9]{14,16}", fullmatch=True),
        "serial": TEXT,
        "wifi_mac": MAC,
        "bluetooth_mac": MAC,
        "phone_number": st.from_regex(r"\+?[0-9 ().-]{1,31}", fullmatch=True),
        "device_name": TEXT,
        "user_name": TEXT,
        "user_email": TEXT,
        "first_name": TEXT,
        "last_name": TEXT,
        "model": TEXT,
        "os": TEXT,
        "os_version": TEXT,
    },
    "sim": {
        "state": st.sampled_from(["ready", "absent"]),
        "iccid": st.from_regex(r"[0-9A-Fa-f]{18,22}", fullmatch=True),
        "imsi": st.from_regex(r"[0-9]{6,15}", fullmatch=True),
        "carrier": TEXT,
        "mcc": st.from_regex(r"[0-9]{3}", fullmatch=True),
        "roaming": st.booleans(),
    },
    "network": {
        "rssi_dbm": st.floats(-200, 0),
        "network_type": st.sampled_from(["lte", "wifi"]),
        "cell_id": st.integers(0, 2**36 - 1),
        "carrier": TEXT,
        "wifi_ssid": TEXT,
        "ip": st.ip_addresses().map(str),
    },
}

RULES: dict[str, dict[str, Any]] = {
    "identity.imei": {"action": "mask", "keep_last": 4},
    "identity.phone_number": {"action": "mask", "keep_last": 4},
    "identity.device_name": {"action": "mask", "keep_first": 2},
    "identity.serial": {"action": "hash"},
    "identity.wifi_mac": {"action": "hash"},
    "identity.bluetooth_mac": {"action": "hash"},
    "identity.user_name": {"action": "drop"},
    "identity.user_email": {"action": "drop"},
    "identity.first_name": {"action": "drop"},
    "identity.last_name": {"action": "drop"},
    "sim.iccid": {"action": "hash"},
    "sim.imsi": {"action": "mask", "keep_first": 5},
    "network.wifi_ssid": {"action": "hash"},
    "network.ip": {"action": "drop"},
}
COMPILED = compile_policy(
    parse_policy({"fields": RULES}, name="protect"), policy_id="p", version=1, hash_key=KEY
)


def as_json(s: str) -> bytes:
    return orjson.dumps(s)[1:-1]


@st.composite
def records(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    kind = draw(st.sampled_from(sorted(STRATEGIES)))
    fields = STRATEGIES[kind]
    names = draw(st.sets(st.sampled_from(sorted(fields)), min_size=1))
    raw = {name: draw(fields[name]) for name in sorted(names)}
    return kind, validate_data(kind, raw, now_ms=NOW)


@settings(max_examples=300, deadline=None)
@given(batch=st.lists(records(), min_size=1, max_size=5))
def test_protected_values_never_leak(batch: list[tuple[str, dict[str, Any]]]) -> None:
    for kind, data in batch:
        res = COMPILED.filter_batch(kind, ["dev"], [NOW], [data])
        assert res.kept == [0]
        (out,) = res.data
        scanned = dict(out)
        for name, value in data.items():
            rule = RULES.get(f"{kind}.{name}")
            if rule is None:
                assert out[name] == value
                continue
            if rule["action"] == "drop":
                assert name not in out
            elif rule["action"] == "hash":
                assert out[name] == hash_value(value, KEY)
                del scanned[name]  # 32 hex digits: checked above, not scanned
            else:
                n = rule.get("keep_last", rule.get("keep_first", 0))
                expected = mask(value, keep_last=rule.get("keep_last"),
                                keep_first=rule.get("keep_first"))  # fmt: skip
                assert out[name] == expected and len(expected) == len(value)
                kept_chars = expected.replace("*", "")
                assert len(kept_chars) <= n or set(value) & {"*"}
                del scanned[name]
        for name, value in data.items():
            if f"{kind}.{name}" not in RULES or type(value) is not str or len(value) < 4:
                continue
            # Fields kept as sent whose own value contains the secret are not a leak.
            others = [v for k, v in scanned.items() if not (type(v) is str and value in v)]
            assert as_json(value) not in orjson.dumps(others)
