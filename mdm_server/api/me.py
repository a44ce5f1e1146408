"""/api/v1/me: what a device's user may see and do about their own device(s).

Access (GDPR art. 15): the data held, per kind, exactly as stored; the policy in
force in plain words; the notices and commands that concerned the device; who in
an admin role read the data. Portability (art. 20): everything as one ZIP of JSON
and CSV, streamed with flat memory. Erasure (art. 17): a request an admin fulfils
or refuses, fulfilled automatically after 30 days.

A user token covers its device and the tenant's devices that had the same user
e-mail when it was issued, each while it is in the enrollment it was in then
(mdm_server/storage/tokens.py); any other device is 404, exactly like a device
that does not exist. Of a device it covers, the user reads what was recorded since
that enrollment began: data received, commands requested, reads logged, erasure
requests made since then, never a previous holder's.
"""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from agent_protocol import FIELD_TYPES, KINDS
from mdm_server import audit
from mdm_server.api.auth import Principal, require_user, user_coverage
from mdm_server.api.context import POOL, audit_keys, keyring
from mdm_server.api.data import page_limit, parse_data_query, read_data
from mdm_server.api.errors import json_error
from mdm_server.commands.service import notice_log
from mdm_server.policy.in_force import InForce, device_policy
from mdm_server.policy.offload import policy_work
from mdm_server.storage import erasure
from mdm_server.storage.sealing import DeviceReader
from privacy_filters import PERSONAL_FLOOR, beyond_floor, explain_policy

__all__ = ["EXPORTS", "routes"]

_DEVICE = "{device:[A-Za-z0-9_-]{1,64}}"
#: Exports running now, one per user (per process: ``serve`` runs one HTTP process).
EXPORTS: web.AppKey[set[tuple[str, str]]] = web.AppKey("exports", set)
_FLUSH_BYTES = 256 * 1024
_FETCH_ROWS = 1000


async def _mine(request: web.Request) -> tuple[Principal, str, datetime]:
    """The caller (a device user), the device of the URL if the token covers it,
    and since when it shows that device's records (its enrollment's start)."""
    who = await require_user(request, request.app[POOL])
    device = request.match_info["device"]
    async with request.app[POOL].acquire() as conn:
        for c in await user_coverage(conn, who):
            if c.device == device:
                return who, device, c.since
    raise web.HTTPNotFound(reason="no such device")


async def my_devices(request: web.Request) -> web.Response:
    who = await require_user(request, request.app[POOL])
    async with request.app[POOL].acquire() as conn:
        rows = await conn.fetch(
            "SELECT device_id, ownership, status, enrollment_started_at FROM devices "
            "WHERE tenant_id = $1 AND device_id = ANY($2::text[]) ORDER BY device_id",
            who.tenant, [c.device for c in await user_coverage(conn, who)])
    return web.json_response({"devices": [
        {"device": r["device_id"], "ownership": r["ownership"], "status": r["status"],
         "enrolled_at": r["enrollment_started_at"].isoformat()} for r in rows]})


async def my_device(request: web.Request) -> web.Response:
    """What is held about the device, at a glance (the portal's summary): how many
    records of each kind and the newest of each, received since the enrollment the
    token covers began."""
    who, device, since = await _mine(request)
    async with request.app[POOL].acquire() as conn:
        row = await conn.fetchrow(
            "SELECT ownership, status FROM devices WHERE tenant_id = $1 AND device_id = $2",
            who.tenant, device)
        assert row is not None  # _mine found it
        counts = await _counts(conn, who.tenant, device, since)
        reader = await DeviceReader.load(conn, keyring(request), who.tenant, device)
        last: dict[str, Any] = {}
        for kind in KINDS:
            if not counts[kind]:
                continue
            rec = await conn.fetchrow(
                "SELECT kind, record_id, ts, received_at, key_id, sealed, data FROM telemetry "
                "WHERE tenant_id = $1 AND device_id = $2 AND kind = $3 AND received_at >= $4 "
                "ORDER BY ts DESC, record_id DESC LIMIT 1", who.tenant, device, kind, since)
            data = None if rec is None else reader.data(rec)
            if rec is not None and data is not None:
                last[kind] = {"id": rec["record_id"], "ts": rec["ts"].isoformat(),
                              "received_at": rec["received_at"].isoformat(), "data": data}
    return web.json_response({"device": device, "ownership": row["ownership"],
                              "status": row["status"], "enrolled_at": since.isoformat(),
                              "records": counts, "total": sum(counts.values()),
                              "last": last})


async def my_data(request: web.Request) -> web.Response:
    who, device, since = await _mine(request)
    q = parse_data_query(request)
    async with request.app[POOL].acquire() as conn:
        return web.json_response(await read_data(conn, keyring(request), who.tenant,
                                                 device, q, received_since=since))


