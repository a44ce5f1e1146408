"""Benchmark: the shift report on a large fleet.

    python -m load_tests.bench_shifts [--devices 5000] [--days 31] [--no-results]

A private database and broker and ``mdm-server serve`` (as scripts/test provides
them: MDM_PG_ADMIN_URL, MDM_BROKER_SCRIPT). The fleet's check-ins and check-outs are
written straight into the database as the ingest stores them (a ``checkout_events``
row and a sealed ``checkinout`` record under the device's data key, per event), so
that a month of a large fleet takes a minute rather than an hour of MQTT: every
device out at 07:00 and back at 15:00 each day, one device in ten never checked in
yesterday (overdue). Then requests of ``GET /api/v1/reports/shifts`` as an admin
(each writes its access-log entries, one per listed device), timed at the client,
the median of three.

Written to load_tests/RESULTS.md (newest first). Not a test: nothing here asserts
a time.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

from load_tests.bench_ingest import load_line, log, versions, write_results
from tests.support import services

TENANT = "fleet"


async def _fill(db_url: str, devices: int, days: int, now: datetime) -> int:
    from mdm_server.ingest.sink import create_partitions
    from mdm_server.storage.pool import connect
    from mdm_server.storage.sealing import IngestKeys

    conn = await connect(db_url)
    try:
        await conn.execute("INSERT INTO tenants (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING",
                           TENANT)
        ids = [f"d{i:05d}" for i in range(devices)]
        await conn.executemany(
            "INSERT INTO devices (tenant_id, device_id, ownership, mqtt_username, "
            "mqtt_password_hash) VALUES ($1, $2, 'corporate', $3, 'x')",
            [(TENANT, d, f"{TENANT}.{d}") for d in ids])
        keys = IngestKeys(services.keyring_for(db_url))
        await keys.ensure(conn, [(TENANT, d) for d in ids])
        today = now.replace(hour=0, minute=0, second=0, microsecond=0)
        await create_partitions(conn, {("checkinout", int((today - timedelta(days=d))
                                                          .timestamp()) // 86400)
                                       for d in range(days + 1)})
        total = 0
        for day in range(1, days + 1):
            base = today - timedelta(days=day)
            events, rows = [], []
            for i, d in enumerate(ids):
                out = base + timedelta(hours=7, minutes=i % 60)
                pairs = [("check_out", out, {"battery_pct": 95, "case": "ok"})]
                if not (day == 1 and i % 10 == 0):
                    pairs.append(("check_in", base + timedelta(hours=15),
                                  {"battery_pct": 40, "case": "ok" if i % 7 else "damaged"}))
                for event, ts, cond in pairs:
                    rid = f"{event}-{day}"
                    events.append((TENANT, d, ts, rid, event, ts))
                    rows.append((TENANT, d, "checkinout", rid, int(ts.timestamp() * 1000),
                                 "default", 1, {"event": event, "user_id": f"u-{i}",
                                                "shift_id": f"s-{day}", "condition": cond}))
            sealed, _ = keys.seal(rows)
            await conn.copy_records_to_table(
                "checkout_events", records=events,
                columns=["tenant_id", "device_id", "ts", "record_id", "event", "received_at"])
            await conn.copy_records_to_table(
                "telemetry", columns=["tenant_id", "device_id", "kind", "record_id", "ts",
                                      "received_at", "policy_id", "policy_version", "key_id",
                                      "sealed"],
                records=[(t, d, k, r, datetime.fromtimestamp(ms / 1000, UTC),
                          datetime.fromtimestamp(ms / 1000, UTC), p, v, kid, s)
                         for t, d, k, r, ms, p, v, kid, s in sealed])
            total += len(events)
        await conn.execute("VACUUM ANALYZE checkout_events")
        await conn.execute("ANALYZE telemetry")
        return total
    finally:
        await conn.close()


def _get(base: str, token: str, query: dict[str, object], accept: str | None = None
         ) -> tuple[float, int, bytes, dict[str, str]]:
    req = urllib.request.Request(f"{base}/api/v1/reports/shifts?{urlencode(query)}")
    req.add_header("Authorization", f"Bearer {token}")
    if accept:
        req.add_header("Accept", accept)
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        body = resp.read()
        took = time.perf_counter() - t0
        return took, resp.status, body, dict(resp.headers)


def _run(devices: int, days: int) -> str:
    import json

    now = datetime.now(UTC)
    tmp = Path(tempfile.mkdtemp(prefix="bench-shifts-"))
    db = asyncio.run(services.create_database("bench_shifts"))
    try:
        with services.running_broker(tmp) as broker:
            srv = services.Server(services.server_env(db, broker.url,
                                                      MDM_API_RATE_PER_S="100000",
                                                      MDM_API_BURST="100000"),
                                  tmp / "serve.log")
            t0 = time.perf_counter()
            events = asyncio.run(_fill(db, devices, days, now))
            log(f"{events:,} events of {devices:,} devices over {days} days stored in "
                f"{time.perf_counter() - t0:.0f} s")
            token = srv.cli("admin", "create", "--tenant", TENANT, "--name", "bench").strip()
            srv.start()
            load = load_line()
            try:
                start7 = (now - timedelta(days=7)).isoformat()
                start31 = (now - timedelta(days=days)).isoformat()
                cases: list[tuple[str, dict[str, object], str | None]] = [
                    ("first page, 7 days, 100 shifts + overdue list", {"from": start7}, None),
                    ("first page, 31 days, 500 shifts + overdue list",
                     {"from": start31, "limit": 500}, None),
                    ("CSV, 31 days, 5,000 shifts", {"from": start31}, "text/csv"),
                    ("status=no_check_in, 31 days (scan budget)",
                     {"from": start31, "status": "no_check_in"}, None),
                    ("status=overdue, 31 days", {"from": start31, "status": "overdue",
                                                 "limit": 500}, None),
                    ("user=u-4242, 7 days (records opened to compare)",
                     {"from": start7, "user": "u-4242"}, None),
                ]
                lines = []
                cold, *_ = _get(srv.base, token, {"from": start7, "limit": 1})
                for label, query, accept in cases:
                    times, rows, listed = [], 0, 0
                    for _ in range(3):
                        took, status, body, _headers = _get(srv.base, token, query, accept)
                        assert status == 200
                        times.append(took)
                        if accept:
                            table = list(csv.reader(io.StringIO(body.decode(), newline="")))
                            rows = len(table) - 1
                            listed = len({r[0] for r in table[1:]})
                        else:
                            doc = json.loads(body)
                            rows = len(doc["shifts"])
                            listed = len({s["device"] for s in doc["shifts"]} |
                                         {s["device"] for s in doc["overdue"] or ()})
                    lines.append(f"| {label} | {statistics.median(times) * 1000:,.0f} ms | "
                                 f"{rows:,} | {listed:,} |")
                    log(lines[-1])
                reads = int(asyncio.run(services.fetchval(  # type: ignore[arg-type]
                    db, "SELECT count(*) FROM audit_log WHERE action = 'personal_data.read'")))
            finally:
                srv.stop()
    finally:
        asyncio.run(services.drop_database(db))
    v = versions()
    return (f"## {now:%Y-%m-%d %H:%M} UTC — shift report\n\n"
            f"Commit {v.get('git', '?')}; Python {v['python']}; 2 cores, shared. "
            f"Load (1/5/15 min) when the requests began: {load}.\n\n"
            f"`python -m load_tests.bench_shifts --devices {devices} --days {days}`: "
            f"{events:,} check-ins/outs (each a `checkout_events` row and a sealed record), "
            f"{devices:,} devices, one in ten overdue. Each request through `serve` as an "
            "admin, timed at the client, median of 3; it opens each listed shift's records "
            "and appends one `personal_data.read` per listed device before it answers. "
            f"The first request (computing the default limit's 30-day basis, then cached): "
            f"{cold * 1000:,.0f} ms. Access-log entries written in all: {reads:,}.\n\n"
            "| Request | Time | Shifts | Devices logged |\n|---|---:|---:|---:|\n"
            + "\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m load_tests.bench_shifts")
    p.add_argument("--devices", type=int, default=5000)
    p.add_argument("--days", type=int, default=31)
    p.add_argument("--no-results", action="store_true", help="print, do not write RESULTS.md")
    args = p.parse_args(argv)
    section = _run(args.devices, args.days)
    print(section)
    if not args.no_results:
        write_results(section)


if __name__ == "__main__":
    main()
