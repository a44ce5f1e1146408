"""What one trips request costs in CPU, in process (not collected by pytest).

Run: .venv/bin/python -m load_tests.bench_trips [--points 200000] [--places 200]
    [--precision 0] [--repeats 3]

A device's track of ``--points`` points, one every 10 s (the request's limit,
mdm_server/api/trips.py MAX_POINTS, is 23 days of that): stays of 50 minutes and
trips of 3 km at 43 km/h, with 3 m of GPS noise; ``--places`` square places of
300 m along the way; with ``--precision`` the points snapped as a policy would.
Three stages, as the API runs them on the policy threads, best of ``--repeats``:

- ``open``: the records sealed as the ingest seals them, opened as the API opens
  them (mdm_server/api/trips.py ``_open``: AES-GCM, JSON, the policy stamps);
- ``analyse``: mdm_server.analysis.trips.analyse with the places;
- ``answer``: the JSON answer (``to_json`` and orjson).

What stays on the event loop (asyncpg decoding rows, 5,000 at a time) is not
measured here. The machine is shared: compare figures taken minutes apart.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mdm_server.analysis.places import Place, PlaceSet, parse_place
from mdm_server.analysis.trips import Params, analyse, to_json
from mdm_server.api.trips import _open
from mdm_server.storage.sealing import DeviceReader, seal_value
from privacy_filters.location import snap_arrays

T = TypeVar("T")
R = 6_371_008.8
T0 = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp() * 1000)


def track(n: int, seed: int = 1) -> tuple[list[int], list[float], list[float]]:
    rng = random.Random(seed)
    lat, lon = 52.0, 4.8
    ts, la, lo = [], [], []
    k = 0
    while len(ts) < n:
        moving = k % 2 == 1
        steps = 25 if moving else 300  # 3 km at 12 m/s; 50 minutes still
        heading = rng.uniform(0, 2 * math.pi)
        for _ in range(steps):
            if moving:
                lat += math.degrees(120 * math.cos(heading) / R)
                lon += math.degrees(120 * math.sin(heading) / (R * math.cos(math.radians(lat))))
            ts.append(T0 + len(ts) * 10_000)
            la.append(lat + math.degrees(rng.gauss(0, 3) / R))
            lo.append(lon + math.degrees(rng.gauss(0, 3) / R))
        k += 1
    return ts[:n], la[:n], lo[:n]


def places(la: list[float], lo: list[float], n: int) -> list[Place]:
    out = []
    for j in range(n):
        i = j * len(la) // max(n, 1)
        d_lat, d_lon = math.degrees(150 / R), math.degrees(150 / (R * math.cos(math.radians(
            la[i]))))
        w, e, s, nn = lo[i] - d_lon, lo[i] + d_lon, la[i] - d_lat, la[i] + d_lat
        out.append(Place(f"p{j}", 1, parse_place({"type": "Polygon", "coordinates": [
            [[w, s], [e, s], [e, nn], [w, nn], [w, s]]]})))
    return out


def best(fn: Callable[[], T], repeats: int) -> tuple[float, T]:
    times, result = [], None
    for _ in range(repeats):
        start = time.process_time()
        result = fn()
        times.append(time.process_time() - start)
    assert result is not None
    return min(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=200_000)
    ap.add_argument("--places", type=int, default=200)
    ap.add_argument("--precision", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    ts, la, lo = track(args.points)
    if args.precision:
        import numpy as np

        sla, slo = snap_arrays(np.array(la), np.array(lo), args.precision)
        la, lo = sla.tolist(), slo.tolist()
    key = AESGCM.generate_key(256)
    aead = AESGCM(key)
    rows: list[dict[str, Any]] = []
    for i, (t, a, b) in enumerate(zip(ts, la, lo, strict=True)):
        rid = f"r{i}"
        when = datetime.fromtimestamp(t / 1000, UTC)
        data = {"lat": a, "lon": b, "accuracy_m": 5.0, "source": "gps"}
        rows.append({"kind": "location", "record_id": rid, "ts": when, "key_id": 1,
                     "sealed": seal_value(aead, "acme", "d1", "location", rid, t, data),
                     "data": None, "policy_id": "default", "policy_version": 1})
    reader = DeviceReader("acme", "d1", {1: aead})
    pl = PlaceSet(places(la, lo, args.places))

    def open_all() -> tuple[list[int], list[float], list[float]]:
        stamps: dict[Any, Any] = {}
        t_, a_, b_ = [], [], []
        for k in range(0, len(rows), 5000):
            x, y, z = _open(reader, rows[k:k + 5000], stamps)  # type: ignore[arg-type]
            t_ += x
            a_ += y
            b_ += z
        return t_, a_, b_

    t_open, (ots, ola, olo) = best(open_all, args.repeats)
    t_an, result = best(lambda: analyse(ots, ola, olo, Params(),
                                        precision_m=args.precision or None, places=pl,
                                        start_ms=T0, end_ms=ots[-1] + 1), args.repeats)
    t_js, body = best(lambda: orjson.dumps(to_json(result)), args.repeats)
    n = len(ots)
    print(f"bench_trips: {n:,} points, {args.places} places, precision "
          f"{args.precision or 'none'}, on {os.cpu_count()} cores (best of {args.repeats}, "
          "CPU time)")
    print(f"  found: {len(result.trips)} trips, {len(result.stops)} stops, "
          f"{len(result.events)} place events, {len(result.days)} days; answer "
          f"{len(body) / 1e6:.1f} MB")
    for name, secs in (("open", t_open), ("analyse", t_an), ("answer", t_js)):
        print(f"  {name:8s} {secs:6.2f} s  {secs / n * 1e6:5.2f} us/point")
    total = t_open + t_an + t_js
    print(f"  total    {total:6.2f} s  {total / n * 1e6:5.2f} us/point")


if __name__ == "__main__":
    main()
