"""Trips, stops and per-day figures from one device's location points. Pure.

Points in (event time, lat, lon, as stored), an :class:`Analysis` out. The rules,
which docs/api.md ("Trips and stops") states for users:

Points and fixes
    Sorted by time; a point without finite coordinates in range is left out; of
    points with the same time the first is kept. When the locations were snapped to
    a grid (``precision_m`` > 0), consecutive points on the same grid cell are one
    *fix*, lasting from the first of them to the last: the device was somewhere in
    that cell the whole time, and nothing finer is known. Without snapping every
    point is a fix of its own.

Stops (stay points)
    Fixes are clustered in time order (after Kang et al., 2004, "Extracting places
    from traces of locations"): a fix joins the current cluster while it is within
    ``stop_radius_m`` of the cluster's centre (the point-weighted mean of its fixes);
    a single fix outside followed by one inside is an outlier, which does not end
    the cluster. A cluster lasting at least ``min_stop_s`` is a stay. Its ends are
    then trimmed to its core: leading and trailing fixes farther from its centre
    (the point-weighted median of its fixes) than the core radius (three times their
    median distance from the centre; at least 25 m and three quarters of the
    precision; at most the stop radius) are the approach and the departure, not the
    stop. A stay still lasting ``min_stop_s`` is a stop. Two stops with no trip
    between them whose centres are within the stop radius are one stop (the device
    never really left). A data gap inside a stop does not end it: the device was
    seen there before and after.

Trips
    The movement between two stops (or from the first point to the first stop, or
    from the last stop to the last point): from the last fix of the stop it leaves
    to the first fix of the stop it reaches, cut wherever no point came for more than
    ``max_gap_s`` (Traccar's ``report.trip.minimalNoDataDuration``). A piece is a
    trip when it covers at least ``min_trip_m`` and lasts at least ``min_trip_s``.
    Distance: the sum of the great-circle distances between consecutive fixes.
    Maximum speed: the fastest segment, its time taken between the middles of its
    fixes (never below the trip's average).

Precision
    Under snapping the stop radius and the minimal trip distance are at least 1.5
    times the precision: a still device near a cell's corner shows up in any of four
    cells, whose centres are up to sqrt(2) cells apart, so a movement within that
    neighbourhood is no movement the data can show. No trip is reported shorter than
    that, none is made of a still device's cell jumps, and stop positions are
    snapped to the grid.

Places
    A fix is in a place when its point is (boundary included, as for policy zones).
    A visit runs from the first fix in the place to the last one in it before a fix
    outside: an ``enter`` event at its first point (when a point outside came
    before it in the range), a ``leave`` event at its last point (when a point
    outside came after it). Time in a place is the visits' time, as seen.

Days
    Calendar days in the time zone asked for (UTC by default): each day's distance
    (the trips' segments, a segment across midnight shared by time), moving time
    (trips), stop time (stops) and time in each place, for the part of each interval
    that falls on that day.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import TYPE_CHECKING, Any, Final

from mdm_server.analysis.places import PlaceSet

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    FloatArray = npt.NDArray[np.float64]
    IntArray = npt.NDArray[np.int64]

__all__ = [
    "BOUNDS",
    "CELL_SPREAD",
    "EARTH_RADIUS_M",
    "Analysis",
    "Day",
    "Event",
    "Gap",
    "Params",
    "Stop",
    "Trip",
    "Visit",
    "analyse",
    "haversine_m",
]

#: Mean earth radius (IUGG), metres: the great-circle distances use it.
EARTH_RADIUS_M: Final = 6_371_008.8
#: Under snapping the stop radius and the minimal trip distance are at least this
#: many times the precision (a cell's diagonal, sqrt(2), and a margin).
CELL_SPREAD: Final = 1.5
#: The core radius of a stop is at least this (metres): GPS noise of a still device.
CORE_MIN_M: Final = 25.0
#: A trip's path in the answer has at most this many positions (every fix is counted).
PATH_MAX: Final = 1000


@dataclass(frozen=True, slots=True)
class Params:
    """The tunable parameters; defaults after Traccar's ``report.trip.*`` and
    stay-point detection. Units: metres and seconds."""

    stop_radius_m: float = 200.0
    min_stop_s: float = 300.0
    min_trip_m: float = 200.0
    min_trip_s: float = 180.0
    max_gap_s: float = 3600.0

    def for_precision(self, precision_m: float | None) -> Params:
        """The parameters used on points snapped to ``precision_m``: never finer
        than the grid."""
        if not precision_m:
            return self
        spread = CELL_SPREAD * precision_m
        return replace(self, stop_radius_m=max(self.stop_radius_m, spread),
                       min_trip_m=max(self.min_trip_m, spread))

    def to_json(self) -> dict[str, float]:
        return {f.name: _num(getattr(self, f.name)) for f in fields(self)}


#: What a request may ask for each parameter: (least, most).
BOUNDS: Final[dict[str, tuple[float, float]]] = {
    "stop_radius_m": (10.0, 10_000.0),
    "min_stop_s": (60.0, 86_400.0),
    "min_trip_m": (0.0, 100_000.0),
    "min_trip_s": (0.0, 86_400.0),
    "max_gap_s": (60.0, 7 * 86_400.0),
}


@dataclass(frozen=True, slots=True)
class Stop:
    first: int  # fix indices, inclusive
    last: int
    lat: float
    lon: float
    arrival_ms: int
    departure_ms: int
    points: int
    places: tuple[str, ...] = ()

    @property
    def duration_s(self) -> float:
        return (self.departure_ms - self.arrival_ms) / 1000


@dataclass(frozen=True, slots=True)
class Trip:
    first: int  # fix indices, inclusive
    last: int
    start_ms: int
    end_ms: int
    distance_m: float
    max_speed_mps: float
    points: int
    start_places: tuple[str, ...] = ()
    end_places: tuple[str, ...] = ()

    @property
    def duration_s(self) -> float:
        return (self.end_ms - self.start_ms) / 1000

    @property
    def avg_speed_mps(self) -> float:
        return self.distance_m / self.duration_s if self.duration_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Gap:
    from_ms: int
    to_ms: int


@dataclass(frozen=True, slots=True)
class Visit:
    place: str
    first_ms: int
    last_ms: int


@dataclass(frozen=True, slots=True)
class Event:
    place: str
    event: str  # "enter" | "leave"
    at_ms: int


@dataclass
class Day:
    day: date
    distance_m: float = 0.0
    moving_s: float = 0.0
    stopped_s: float = 0.0
    trips: int = 0
    stops: int = 0
    places: dict[str, float] = field(default_factory=dict)


@dataclass
class Analysis:
    params: Params  # as used (raised to the precision)
    precision_m: float | None
    points: int  # points analysed (after cleaning)
    lat: FloatArray  # the fixes
    lon: FloatArray
    t0: IntArray  # first and last point of each fix, ms
    t1: IntArray
    trips: list[Trip]
    stops: list[Stop]
    gaps: list[Gap]
    visits: list[Visit]
    events: list[Event]
    days: list[Day]

    def path(self, trip: Trip) -> list[list[float]]:
        """The trip's positions as [lon, lat] (GeoJSON order), at most PATH_MAX."""
        import numpy as np

        n = trip.last - trip.first + 1
        idx = (np.arange(trip.first, trip.last + 1) if n <= PATH_MAX else
               np.unique(np.linspace(trip.first, trip.last, PATH_MAX).round().astype(np.int64)))
        return [[float(self.lon[i]), float(self.lat[i])] for i in idx]


