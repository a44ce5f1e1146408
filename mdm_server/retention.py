"""Retention: telemetry older than its policy allows is removed.

Per kind, a day partition that is past the longest retention any policy gives
that kind is dropped whole (cheap, and it returns the space at once). Inside
the partitions that remain, rows whose own policy keeps them for less are
deleted by (tenant, policy, kind), which partition pruning keeps to the old
partitions. A record is kept for what its policy's CURRENT version says: an
admin who shortens retention expects old data to go.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson

from agent_protocol import KINDS
from mdm_server.commands.states import TERMINAL
from mdm_server.policy.offload import policy_work
from mdm_server.storage.policies import DEFAULT_POLICY
from privacy_filters import (
    FLOOR_ID,
    FLOOR_SUFFIX,
    PERSONAL_FLOOR,
    PolicyError,
    merge_policies,
    parse_policy,
)

__all__ = [
    "ACK_DETAIL_DAYS",
    "COMMAND_EVENT_DAYS",
    "DEAD_LETTER_DAYS",
    "RetentionReport",
    "run_retention",
]

log = logging.getLogger(__name__)

DEAD_LETTER_DAYS = 30
# What a device reported about a command in its own words (an ack's free-text
# detail) is cleared after this many days; the notice log keeps the outcome.
ACK_DETAIL_DAYS = 30
# The step-by-step events of a finished command (published, acks, expiry) are
# deleted after this many days; the command itself (the notice log) stays.
COMMAND_EVENT_DAYS = 90
# Records shaped by the floor before it was called that (the strict built-in).
_LEGACY_FLOOR_ID = "builtin:strict-personal"
_PARTITION = re.compile(r"^telemetry_([a-z]+)_(\d{8})$")


@dataclass(slots=True)
class RetentionReport:
    dropped_partitions: list[str] = field(default_factory=list)
    deleted_rows: int = 0
    deleted_dead_letters: int = 0
    cleared_ack_details: int = 0
    deleted_command_events: int = 0


async def _retention_table(conn: asyncpg.Connection) -> dict[tuple[str, str], dict[str, int]]:
    """(tenant, policy id) -> days per kind, for every policy in force."""
    rows = await conn.fetch(
        """SELECT tenant_id, name, body::text AS body_json FROM (
               SELECT DISTINCT ON (tenant_id, name) * FROM policies
               ORDER BY tenant_id, name, version DESC) newest
           WHERE NOT deleted""")
    # Decoding and parsing every tenant's policies (zones and all) takes seconds:
    # off the event loop, which serves the API meanwhile.
    return await policy_work(_table, [(r["tenant_id"], r["name"], r["body_json"])
                                      for r in rows])


def _table(rows: list[tuple[str, str, str]]) -> dict[tuple[str, str], dict[str, int]]:
    table: dict[tuple[str, str], dict[str, int]] = {}
    for tenant, name, body_json in rows:
        try:
            policy = parse_policy(orjson.loads(body_json), name=name)
        except PolicyError:
            policy = PERSONAL_FLOOR  # the engine applies it in that case too
        table[(tenant, name)] = {k: policy.retention_for(k) for k in KINDS}
        # The same policy merged with the personal-device floor (personal devices).
        merged = merge_policies(policy, PERSONAL_FLOOR)
        table[(tenant, name + FLOOR_SUFFIX)] = {
            k: merged.retention_for(k) for k in KINDS}
    for tenant in {t for t, _ in table}:
        for floor_id in (FLOOR_ID, _LEGACY_FLOOR_ID):
            table[(tenant, floor_id)] = {k: PERSONAL_FLOOR.retention_for(k) for k in KINDS}
    return table


async def run_retention(conn: asyncpg.Connection, now: datetime | None = None
                        ) -> RetentionReport:
    now = now or datetime.now(UTC)
    report = RetentionReport()
    table = await _retention_table(conn)
    longest = {k: max((days[k] for days in table.values()),
                      default=PERSONAL_FLOOR.retention_for(k)) for k in KINDS}

    parts = await conn.fetch(
        """SELECT c.relname FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
           WHERE p.relname = ANY($1::text[])""", [f"telemetry_{k}" for k in KINDS])
    for (name,) in sorted(parts):
        m = _PARTITION.match(name)
        if not m or m.group(1) not in KINDS:
            continue
        day_end = datetime.strptime(m.group(2), "%Y%m%d").replace(tzinfo=UTC) + timedelta(1)
        if day_end <= now - timedelta(days=longest[m.group(1)]):
            await conn.execute(f'DROP TABLE IF EXISTS "{name}"')
            report.dropped_partitions.append(name)

    # Rows whose policy keeps them shorter than the longest; rows of a policy
    # since deleted (or from before policies) follow the tenant's default.
    known: dict[str, list[str]] = {}
    for tenant, policy_id in table:
        known.setdefault(tenant, []).append(policy_id)
    for (tenant, policy_id), days in sorted(table.items()):
        for kind in KINDS:
            if days[kind] >= longest[kind]:
                continue
            cutoff = now - timedelta(days=days[kind])
            status = await conn.execute(
                "DELETE FROM telemetry WHERE kind = $1 AND tenant_id = $2 AND ts < $3 "
                "AND policy_id = $4", kind, tenant, cutoff, policy_id)
            report.deleted_rows += int(status.split()[-1])
            if policy_id == DEFAULT_POLICY:
                status = await conn.execute(
                    "DELETE FROM telemetry WHERE kind = $1 AND tenant_id = $2 AND ts < $3 "
                    "AND (policy_id IS NULL OR NOT policy_id = ANY($4::text[]))",
                    kind, tenant, cutoff, known[tenant])
                report.deleted_rows += int(status.split()[-1])

    # Counted per hour (migration 013): an hour's row goes once the hour has passed.
    status = await conn.execute("DELETE FROM dead_letters WHERE hour < $1",
                                now - timedelta(days=DEAD_LETTER_DAYS, hours=1))
    report.deleted_dead_letters = int(status.split()[-1])
    status = await conn.execute(
        "DELETE FROM checkout_events WHERE ts < $1",
        now - timedelta(days=longest["location"] + 1))
    await _command_retention(conn, now, report)
    log.info("retention: dropped %d partitions, deleted %d rows, %d dead letters and %d "
             "command events, cleared %d ack details", len(report.dropped_partitions),
             report.deleted_rows, report.deleted_dead_letters, report.deleted_command_events,
             report.cleared_ack_details)
    return report


async def _command_retention(conn: asyncpg.Connection, now: datetime,
                             report: RetentionReport) -> None:
    """Ack details (a device's free text) cleared after ACK_DETAIL_DAYS; events of
    finished commands deleted after COMMAND_EVENT_DAYS."""
    cutoff = now - timedelta(days=ACK_DETAIL_DAYS)
    status = await conn.execute(
        "UPDATE command_events SET detail = NULL "
        "WHERE event = 'ack' AND detail IS NOT NULL AND at < $1", cutoff)
    report.cleared_ack_details += int(status.split()[-1])
    status = await conn.execute(
        "UPDATE commands SET outcome_detail = NULL "
        "WHERE outcome_detail IS NOT NULL AND coalesce(finished_at, created_at) < $1", cutoff)
    report.cleared_ack_details += int(status.split()[-1])
    status = await conn.execute(
        "DELETE FROM command_events e USING commands c "
        "WHERE c.command_id = e.command_id AND c.state = ANY($2::text[]) AND e.at < $1",
        now - timedelta(days=COMMAND_EVENT_DAYS), sorted(TERMINAL))
    report.deleted_command_events = int(status.split()[-1])
