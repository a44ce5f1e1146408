"""What ``scripts/run`` does besides the server and the simulator: it sets the demo
tenant up through the admin API the way an admin would, sends a few commands to
the simulated agents, and at the end puts the server's own totals next to what the
simulator sent.

    python -m load_tests.demo setup    --api URL --token T
    python -m load_tests.demo commands --api URL --token T --device D
    python -m load_tests.demo totals   --tenant demo --stats FILE   (MDM_DATABASE_URL)

``setup`` puts two policies (a group policy for the field staff's corporate phones,
and a policy that names personal devices: the only kind that may relax the
personal-device floor) and prints, as JSON, a personal and a corporate device of the
fleet. ``commands`` waits until the device has reported, then asks for a lock and a
locate, each with the notice its user is shown, and prints how each ended.
``totals`` reads the database as the server's role: for every device and kind, the
records the server stored, the location points its policy suppressed, and the
records of kinds its policy does not collect, against what the simulator says it
sent; exit status 1 when they differ.

Only the standard library and the server's own modules: no HTTP client package.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from typing import Any

FIELD_POLICY: dict[str, Any] = {
    "applies_to": {"groups": ["field"], "ownership": "corporate"},
    "fields": {"identity.imei": {"action": "mask", "keep_last": 4},
               "identity.user_email": {"action": "drop"},
               "network.ip": {"action": "drop"}},
    "location": {"precision_m": 50},
    "retention_days": {"location": 30, "default": 90},
}
PERSONAL_POLICY: dict[str, Any] = {
    "applies_to": {"ownership": "personal"},
    "collect": {"location": True, "identity": True, "sim": True, "network": True,
                "apps": False, "checkinout": True},
    "fields": {"identity.imei": {"action": "mask", "keep_last": 4},
               "identity.phone_number": {"action": "mask", "keep_last": 4},
               "identity.serial": {"action": "drop"},
               "identity.wifi_mac": {"action": "drop"},
               "identity.bluetooth_mac": {"action": "drop"},
               "identity.user_email": {"action": "drop"},
               "identity.user_name": {"action": "drop"},
               "identity.first_name": {"action": "drop"},
               "identity.last_name": {"action": "drop"},
               "sim.iccid": {"action": "drop"},
               "sim.imsi": {"action": "drop"},
               "network.ip": {"action": "drop"}},
    "location": {"precision_m": 1000, "only_while_checked_out": True},
    "retention_days": {"location": 7, "default": 30},
}
POLICIES = {"field-staff": FIELD_POLICY, "personal-devices": PERSONAL_POLICY}
NOTICES = {
    "lock": "Your company locked this phone for a moment, as a test of the demo.",
    "locate": "Your company asked where this phone is, once, as a test of the demo.",
}


class DemoError(Exception):
    pass


def _call(api: str, token: str, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(api.rstrip("/") + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        raise DemoError(f"{method} {path}: {e.code} {e.read()[:300].decode(errors='replace')}"
                        ) from None
    except urllib.error.URLError as e:
        raise DemoError(f"{method} {path}: {e.reason}") from None


def setup(api: str, token: str) -> dict[str, str]:
    for name, body in POLICIES.items():
        _call(api, token, "PUT", f"/api/v1/policies/{name}", body)
    devices = _call(api, token, "GET", "/api/v1/devices?limit=500")["devices"]
    personal = sorted(d["device"] for d in devices if d["ownership"] == "personal")
    corporate = sorted(d["device"] for d in devices if d["ownership"] == "corporate")
    if not personal or not corporate:
        raise DemoError("the fleet needs a personal and a corporate device")
    return {"personal": personal[0], "corporate": corporate[0]}


def commands(api: str, token: str, device: str, timeout: float = 60.0) -> dict[str, str]:
    """Wait for the device to report (its agent is then connected), ask for a lock and
    a locate, and wait until each has ended; returns type -> final state."""
    deadline = time.monotonic() + timeout
    while True:
        seen = _call(api, token, "GET", "/api/v1/devices?limit=500")["devices"]
        if any(d["device"] == device and d["last_seen_at"] for d in seen):
            break
        if time.monotonic() > deadline:
            raise DemoError(f"{device} did not report within {timeout:.0f} s")
        time.sleep(0.5)
    made = {}
    for kind, text in NOTICES.items():
        cmd = _call(api, token, "POST", f"/api/v1/devices/{device}/commands",
                    {"type": kind, "reason": "demo", "notice": {"text": text, "lang": "en"}})
        made[kind] = cmd["command_id"]
    ended: dict[str, str] = {}
    while len(ended) < len(made):
        for kind, cid in made.items():
            state = _call(api, token, "GET",
                          f"/api/v1/devices/{device}/commands/{cid}")["state"]
            if state in ("completed", "failed", "rejected", "expired", "cancelled"):
                ended[kind] = state
        if len(ended) < len(made):
            if time.monotonic() > deadline:
                raise DemoError("commands not finished in time: " + ", ".join(
                    f"{k} {v}" for k, v in ended.items()))
            time.sleep(0.5)
    return ended


async def _server_counts(dsn: str, tenant: str) -> tuple[
        Counter[tuple[str, str]], Counter[str], dict[str, dict[str, bool]]]:
    from mdm_server.policy.in_force import device_policy
    from mdm_server.storage.pool import connect

    conn = await connect(dsn)
    try:
        stored: Counter[tuple[str, str]] = Counter()
        for r in await conn.fetch("SELECT device_id, kind, count(*) AS n FROM telemetry "
                                  "WHERE tenant_id = $1 GROUP BY 1, 2", tenant):
            stored[(r["device_id"], r["kind"])] = r["n"]
        suppressed: Counter[str] = Counter()
        for r in await conn.fetch("SELECT device_id, sum(count) AS n FROM suppressed_locations "
                                  "WHERE tenant_id = $1 GROUP BY 1", tenant):
            suppressed[r["device_id"]] = int(r["n"])
        collects: dict[str, dict[str, bool]] = {}
        for r in await conn.fetch("SELECT device_id FROM devices WHERE tenant_id = $1", tenant):
            pol = await device_policy(conn, tenant, r["device_id"])
            if pol is not None:
                collects[r["device_id"]] = pol.to_json()["collects"]
    finally:
        await conn.close()
    return stored, suppressed, collects


def _compare(sent: dict[str, dict[str, int]], stored: Counter[tuple[str, str]],
             suppressed: Counter[str], collects: dict[str, dict[str, bool]]
             ) -> tuple[dict[str, Counter[str]], list[str]]:
    """Per kind: sent, stored, suppressed, not collected; and what does not add up."""
    table: dict[str, Counter[str]] = {}
    wrong: list[str] = []
    for device, kinds in sorted(sent.items()):
        for kind, n in sorted(kinds.items()):
            row = table.setdefault(kind, Counter())
            row["sent"] += n
            if not collects.get(device, {}).get(kind, True):
                row["not collected"] += n
                continue
            got = stored[(device, kind)]
            row["stored"] += got
            if kind == "location":
                row["suppressed"] += suppressed[device]
                got += suppressed[device]
            if got != n:
                wrong.append(f"{device} {kind}: sent {n}, server has {got}")
    return table, wrong


def totals(dsn: str, tenant: str, stats_file: str, wait_s: float = 60.0) -> int:
    with open(stats_file, "rb") as f:
        stats = json.load(f)
    sent: dict[str, dict[str, int]] = stats["unique_by_device_kind"]
    # The broker acknowledged every message; the ingest may still be committing.
    deadline = time.monotonic() + wait_s
    while True:
        stored, suppressed, collects = asyncio.run(_server_counts(dsn, tenant))
        table, wrong = _compare(sent, stored, suppressed, collects)
        if not wrong or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    out = sys.stderr
    print("\n  totals     sent by the simulator | held by the server: stored + "
          "suppressed by policy + kind not collected", file=out)
    for kind, row in sorted(table.items()):
        held = row["stored"] + row["suppressed"] + row["not collected"]
        print(f"    {kind:<11}{row['sent']:>9,} | {held:>9,} = {row['stored']:,} + "
              f"{row['suppressed']:,} + {row['not collected']:,}", file=out)
    if stats.get("unacked"):
        print(f"  the broker did not acknowledge {stats['unacked']:,} messages", file=out)
    if wrong:
        print(f"  the totals differ for {len(wrong)} device kinds, e.g. {wrong[0]}", file=out)
        return 1
    print("  the totals match: every record sent is held, or was left out by the policy",
          file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    for name in ("setup", "commands"):
        s = sub.add_parser(name)
        s.add_argument("--api", required=True, help="the server's base URL")
        s.add_argument("--token", required=True, help="an admin's API token")
        if name == "commands":
            s.add_argument("--device", required=True)
    t = sub.add_parser("totals")
    t.add_argument("--tenant", required=True)
    t.add_argument("--stats", required=True, help="the simulator's --json-stats file")
    args = p.parse_args(argv)
    try:
        if args.step == "setup":
            print(json.dumps(setup(args.api, args.token)))
        elif args.step == "commands":
            for kind, state in commands(args.api, args.token, args.device).items():
                done = (": its agent showed the notice, acted and acked"
                        if state == "completed" else "")
                print(f"demo: {kind} on {args.device}: {state}{done}", file=sys.stderr)
        else:
            dsn = os.environ.get("MDM_DATABASE_URL")
            if not dsn:
                print("demo: set MDM_DATABASE_URL", file=sys.stderr)
                return 2
            return totals(dsn, args.tenant, args.stats)
    except (DemoError, OSError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
