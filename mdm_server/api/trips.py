"""GET /api/v1/devices/{device}/trips: trips, stops, place events and days computed
from the device's stored locations (mdm_server/analysis/trips.py has the rules).

Reading it is reading the device's personal data: written to the audit log as
``personal_data.read`` with ``what: trips``, which the device's user sees in their
access log. The answer is honest about what the policy did to the data: the
precision in force over the range (from the policy versions stamped on the records
read, not from today's policy), the points the policy suppressed on the range's
days, and the parameters as raised to that precision.

The records are opened (each is sealed) and analysed on the policy threads
(mdm_server/policy/offload.py), never on the event loop: a month of points every
10 s is a quarter of a million records.
"""

from __future__ import annotations

import functools
import re
import zoneinfo
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from mdm_server.analysis.places import Place, PlaceSet, parse_place
from mdm_server.analysis.trips import BOUNDS, Params, analyse, to_json
from mdm_server.api.auth import require_reader
from mdm_server.api.context import POOL, audit_keys, keyring
from mdm_server.api.data import query_time
from mdm_server.api.devices import log_personal_read
from mdm_server.api.errors import json_error
from mdm_server.policy.offload import policy_work
from mdm_server.storage import places as place_store
from mdm_server.storage.sealing import DeviceReader, ts_ms
from privacy_filters import FLOOR_ID, FLOOR_SUFFIX, PERSONAL_FLOOR

__all__ = ["MAX_POINTS", "MAX_RANGE", "routes"]

#: One request covers at most this long a range ...
MAX_RANGE = timedelta(days=31)
#: ... and at most this many stored location points (a point every 10 s for 23 days).
MAX_POINTS = 200_000
_CHUNK = 5000
_NUMBER = re.compile(r"[0-9]{1,6}(\.[0-9]{1,3})?")
_TZ = re.compile(r"[A-Za-z][A-Za-z0-9_+\-/]{0,63}")
_DEVICE = "{device:[A-Za-z0-9_-]{1,64}}"


@dataclass(frozen=True, slots=True)
class TripsQuery:
    start: datetime
    end: datetime
    tz_name: str
    tz: tzinfo
    params: Params


def _time(request: web.Request, name: str) -> datetime:
    t = query_time(request, name)
    if t is None:
        raise web.HTTPBadRequest(reason=f"{name} is required (RFC 3339)")
    return t


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _zone(raw: str | None) -> tuple[str, tzinfo]:
    if raw is None or raw == "UTC":
        return "UTC", UTC
    if not _TZ.fullmatch(raw) or raw not in _zones():
        raise web.HTTPBadRequest(reason="tz must be an IANA time zone name (e.g. "
                                        "Europe/Amsterdam) known to the server")
    return raw, zoneinfo.ZoneInfo(raw)


def parse_trips_query(request: web.Request) -> TripsQuery:
    start, end = _time(request, "from"), _time(request, "to")
    if end <= start:
        raise web.HTTPBadRequest(reason="to must be after from")
    if end - start > MAX_RANGE:
        raise web.HTTPBadRequest(reason=f"from and to may be at most {MAX_RANGE.days} days "
                                        "apart")
    name, tz = _zone(request.query.get("tz"))
    asked: dict[str, float] = {}
    for key in BOUNDS:
        raw = request.query.get(key)
        if raw is None:
            continue
        lo, hi = BOUNDS[key]
        if not _NUMBER.fullmatch(raw) or not lo <= float(raw) <= hi:
            raise web.HTTPBadRequest(reason=f"{key} must be a number in {lo:g}..{hi:g}")
        asked[key] = float(raw)
    return TripsQuery(start, end, name, tz, Params(**asked))


# --- reading ---------------------------------------------------------------------------

#: (policy id, version) -> [points, largest accuracy_m or None]
Stamps = dict[tuple[str | None, int | None], list[Any]]


def _is_num(v: object) -> bool:
    return type(v) in (int, float)


