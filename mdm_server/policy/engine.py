"""The policy engine of one ingest worker.

Policies live in PostgreSQL (storage/policies.py). The engine compiles each
tenant's policies once, picks the one that applies to each device (most specific
wins; a personally owned device gets it merged with the personal-device floor,
unless it names ``ownership: personal``, and the floor alone when nothing
matches: privacy_filters.floor), and reloads a tenant's policies when the API announces a
change with NOTIFY, and every ``refresh_s`` seconds in case a notification was
missed while the database was away. A batch is shaped entirely by the policy
versions current when it started, so every record carries the one version
that shaped it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from mdm_server.config import Config
from mdm_server.storage.policies import NOTIFY_CHANNEL, current_policies
from mdm_server.storage.pool import connect
from privacy_filters import (
    FLOOR_ID,
    PERSONAL_FLOOR,
    CompiledPolicy,
    Policy,
    PolicyError,
    compile_policy,
    parse_policy,
    resolve_policy,
)

__all__ = ["DeviceProfile", "PolicyEngine"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    ownership: str
    groups: tuple[str, ...]


@dataclass(slots=True)
class _Tenant:
    signature: tuple[tuple[str, int], ...]  # (name, version) of each policy in force
    candidates: list[tuple[Policy, CompiledPolicy]]
    floor: CompiledPolicy
    hash_key: bytes
    # A policy merged with the floor, compiled on first use (by the policy's id).
    merged: dict[str, CompiledPolicy]
    by_device: dict[str, CompiledPolicy]


class PolicyEngine:
    def __init__(self, config: Config, *, refresh_s: float = 30.0) -> None:
        self._config = config
        self._refresh_s = refresh_s
        self._tenants: dict[str, _Tenant] = {}
        self._stale: set[str] = set()
        self.changed = asyncio.Event()  # set on every reload (tests wait on it)

    # -- loading --------------------------------------------------------------

    def _compile(self, tenant: str, rows: Sequence[tuple[str, int, object]],
                 signature: tuple[tuple[str, int], ...]) -> _Tenant:
        key = self._config.tenant_hash_key(tenant)
        candidates: list[tuple[Policy, CompiledPolicy]] = []
        for name, version, body in rows:
            try:
                policy = parse_policy(body, name=name)
            except PolicyError as err:
                # Stored policies were validated when written; if the rules have
                # tightened since, fail closed for this one rather than keep all.
                log.error("stored policy %s/%s v%d no longer validates (%d issues); "
                          "the personal-device floor applies instead", tenant, name, version,
                          len(err.issues))
                policy = PERSONAL_FLOOR
            candidates.append(
                (policy, compile_policy(policy, policy_id=name, version=version, hash_key=key)))
        floor = compile_policy(PERSONAL_FLOOR, policy_id=FLOOR_ID, version=1, hash_key=key)
        return _Tenant(signature, candidates, floor, key, {}, {})

    async def load(self, conn: asyncpg.Connection, tenants: set[str]) -> None:
        """Make sure these tenants' policies are loaded and current. A stale
        tenant is recompiled only when its (name, version) list has changed:
        compiling a policy with many zones takes tens of milliseconds."""
        todo = {t for t in tenants if t not in self._tenants} | (self._stale & tenants)
        changed = False
        for tenant in sorted(todo):
            # Which versions are in force first: their bodies (megabytes of zones
            # each) are read only when they changed.
            signature = tuple((p.name, p.version) for p in
                              await current_policies(conn, tenant, bodies=False))
            known = self._tenants.get(tenant)
            if known is None or known.signature != signature:
                rows = [(p.name, p.version, p.body)
                        for p in await current_policies(conn, tenant)]
                signature = tuple((name, version) for name, version, _ in rows)
                # In a thread: a policy with a thousand zones takes tens of
                # milliseconds (GEOS, which releases the GIL, for much of it),
                # and the loop meanwhile goes on reading the broker.
                self._tenants[tenant] = await asyncio.to_thread(
                    self._compile, tenant, rows, signature)
                changed = True
            self._stale.discard(tenant)
        if changed:
            self.changed.set()

    def mark_stale(self, tenant: str | None = None) -> None:
        """Reload this tenant (or all) before the next batch uses it."""
        self._stale |= {tenant} if tenant else set(self._tenants)

    @property
    def stale(self) -> set[str]:
        return self._stale

    # -- choosing -------------------------------------------------------------

    def policy_for(self, tenant: str, device: str, profile: DeviceProfile) -> CompiledPolicy:
        t = self._tenants[tenant]
        chosen = t.by_device.get(device)
        if chosen is None:
            r = resolve_policy(t.candidates, ownership=profile.ownership, groups=profile.groups)
            if r.attached is None:  # nothing matched: the floor alone
                chosen = t.floor
            elif r.floor != "merged":
                chosen = r.attached
            else:
                pid = r.policy_id(r.attached.policy_id)
                chosen = t.merged.get(pid)
                if chosen is None:
                    chosen = t.merged[pid] = compile_policy(
                        r.effective, policy_id=pid, version=r.attached.version,
                        hash_key=t.hash_key)
            t.by_device[device] = chosen
        return chosen

    # -- staying current ------------------------------------------------------

    async def watch(self) -> None:
        """Listen for policy changes; mark tenants stale. Runs until cancelled."""
        backoff = 0.5
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await connect(self._config.database_url)

                def on_notify(_c: object, _pid: int, _channel: str, tenant: str) -> None:
                    self.mark_stale(tenant)

                await conn.add_listener(NOTIFY_CHANNEL, on_notify)
                self.mark_stale()  # anything may have changed while we were away
                backoff = 0.5
                while True:
                    await asyncio.sleep(self._refresh_s)
                    await conn.fetchval("SELECT 1")  # notice a dead connection
                    self.mark_stale()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("policy watch lost the database (%s); retrying",
                            type(exc).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()


def checked_out_view(events: dict[str, list[tuple[int, bool]]]) -> Callable[[str, int], bool]:
    """A device is checked out at time t when its latest event at or before t is a
    check-out. ``events``: per device, (ts_ms, is_check_out) sorted by time."""
    import bisect

    def checked_out(device: str, ts_ms: int) -> bool:
        evs = events.get(device)
        if not evs:
            return False
        i = bisect.bisect_right(evs, (ts_ms, True)) - 1
        return i >= 0 and evs[i][1]

    return checked_out
