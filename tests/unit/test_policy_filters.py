"""Field actions and the compiled filter: records in, shaped records out."""

from __future__ import annotations

import copy
import hmac
import math
from typing import Any

import pytest

from privacy_filters import (
    OPEN_DEFAULT,
    PERSONAL_FLOOR,
    CompiledPolicy,
    PolicyError,
    coarsen,
    compile_policy,
    hash_value,
    hasher,
    mask,
    parse_policy,
    snap,
)
from privacy_filters.location import METERS_PER_DEGREE

KEY = b"k" * 32
KEY2 = b"j" * 32
IMEI = "356938035643809"


def square(lon0: float, lat0: float, lon1: float, lat1: float) -> dict[str, Any]:
    ring = [[lon0, lat0], [lon1, lat0], [lon1, lat1], [lon0, lat1], [lon0, lat0]]
    return {"type": "Polygon", "coordinates": [ring]}


def compiled(doc: dict[str, Any], key: bytes = KEY) -> CompiledPolicy:
    return compile_policy(
        parse_policy({"name": "t", **doc}), policy_id="p1", version=3, hash_key=key
    )


def run(cp: CompiledPolicy, kind: str, *datas: dict[str, Any], **kw: Any) -> list[Any]:
    before = copy.deepcopy(list(datas))
    n = len(datas)
    res = cp.filter_batch(kind, [f"d{i}" for i in range(n)], list(range(n)), list(datas), **kw)
    assert list(datas) == before  # inputs never mutated
    assert all(o is not d for o in res.data for d in datas)
    return [res.kept, res.data, res.suppressed]


# --- actions ------------------------------------------------------------------------------


def test_mask() -> None:
    assert mask(IMEI, keep_last=4) == "*" * 11 + "3809"
    assert mask(IMEI, keep_first=3) == "356" + "*" * 12
    assert mask("abcd", keep_last=4) == "****"  # too short to keep anything
    assert mask("ab", keep_first=4) == "**"
    assert mask("secret", keep_last=0) == "******"
    assert mask("", keep_last=2) == ""
    with pytest.raises(ValueError, match="exactly one"):
        mask("x", keep_last=1, keep_first=1)


def test_hash_is_deterministic_and_keyed() -> None:
    h = hash_value(IMEI, KEY)
    assert h.startswith("hmac-sha256:") and len(h) == len("hmac-sha256:") + 32
    assert h == hash_value(IMEI, KEY) == hasher(KEY)(IMEI)
    assert h[12:] == hmac.new(KEY, IMEI.encode(), "sha256").hexdigest()[:32]
    assert hash_value(IMEI, KEY2) != h
    assert hash_value(IMEI[:-1] + "0", KEY) != h
    long_key = b"x" * 100  # longer than a SHA-256 block: hashed first, as RFC 2104 says
    assert (
        hasher(long_key)("é")
        == "hmac-sha256:" + hmac.new(long_key, "é".encode(), "sha256").hexdigest()[:32]
    )
    with pytest.raises(ValueError, match="16 bytes"):
        hasher(b"short")
    assert hasher(KEY)("\ud800") == hash_value("\ud800", KEY)  # never raises on odd text


def test_coarsen() -> None:
    assert coarsen(1234, 256) == 1280 and type(coarsen(1234, 256)) is int
    assert coarsen(1100, 200) == 1200  # halves round up
    assert coarsen(37.0, 10) == 40.0 and type(coarsen(37.0, 10)) is float
    assert coarsen(0.26, 0.1) == 0.3
    assert coarsen(-87.4, 5) == -85.0
    assert coarsen(3, 0.5) == 3.0 and type(coarsen(3, 0.5)) is float


# --- field rules on records -------------------------------------------------------------


IDENTITY = {
    "imei": IMEI,
    "phone_number": "+31612345678",
    "wifi_mac": "02:00:00:00:00:01",
    "user_email": "jan@example.org",
    "serial": "R58M123ABC",
    "model": "SM-G991B",
}


def test_each_action_on_a_record() -> None:
    cp = compiled(
        {
            "fields": {
                "identity.imei": {"action": "mask", "keep_last": 4},
                "identity.phone_number": {"action": "mask", "keep_first": 3},
                "identity.wifi_mac": {"action": "hash"},
                "identity.user_email": {"action": "drop"},
                "identity.model": {"action": "keep"},
            }
        }
    )
    kept, data, suppressed = run(cp, "identity", IDENTITY, {"model": "x"})
    assert kept == [0, 1] and suppressed == []
    assert data[0] == {
        "imei": "***********3809",
        "phone_number": "+31*********",
        "wifi_mac": hash_value("02:00:00:00:00:01", KEY),
        "serial": "R58M123ABC",
        "model": "SM-G991B",
    }
    assert data[1] == {"model": "x"}