def _open(reader: DeviceReader, rows: list[asyncpg.Record], stamps: Stamps
          ) -> tuple[list[int], list[float], list[float]]:
    """Open a chunk of location records: (ms, lat, lon) of each, and what policy
    versions shaped them. In a thread."""
    ts: list[int] = []
    lats: list[float] = []
    lons: list[float] = []
    for r in rows:
        data = reader.data(r)
        if not isinstance(data, dict) or not _is_num(data.get("lat")) \
                or not _is_num(data.get("lon")):
            continue  # being erased right now, or not a position
        ts.append(ts_ms(r["ts"]))
        lats.append(float(data["lat"]))
        lons.append(float(data["lon"]))
        entry = stamps.setdefault((r["policy_id"], r["policy_version"]), [0, None])
        entry[0] += 1
        acc = data.get("accuracy_m")
        if isinstance(acc, int | float) and (entry[1] is None or acc > entry[1]):
            entry[1] = float(acc)
    return ts, lats, lons


async def _precisions(conn: asyncpg.Connection, tenant: str, stamps: Stamps
                      ) -> list[dict[str, Any]]:
    """Per policy version that shaped the points: its grid (``precision_m``; null:
    none), ``known`` false when its body is no longer stored (then the largest
    accuracy the points state, which snapping never leaves below the grid)."""
    names: dict[tuple[str | None, int | None], str | None] = {}
    for pid, _ in stamps:
        if pid is None or pid == FLOOR_ID:
            names[(pid, _)] = None
        else:
            names[(pid, _)] = pid.removesuffix(FLOOR_SUFFIX)
    wanted = [(n, v) for (_, v), n in names.items() if n is not None and v is not None]
    rows = await conn.fetch(
        """SELECT name, version, body IS NOT NULL AS has_body,
                  (body #>> '{location,precision_m}')::float8 AS precision_m
           FROM policies WHERE tenant_id = $1
             AND (name, version) IN (SELECT * FROM unnest($2::text[], $3::int[]))""",
        tenant, [n for n, _ in wanted], [v for _, v in wanted])
    found = {(r["name"], r["version"]): r for r in rows}
    floor_p = PERSONAL_FLOOR.location.precision_m
    out = []
    for (pid, version), (points, accuracy) in sorted(
            stamps.items(), key=lambda kv: (str(kv[0][0]), kv[0][1] or 0)):
        known, precision = False, None
        if pid == FLOOR_ID:
            known, precision = True, floor_p
        elif pid is not None:
            row = found.get((names[(pid, version)], version))
            if row is not None and row["has_body"]:
                known, precision = True, row["precision_m"]
                if pid.endswith(FLOOR_SUFFIX) and floor_p is not None:
                    precision = max(precision or 0.0, floor_p)
        if not known:
            precision = accuracy
        out.append({"policy": pid, "version": version, "points": points,
                    "precision_m": precision, "known": known})
    return out


#: Parsed places by (tenant, name, version): a version never changes.
_PLACES: OrderedDict[tuple[str, str, int], Place] = OrderedDict()
_PLACES_MAX = 2000


def _parse_places(versions: list[place_store.PlaceVersion]) -> list[Place]:
    return [Place(v.name, v.version, parse_place(v.body)) for v in versions]


async def _places(conn: asyncpg.Connection, tenant: str) -> list[Place]:
    """The tenant's places in force, parsed (off the loop), cached by version."""
    cached = {(n, v) for t, n, v in _PLACES if t == tenant}
    current = await place_store.current_places(conn, tenant, known=cached)
    new = [v for v in current if v.body is not None]
    for p in await policy_work(_parse_places, new):
        _PLACES[(tenant, p.name, p.version)] = p
    out = []
    for v in current:
        key = (tenant, v.name, v.version)
        if key in _PLACES:
            _PLACES.move_to_end(key)
            out.append(_PLACES[key])
    while len(_PLACES) > _PLACES_MAX:
        _PLACES.popitem(last=False)
    return out


# --- the answer ------------------------------------------------------------------------


def _notes(used: Params, precision: float | None, policies: list[dict[str, Any]],
           suppressed: int, small: list[str]) -> list[str]:
    """What the user of the answer must know about the data, in plain words."""
    out = []
    if precision:
        out.append(f"Locations were stored rounded to a grid of about {precision:g} m by "
                   f"the policy: stops are found within {used.stop_radius_m:g} m and no "
                   f"trip shorter than {used.min_trip_m:g} m is reported; nothing finer "
                   "than the grid is shown.")
    if any(not p["known"] for p in policies):
        out.append("Some points were shaped by a policy version that is no longer stored: "
                   "their precision is taken as the largest accuracy they state.")
    if suppressed:
        out.append(f"{suppressed} location point{'s were' if suppressed != 1 else ' was'} "
                   "not stored on these days (the policy suppressed them): trips and stops "
                   "may be missing or cut short there.")
    for name in small:
        out.append(f"Place {name} is smaller than one grid cell: when the device was in it "
                   "cannot be told reliably.")
    return out