async def _policy_in_force(conn: asyncpg.Connection, tenant: str, device: str
                           ) -> dict[str, Any]:
    """The policy that shapes this device's telemetry now, as the ingest picks it,
    in plain words; for a personal device also what it collects beyond the floor."""
    found = await device_policy(conn, tenant, device)
    assert found is not None  # _mine checked the device
    return await policy_work(_explained, found)  # explaining zones: off the loop


def _explained(found: InForce) -> dict[str, Any]:
    out = found.to_json()
    out["explanation"] = explain_policy(found.effective)
    out["beyond_floor"] = (beyond_floor(found.effective, PERSONAL_FLOOR)
                           if found.floor == "relaxed" else [])
    return out


async def my_policy(request: web.Request) -> web.Response:
    who, device, _since = await _mine(request)
    async with request.app[POOL].acquire() as conn:
        return web.json_response(await _policy_in_force(conn, who.tenant, device))


async def my_notices(request: web.Request) -> web.Response:
    who, device, since = await _mine(request)
    async with request.app[POOL].acquire() as conn:
        log = await notice_log(conn, who.tenant, device, limit=page_limit(request),
                               since=since)
    return web.json_response({"notices": log})


async def _access_log(conn: asyncpg.Connection, keys: audit.AuditKeys, tenant: str,
                      device: str, limit: int, since: datetime) -> list[dict[str, Any]]:
    """Reads of the device's personal data since ``since``, newest first. Only
    entries whose MAC checks (and legacy ones, written before entries were MAC'd,
    so marked): an entry someone wrote into the table without the server's key is
    left out."""
    entries = await audit.read_genuine(conn, keys, tenant, limit=limit,
                                       action="personal_data.read", target=f"device:{device}")
    # ``watch``: for a watch of the live location (``what: live``), its ``start`` or
    # ``end``; null for any other read.
    return [{"at": e.at.isoformat(), "actor": e.actor, "role": e.details.get("role"),
             "what": e.details.get("what"), "watch": e.details.get("watch"),
             "integrity": e.integrity}
            for e in entries if e.at >= since]


async def my_access_log(request: web.Request) -> web.Response:
    who, device, since = await _mine(request)
    async with request.app[POOL].acquire() as conn:
        entries = await _access_log(conn, audit_keys(request), who.tenant, device,
                                    page_limit(request), since)
    return web.json_response({"entries": entries})


async def _counts(conn: asyncpg.Connection, tenant: str, device: str, since: datetime
                  ) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT kind, count(*) AS n FROM telemetry WHERE tenant_id = $1 AND device_id = $2 "
        "AND received_at >= $3 GROUP BY kind", tenant, device, since)
    found = {r["kind"]: int(r["n"]) for r in rows}
    return {k: found.get(k, 0) for k in KINDS}


async def export_summary(request: web.Request) -> web.Response:
    who, device, since = await _mine(request)
    async with request.app[POOL].acquire() as conn:
        counts = await _counts(conn, who.tenant, device, since)
    return web.json_response({"records": counts, "total": sum(counts.values())})


