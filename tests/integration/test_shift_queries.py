"""The shift report's queries (mdm_server/storage/shifts.py) against a reference
written from the definition, on a real PostgreSQL: random event histories (double
check-outs, stray and double check-ins, events at the same instant, shifts under
way when the range begins, devices still out), every filter, pages of every small
size, and a scan budget small enough that pages come back short or empty.

Whatever the filter and the page size, following ``next`` gives exactly the shifts
the definition gives, in order, each once."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mdm_server.reports.shifts import Shift, ShiftCursor
from mdm_server.storage import shifts as queries
from mdm_server.storage.pool import connect
from mdm_server.storage.sealing import IngestKeys
from tests.support.services import keyring_for

pytestmark = pytest.mark.integration

TENANT = "acme"
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
START, END = NOW - timedelta(days=3), NOW - timedelta(hours=6)
OVERDUE_BEFORE = NOW - timedelta(hours=9)
USERS = ("u-1", "u-2", "u-3")


@dataclass(frozen=True)
class Event:
    device: str
    ts: datetime
    record_id: str
    event: str
    user: str


def _history(rng: random.Random) -> list[Event]:
    out = []
    for d in range(12):
        device = f"dev{d:02d}"
        t = NOW - timedelta(days=5) + timedelta(minutes=rng.randrange(0, 600))
        for n in range(rng.randrange(0, 14)):
            event = rng.choices(("check_out", "check_in"), (3, 2))[0]
            out.append(Event(device, t, f"r{n:02d}", event, rng.choice(USERS)))
            if rng.random() < 0.15:  # another event at the same instant
                out.append(Event(device, t, f"s{n:02d}", rng.choice(("check_out", "check_in")),
                                 rng.choice(USERS)))
            t += timedelta(minutes=rng.randrange(1, 900))
    # Out since before the range; out since after it; out again at its very start.
    out += [Event("early", START - timedelta(days=1), "e1", "check_out", "u-1"),
            Event("late", END + timedelta(minutes=5), "l1", "check_out", "u-2"),
            Event("edge", START - timedelta(hours=2), "x1", "check_out", "u-3"),
            Event("edge", START, "x2", "check_out", "u-3")]
    return out


def _reference(events: list[Event], *, status: str | None, user: str | None,
               device: str | None) -> list[tuple[str, datetime, str, str]]:
    """The definition: a check-out and its device's next event (by time, then record
    id); listed when it began before END and had not ended before START."""
    by_device: dict[str, list[Event]] = {}
    for e in events:
        by_device.setdefault(e.device, []).append(e)
    found = []
    for dev, evs in by_device.items():
        evs.sort(key=lambda e: (e.ts, e.record_id))
        for i, e in enumerate(evs):
            if e.event != "check_out" or e.ts >= END:
                continue
            nxt = evs[i + 1] if i + 1 < len(evs) else None
            if nxt is not None and nxt.ts < START:
                continue
            st = ("closed" if nxt and nxt.event == "check_in" else
                  "no_check_in" if nxt else
                  "overdue" if e.ts <= OVERDUE_BEFORE else "open")
            if (status in (None, st) and user in (None, e.user)
                    and device in (None, dev)):
                found.append((dev, e.ts, e.record_id, st))
    return sorted(found, key=lambda f: (f[1], f[0], f[2]))


async def _store(database: str, events: list[Event]) -> None:
    conn = await connect(database)
    try:
        await conn.execute("INSERT INTO tenants (tenant_id) VALUES ($1)", TENANT)
        devices = sorted({e.device for e in events} | {"idle"})
        await conn.executemany(
            "INSERT INTO devices (tenant_id, device_id, ownership, mqtt_username, "
            "mqtt_password_hash) VALUES ($1, $2, 'corporate', $3, 'x')",
            [(TENANT, d, f"{TENANT}.{d}") for d in devices])
        await conn.executemany(
            "INSERT INTO checkout_events (tenant_id, device_id, ts, record_id, event) "
            "VALUES ($1, $2, $3, $4, $5)",
            [(TENANT, e.device, e.ts, e.record_id, e.event) for e in events])
        # Each event's record, sealed as the ingest seals it (its user id inside).
        from mdm_server.storage.partitions import create_partitions

        keys = IngestKeys(keyring_for(database))
        await keys.ensure(conn, [(TENANT, d) for d in devices])
        await create_partitions(conn, {("checkinout", int(e.ts.timestamp()) // 86400)
                                       for e in events})
        rows = [(TENANT, e.device, "checkinout", e.record_id, int(e.ts.timestamp() * 1000),
                 "default", 1, {"event": e.event, "user_id": e.user})
                for e in sorted(events, key=lambda e: e.device)]
        sealed, _ = keys.seal(rows)
        await conn.executemany(
            "INSERT INTO telemetry (tenant_id, device_id, kind, record_id, ts, policy_id, "
            "policy_version, key_id, sealed) VALUES ($1, $2, $3, $4, timestamptz 'epoch' + "
            "$5 * interval '1 millisecond', $6, $7, $8, $9)", sealed)
    finally:
        await conn.close()


async def _walk(database: str, f: queries.ShiftFilter, limit: int
                ) -> tuple[list[Shift], int]:
    conn = await connect(database)
    try:
        out: list[Shift] = []
        after: ShiftCursor | None = None
        pages = 0
        while True:
            page = await queries.shift_page(conn, keyring_for(database), TENANT, f,
                                            overdue_before=OVERDUE_BEFORE, limit=limit,
                                            after=after)
            pages += 1
            assert len(page.shifts) <= limit
            out += page.shifts
            if page.next is None:
                return out, pages
            assert pages < 10_000
            after = page.next
    finally:
        await conn.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pages_give_exactly_the_shifts_of_the_definition(
        database: str, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    events = _history(rng)
    asyncio.run(_store(database, events))
    # A budget of a few check-outs per request: filtered pages come back short.
    monkeypatch.setattr(queries, "SCAN_MAX", 4)
    short_pages = 0
    filters: list[dict[str, Any]] = [{}, {"device": "dev03"}, {"device": "idle"}]
    filters += [{"status": s} for s in ("closed", "no_check_in", "open", "overdue")]
    filters += [{"user": "u-2"}, {"user": "u-3", "status": "closed"}, {"user": "nobody"}]
    for kw in filters:
        want = _reference(events, status=kw.get("status"), user=kw.get("user"),
                          device=kw.get("device"))
        for limit in (1, 2, 3, 50):
            got, pages = asyncio.run(_walk(database, queries.ShiftFilter(START, END, **kw),
                                           limit))
            assert [(s.device, s.checked_out_at, s.out_record_id, s.status)
                    for s in got] == want, (kw, limit)
            if kw.get("user"):
                assert all(s.user == kw["user"] for s in got)
            short_pages += pages - -(-len(want) // limit) if want else 0
    assert short_pages > 0  # the budget did cut pages short
