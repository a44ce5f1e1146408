"""The pure trips analysis (mdm_server/analysis/trips.py): points in, trips, stops,
gaps, place events and days out."""

from __future__ import annotations

import math
import random
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import pytest

from mdm_server.analysis.places import Place, PlaceError, PlaceSet, parse_place
from mdm_server.analysis.trips import (
    CELL_SPREAD,
    EARTH_RADIUS_M,
    Params,
    analyse,
    haversine_m,
    split_by_day,
    to_json,
)
from privacy_filters import snap
from tests.support.trips import offset, square

T0 = int(datetime(2026, 11, 20, 7, 0, tzinfo=UTC).timestamp() * 1000)
A = (52.37, 4.80)


class Track:
    """Build a track: still here, go there, with a point every ``step`` seconds."""

    def __init__(self, start_ms: int = T0, step_s: float = 10, noise_m: float = 0.0,
                 seed: int = 1) -> None:
        self.t = start_ms
        self.step_ms = int(step_s * 1000)
        self.pos = A
        self.ts: list[int] = []
        self.lat: list[float] = []
        self.lon: list[float] = []
        self.rng = random.Random(seed)
        self.noise = noise_m

    def _emit(self, lat: float, lon: float) -> None:
        if self.noise:
            lat, lon = offset(lat, lon, self.rng.gauss(0, self.noise),
                              self.rng.gauss(0, self.noise))
        self.ts.append(self.t)
        self.lat.append(lat)
        self.lon.append(lon)
        self.t += self.step_ms

    def stay(self, seconds: float) -> Track:
        for _ in range(int(seconds * 1000 / self.step_ms)):
            self._emit(*self.pos)
        return self

    def go(self, north_m: float, east_m: float, speed_mps: float) -> Track:
        dist = math.hypot(north_m, east_m)
        steps = max(1, round(dist / (speed_mps * self.step_ms / 1000)))
        start = self.pos
        for i in range(1, steps + 1):
            self._emit(*offset(*start, north_m * i / steps, east_m * i / steps))
        self.pos = offset(*start, north_m, east_m)
        return self

    def gap(self, seconds: float) -> Track:
        self.t += int(seconds * 1000)
        return self

    def run(self, params: Params | None = None, **kw: object):  # type: ignore[no-untyped-def]
        return analyse(self.ts, self.lat, self.lon, params or Params(), **kw)  # type: ignore[arg-type]


def test_great_circle_distances() -> None:
    # A degree of latitude on the mean sphere; a quarter meridian.
    assert haversine_m(0, 0, 1, 0) == pytest.approx(math.pi / 180 * EARTH_RADIUS_M)
    assert haversine_m(0, 0, 90, 0) == pytest.approx(math.pi / 2 * EARTH_RADIUS_M)
    # Across the antimeridian: the short way round.
    assert haversine_m(0, 179.999, 0, -179.999) == pytest.approx(222.4, abs=0.1)
    # Amsterdam - Paris, about 430 km.
    assert haversine_m(52.3676, 4.9041, 48.8566, 2.3522) == pytest.approx(430_000, rel=0.01)


def test_a_trip_between_two_stops() -> None:
    a = Track().stay(600).go(5000, 0, 30 / 3.6).stay(1800).run()
    assert len(a.stops) == 2 and len(a.trips) == 1
    (trip,) = a.trips
    assert trip.distance_m == pytest.approx(5000, rel=0.001)
    assert trip.duration_s == pytest.approx(600, abs=10)
    assert trip.avg_speed_mps == pytest.approx(30 / 3.6, rel=0.02)
    assert trip.max_speed_mps == pytest.approx(30 / 3.6, rel=0.02)
    assert a.stops[1].duration_s == pytest.approx(1800, abs=10)
    assert haversine_m(a.stops[1].lat, a.stops[1].lon, *offset(*A, 5000, 0)) < 1


def test_noise_and_a_slow_approach_are_not_counted_as_the_stop() -> None:
    """Walking (1.4 m/s) into a stop: the 200 m within the radius take 140 s; the
    stop's core is what counts, so arrival and duration stay within a sample or two."""
    tr = Track(noise_m=4, seed=3).stay(600).go(0, 1500, 1.4)
    arrive = tr.t
    tr.stay(900)
    leave = tr.t
    tr.go(0, -1500, 1.4).stay(600)
    a = tr.run()
    assert len(a.trips) == 2, [(t.distance_m, t.duration_s) for t in a.trips]
    mid = a.stops[1]
    assert abs(mid.arrival_ms - arrive) <= 30_000
    assert abs(mid.departure_ms - leave) <= 30_000
    assert mid.duration_s == pytest.approx(900, abs=40)
    for trip in a.trips:
        assert trip.distance_m == pytest.approx(1500, rel=0.05)


