"""Which policy is in force for a device, as the ingest decides it, for the readers:
the user's policy page and export, the admin's device page and policy list.

The ingest's engine (engine.py) and these readers both decide through
``privacy_filters.resolve_policy``, so what a user is told is what shapes their
data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from agent_protocol import KINDS
from mdm_server.policy.offload import policy_work
from mdm_server.storage.policies import PolicyVersion, current_policies
from privacy_filters import (
    FLOOR_ID,
    PERSONAL_FLOOR,
    FloorUse,
    Policy,
    PolicyError,
    parse_policy,
    resolve_policy,
)

__all__ = ["Candidates", "InForce", "device_policy", "in_force", "tenant_candidates"]

log = logging.getLogger(__name__)

#: A tenant's policies in force, each with its (name, version).
Candidates = list[tuple[Policy, tuple[str, int]]]


@dataclass(frozen=True, slots=True)
class InForce:
    """The policy that shapes a device's telemetry now.

    ``policy_id``: the id stamped on the records it shapes (``field``,
    ``field+personal-floor``, ``builtin:personal-floor``); ``name`` and ``version``:
    the matching policy (None and 1 for the floor alone); ``floor``: how the
    personal-device floor takes part; ``effective``: the rules applied."""

    policy_id: str
    name: str | None
    version: int
    floor: FloorUse
    effective: Policy

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy_id, "base": self.name, "version": self.version,
                "floor": self.floor,
                "collects": {k: self.effective.collect[k] for k in KINDS}}


def _parse_candidates(versions: list[PolicyVersion]) -> Candidates:
    out: Candidates = []
    for v in versions:
        try:
            policy = parse_policy(v.body, name=v.name)
        except PolicyError:
            policy = PERSONAL_FLOOR
        out.append((policy, (v.name, v.version)))
    return out


async def tenant_candidates(conn: asyncpg.Connection, tenant: str) -> Candidates:
    """The tenant's policies in force, parsed (one that no longer validates counts
    as the floor, as in the ingest); parsed on the policy threads, never on the
    event loop (a policy with thousands of zones takes seconds)."""
    return await policy_work(_parse_candidates, await current_policies(conn, tenant))


def in_force(candidates: Sequence[tuple[Policy, tuple[str, int]]], *, ownership: str,
             groups: Sequence[str]) -> InForce:
    r = resolve_policy(candidates, ownership=ownership, groups=groups)
    if r.attached is None:
        return InForce(FLOOR_ID, None, 1, "only" if ownership == "personal" else "none",
                       r.effective)
    name, version = r.attached
    return InForce(r.policy_id(name), name, version, r.floor, r.effective)


async def device_policy(conn: asyncpg.Connection, tenant: str, device: str
                        ) -> InForce | None:
    """The policy in force for one device; None if there is no such device."""
    dev = await conn.fetchrow("SELECT ownership, groups FROM devices "
                              "WHERE tenant_id = $1 AND device_id = $2", tenant, device)
    if dev is None:
        return None
    # Off the loop too: merging with the floor may combine zones.
    return await policy_work(in_force, await tenant_candidates(conn, tenant),
                             ownership=dev["ownership"], groups=list(dev["groups"]))
