"""/api/v1/reports/shifts: who had which device, and in what condition it went out
and came back (docs/api.md, "Shift report").

- ``GET /api/v1/reports/shifts`` (admins, auditors): the shifts overlapping a time
  range, as JSON or CSV, and on the first page the devices out past the tenant's
  overdue limit. Each side's user id and condition are what the device's policy
  stored, opened from the device's sealed records. Reading them is a read of each
  listed device's personal data: one ``personal_data.read`` entry per device in
  the answer (``what``: ``shifts``), in the answer's transaction, so the device's
  user sees it in their access log.
- ``GET|PUT /api/v1/reports/shifts/settings``: the overdue limit (PUT: admins,
  audited as ``shift_settings.update``).
- ``GET /api/v1/me/devices/{device}/shifts``: a device user's own device's shifts
  (their enrollment's only; not access-logged: it is their own read).

Bounds: a range of at most RANGE_MAX_DAYS; pages of ``limit`` shifts (JSON at most
500, CSV at most CSV_LIMIT_MAX) with a cursor; at most OVERDUE_MAX overdue devices
listed (``overdue_total`` counts them all).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from mdm_server import audit
from mdm_server.api.auth import (
    Principal,
    require_admin,
    require_reader,
    require_user,
    user_coverage,
)
from mdm_server.api.context import POOL, audit_keys, keyring
from mdm_server.api.data import query_time
from mdm_server.api.devices import log_personal_read
from mdm_server.api.errors import json_error
from mdm_server.api.limits import BODY_LIMIT, body_limit
from mdm_server.reports.shifts import (
    STATUSES,
    ShiftCursor,
    csv_bytes,
    decode_cursor,
    encode_cursor,
    shift_json,
)
from mdm_server.storage.shifts import (
    OVERDUE_MAX_S,
    OVERDUE_MIN_S,
    OverdueLimit,
    ShiftFilter,
    longest_shift_s,
    overdue_limit,
    overdue_shifts,
    set_overdue_limit,
    shift_page,
)

__all__ = [
    "CSV_LIMIT_MAX",
    "CSV_TYPE",
    "JSON_LIMIT_MAX",
    "LIMIT_DEFAULT",
    "LONGEST_CACHE",
    "OVERDUE_MAX",
    "RANGE_DEFAULT_DAYS",
    "RANGE_MAX_DAYS",
    "USER_MAX",
    "routes",
]

SHIFTS = "/api/v1/reports/shifts"
_DEVICE = "{device:[A-Za-z0-9_-]{1,64}}"
RANGE_DEFAULT_DAYS = 7
RANGE_MAX_DAYS = 31
LIMIT_DEFAULT = 100
JSON_LIMIT_MAX = 500
CSV_LIMIT_MAX = 5000
OVERDUE_MAX = 500
#: A stored user id is at most 128 characters (docs/protocol.md), masked or not.
USER_MAX = 128
#: What the user's access log says was read (``personal_data.read``, ``what``).
ACCESS_WHAT = "shifts"
CSV_TYPE = "text/csv"
#: The default overdue limit's basis (the longest shift of the last 30 days: a scan of
#: a month of a tenant's check-ins/outs) is recomputed at most this often per tenant.
LONGEST_TTL_S = 300.0
#: Per tenant: (when computed, monotonic; the longest shift in seconds or None).
LONGEST_CACHE: web.AppKey[dict[str, tuple[float, int | None]]] = web.AppKey(
    "shift_longest", dict)


async def _limit_in_force(request: web.Request, conn: asyncpg.Connection, tenant: str,
                          now: datetime) -> OverdueLimit:
    cache = request.app[LONGEST_CACHE]
    hit = cache.get(tenant)
    if hit is None or time.monotonic() - hit[0] > LONGEST_TTL_S:
        hit = cache[tenant] = (time.monotonic(), await longest_shift_s(conn, tenant, now))
    return await overdue_limit(conn, tenant, hit[1])


def _range(request: web.Request, now: datetime) -> tuple[datetime, datetime]:
    """``from``/``to``: by default the last RANGE_DEFAULT_DAYS up to now; at most
    RANGE_MAX_DAYS apart (400 otherwise)."""
    start, end = query_time(request, "from"), query_time(request, "to")
    try:
        if end is None:
            end = now if start is None else min(now, start + timedelta(days=RANGE_MAX_DAYS))
        if start is None:
            start = end - timedelta(days=RANGE_DEFAULT_DAYS)
    except OverflowError:
        raise web.HTTPBadRequest(reason="from and to must be within the calendar") from None
    if end <= start:
        raise web.HTTPBadRequest(reason="to must be after from")
    if end - start > timedelta(days=RANGE_MAX_DAYS):
        raise web.HTTPBadRequest(reason=f"from and to may be at most {RANGE_MAX_DAYS} days "
                                        "apart: ask for the rest in another request")
    return start, end


def _wants_csv(request: web.Request) -> bool:
    """``?format=csv`` (or ``json``), else the Accept header: CSV when it names
    ``text/csv`` (q > 0) and does not prefer ``application/json``."""
    fmt = request.query.get("format")
    if fmt is not None:
        if fmt not in ("json", "csv"):
            raise web.HTTPBadRequest(reason="format must be json or csv")
        return fmt == "csv"
    q: dict[str, float] = {}
    for part in request.headers.get("Accept", "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        weight = 1.0
        for p in params:
            name, _, value = p.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        q[media.lower()] = max(q.get(media.lower(), 0.0), weight)
    csv_q = q.get(CSV_TYPE, 0.0)
    return csv_q > 0 and csv_q > q.get("application/json", 0.0)


def _limit(request: web.Request, maximum: int, default: int) -> int:
    raw = request.query.get("limit", str(default))
    if not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) <= maximum:
        raise web.HTTPBadRequest(reason=f"limit must be 1-{maximum}")
    return int(raw)


def _cursor(request: web.Request) -> ShiftCursor | None:
    raw = request.query.get("cursor")
    if raw is None:
        return None
    try:
        return decode_cursor(raw)
    except ValueError:
        raise web.HTTPBadRequest(reason="cursor is not valid") from None


def _filters(request: web.Request) -> tuple[str | None, str | None, str | None]:
    device = request.query.get("device")
    if device is not None and not (device.isascii() and 0 < len(device) <= 64 and all(
            c.isalnum() or c in "_-" for c in device)):
        raise web.HTTPBadRequest(reason="device must be a device id ([A-Za-z0-9_-], 1-64)")
    user = request.query.get("user")
    if user is not None and not (0 < len(user) <= USER_MAX and "\x00" not in user):
        raise web.HTTPBadRequest(reason=f"user must be 1-{USER_MAX} characters (a user id "
                                        "as stored)")
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        raise web.HTTPBadRequest(reason="status must be one of " + ", ".join(STATUSES))
    return device, user, status


async def shift_report(request: web.Request) -> web.StreamResponse:
    who = await require_reader(request, request.app[POOL])
    as_csv = _wants_csv(request)
    limit = _limit(request, CSV_LIMIT_MAX if as_csv else JSON_LIMIT_MAX,
                   CSV_LIMIT_MAX if as_csv else LIMIT_DEFAULT)
    device, user, status = _filters(request)
    after = _cursor(request)
    now = datetime.now(UTC)
    start, end = _range(request, now)
    ring = keyring(request)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        limit_in_force = await _limit_in_force(request, conn, who.tenant, now)
        overdue_before = now - timedelta(seconds=limit_in_force.seconds)
        page = await shift_page(conn, ring, who.tenant,
                                ShiftFilter(start, end, device, user, status),
                                overdue_before=overdue_before, limit=limit, after=after)
        overdue, total = None, None
        if after is None and not as_csv:  # the overdue devices head the first page
            overdue, total = await overdue_shifts(conn, ring, who.tenant, device=device,
                                                  user=user, overdue_before=overdue_before,
                                                  limit=OVERDUE_MAX)
        # Every device whose shifts are in the answer: its user sees this read.
        listed = {s.device for s in page.shifts} | {s.device for s in overdue or ()}
        keys = audit_keys(request)
        for d in sorted(listed):
            await log_personal_read(conn, keys, who, d, ACCESS_WHAT)
    shifts = [shift_json(s, now) for s in page.shifts]
    nxt = None if page.next is None else encode_cursor(page.next)
    if as_csv:
        headers = {"Content-Disposition": 'attachment; filename="shifts-'
                   f'{start:%Y%m%dT%H%MZ}-{end:%Y%m%dT%H%MZ}.csv"',
                   "X-Shift-Rows": str(len(shifts))}
        if nxt is not None:
            headers["X-Next-Cursor"] = nxt
        return web.Response(body=csv_bytes(shifts), headers=headers,
                            content_type=CSV_TYPE, charset="utf-8")
    return web.json_response({
        "from": start.isoformat(), "to": end.isoformat(), "now": now.isoformat(),
        "overdue_after_s": limit_in_force.seconds, "overdue_source": limit_in_force.source,
        "overdue": None if overdue is None else [shift_json(s, now) for s in overdue],
        "overdue_total": total, "shifts": shifts, "next": nxt})


async def get_settings(request: web.Request) -> web.Response:
    who = await require_reader(request, request.app[POOL])
    async with request.app[POOL].acquire() as conn:
        found = await _limit_in_force(request, conn, who.tenant, datetime.now(UTC))
    return web.json_response(found.to_json())


def _invalid(message: str) -> web.Response:
    return json_error(422, "the request is not valid",
                      issues=[{"path": "overdue_after_s", "message": message}])


@body_limit(BODY_LIMIT)
async def put_settings(request: web.Request) -> web.Response:
    who = await require_admin(request, request.app[POOL])
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise web.HTTPBadRequest(reason="the body is not valid JSON") from None
    if not isinstance(body, dict) or set(body) != {"overdue_after_s"}:
        return _invalid("the body is {\"overdue_after_s\": seconds or null}, nothing else")
    seconds = body["overdue_after_s"]
    if seconds is not None and (type(seconds) is not int
                                or not OVERDUE_MIN_S <= seconds <= OVERDUE_MAX_S):
        return _invalid(f"whole seconds, {OVERDUE_MIN_S}-{OVERDUE_MAX_S} (5 minutes to 90 "
                        "days), or null for the default")
    async with request.app[POOL].acquire() as conn, conn.transaction():
        await set_overdue_limit(conn, who.tenant, seconds, who.name)
        await audit.append(conn, audit_keys(request), tenant=who.tenant, actor=who.name,
                           action="shift_settings.update", target=f"tenant:{who.tenant}",
                           details={"overdue_after_s": seconds})
        found = await _limit_in_force(request, conn, who.tenant, datetime.now(UTC))
    return web.json_response(found.to_json())


async def _my_device(request: web.Request) -> tuple[Principal, str, datetime]:
    """The caller (a device user), the URL's device if the token covers it, and the
    start of the enrollment it covers (404 otherwise, as for a device that does not
    exist)."""
    who = await require_user(request, request.app[POOL])
    device = request.match_info["device"]
    async with request.app[POOL].acquire() as conn:
        for c in await user_coverage(conn, who):
            if c.device == device:
                return who, device, c.since
    raise web.HTTPNotFound(reason="no such device")


async def my_shifts(request: web.Request) -> web.Response:
    who, device, since = await _my_device(request)
    limit = _limit(request, JSON_LIMIT_MAX, LIMIT_DEFAULT)
    after = _cursor(request)
    now = datetime.now(UTC)
    start, end = _range(request, now)
    async with request.app[POOL].acquire() as conn:
        limit_in_force = await _limit_in_force(request, conn, who.tenant, now)
        page = await shift_page(
            conn, keyring(request), who.tenant,
            ShiftFilter(start, end, device=device, since=since),
            overdue_before=now - timedelta(seconds=limit_in_force.seconds), limit=limit,
            after=after)
    body: dict[str, Any] = {
        "from": start.isoformat(), "to": end.isoformat(), "now": now.isoformat(),
        "overdue_after_s": limit_in_force.seconds,
        "shifts": [shift_json(s, now) for s in page.shifts],
        "next": None if page.next is None else encode_cursor(page.next)}
    return web.json_response(body)


def routes() -> list[web.RouteDef]:
    return [
        web.get(SHIFTS, shift_report),
        web.get(f"{SHIFTS}/settings", get_settings),
        web.put(f"{SHIFTS}/settings", put_settings),
        web.get(f"/api/v1/me/devices/{_DEVICE}/shifts", my_shifts),
    ]
