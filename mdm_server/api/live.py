"""Server-Sent Event streams: the admin's live locations and the device user's
live view (issue 11; docs/api.md, "Live").

``GET /api/v1/live[?device=D | ?group=G]`` (admins): every location record of the
tenant's devices (or of one device, or of a group's devices as of the start) as it
is stored, i.e. after the policy, within a second of its batch's commit; first the
last known location of each device in scope. Watching is a read of each device's
personal data, and its user sees it: a ``personal_data.read`` entry (``what:
live``, ``watch: start``) per device before anything of it is sent, and one with
``watch: end`` when the stream ends, however it ends (the client gone, the token no
longer valid, the server stopping: logged in a ``finally`` that a cancellation
does not interrupt; a process that dies is caught by the hub's sweep).

``GET /api/v1/me/devices/{device}/live`` (the device's user): what is happening to
the device now: its location being stored, admins watching it (who, since when),
admins reading its data, commands sent to it (lock, wipe, remote view ...) and
their progress, each as it is committed.

Both are bounded: streams at once per token and per tenant (429 past either), a
queue per stream (a client that does not read is ended, never waited for), and
the token is looked up again every :data:`RECHECK_S` seconds (a revoked token's
stream ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from agent_protocol import is_valid_id
from mdm_server import audit
from mdm_server.api.auth import Principal, require_admin, user_coverage
from mdm_server.api.context import CONFIG, POOL, audit_keys, keyring
from mdm_server.api.me import _mine
from mdm_server.live.hub import Batch, LiveHub, Subscriber, end_watches, start_watches
from mdm_server.storage.sealing import load_readers

__all__ = ["HEARTBEAT_S", "HUB", "RECHECK_S", "STREAMS", "on_shutdown", "routes"]

HUB = web.AppKey("live_hub", LiveHub)
#: Streams open now: per token id and per tenant (one ``serve`` process answers HTTP).
STREAMS: web.AppKey[Counter[object]] = web.AppKey("live_streams", Counter)
#: A comment line this often keeps proxies from closing an idle stream.
HEARTBEAT_S = 15.0
#: The token is looked up again this often while a stream is open.
RECHECK_S = 30.0
_POLL_S = 0.5  # how often a stream checks that its client is still there
_EVENT_STREAM = "text/event-stream"

_LAST_KNOWN = """
SELECT t.device_id, t.kind, t.record_id, t.ts, t.received_at, t.policy_id,
       t.policy_version, t.key_id, t.sealed, t.data