# --- geometry ------------------------------------------------------------------------------


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = (math.sin((p2 - p1) / 2) ** 2
         + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2)
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(min(1.0, a)))


def _haversine_to(lat: float, lon: float, lats: FloatArray, lons: FloatArray) -> FloatArray:
    import numpy as np

    p1, p2 = math.radians(lat), np.radians(lats)
    a = (np.sin((p2 - p1) / 2) ** 2
         + math.cos(p1) * np.cos(p2) * np.sin(np.radians(lons - lon) / 2) ** 2)
    out: FloatArray = 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.minimum(1.0, a)))
    return out


def _segments(lats: FloatArray, lons: FloatArray) -> FloatArray:
    """Great-circle length of each segment between consecutive positions."""
    import numpy as np

    p = np.radians(lats)
    a = (np.sin(np.diff(p) / 2) ** 2
         + np.cos(p[:-1]) * np.cos(p[1:]) * np.sin(np.radians(np.diff(lons)) / 2) ** 2)
    out: FloatArray = 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.minimum(1.0, a)))
    return out


def _wrap(dlon: float) -> float:
    """A longitude difference in [-180, 180)."""
    return (dlon + 180.0) % 360.0 - 180.0


def _weighted_median(values: FloatArray, weights: FloatArray) -> float:
    import numpy as np

    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    return float(values[order][int(np.searchsorted(cum, cum[-1] / 2))])


