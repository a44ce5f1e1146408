"""/api/v1/policies: versioned collection and masking policies (admins only).

``:preview`` runs a policy over a sample payload under a throwaway hash key made
for that request, never under the tenant's key: otherwise it would be an oracle
that reverses stored hashes (hash a million candidate IMEIs, compare). Previews
are rate-limited per tenant apart from the API's own limit, and audited.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import orjson
from aiohttp import web

from agent_protocol import KINDS, ProtocolError, Topic, decode_telemetry
from mdm_server import audit
from mdm_server.api.auth import require_admin, require_reader
from mdm_server.api.context import POOL, audit_keys
from mdm_server.api.errors import json_error
from mdm_server.api.limits import POLICY_BODY_LIMIT, PREVIEW_LIMITER, body_limit
from mdm_server.commands.outbox import enqueue_sync_policy
from mdm_server.policy.in_force import in_force, tenant_candidates
from mdm_server.storage import policies as store
from privacy_filters import (
    FLOOR_ID,
    PERSONAL_FLOOR,
    Policy,
    PolicyError,
    compile_policy,
    explain_policy,
    parse_policy,
    policy_to_doc,
    policy_warnings,
)

__all__ = ["routes"]

PREVIEW_KEY_NOTE = ("hashed values in this preview use a key made for this request only: "
                    "they do not match what is stored")

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
        out["warnings"] = _warnings(policy)
    return out


def _warnings(policy: Policy) -> list[dict[str, str]]:
    return [{"path": i.path, "message": i.message} for i in policy_warnings(policy)]


def _invalid(err: PolicyError) -> web.Response:
    return json_error(422, "the policy is not valid",
                      issues=[{"path": i.path, "message": i.message} for i in err.issues])


async def _json_body(request: web.Request) -> Any:
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise web.HTTPBadRequest(reason="the body is not valid JSON") from None


async def list_policies(request: web.Request) -> web.Response:
    """The policies in force, the built-in personal-device floor, and which policy
    decides for each personal device (grouped by the id stamped on its records)."""
    who = await require_reader(request, request.app[POOL])
    async with request.app[POOL].acquire() as conn:
        current = await store.current_policies(conn, who.tenant)
        candidates = await tenant_candidates(conn, who.tenant)
        personal = await conn.fetch(
            "SELECT device_id, groups FROM devices WHERE tenant_id = $1 "
            "AND ownership = 'personal' AND status = 'enrolled' ORDER BY device_id",
            who.tenant)
    decides: dict[str, dict[str, Any]] = {}
    for d in personal:
        found = in_force(candidates, ownership="personal", groups=list(d["groups"]))
        entry = decides.setdefault(found.policy_id, {
            "policy": found.policy_id, "base": found.name, "version": found.version,
            "floor": found.floor, "devices": []})
        entry["devices"].append(d["device_id"])
    return web.json_response({
        "policies": [_version_json(v, with_body=False) for v in current],
        "personal_floor": {"id": FLOOR_ID, "policy": policy_to_doc(PERSONAL_FLOOR),
                           "explanation": explain_policy(PERSONAL_FLOOR)},
        "personal_devices": sorted(decides.values(), key=lambda e: e["policy"]),
    })


async def get_policy(request: web.Request) -> web.Response:
    who = await require_reader(request, request.app[POOL])
    async with request.app[POOL].acquire() as conn:
        v = await store.get_policy(conn, who.tenant, request.match_info["name"])
    if v is None:
        raise web.HTTPNotFound(reason="no such policy")
    return web.json_response(_version_json(v))


@body_limit(POLICY_BODY_LIMIT)
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
    return web.json_response({**_version_json(v), "warnings": _warnings(policy)},
                             status=201 if v.version == 1 else 200)


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


@body_limit(POLICY_BODY_LIMIT)
async def preview(request: web.Request) -> web.Response:
    """Run a policy (the stored one, or a draft in the body) over a sample
    payload; return what would be stored. Nothing is written but an audit entry.
    Hashes use a throwaway key (see the module doc)."""
    who = await require_admin(request, request.app[POOL])
    wait = request.app[PREVIEW_LIMITER].take(who.tenant.encode())
    if wait > 0:
        return web.json_response(
            {"error": "too many policy previews: slow down", "code": "rate_limited"},
            status=429, headers={"Retry-After": str(max(1, math.ceil(wait)))})
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
    async with request.app[POOL].acquire() as conn:
        await audit.append(conn, audit_keys(request), tenant=who.tenant, actor=who.name,
                           action="policy.preview",
                           target=f"policy:{name}",
                           details={"kind": kind, "draft": "policy" in body,
                                    "records": len(records)})
    # Never the tenant's key: a preview must not be able to confirm a stored hash.
    compiled = compile_policy(policy, policy_id=name, version=version,
                              hash_key=os.urandom(32))
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
        "hash_key": "ephemeral",
        "hash_note": PREVIEW_KEY_NOTE,
        "warnings": _warnings(policy),
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