FROM unnest($2::text[]) AS d(id)
CROSS JOIN LATERAL (
    SELECT * FROM telemetry
    WHERE tenant_id = $1 AND device_id = d.id AND kind = 'location'
    ORDER BY ts DESC, record_id DESC LIMIT 1) AS t"""
_STILL_ISSUED = """SELECT 1 FROM api_tokens
               WHERE token_id = $1 AND revoked_at IS NULL AND expires_at > now()"""


def _hub(request: web.Request) -> LiveHub:
    hub = request.app.get(HUB)
    if hub is None:
        raise web.HTTPServiceUnavailable(reason="the live feed is not running")
    return hub


def _event(name: str, data: bytes) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


def _json_event(name: str, obj: Any) -> bytes:
    return _event(name, orjson.dumps(obj))


class _Slots:
    """One stream counted against its token's and its tenant's limits."""

    def __init__(self, request: web.Request, who: Principal) -> None:
        self._counts = request.app[STREAMS]
        cfg = request.app[CONFIG]
        self._keys = (("token", who.token_id), ("tenant", who.tenant))
        self._limits = (cfg.live_streams_per_token, cfg.live_streams_per_tenant)
        self.taken = False

    def take(self) -> web.Response | None:
        for key, limit in zip(self._keys, self._limits, strict=True):
            if self._counts[key] >= limit:
                what = "this token" if key[0] == "token" else "your tenant"
                return web.json_response(
                    {"error": f"too many live streams open for {what} (at most {limit}): "
                              "close one first", "code": "too_many_streams"},
                    status=429, headers={"Retry-After": "5"})
        for key in self._keys:
            self._counts[key] += 1
        self.taken = True
        return None

    def release(self) -> None:
        if self.taken:
            for key in self._keys:
                self._counts[key] -= 1
                if self._counts[key] <= 0:
                    del self._counts[key]
            self.taken = False


async def _open(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={
        "Content-Type": f"{_EVENT_STREAM}; charset=utf-8",
        "X-Accel-Buffering": "no",  # nginx: pass each event on at once
    })
    await resp.prepare(request)
    await resp.write(f"retry: 5000\n: heartbeat every {HEARTBEAT_S:.0f} s\n\n".encode())
    return resp


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _still_valid(pool: asyncpg.Pool, who: Principal, device: str | None) -> bool:
    async with pool.acquire() as conn:
        if await conn.fetchval(_STILL_ISSUED, who.token_id) is None:
            return False
        if device is not None:  # a user: the device still covered (not re-enrolled)
            return any(c.device == device for c in await user_coverage(conn, who))
    return True


async def _next(request: web.Request, resp: web.StreamResponse, sub: Subscriber,
                who: Principal, device: str | None, clock: dict[str, float]
                ) -> tuple[str, Any] | None:
    """The stream's next item; heartbeats and checks meanwhile. None: end it."""
    pool = request.app[POOL]
    while True:
        if _gone(request):
            return None
        now = time.monotonic()
        if now - clock["checked"] >= RECHECK_S:
            clock["checked"] = now
            if not await _still_valid(pool, who, device):
                await resp.write(_json_event("end", {
                    "error": "the token is not valid any more (expired or revoked)",
                    "code": "token_invalid"}))
                return None
        if now - clock["beat"] >= HEARTBEAT_S:
            clock["beat"] = now
            await resp.write(b": keepalive\n\n")
        try:
            return await asyncio.wait_for(sub.queue.get(), timeout=_POLL_S)
        except TimeoutError:
            continue


async def _finish(resp: web.StreamResponse, why: str) -> None:
    if why == "shutdown":
        await resp.write(_json_event("end", {
            "error": "the server is stopping: reconnect", "code": "server_stopping"}))
    else:
        await resp.write(_json_event("end", {
            "error": "the stream fell too far behind (the client did not read): reconnect",
            "code": "too_slow"}))


async def on_shutdown(app: web.Application) -> None:
    hub = app.get(HUB)
    if hub is not None:
        hub.close_streams()


_GAP = {"error": "the server's feed was interrupted: what was stored meanwhile is not in "
                 "this stream (read it from the data routes)", "code": "gap"}


# --- GET /api/v1/live ----------------------------------------------------------------------

async def _scope(conn: asyncpg.Connection, tenant: str, device: str | None,
                 group: str | None) -> tuple[list[str], frozenset[str] | None]:
    """The devices watched now, and the stream's filter (None: the whole tenant,
    devices enrolled later included)."""
    if device is not None:
        if await conn.fetchval("SELECT 1 FROM devices WHERE tenant_id = $1 AND device_id = $2",
                               tenant, device) is None:
            raise web.HTTPNotFound(reason="no such device")
        return [device], frozenset({device})
    if group is not None:
        found = [r["device_id"] for r in await conn.fetch(
            "SELECT device_id FROM devices WHERE tenant_id = $1 AND $2 = ANY(groups) "
            "ORDER BY device_id", tenant, group)]
        if not found:
            raise web.HTTPNotFound(reason="no such group")
        return found, frozenset(found)
    everyone = [r["device_id"] for r in await conn.fetch(
        "SELECT device_id FROM devices WHERE tenant_id = $1 ORDER BY device_id", tenant)]
    return everyone, None


def _filters(request: web.Request) -> tuple[str | None, str | None]:
    device, group = request.query.get("device"), request.query.get("group")
    for name, value in (("device", device), ("group", group)):
        if value is not None and not is_valid_id(value):
            raise web.HTTPBadRequest(reason=f"{name} must be 1-64 of A-Z a-z 0-9 _ -")
    if device is not None and group is not None:
        raise web.HTTPBadRequest(reason="filter by device or by group, not both")
    return device, group


