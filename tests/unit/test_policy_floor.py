"""The personal-device floor: the stricter-of-two merge, which policy is in force,
what a policy for personal devices adds (in plain words), and hash warnings."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_protocol import FIELD_TYPES, KINDS, REQUIRED_FIELDS
from privacy_filters import (
    FLOOR_ID,
    HASH_PREFIX,
    PERSONAL_FLOOR,
    FieldRule,
    LocationRules,
    Policy,
    beyond_floor,
    compile_policy,
    explain_policy,
    merge_policies,
    parse_policy,
    policy_warnings,
    resolve_policy,
    stricter_rule,
)

KEY = b"k" * 32


def square(lon0: float, lat0: float, lon1: float, lat1: float) -> dict[str, Any]:
    ring = [[lon0, lat0], [lon1, lat0], [lon1, lat1], [lon0, lat1], [lon0, lat0]]
    return {"type": "Polygon", "coordinates": [ring]}


# --- one rule -----------------------------------------------------------------------------

KEEP, DROP, HASH = FieldRule("keep"), FieldRule("drop"), FieldRule("hash")
LAST4, LAST2 = FieldRule("mask", keep_last=4), FieldRule("mask", keep_last=2)
FIRST3 = FieldRule("mask", keep_first=3)


@pytest.mark.parametrize(("a", "b", "expected"), [
    (None, None, None),
    (KEEP, None, None),
    (KEEP, KEEP, None),
    (None, HASH, HASH),
    (KEEP, LAST4, LAST4),
    (DROP, KEEP, DROP),
    (DROP, HASH, DROP),
    (LAST4, DROP, DROP),
    (HASH, HASH, HASH),
    (LAST4, LAST2, LAST2),
    (FIRST3, FieldRule("mask", keep_first=1), FieldRule("mask", keep_first=1)),
    (LAST4, FIRST3, FieldRule("mask", keep_last=0)),  # opposite ends: hide every character
    (LAST4, HASH, DROP),  # each shows something the other hides
    (FieldRule("coarsen", step=5), FieldRule("coarsen", step=10), FieldRule("coarsen", step=10)),
])
def test_stricter_rule(a: FieldRule | None, b: FieldRule | None,
                       expected: FieldRule | None) -> None:
    assert stricter_rule(a, b) == expected
    assert stricter_rule(b, a) == expected


# --- whole policies -----------------------------------------------------------------------

# The auditor's bypass: a group policy that never thought of personal devices.
FIELD_GROUP = parse_policy({"name": "field", "applies_to": {"groups": ["field"]},
                            "collect": {"location": True, "apps": True}})
DEFAULT = parse_policy({"name": "default"})
BYOD = parse_policy({
    "name": "byod", "applies_to": {"ownership": "personal"},
    "collect": {"location": True},
    "fields": {"identity.imei": {"action": "keep"}, "identity.serial": {"action": "hash"},
               "network.ip": {"action": "mask", "keep_first": 3}},
    "location": {"precision_m": 500},
    "retention_days": {"location": 14, "identity": 400},
})


def test_a_group_policy_is_merged_with_the_floor() -> None:
    merged = merge_policies(FIELD_GROUP, PERSONAL_FLOOR)
    assert merged.name == "field"
    assert not merged.collect["location"] and not merged.collect["apps"]
    assert dict(merged.fields) == dict(PERSONAL_FLOOR.fields)
    assert merged.retention_for("identity") == 90


def test_merge_takes_the_stricter_of_every_part() -> None:
    a = parse_policy({
        "name": "a",
        "collect": {"apps": False},
        "fields": {"identity.imei": {"action": "mask", "keep_last": 6},
                   "identity.serial": {"action": "mask", "keep_last": 4},
                   "network.rssi_dbm": {"action": "coarsen", "step": 5}},
        "location": {"precision_m": 100, "only_inside": [square(0, 0, 10, 10)],
                     "never_inside": [square(1, 1, 2, 2)]},
        "retention_days": {"location": 7, "default": 200},
    })
    b = parse_policy({
        "name": "b",
        "fields": {"identity.imei": {"action": "mask", "keep_last": 4},
                   "identity.serial": {"action": "hash"},
                   "network.rssi_dbm": {"action": "coarsen", "step": 10}},
        "location": {"precision_m": 1000, "only_inside": [square(5, 5, 20, 20)],
                     "never_inside": [square(6, 6, 7, 7)], "only_while_checked_out": True},
        "retention_days": {"default": 30},
    })
    m = merge_policies(a, b)
    assert not m.collect["apps"] and m.collect["location"]
    assert m.fields["identity.imei"] == FieldRule("mask", keep_last=4)
    assert m.fields["identity.serial"] == FieldRule("drop")
    assert m.fields["network.rssi_dbm"] == FieldRule("coarsen", step=10)
    loc = m.location
    assert loc.precision_m == 1000 and loc.only_while_checked_out
    assert len(loc.never_inside) == 2
    assert m.retention_for("location") == 7 and m.retention_for("identity") == 30
    # Only the overlap of the two allowed areas is allowed; both excluded areas count.
    cp = compile_policy(m, policy_id="m", version=1, hash_key=KEY)
    points = [(2.5, 2.5), (7.5, 7.5), (1.5, 1.5), (12.0, 12.0), (8.0, 9.0), (6.5, 6.5)]
    r = cp.filter_batch("location", ["d"] * len(points), [0] * len(points),
                        [{"lat": la, "lon": lo} for lo, la in points],
                        checked_out=lambda _d, _t: True)
    assert r.kept == [1, 4]  # inside 5..10; not in 6..7; (2.5, 2.5) is outside b's area


def test_allowed_areas_that_do_not_overlap_allow_no_location() -> None:
    a = parse_policy({"name": "a", "location": {"only_inside": [square(0, 0, 1, 1)]}})
    b = parse_policy({"name": "b", "location": {"only_inside": [square(5, 5, 6, 6)]}})
    m = merge_policies(a, b)
    # An empty only_inside list would mean "no restriction": the kind goes instead.
    assert not m.collect["location"]


def test_resolution() -> None:
    candidates = [(DEFAULT, "default"), (FIELD_GROUP, "field"), (BYOD, "byod")]
    corp = resolve_policy(candidates, ownership="corporate", groups=["field"])
    assert (corp.attached, corp.floor, corp.effective) == ("field", "none", FIELD_GROUP)
    assert corp.policy_id() == "field"
    # Personal, in the group: the group policy wins (more specific) and is merged.
    merged = resolve_policy(candidates, ownership="personal", groups=["field"])
    assert (merged.attached, merged.floor) == ("field", "merged")
    assert not merged.effective.collect["location"]
    assert merged.policy_id() == "field+personal-floor"
    # Personal, outside it: the policy that names personal devices, as written.
    relaxed = resolve_policy(candidates, ownership="personal", groups=[])
    assert (relaxed.attached, relaxed.floor, relaxed.effective) == ("byod", "relaxed", BYOD)
    assert relaxed.policy_id() == "byod"
    # Personal, only the default: merged too.
    assert resolve_policy(candidates[:1], ownership="personal", groups=[]).floor == "merged"
    # Nothing at all matches: the floor alone.
    alone = resolve_policy([], ownership="personal", groups=[])
    assert (alone.floor, alone.effective, alone.policy_id()) == (
        "only", PERSONAL_FLOOR, FLOOR_ID)


def test_what_a_policy_for_personal_devices_adds_in_plain_words() -> None:
    assert beyond_floor(BYOD, PERSONAL_FLOOR) == [
        "Your location is collected (the minimum for personal devices: not collected).",
        "Your device and account details are kept for 400 days (the minimum for personal "
        "devices: 90 days).",
        "Your IMEI (device identity number) is stored as sent (the minimum for personal "
        "devices: stored as its last 4 digits only).",
        "Your Wi-Fi MAC address is stored as sent (the minimum for personal devices: stored "
        "as a keyed fingerprint).",
        "Your Bluetooth MAC address is stored as sent (the minimum for personal devices: "
        "stored as a keyed fingerprint).",
        "Your phone number is stored as sent (the minimum for personal devices: stored as "
        "its last 4 digits only).",
        "Your user name is stored as sent (the minimum for personal devices: not stored).",
        "Your e-mail address is stored as sent (the minimum for personal devices: not "
        "stored).",
        "Your first name is stored as sent (the minimum for personal devices: not stored).",
        "Your last name is stored as sent (the minimum for personal devices: not stored).",
        "Your SIM card number (ICCID) is stored as sent (the minimum for personal devices: "
        "stored as a keyed fingerprint).",
        "Your subscriber identity (IMSI) is stored as sent (the minimum for personal "
        "devices: stored as a keyed fingerprint).",
        "Your network IP address is stored as its first 3 characters only (the minimum for "
        "personal devices: not stored).",
        "Installed apps are collected (the minimum for personal devices: not collected).",
    ]
    assert beyond_floor(PERSONAL_FLOOR, PERSONAL_FLOOR) == []
    assert beyond_floor(merge_policies(BYOD, PERSONAL_FLOOR), PERSONAL_FLOOR) == []


def test_hash_of_few_possible_values_is_warned_about() -> None:
    p = parse_policy({"name": "p", "fields": {
        "identity.imei": {"action": "hash"}, "identity.serial": {"action": "hash"},
        "sim.iccid": {"action": "hash"}, "identity.phone_number": {"action": "mask",
                                                                   "keep_last": 4}}})
    warned = {w.path for w in policy_warnings(p)}
    assert warned == {'fields["identity.imei"]', 'fields["sim.iccid"]'}
    assert all("mask" in w.message and "drop" in w.message for w in policy_warnings(p))
    assert policy_warnings(DEFAULT) == []


# --- the property: the merge never shows more than either -------------------------------

_TEXT = {(k, f) for k in KINDS for f, t in FIELD_TYPES[k].items() if t == "string"}
_TEXT_FIELDS = sorted(f"{k}.{f}" for k, f in _TEXT
                      if f not in REQUIRED_FIELDS.get(k, ()) and "." not in f)

text_rule = st.one_of(
    st.none(), st.just(KEEP), st.just(DROP), st.just(HASH),
    st.builds(lambda n: FieldRule("mask", keep_last=n), st.integers(0, 8)),
    st.builds(lambda n: FieldRule("mask", keep_first=n), st.integers(0, 8)))


@st.composite
def policies(draw: st.DrawFn, name: str) -> Policy:
    rules = draw(st.dictionaries(st.sampled_from(_TEXT_FIELDS), text_rule, max_size=12))
    collect = draw(st.fixed_dictionaries({k: st.booleans() for k in KINDS}))
    return Policy(name, collect=collect,
                  fields={k: v for k, v in rules.items() if v is not None},
                  location=LocationRules(),
                  retention_days={"default": draw(st.integers(1, 400))})


def _visible(out: object, value: str) -> set[int] | None:
    """Positions of ``value`` readable in the stored ``out``; None: not stored;
    {-1}: an equality-preserving fingerprint."""
    if out is None:
        return None
    assert isinstance(out, str)
    if out.startswith(HASH_PREFIX):
        return {-1}
    assert len(out) == len(value)
    return {i for i, (o, v) in enumerate(zip(out, value, strict=True)) if o == v != "*"}


@settings(max_examples=300, deadline=None)
@given(a=policies("a"), b=st.one_of(st.just(PERSONAL_FLOOR), policies("b")),
       value=st.text("0123456789abcdef", min_size=10, max_size=24))
def test_the_merge_never_shows_more_than_either(a: Policy, b: Policy, value: str) -> None:
    m = merge_policies(a, b)
    compiled = [compile_policy(p, policy_id=p.name, version=1, hash_key=KEY) for p in (a, b, m)]
    for kind in KINDS:
        assert m.collect[kind] == (a.collect[kind] and b.collect[kind])
        assert m.retention_for(kind) == min(a.retention_for(kind), b.retention_for(kind))
    for key in _TEXT_FIELDS:
        kind, name = key.split(".", 1)
        if not m.collect[kind]:
            continue
        outs = []
        for cp in compiled:
            r = cp.filter_batch(kind, ["d"], [0], [{name: value}])
            outs.append(r.data[0].get(name) if r.kept else None)
        seen_a, seen_b, seen_m = (_visible(o, value) for o in outs)
        if seen_m is None:
            continue
        assert seen_a is not None and seen_b is not None, key
        assert seen_m <= (seen_a | {-1}) and seen_m <= (seen_b | {-1}), key
        if -1 in seen_m:  # a fingerprint only where neither side masks or drops
            assert all(r is None or r.action in ("keep", "hash")
                       for r in (a.fields.get(key), b.fields.get(key))), key


def test_the_floor_holds_for_every_kind_of_matching_policy() -> None:
    """Whatever a non-personal policy says, a personal device's effective policy
    stores nothing the floor does not."""
    for collect, rule in itertools.product((True, False), (None, KEEP, HASH, LAST4)):
        fields = {} if rule is None else {k: rule for k in _TEXT_FIELDS}
        p = Policy("p", collect={k: collect for k in KINDS}, fields=fields)
        effective = resolve_policy([(p, 1)], ownership="personal", groups=[]).effective
        assert not effective.collect["location"] and not effective.collect["apps"]
        for key, floor_rule in PERSONAL_FLOOR.fields.items():
            assert stricter_rule(effective.fields.get(key), floor_rule) == \
                effective.fields.get(key), key
    assert explain_policy(merge_policies(FIELD_GROUP, PERSONAL_FLOOR))[0] == \
        "Your location is not collected."