def _num(v: float) -> float:
    """A figure for the answer: whole numbers as such, others to 0.1."""
    r = round(v, 1)
    return float(int(r)) if r == int(r) else r


# --- the analysis --------------------------------------------------------------------------


def _fixes(ts_ms: list[int], lats: list[float], lons: list[float], merge: bool
           ) -> tuple[FloatArray, FloatArray, IntArray, IntArray, FloatArray]:
    """Clean points -> fixes (lat, lon, first ms, last ms, points)."""
    import numpy as np

    t = np.asarray(ts_ms, dtype=np.int64)
    la = np.asarray(lats, dtype=np.float64)
    lo = np.asarray(lons, dtype=np.float64)
    ok = np.isfinite(la) & np.isfinite(lo) & (np.abs(la) <= 90) & (np.abs(lo) <= 180)
    t, la, lo = t[ok], la[ok], lo[ok]
    order = np.argsort(t, kind="stable")
    t, la, lo = t[order], la[order], lo[order]
    if len(t):
        keep = np.concatenate(([True], np.diff(t) > 0))  # the first of equal times
        t, la, lo = t[keep], la[keep], lo[keep]
    if not merge or len(t) < 2:
        return la, lo, t, t.copy(), np.ones(len(t))
    starts = np.flatnonzero(np.concatenate(([True], (np.diff(la) != 0) | (np.diff(lo) != 0))))
    ends = np.concatenate((starts[1:] - 1, [len(t) - 1]))
    return la[starts], lo[starts], t[starts], t[ends], (ends - starts + 1).astype(np.float64)