async def _last_known(request: web.Request, tenant: str, devices: list[str]) -> list[bytes]:
    async with request.app[POOL].acquire() as conn:
        rows = await conn.fetch(_LAST_KNOWN, tenant, devices)
        readers = await load_readers(conn, keyring(request), tenant,
                                     sorted({r["device_id"] for r in rows}))
    out = []
    for r in rows:
        data = readers[r["device_id"]].data(r)
        if data is not None:
            out.append(orjson.dumps({
                "device": r["device_id"], "id": r["record_id"], "ts": r["ts"].isoformat(),
                "received_at": r["received_at"].isoformat(), "policy": r["policy_id"],
                "policy_version": r["policy_version"], "data": data}))
    return out


def _points(parts: list[bytes], last_known: bool = False) -> bytes:
    flag = b',"last_known":true' if last_known else b',"last_known":false'
    return b'{"points":[' + b",".join(parts) + b"]" + flag + b"}"


async def live(request: web.Request) -> web.StreamResponse:
    """GET /api/v1/live: the tenant's stored locations as they are committed."""
    pool = request.app[POOL]
    who = await require_admin(request, pool)
    device, group = _filters(request)
    hub = _hub(request)
    keys = audit_keys(request)
    async with pool.acquire() as conn:
        watched, devices = await _scope(conn, who.tenant, device, group)
    slots = _Slots(request, who)
    refused = slots.take()
    if refused is not None:
        return refused
    sub = Subscriber(who.tenant, devices)
    watch_id = uuid.uuid4()
    logged: set[str] = set()
    hub.subscribe(sub)  # first: a batch committed from now on is queued for it
    try:
        # The start is on record before anything of a device is sent. ``logged``
        # first: the end is written for whatever rows of the watch exist.
        logged.update(watched)
        async with pool.acquire() as conn:
            since = await start_watches(conn, keys, tenant=who.tenant, actor=who.name,
                                        role=who.role, watch_id=watch_id, devices=watched,
                                        server_key=hub.server_key)
        resp = await _open(request)
        await _admin_stream(request, resp, sub, who, device, group, watch_id, since,
                            watched, logged)
        return resp
    finally:
        hub.unsubscribe(sub)
        slots.release()
        if logged:
            await _end(hub, pool, keys, who.tenant, watch_id)


async def _items(request: web.Request, resp: web.StreamResponse, sub: Subscriber,
                 who: Principal, device: str | None) -> AsyncIterator[tuple[str, Any]]:
    """What both streams do with an item: end on overflow or shutdown (saying so),
    pass a gap on; every other item is the stream's to send."""
    clock = {"beat": time.monotonic(), "checked": time.monotonic()}
    while (item := await _next(request, resp, sub, who, device, clock)) is not None:
        kind = item[0]
        if kind in ("overflow", "shutdown"):
            await _finish(resp, kind)
            return
        if kind == "gap":
            await resp.write(_json_event("gap", _GAP))
            continue
        yield item


async def _admin_stream(request: web.Request, resp: web.StreamResponse, sub: Subscriber,
                        who: Principal, device: str | None, group: str | None,
                        watch_id: uuid.UUID, since: datetime, watched: list[str],
                        logged: set[str]) -> None:
    pool, hub, keys = request.app[POOL], _hub(request), audit_keys(request)
    with contextlib.suppress(ConnectionResetError):  # the client went away
        await resp.write(_json_event("ready", {
            "watch_id": str(watch_id), "since": since.isoformat(),
            "filter": {"device": device, "group": group}, "devices": len(watched)}))
        await resp.write(_event("location", _points(
            await _last_known(request, who.tenant, watched), last_known=True)))
        async for kind, obj in _items(request, resp, sub, who, None):
            if kind != "location":
                continue
            batch: Batch = obj
            mine = [d for d in batch.points if sub.wants(d)]
            new = [d for d in mine if d not in logged]
            if new:  # a device enrolled since the start: its watch starts now
                logged.update(new)
                async with pool.acquire() as conn:
                    await start_watches(conn, keys, tenant=who.tenant, actor=who.name,
                                        role=who.role, watch_id=watch_id, devices=new,
                                        server_key=hub.server_key)
            if mine:
                await resp.write(_event("location", _points(
                    [p for d in mine for p in batch.points[d]])))


