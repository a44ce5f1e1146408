"""/api/v1/places: named places (a GeoJSON area each), versioned like policies.

Admins define them; admins and auditors read them. The trips analysis
(mdm_server/api/trips.py) adds enter/leave events and time per place per day for the
places in force. A place is the tenant's, not a device's: reading one is not a read
of personal data. Parsing (GEOS validates every polygon) and decoding run on the
policy threads, never on the event loop.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from mdm_server import audit
from mdm_server.analysis.places import Place, PlaceError, parse_place
from mdm_server.api.auth import require_admin, require_reader
from mdm_server.api.context import CONFIG, POOL, audit_keys
from mdm_server.api.data import page_limit
from mdm_server.api.errors import json_error
from mdm_server.api.limits import body_limit
from mdm_server.policy.offload import policy_work
from mdm_server.storage import places as store

__all__ = ["PLACE_BODY_LIMIT", "routes"]

#: One place: an area of tens of thousands of positions.
PLACE_BODY_LIMIT = 1024 * 1024

_NAME = "{place:[A-Za-z0-9_-]{1,64}}"
_VERSION = "{version:[0-9]{1,9}}"


def _meta_json(v: store.PlaceVersion) -> dict[str, Any]:
    return {"name": v.name, "version": v.version, "deleted": v.deleted, "pruned": v.pruned,
            "bytes": v.size, "created_at": v.created_at.isoformat(),
            "created_by": v.created_by}


def _area(body: Any) -> float:
    return round(Place("", 0, parse_place(body)).area_m2, 1)


def _version_bytes(v: store.PlaceVersion) -> bytes:
    """The version with its area and ``area_m2`` where it has a body. In a thread."""
    out = _meta_json(v)
    if v.body is not None:
        out["place"] = v.body
        out["area_m2"] = _area(v.body)
    return orjson.dumps(out)


def _json_bytes(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


def _prepare(raw: bytes) -> tuple[str, Any, float]:
    """The place as stored (JSON text), as decoded, and its area. PlaceError."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise web.HTTPBadRequest(reason="the body is not valid JSON") from None
    area = round(Place("", 0, parse_place(doc)).area_m2, 1)
    return orjson.dumps(doc).decode(), doc, area


async def list_places(request: web.Request) -> web.Response:
    """A page of the places in force (without their areas), and the storage used."""
    who = await require_reader(request, request.app[POOL])
    limit = page_limit(request)
    after = request.query.get("cursor")
    if after is not None and (not after.isascii() or not 0 < len(after) <= 64
                              or not all(c.isalnum() or c in "_-" for c in after)):
        raise web.HTTPBadRequest(reason="cursor is not valid")
    async with request.app[POOL].acquire() as conn:
        found = await store.list_places(conn, who.tenant, after=after, limit=limit + 1)
        used = await store.stored_bytes(conn, who.tenant)
    more = len(found) > limit
    found = found[:limit]
    return web.json_response({
        "places": [_meta_json(v) for v in found],
        "next": found[-1].name if more and found else None,
        "storage": {"bytes": used, "cap_bytes": request.app[CONFIG].place_store_bytes}})


async def get_place(request: web.Request) -> web.Response:
    who = await require_reader(request, request.app[POOL])
    async with request.app[POOL].acquire() as conn:
        v = await store.get_place(conn, who.tenant, request.match_info["place"])
    if v is None:
        raise web.HTTPNotFound(reason="no such place")
    return _json_bytes(await policy_work(_version_bytes, v))


@body_limit(PLACE_BODY_LIMIT)
async def put_place(request: web.Request) -> web.Response:
    who = await require_admin(request, request.app[POOL])
    name = request.match_info["place"]
    try:
        text, doc, area = await policy_work(_prepare, await request.read())
    except PlaceError as err:
        return json_error(422, "the place is not valid: a GeoJSON Polygon or MultiPolygon, "
                               "or a Feature of one",
                          issues=[{"path": i.path, "message": i.message} for i in err.issues])
    cap = request.app[CONFIG].place_store_bytes
    try:
        async with request.app[POOL].acquire() as conn, conn.transaction():
            v, pruned = await store.store_version(conn, who.tenant, name, text, who.name,
                                                  cap_bytes=cap)
            details: dict[str, Any] = {"version": v.version}
            if pruned:
                details["pruned_versions"] = pruned
            await audit.append(conn, audit_keys(request), tenant=who.tenant, actor=who.name,
                               action="place.put", target=f"place:{name}", details=details)
    except store.PlaceStoreFull:
        return json_error(
            409, f"the tenant's places would take more than the {cap // (1024 * 1024)} MiB "
                 "they may: the places in force and this version do not fit even with every "
                 "older version pruned; delete or simplify a place",
            code="place_storage_full")
    body = orjson.dumps({**_meta_json(v), "place": doc, "area_m2": area})
    return _json_bytes(body, status=201 if v.version == 1 else 200)


async def delete_place(request: web.Request) -> web.Response:
    who = await require_admin(request, request.app[POOL])
    name = request.match_info["place"]
    async with request.app[POOL].acquire() as conn, conn.transaction():
        v = await store.delete_place(conn, who.tenant, name, who.name)
        if v is not None:
            await audit.append(conn, audit_keys(request), tenant=who.tenant, actor=who.name,
                               action="place.delete", target=f"place:{name}",
                               details={"version": v.version})
    if v is None:
        raise web.HTTPNotFound(reason="no such place")
    return web.Response(status=204)


def _version_cursor(request: web.Request) -> int | None:
    raw = request.query.get("cursor")
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        raise web.HTTPBadRequest(reason="cursor is not valid")
    return int(raw)


async def list_versions(request: web.Request) -> web.Response:
    who = await require_reader(request, request.app[POOL])
    name = request.match_info["place"]
    limit, after = page_limit(request), _version_cursor(request)
    async with request.app[POOL].acquire() as conn:
        versions = await store.list_versions(conn, who.tenant, name, after=after,
                                             limit=limit + 1)
        if not versions and not await store.place_exists(conn, who.tenant, name):
            raise web.HTTPNotFound(reason="no such place")
    more = len(versions) > limit
    versions = versions[:limit]
    return web.json_response({"versions": [_meta_json(v) for v in versions],
                              "next": str(versions[-1].version) if more else None})


async def get_version(request: web.Request) -> web.Response:
    who = await require_reader(request, request.app[POOL])
    async with request.app[POOL].acquire() as conn:
        v = await store.get_version(conn, who.tenant, request.match_info["place"],
                                    int(request.match_info["version"]))
    if v is None:
        raise web.HTTPNotFound(reason="no such place version")
    return _json_bytes(await policy_work(_version_bytes, v))


def routes() -> list[web.RouteDef]:
    base = "/api/v1/places"
    return [
        web.get(base, list_places),
        web.get(f"{base}/{_NAME}", get_place),
        web.put(f"{base}/{_NAME}", put_place),
        web.delete(f"{base}/{_NAME}", delete_place),
        web.get(f"{base}/{_NAME}/versions", list_versions),
        web.get(f"{base}/{_NAME}/versions/{_VERSION}", get_version),
    ]