class _Track:
    """The fixes and the work on them."""

    def __init__(self, lat: FloatArray, lon: FloatArray, t0: IntArray, t1: IntArray,
                 w: FloatArray, params: Params, precision_m: float) -> None:
        import numpy as np

        self.lat, self.lon, self.t0, self.t1, self.w = lat, lon, t0, t1, w
        self.p, self.precision = params, precision_m
        self.n = len(lat)
        self.seg = _segments(lat, lon) if self.n > 1 else np.zeros(0)
        self.cum = np.concatenate(([0.0], np.cumsum(self.seg)))
        self.gaps = self.gap_after()

    # -- stays

    def clusters(self) -> list[tuple[int, int]]:
        """Index ranges of clusters lasting at least min_stop_s. Distances to the
        centre are taken on the local plane (equirectangular at the cluster's first
        latitude): within 10 km they differ from great-circle ones by far less than
        a GPS fix's error, at a fraction of the cost."""
        lat, lon = self.lat.tolist(), self.lon.tolist()
        t0, t1, w = self.t0.tolist(), self.t1.tolist(), self.w.tolist()
        r2 = (self.p.stop_radius_m / (math.pi / 180 * EARTH_RADIUS_M)) ** 2  # in degrees²
        min_ms = self.p.min_stop_s * 1000
        n = self.n
        out: list[tuple[int, int]] = []
        if not n:
            return out
        start, lat0, lon0, kx = 0, lat[0], lon[0], math.cos(math.radians(lat[0]))
        s_lat, s_lon, s_w = 0.0, 0.0, w[0]  # sums relative to (lat0, lon0)

        def inside(k: int) -> bool:
            dy = lat[k] - lat0 - s_lat / s_w
            dx = (_wrap(lon[k] - lon0) - s_lon / s_w) * kx
            return bool(dx * dx + dy * dy <= r2)

        k = 1
        while k < n:
            if inside(k):
                member = k
            elif k + 1 < n and inside(k + 1):
                member = k + 1  # k is an outlier: in the cluster, not in its centre
            else:
                if t1[k - 1] - t0[start] >= min_ms:
                    out.append((start, k - 1))
                start, lat0, lon0 = k, lat[k], lon[k]
                kx = math.cos(math.radians(lat0))
                s_lat, s_lon, s_w = 0.0, 0.0, w[k]
                k += 1
                continue
            wk = w[member]
            s_lat += (lat[member] - lat0) * wk
            s_lon += _wrap(lon[member] - lon0) * wk
            s_w += wk
            k = member + 1
        if t1[n - 1] - t0[start] >= min_ms:
            out.append((start, n - 1))
        return out

    def centre(self, a: int, b: int) -> tuple[float, float]:
        """Point-weighted median of the fixes a..b."""
        import numpy as np

        w = self.w[a:b + 1]
        lon0 = float(self.lon[a])
        rel = (self.lon[a:b + 1] - lon0 + 180.0) % 360.0 - 180.0
        lon = lon0 + _weighted_median(np.asarray(rel, dtype=np.float64), w)
        lon = (lon + 180.0) % 360.0 - 180.0
        return _weighted_median(self.lat[a:b + 1], w), lon

    def refine(self, a: int, b: int) -> Stop | None:
        """A stay trimmed to its core; None if what is left is too short."""
        c_lat, c_lon = self.centre(a, b)
        d = _haversine_to(c_lat, c_lon, self.lat[a:b + 1], self.lon[a:b + 1])
        core = min(self.p.stop_radius_m,
                   max(CORE_MIN_M, 0.75 * self.precision,
                       3 * _weighted_median(d, self.w[a:b + 1])))
        i, j = 0, b - a
        while i < j and d[i] > core:
            i += 1
        while j > i and d[j] > core:
            j -= 1
        a, b = a + i, a + j
        if self.t1[b] - self.t0[a] < self.p.min_stop_s * 1000:
            return None
        return self.stop(a, b)

    def stop(self, a: int, b: int) -> Stop:
        c_lat, c_lon = self.centre(a, b)
        if self.precision:
            from privacy_filters import snap

            c_lat, c_lon = snap(c_lat, c_lon, self.precision)
        return Stop(a, b, round(c_lat, 7), round(c_lon, 7), int(self.t0[a]), int(self.t1[b]),
                    int(self.w[a:b + 1].sum()))

    # -- movement

    def gap_after(self) -> IntArray:
        """Indices k of the fixes after which no point came for more than max_gap_s."""
        import numpy as np

        out: IntArray = np.flatnonzero(self.t0[1:] - self.t1[:-1] > self.p.max_gap_s * 1000)
        return out

    def pieces(self, s: int, e: int) -> list[tuple[int, int]]:
        """The movement s..e cut at data gaps."""
        import numpy as np

        out = []
        start = s
        for k in self.gaps[np.searchsorted(self.gaps, s):np.searchsorted(self.gaps, e)]:
            out.append((start, int(k)))
            start = int(k) + 1
        out.append((start, e))
        return out

    def trip(self, a: int, b: int) -> Trip | None:
        if b <= a:
            return None
        start, end = int(self.t1[a]), int(self.t0[b])
        distance = float(self.cum[b] - self.cum[a])
        if distance < self.p.min_trip_m or (end - start) < self.p.min_trip_s * 1000 \
                or end <= start:
            return None
        # Segment times between the fixes' middles: under snapping, from the middle of
        # the time in one cell to the middle of the time in the next.
        mid = (self.t0[a:b + 1] + self.t1[a:b + 1]) / 2000
        dt = mid[1:] - mid[:-1]
        seg = self.seg[a:b]
        fast = float((seg[dt > 0] / dt[dt > 0]).max()) if (dt > 0).any() else 0.0
        # Under snapping the trip's ends are cell jumps at the moment the device is
        # first seen in the next cell, which can make the average exceed every
        # segment's speed: the maximum is never below the average.
        fast = max(fast, distance * 1000 / (end - start))
        # Its points: those of the fixes between its ends, and one at each end.
        return Trip(a, b, start, end, distance, fast, int(self.w[a + 1:b].sum()) + 2)

    def trips_between(self, s: int, e: int) -> list[Trip]:
        return [t for a, b in self.pieces(s, e) if (t := self.trip(a, b)) is not None]


