"""/api/v1/devices, dead letters, erasure requests, the audit log: the admin's view.

Reads of a device's personal data (its detail with the last known state, its
telemetry) are written to the audit log as ``personal_data.read``: the device's
user sees them in their access log. GETs are open to auditors (read-only).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from agent_protocol import KINDS, is_valid_id
from mdm_server import audit
from mdm_server.api.auth import Principal, require_admin, require_reader
from mdm_server.api.context import POOL, audit_keys, keyring
from mdm_server.api.data import page_limit, parse_data_query, read_data
from mdm_server.api.errors import json_error
from mdm_server.api.limits import BODY_LIMIT, body_limit
from mdm_server.policy.in_force import device_policy
from mdm_server.storage import erasure
from mdm_server.storage.sealing import DeviceReader

__all__ = ["log_personal_read", "routes"]

_DEVICE = "{device:[A-Za-z0-9_-]{1,64}}"
_REQUEST = "{request_id:[0-9a-fA-F-]{36}}"


def _iso(v: datetime | None) -> str | None:
    return None if v is None else v.isoformat()


def _int_cursor(request: web.Request) -> int | None:
    raw = request.query.get("cursor")
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or int(raw) >= 2**63:
        raise web.HTTPBadRequest(reason="cursor is not valid")
    return int(raw)


async def log_personal_read(conn: asyncpg.Connection, keys: audit.AuditKeys, who: Principal,
                            device: str, what: str) -> None:
    """An admin or auditor read this device's personal data: the user will see it."""
    await audit.append(conn, keys, tenant=who.tenant, actor=who.name, action="personal_data.read",
                       target=f"device:{device}", details={"what": what, "role": who.role})


async def _device_row(conn: asyncpg.Connection, tenant: str, device: str) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT d.device_id, d.ownership, d.groups, d.status, d.enrolled_at, d.user_email, "
        "d.agent, p.online, p.changed_at AS presence_at, p.source AS presence_source "
        "FROM devices d LEFT JOIN device_presence p USING (tenant_id, device_id) "
        "WHERE d.tenant_id = $1 AND d.device_id = $2", tenant, device)
    if row is None:
        raise web.HTTPNotFound(reason="no such device")
    return row


def presence_json(row: asyncpg.Record) -> dict[str, Any] | None:
    """Online or not, as the device's agent said last (device_presence); None: not known."""
    if row["online"] is None:
        return None
    return {"online": row["online"], "changed_at": row["presence_at"].isoformat(),
            "source": row["presence_source"]}


