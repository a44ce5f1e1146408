"""Applying the policies to a batch: pure, no I/O.

Two steps, because one question needs the database in between: :func:`plan`
groups the batch's records by (policy, kind) and says which devices need their
check-out history; the worker fetches it; :func:`apply` runs each group through
its compiled filter in one vectorised call and stamps the policy version on
every row it keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from mdm_server.ingest.batch import DecodedRow, SinkItem
from privacy_filters import CompiledPolicy

__all__ = ["Plan", "ShapeStats", "apply", "plan"]

_DAY_MS = 86_400_000

ChoosePolicy = Callable[[str, str], CompiledPolicy]
CheckedOut = Callable[[str, int], bool]


@dataclass(slots=True)
class Plan:
    policies: dict[int, CompiledPolicy] = field(default_factory=dict)
    groups: dict[tuple[int, str], list[tuple[int, DecodedRow]]] = field(default_factory=dict)
    # Devices whose locations are decided by their check-out state.
    needs_checkouts: set[tuple[str, str]] = field(default_factory=set)
    # This batch's events per device: (ts_ms, is_check_out).
    batch_events: dict[tuple[str, str], list[tuple[int, bool]]] = field(default_factory=dict)


@dataclass(slots=True)
class ShapeStats:
    not_collected: int = 0
    suppressed: int = 0


def plan(items: list[SinkItem], choose: ChoosePolicy) -> Plan:
    p = Plan()
    for idx, item in enumerate(items):
        for row in item.decoded:
            tenant, device, kind = row[0], row[1], row[2]
            pol = choose(tenant, device)
            key = (id(pol), kind)
            p.policies[id(pol)] = pol
            group = p.groups.get(key)
            if group is None:
                group = p.groups[key] = []
            group.append((idx, row))
            if kind == "checkinout":
                event = row[5]["event"]
                item.checkouts.append((tenant, device, row[4], row[3], event))
                p.batch_events.setdefault((tenant, device), []).append(
                    (row[4], event == "check_out"))
                if event == "check_in" and pol.policy.location.only_while_checked_out:
                    item.enforce_checkins.append((tenant, device, row[4]))
            elif kind == "location" and pol.policy.location.only_while_checked_out:
                p.needs_checkouts.add((tenant, device))
    return p


def apply(p: Plan, items: list[SinkItem],
          checked_out: Mapping[str, CheckedOut]) -> ShapeStats:
    """Shape every group; fill each item's ``rows`` and ``suppressed``.
    ``checked_out``: per tenant, the view of its devices' check-out state."""
    stats = ShapeStats()
    for (pid, kind), members in p.groups.items():
        pol = p.policies[pid]
        if not pol.collects(kind):
            stats.not_collected += len(members)
            continue
        tenant = members[0][1][0]  # a compiled policy belongs to one tenant
        result = pol.filter_batch(
            kind,
            [r[1] for _, r in members],
            [r[4] for _, r in members],
            [r[5] for _, r in members],
            checked_out=checked_out.get(tenant),
        )
        policy_id, version = pol.policy_id, pol.version
        for k, data in zip(result.kept, result.data, strict=True):
            idx, r = members[k]
            items[idx].rows.append((r[0], r[1], r[2], r[3], r[4], policy_id, version, data))
        for k in result.suppressed:
            idx, r = members[k]
            items[idx].suppressed.append((r[0], r[1], r[4] // _DAY_MS))
        stats.suppressed += len(result.suppressed)
    for item in items:
        item.decoded = []  # the raw values go no further than this function
    return stats