def analyse(ts_ms: list[int], lats: list[float], lons: list[float], params: Params, *,
            precision_m: float | None = None, places: PlaceSet | None = None,
            tz: tzinfo = UTC, start_ms: int | None = None, end_ms: int | None = None
            ) -> Analysis:
    """Trips, stops, gaps, place visits and days of one device's points.
    ``params`` as asked: they are raised to ``precision_m`` (the coarsest grid the
    points were snapped to). ``start_ms``/``end_ms``: the range asked for (its days
    are listed even without points); by default that of the points."""
    used = params.for_precision(precision_m)
    lat, lon, t0, t1, w = _fixes(ts_ms, lats, lons, merge=bool(precision_m))
    track = _Track(lat, lon, t0, t1, w, used, float(precision_m or 0.0))

    # Stays, trimmed, then merged where no trip separates them.
    stops: list[Stop] = []
    for a, b in track.clusters():
        s = track.refine(a, b)
        if s is None:
            continue
        while stops and not track.trips_between(stops[-1].last, s.first) and haversine_m(
                stops[-1].lat, stops[-1].lon, s.lat, s.lon) <= used.stop_radius_m:
            s = track.stop(stops.pop().first, s.last)
        stops.append(s)

    trips: list[Trip] = []
    bounds = [0, *[x for s in stops for x in (s.first, s.last)], track.n - 1]
    for k in range(0, len(bounds), 2):
        leave, reach = bounds[k], bounds[k + 1]
        if track.n and reach > leave:
            trips += track.trips_between(leave, reach)

    gaps = [Gap(int(t1[k]), int(t0[k + 1]))
            for k in track.gap_after().tolist()]

    visits: list[Visit] = []
    events: list[Event] = []
    if places is not None and places.places and track.n:
        visits, events, stops, trips = _places(track, places, stops, trips)

    lo_ms = start_ms if start_ms is not None else (int(t0[0]) if track.n else 0)
    hi_ms = end_ms if end_ms is not None else (int(t1[-1]) + 1 if track.n else 0)
    days = _days(track, trips, stops, visits, tz, lo_ms, hi_ms)
    return Analysis(used, precision_m, int(w.sum()), lat, lon, t0, t1, trips, stops, gaps,
                    visits, events, days)


def _places(track: _Track, places: PlaceSet, stops: list[Stop], trips: list[Trip]
            ) -> tuple[list[Visit], list[Event], list[Stop], list[Trip]]:
    """Visits and enter/leave events; the places of stops and of trips' ends."""
    import numpy as np

    n = track.n
    lons = np.concatenate((track.lon, np.array([s.lon for s in stops], dtype=np.float64)))
    lats = np.concatenate((track.lat, np.array([s.lat for s in stops], dtype=np.float64)))
    pts, plc = places.hits(lons, lats)
    names = [p.name for p in places.places]
    ends = {t.first for t in trips} | {t.last for t in trips}
    at: dict[int, set[str]] = {}
    for i, j in zip(pts.tolist(), plc.tolist(), strict=True):
        if i >= n or i in ends:
            at.setdefault(i, set()).add(names[j])

    def of(i: int) -> tuple[str, ...]:
        return tuple(sorted(at.get(i, ())))

    stops = [replace(s, places=of(n + k)) for k, s in enumerate(stops)]
    trips = [replace(t, start_places=of(t.first), end_places=of(t.last)) for t in trips]
    # Runs of consecutive fixes in each place (a place may be given twice: by name).
    inside: dict[str, set[int]] = {}
    fix = pts < n
    for j in np.unique(plc[fix]).tolist():
        inside.setdefault(names[j], set()).update(pts[fix & (plc == j)].tolist())
    visits: list[Visit] = []
    events: list[Event] = []
    for name, idx in inside.items():
        arr = np.array(sorted(idx), dtype=np.int64)
        breaks = np.flatnonzero(np.diff(arr) > 1)
        for first, last in zip(np.concatenate(([arr[0]], arr[breaks + 1])).tolist(),
                               np.concatenate((arr[breaks], [arr[-1]])).tolist(),
                               strict=True):
            visits.append(Visit(name, int(track.t0[first]), int(track.t1[last])))
            if first > 0:
                events.append(Event(name, "enter", int(track.t0[first])))
            if last < n - 1:
                events.append(Event(name, "leave", int(track.t1[last])))
    visits.sort(key=lambda v: (v.first_ms, v.place))
    events.sort(key=lambda e: (e.at_ms, e.event == "enter", e.place))
    return visits, events, stops, trips


