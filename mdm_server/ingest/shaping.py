"""Applying the policies to a batch: pure, no I/O.

Two steps, because one question needs the database in between: :func:`plan`
chooses the policy once per topic group (one device and kind) and groups them
by (policy, kind), records the batch's check-out events, and says which devices
need their check-out history; the worker fetches it; :func:`apply` runs each
(policy, kind) through its compiled filter in one vectorised call and stages
every row it keeps with the policy's id and version.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import repeat

from mdm_server.ingest.batch import TopicGroup, WriteSet
from privacy_filters import CompiledPolicy

__all__ = ["Plan", "ShapeStats", "apply", "plan"]

_DAY_MS = 86_400_000

ChoosePolicy = Callable[[str, str], CompiledPolicy]
CheckedOut = Callable[[str, int], bool]


@dataclass(slots=True)
class Plan:
    policies: dict[int, CompiledPolicy] = field(default_factory=dict)
    groups: dict[tuple[int, str], list[TopicGroup]] = field(default_factory=dict)
    # Devices whose locations are decided by their check-out state.
    needs_checkouts: set[tuple[str, str]] = field(default_factory=set)
    # This batch's events per device: (ts_ms, is_check_out).
    batch_events: dict[tuple[str, str], list[tuple[int, bool]]] = field(default_factory=dict)
    # Event times of the locations of the devices in needs_checkouts.
    location_ts_range: tuple[int, int] | None = None


@dataclass(slots=True)
class ShapeStats:
    not_collected: int = 0
    suppressed: int = 0


def plan(groups: list[TopicGroup], choose: ChoosePolicy, out: WriteSet) -> Plan:
    """Choose each group's policy; add the batch's check-out events (stored whatever
    the policy collects) and check-ins to enforce to ``out``."""
    p = Plan()
    lo = hi = None
    for g in groups:
        t = g.topic
        tenant, device, kind = t.tenant, t.device, t.kind
        assert kind is not None  # a telemetry topic: batch.decode_batch checked
        pol = choose(tenant, device)
        key = (id(pol), kind)
        p.policies[id(pol)] = pol
        members = p.groups.get(key)
        if members is None:
            p.groups[key] = [g]
        else:
            members.append(g)
        if kind == "checkinout":
            enforce = pol.policy.location.only_while_checked_out
            events = p.batch_events.setdefault((tenant, device), [])
            for m, rid, ts, data in zip(g.msgs, g.ids, g.ts, g.datas, strict=True):
                event = data["event"]
                out.checkouts.append((m, (tenant, device, ts, rid, event)))
                events.append((ts, event == "check_out"))
                if event == "check_in" and enforce:
                    out.enforce_checkins.append((m, (tenant, device, ts)))
        elif kind == "location" and pol.policy.location.only_while_checked_out:
            p.needs_checkouts.add((tenant, device))
            g_lo, g_hi = min(g.ts), max(g.ts)
            lo = g_lo if lo is None else min(lo, g_lo)
            hi = g_hi if hi is None else max(hi, g_hi)
    if lo is not None and hi is not None:
        p.location_ts_range = (lo, hi)
    if len(groups) > 1 and (out.checkouts or out.enforce_checkins):
        out.checkouts.sort(key=lambda c: c[0])  # message order, as they arrived
        out.enforce_checkins.sort(key=lambda e: e[0])
    return p


def apply(p: Plan, out: WriteSet, checked_out: Mapping[str, CheckedOut]) -> ShapeStats:
    """Shape every (policy, kind); stage the kept rows and the suppressed counts in
    ``out``. ``checked_out``: per tenant, the view of its devices' check-out state."""
    stats = ShapeStats()
    rows, row_msgs = out.rows, out.row_msgs
    for (pid, kind), members in p.groups.items():
        pol = p.policies[pid]
        if not pol.collects(kind):
            stats.not_collected += sum(len(g.ids) for g in members)
            continue
        tenant = members[0].topic.tenant  # a compiled policy belongs to one tenant
        if len(members) == 1:
            g = members[0]
            msgs, ids, ts, datas = g.msgs, g.ids, g.ts, g.datas
            devices = list(repeat(g.topic.device, len(ids)))
        else:
            msgs, ids, ts, datas, devices = [], [], [], [], []
            for g in members:
                msgs += g.msgs
                ids += g.ids
                ts += g.ts
                datas += g.datas
                devices += repeat(g.topic.device, len(g.ids))
        result = pol.filter_batch(kind, devices, ts, datas,
                                  checked_out=checked_out.get(tenant))
        policy_id, version = pol.policy_id, pol.version
        kept, n = result.kept, len(ids)
        if len(kept) == n:
            rows += zip(repeat(tenant, n), devices, repeat(kind, n), ids, ts,
                        repeat(policy_id, n), repeat(version, n), result.data, strict=True)
            row_msgs += msgs
        else:
            for k, data in zip(kept, result.data, strict=True):
                rows.append((tenant, devices[k], kind, ids[k], ts[k], policy_id, version, data))
                row_msgs.append(msgs[k])
        for k in result.suppressed:
            out.suppressed.append((msgs[k], (tenant, devices[k], ts[k] // _DAY_MS)))
        stats.suppressed += len(result.suppressed)
    return stats