def test_equal_values_hash_equal_across_records_and_policies() -> None:
    doc = {"fields": {"sim.iccid": {"action": "hash"}}}
    a = run(
        compiled(doc), "sim", {"iccid": "8931440400000000001"}, {"iccid": "8931440400000000001"}
    )
    b = run(compiled(doc), "sim", {"iccid": "8931440400000000001"})
    c = run(compiled(doc, KEY2), "sim", {"iccid": "8931440400000000001"})
    assert a[1][0] == a[1][1] == b[1][0] != c[1][0]


def test_coarsen_and_nested_fields() -> None:
    cp = compiled(
        {
            "fields": {
                "network.cell_id": {"action": "coarsen", "step": 256},
                "network.rssi_dbm": {"action": "coarsen", "step": 5},
                "checkinout.condition.notes": {"action": "mask", "keep_first": 4},
                "checkinout.condition.battery_pct": {"action": "coarsen", "step": 10},
                "checkinout.user_id": {"action": "drop"},
            }
        }
    )
    _, net, _ = run(cp, "network", {"cell_id": 1234, "rssi_dbm": -87.4, "lac": 7})
    assert net == [{"cell_id": 1280, "rssi_dbm": -85.0, "lac": 7}]
    condition = {"battery_pct": 64.0, "screen": "cracked", "notes": "dropped on stairs"}
    record = {"event": "check_in", "user_id": "u-17", "condition": condition}
    _, cio, _ = run(cp, "checkinout", record, {"event": "check_out"})
    assert cio[0] == {
        "event": "check_in",
        "condition": {"battery_pct": 60.0, "screen": "cracked", "notes": "drop" + "*" * 13},
    }
    assert cio[0]["condition"] is not condition
    assert cio[1] == {"event": "check_out"}
    dropped = compiled(
        {
            "fields": {
                "checkinout.condition": {"action": "drop"},
                "checkinout.condition.notes": {"action": "hash"},
            }
        }
    )
    assert run(dropped, "checkinout", record)[1] == [{"event": "check_in", "user_id": "u-17"}]


def test_unexpected_types_are_dropped_not_stored() -> None:
    cp = compiled(
        {
            "fields": {
                "identity.imei": {"action": "hash"},
                "network.lac": {"action": "coarsen", "step": 10},
            }
        }
    )
    assert run(cp, "identity", {"imei": 356938035643809})[1] == [{}]
    assert run(cp, "network", {"lac": "12"})[1] == [{}]


def test_no_rules_copies() -> None:
    cp = compile_policy(OPEN_DEFAULT, policy_id="d", version=1, hash_key=KEY)
    assert (cp.policy_id, cp.version, cp.policy) == ("d", 1, OPEN_DEFAULT)
    kept, data, _ = run(cp, "identity", IDENTITY)
    assert kept == [0] and data == [IDENTITY]


def test_not_collected_kind_and_bad_kind() -> None:
    cp = compile_policy(PERSONAL_FLOOR, policy_id="s", version=1, hash_key=KEY)
    assert not cp.collects("apps") and not cp.collects("location") and cp.collects("sim")
    assert run(cp, "apps", {"apps": []}) == [[], [], []]
    assert run(cp, "location", {"lat": 1.0, "lon": 2.0}) == [[], [], []]
    with pytest.raises(ValueError, match="kind"):
        cp.filter_batch("bogus", ["d"], [0], [{}])
    assert run(cp, "identity") == [[], [], []]


def test_compile_checks_key_and_zones() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        compile_policy(OPEN_DEFAULT, policy_id="d", version=1, hash_key=b"")
    from privacy_filters import LocationRules, Policy

    bad = Policy("bad", location=LocationRules(only_inside=({"type": "Point"},)))
    with pytest.raises(PolicyError) as info:
        compile_policy(bad, policy_id="b", version=1, hash_key=KEY)
    assert info.value.issues[0].path == "location.only_inside[0].type"


# --- location -----------------------------------------------------------------------------


def loc(lat: float, lon: float, **more: Any) -> dict[str, Any]:
    return {"lat": lat, "lon": lon, **more}


