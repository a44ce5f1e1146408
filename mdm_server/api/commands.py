"""/api/v1/devices/{device}/commands: lock, locate, wipe, factory reset (admins).

The rules (guards, approval, idempotency) live in :mod:`mdm_server.commands.service`;
this module parses requests and shapes answers. A request body may hold only the
fields below: anything else is refused (422), never ignored.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from aiohttp import web

from agent_protocol import (
    COMMAND_TYPES,
    CONSENT_TYPES,
    REMOTE_VIEW_MODES,
    WIPE_SCOPES,
    LocalProtocolError,
    Notice,
)
from mdm_server.api.auth import require_admin, require_reader
from mdm_server.api.context import POOL, audit_keys
from mdm_server.api.errors import json_error
from mdm_server.api.limits import BODY_LIMIT, body_limit
from mdm_server.commands import service, states
from mdm_server.commands.service import CommandRefused

__all__ = ["routes"]

_DEVICE = "{device:[A-Za-z0-9_-]{1,64}}"
_COMMAND = "{command_id:[0-9a-fA-F-]{36}}"
_FIELDS = {"type", "scope", "mode", "reason", "notice", "ttl_s"}
#: What an admin may send; trust_key and distrust_key are the server's own (key
#: rotation and retirement).
ADMIN_COMMAND_TYPES = tuple(t for t in COMMAND_TYPES if t not in ("trust_key", "distrust_key"))
REASON_MAX = 500
TTL_MIN_S, TTL_MAX_S, TTL_DEFAULT_S = 60, 30 * 86_400, 7 * 86_400
#: A remote view waits for its user's answer this long by default: the admin who
#: asked is waiting too, and a yes days later would start a view nobody watches.
TTL_DEFAULT_REMOTE_VIEW_S = 15 * 60
LIST_LIMIT_MAX = 500
IDEMPOTENCY_KEY_MAX = 200


def _invalid(*issues: tuple[str, str]) -> web.Response:
    return json_error(422, "the request is not valid",
                      issues=[{"path": p, "message": m} for p, m in issues])


def _valid_key(key: str) -> bool:
    """An Idempotency-Key we can store: a header that is not UTF-8 arrives with
    surrogates, which the database refuses."""
    return 0 < len(key) <= IDEMPOTENCY_KEY_MAX and key.isascii() and key.isprintable()


def _refused(exc: CommandRefused) -> web.Response:
    return json_error(exc.status, str(exc), code=exc.code, **exc.extra)


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise web.HTTPBadRequest(reason="the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(reason="the body must be a JSON object")
    return body


def _parse_notice(value: object) -> tuple[dict[str, str] | None, list[tuple[str, str]]]:
    if not isinstance(value, dict) or set(value) - {"text", "lang"}:
        return None, [("notice", "notice must be an object with text and lang only")]
    try:
        n = Notice(value.get("text"), value.get("lang", "en"))  # type: ignore[arg-type]
    except LocalProtocolError as exc:
        return None, [(exc.path or "notice", exc.detail)]
    return {"text": n.text, "lang": n.lang}, []


def parse_command_request(body: dict[str, Any]
                          ) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
    """The command an admin asked for, or every problem with the request."""
    issues: list[tuple[str, str]] = [
        (k, "unknown field") for k in sorted(set(body) - _FIELDS)]
    type_ = body.get("type")
    if type_ not in ADMIN_COMMAND_TYPES:
        issues.append(("type", f"type must be one of {', '.join(ADMIN_COMMAND_TYPES)}"))
    params: dict[str, Any] = {}
    if type_ == "wipe":
        if body.get("scope") not in WIPE_SCOPES:
            issues.append(("scope", f"a wipe needs scope {' or '.join(WIPE_SCOPES)}"))
        else:
            params["scope"] = body["scope"]
    elif "scope" in body:
        issues.append(("scope", "only a wipe has a scope"))
    if type_ == "remote_view":
        if body.get("mode") not in REMOTE_VIEW_MODES:
            issues.append(("mode", f"a remote view needs mode {' or '.join(REMOTE_VIEW_MODES)}"))
        else:
            params["mode"] = body["mode"]
    elif "mode" in body:
        issues.append(("mode", "only a remote view has a mode"))
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > REASON_MAX \
            or "\x00" in reason:
        issues.append(("reason", f"reason must be 1-{REASON_MAX} characters: why this "
                                 "command is sent"))
    elif type_ == "remote_view":
        params["reason"] = reason  # signed: the user is told why they are asked
    notice = None
    if "notice" in body:
        if type_ not in service.NOTICE_TYPES:
            issues.append(("notice", f"only {', '.join(service.NOTICE_TYPES)} carry a notice"))
        else:
            notice, more = _parse_notice(body["notice"])
            issues += more
    elif isinstance(type_, str) and type_ in CONSENT_TYPES:  # a list is not hashable
        issues.append(("notice", "a remote view needs a notice: its user is asked with it"))
    ttl = body.get("ttl_s", TTL_DEFAULT_REMOTE_VIEW_S if type_ == "remote_view"
                   else TTL_DEFAULT_S)
    if type(ttl) is not int or not TTL_MIN_S <= ttl <= TTL_MAX_S:
        issues.append(("ttl_s", f"ttl_s must be an integer from {TTL_MIN_S} to {TTL_MAX_S}"))
    if issues:
        return None, issues
    return {"type_": type_, "params": params, "reason": reason, "notice": notice,
            "ttl_s": ttl}, []


async def _create(request: web.Request, target: str) -> web.Response:
    """POST a command for one device (``target`` = ``device:{id}``) or a group
    (``group:{name}``): parse, check the Idempotency-Key, issue, answer."""
    who = await require_admin(request, request.app[POOL])
    body = await _json_object(request)
    parsed, issues = parse_command_request(body)
    if parsed is None:
        return _invalid(*issues)
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _valid_key(key):
        return _invalid(("Idempotency-Key", f"the Idempotency-Key header must be "
                                            f"1-{IDEMPOTENCY_KEY_MAX} printable ASCII characters"))
    kind, _, name = target.partition(":")
    digest = None if key is None else service.request_digest(
        name if kind == "device" else target, body)
    try:
        async with request.app[POOL].acquire() as conn, conn.transaction():
            if kind == "device":
                result = await service.issue(conn, tenant=who.tenant, device=name,
                                             actor=who.name, idempotency_key=key,
                                             digest=digest, audit_keys=audit_keys(request),
                                             **parsed)
            else:
                result = await service.issue_group(conn, tenant=who.tenant, group=name,
                                                   actor=who.name, idempotency_key=key,
                                                   digest=digest,
                                                   audit_keys=audit_keys(request), **parsed)
    except CommandRefused as exc:
        return _refused(exc)
    made = result.command
    location = (f"/api/v1/devices/{name}/commands/{made['command_id']}" if kind == "device"
                else f"/api/v1/command-batches/{made['batch_id']}")
    return web.json_response(made, status=201 if result.created else 200,
                             headers={"Location": location})


@body_limit(BODY_LIMIT)
async def create_command(request: web.Request) -> web.Response:
    return await _create(request, "device:" + request.match_info["device"])


@body_limit(BODY_LIMIT)
async def create_group_command(request: web.Request) -> web.Response:
    """The same command for every enrolled device of a group; answers with the batch,
    whose progress ``GET /api/v1/command-batches/{batch_id}`` follows."""
    return await _create(request, "group:" + request.match_info["group"])


async def get_batch(request: web.Request) -> web.Response:
    who = await require_reader(request, request.app[POOL])
    try:
        batch_id = uuid.UUID(request.match_info["batch_id"])
    except ValueError:
        raise web.HTTPNotFound(reason="no such batch") from None
    async with request.app[POOL].acquire() as conn:
        batch = await service.get_batch(conn, who.tenant, batch_id)
    if batch is None:
        raise web.HTTPNotFound(reason="no such batch")
    return web.json_response(batch)


def _command_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["command_id"])
    except ValueError:
        raise web.HTTPNotFound(reason="no such command") from None


def _limit(request: web.Request, default: int = 100) -> int:
    raw = request.query.get("limit", str(default))
    # isascii: "²".isdigit() is true, but int() refuses it.
    if not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) <= LIST_LIMIT_MAX:
        raise web.HTTPBadRequest(reason=f"limit must be 1-{LIST_LIMIT_MAX}")
    return int(raw)


def _state_filter(request: web.Request) -> str | None:
    state = request.query.get("state")
    if state is not None and state not in states.STATES:
        raise web.HTTPBadRequest(reason="state must be one of " + ", ".join(states.STATES))
    return state


async def get_command(request: web.Request) -> web.Response:
    who = await require_reader(request, request.app[POOL])
    async with request.app[POOL].acquire() as conn:
        cmd = await service.get_command(conn, who.tenant, request.match_info["device"],
                                        _command_id(request))
    if cmd is None:
        raise web.HTTPNotFound(reason="no such command")
    return web.json_response(cmd)


async def list_device_commands(request: web.Request) -> web.Response:
    who = await require_reader(request, request.app[POOL])
    device = request.match_info["device"]
    limit, state = _limit(request), _state_filter(request)
    async with request.app[POOL].acquire() as conn:
        known = await conn.fetchval(
            "SELECT true FROM devices WHERE tenant_id = $1 AND device_id = $2",
            who.tenant, device)
        if not known:
            raise web.HTTPNotFound(reason="no such device")
        cmds = await service.list_commands(conn, who.tenant, device, limit=limit, state=state)
    return web.json_response({"commands": cmds})


async def device_notices(request: web.Request) -> web.Response:
    """The device's user-notice log (the device user's own view comes with /me)."""
    who = await require_reader(request, request.app[POOL])
    device = request.match_info["device"]
    async with request.app[POOL].acquire() as conn:
        known = await conn.fetchval(
            "SELECT true FROM devices WHERE tenant_id = $1 AND device_id = $2",
            who.tenant, device)
        if not known:
            raise web.HTTPNotFound(reason="no such device")
        log = await service.notice_log(conn, who.tenant, device, limit=_limit(request))
    return web.json_response({"notices": log})


async def list_tenant_commands(request: web.Request) -> web.Response:
    """All of the tenant's commands in a state, e.g. the approval queue
    (``?state=pending_approval``)."""
    who = await require_reader(request, request.app[POOL])
    limit, state = _limit(request), _state_filter(request)
    async with request.app[POOL].acquire() as conn:
        cmds = await service.list_commands(conn, who.tenant, None, limit=limit, state=state)
    return web.json_response({"commands": cmds})


async def _act(request: web.Request, action: str) -> web.Response:
    who = await require_admin(request, request.app[POOL])
    if await request.read():
        return _invalid(("body", f"{action} takes no body"))
    fn = service.approve if action == "approve" else service.cancel
    try:
        async with request.app[POOL].acquire() as conn, conn.transaction():
            cmd = await fn(conn, tenant=who.tenant, device=request.match_info["device"],
                           command_id=_command_id(request), actor=who.name,
                           audit_keys=audit_keys(request))
    except CommandRefused as exc:
        return _refused(exc)
    return web.json_response(cmd)


async def approve_command(request: web.Request) -> web.Response:
    return await _act(request, "approve")


async def cancel_command(request: web.Request) -> web.Response:
    return await _act(request, "cancel")


@body_limit(BODY_LIMIT)
async def put_notice_template(request: web.Request) -> web.Response:
    """The tenant's notice text for one kind of command (used when a request has none)."""
    who = await require_admin(request, request.app[POOL])
    kind = request.match_info["kind"]
    body = await _json_object(request)
    notice, issues = _parse_notice(body)
    if "lang" not in body:
        issues.append(("lang", "lang is required"))
    if notice is None or issues:
        return _invalid(*issues)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        await service.set_notice_template(conn, tenant=who.tenant, kind=kind,
                                          text=notice["text"], lang=notice["lang"],
                                          actor=who.name, audit_keys=audit_keys(request))
    return web.json_response({"kind": kind, "text": notice["text"], "lang": notice["lang"],
                              "source": "tenant"})