def test_a_single_stray_point_does_not_split_a_stop() -> None:
    tr = Track().stay(600)
    tr.lat[30], tr.lon[30] = offset(*A, 800, 0)  # one fix 800 m off
    a = tr.run()
    assert len(a.stops) == 1 and a.trips == []


def test_short_or_brief_movements_are_no_trips_and_do_not_split_the_stop() -> None:
    # 150 m away and back (under 200 m): the same stop.
    tr = Track().stay(600).go(150, 0, 1.4).stay(600).go(-150, 0, 1.4).stay(600)
    a = tr.run()
    assert a.trips == [] and len(a.stops) == 1
    assert a.stops[0].arrival_ms == T0 and a.stops[0].departure_ms == tr.ts[-1]
    # 400 m out and straight back within two minutes (no trip: under 180 s): the
    # stop before and the stop after, in the same place, are one stop.
    tr = Track().stay(600).go(400, 0, 7).go(-400, 0, 7).stay(600)
    a = tr.run()
    assert a.trips == [] and len(a.stops) == 1
    assert a.stops[0].arrival_ms == T0 and a.stops[0].departure_ms == tr.ts[-1]
    # 1 km in 60 s (a glitch or a very short hop): not a trip at min_trip_s 180.
    a = Track().stay(600).go(1000, 0, 1000 / 60).stay(600).run()
    assert a.trips == [] and len(a.stops) == 2
    # ... but is one when asked for trips of 30 s or more.
    a = Track().stay(600).go(1000, 0, 1000 / 60).stay(600).run(Params(min_trip_s=30))
    assert len(a.trips) == 1


def test_a_data_gap_ends_a_trip_but_not_a_stop() -> None:
    # Moving, no data for two hours, moving elsewhere: two trips, a gap between.
    tr = Track().stay(600).go(3000, 0, 10).gap(7200)
    tr.pos = offset(*A, 20_000, 0)
    a = tr.go(3000, 0, 10).stay(600).run()
    assert len(a.trips) == 2
    assert len(a.gaps) == 1 and (a.gaps[0].to_ms - a.gaps[0].from_ms) >= 7_200_000
    assert all(t.distance_m == pytest.approx(3000, rel=0.05) for t in a.trips)
    # At home, off for the night, at home again: one stop across the gap.
    a = Track().stay(600).gap(8 * 3600).stay(600).run()
    assert len(a.stops) == 1 and a.trips == [] and len(a.gaps) == 1
    assert a.stops[0].duration_s > 8 * 3600
    # A gap shorter than max_gap_s does not end a trip (20 minutes, 10 km on).
    tr = Track().stay(600).go(3000, 0, 10).gap(1200)
    tr.pos = offset(*tr.pos, 10_000, 0)
    tr.go(3000, 0, 10).stay(600)
    a = tr.run()
    assert len(a.trips) == 1 and a.gaps == []
    assert a.trips[0].distance_m == pytest.approx(16_000, rel=0.01)
    a = tr.run(Params(max_gap_s=600))
    assert len(a.trips) == 2 and len(a.gaps) == 1


def test_points_are_sorted_cleaned_and_deduplicated() -> None:
    tr = Track().stay(600).go(5000, 0, 10).stay(600)
    order = list(range(len(tr.ts)))
    random.Random(5).shuffle(order)
    ts = [tr.ts[i] for i in order] + [tr.ts[0]]
    lat = [tr.lat[i] for i in order] + [10.0]  # the same time again: dropped
    lon = [tr.lon[i] for i in order] + [10.0]
    ts += [T0 + 1, T0 + 2]
    lat += [float("nan"), 95.0]
    lon += [4.8, 4.8]
    a = analyse(ts, lat, lon, Params())
    b = tr.run()
    assert a.points == b.points == len(tr.ts)
    assert [(t.start_ms, t.end_ms) for t in a.trips] == [(t.start_ms, t.end_ms)
                                                       for t in b.trips]
    empty = analyse([], [], [], Params())
    assert empty.trips == empty.stops == [] and empty.points == 0 and empty.days == []


def _snapped(tr: Track, precision: float) -> Track:
    out = Track()
    out.ts = list(tr.ts)
    pairs = [snap(la, lo, precision) for la, lo in zip(tr.lat, tr.lon, strict=True)]
    out.lat = [p[0] for p in pairs]
    out.lon = [p[1] for p in pairs]
    return out