@pytest.mark.parametrize(
    ("lat", "lon"),
    [
        (52.3731234, 4.8922111),
        (-33.8688, 151.2093),
        (0.0, 0.0),
        (64.1466, -21.9426),
        (89.9, 179.99),
        (-89.99, -179.9),
        (-0.004, 179.999),
        (45.0, -180.0),
    ],
)
def test_snapping_at_1000_m(lat: float, lon: float) -> None:
    s_lat, s_lon = snap(lat, lon, 1000)
    lat_step = 1000 / METERS_PER_DEGREE
    lon_step = min(1000 / (METERS_PER_DEGREE * max(math.cos(math.radians(s_lat)), 0.01)), 360)
    assert abs(s_lat - lat) <= lat_step / 2 + 1e-7
    d_lon = abs(s_lon - lon)
    assert min(d_lon, 360 - d_lon) <= lon_step / 2 + 1e-7
    assert -90 <= s_lat <= 90 and -180 <= s_lon <= 180
    if abs(s_lat) < 90:
        assert abs(s_lat / lat_step - round(s_lat / lat_step)) < 1e-4
    multiples = [(s_lon + wrap) / lon_step for wrap in (0, 360, -360)]
    assert any(abs(k - round(k)) < 1e-4 for k in multiples)
    assert round(s_lat, 7) == s_lat and round(s_lon, 7) == s_lon


def test_precision_shapes_the_record() -> None:
    cp = compiled(
        {
            "location": {"precision_m": 1000},
            "fields": {"location.altitude_m": {"action": "coarsen", "step": 10}},
        }
    )
    rec = loc(52.3731234, 4.8922111, accuracy_m=12.0, altitude_m=3.7, speed_mps=1.5)
    _, (out, coarse, none_acc), _ = run(
        cp, "location", rec, loc(1.0, 1.0, accuracy_m=5000.0), loc(1.0, 1.0)
    )
    assert (out["lat"], out["lon"]) == snap(52.3731234, 4.8922111, 1000)
    assert out["accuracy_m"] == 1000.0 and out["altitude_m"] == 0.0 and out["speed_mps"] == 1.5
    assert coarse["accuracy_m"] == 5000.0
    assert none_acc["accuracy_m"] == 1000.0


def test_only_inside_boundary_and_snapping_uses_original() -> None:
    cp = compiled(
        {"location": {"only_inside": [square(4.0, 52.0, 5.0, 53.0)], "precision_m": 100_000}}
    )
    kept, data, suppressed = run(
        cp,
        "location",
        loc(52.5, 4.5),  # inside
        loc(52.0, 4.7),  # on the south edge
        loc(53.0, 5.0),  # on a corner
        loc(52.5, 5.0000001),  # just outside
        loc(51.0, 4.5),  # outside
        loc(52.99, 4.99),  # inside, snaps to a point outside: still stored
    )
    assert kept == [0, 1, 2, 5] and suppressed == [3, 4]
    assert len(data) == 4 and data[3]["lat"] != 52.99


def test_zones_built_while_parsing_filter_as_zones_built_at_compile() -> None:
    from privacy_filters import LocationRules, Policy

    zones = (square(4.0, 52.0, 5.0, 53.0), square(6.0, 50.0, 7.0, 51.0))
    parsed = parse_policy({"name": "t", "location": {"only_inside": list(zones)}})
    assert parsed.location.built_zones is not None  # compile will not build them again
    direct = Policy("t", location=LocationRules(only_inside=zones))
    assert direct.location.built_zones is None and direct == parsed
    points = [loc(52.5, 4.5), loc(50.5, 6.5), loc(51.0, 5.5), loc(53.0, 5.0)]
    results = [run(compile_policy(p, policy_id="p", version=1, hash_key=KEY), "location",
                   *points) for p in (parsed, direct)]
    assert results[0] == results[1] and results[0][0] == [0, 1, 3]


def test_never_inside_boundary() -> None:
    cp = compiled({"location": {"never_inside": [square(4.0, 52.0, 5.0, 53.0)]}})
    kept, data, suppressed = run(cp, "location", loc(52.5, 4.5), loc(52.0, 4.7), loc(51.0, 4.5))
    assert kept == [2] and suppressed == [0, 1] and data == [loc(51.0, 4.5)]


def test_multipolygon_with_hole() -> None:
    outer = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]
    hole = [[4, 4], [6, 4], [6, 6], [4, 6], [4, 4]]
    zone = {
        "type": "MultiPolygon",
        "coordinates": [[outer, hole], square(20, 20, 30, 30)["coordinates"]],
    }
    cp = compiled({"location": {"only_inside": [zone]}})
    kept, _, suppressed = run(
        cp, "location", loc(2, 2), loc(5, 5), loc(25, 25), loc(15, 15), loc(5, 4)
    )
    assert kept == [0, 2, 4] and suppressed == [1, 3]  # (4, 5) is on the hole's boundary


