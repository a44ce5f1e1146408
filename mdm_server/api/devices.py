"""/api/v1/devices: the tenant's devices (admins)."""

from __future__ import annotations

from aiohttp import web

from mdm_server.api.auth import require_admin
from mdm_server.api.context import POOL

__all__ = ["routes"]


async def list_devices(request: web.Request) -> web.Response:
    who = await require_admin(request, request.app[POOL])
    rows = await request.app[POOL].fetch(
        "SELECT device_id, ownership, groups, status, enrolled_at FROM devices "
        "WHERE tenant_id = $1 ORDER BY device_id LIMIT 1000", who.tenant)
    return web.json_response({"devices": [
        {"device": r["device_id"], "ownership": r["ownership"], "groups": list(r["groups"]),
         "status": r["status"], "enrolled_at": r["enrolled_at"].isoformat()} for r in rows]})


def routes() -> list[web.RouteDef]:
    return [web.get("/api/v1/devices", list_devices)]