class _Chunks(io.RawIOBase):
    """The ZIP writer's output: bytes collected until the handler sends them."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self._parts.append(data)
        self.size += len(data)
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts, self.size = [], 0
        return out


def _csv_line(values: list[Any]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerow(values)
    return buf.getvalue().encode()


async def _rows(conn: asyncpg.Connection, reader: DeviceReader, kind: str, since: datetime
                ) -> AsyncIterator[tuple[asyncpg.Record, Any]]:
    """The device's records of one kind received since ``since``, oldest first, each
    with its data opened."""
    async for r in conn.cursor(
            "SELECT kind, record_id, ts, received_at, policy_id, policy_version, key_id, "
            "sealed, data FROM telemetry WHERE tenant_id = $1 AND device_id = $2 "
            "AND kind = $3 AND received_at >= $4 ORDER BY ts, record_id",
            reader.tenant, reader.device, kind, since, prefetch=_FETCH_ROWS):
        data = reader.data(r)
        if data is not None:  # None: its key is gone, an erasure is removing it
            yield r, data


async def my_export(request: web.Request) -> web.StreamResponse:
    """Everything held about the device as one ZIP, streamed (memory stays flat)."""
    who, device, since = await _mine(request)
    key = (who.tenant, who.device or "")
    running = request.app[EXPORTS]
    if key in running:
        return web.json_response(
            {"error": "an export is already running for you: wait for it to finish",
             "code": "export_running"}, status=429, headers={"Retry-After": "10"})
    running.add(key)
    try:
        return await _stream_export(request, who, device, since)
    finally:
        running.discard(key)


async def _stream_export(request: web.Request, who: Principal, device: str,
                         since: datetime) -> web.StreamResponse:
    pool = request.app[POOL]
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                        readonly=True):
        counts = await _counts(conn, who.tenant, device, since)
        dev = await conn.fetchrow(
            "SELECT device_id, ownership, groups, status, enrollment_started_at, user_email "
            "FROM devices WHERE tenant_id = $1 AND device_id = $2", who.tenant, device)
        assert dev is not None
        resp = web.StreamResponse(headers={
            "Content-Type": "application/zip",
            "Content-Disposition": f'attachment; filename="{device}-export.zip"',
            "X-Export-Records": str(sum(counts.values())),
            "Cache-Control": "no-store",
        })
        # The snapshot's keys may be re-wrapped (and their old epoch retired)
        # while the export runs: those are read again outside it, from the pool.
        reader = await DeviceReader.load(conn, keyring(request), who.tenant, device,
                                         fresh=pool.acquire)
        await resp.prepare(request)
        out = _Chunks()
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:

            def put(name: str, obj: Any) -> None:
                zf.writestr(name, orjson.dumps(obj, option=orjson.OPT_INDENT_2))

            put("device.json", {
                "device": dev["device_id"], "ownership": dev["ownership"],
                "groups": list(dev["groups"]), "status": dev["status"],
                "enrolled_at": dev["enrollment_started_at"].isoformat(),
                "user_email": dev["user_email"],
                "records": counts})
            put("policy.json", await _policy_in_force(conn, who.tenant, device))
            put("notices.json", await notice_log(conn, who.tenant, device, limit=100_000,
                                                 since=since))
            put("access-log.json", await _access_log(conn, audit_keys(request), who.tenant,
                                                     device, 100_000, since))
            put("erasure-requests.json",
                await erasure.list_requests(conn, who.tenant, device=device, limit=1000,
                                            since=since))
            await resp.write(out.take())
            for kind in KINDS:
                if not counts[kind]:
                    continue
                fields = list(FIELD_TYPES[kind])
                with zf.open(f"telemetry/{kind}.jsonl", "w", force_zip64=True) as f:
                    async for r, data in _rows(conn, reader, kind, since):
                        f.write(orjson.dumps({
                            "id": r["record_id"], "ts": r["ts"].isoformat(),
                            "received_at": r["received_at"].isoformat(),
                            "policy": r["policy_id"], "policy_version": r["policy_version"],
                            "data": data}) + b"\n")
                        if out.size >= _FLUSH_BYTES:
                            await resp.write(out.take())
                with zf.open(f"telemetry/{kind}.csv", "w", force_zip64=True) as f:
                    f.write(_csv_line(["id", "ts", "received_at", "policy", "policy_version",
                                       *fields]))
                    async for r, data in _rows(conn, reader, kind, since):
                        cells = [data.get(name) for name in fields]
                        f.write(_csv_line([
                            r["record_id"], r["ts"].isoformat(), r["received_at"].isoformat(),
                            r["policy_id"], r["policy_version"],
                            *[c if c is None or isinstance(c, str | int | float)
                              else orjson.dumps(c).decode() for c in cells]]))
                        if out.size >= _FLUSH_BYTES:
                            await resp.write(out.take())
                await resp.write(out.take())
        await resp.write(out.take())
        await resp.write_eof()
        return resp


async def request_erasure(request: web.Request) -> web.Response:
    who, device, _since = await _mine(request)
    raw = await request.read()
    if raw:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise web.HTTPBadRequest(reason="the body is not valid JSON") from None
        if not isinstance(body, dict) or body:
            return json_error(422, "the request is not valid", issues=[
                {"path": "body", "message": "an erasure request takes no fields"}])
    try:
        async with request.app[POOL].acquire() as conn, conn.transaction():
            made = await erasure.request_erasure(conn, tenant=who.tenant, device=device,
                                                 actor=who.name,
                                                 audit_keys=audit_keys(request))
    except erasure.ErasureError as exc:
        return json_error(exc.status, str(exc), code=exc.code)
    return web.json_response(made, status=201)


async def my_erasure_requests(request: web.Request) -> web.Response:
    who, device, since = await _mine(request)
    async with request.app[POOL].acquire() as conn:
        found = await erasure.list_requests(conn, who.tenant, device=device, since=since)
    return web.json_response({"erasure_requests": found})


def routes() -> list[web.RouteDef]:
    base = f"/api/v1/me/devices/{_DEVICE}"
    return [
        web.get("/api/v1/me/devices", my_devices),
        web.get(base, my_device),
        web.get(f"{base}/data", my_data),
        web.get(f"{base}/policy", my_policy),
        web.get(f"{base}/notices", my_notices),
        web.get(f"{base}/access-log", my_access_log),
        web.get(f"{base}/export/summary", export_summary),
        web.get(f"{base}/export", my_export),
        web.post(f"{base}/erasure-requests", request_erasure),
        web.get(f"{base}/erasure-requests", my_erasure_requests),
    ]
