"""Compile a policy once; filter batches of records on the hot path.

``compile_policy`` turns the field rules into per-kind lists of small closures and
the zones into two prepared shapely geometries, so :meth:`CompiledPolicy.filter_batch`
looks nothing up in the policy per record and tests a whole batch of locations
against the zones in one vectorised call.

Input records are the ``data`` dicts produced by ``agent_protocol.validate_data``.
They are never mutated: every stored record is a new dict. Nested containers that no
rule touches (``apps`` lists, a ``condition`` without rules) are shared with the
input, so treat both as read-only.

Order of work for a location batch:
  1. points without finite ``lat``/``lon`` are suppressed (fail closed);
  2. zones, tested on the ORIGINAL coordinates: outside the ``only_inside`` union
     (when that list is non-empty) or inside the ``never_inside`` union: suppressed;
  3. ``only_while_checked_out``: ``checked_out(device, ts_ms)`` is called, in input
     order, for each point still kept; without a callable every point is suppressed;
  4. snapping to ``precision_m``; ``accuracy_m`` becomes ``max(accuracy_m,
     precision_m)`` (set to ``precision_m`` when absent);
  5. field rules (after 4, so a rule on ``accuracy_m`` sees the raised value).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from agent_protocol import KINDS
from privacy_filters.actions import DROP, Action, coarsener, hasher, masker
from privacy_filters.errors import PolicyError, PolicyIssue
from privacy_filters.location import ZoneSet, build_zones, snap_arrays
from privacy_filters.policy import FieldRule, Policy

__all__ = ["CheckedOut", "CompiledPolicy", "FilterResult", "compile_policy"]

CheckedOut = Callable[[str, int], bool]
"""``checked_out(device, ts_ms)``: was the device checked out to a user at that time?"""

# (field, action or None for drop)
_Ops = tuple[tuple[str, Action | None], ...]
# Applies a kind's rules, in place, to a fresh copy of a record and returns it.
_Shaper = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class FilterResult:
    """``kept``: input indices stored; ``data[i]``: the stored data of ``kept[i]``;
    ``suppressed``: indices of location points not stored (other kinds: empty)."""

    kept: list[int]
    data: list[dict[str, Any]]
    suppressed: list[int]


def _identity(r: dict[str, Any]) -> dict[str, Any]:
    return r


def _apply(r: dict[str, Any], ops: _Ops) -> None:
    for key, fn in ops:
        if key in r:
            if fn is None:
                del r[key]
            else:
                v = fn(r[key])
                if v is DROP:
                    del r[key]
                else:
                    r[key] = v


def _make_shaper(ops: _Ops, nested: tuple[tuple[str, _Ops], ...]) -> _Shaper:
    if not ops and not nested:
        return _identity
    if not nested:

        def shape(r: dict[str, Any]) -> dict[str, Any]:
            _apply(r, ops)
            return r

        return shape

    def shape_nested(r: dict[str, Any]) -> dict[str, Any]:
        _apply(r, ops)
        for key, sub_ops in nested:
            sub = r.get(key)
            if type(sub) is dict:
                copy = sub.copy()
                _apply(copy, sub_ops)
                r[key] = copy
        return r

    return shape_nested


def _action(rule: FieldRule, hash_key: bytes) -> Action | None:
    if rule.action == "drop":
        return None
    if rule.action == "mask":
        return masker(keep_last=rule.keep_last, keep_first=rule.keep_first)
    if rule.action == "hash":
        return hasher(hash_key)
    if rule.action == "coarsen":
        assert rule.step is not None  # FieldRule checks it
        return coarsener(rule.step)
    raise AssertionError(rule.action)  # "keep" is filtered out by the caller


def _shapers(rules: Mapping[str, FieldRule], hash_key: bytes) -> dict[str, _Shaper]:
    top: dict[str, list[tuple[str, Action | None]]] = {k: [] for k in KINDS}
    nested: dict[str, dict[str, list[tuple[str, Action | None]]]] = {k: {} for k in KINDS}
    for key, rule in rules.items():
        if rule.action == "keep":
            continue
        kind, _, name = key.partition(".")
        outer, dot, inner = name.partition(".")
        op = (inner if dot else outer, _action(rule, hash_key))
        if dot:
            nested[kind].setdefault(outer, []).append(op)
        else:
            top[kind].append(op)
    out: dict[str, _Shaper] = {}
    for kind in KINDS:
        # A rule on the object itself (drop "condition") runs first; then its fields.
        sub = tuple(
            (obj, tuple(ops))
            for obj, ops in nested[kind].items()
            if not any(k == obj and fn is None for k, fn in top[kind])
        )
        out[kind] = _make_shaper(tuple(top[kind]), sub)
    return out


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """A policy version ready for ingest. Build it with :func:`compile_policy`."""

    policy_id: str
    version: int
    policy: Policy
    _collect: frozenset[str] = field(repr=False)
    _shapers: Mapping[str, _Shaper] = field(repr=False)
    _only: ZoneSet | None = field(repr=False)
    _never: ZoneSet | None = field(repr=False)

    def collects(self, kind: str) -> bool:
        """Whether records of ``kind`` are stored at all."""
        return kind in self._collect

    def filter_batch(
        self,
        kind: str,
        devices: Sequence[str],
        ts_ms: Sequence[int],
        datas: Sequence[dict[str, Any]],
        checked_out: CheckedOut | None = None,
    ) -> FilterResult:
        """Shape a batch of validated records of one ``kind`` (see the module doc).

        ``devices[i]`` and ``ts_ms[i]`` (event time, epoch ms) belong to ``datas[i]``;
        they are read only for ``only_while_checked_out``. A kind that is not
        collected gives empty ``kept`` and ``suppressed``.
        """
        shaper = self._shapers.get(kind)
        if shaper is None:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}")
        if kind not in self._collect or not datas:
            return FilterResult([], [], [])
        if kind != "location":
            return FilterResult(list(range(len(datas))), [shaper(d.copy()) for d in datas], [])
        return self._filter_locations(devices, ts_ms, datas, checked_out, shaper)

    def _filter_locations(
        self,
        devices: Sequence[str],
        ts_ms: Sequence[int],
        datas: Sequence[dict[str, Any]],
        checked_out: CheckedOut | None,
        shaper: _Shaper,
    ) -> FilterResult:
        n = len(datas)
        rules = self.policy.location
        lat_list = [d.get("lat") for d in datas]
        lon_list = [d.get("lon") for d in datas]
        if (
            self._only is None
            and self._never is None
            and all(type(v) is float for v in lat_list)
            and all(type(v) is float for v in lon_list)
        ):
            # No zones and validated coordinates (floats): the finiteness test needs
            # no numpy, so a policy without zones or snapping never imports it.
            isfinite = math.isfinite
            lat_f, lon_f = cast(list[float], lat_list), cast(list[float], lon_list)
            kept = [i for i in range(n) if isfinite(lat_f[i]) and isfinite(lon_f[i])]
        else:
            import numpy as np

            try:
                lats = np.array(lat_list, dtype=np.float64)
                lons = np.array(lon_list, dtype=np.float64)
            except (TypeError, ValueError):
                # numpy's message quotes the value: raise one that does not.
                raise ValueError(
                    "location lat/lon must be numbers (validate the data first)") from None
            keep = np.isfinite(lats) & np.isfinite(lons)
            if self._only is not None:
                keep &= self._only.contains(lons, lats)
            if self._never is not None:
                keep &= ~self._never.contains(lons, lats)
            kept = np.flatnonzero(keep).tolist()
        if rules.only_while_checked_out:
            if checked_out is None:
                kept = []
            else:
                kept = [i for i in kept if checked_out(devices[i], ts_ms[i])]
        if len(kept) == n:
            suppressed: list[int] = []
        else:
            kept_set = set(kept)
            suppressed = [i for i in range(n) if i not in kept_set]

        precision = rules.precision_m
        out: list[dict[str, Any]] = []
        if precision is None:
            out = [shaper(datas[i].copy()) for i in kept]
        elif kept:
            import numpy as np

            slat, slon = snap_arrays(np.array([lat_list[i] for i in kept], dtype=np.float64),
                                     np.array([lon_list[i] for i in kept], dtype=np.float64),
                                     precision)
            fprec = float(precision)
            for i, la, lo in zip(kept, slat.tolist(), slon.tolist(), strict=True):
                r = datas[i].copy()
                r["lat"] = la
                r["lon"] = lo
                acc = r.get("accuracy_m")
                if acc is None or acc < fprec:
                    r["accuracy_m"] = fprec
                out.append(shaper(r))
        return FilterResult(kept, out, suppressed)


def compile_policy(
    policy: Policy, *, policy_id: str, version: int, hash_key: bytes
) -> CompiledPolicy:
    """Compile ``policy`` (its zones are built here, unless parse_policy built
    them already while checking them).

    ``hash_key``: the tenant's secret for the ``hash`` action, at least 16 bytes.
    Raises :class:`PolicyError` for invalid zones, ``ValueError`` for a short key.
    """
    if type(hash_key) is not bytes or len(hash_key) < 16:
        raise ValueError("hash_key must be at least 16 bytes")
    loc = policy.location
    if loc.built_zones is not None:
        only, never = loc.built_zones
    else:
        issues: list[PolicyIssue] = []
        only, never = build_zones(
            [("location.only_inside", loc.only_inside),
             ("location.never_inside", loc.never_inside)], issues)
        if issues:
            raise PolicyError(issues)
    return CompiledPolicy(
        policy_id=policy_id,
        version=version,
        policy=policy,
        _collect=frozenset(k for k, on in policy.collect.items() if on),
        _shapers=_shapers(policy.fields, hash_key),
        _only=ZoneSet.of(only),
        _never=ZoneSet.of(never),
    )