def test_under_snapping_no_movement_finer_than_the_grid_is_reported() -> None:
    """A still device on a cell corner: its snapped points jump between four cells
    1 to 1.4 km apart. Asked for any trip at all (0 m, 0 s), the analysis still sees
    one stop and no trip; without raising the parameters it would see dozens."""
    p = 1000.0
    lat_step = p / 111_320
    corner = ((5832 + 0.5) * lat_step, 4.85)
    row = snap(corner[0] + lat_step / 4, 4.85, p)[0]
    lon_step = p / (111_320 * math.cos(math.radians(row)))
    corner = (corner[0], (round(4.85 / lon_step) + 0.5) * lon_step)
    tr = Track(noise_m=5, seed=7)
    tr.pos = corner
    tr.stay(3 * 3600)
    snapped = _snapped(tr, p)
    assert len({(la, lo) for la, lo in zip(snapped.lat, snapped.lon, strict=True)}) >= 3
    anything = Params(min_trip_m=0, min_trip_s=0)
    a = snapped.run(anything, precision_m=p)
    assert a.trips == [] and len(a.stops) == 1
    assert a.params.stop_radius_m == a.params.min_trip_m == CELL_SPREAD * p
    naive = snapped.run(anything)  # the same points, the precision not told
    assert sum(t.distance_m for t in naive.trips) > 100_000  # hundreds of km "driven"


def test_under_snapping_trips_are_found_and_never_shorter_than_the_grid() -> None:
    p = 1000.0
    tr = Track(noise_m=3).stay(1200).go(5000, 2000, 30 / 3.6).stay(1800)
    tr.go(-5000, -2000, 30 / 3.6).stay(1200)
    # A 400 m walk to the neighbours and back: finer than the grid.
    tr.go(400, 0, 1.4).stay(900).go(-400, 0, 1.4).stay(900)
    a = _snapped(tr, p).run(Params(min_trip_m=0), precision_m=p)
    assert len(a.trips) == 2, [(t.distance_m, t.duration_s) for t in a.trips]
    assert all(t.distance_m >= p for t in a.trips)
    assert all(t.distance_m == pytest.approx(math.hypot(5000, 2000), rel=0.35)
               for t in a.trips)
    # Stop positions lie on the grid: snapping them again changes nothing.
    for s in a.stops:
        assert snap(s.lat, s.lon, p) == (s.lat, s.lon)
    # Without snapping the walk is seen.
    assert len(tr.run(Params(min_trip_m=0)).trips) == 4


def test_params_for_precision() -> None:
    asked = Params(stop_radius_m=300, min_trip_m=5000)
    assert asked.for_precision(None) == asked
    assert asked.for_precision(1000) == Params(stop_radius_m=1500, min_trip_m=5000)
    assert asked.for_precision(100) == asked
    assert Params().to_json() == {"stop_radius_m": 200, "min_stop_s": 300, "min_trip_m": 200,
                                  "min_trip_s": 180, "max_gap_s": 3600}


def test_days_split_at_midnight_in_the_time_zone_asked() -> None:
    start = int(datetime(2026, 11, 20, 23, 45, tzinfo=UTC).timestamp() * 1000)
    # 23:45-23:55 still, 23:55-00:05 driving 6 km, then still: the trip crosses midnight.
    tr = Track(start_ms=start).stay(600).go(6000, 0, 10).stay(600)
    a = tr.run(start_ms=start - 3_600_000, end_ms=tr.t + 3_600_000)
    d1, d2 = a.days
    assert (d1.day, d2.day) == (date(2026, 11, 20), date(2026, 11, 21))
    assert d1.distance_m + d2.distance_m == pytest.approx(a.trips[0].distance_m)
    assert d1.distance_m == pytest.approx(3000, rel=0.05)
    assert d1.moving_s == pytest.approx(300, abs=15)
    assert d2.moving_s == pytest.approx(300, abs=15)
    assert (d1.trips, d2.trips) == (1, 0)
    # In Amsterdam (UTC+1) all of it is on the 21st.
    b = tr.run(tz=ZoneInfo("Europe/Amsterdam"), start_ms=start, end_ms=tr.t)
    assert [d.day for d in b.days] == [date(2026, 11, 21)]
    assert b.days[0].distance_m == pytest.approx(6000, rel=0.01)
    # Every day of the range is listed, with or without points.
    c = tr.run(start_ms=start - 3 * 86_400_000, end_ms=tr.t)
    assert [d.day.day for d in c.days] == [17, 18, 19, 20, 21]
    assert c.days[0].distance_m == 0