def _answer(device: str, q: TripsQuery, ts: list[int], lats: list[float], lons: list[float],
            policies: list[dict[str, Any]], suppressed: tuple[int, list[str]],
            places: list[Place]) -> bytes:
    """The analysis, as JSON. In a thread."""
    grids = [p["precision_m"] for p in policies if p["precision_m"]]
    precision = max(grids) if grids else None
    result = analyse(ts, lats, lons, q.params, precision_m=precision,
                     places=PlaceSet(places), tz=q.tz,
                     start_ms=int(q.start.timestamp() * 1000),
                     end_ms=int(q.end.timestamp() * 1000))
    cell = (precision or 0.0) ** 2
    place_list = [{"name": p.name, "version": p.version,
                   "smaller_than_precision": bool(cell) and p.area_m2 < cell}
                  for p in places]
    small = [p.name for p in places if cell and p.area_m2 < cell]
    return orjson.dumps({
        "device": device, "from": q.start.isoformat(), "to": q.end.isoformat(),
        "tz": q.tz_name,
        "parameters": result.params.to_json(), "asked": q.params.to_json(),
        "precision": {"precision_m": precision, "policies": policies},
        "suppressed": {"points": suppressed[0], "days": suppressed[1]},
        "places": place_list,
        "notes": _notes(result.params, precision, policies, suppressed[0], small),
        **to_json(result),
    })


async def device_trips(request: web.Request) -> web.Response:
    who = await require_reader(request, request.app[POOL])
    device = request.match_info["device"]
    q = parse_trips_query(request)
    ring = keyring(request)
    args = (who.tenant, device, q.start, q.end)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM devices WHERE "
                                   "tenant_id = $1 AND device_id = $2)", who.tenant, device):
            raise web.HTTPNotFound(reason="no such device")
        n = await conn.fetchval(
            "SELECT count(*) FROM telemetry WHERE tenant_id = $1 AND device_id = $2 "
            "AND kind = 'location' AND ts >= $3 AND ts < $4", *args)
        if n > MAX_POINTS:
            return json_error(422, f"the range holds more than {MAX_POINTS} location points: "
                                   "ask for a shorter one", code="too_many_points")
        reader = await DeviceReader.load(conn, ring, who.tenant, device)
        ts: list[int] = []
        lats: list[float] = []
        lons: list[float] = []
        stamps: Stamps = {}
        cursor = await conn.cursor(
            "SELECT kind, record_id, ts, key_id, sealed, data, policy_id, policy_version "
            "FROM telemetry WHERE tenant_id = $1 AND device_id = $2 AND kind = 'location' "
            "AND ts >= $3 AND ts < $4 ORDER BY ts, record_id", *args)
        while rows := await cursor.fetch(_CHUNK):
            t, la, lo = await policy_work(_open, reader, rows, stamps)
            ts += t
            lats += la
            lons += lo
        policies = await _precisions(conn, who.tenant, stamps)
        row = await conn.fetchrow(
            """SELECT coalesce(sum(count), 0) AS n,
                      coalesce(array_agg(day::text ORDER BY day), '{}') AS days
               FROM suppressed_locations
               WHERE tenant_id = $1 AND device_id = $2 AND count > 0
                 AND day >= ($3::timestamptz AT TIME ZONE 'UTC')::date
                 AND day <= (($4::timestamptz - interval '1 millisecond')
                             AT TIME ZONE 'UTC')::date""",
            *args[:2], q.start, q.end)
        places = await _places(conn, who.tenant)
        await log_personal_read(conn, audit_keys(request), who, device, "trips")
    body = await policy_work(_answer, device, q, ts, lats, lons, policies,
                             (int(row["n"]), list(row["days"])), places)
    return web.Response(body=body, content_type="application/json")


def routes() -> list[web.RouteDef]:
    return [web.get(f"/api/v1/devices/{_DEVICE}/trips", device_trips)]