async def _end(hub: LiveHub, pool: asyncpg.Pool, keys: audit.AuditKeys, tenant: str,
               watch_id: uuid.UUID) -> None:
    """Log the watch's end; runs to its end even when the handler is cancelled."""

    async def write() -> None:
        async with pool.acquire() as conn:
            await end_watches(conn, keys, tenant=tenant, watch_id=watch_id, devices=None,
                              ended="disconnected")

    task = hub.keep(write())
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(task)


# --- GET /api/v1/me/devices/{device}/live ------------------------------------------------

def _read_event(e: audit.AuditEntry) -> tuple[str, dict[str, Any]]:
    d = e.details
    if d.get("what") == "live":
        return "watching", {"at": e.at.isoformat(), "actor": e.actor, "role": d.get("role"),
                            "watch": d.get("watch"), "watch_id": d.get("watch_id"),
                            "ended": d.get("ended")}
    return "read", {"at": e.at.isoformat(), "actor": e.actor, "role": d.get("role"),
                    "what": d.get("what")}


def _command_event(r: asyncpg.Record) -> dict[str, Any]:
    params = r["params"] if isinstance(r["params"], dict) else orjson.loads(r["params"] or "{}")
    return {"at": r["at"].isoformat(), "command_id": str(r["command_id"]), "type": r["type"],
            "scope": params.get("scope"), "mode": params.get("mode"), "event": r["event"],
            "state": r["to_state"] or r["state"]}


async def _watching_now(conn: asyncpg.Connection, tenant: str, device: str
                        ) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT watch_id, actor, role, started_at FROM live_watches "
        "WHERE tenant_id = $1 AND device_id = $2 ORDER BY started_at", tenant, device)
    return [{"watch_id": str(r["watch_id"]), "actor": r["actor"], "role": r["role"],
             "since": r["started_at"].isoformat()} for r in rows]


async def my_live(request: web.Request) -> web.StreamResponse:
    """GET /api/v1/me/devices/{device}/live: what is happening to my device now."""
    who, device, since = await _mine(request)
    hub = _hub(request)
    pool = request.app[POOL]
    slots = _Slots(request, who)
    refused = slots.take()
    if refused is not None:
        return refused
    sub = Subscriber(who.tenant, frozenset({device}), user=True)
    hub.subscribe(sub)
    try:
        async with pool.acquire() as conn:
            watching = await _watching_now(conn, who.tenant, device)
        resp = await _open(request)
        with contextlib.suppress(ConnectionResetError):  # the client went away
            await _user_stream(request, resp, sub, who, device, since, watching)
        return resp
    finally:
        hub.unsubscribe(sub)
        slots.release()


async def _user_stream(request: web.Request, resp: web.StreamResponse, sub: Subscriber,
                       who: Principal, device: str, since: datetime,
                       watching: list[dict[str, Any]]) -> None:
    await resp.write(_json_event("ready", {"device": device, "watching": watching}))
    async for kind, obj in _items(request, resp, sub, who, device):
        if kind == "location":
            batch: Batch = obj
            parts = batch.points.get(device)
            if parts:
                await resp.write(_json_event("stored", {
                    "kind": "location", "points": len(parts),
                    "at": batch.received_at.isoformat(), "last_ts": batch.last_ts[device]}))
        elif kind == "read":
            entry: audit.AuditEntry = obj
            if entry.at >= since:
                name, body = _read_event(entry)
                await resp.write(_json_event(name, body))
        elif kind == "command":
            row: asyncpg.Record = obj
            if row["created_at"] >= since:
                await resp.write(_json_event("command", _command_event(row)))


def routes() -> list[web.RouteDef]:
    return [
        web.get("/api/v1/live", live),
        web.get("/api/v1/me/devices/{device:[A-Za-z0-9_-]{1,64}}/live", my_live),
    ]