def test_antimeridian_crossing_zone() -> None:
    ring = [[179.0, -1.0], [-179.0, -1.0], [-179.0, 1.0], [179.0, 1.0], [179.0, -1.0]]
    for zone in (
        {"type": "Polygon", "coordinates": [ring]},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[ring]]}},
    ):
        cp = compiled({"location": {"only_inside": [zone]}})
        kept, _, suppressed = run(
            cp,
            "location",
            loc(0, 179.5),
            loc(0, -179.5),
            loc(0, 0),
            loc(0.5, 180.0),
            loc(0, 178.5),
            loc(0, -178.5),
            loc(2, 179.5),
        )
        assert kept == [0, 1, 3] and suppressed == [2, 4, 5, 6]
    # The same area given RFC 7946 style, already split at the antimeridian.
    split = {
        "type": "MultiPolygon",
        "coordinates": [
            square(179, -1, 180, 1)["coordinates"],
            square(-180, -1, -179, 1)["coordinates"],
        ],
    }
    cp = compiled({"location": {"never_inside": [split]}})
    kept, _, suppressed = run(cp, "location", loc(0, 179.5), loc(0, -179.5), loc(0, 0))
    assert kept == [2] and suppressed == [0, 1]


def test_empty_only_inside_is_no_restriction() -> None:
    cp = compiled({"location": {"only_inside": [], "never_inside": []}})
    kept, _, suppressed = run(cp, "location", loc(0, 0), loc(-45, 120))
    assert kept == [0, 1] and suppressed == []


def test_only_while_checked_out() -> None:
    cp = compiled(
        {"location": {"only_while_checked_out": True, "never_inside": [square(10, 10, 11, 11)]}}
    )
    calls: list[tuple[str, int]] = []

    def checked_out(device: str, ts_ms: int) -> bool:
        calls.append((device, ts_ms))
        return device != "d1"

    points = [loc(0, 0), loc(1, 1), loc(10.5, 10.5), loc(3, 3)]
    kept, _, suppressed = run(cp, "location", *points, checked_out=checked_out)
    assert kept == [0, 3] and suppressed == [1, 2]
    assert calls == [("d0", 0), ("d1", 1), ("d3", 3)]  # not asked for the zoned-out point
    kept, data, suppressed = run(cp, "location", *points)  # no callable: fail closed
    assert kept == [] and data == [] and suppressed == [0, 1, 2, 3]


def test_points_without_coordinates_are_suppressed() -> None:
    cp = compiled({})
    kept, _, suppressed = run(cp, "location", {"lat": 1.0}, loc(1.0, math.nan), loc(1.0, 2.0))
    assert kept == [2] and suppressed == [0, 1]


def test_wrong_coordinate_types_raise_without_the_value() -> None:
    cp = compiled({})
    with pytest.raises(ValueError) as info:
        cp.filter_batch("location", ["d"], [0], [{"lat": "Jan's house", "lon": 4.0}])
    assert "Jan" not in str(info.value)


@pytest.mark.parametrize("doc", [
    {},
    {"location": {"precision_m": 1000}},
    {"location": {"only_while_checked_out": True}},
    {"fields": {"location.accuracy_m": {"action": "coarsen", "step": 10}}},
])
def test_zone_free_filter_gives_the_same_with_or_without_numpy(doc: dict[str, Any]) -> None:
    """Float coordinates without zones take a path without numpy; an int among them
    sends the batch through numpy's: the outcome for the same points is the same."""
    cp = compiled(doc)
    points = [loc(52.1, 4.3), loc(math.nan, 1.0), loc(1.0, math.inf), loc(-89.99, 179.99),
              loc(0.0, -math.inf), loc(48.85, 2.35), {"lat": 1.0, "lon": 2.0}]

    def checked_out(device: str, ts_ms: int) -> bool:
        return device != "d5"

    plain = run(cp, "location", *points, checked_out=checked_out)
    mixed = run(cp, "location", *points, loc(1, 2), checked_out=checked_out)
    assert mixed[0] == [*plain[0], 7]
    assert mixed[1][:-1] == plain[1]
    assert mixed[2] == plain[2]
    assert plain[2] == ([1, 2, 4, 5] if "only_while_checked_out" in str(doc) else [1, 2, 4])


def test_a_policy_without_zones_or_snapping_does_not_import_numpy() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from privacy_filters import OPEN_DEFAULT, PERSONAL_FLOOR, compile_policy\n"
        "for p in (OPEN_DEFAULT, PERSONAL_FLOOR):\n"
        "    cp = compile_policy(p, policy_id='p', version=1, hash_key=b'k' * 32)\n"
        "    cp.filter_batch('location', ['d'], [0], [{'lat': 1.0, 'lon': 2.0}])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'shapely')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
