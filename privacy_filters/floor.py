"""The personal-device floor: what every personally owned device gets at least.

A personal device is under the policy that matches it (most specific wins, see
:func:`privacy_filters.policy.select_policy`) *merged with the floor*: for every
kind and field the stricter of the two applies. Only a policy that names
``"ownership": "personal"`` in its ``applies_to`` is taken as written, which is
how an admin says "I mean personal devices"; it may then relax the floor, and
:func:`privacy_filters.explain.beyond_floor` tells the user what it collects beyond
it. A personal device that no policy matches gets the floor alone.

The floor follows what the big MDMs show of a personal phone: no location and no
inventory of installed apps (Intune shows neither for personal devices), the IMEI
and phone number as their last 4 digits (Intune), the serial number and other
hardware identifiers not in the clear (Apple User Enrollment hides serial, IMEI
and UDID); names, e-mail and IP address not stored.

"Stricter of the two", per part (:func:`merge_policies`):

* a kind is collected only if both collect it;
* a field rule: ``drop`` beats everything; ``keep`` (or no rule) yields to the
  other; two masks of the same side keep the fewer characters, of opposite sides
  hide every character; two ``coarsen`` take the larger step; ``mask`` against
  ``hash`` (each shows something the other hides: some characters, or equality)
  gives ``drop``;
* locations: the coarser grid, the intersection of the allowed areas (an empty
  intersection means no location at all), every excluded area of both, and
  "only while checked out" if either says so;
* retention: the shorter, per kind.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, Literal, TypeVar

from agent_protocol import KINDS
from privacy_filters.errors import PolicyError, PolicyIssue
from privacy_filters.location import build_zones
from privacy_filters.policy import (
    DEFAULT_RETENTION_DAYS,
    FieldRule,
    LocationRules,
    Policy,
    parse_policy,
    select_policy,
)

__all__ = [
    "FLOOR_ID",
    "FLOOR_SUFFIX",
    "PERSONAL_FLOOR",
    "FloorUse",
    "Resolution",
    "merge_policies",
    "resolve_policy",
    "stricter_rule",
]

PERSONAL_FLOOR: Final = parse_policy(
    {
        "name": "personal-floor",
        "applies_to": {"ownership": "personal"},
        "collect": {"apps": False, "location": False},
        "fields": {
            "identity.imei": {"action": "mask", "keep_last": 4},
            "identity.phone_number": {"action": "mask", "keep_last": 4},
            "identity.serial": {"action": "hash"},
            "identity.wifi_mac": {"action": "hash"},
            "identity.bluetooth_mac": {"action": "hash"},
            "identity.user_email": {"action": "drop"},
            "identity.user_name": {"action": "drop"},
            "identity.first_name": {"action": "drop"},
            "identity.last_name": {"action": "drop"},
            "sim.iccid": {"action": "hash"},
            "sim.imsi": {"action": "hash"},
            "network.ip": {"action": "drop"},
        },
        "retention_days": {"default": DEFAULT_RETENTION_DAYS},
    }
)
"""The floor every personal device gets (see the module doc)."""

#: The policy id stamped on records shaped by the floor alone.
FLOOR_ID: Final = "builtin:personal-floor"
#: Appended to a policy's name in the id of records it shaped merged with the floor.
FLOOR_SUFFIX: Final = "+personal-floor"

FloorUse = Literal["none", "merged", "relaxed", "only"]
"""How the floor takes part: ``none`` (not a personal device), ``merged`` (the
matching policy merged with the floor), ``relaxed`` (a policy for personal devices,
as written), ``only`` (no policy matched: the floor alone)."""

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Resolution(Generic[T]):
    """The policy in force for one device: the matching ``policy`` (None when none
    matched), the value attached to it, the merged ``effective`` policy that shapes
    the device's telemetry, and how the floor took part."""

    policy: Policy | None
    attached: T | None
    effective: Policy
    floor: FloorUse

    def policy_id(self, version_name: str | None = None) -> str:
        """The id stamped on records: the policy's name (``version_name`` if given),
        ``{name}+personal-floor`` when merged, :data:`FLOOR_ID` for the floor alone."""
        if self.policy is None:
            return FLOOR_ID
        name = version_name if version_name is not None else self.policy.name
        return name + FLOOR_SUFFIX if self.floor == "merged" else name


# --- the stricter of two ------------------------------------------------------------------


