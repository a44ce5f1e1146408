"""The policy model, its validation, canonical form, built-ins and selection.

A policy is admin configuration (see docs/policies.md): which kinds are collected,
what happens to each field, how locations are shaped, how long each kind is kept,
and which devices it applies to. Every record type validates when built; a policy
document is parsed with :func:`parse_policy`, which reports every problem at once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar, cast, get_args

from agent_protocol import FIELD_TYPES, KINDS, REQUIRED_FIELDS
from privacy_filters.errors import PolicyError, PolicyIssue
from privacy_filters.location import build_zones

__all__ = [
    "ACTIONS",
    "DEFAULT_RETENTION_DAYS",
    "FEW_VALUES",
    "MASK_MAX",
    "OPEN_DEFAULT",
    "OWNERSHIPS",
    "PRECISION_MAX_M",
    "PRECISION_MIN_M",
    "RETENTION_MAX_DAYS",
    "RETENTION_MIN_DAYS",
    "ActionName",
    "AppliesTo",
    "FieldRule",
    "LocationRules",
    "Policy",
    "PolicyError",
    "PolicyIssue",
    "parse_policy",
    "policy_to_doc",
    "policy_warnings",
    "select_policy",
]

ActionName = Literal["keep", "drop", "mask", "hash", "coarsen"]
ACTIONS: Final[tuple[str, ...]] = get_args(ActionName)
OWNERSHIPS: Final = ("corporate", "personal")
MASK_MAX: Final = 64
PRECISION_MIN_M: Final = 1
PRECISION_MAX_M: Final = 100_000
RETENTION_MIN_DAYS: Final = 1
RETENTION_MAX_DAYS: Final = 3650
DEFAULT_RETENTION_DAYS: Final = 90

FEW_VALUES: Final = frozenset({
    "identity.imei", "identity.phone_number", "identity.wifi_mac", "identity.bluetooth_mac",
    "sim.iccid", "sim.imsi", "sim.mcc", "sim.mnc", "network.mcc", "network.mnc", "network.ip",
})
"""Text fields with few possible values: an IMEI is a known 8-digit type code, 6
digits and a check digit; a phone number, ICCID or IMSI a known prefix and a few
digits; a MAC address a vendor prefix and 24 bits; an IPv4 address 32 bits. A
``hash`` of such a value hides it from someone with a copy of the data only:
anyone who can make the server hash chosen values (an admin sending telemetry
from a test device) finds it by trying every candidate. :func:`policy_warnings`
recommends ``mask`` or ``drop`` for them."""

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ID_RULE = "must be 1-64 characters from A-Z a-z 0-9 _ -"
_TOP_KEYS = ("name", "applies_to", "collect", "fields", "location", "retention_days")
_RULE_KEYS = ("action", "keep_last", "keep_first", "step")
_LOCATION_KEYS = ("precision_m", "only_inside", "never_inside", "only_while_checked_out")
_STRING_TYPES = frozenset({"string"})
_NUMBER_TYPES = frozenset({"number", "integer"})


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_int(v: object) -> bool:
    return type(v) is int


def _is_number(v: object) -> bool:
    return type(v) is int or (type(v) is float and math.isfinite(v))


def _keys(allowed: Sequence[str]) -> str:
    return ", ".join(allowed)


# --- records ----------------------------------------------------------------------------


def _rule_issues(
    action: object, keep_last: object, keep_first: object, step: object, prefix: str
) -> list[PolicyIssue]:
    issues: list[PolicyIssue] = []
    if action not in ACTIONS:
        issues.append(PolicyIssue(_join(prefix, "action"), f"must be one of {_keys(ACTIONS)}"))
    for name, n in (("keep_last", keep_last), ("keep_first", keep_first)):
        if n is None:
            continue
        if action != "mask":
            issues.append(PolicyIssue(_join(prefix, name), "only applies to action mask"))
        elif not _is_int(n) or not 0 <= n <= MASK_MAX:  # type: ignore[operator]
            issues.append(PolicyIssue(_join(prefix, name), f"must be an integer in 0..{MASK_MAX}"))
    if action == "mask" and (keep_last is None) == (keep_first is None):
        issues.append(PolicyIssue(prefix, "mask needs exactly one of keep_last and keep_first"))
    if step is not None and action != "coarsen":
        issues.append(PolicyIssue(_join(prefix, "step"), "only applies to action coarsen"))
    if action == "coarsen" and (step is None or not _is_number(step) or step <= 0):  # type: ignore[operator]
        issues.append(PolicyIssue(_join(prefix, "step"), "coarsen needs a number step > 0"))
    return issues


@dataclass(frozen=True, slots=True)
class FieldRule:
    """What happens to one field (see :mod:`privacy_filters.actions`)."""

    action: ActionName
    keep_last: int | None = None
    keep_first: int | None = None
    step: float | None = None

    def __post_init__(self) -> None:
        issues = _rule_issues(self.action, self.keep_last, self.keep_first, self.step, "")
        if issues:
            raise PolicyError(issues)

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"action": self.action}
        for name in ("keep_last", "keep_first", "step"):
            value = getattr(self, name)
            if value is not None:
                doc[name] = value
        return doc


def _applies_issues(ownership: object, groups: object, prefix: str) -> list[PolicyIssue]:
    issues: list[PolicyIssue] = []
    if ownership is not None and ownership not in OWNERSHIPS:
        issues.append(
            PolicyIssue(_join(prefix, "ownership"), f"must be one of {_keys(OWNERSHIPS)}")
        )
    if not isinstance(groups, tuple | list):
        issues.append(PolicyIssue(_join(prefix, "groups"), "must be a list of group ids"))
        return issues
    for i, g in enumerate(groups):
        if type(g) is not str or _ID.fullmatch(g) is None:
            issues.append(PolicyIssue(f"{_join(prefix, 'groups')}[{i}]", f"group id {_ID_RULE}"))
    return issues


@dataclass(frozen=True, slots=True)
class AppliesTo:
    """Which devices a policy applies to. No constraint set: the tenant default.

    ``groups`` is kept sorted and without duplicates; a device matches when it is in
    at least one of them.
    """

    ownership: str | None = None
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        issues = _applies_issues(self.ownership, self.groups, "")
        if issues:
            raise PolicyError(issues)
        object.__setattr__(self, "groups", tuple(sorted(set(self.groups))))

    @property
    def is_default(self) -> bool:
        return self.ownership is None and not self.groups

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.ownership is not None:
            doc["ownership"] = self.ownership
        if self.groups:
            doc["groups"] = list(self.groups)
        return doc


def _json_copy(value: Any) -> Any:
    """A deep copy of a JSON value (dicts, lists, scalars); lists of numbers, the
    bulk of a zone, are copied flat. Many times faster than copy.deepcopy on
    thousands of positions."""
    if type(value) is dict:
        return {k: _json_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if all(type(v) in (int, float) for v in value):
            return list(value)
        return [_json_copy(v) for v in value]
    return value


def _location_issues(
    precision_m: object, only: object, never: object, checked_out: object, prefix: str
) -> list[PolicyIssue]:
    issues: list[PolicyIssue] = []
    if precision_m is not None and (
        not _is_number(precision_m) or not PRECISION_MIN_M <= precision_m <= PRECISION_MAX_M  # type: ignore[operator]
    ):
        issues.append(
            PolicyIssue(
                _join(prefix, "precision_m"),
                f"must be a number of metres in {PRECISION_MIN_M}..{PRECISION_MAX_M}",
            )
        )
    for name, zones in (("only_inside", only), ("never_inside", never)):
        if not isinstance(zones, tuple | list):
            issues.append(PolicyIssue(_join(prefix, name), "must be a list of GeoJSON zones"))
    if type(checked_out) is not bool:
        issues.append(PolicyIssue(_join(prefix, "only_while_checked_out"), "must be a boolean"))
    return issues


@dataclass(frozen=True, slots=True)
class LocationRules:
    """How locations are shaped and which are not stored at all.

    Zones are GeoJSON objects (checked by :func:`parse_policy` and again by
    ``compile_policy``); an empty ``only_inside`` means no restriction.
    """

    precision_m: float | None = None
    only_inside: tuple[dict[str, Any], ...] = ()
    never_inside: tuple[dict[str, Any], ...] = ()
    only_while_checked_out: bool = False
    # The zones' geometries as parse_policy built them while checking (only
    # inside, never inside), so compile_policy need not build them again; None
    # for rules made otherwise. Not part of the rules' identity. Rules made with
    # other zones (dataclasses.replace included) must leave it None.
    built_zones: tuple[list[Any], list[Any]] | None = field(
        default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        issues = _location_issues(
            self.precision_m,
            self.only_inside,
            self.never_inside,
            self.only_while_checked_out,
            "",
        )
        if issues:
            raise PolicyError(issues)
        object.__setattr__(self, "only_inside", tuple(self.only_inside))
        object.__setattr__(self, "never_inside", tuple(self.never_inside))

    def to_doc(self) -> dict[str, Any]:
        return {
            "precision_m": self.precision_m,
            "only_inside": _json_copy(self.only_inside),
            "never_inside": _json_copy(self.never_inside),
            "only_while_checked_out": self.only_while_checked_out,
        }


def field_rule_issues(key: str, rule: FieldRule, path: str) -> list[PolicyIssue]:
    """Problems of ``rule`` applied to ``key`` (``"kind.field"``), e.g. type mismatches."""
    kind, _, name = key.partition(".")
    if kind not in KINDS:
        return [PolicyIssue(path, f"unknown kind (kinds: {_keys(KINDS)})")]
    types = FIELD_TYPES[kind]
    if name not in types:
        return [PolicyIssue(path, f"unknown field of kind {kind} (fields: {_keys(tuple(types))})")]
    if kind == "location" and name in ("lat", "lon"):
        return [PolicyIssue(path, "no field rules on location.lat/lon: use location.precision_m")]
    action = rule.action
    if action == "keep":
        return []
    if name in REQUIRED_FIELDS.get(kind, ()):
        return [PolicyIssue(path, f"{key} is required by its kind: only keep applies")]
    ftype = types[name]
    if action in ("mask", "hash") and ftype not in _STRING_TYPES:
        hint = (
            "it takes one of a few fixed values: use keep or drop"
            if ftype == "enum"
            else "use coarsen, keep or drop"
            if ftype in _NUMBER_TYPES
            else "use keep or drop"
        )
        return [PolicyIssue(_join(path, "action"), f"{action} applies to text fields only; {hint}")]
    if action == "coarsen" and ftype not in _NUMBER_TYPES:
        return [PolicyIssue(_join(path, "action"), "coarsen applies to numeric fields only")]
    return []


def _field_path(key: str) -> str:
    return f'fields["{key}"]'


@dataclass(frozen=True, slots=True)
class Policy:
    """One collection and masking policy (one version of it).

    Normalised when built: ``collect`` holds every kind (missing ones ``True``),
    ``retention_days`` always holds ``"default"`` (90 unless given); both, and
    ``fields``, become read-only mappings. Zones are not checked here (only their
    container types); :func:`parse_policy` and ``compile_policy`` check them.
    """

    name: str
    applies_to: AppliesTo = field(default_factory=AppliesTo)
    collect: Mapping[str, bool] = field(default_factory=dict)
    fields: Mapping[str, FieldRule] = field(default_factory=dict)
    location: LocationRules = field(default_factory=LocationRules)
    retention_days: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        issues = _policy_issues(self.name, self.collect, self.fields, self.retention_days)
        if not isinstance(self.applies_to, AppliesTo):
            issues.append(PolicyIssue("applies_to", "must be an AppliesTo"))
        if not isinstance(self.location, LocationRules):
            issues.append(PolicyIssue("location", "must be a LocationRules"))
        if issues:
            raise PolicyError(issues)
        collect = {kind: bool(self.collect.get(kind, True)) for kind in KINDS}
        retention = {"default": DEFAULT_RETENTION_DAYS, **self.retention_days}
        fields = dict(sorted(self.fields.items()))
        object.__setattr__(self, "collect", MappingProxyType(collect))
        object.__setattr__(self, "retention_days", MappingProxyType(retention))
        object.__setattr__(self, "fields", MappingProxyType(fields))

    def retention_for(self, kind: str) -> int:
        """Days records of ``kind`` are kept (the kind's own value, else ``default``)."""
        days = self.retention_days.get(kind)
        return days if days is not None else self.retention_days["default"]


def _policy_issues(
    name: object,
    collect: Mapping[str, object],
    fields: Mapping[str, FieldRule],
    retention: Mapping[str, object],
) -> list[PolicyIssue]:
    issues: list[PolicyIssue] = []
    if type(name) is not str or _ID.fullmatch(name) is None:
        issues.append(PolicyIssue("name", f"policy name {_ID_RULE}"))
    for kind, value in collect.items():
        if kind not in KINDS:
            issues.append(PolicyIssue(f"collect.{kind}", f"unknown kind (kinds: {_keys(KINDS)})"))
        elif type(value) is not bool:
            issues.append(PolicyIssue(f"collect.{kind}", "must be true or false"))
    for key, rule in fields.items():
        path = _field_path(key)
        if not isinstance(rule, FieldRule):
            issues.append(PolicyIssue(path, "must be a FieldRule"))
        else:
            issues.extend(field_rule_issues(key, rule, path))
    for key, days in retention.items():
        path = f"retention_days.{key}"
        if key != "default" and key not in KINDS:
            issues.append(PolicyIssue(path, f"unknown kind (kinds: {_keys(KINDS)}, or default)"))
        elif not _is_int(days) or not RETENTION_MIN_DAYS <= days <= RETENTION_MAX_DAYS:  # type: ignore[operator]
            issues.append(
                PolicyIssue(
                    path, f"must be an integer in {RETENTION_MIN_DAYS}..{RETENTION_MAX_DAYS} (days)"
                )
            )
    return issues


# --- parsing ----------------------------------------------------------------------------


def _object(value: object, path: str, issues: list[PolicyIssue]) -> dict[str, Any]:
    """``value`` as a JSON object (absent/null: empty); a wrong type is an issue."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(type(k) is str for k in value):
        issues.append(PolicyIssue(path, "must be an object"))
        return {}
    return value


def _unknown_keys(
    obj: Mapping[str, Any], allowed: Sequence[str], prefix: str, issues: list[PolicyIssue]
) -> None:
    for key in obj:
        if key not in allowed:
            message = f"unknown key (allowed: {_keys(allowed)})"
            issues.append(PolicyIssue(_join(prefix, key), message))


def _parse_fields(doc: dict[str, Any], issues: list[PolicyIssue]) -> dict[str, FieldRule]:
    rules: dict[str, FieldRule] = {}
    for key, rule_doc in _object(doc.get("fields"), "fields", issues).items():
        path = _field_path(key)
        if not isinstance(rule_doc, dict):
            issues.append(PolicyIssue(path, 'must be an object like {"action": "drop"}'))
            continue
        _unknown_keys(rule_doc, _RULE_KEYS, path, issues)
        action, keep_last, keep_first, step = (rule_doc.get(k) for k in _RULE_KEYS)
        found = _rule_issues(action, keep_last, keep_first, step, path)
        if found:
            issues.extend(found)
            kind, _, name = key.partition(".")
            if kind not in KINDS or name not in FIELD_TYPES[kind]:
                issues.extend(field_rule_issues(key, FieldRule("keep"), path))
            continue
        rule = FieldRule(cast(ActionName, action), keep_last, keep_first, step)
        issues.extend(field_rule_issues(key, rule, path))
        rules[key] = rule
    return rules


def _parse_location(doc: dict[str, Any], issues: list[PolicyIssue]) -> LocationRules:
    loc = _object(doc.get("location"), "location", issues)
    _unknown_keys(loc, _LOCATION_KEYS, "location", issues)
    precision = loc.get("precision_m")
    only = loc.get("only_inside")
    only = [] if only is None else only
    never = loc.get("never_inside")
    never = [] if never is None else never
    checked_out = loc.get("only_while_checked_out", False)
    found = _location_issues(precision, only, never, checked_out, "location")
    issues.extend(found)
    zone_lists: list[tuple[str, Sequence[object]]] = []
    for name, zones in (("only_inside", only), ("never_inside", never)):
        if isinstance(zones, list):
            zone_lists.append((f"location.{name}", zones))
    built = build_zones(zone_lists, issues)
    if found:
        return LocationRules()
    return LocationRules(
        precision_m=precision,
        only_inside=tuple(_json_copy(only)),
        never_inside=tuple(_json_copy(never)),
        only_while_checked_out=checked_out,
        built_zones=(built[0], built[1]) if len(built) == 2 else None,
    )


def parse_policy(doc: object, *, name: str | None = None) -> Policy:
    """Validate a policy document (the JSON shape of docs/policies.md) into a Policy.

    ``name`` is the policy's name when the document does not carry it (the API
    takes it from the URL); when both are given they must be equal. Raises
    :class:`PolicyError` listing every problem found.
    """
    issues: list[PolicyIssue] = []
    if not isinstance(doc, dict):
        raise PolicyError([PolicyIssue("", "a policy must be a JSON object")])
    _unknown_keys(doc, _TOP_KEYS, "", issues)

    doc_name = doc.get("name")
    if doc_name is not None and name is not None and doc_name != name:
        issues.append(PolicyIssue("name", f"does not match the policy name {name!r} of the URL"))
    final_name = name if name is not None else doc_name
    if final_name is None:
        issues.append(PolicyIssue("name", "is required"))

    applies = _object(doc.get("applies_to"), "applies_to", issues)
    _unknown_keys(applies, ("ownership", "groups"), "applies_to", issues)
    ownership = applies.get("ownership")
    groups = applies.get("groups")
    groups = [] if groups is None else groups
    found = _applies_issues(ownership, groups, "applies_to")
    issues.extend(found)
    applies_to = AppliesTo() if found else AppliesTo(ownership, tuple(groups))

    collect = _object(doc.get("collect"), "collect", issues)
    fields = _parse_fields(doc, issues)
    location = _parse_location(doc, issues)
    retention = _object(doc.get("retention_days"), "retention_days", issues)

    policy_issues = _policy_issues(
        final_name if final_name is not None else "x", collect, {}, retention
    )
    issues.extend(i for i in policy_issues if final_name is not None or i.path != "name")
    if issues:
        raise PolicyError(issues)
    return Policy(
        name=cast(str, final_name),
        applies_to=applies_to,
        collect=collect,
        fields=fields,
        location=location,
        retention_days=retention,
    )


def policy_to_doc(policy: Policy) -> dict[str, Any]:
    """The canonical JSON-able form: ``parse_policy(policy_to_doc(p)) == p``."""
    return {
        "name": policy.name,
        "applies_to": policy.applies_to.to_doc(),
        "collect": dict(policy.collect),
        "fields": {key: rule.to_doc() for key, rule in policy.fields.items()},
        "location": policy.location.to_doc(),
        "retention_days": dict(policy.retention_days),
    }


def policy_warnings(policy: Policy) -> list[PolicyIssue]:
    """Valid but weak choices, each with its path and advice: today, ``hash`` on a
    field with few possible values (:data:`FEW_VALUES`)."""
    return [
        PolicyIssue(_field_path(key),
                    "hash of a value with few possible values: anyone who can make the "
                    "server hash values (e.g. by sending telemetry from a test device) can "
                    "find it by trying every candidate; use mask (e.g. keep_last 4) or drop")
        for key, rule in policy.fields.items()
        if rule.action == "hash" and key in FEW_VALUES
    ]


# --- built-ins --------------------------------------------------------------------------

OPEN_DEFAULT: Final = parse_policy({"name": "default", "applies_to": {}})
"""The tenant default created with every tenant: collect and keep everything, 90 days."""


# --- selection --------------------------------------------------------------------------

T = TypeVar("T")


def select_policy(
    candidates: Sequence[tuple[Policy, T]],
    *,
    ownership: str,
    groups: Collection[str],
) -> tuple[Policy, T] | None:
    """The policy that matches a device best, with the value attached to it; None
    when none matches.

    A policy matches when every constraint it sets matches: ``ownership`` equal, and
    the device in at least one of its ``groups``. The most specific match wins:
    groups and ownership > groups > ownership > default (``applies_to`` empty); ties
    go to the alphabetically first name (then the first candidate). For a personal
    device the match is merged with the personal-device floor
    (:func:`privacy_filters.floor.resolve_policy`).
    """
    member = groups if isinstance(groups, set | frozenset) else frozenset(groups)
    best: tuple[int, str] | None = None
    chosen: tuple[Policy, T] | None = None
    for policy, attached in candidates:
        a = policy.applies_to
        if a.ownership is not None and a.ownership != ownership:
            continue
        if a.groups and member.isdisjoint(a.groups):
            continue
        key = (-(2 * bool(a.groups) + (a.ownership is not None)), policy.name)
        if best is None or key < best:
            best, chosen = key, (policy, attached)
    return chosen
