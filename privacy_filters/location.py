"""Location shaping: grid snapping and geofences (GeoJSON zones), vectorised.

Grid (``precision_m``)
    Latitude step ``precision_m / 111_320`` degrees; longitude step
    ``precision_m / (111_320 * cos(snapped latitude))`` with the cosine clamped to at
    least 0.01 (about 89.4 degrees) and the step to at most 360 degrees, so cells stay
    about ``precision_m`` wide up to the poles. Each coordinate is rounded to the
    nearest grid line (halves to even), the latitude clamped to [-90, 90], a longitude
    beyond +-180 wrapped by 360, and both rounded to 7 decimals.

Zones
    Each zone is a GeoJSON ``Polygon`` or ``MultiPolygon`` (or a ``Feature`` with such a
    geometry), lon/lat (RFC 7946), altitudes ignored. All zones of one list are merged
    into one prepared geometry and a whole batch is tested at once with
    ``shapely.intersects_xy``:

    * a point ON a zone boundary counts as inside the zone;
    * a point in a hole of a polygon is outside it;
    * the parts of a MultiPolygon may touch or overlap (the zone is their union);
    * a polygon whose consecutive longitudes jump by more than 180 degrees crosses the
      antimeridian: its negative longitudes are shifted by +360, and the polygon is
      split into its part within [-180, 180] and its part beyond 180 shifted back by
      -360. A MultiPolygon already split at +-180 (RFC 7946 style) needs nothing.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from privacy_filters.errors import PolicyIssue

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from shapely.geometry.base import BaseGeometry

    FloatArray = npt.NDArray[np.float64]
    BoolArray = npt.NDArray[np.bool_]

# numpy and shapely are imported where they are used, not here: a policy without
# zones or snapping never needs them, and an ingest process then starts without
# loading them (tens of milliseconds before its first commit).

__all__ = [
    "COS_MIN",
    "MAX_VERTICES",
    "MAX_ZONES",
    "METERS_PER_DEGREE",
    "ZoneSet",
    "build_zones",
    "snap",
    "snap_arrays",
]

METERS_PER_DEGREE: Final = 111_320.0
COS_MIN: Final = 0.01
MAX_ZONES: Final = 10_000  # only_inside + never_inside together
MAX_VERTICES: Final = 1_000_000  # positions in all zones together

_ZONE_SHAPE = "must be a GeoJSON Polygon or MultiPolygon object, or a Feature with one"


# --- snapping ---------------------------------------------------------------------------


def snap_arrays(
    lats: FloatArray, lons: FloatArray, precision_m: float
) -> tuple[FloatArray, FloatArray]:
    """Snap arrays of coordinates to the ``precision_m`` grid (see the module doc)."""
    import numpy as np

    lat_step = precision_m / METERS_PER_DEGREE
    lat_s = np.clip(np.round(lats / lat_step) * lat_step, -90.0, 90.0)
    cos = np.maximum(np.cos(np.radians(lat_s)), COS_MIN)
    lon_step = np.minimum(precision_m / (METERS_PER_DEGREE * cos), 360.0)
    lon_s = np.round(lons / lon_step) * lon_step
    lon_s = np.where(lon_s > 180.0, lon_s - 360.0, lon_s)
    lon_s = np.where(lon_s < -180.0, lon_s + 360.0, lon_s)
    return np.round(lat_s, 7), np.round(lon_s, 7)


def snap(lat: float, lon: float, precision_m: float) -> tuple[float, float]:
    """Snap one point (the scalar form of :func:`snap_arrays`)."""
    import numpy as np

    la, lo = snap_arrays(np.array([lat]), np.array([lon]), precision_m)
    return float(la[0]), float(lo[0])


# --- zones ------------------------------------------------------------------------------


def _is_number(v: object) -> bool:
    return (type(v) is float and math.isfinite(v)) or type(v) is int


def _ring(ring: object, path: str, issues: list[PolicyIssue]) -> list[tuple[float, float]] | None:
    if not isinstance(ring, list | tuple):
        issues.append(PolicyIssue(path, "must be a list of positions (a linear ring)"))
        return None
    if len(ring) < 4:
        issues.append(PolicyIssue(path, "a linear ring needs at least 4 positions"))
        return None
    fast = _good_ring(ring)
    if fast is not None:
        return fast
    # Something is wrong: find it, position by position, and say where.
    out: list[tuple[float, float]] = []
    for i, pos in enumerate(ring):
        if (
            not isinstance(pos, list | tuple)
            or not 2 <= len(pos) <= 3
            or not all(_is_number(c) for c in pos)
        ):
            issues.append(PolicyIssue(f"{path}[{i}]", "must be a position [lon, lat]"))
            return None
        lon, lat = float(pos[0]), float(pos[1])
        if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
            issues.append(
                PolicyIssue(f"{path}[{i}]", "lon must be in [-180, 180] and lat in [-90, 90]")
            )
            return None
        out.append((lon, lat))
    if out[0] != out[-1]:
        issues.append(PolicyIssue(path, "the ring is not closed (first and last positions differ)"))
        return None
    return out


def _good_ring(ring: list[Any] | tuple[Any, ...]) -> list[tuple[float, float]] | None:
    """The ring's (lon, lat) positions if every one is good and the ring is closed,
    else None (then :func:`_ring` finds and reports the problem). The common case,
    checked inline: a policy may hold 100,000 positions."""
    out: list[tuple[float, float]] = []
    append = out.append
    for pos in ring:
        if type(pos) is not list and type(pos) is not tuple:
            return None
        n = len(pos)
        if n == 2:
            lon, lat = pos
        elif n == 3:
            lon, lat, alt = pos
            if not _is_number(alt):
                return None
        else:
            return None
        t, u = type(lon), type(lat)
        # The range checks also refuse NaN and infinities.
        if not ((t is float or t is int) and (u is float or u is int)
                and -180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
            return None
        append((float(lon), float(lat)))
    return out if out[0] == out[-1] else None


def _crosses_antimeridian(rings: list[list[tuple[float, float]]]) -> bool:
    for ring in rings:
        for (a, _), (b, _) in itertools.pairwise(ring):
            if abs(b - a) > 180.0:
                return True
    return False


def _polygon(
    coords: object, path: str, issues: list[PolicyIssue]
) -> tuple[BaseGeometry | None, int]:
    """One GeoJSON polygon (list of rings) -> (geometry or None, number of positions)."""
    if not isinstance(coords, list | tuple) or not coords:
        issues.append(PolicyIssue(path, "a polygon must be a non-empty list of linear rings"))
        return None, 0
    rings: list[list[tuple[float, float]]] = []
    ok = True
    for j, ring in enumerate(coords):
        r = _ring(ring, f"{path}[{j}]", issues)
        if r is None:
            ok = False
        else:
            rings.append(r)
    count = sum(len(r) for r in rings)
    if not ok:
        return None, count
    import shapely
    from shapely import affinity

    crossing = _crosses_antimeridian(rings)
    if crossing:
        rings = [[(lon + 360.0 if lon < 0 else lon, lat) for lon, lat in r] for r in rings]
    poly = shapely.Polygon(rings[0], rings[1:])
    if not shapely.is_valid(poly):
        issues.append(PolicyIssue(path, f"invalid polygon: {shapely.is_valid_reason(poly)}"))
        return None, count
    if crossing:
        world, beyond = _world_and_beyond()
        west = shapely.intersection(poly, world)
        east = affinity.translate(shapely.intersection(poly, beyond), xoff=-360.0)
        poly = shapely.union(west, east)
    return poly, count


@functools.cache
def _world_and_beyond() -> tuple[BaseGeometry, BaseGeometry]:
    """[-180, 180] x [-90, 90], and the band beyond 180 that a shifted polygon reaches."""
    import shapely

    return shapely.box(-180.0, -90.0, 180.0, 90.0), shapely.box(180.0, -90.0, 540.0, 90.0)


def _zone(zone: object, path: str, issues: list[PolicyIssue]) -> tuple[BaseGeometry | None, int]:
    if not isinstance(zone, dict):
        issues.append(PolicyIssue(path, _ZONE_SHAPE))
        return None, 0
    if zone.get("type") == "Feature":
        zone = zone.get("geometry")
        path = f"{path}.geometry"
        if not isinstance(zone, dict):
            issues.append(PolicyIssue(path, "must be a GeoJSON Polygon or MultiPolygon object"))
            return None, 0
    kind = zone.get("type")
    coords = zone.get("coordinates")
    cpath = f"{path}.coordinates"
    if kind == "Polygon":
        return _polygon(coords, cpath, issues)
    if kind == "MultiPolygon":
        if not isinstance(coords, list | tuple) or not coords:
            issues.append(PolicyIssue(cpath, "a MultiPolygon needs a non-empty list of polygons"))
            return None, 0
        parts: list[BaseGeometry] = []
        total = 0
        ok = True
        for k, poly_coords in enumerate(coords):
            geom, n = _polygon(poly_coords, f"{cpath}[{k}]", issues)
            total += n
            if geom is None:
                ok = False
            else:
                parts.append(geom)
        if not ok:
            return None, total
        import shapely

        return shapely.union_all(parts), total
    issues.append(PolicyIssue(f"{path}.type", _ZONE_SHAPE))
    return None, 0


def build_zones(
    zone_lists: Sequence[tuple[str, Sequence[object]]], issues: list[PolicyIssue]
) -> list[list[BaseGeometry]]:
    """Check and build zone lists, e.g. ``[("location.only_inside", [...]), ...]``.

    Appends every problem to ``issues`` (paths like ``location.only_inside[2]``) and
    returns, per list, the geometries of its valid zones. The limits
    (:data:`MAX_ZONES`, :data:`MAX_VERTICES`) apply to all lists together.
    """
    total_zones = sum(len(zones) for _, zones in zone_lists)
    if total_zones > MAX_ZONES:
        issues.append(
            PolicyIssue(
                zone_lists[0][0].rsplit(".", 1)[0] if zone_lists else "location",
                f"at most {MAX_ZONES} zones in total (only_inside and never_inside), "
                f"got {total_zones}",
            )
        )
        return [[] for _ in zone_lists]
    vertices = 0
    out: list[list[BaseGeometry]] = []
    for base, zones in zone_lists:
        geoms: list[BaseGeometry] = []
        for i, zone in enumerate(zones):
            if vertices > MAX_VERTICES:
                break
            geom, n = _zone(zone, f"{base}[{i}]", issues)
            vertices += n
            if geom is not None:
                geoms.append(geom)
        out.append(geoms)
    if vertices > MAX_VERTICES:
        issues.append(
            PolicyIssue(
                zone_lists[0][0].rsplit(".", 1)[0],
                f"at most {MAX_VERTICES} positions in all zones together",
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class ZoneSet:
    """The union of some zones, prepared for batch point tests."""

    geometry: Any  # a prepared shapely geometry (shapely ships no type stubs)
    count: int

    @classmethod
    def of(cls, geoms: Sequence[BaseGeometry]) -> ZoneSet | None:
        """The prepared union of ``geoms``; ``None`` for an empty list."""
        if not geoms:
            return None
        import shapely

        union = shapely.union_all(list(geoms))
        shapely.prepare(union)
        return cls(union, len(geoms))

    def contains(self, lons: FloatArray, lats: FloatArray) -> BoolArray:
        """Per point: inside or on the boundary of some zone (NaN: never inside)."""
        import shapely

        result: BoolArray = shapely.intersects_xy(self.geometry, lons, lats)
        return result
