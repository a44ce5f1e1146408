"""Policy documents: validation (every issue, with its path), canonical form,
built-ins, selection and the plain-language explanation."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from privacy_filters import (
    OPEN_DEFAULT,
    PERSONAL_FLOOR,
    AppliesTo,
    FieldRule,
    LocationRules,
    Policy,
    PolicyError,
    PolicyIssue,
    explain_policy,
    parse_policy,
    policy_to_doc,
    select_policy,
)


def square(lon0: float, lat0: float, lon1: float, lat1: float) -> dict[str, Any]:
    ring = [[lon0, lat0], [lon1, lat0], [lon1, lat1], [lon0, lat1], [lon0, lat0]]
    return {"type": "Polygon", "coordinates": [ring]}


# The docs/policies.md example, with real polygons in place of placeholders.
BYOD_EU: dict[str, Any] = {
    "name": "byod-eu",
    "applies_to": {"ownership": "personal", "groups": ["field-staff"]},
    "collect": {"location": True, "identity": True, "sim": True, "network": True,
                "apps": False, "checkinout": True},
    "fields": {
        "identity.imei":         {"action": "mask", "keep_last": 4},
        "identity.phone_number": {"action": "mask", "keep_last": 4},
        "identity.wifi_mac":     {"action": "hash"},
        "identity.user_email":   {"action": "drop"},
        "sim.iccid":             {"action": "hash"},
        "network.ip":            {"action": "drop"},
    },
    "location": {
        "precision_m": 1000,
        "only_inside": [square(4.7, 52.2, 5.1, 52.5)],
        "never_inside": [{"type": "Feature", "properties": {"name": "home"},
                          "geometry": square(4.88, 52.36, 4.90, 52.38)}],
        "only_while_checked_out": True,
    },
    "retention_days": {"location": 30, "network": 7, "default": 90},
}  # fmt: skip


def issues_of(doc: object, **kw: Any) -> list[PolicyIssue]:
    with pytest.raises(PolicyError) as info:
        parse_policy(doc, **kw)
    return list(info.value.issues)


def paths_of(doc: object, **kw: Any) -> list[str]:
    return [i.path for i in issues_of(doc, **kw)]


def with_(**changes: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BYOD_EU)
    doc.update(changes)
    return doc


def test_policy_md_example_parses() -> None:
    p = parse_policy(BYOD_EU)
    assert p.name == "byod-eu"
    assert p.applies_to == AppliesTo("personal", ("field-staff",))
    assert not p.collect["apps"] and p.collect["location"]
    assert p.fields["identity.imei"] == FieldRule("mask", keep_last=4)
    assert p.location.precision_m == 1000 and p.location.only_while_checked_out
    assert (p.retention_for("location"), p.retention_for("network")) == (30, 7)
    assert p.retention_for("apps") == 90


def test_defaults_fill_in() -> None:
    p = parse_policy({}, name="minimal")
    assert dict(p.collect) == dict.fromkeys(p.collect, True) and len(p.collect) == 6
    assert dict(p.retention_days) == {"default": 90}
    assert p.location == LocationRules() and p.applies_to.is_default
    assert p == Policy("minimal")


def test_round_trip_and_no_aliasing() -> None:
    doc = copy.deepcopy(BYOD_EU)
    p = parse_policy(doc)
    assert parse_policy(policy_to_doc(p)) == p
    for builtin in (PERSONAL_FLOOR, OPEN_DEFAULT):
        assert parse_policy(policy_to_doc(builtin)) == builtin
    doc["location"]["only_inside"][0]["coordinates"][0][0][0] = 0.0  # the caller's copy
    out = policy_to_doc(p)
    out["location"]["only_inside"][0]["type"] = "Point"  # the returned copy
    assert p.location.only_inside[0] == square(4.7, 52.2, 5.1, 52.5)
    with pytest.raises(TypeError):
        p.fields["x"] = FieldRule("drop")  # type: ignore[index]  # read-only mapping


def test_name_from_url() -> None:
    assert parse_policy({}, name="a").name == "a"
    assert parse_policy({"name": "a"}, name="a").name == "a"
    assert paths_of({"name": "a"}, name="b") == ["name"]
    assert paths_of({}) == ["name"]
    assert paths_of({"name": "bad name!"}) == ["name"]
    assert paths_of({"name": ""}) == ["name"]
    assert paths_of({"name": "x" * 65}) == ["name"]


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"bogus": 1}, "bogus"),
        ({"collect": {"bogus": True}}, "collect.bogus"),
        ({"collect": {"apps": "no"}}, "collect.apps"),
        ({"collect": []}, "collect"),
        ({"fields": {"bogus.x": {"action": "drop"}}}, 'fields["bogus.x"]'),
        ({"fields": {"identity.bogus": {"action": "drop"}}}, 'fields["identity.bogus"]'),
        ({"fields": {"identity.imei": {"action": "shred"}}}, 'fields["identity.imei"].action'),
        ({"fields": {"identity.imei": "drop"}}, 'fields["identity.imei"]'),
        ({"fields": {"identity.imei": {"action": "drop", "x": 1}}}, 'fields["identity.imei"].x'),
        ({"fields": {"identity.imei": {"action": "mask"}}}, 'fields["identity.imei"]'),
        (
            {"fields": {"identity.imei": {"action": "mask", "keep_last": 4, "keep_first": 2}}},
            'fields["identity.imei"]',
        ),
        (
            {"fields": {"identity.imei": {"action": "mask", "keep_last": 65}}},
            'fields["identity.imei"].keep_last',
        ),
        (
            {"fields": {"identity.imei": {"action": "mask", "keep_last": -1}}},
            'fields["identity.imei"].keep_last',
        ),
        (
            {"fields": {"identity.imei": {"action": "mask", "keep_last": True}}},
            'fields["identity.imei"].keep_last',
        ),
        (
            {"fields": {"identity.imei": {"action": "hash", "keep_last": 4}}},
            'fields["identity.imei"].keep_last',
        ),
        (
            {"fields": {"network.rssi_dbm": {"action": "mask", "keep_last": 1}}},
            'fields["network.rssi_dbm"].action',
        ),
        ({"fields": {"sim.roaming": {"action": "hash"}}}, 'fields["sim.roaming"].action'),
        ({"fields": {"sim.state": {"action": "hash"}}}, 'fields["sim.state"].action'),
        (
            {"fields": {"identity.imei": {"action": "coarsen", "step": 10}}},
            'fields["identity.imei"].action',
        ),
        (
            {"fields": {"network.cell_id": {"action": "coarsen"}}},
            'fields["network.cell_id"].step',
        ),
        (
            {"fields": {"network.cell_id": {"action": "coarsen", "step": 0}}},
            'fields["network.cell_id"].step',
        ),
        (
            {"fields": {"network.cell_id": {"action": "drop", "step": 2}}},
            'fields["network.cell_id"].step',
        ),
        ({"fields": {"location.lat": {"action": "drop"}}}, 'fields["location.lat"]'),
        ({"fields": {"checkinout.event": {"action": "drop"}}}, 'fields["checkinout.event"]'),
        ({"location": {"precision_m": 0}}, "location.precision_m"),
        ({"location": {"precision_m": 100_001}}, "location.precision_m"),
        ({"location": {"precision_m": "1km"}}, "location.precision_m"),
        ({"location": {"only_while_checked_out": 1}}, "location.only_while_checked_out"),
        ({"location": {"radius": 5}}, "location.radius"),
        ({"location": {"only_inside": {}}}, "location.only_inside"),
        ({"retention_days": {"bogus": 5}}, "retention_days.bogus"),
        ({"retention_days": {"default": 0}}, "retention_days.default"),
        ({"retention_days": {"location": 3651}}, "retention_days.location"),
        ({"retention_days": {"location": 30.5}}, "retention_days.location"),
        ({"applies_to": {"ownership": "family"}}, "applies_to.ownership"),
        ({"applies_to": {"groups": ["ok", "not ok"]}}, "applies_to.groups[1]"),
        ({"applies_to": {"groups": "ok"}}, "applies_to.groups"),
        ({"applies_to": {"os": "android"}}, "applies_to.os"),
    ],
)
def test_each_error_has_its_path(change: dict[str, Any], path: str) -> None:
    issues = issues_of(with_(**change))
    assert path in [i.path for i in issues], issues
    assert all(i.message for i in issues)


def test_lat_lon_rule_points_to_precision() -> None:
    (issue,) = issues_of(with_(fields={"location.lon": {"action": "coarsen", "step": 0.1}}))
    assert "location.precision_m" in issue.message


def test_every_error_is_reported() -> None:
    doc = with_(
        bogus=1,
        collect={"apps": False, "nope": True},
        fields={
            "identity.imei": {"action": "mask", "keep_last": 99},
            "identity.phone_number": {"action": "hash"},
            "network.ip": {"action": "vanish"},
        },
        retention_days={"default": 0, "network": 7},
    )
    doc["location"]["precision_m"] = -5
    doc["location"]["only_inside"].append(square(200, 0, 201, 1))
    paths = paths_of(doc)
    assert sorted(paths) == sorted(
        [
            "bogus",
            "collect.nope",
            'fields["identity.imei"].keep_last',
            'fields["network.ip"].action',
            "location.precision_m",
            "location.only_inside[1].coordinates[0][0]",
            "retention_days.default",
        ]
    )
    with pytest.raises(PolicyError) as info:
        parse_policy(doc)
    assert str(info.value).count(";") == len(paths) - 1


# --- zones --------------------------------------------------------------------------------


def zone_paths(zone: object, where: str = "only_inside") -> list[str]:
    return paths_of(with_(location={where: [square(0, 0, 1, 1), zone]}))


def test_zone_errors() -> None:
    base = "location.only_inside[1]"
    assert zone_paths({"type": "Point", "coordinates": [0, 0]}) == [f"{base}.type"]
    assert zone_paths([1, 2]) == [base]
    assert zone_paths({"type": "Feature", "geometry": None}) == [f"{base}.geometry"]
    open_ring = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1]]]}
    assert zone_paths(open_ring) == [f"{base}.coordinates[0]"]
    short = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 0]]]}
    assert zone_paths(short) == [f"{base}.coordinates[0]"]
    lat_out = square(0, 80, 1, 91)
    assert zone_paths(lat_out) == [f"{base}.coordinates[0][2]"]
    not_number = {"type": "Polygon", "coordinates": [[[0, 0], [1, "0"], [1, 1], [0, 0]]]}
    assert zone_paths(not_number) == [f"{base}.coordinates[0][1]"]
    multi = {"type": "MultiPolygon", "coordinates": [square(0, 0, 1, 1)["coordinates"], []]}
    assert zone_paths(multi) == [f"{base}.coordinates[1]"]


def test_self_intersection_is_explained() -> None:
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}
    (issue,) = issues_of(with_(location={"never_inside": [bowtie]}))
    assert issue.path == "location.never_inside[0].coordinates"
    assert "Self-intersection" in issue.message


def test_zone_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    import privacy_filters.location as loc

    monkeypatch.setattr(loc, "MAX_ZONES", 3)
    zones = [square(i, 0, i + 0.5, 1) for i in range(4)]
    assert paths_of(with_(location={"only_inside": zones})) == ["location"]
    monkeypatch.setattr(loc, "MAX_VERTICES", 12)
    zones = [square(i, 0, i + 0.5, 1) for i in range(3)]
    assert paths_of(with_(location={"only_inside": zones})) == ["location"]


def test_empty_zone_lists_and_altitudes_are_fine() -> None:
    p = parse_policy(with_(location={"only_inside": [], "never_inside": None}))
    assert p.location.only_inside == () and p.location.never_inside == ()
    with_alt = {"type": "Polygon", "coordinates": [[[0, 0, 5], [1, 0, 5], [1, 1], [0, 0, 5]]]}
    parse_policy(with_(location={"only_inside": [with_alt]}))


def test_objects_validate_when_built() -> None:
    with pytest.raises(PolicyError):
        FieldRule("mask")
    with pytest.raises(PolicyError):
        FieldRule("coarsen", step=-1)
    with pytest.raises(PolicyError):
        AppliesTo(ownership="nobody")
    with pytest.raises(PolicyError):
        LocationRules(precision_m=0.5)
    with pytest.raises(PolicyError) as info:
        Policy("p", fields={"identity.imei": FieldRule("coarsen", step=1)})
    assert info.value.issues[0].path == 'fields["identity.imei"].action'
    assert AppliesTo(groups=("b", "a", "b")).groups == ("a", "b")


# --- built-ins ----------------------------------------------------------------------------


def test_builtins() -> None:
    s = PERSONAL_FLOOR
    assert s.applies_to == AppliesTo(ownership="personal")
    assert {k for k, on in s.collect.items() if not on} == {"apps", "location"}
    hashed, dropped = FieldRule("hash"), FieldRule("drop")
    assert dict(s.fields) == {
        "identity.imei": FieldRule("mask", keep_last=4),
        "identity.phone_number": FieldRule("mask", keep_last=4),
        "identity.serial": hashed, "identity.wifi_mac": hashed,
        "identity.bluetooth_mac": hashed, "sim.iccid": hashed, "sim.imsi": hashed,
        "identity.user_email": dropped, "identity.first_name": dropped,
        "identity.last_name": dropped, "identity.user_name": dropped, "network.ip": dropped,
    }
    assert dict(s.retention_days) == {"default": 90}
    d = OPEN_DEFAULT
    assert d.name == "default" and d.applies_to.is_default
    assert all(d.collect.values()) and not d.fields and d.location == LocationRules()
    assert dict(d.retention_days) == {"default": 90}


# --- selection ----------------------------------------------------------------------------


def pol(name: str, **applies: Any) -> Policy:
    return parse_policy({"name": name, "applies_to": applies})


CANDIDATES = [
    (pol("default"), "default"),
    (pol("corp", ownership="corporate"), "corp"),
    (pol("pers", ownership="personal"), "pers"),
    (pol("field", groups=["field", "drivers"]), "field"),
    (pol("field-personal", ownership="personal", groups=["field"]), "field-personal"),
]


@pytest.mark.parametrize(
    ("ownership", "groups", "expected"),
    [
        ("corporate", [], "corp"),
        ("personal", [], "pers"),
        ("corporate", ["drivers"], "field"),
        ("corporate", ["field"], "field"),
        ("personal", ["field"], "field-personal"),
        ("personal", ["drivers"], "field"),
        ("corporate", ["office"], "corp"),
    ],
)
def test_most_specific_wins(ownership: str, groups: list[str], expected: str) -> None:
    found = select_policy(CANDIDATES, ownership=ownership, groups=groups)
    assert found is not None and found[1] == expected and found[0].name == expected
    shuffled = list(reversed(CANDIDATES))
    found = select_policy(shuffled, ownership=ownership, groups=set(groups))
    assert found is not None and found[1] == expected


def test_default_and_tie_break() -> None:
    only_default = CANDIDATES[:1]
    assert select_policy(only_default, ownership="corporate", groups=[]) == (
        CANDIDATES[0][0], "default")
    assert select_policy(only_default, ownership="personal", groups=[]) == (
        CANDIDATES[0][0], "default")
    assert select_policy([], ownership="corporate", groups=[]) is None
    ties = [(pol("zeta", groups=["a"]), 1), (pol("alpha", groups=["b"]), 2)]
    assert select_policy(ties, ownership="corporate", groups=["a", "b"]) == (ties[1][0], 2)
    assert select_policy(ties[::-1], ownership="corporate", groups=["a", "b"]) == (
        ties[1][0], 2)


# --- explanation --------------------------------------------------------------------------


FINGERPRINT = ("stored as a keyed fingerprint: the same value always gives the same "
               "fingerprint, and a guess can be checked against it only with the server's "
               "secret key.")
FEW_VALUES_FINGERPRINT = (
    "stored as a keyed fingerprint. That hides it from anyone who has only a copy of the "
    "stored data, but as there are few possible values, someone able to make the server "
    "compute fingerprints (an administrator, for example) could find it by trying them all.")


def test_explain_personal_floor() -> None:
    assert explain_policy(PERSONAL_FLOOR) == [
        "Your location is not collected.",
        "Your device and account details are stored and kept for 90 days.",
        "Your IMEI (device identity number) is stored as its last 4 digits only.",
        f"Your device serial number is {FINGERPRINT}",
        f"Your Wi-Fi MAC address is {FEW_VALUES_FINGERPRINT}",
        f"Your Bluetooth MAC address is {FEW_VALUES_FINGERPRINT}",
        "Your phone number is stored as its last 4 digits only.",
        "Your user name is not stored.",
        "Your e-mail address is not stored.",
        "Your first name is not stored.",
        "Your last name is not stored.",
        "Your SIM card details are stored and kept for 90 days.",
        f"Your SIM card number (ICCID) is {FEW_VALUES_FINGERPRINT}",
        f"Your subscriber identity (IMSI) is {FEW_VALUES_FINGERPRINT}",
        "Your network connection details are stored and kept for 90 days.",
        "Your network IP address is not stored.",
        "Installed apps are not collected.",
        "Check-in and check-out events are stored and kept for 90 days.",
    ]
    assert not any("cannot be read back" in line for line in explain_policy(PERSONAL_FLOOR))


def test_explain_policy_md_example() -> None:
    assert explain_policy(parse_policy(BYOD_EU)) == [
        "Your location is stored only while you are checked out, rounded to about 1 km, "
        "and kept for 30 days.",
        "Locations outside the allowed area are never stored.",
        "Locations inside the excluded area are never stored.",
        "Your device and account details are stored and kept for 90 days.",
        "Your IMEI (device identity number) is stored as its last 4 digits only.",
        f"Your Wi-Fi MAC address is {FEW_VALUES_FINGERPRINT}",
        "Your phone number is stored as its last 4 digits only.",
        "Your e-mail address is not stored.",
        "Your SIM card details are stored and kept for 90 days.",
        f"Your SIM card number (ICCID) is {FEW_VALUES_FINGERPRINT}",
        "Your network connection details are stored and kept for 7 days.",
        "Your network IP address is not stored.",
        "Installed apps are not collected.",
        "Check-in and check-out events are stored and kept for 90 days.",
    ]


def test_explain_other_wordings() -> None:
    p = parse_policy(
        {
            "name": "misc",
            "fields": {
                "location.altitude_m": {"action": "coarsen", "step": 10},
                "checkinout.condition.battery_pct": {"action": "coarsen", "step": 5},
                "network.cell_id": {"action": "coarsen", "step": 256},
                "identity.serial": {"action": "mask", "keep_first": 1},
                "identity.user_name": {"action": "mask", "keep_last": 0},
                "identity.model": {"action": "keep"},
            },
            "location": {
                "precision_m": 250,
                "never_inside": [square(0, 0, 1, 1), square(2, 2, 3, 3), square(4, 4, 5, 5)],
                "only_inside": [square(0, 0, 9, 9), square(10, 10, 11, 11)],
            },
            "retention_days": {"location": 1},
        }
    )
    text = explain_policy(p)
    assert text[:4] == [
        "Your location is stored, rounded to about 250 m, and kept for 1 day.",
        "Locations outside all of the 2 allowed areas are never stored.",
        "Locations inside 3 excluded areas are never stored.",
        "Your altitude is stored rounded to the nearest 10 m.",
    ]
    assert "Your device serial number is stored as its first 1 character only." in text
    assert "Your user name is stored with every character hidden; only its length is kept." in text
    assert "Your device model is stored as sent." in text
    assert "Your mobile cell id is stored rounded to the nearest multiple of 256." in text
    assert "Your battery level at check-in/out is stored rounded to the nearest 5%." in text
    for precision, words in [(1500, "1.5 km"), (12_345, "12 km"), (37, "37 m"), (999, "1 km")]:
        doc = {"name": "x", "location": {"precision_m": precision}}
        assert f"about {words}," in explain_policy(parse_policy(doc))[0]