async def list_devices(request: web.Request) -> web.Response:
    who = await require_reader(request, request.app[POOL])
    limit = page_limit(request)
    after = request.query.get("cursor")
    if after is not None and not is_valid_id(after):
        raise web.HTTPBadRequest(reason="cursor is not valid")
    rows = await request.app[POOL].fetch(
        """SELECT d.device_id, d.ownership, d.groups, d.status, d.enrolled_at, d.agent,
                  (SELECT max(t.received_at) FROM telemetry t
                   WHERE t.tenant_id = d.tenant_id AND t.device_id = d.device_id
                     AND t.received_at > now() - interval '30 days') AS last_seen_at
           FROM devices d WHERE d.tenant_id = $1 AND ($2::text IS NULL OR d.device_id > $2)
           ORDER BY d.device_id LIMIT $3""", who.tenant, after, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return web.json_response({
        "devices": [{"device": r["device_id"], "ownership": r["ownership"],
                     "groups": list(r["groups"]), "status": r["status"],
                     "enrolled_at": r["enrolled_at"].isoformat(),
                     "last_seen_at": _iso(r["last_seen_at"]), "agent": r["agent"]}
                    for r in rows],
        "next": rows[-1]["device_id"] if more and rows else None})


async def get_device(request: web.Request) -> web.Response:
    """The device and its last known state (the newest record of each kind)."""
    who = await require_reader(request, request.app[POOL])
    device = request.match_info["device"]
    async with request.app[POOL].acquire() as conn, conn.transaction():
        row = await _device_row(conn, who.tenant, device)
        last: dict[str, Any] = {}
        reader = await DeviceReader.load(conn, keyring(request), who.tenant, device)
        for kind in KINDS:
            rec = await conn.fetchrow(
                "SELECT kind, record_id, ts, received_at, key_id, sealed, data FROM telemetry "
                "WHERE tenant_id = $1 AND device_id = $2 AND kind = $3 "
                "ORDER BY ts DESC LIMIT 1", who.tenant, device, kind)
            data = None if rec is None else reader.data(rec)
            if rec is not None and data is not None:
                last[kind] = {"id": rec["record_id"], "ts": rec["ts"].isoformat(),
                              "received_at": rec["received_at"].isoformat(),
                              "data": data}
        await log_personal_read(conn, audit_keys(request), who, device, "device")
        policy = await device_policy(conn, who.tenant, device)
    assert policy is not None  # _device_row found the device
    seen = [v["received_at"] for v in last.values()]
    return web.json_response({
        "device": row["device_id"], "ownership": row["ownership"],
        "groups": list(row["groups"]), "status": row["status"],
        "enrolled_at": row["enrolled_at"].isoformat(), "user_email": row["user_email"],
        "agent": row["agent"], "presence": presence_json(row),
        "last_seen_at": max(seen) if seen else None, "last": last,
        "policy": policy.to_json()})


async def device_data(request: web.Request) -> web.Response:
    who = await require_reader(request, request.app[POOL])
    device = request.match_info["device"]
    q = parse_data_query(request)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        await _device_row(conn, who.tenant, device)
        body = await read_data(conn, keyring(request), who.tenant, device, q)
        await log_personal_read(conn, audit_keys(request), who, device, f"data:{q.kind}")
    return web.json_response(body)


async def dead_letters(request: web.Request) -> web.Response:
    who = await require_reader(request, request.app[POOL])
    limit, before = page_limit(request), _int_cursor(request)
    # One row per device, reason, topic outline and hour, with its count (migration
    # 013): newest first by when the row began.
    rows = await request.app[POOL].fetch(
        "SELECT id, hour, first_seen, last_seen, count, topic, device_id, failed_level, "
        "reason, detail, payload_bytes "
        "FROM dead_letters WHERE tenant_id = $1 AND ($2::bigint IS NULL OR id < $2) "
        "ORDER BY id DESC LIMIT $3", who.tenant, before, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    return web.json_response({
        "dead_letters": [{"id": r["id"], "hour": r["hour"].isoformat(),
                          "first_seen": r["first_seen"].isoformat(),
                          "last_seen": r["last_seen"].isoformat(), "count": r["count"],
                          "topic": r["topic"], "device": r["device_id"],
                          "level": r["failed_level"],
                          "reason": r["reason"], "detail": r["detail"],
                          "payload_bytes": r["payload_bytes"]} for r in rows],
        "next": str(rows[-1]["id"]) if more and rows else None})


async def audit_entries(request: web.Request) -> web.Response:
    who = await require_reader(request, request.app[POOL])
    limit, before = page_limit(request), _int_cursor(request)
    async with request.app[POOL].acquire() as conn:
        # Every entry, each with its integrity: a forged one shows as "invalid".
        entries = await audit.read(conn, audit_keys(request), who.tenant, limit=limit + 1,
                                   before=before)
    more = len(entries) > limit
    entries = entries[:limit]
    return web.json_response({"entries": [e.to_json() for e in entries],
                              "next": str(entries[-1].seq) if more and entries else None})


async def list_erasure_requests(request: web.Request) -> web.Response:
    who = await require_reader(request, request.app[POOL])
    state = request.query.get("state")
    if state not in (None, "pending", "fulfilled", "refused"):
        raise web.HTTPBadRequest(reason="state must be pending, fulfilled or refused")
    async with request.app[POOL].acquire() as conn:
        found = await erasure.list_requests(conn, who.tenant, state=state,
                                            limit=page_limit(request))
    return web.json_response({"erasure_requests": found})


def _request_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["request_id"])
    except ValueError:
        raise web.HTTPNotFound(reason="no such erasure request") from None


async def fulfil_erasure(request: web.Request) -> web.Response:
    who = await require_admin(request, request.app[POOL])
    if await request.read():
        return json_error(422, "the request is not valid",
                          issues=[{"path": "body", "message": "fulfil takes no body"}])
    ring = keyring(request)  # 503 before anything is erased if there is none
    try:
        async with request.app[POOL].acquire() as conn:
            async with conn.transaction():
                done = await erasure.fulfil(conn, tenant=who.tenant,
                                            request_id=_request_id(request), actor=who.name,
                                            audit_keys=audit_keys(request))
            # At once: the epoch the destroyed key was wrapped under is retired.
            await erasure.shred_or_defer(conn, ring)
    except erasure.ErasureError as exc:
        return json_error(exc.status, str(exc), code=exc.code)
    return web.json_response(done)


@body_limit(BODY_LIMIT)
async def refuse_erasure(request: web.Request) -> web.Response:
    who = await require_admin(request, request.app[POOL])
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise web.HTTPBadRequest(reason="the body is not valid JSON") from None
    reason = body.get("reason") if isinstance(body, dict) else None
    if not isinstance(body, dict) or set(body) != {"reason"} or not isinstance(reason, str) \
            or not 0 < len(reason.strip()) <= 1000 or "\x00" in reason:
        return json_error(422, "the request is not valid", issues=[
            {"path": "reason", "message": "a refusal needs a reason of 1-1000 characters "
                                          "(and nothing else)"}])
    try:
        async with request.app[POOL].acquire() as conn, conn.transaction():
            done = await erasure.refuse(conn, tenant=who.tenant,
                                        request_id=_request_id(request), actor=who.name,
                                        reason=reason.strip(), audit_keys=audit_keys(request))
    except erasure.ErasureError as exc:
        return json_error(exc.status, str(exc), code=exc.code)
    return web.json_response(done)


def routes() -> list[web.RouteDef]:
    return [
        web.get("/api/v1/devices", list_devices),
        web.get(f"/api/v1/devices/{_DEVICE}", get_device),
        web.get(f"/api/v1/devices/{_DEVICE}/data", device_data),
        web.get("/api/v1/dead-letters", dead_letters),
        web.get("/api/v1/audit", audit_entries),
        web.get("/api/v1/erasure-requests", list_erasure_requests),
        web.post(f"/api/v1/erasure-requests/{_REQUEST}:fulfil", fulfil_erasure),
        web.post(f"/api/v1/erasure-requests/{_REQUEST}:refuse", refuse_erasure),
    ]