async def get_notice_template(request: web.Request) -> web.Response:
    """The text a command of this kind carries when the request gives none."""
    who = await require_reader(request, request.app[POOL])
    kind = request.match_info["kind"]
    row = await request.app[POOL].fetchrow(
        "SELECT text, lang FROM notice_templates WHERE tenant_id = $1 AND kind = $2",
        who.tenant, kind)
    if row is None:
        return web.json_response({"kind": kind, **service.DEFAULT_NOTICES[kind],
                                  "source": "built_in"})
    return web.json_response({"kind": kind, "text": row["text"], "lang": row["lang"],
                              "source": "tenant"})


def routes() -> list[web.RouteDef]:
    base = f"/api/v1/devices/{_DEVICE}/commands"
    nkind = "{kind:" + "|".join(service.NOTICE_KINDS) + "}"
    return [
        web.post(base, create_command),
        web.get(base, list_device_commands),
        web.get(f"{base}/{_COMMAND}", get_command),
        web.post(f"{base}/{_COMMAND}:approve", approve_command),
        web.post(f"{base}/{_COMMAND}:cancel", cancel_command),
        web.get(f"/api/v1/devices/{_DEVICE}/notices", device_notices),
        web.get("/api/v1/commands", list_tenant_commands),
        web.post("/api/v1/groups/{group:[A-Za-z0-9_-]{1,64}}/commands", create_group_command),
        web.get(f"/api/v1/command-batches/{_COMMAND.replace('command_id', 'batch_id')}",
                get_batch),
        web.put(f"/api/v1/notice-templates/{nkind}", put_notice_template),
        web.get(f"/api/v1/notice-templates/{nkind}", get_notice_template),
    ]