def stricter_rule(a: FieldRule | None, b: FieldRule | None) -> FieldRule | None:
    """The rule that shows no more than either (None: no rule, i.e. keep)."""
    if a is None or a.action == "keep":
        return b if b is None or b.action != "keep" else None
    if b is None or b.action == "keep":
        return a
    if a.action == "drop" or b.action == "drop":
        return FieldRule("drop")
    if a.action != b.action:
        return FieldRule("drop")  # mask against hash: each shows what the other hides
    if a.action == "hash":
        return a
    if a.action == "coarsen":
        assert a.step is not None and b.step is not None  # FieldRule checks it
        return a if a.step >= b.step else b
    # Two masks.
    if a.keep_last is not None and b.keep_last is not None:
        return FieldRule("mask", keep_last=min(a.keep_last, b.keep_last))
    if a.keep_first is not None and b.keep_first is not None:
        return FieldRule("mask", keep_first=min(a.keep_first, b.keep_first))
    return FieldRule("mask", keep_last=0)


def _merge_locations(a: LocationRules, b: LocationRules) -> LocationRules | None:
    """The stricter location rules; None when no point could be stored at all (the
    allowed areas do not overlap)."""
    import shapely
    from shapely.geometry import mapping

    precision = max((p for p in (a.precision_m, b.precision_m) if p is not None),
                    default=None)
    issues: list[PolicyIssue] = []
    built = [r.built_zones or tuple(build_zones(
        [("location.only_inside", r.only_inside), ("location.never_inside", r.never_inside)],
        issues)) for r in (a, b)]
    if issues:
        raise PolicyError(issues)
    (only_a, never_a), (only_b, never_b) = built
    only_docs: tuple[dict[str, Any], ...]
    if only_a and only_b:
        both = shapely.intersection(shapely.union_all(only_a), shapely.union_all(only_b))
        parts = [g for g in shapely.get_parts(both).tolist()
                 if g.geom_type in ("Polygon", "MultiPolygon") and not g.is_empty]
        if not parts:
            return None
        area = shapely.union_all(parts)
        only_geoms = [area]
        only_docs = (_plain(mapping(area)),)
    else:
        only_geoms = list(only_a or only_b)
        only_docs = a.only_inside or b.only_inside
    return LocationRules(
        precision_m=precision,
        only_inside=only_docs,
        never_inside=a.never_inside + b.never_inside,
        only_while_checked_out=a.only_while_checked_out or b.only_while_checked_out,
        built_zones=(only_geoms, list(never_a) + list(never_b)),
    )


def _plain(value: Any) -> Any:
    """shapely's GeoJSON mapping (tuples) as plain JSON (lists)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def merge_policies(policy: Policy, floor: Policy) -> Policy:
    """``policy`` made at least as strict as ``floor`` in every kind and field (see
    the module doc). Keeps ``policy``'s name and ``applies_to``."""
    collect = {k: policy.collect[k] and floor.collect[k] for k in KINDS}
    fields: dict[str, FieldRule] = {}
    for key in sorted(set(policy.fields) | set(floor.fields)):
        rule = stricter_rule(policy.fields.get(key), floor.fields.get(key))
        if rule is not None:
            fields[key] = rule
    location = LocationRules()
    if collect["location"]:
        merged = _merge_locations(policy.location, floor.location)
        if merged is None:
            collect["location"] = False
        else:
            location = merged
    retention = {"default": min(policy.retention_days["default"],
                                floor.retention_days["default"])}
    for kind in KINDS:
        days = min(policy.retention_for(kind), floor.retention_for(kind))
        if days != retention["default"]:
            retention[kind] = days
    return Policy(name=policy.name, applies_to=policy.applies_to, collect=collect,
                  fields=fields, location=location, retention_days=retention)


# --- which applies ----------------------------------------------------------------------


def resolve_policy(
    candidates: Sequence[tuple[Policy, T]],
    *,
    ownership: str,
    groups: Collection[str],
    floor: Policy = PERSONAL_FLOOR,
) -> Resolution[T]:
    """The policy in force for a device (see the module doc): the most specific
    match, merged with ``floor`` for a personal device unless the match names
    ``ownership: personal``; the floor alone for a personal device nothing matches.
    A corporate device nothing matches also gets the floor (fail closed: every
    tenant has a default policy, so this happens only to a broken tenant)."""
    found = select_policy(candidates, ownership=ownership, groups=groups)
    if found is None:
        return Resolution(None, None, floor, "only" if ownership == "personal" else "none")
    policy, attached = found
    if ownership != "personal":
        return Resolution(policy, attached, policy, "none")
    if policy.applies_to.ownership == "personal":
        return Resolution(policy, attached, policy, "relaxed")
    return Resolution(policy, attached, merge_policies(policy, floor), "merged")