# --- days --------------------------------------------------------------------------------


def _day_of(ms: int, tz: tzinfo) -> date:
    return datetime.fromtimestamp(ms / 1000, tz).date()


def _midnight_ms(d: date, tz: tzinfo) -> int:
    return int(datetime.combine(d, time(0), tzinfo=tz).timestamp() * 1000)


def split_by_day(start_ms: int, end_ms: int, tz: tzinfo) -> list[tuple[date, int]]:
    """[start, end) as (day, milliseconds on that day) in ``tz``."""
    out: list[tuple[date, int]] = []
    t = start_ms
    while t < end_ms:
        d = _day_of(t, tz)
        nxt = max(_midnight_ms(d + timedelta(days=1), tz), t + 1)
        out.append((d, min(nxt, end_ms) - t))
        t = nxt
    return out


def _days(track: _Track, trips: list[Trip], stops: list[Stop], visits: list[Visit],
          tz: tzinfo, start_ms: int, end_ms: int) -> list[Day]:
    days: dict[date, Day] = {}
    if end_ms > start_ms:
        d, last = _day_of(start_ms, tz), _day_of(end_ms - 1, tz)
        while d <= last:
            days[d] = Day(d)
            d += timedelta(days=1)

    def day(d: date) -> Day:
        if d not in days:  # a stop reaching past the range
            days[d] = Day(d)
        return days[d]

    for t in trips:
        day(_day_of(t.start_ms, tz)).trips += 1
        for d, ms in split_by_day(t.start_ms, t.end_ms, tz):
            day(d).moving_s += ms / 1000
        for k in range(t.first, t.last):
            a, b, dist = int(track.t1[k]), int(track.t0[k + 1]), float(track.seg[k])
            parts = split_by_day(a, b, tz) if b > a else [(_day_of(a, tz), 1)]
            total = sum(ms for _, ms in parts)
            for d, ms in parts:
                day(d).distance_m += dist * ms / total
    for s in stops:
        day(_day_of(s.arrival_ms, tz)).stops += 1
        for d, ms in split_by_day(s.arrival_ms, s.departure_ms, tz):
            day(d).stopped_s += ms / 1000
    for v in visits:
        for d, ms in split_by_day(v.first_ms, v.last_ms, tz):
            p = day(d).places
            p[v.place] = p.get(v.place, 0.0) + ms / 1000
    return [days[d] for d in sorted(days)]


# --- the answer -------------------------------------------------------------------------


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def to_json(a: Analysis) -> dict[str, Any]:
    """Trips, stops, gaps, events and days as the API answers them."""

    def at(i: int, ms: int, places: tuple[str, ...]) -> dict[str, Any]:
        return {"at": iso(ms), "lat": float(a.lat[i]), "lon": float(a.lon[i]),
                "places": list(places)}

    return {
        "points": a.points,
        "trips": [{"start": at(t.first, t.start_ms, t.start_places),
                   "end": at(t.last, t.end_ms, t.end_places),
                   "distance_m": _num(t.distance_m), "duration_s": _num(t.duration_s),
                   "avg_speed_mps": round(t.avg_speed_mps, 2),
                   "max_speed_mps": round(t.max_speed_mps, 2), "points": t.points,
                   "path": a.path(t)} for t in a.trips],
        "stops": [{"lat": s.lat, "lon": s.lon, "places": list(s.places),
                   "arrival": iso(s.arrival_ms), "departure": iso(s.departure_ms),
                   "duration_s": _num(s.duration_s), "points": s.points} for s in a.stops],
        "gaps": [{"from": iso(g.from_ms), "to": iso(g.to_ms),
                  "duration_s": _num((g.to_ms - g.from_ms) / 1000)} for g in a.gaps],
        "events": [{"place": e.place, "event": e.event, "at": iso(e.at_ms)}
                   for e in a.events],
        "days": [{"date": d.day.isoformat(), "distance_m": _num(d.distance_m),
                  "moving_s": _num(d.moving_s), "stopped_s": _num(d.stopped_s),
                  "trips": d.trips, "stops": d.stops,
                  "places": [{"name": n, "seconds": _num(s)}
                             for n, s in sorted(d.places.items())]} for d in a.days],
    }
