"""Named places: a GeoJSON area each, validated as policy zones are
(privacy_filters.location: rings, validity, antimeridian), tested in batches. Pure.

A place is a GeoJSON ``Polygon`` or ``MultiPolygon`` object, or a ``Feature`` with
one (its ``properties`` are kept, not used), ``[lon, lat]`` (RFC 7946). A point on
its boundary is in it; a point in a hole is not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from privacy_filters import PolicyIssue
from privacy_filters.location import METERS_PER_DEGREE, build_zones

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    FloatArray = npt.NDArray[np.float64]
    IntArray = npt.NDArray[np.int64]

__all__ = ["Place", "PlaceError", "PlaceSet", "parse_place"]


class PlaceError(ValueError):
    """A place that is not a valid area: every problem, each with its path."""

    def __init__(self, issues: list[PolicyIssue]) -> None:
        super().__init__(f"{len(issues)} problem(s)")
        self.issues = issues


@dataclass(frozen=True, slots=True)
class Place:
    name: str
    version: int
    geometry: Any  # a shapely geometry (shapely ships no type stubs)

    @property
    def area_m2(self) -> float:
        """Its area, near enough: degrees squared scaled at its centre's latitude."""
        import shapely

        lat = shapely.centroid(self.geometry).y
        scale = METERS_PER_DEGREE ** 2 * max(math.cos(math.radians(lat)), 0.01)
        return float(shapely.area(self.geometry)) * scale


def _path(path: str) -> str:
    """``place[0].coordinates[0]`` (build_zones' path for our one zone) ->
    ``coordinates[0]``; the zone itself -> ``(body)``."""
    rest = path.removeprefix("place[0]").lstrip(".")
    return rest or "(body)"


def parse_place(doc: object) -> Any:
    """The shapely geometry of a place document; PlaceError listing every problem."""
    issues: list[PolicyIssue] = []
    (geoms,) = build_zones([("place", [doc])], issues)
    if issues or not geoms:
        raise PlaceError([PolicyIssue(_path(i.path), i.message) for i in issues] or
                         [PolicyIssue("(body)", "not an area")])
    return geoms[0]


class PlaceSet:
    """Places prepared for testing many points at once (an STRtree of them)."""

    def __init__(self, places: Sequence[Place]) -> None:
        import shapely

        self.places = list(places)
        self._tree = shapely.STRtree([p.geometry for p in self.places]) if self.places \
            else None

    def hits(self, lons: FloatArray, lats: FloatArray) -> tuple[IntArray, IntArray]:
        """Every (point index, place index) pair of a point in a place (boundary
        included), sorted by place, then point."""
        import numpy as np
        import shapely

        if self._tree is None or not len(lons):
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        points = shapely.points(np.asarray(lons, dtype=np.float64),
                                np.asarray(lats, dtype=np.float64))
        pts, plc = self._tree.query(points, predicate="intersects")
        order = np.lexsort((pts, plc))
        return pts[order].astype(np.int64), plc[order].astype(np.int64)

    def containing(self, lons: FloatArray, lats: FloatArray) -> list[set[str]]:
        """Per point: the names of the places it is in (boundary included)."""
        out: list[set[str]] = [set() for _ in range(len(lons))]
        pts, plc = self.hits(lons, lats)
        for i, j in zip(pts.tolist(), plc.tolist(), strict=True):
            out[i].add(self.places[j].name)
        return out
