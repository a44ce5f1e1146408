"""Per-kind validation of ``data``: valid examples, each field's bad forms."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_protocol import KINDS, Reason, RemoteProtocolError, validate_data

NOW = 1_795_521_600_000  # 2026-11-24T12:00:00Z

VALID: dict[str, dict[str, Any]] = {
    "location": {
        "lat": 52.37,
        "lon": 4,
        "accuracy_m": 12.5,
        "altitude_m": -3.5,
        "speed_mps": 0,
        "heading_deg": 360,
        "source": "fused",
    },
    "identity": {
        "imei": "356938035643809",
        "serial": "R58M123ABC",
        "wifi_mac": "02:00:00:00:00:00",
        "bluetooth_mac": "AA-BB-CC-DD-EE-FF",
        "phone_number": "+31612345678",
        "device_name": "Pixel van Jan",
        "user_name": "jan",
        "user_email": "jan@example.org",
        "first_name": "Jan",
        "last_name": "de Vries",
        "model": "Pixel 8",
        "os": "android",
        "os_version": "15",
    },
    "sim": {
        "state": "ready",
        "iccid": "8931440400012345678F",
        "imsi": "204080123456789",
        "carrier": "KPN",
        "mcc": "204",
        "mnc": "08",
        "roaming": False,
    },
    "network": {
        "rssi_dbm": -71,
        "rsrp_dbm": -95.5,
        "network_type": "lte",
        "cell_id": 123456789,
        "lac": 4012,
        "mcc": "204",
        "mnc": "008",
        "carrier": "KPN",
        "wifi_ssid": "office",
        "ip": "10.0.0.17",
    },
    "apps": {
        "apps": [
            {
                "package": "com.example.app",
                "name": "Example",
                "version": "1.2.3",
                "installed_at": "2026-01-02T03:04:05Z",
            },
            {"package": "com.android.settings", "installed_at": 1_000},
        ]
    },
    "checkinout": {
        "event": "check_out",
        "user_id": "u-17",
        "shift_id": "s-2026-11-24-early",
        "condition": {"battery_pct": 87, "screen": "ok", "case": "damaged", "notes": "scratch"},
    },
}


@pytest.mark.parametrize("kind", KINDS)
def test_valid_examples(kind: str) -> None:
    out = validate_data(kind, VALID[kind], "data", now_ms=NOW)
    assert out is not VALID[kind]
    assert set(out) == set(VALID[kind])


def test_normalisation() -> None:
    loc = validate_data("location", {"lat": 1, "lon": 2, "heading_deg": 3}, now_ms=NOW)
    assert loc == {"lat": 1.0, "lon": 2.0, "heading_deg": 3.0}
    assert all(type(v) is float for v in loc.values())
    apps = validate_data("apps", VALID["apps"], now_ms=NOW)
    assert apps["apps"][0]["installed_at"] == 1_767_323_045_000
    assert apps["apps"][1] == {"package": "com.android.settings", "installed_at": 1_000}
    net = validate_data("network", {"ip": "2001:DB8:0:0::1"}, now_ms=NOW)
    assert net == {"ip": "2001:db8::1"}


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_fields_dropped(kind: str) -> None:
    data = {**VALID[kind], "secret": "x", "contacts": [1, 2], "": None}
    out = validate_data(kind, data, now_ms=NOW)
    assert "secret" not in out and "contacts" not in out and "" not in out
    assert set(out) == set(VALID[kind])


def test_nested_unknown_fields_dropped() -> None:
    apps = validate_data("apps", {"apps": [{"package": "p", "content": "private"}]}, now_ms=NOW)
    assert apps == {"apps": [{"package": "p"}]}
    cio = validate_data(
        "checkinout", {"event": "check_in", "condition": {"screen": "ok", "x": 1}}, now_ms=NOW
    )
    assert cio == {"event": "check_in", "condition": {"screen": "ok"}}


@pytest.mark.parametrize("kind", ["identity", "sim", "network", "apps"])
def test_empty_data_is_fine_where_nothing_required(kind: str) -> None:
    assert validate_data(kind, {}, now_ms=NOW) == {}
    assert validate_data(kind, {"unknown": 1}, now_ms=NOW) == {}


def test_null_is_absent() -> None:
    assert validate_data("location", {"lat": 1, "lon": 2, "source": None}) == {
        "lat": 1.0,
        "lon": 2.0,
    }


@pytest.mark.parametrize(
    ("kind", "data", "path"),
    [
        ("location", {"lon": 1}, "data.lat"),
        ("location", {"lat": 1}, "data.lon"),
        ("location", {"lat": None, "lon": 1}, "data.lat"),
        ("checkinout", {"user_id": "u"}, "data.event"),
        ("apps", {"apps": [{"name": "x"}]}, "data.apps[0].package"),
    ],
)
def test_required_fields(kind: str, data: dict[str, Any], path: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        validate_data(kind, data, now_ms=NOW)
    assert info.value.reason == Reason.MISSING_FIELD
    assert info.value.path == path


NAN = float("nan")
INF = float("inf")

# (kind, field, bad value, expected reason)
BAD_FIELDS: list[tuple[str, str, object, str]] = [
    ("location", "lat", 90.0001, "out_of_range"),
    ("location", "lat", -91, "out_of_range"),
    ("location", "lat", NAN, "out_of_range"),
    ("location", "lat", INF, "out_of_range"),
    ("location", "lat", True, "wrong_type"),
    ("location", "lat", "52.1", "wrong_type"),
    ("location", "lat", [52.1], "wrong_type"),
    ("location", "lon", 180.5, "out_of_range"),
    ("location", "lon", -INF, "out_of_range"),
    ("location", "lon", False, "wrong_type"),
    ("location", "accuracy_m", -1, "out_of_range"),
    ("location", "accuracy_m", NAN, "out_of_range"),
    ("location", "accuracy_m", {}, "wrong_type"),
    ("location", "altitude_m", 1e9, "out_of_range"),
    ("location", "speed_mps", -0.1, "out_of_range"),
    ("location", "speed_mps", True, "wrong_type"),
    ("location", "heading_deg", 360.1, "out_of_range"),
    ("location", "heading_deg", -1, "out_of_range"),
    ("location", "source", "satellite", "bad_value"),
    ("location", "source", 1, "wrong_type"),
    ("location", "source", ["gps"], "wrong_type"),
    ("identity", "imei", 356938035643809, "wrong_type"),
    ("identity", "imei", "35693803564380X", "bad_value"),
    ("identity", "imei", "123", "bad_value"),
    ("identity", "imei", "٣٥٦٩٣٨٠٣٥٦٤٣٨٠٩", "bad_value"),  # non-ASCII digits
    ("identity", "wifi_mac", "02:00:00:00:00", "bad_value"),
    ("identity", "bluetooth_mac", 1, "wrong_type"),
    ("identity", "phone_number", 31612345678, "wrong_type"),
    ("identity", "phone_number", "call me", "bad_value"),
    ("identity", "device_name", "x" * 257, "bad_value"),
    ("identity", "device_name", "nul\x00", "bad_value"),
    ("identity", "user_email", ["a@b"], "wrong_type"),
    ("identity", "os_version", 15, "wrong_type"),
    ("sim", "state", "READY", "bad_value"),
    ("sim", "state", None, "ok"),
    ("sim", "iccid", "89314404000123456789012345", "bad_value"),
    ("sim", "imsi", "20408x", "bad_value"),
    ("sim", "mcc", "20", "bad_value"),
    ("sim", "mcc", 204, "wrong_type"),
    ("sim", "mnc", "8", "bad_value"),
    ("sim", "mnc", "0088", "bad_value"),
    ("sim", "roaming", 0, "wrong_type"),
    ("sim", "roaming", "false", "wrong_type"),
    ("network", "rssi_dbm", 5, "out_of_range"),
    ("network", "rssi_dbm", -201, "out_of_range"),
    ("network", "rsrp_dbm", NAN, "out_of_range"),
    ("network", "rsrp_dbm", True, "wrong_type"),
    ("network", "network_type", "5g", "bad_value"),
    ("network", "cell_id", -1, "out_of_range"),
    ("network", "cell_id", 1.5, "wrong_type"),
    ("network", "cell_id", True, "wrong_type"),
    ("network", "lac", 2**24, "out_of_range"),
    ("network", "ip", "300.1.1.1", "bad_value"),
    ("network", "ip", 167772177, "wrong_type"),
    ("network", "wifi_ssid", "s" * 65, "bad_value"),
    ("apps", "apps", {"package": "p"}, "wrong_type"),
    ("apps", "apps", [{"package": "p"}] * 2001, "out_of_range"),
    ("apps", "apps", ["com.example"], "wrong_type"),
    ("apps", "apps", [{"package": 5}], "wrong_type"),
    ("apps", "apps", [{"package": "p", "installed_at": "yesterday"}], "bad_timestamp"),
    ("apps", "apps", [{"package": "p", "installed_at": 1.5}], "wrong_type"),
    ("apps", "apps", [{"package": "p", "installed_at": "2026-11-24T12:00:00"}], "bad_timestamp"),
    (
        "apps",
        "apps",
        [{"package": "p", "installed_at": "2026-11-26T12:00:00Z"}],
        "future_timestamp",
    ),
    ("apps", "apps", [{"package": "p", "version": "v" * 129}], "bad_value"),
    ("checkinout", "event", "checkout", "bad_value"),
    ("checkinout", "event", True, "wrong_type"),
    ("checkinout", "condition", "fine", "wrong_type"),
    ("checkinout", "condition", {"battery_pct": 101}, "out_of_range"),
    ("checkinout", "condition", {"battery_pct": True}, "wrong_type"),
    ("checkinout", "condition", {"battery_pct": NAN}, "out_of_range"),
    ("checkinout", "condition", {"screen": "broken"}, "bad_value"),
    ("checkinout", "condition", {"case": "cracked"}, "bad_value"),
    ("checkinout", "condition", {"notes": "n" * 2001}, "bad_value"),
    ("checkinout", "user_id", 17, "wrong_type"),
]


@pytest.mark.parametrize(("kind", "field", "value", "reason"), BAD_FIELDS)
def test_bad_fields(kind: str, field: str, value: object, reason: str) -> None:
    bases: dict[str, dict[str, object]] = {
        "location": {"lat": 1, "lon": 2},
        "checkinout": {"event": "check_in"},
    }
    base = bases.get(kind, {})
    data = {**base, field: value}
    if reason == "ok":
        validate_data(kind, data, now_ms=NOW)
        return
    with pytest.raises(RemoteProtocolError) as info:
        validate_data(kind, data, "records[3].data", now_ms=NOW)
    assert info.value.reason == reason
    assert info.value.path is not None
    assert info.value.path.startswith(f"records[3].data.{field}")


def test_error_paths_nested() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        validate_data("apps", {"apps": [{"package": "a"}, {"package": 1}]}, now_ms=NOW)
    assert info.value.path == "data.apps[1].package"
    with pytest.raises(RemoteProtocolError) as info:
        validate_data("checkinout", {"event": "check_in", "condition": {"screen": 1}})
    assert info.value.path == "data.condition.screen"


def test_caps_at_the_limit_accepted() -> None:
    validate_data("identity", {"device_name": "x" * 256, "imei": ""}, now_ms=NOW)
    validate_data("apps", {"apps": [{"package": "p"}] * 2000}, now_ms=NOW)
    validate_data("checkinout", {"event": "check_in", "condition": {"notes": "n" * 2000}})


def test_data_must_be_object_and_kind_known() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        validate_data("location", [1, 2], now_ms=NOW)
    assert info.value.reason == Reason.WRONG_TYPE
    with pytest.raises(RemoteProtocolError) as info:
        validate_data("battery", {}, now_ms=NOW)
    assert info.value.reason == Reason.UNKNOWN_KIND


# --- the location fast path against the table-driven path -----------------------------
# kinds._validate_location answers the common record without the per-field checkers;
# for every input it must give what the table alone gives: the same dict (keys in
# the same order) or the same error (reason, detail, path).


def _table_location(data: dict[Any, Any], path: str) -> dict[str, Any]:
    from agent_protocol import kinds

    out = kinds._clean(kinds.LOCATION, data, path)
    kinds._required(out, ("lat", "lon"), path)
    return out


def _outcome(fn: Any, *args: Any) -> object:
    try:
        out = fn(*args)
    except RemoteProtocolError as err:
        return ("error", err.reason, err.detail, err.path)
    return ("ok", list(out.items()), [type(v) for v in out.values()])


def _same_as_table(data: dict[Any, Any]) -> None:
    expected = _outcome(_table_location, data, "records[2].data")
    assert _outcome(validate_data, "location", data, "records[2].data") == expected


_LOCATION_BOUNDS = {
    "lat": (-90.0, 90.0),
    "lon": (-180.0, 180.0),
    "accuracy_m": (0.0, 20_000_000.0),
    "altitude_m": (-12_000.0, 100_000.0),
    "speed_mps": (0.0, 2_000.0),
    "heading_deg": (0.0, 360.0),
}


def test_location_fast_path_bounds_are_the_tables() -> None:
    import math

    base = {"lat": 1.0, "lon": 2.0, "accuracy_m": 3.0, "altitude_m": 4.0, "speed_mps": 5.0,
            "heading_deg": 6.0, "source": "gps"}
    for name, (lo, hi) in _LOCATION_BOUNDS.items():
        for value in (lo, hi, math.nextafter(lo, -math.inf), math.nextafter(hi, math.inf),
                      int(lo), int(hi), int(lo) - 1, int(hi) + 1, True, None, "1", math.nan,
                      math.inf, -math.inf):
            _same_as_table({**base, name: value})
    for source in ("gps", "network", "fused", "GPS", "", 1, None, ["gps"], {"gps": 1}):
        _same_as_table({**base, "source": source})
    _same_as_table(base)
    _same_as_table({k: v for k, v in base.items() if k != "lat"})
    _same_as_table({"lon": 2.0, "lat": 1.0})  # order of the input kept
    _same_as_table({**base, "extra": 1.0})
    _same_as_table({1: 2.0, "lat": 1.0, "lon": 2.0})


location_values = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(-200, 200)
    | st.integers(-300, 300)
    | st.sampled_from(["gps", "network", "fused", "wifi", "", None, True, False])
    | st.lists(st.integers(), max_size=2)
    | st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)
)


@given(st.dictionaries(st.sampled_from([*_LOCATION_BOUNDS, "source", "x", "Lat"]),
                       location_values, max_size=9))
def test_location_fast_path_matches_the_table(data: dict[str, Any]) -> None:
    _same_as_table(data)
