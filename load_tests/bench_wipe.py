"""Benchmark: wipe a group of N devices at once (a lost shipment).

    python -m load_tests.bench_wipe [--devices 10000] [--no-results]

A private database, a private broker with the project's configuration (device
identities through the dynamic-security plugin), ``mdm-server serve``, and N
simulated devices each on its own MQTT connection with its own credentials,
running the real agent code (verify the Ed25519 signature, show the notice, ack
each step). One admin request, ``POST /api/v1/groups/{group}/commands`` with a
managed wipe; then, from the database's own timestamps (server clock):

- API call -> every command signed and published (the broker PUBACKed it);
- API call -> every ``completed`` ack recorded.

Written to load_tests/RESULTS.md (newest first). Not a test: nothing here asserts
a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from load_tests.bench_ingest import Db, Monitor, load_line, log, versions, write_results
from load_tests.simulator import Fleet, enroll_fleet
from tests.support import services

TENANT = "shipping"
GROUP = "shipment-42"


def _post(base: str, path: str, token: str, body: object) -> tuple[int, Any]:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST")
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=600) as resp:
        return resp.status, json.loads(resp.read())


async def _provision(db_url: str, path: Path) -> None:
    import base64

    from mdm_server.broker.offline import provision_offline
    from mdm_server.storage.pool import connect

    conn = await connect(db_url)
    try:
        await provision_offline(conn, base64.b64decode(services.TEST_MASTER_KEY), path)
    finally:
        await conn.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["MDM_MASTER_KEY"] = services.TEST_MASTER_KEY
    out: dict[str, Any] = {"devices": args.devices, "versions": versions(),
                           "load_before": load_line()}
    with contextlib.ExitStack() as stack:
        tmp = Path(tempfile.mkdtemp(prefix="mdm-bench-wipe-"))
        db_url = asyncio.run(services.create_database("mdm_bench"))
        stack.callback(lambda: asyncio.run(services.drop_database(db_url)))
        # Bulk import: enroll into the database, write the broker's accounts while it
        # is stopped (live, Mosquitto 2.0 rewrites its whole account file per change:
        # quadratic), then start it. mdm_server/broker/offline.py.
        broker = services.Broker(services.free_port(), tmp / "broker")
        broker.dir.mkdir(parents=True)
        log(f"enrolling {args.devices:,} devices, broker accounts written offline")
        t = time.monotonic()
        enrollments = asyncio.run(enroll_fleet(db_url, f"mqtt://127.0.0.1:{broker.port}",
                                               TENANT, args.devices))
        asyncio.run(_provision(db_url, broker.dir / "dynamic-security.json"))
        out["enroll_s"] = time.monotonic() - t
        broker.start()
        stack.callback(broker.stop)
        db = Db(db_url)
        stack.callback(db.close)
        db.execute(f"UPDATE devices SET groups = '{{{GROUP}}}' WHERE tenant_id = '{TENANT}'")
        server = services.Server(services.server_env(db_url, broker.url), tmp / "serve.log")
        admin = server.cli("admin", "create", "--tenant", TENANT, "--name", "ops").strip()
        server.start()
        stack.callback(server.stop)
        server.wait_log("acks subscribed")
        log(f"connecting {args.devices:,} agents")
        t = time.monotonic()
        fleet = Fleet(enrollments, broker.url, agents=True)
        fleet.connect(timeout=300)
        stack.callback(fleet.close)
        if not fleet.serve_commands(lambda: fleet.agents_subscribed == args.devices,
                                    timeout=300):
            raise RuntimeError(f"only {fleet.agents_subscribed} agents subscribed")
        out["connect_s"] = time.monotonic() - t
        # The server has seen every "online" (nothing to re-send): quiet from here.
        fleet.serve_commands(lambda: False, timeout=3)
        monitor = Monitor(server.proc.pid if server.proc else os.getpid())
        out["load_wipe"] = load_line()
        log("wiping the group")
        t_call = time.monotonic()
        status, batch = _post(server.base, f"/api/v1/groups/{GROUP}/commands", admin,
                              {"type": "wipe", "scope": "managed",
                               "reason": "shipment lost in transit"})
        out["api_response_s"] = time.monotonic() - t_call
        if status != 201 or batch["commands"] != args.devices:
            raise RuntimeError(f"unexpected answer {status}: {batch}")
        batch_id = batch["batch_id"]
        last_check = [0.0]

        def all_completed() -> bool:
            now = time.monotonic()
            if now - last_check[0] < 0.25:
                return False
            last_check[0] = now
            done = db.val(f"SELECT count(*) FROM commands WHERE batch_id = '{batch_id}' "
                          "AND state = 'completed'")
            return int(done) == args.devices

        finished = fleet.serve_commands(all_completed, timeout=args.timeout)
        out["wall_s"] = time.monotonic() - t_call
        monitor.stop()
        out["server_peak_rss_mb"] = monitor.peak_rss / 1e6
        out["server_cpu_s"] = monitor.cpu_s
        if not finished:
            raise RuntimeError("not every wipe completed within the timeout")
        row = db.row(
            f"""SELECT min(c.created_at) AS created,
                       max(e.at) FILTER (WHERE e.event = 'published') AS published,
                       max(e.at) FILTER (WHERE e.event = 'ack' AND e.to_state = 'completed')
                           AS completed,
                       count(*) FILTER (WHERE e.event = 'published') AS n_published,
                       count(*) FILTER (WHERE e.event = 'resent') AS n_resent
                FROM commands c JOIN command_events e USING (command_id)
                WHERE c.batch_id = '{batch_id}'""")
        out["published_s"] = (row["published"] - row["created"]).total_seconds()
        out["completed_s"] = (row["completed"] - row["created"]).total_seconds()
        out["published"] = row["n_published"]
        out["resent"] = row["n_resent"]
        out["agents"] = fleet.agent_stats.summary()
    return out


def render(r: dict[str, Any], started: dt.datetime) -> str:
    n = r["devices"]
    a = r["agents"]
    v = r["versions"]
    return "\n".join([
        f"## {started:%Y-%m-%d %H:%M} UTC — wipe a group of {n:,} devices (bench_wipe)",
        "",
        f"Commit {v.get('git', '?')}; Python {v.get('python', '?')}, Mosquitto "
        f"{v.get('mosquitto', '?')}; 2 shared cores. Load before {r['load_before']}, "
        f"at the wipe {r['load_wipe']}. One `serve` (dispatcher batch 500), one private "
        f"broker with the project's config; {n:,} simulated agents in one process, each on "
        "its own connection and credentials, verifying every signature with the real "
        "agent code. Times from the database's own timestamps (server clock), counted "
        "from the API call's commit.",
        "",
        "| Measure | Value | Per device |",
        "|---|---:|---:|",
        f"| API call answered (one transaction: {n:,} commands, events, one audit entry) "
        f"| {r['api_response_s']:.2f} s | {r['api_response_s'] / n * 1e6:.0f} µs |",
        f"| API call -> all commands signed and published (PUBACKed) "
        f"| {r['published_s']:.2f} s | {r['published_s'] / n * 1e6:.0f} µs |",
        f"| API call -> all `completed` acks recorded | {r['completed_s']:.2f} s "
        f"| {r['completed_s'] / n * 1e6:.0f} µs |",
        f"| server CPU over the wipe (user+sys) | {r['server_cpu_s']:.1f} s "
        f"| {r['server_cpu_s'] / n * 1e6:.0f} µs |",
        f"| server peak RSS | {r['server_peak_rss_mb']:.0f} MB | |",
        f"| enrollment of the fleet (database, broker accounts offline) | {r['enroll_s']:.1f} s "
        f"| {r['enroll_s'] / n * 1e3:.1f} ms |",
        f"| connecting and subscribing the agents | {r['connect_s']:.1f} s | |",
        "",
        f"Agents: {a['executed']:,} wipes executed once each, {a['notices_shown']:,} notices "
        f"shown, {a['duplicates']} duplicates, rejected {a['rejected'] or 'none'}; "
        f"{r['published']:,} publishes, {r['resent']} re-sends.",
        "",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_wipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--no-results", action="store_true", help="print, do not write RESULTS.md")
    args = p.parse_args(argv)
    started = dt.datetime.now(dt.UTC)
    r = run(args)
    section = render(r, started)
    print(section)
    if not args.no_results:
        write_results(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
