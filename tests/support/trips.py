"""A synthetic day of one device's locations, for the trips analysis tests: at home,
a 5 km trip north at 30 km/h, a 30-minute stop at the depot, the same trip back, at
home again; a point every 10 s, with GPS noise (seeded). Home sits on a boundary
between two rows of the 1 km grid that snapping policies use, so a still device's
snapped points jump between two cells."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from agent_protocol import Record, encode_telemetry, telemetry_topic
from privacy_filters.location import METERS_PER_DEGREE

EARTH_RADIUS_M = 6_371_008.8
SPEED_MPS = 30 / 3.6
TRIP_M = 5000.0
STEP_S = 10
# On a boundary between two rows of the 1 km grid (latitude step 1000 / 111320 deg).
HOME = (round((5832 + 0.5) * 1000 / METERS_PER_DEGREE, 7), 4.85)
DEPOT = (HOME[0] + math.degrees(TRIP_M / EARTH_RADIUS_M), HOME[1])


def offset(lat: float, lon: float, north_m: float, east_m: float) -> tuple[float, float]:
    return (lat + math.degrees(north_m / EARTH_RADIUS_M),
            lon + math.degrees(east_m / (EARTH_RADIUS_M * math.cos(math.radians(lat)))))


def square(centre: tuple[float, float], side_m: float) -> dict[str, Any]:
    """A GeoJSON square of ``side_m`` around (lat, lon)."""
    s, w = offset(*centre, -side_m / 2, -side_m / 2)
    n, e = offset(*centre, side_m / 2, side_m / 2)
    return {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}


@dataclass(frozen=True)
class Day:
    """When each part of the day begins (UTC) and its points: (ts, lat, lon)."""

    start: datetime
    leave_home: datetime
    at_depot: datetime
    leave_depot: datetime
    at_home: datetime
    end: datetime
    points: list[tuple[datetime, float, float]]

    def records(self, device: str) -> list[Record]:
        day = self.start.strftime("%Y%m%d")
        return [Record(id=f"{device}-{day}-{i}", ts_ms=int(t.timestamp() * 1000),
                       data={"lat": round(la, 7), "lon": round(lo, 7), "accuracy_m": 5.0,
                             "source": "gps"})
                for i, (t, la, lo) in enumerate(self.points)]

    def messages(self, tenant: str, device: str, batch: int = 60) -> list[tuple[str, bytes]]:
        recs = self.records(device)
        topic = telemetry_topic(tenant, device, "location")
        return [(topic, encode_telemetry(recs[i:i + batch], device=device, kind="location"))
                for i in range(0, len(recs), batch)]


def synthetic_day(start: datetime, *, home_min: int = 20, stop_min: int = 30,
                  noise_m: float = 3.0, seed: int = 11) -> Day:
    rng = random.Random(seed)
    points: list[tuple[datetime, float, float]] = []
    t = start

    def still(where: tuple[float, float], minutes: int) -> None:
        nonlocal t
        for _ in range(minutes * 60 // STEP_S):
            points.append((t, *offset(*where, rng.gauss(0, noise_m), rng.gauss(0, noise_m))))
            t += timedelta(seconds=STEP_S)

    def drive(sign: float) -> None:
        nonlocal t
        steps = round(TRIP_M / (SPEED_MPS * STEP_S))
        for i in range(1, steps):
            north = SPEED_MPS * STEP_S * i
            base = offset(*HOME, north if sign > 0 else TRIP_M - north, 0)
            points.append((t, *offset(*base, rng.gauss(0, noise_m), rng.gauss(0, noise_m))))
            t += timedelta(seconds=STEP_S)

    still(HOME, home_min)
    leave_home = t
    drive(+1)
    at_depot = t
    still(DEPOT, stop_min)
    leave_depot = t
    drive(-1)
    at_home = t
    still(HOME, home_min)
    return Day(start, leave_home, at_depot, leave_depot, at_home, t, points)