def test_split_by_day_across_a_dst_change() -> None:
    ams = ZoneInfo("Europe/Amsterdam")
    # 2026-03-29: 23 hours long in Amsterdam.
    start = int(datetime(2026, 3, 29, 0, 0, tzinfo=ams).timestamp() * 1000)
    parts = split_by_day(start, start + 30 * 3_600_000, ams)
    assert [(d.day, ms // 3_600_000) for d, ms in parts] == [(29, 23), (30, 7)]


def test_place_events_and_time_in_places() -> None:
    depot = offset(*A, 5000, 0)
    places = PlaceSet([Place("depot", 3, parse_place(square(depot, 300))),
                       Place("city", 1, parse_place({"type": "Feature", "properties": {},
                                                     "geometry": square(A, 20_000)}))])
    tr = Track().stay(600).go(5000, 0, 30 / 3.6)
    arrive = tr.t
    tr.stay(1800)
    leave = tr.t
    tr.go(-5000, 0, 30 / 3.6).stay(600)
    a = tr.run(places=places)
    ev = [(e.place, e.event) for e in a.events]
    assert ev == [("depot", "enter"), ("depot", "leave")]  # in the city throughout
    enter, gone = (e.at_ms for e in a.events)
    assert arrive - 30_000 < enter <= arrive and leave - 10_000 <= gone < leave + 30_000
    assert a.stops[1].places == ("city", "depot")
    assert a.trips[0].end_places == ("city", "depot")
    assert a.trips[0].start_places == ("city",)
    (day,) = a.days
    assert day.places["depot"] == pytest.approx(1800, abs=40)
    assert day.places["city"] == pytest.approx((tr.t - 10_000 - T0) / 1000)
    # A point on the boundary is in the place.
    west, south = square(depot, 300)["coordinates"][0][0]
    assert places.containing([west, west - 0.0001], [south, south]) == [
        {"city", "depot"}, {"city"}]


def test_the_answer() -> None:
    a = Track().stay(600).go(5000, 0, 30 / 3.6).stay(600).run()
    out = to_json(a)
    (trip,) = out["trips"]
    assert trip["distance_m"] == 5000 and trip["points"] == len(trip["path"])
    assert trip["path"][0] == [a.lon[a.trips[0].first], a.lat[a.trips[0].first]]
    assert trip["start"]["at"] == datetime.fromtimestamp(a.trips[0].start_ms / 1000,
                                                         UTC).isoformat()
    # A long trip's path is cut down to PATH_MAX positions, ends kept.
    long = Track(step_s=1).stay(600).go(50_000, 0, 10).stay(600).run()
    path = to_json(long)["trips"][0]["path"]
    assert len(path) == 1000
    assert path[-1] == [long.lon[long.trips[0].last], long.lat[long.trips[0].last]]


def test_places_are_validated_as_policy_zones_are() -> None:
    with pytest.raises(PlaceError) as err:
        parse_place({"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1],
                                                         [0, 0]]]})
    assert err.value.issues[0].path == "coordinates"
    assert "Self-intersection" in err.value.issues[0].message
    with pytest.raises(PlaceError) as err:
        parse_place({"type": "Point", "coordinates": [0, 0]})
    assert err.value.issues[0].path == "type"
    with pytest.raises(PlaceError) as err:
        parse_place({"type": "Polygon", "coordinates": [[[0, 0], [200, 0], [1, 1], [0, 0]]]})
    assert err.value.issues[0].path == "coordinates[0][1]"
    # Across the antimeridian: a narrow band, not the rest of the world.
    band = Place("band", 1, parse_place({"type": "Polygon", "coordinates": [
        [[179, -1], [-179, -1], [-179, 1], [179, 1], [179, -1]]]}))
    assert PlaceSet([band]).containing([179.5, -179.5, 0.0], [0.0, 0.0, 0.0]) == [
        {"band"}, {"band"}, set()]
    assert band.area_m2 == pytest.approx((2 * 111_320) ** 2, rel=0.01)


def test_a_month_of_points_every_10_s_is_analysed() -> None:
    """The request's limit (200,000 points) analysed at all; its speed is measured in
    load_tests/, not here."""
    tr = Track(step_s=10, noise_m=3)
    for _ in range(200):
        tr.stay(3000).go(3000, 1000, 12)
    a = tr.run(start_ms=T0, end_ms=tr.t)
    assert a.points == len(tr.ts) > 60_000
    assert len(a.trips) == 200
    assert sum(d.trips for d in a.days) == 200
