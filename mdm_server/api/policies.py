"""/api/v1/policies: versioned collection and masking policies (admins only)."""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from agent_protocol import KINDS, ProtocolError, Topic, decode_telemetry
from mdm_server import audit
from mdm_server.api.auth import require_admin, require_reader
from mdm_server.api.context import CONFIG, POOL, audit_keys
from mdm_server.api.errors import json_error
from mdm_server.commands.outbox import enqueue_sync_policy
from mdm_server.storage import policies as store
from privacy_filters import (
    PolicyError,
    compile_policy,
    explain_policy,
    parse_policy,
    policy_to_doc,
)

__all__ = ["routes"]

_NAME = "{name:[A-Za-z0-9_-]{1,64}}"


def _version_json(v: store.PolicyVersion, *, with_body: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": v.name, "version": v.version, "deleted": v.deleted,
        "created_at": v.created_at.isoformat(), "created_by": v.created_by,
    }
    if with_body and v.body is not None:
        policy = parse_policy(v.body, name=v.name)
        out["policy"] = policy_to_doc(policy)
        out["explanation"] = explain_policy(policy)
    return out


def _invalid(err: PolicyError) -> web.Response:
    return json_error(422, "the policy is not valid",
                      issues=[{"path": i.path, "message": i.message} for i in err.issues])


async def _json_body(request: web.Request) -> Any:
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise web.HTTPBadRequest(reason="the body is not valid JSON") from None


async def list_policies(request: web.Request) -> web.Response:
    who = await require_reader(request, request.app[POOL])
    async with request.app[POOL].acquire() as conn:
        current = await store.current_policies(conn, who.tenant)
    return web.json_response({"policies": [_version_json(v, with_body=False) for v in current]})


async def get_policy(request: web.Request) -> web.Response:
    who = await require_reader(request, request.app[POOL])
    async with request.app[POOL].acquire() as conn:
        v = await store.get_policy(conn, who.tenant, request.match_info["name"])
    if v is None:
        raise web.HTTPNotFound(reason="no such policy")
    return web.json_response(_version_json(v))


async def put_policy(request: web.Request) -> web.Response:
    who = await require_admin(request, request.app[POOL])
    name = request.match_info["name"]
    try:
        policy = parse_policy(await _json_body(request), name=name)
    except PolicyError as err:
        return _invalid(err)
    if name == store.DEFAULT_POLICY and (policy.applies_to.ownership or policy.applies_to.groups):
        return json_error(422, "the policy is not valid", issues=[
            {"path": "applies_to", "message": "the default policy applies to every device"}])
    async with request.app[POOL].acquire() as conn, conn.transaction():
        v = await store.put_policy(conn, who.tenant, name, policy_to_doc(policy), who.name)
        # Same transaction: the devices are told exactly when the change is committed.
        await enqueue_sync_policy(conn, who.tenant, who.name)
        await audit.append(conn, audit_keys(request), tenant=who.tenant, actor=who.name,
                           action="policy.put",
                           target=f"policy:{name}", details={"version": v.version})
    return web.json_response(_version_json(v), status=201 if v.version == 1 else 200)


async def delete_policy(request: web.Request) -> web.Response:
    who = await require_admin(request, request.app[POOL])
    name = request.match_info["name"]
    if name == store.DEFAULT_POLICY:
        return json_error(409, "the default policy can be changed but not deleted")
    async with request.app[POOL].acquire() as conn, conn.transaction():
        v = await store.delete_policy(conn, who.tenant, name, who.name)
        if v is not None:
            await enqueue_sync_policy(conn, who.tenant, who.name)
            await audit.append(conn, audit_keys(request), tenant=who.tenant, actor=who.name,
                               action="policy.delete", target=f"policy:{name}",
                               details={"version": v.version})
    if v is None:
        raise web.HTTPNotFound(reason="no such policy")
    return web.Response(status=204)


async def list_versions(request: web.Request) -> web.Response:
    who = await require_reader(request, request.app[POOL])
    async with request.app[POOL].acquire() as conn:
        versions = await store.list_versions(conn, who.tenant, request.match_info["name"])
    if not versions:
        raise web.HTTPNotFound(reason="no such policy")
    return web.json_response({"versions": [_version_json(v) for v in versions]})


async def preview(request: web.Request) -> web.Response:
    """Run a policy (the stored one, or a draft in the body) over a sample
    payload; return what would be stored. Nothing is written."""
    who = await require_admin(request, request.app[POOL])
    name = request.match_info["name"]
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(reason="the body must be a JSON object")
    kind = body.get("kind")
    if kind not in KINDS:
        return json_error(422, "kind must be one of " + ", ".join(KINDS))
    version = 0
    try:
        if "policy" in body:
            policy = parse_policy(body["policy"], name=name)
        else:
            async with request.app[POOL].acquire() as conn:
                stored = await store.get_policy(conn, who.tenant, name)
            if stored is None or stored.body is None:
                raise web.HTTPNotFound(reason="no such policy")
            policy, version = parse_policy(stored.body, name=name), stored.version
    except PolicyError as err:
        return _invalid(err)
    try:
        records = decode_telemetry(Topic(who.tenant, "preview", "telemetry", kind),
                                   orjson.dumps(body.get("payload")),
                                   now_ms=int(time.time() * 1000))
    except ProtocolError as err:
        return json_error(422, "the sample payload is not valid telemetry",
                          reason=str(err.reason), detail=err.detail, path=err.path)
    compiled = compile_policy(policy, policy_id=name, version=version,
                              hash_key=request.app[CONFIG].tenant_hash_key(who.tenant))
    checked_out = bool(body.get("checked_out", True))
    result = compiled.filter_batch(
        kind, ["preview"] * len(records), [r.ts_ms for r in records],
        [r.data for r in records], checked_out=lambda _d, _t: checked_out)
    return web.json_response({
        "collected": compiled.collects(kind),
        "stored": [{"id": records[k].id, "ts_ms": records[k].ts_ms, "data": data}
                   for k, data in zip(result.kept, result.data, strict=True)],
        "suppressed": [records[k].id for k in result.suppressed],
        "explanation": explain_policy(policy),
    })


def routes() -> list[web.RouteDef]:
    base = "/api/v1/policies"
    return [
        web.get(base, list_policies),
        web.post(f"{base}/{_NAME}:preview", preview),
        web.get(f"{base}/{_NAME}/versions", list_versions),
        web.get(f"{base}/{_NAME}", get_policy),
        web.put(f"{base}/{_NAME}", put_policy),
        web.delete(f"{base}/{_NAME}", delete_policy),
    ]
