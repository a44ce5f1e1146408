"""The strictest realistic policy, and a micro-benchmark of its filter (not a pytest test).

    python -m load_tests.bench_policy [--records 1000] [--repeats 7] [--seed 7]

``strict_policy_doc()`` is the policy body the ingest benchmark sets as a tenant's
``default`` policy for its "policy B" drains: IMEI and phone number masked to their
last 4 characters; serial, Wi-Fi and Bluetooth MACs, ICCID and IMSI hashed; user
e-mail and user name, IP and Wi-Fi SSID dropped; locations snapped to 1 km, kept
only inside 1,000 work-zone polygons (6-20 vertices each, star-shaped around a
centre, so simple and valid) spread around the simulator's home cities, never
inside 10 excluded zones, and only while the device is checked out.

``micro()`` times ``CompiledPolicy.filter_batch`` on batches of ``records`` records
made by the simulator's own data generator (load_tests/fleet_data.py), for the
strict policy and for the built-in open default, best of ``repeats`` runs of
``inner`` calls each; check-out state is answered by the ingest's own
``checked_out_view`` (one check-out per device a minute before the batch).
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from agent_protocol import validate_data
from load_tests.fleet_data import HOME_AREAS, DeviceProfile
from mdm_server.policy.engine import checked_out_view
from privacy_filters import OPEN_DEFAULT, CompiledPolicy, compile_policy, parse_policy

__all__ = ["micro", "sample_records", "strict_policy_doc", "zone_share"]

WORK_ZONES = 1_000
EXCLUDED_ZONES = 10
HASH_KEY = b"bench-only-hash-key-32-bytes!!!!"


def _ring(rng: random.Random, lat0: float, lon0: float, r_lat: float) -> list[list[float]]:
    """A closed star-shaped ring of 6-20 vertices around (lat0, lon0): strictly
    increasing angles and positive radii, so it never intersects itself."""
    k = rng.randint(6, 20)
    cos = math.cos(math.radians(lat0))
    # One vertex per sector of 2*pi/k, jittered within 80% of it: increasing angles.
    angles = [(i + rng.uniform(0.0, 0.8)) * 2 * math.pi / k for i in range(k)]
    pts = []
    for a in angles:
        r = r_lat * rng.uniform(0.6, 1.0)
        pts.append([round(lon0 + r * math.sin(a) / cos, 6), round(lat0 + r * math.cos(a), 6)])
    pts.append(pts[0])
    return pts


def strict_policy_doc(seed: int = 1) -> dict[str, Any]:
    """The strictest realistic policy (see the module doc), reproducible by ``seed``."""
    rng = random.Random(seed)
    only: list[dict[str, Any]] = []
    per_city = WORK_ZONES // len(HOME_AREAS)
    for i in range(WORK_ZONES):
        _, lat, lon, radius = HOME_AREAS[i % len(HOME_AREAS)] if i < per_city * len(
            HOME_AREAS) else rng.choice(HOME_AREAS)
        cos = math.cos(math.radians(lat))
        # Work sites (depots, shops, customer sites) over the city and its edge.
        clat = lat + rng.uniform(-1.3, 1.3) * radius
        clon = lon + rng.uniform(-1.3, 1.3) * radius / cos
        size = rng.uniform(0.15, 0.35) * radius  # 0.5-1.9 km from centre to vertex
        only.append({"type": "Polygon", "coordinates": [_ring(rng, clat, clon, size)]})
    never: list[dict[str, Any]] = []
    for j in range(EXCLUDED_ZONES):
        name, lat, lon, radius = HOME_AREAS[j % len(HOME_AREAS)]
        cos = math.cos(math.radians(lat))
        clat = lat + rng.uniform(-0.8, 0.8) * radius
        clon = lon + rng.uniform(-0.8, 0.8) * radius / cos
        never.append({"type": "Feature", "properties": {"name": f"excluded-{name}-{j}"},
                      "geometry": {"type": "Polygon",
                                   "coordinates": [_ring(rng, clat, clon, 0.004)]}})
    return {
        "applies_to": {},
        "collect": {k: True for k in
                    ("location", "identity", "sim", "network", "apps", "checkinout")},
        "fields": {
            "identity.imei": {"action": "mask", "keep_last": 4},
            "identity.phone_number": {"action": "mask", "keep_last": 4},
            "identity.serial": {"action": "hash"},
            "identity.wifi_mac": {"action": "hash"},
            "identity.bluetooth_mac": {"action": "hash"},
            "identity.user_email": {"action": "drop"},
            "identity.user_name": {"action": "drop"},
            "sim.iccid": {"action": "hash"},
            "sim.imsi": {"action": "hash"},
            "network.ip": {"action": "drop"},
            "network.wifi_ssid": {"action": "drop"},
        },
        "location": {
            "precision_m": 1000,
            "only_inside": only,
            "never_inside": never,
            "only_while_checked_out": True,
        },
    }


def compiled(doc: dict[str, Any], name: str = "default") -> CompiledPolicy:
    return compile_policy(parse_policy(doc, name=name), policy_id=name, version=2,
                          hash_key=HASH_KEY)


def sample_records(kind: str, n: int, *, seed: int = 7, devices: int = 20
                   ) -> tuple[list[str], list[int], list[dict[str, Any]]]:
    """``n`` validated records of ``kind`` from the simulator's generator, the fleet's
    devices taking turns (as the simulator's ``--count`` drain does)."""
    names = [f"sim-{i:04d}" for i in range(devices)]
    profiles = [DeviceProfile(d, seed=seed) for d in names]
    t0 = int(time.time() * 1000)
    devs, ts, datas = [], [], []
    for i in range(n):
        p = profiles[i % devices]
        now = t0 + i
        devs.append(p.device)
        ts.append(now)
        datas.append(validate_data(kind, p.data(kind, now)))
    return devs, ts, datas


def _always_checked_out(device: str, ts_ms: int) -> bool:
    return True


def _best(fn: Callable[[], object], repeats: int, inner: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def zone_share(policy: CompiledPolicy, devices: Sequence[str], ts: Sequence[int],
               datas: Sequence[dict[str, Any]]) -> float:
    """Share of these location points the zones keep (check-out state ignored)."""
    res = policy.filter_batch("location", devices, ts, datas, _always_checked_out)
    return len(res.kept) / len(datas) if datas else 0.0


def micro(*, records: int = 1000, repeats: int = 7, inner: int = 20, seed: int = 7,
          policy_seed: int = 1) -> dict[str, Any]:
    """Per-record cost (µs) of ``filter_batch`` on ``records``-record batches."""
    doc = strict_policy_doc(policy_seed)
    t0 = time.perf_counter()
    strict = compiled(doc)
    compile_s = time.perf_counter() - t0
    open_default = compile_policy(OPEN_DEFAULT, policy_id="default", version=1,
                                  hash_key=HASH_KEY)
    out: dict[str, Any] = {"records": records, "repeats": repeats, "inner": inner,
                           "compile_s": compile_s, "kinds": {}}
    for kind in ("location", "identity"):
        devs, ts, datas = sample_records(kind, records, seed=seed)
        # As the ingest asks it: one check-out a minute before the batch per device.
        view = checked_out_view({d: [(min(ts) - 60_000, True)] for d in set(devs)})
        row: dict[str, float] = {}
        for label, pol in (("strict", strict), ("open", open_default)):
            call = functools.partial(pol.filter_batch, kind, devs, ts, datas, view)
            row[label] = _best(call, repeats, inner) / records * 1e6
        if kind == "location":
            row["kept_share"] = zone_share(strict, devs, ts, datas)
        out["kinds"][kind] = row
    # Larger sample for the share of points inside the zones (the fleet's walk).
    devs, ts, datas = sample_records("location", 100_000, seed=seed)
    out["zone_share_100k"] = zone_share(strict, devs, ts, datas)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.bench_policy",
                                description="Micro-benchmark of CompiledPolicy.filter_batch.")
    p.add_argument("--records", type=int, default=1000, help="records per batch")
    p.add_argument("--repeats", type=int, default=7, help="runs; the best counts")
    p.add_argument("--seed", type=int, default=7, help="simulator data seed")
    a = p.parse_args(argv)
    r = micro(records=a.records, repeats=a.repeats, seed=a.seed)
    print(f"compile (1,000 + 10 zones): {r['compile_s'] * 1000:.0f} ms")
    for kind, row in r["kinds"].items():
        extra = f", zones keep {row['kept_share']:.0%}" if "kept_share" in row else ""
        print(f"{kind}: strict {row['strict']:.2f} µs/record, open default "
              f"{row['open']:.2f} µs/record, difference {row['strict'] - row['open']:.2f}"
              f"{extra}")
    print(f"zones keep {r['zone_share_100k']:.1%} of 100,000 simulated points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
