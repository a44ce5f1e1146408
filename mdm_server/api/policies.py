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
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from agent_protocol import KINDS, ProtocolError, Topic, decode_telemetry
from mdm_server import audit
from mdm_server.api.auth import require_admin, require_reader
from mdm_server.api.context import CONFIG, POOL, audit_keys
from mdm_server.api.data import page_limit
from mdm_server.api.errors import json_error
from mdm_server.api.limits import POLICY_BODY_LIMIT, PREVIEW_LIMITER, body_limit
from mdm_server.commands.outbox import enqueue_sync_policy
from mdm_server.policy.in_force import Candidates, in_force, tenant_candidates
from mdm_server.policy.offload import policy_work
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
_VERSION = "{version:[0-9]{1,9}}"

# Everything below that parses, compiles, merges or explains a policy, or encodes or
# decodes one, runs in policy_work (mdm_server/policy/offload.py): a policy with
# thousands of zones takes seconds, and the event loop answers every tenant.


def _meta_json(v: store.PolicyVersion) -> dict[str, Any]:
    return {"name": v.name, "version": v.version, "deleted": v.deleted, "pruned": v.pruned,
            "bytes": v.size, "created_at": v.created_at.isoformat(),
            "created_by": v.created_by}


def _version_json(v: store.PolicyVersion) -> dict[str, Any]:
    """The version with its canonical policy, explanation and warnings (where it has
    a body: not a deletion, not a pruned version). In a thread."""
    out = _meta_json(v)
    if v.body is not None:
        policy = parse_policy(v.body, name=v.name)
        out["policy"] = policy_to_doc(policy)
        out["explanation"] = explain_policy(policy)
        out["warnings"] = _warnings(policy)
    return out


def _version_bytes(v: store.PolicyVersion) -> bytes:
    return orjson.dumps(_version_json(v))


def _json_bytes(body: bytes, status: int = 200) -> web.Response:
    """An answer encoded off the loop (web.json_response would encode on it)."""
    return web.Response(body=body, status=status, content_type="application/json")


def _warnings(policy: Policy) -> list[dict[str, str]]:
    return [{"path": i.path, "message": i.message} for i in policy_warnings(policy)]


def _invalid(err: PolicyError) -> web.Response:
    return json_error(422, "the policy is not valid",
                      issues=[{"path": i.path, "message": i.message} for i in err.issues])


def _decode(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise web.HTTPBadRequest(reason="the body is not valid JSON") from None


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A policy sent to PUT, validated, in its canonical form."""

    policy: Policy
    doc: dict[str, Any]
    text: str  # doc as stored


class _DefaultScope(Exception):
    """The default policy was given an applies_to."""


def _prepare(raw: bytes, name: str) -> _Prepared:
    policy = parse_policy(_decode(raw), name=name)
    if name == store.DEFAULT_POLICY and (policy.applies_to.ownership
                                         or policy.applies_to.groups):
        raise _DefaultScope
    doc = policy_to_doc(policy)
    return _Prepared(policy, doc, orjson.dumps(doc).decode())


def _put_answer(v: store.PolicyVersion, p: _Prepared) -> bytes:
    return orjson.dumps({**_meta_json(v), "policy": p.doc,
                         "explanation": explain_policy(p.policy),
                         "warnings": _warnings(p.policy)})


def _policy_list(current: list[store.PolicyVersion], candidates: Candidates,
                 personal: list[tuple[str, list[str]]], storage: dict[str, int]) -> bytes:
    decides: dict[str, dict[str, Any]] = {}
    for device, groups in personal:
        found = in_force(candidates, ownership="personal", groups=groups)
        entry = decides.setdefault(found.policy_id, {
            "policy": found.policy_id, "base": found.name, "version": found.version,
            "floor": found.floor, "devices": []})
        entry["devices"].append(device)
    return orjson.dumps({
        "policies": [_meta_json(v) for v in current],
        "personal_floor": {"id": FLOOR_ID, "policy": policy_to_doc(PERSONAL_FLOOR),
                           "explanation": explain_policy(PERSONAL_FLOOR)},
        "personal_devices": sorted(decides.values(), key=lambda e: e["policy"]),
        "storage": storage,
    })


async def list_policies(request: web.Request) -> web.Response:
    """The policies in force, the built-in personal-device floor, and which policy
    decides for each personal device (grouped by the id stamped on its records)."""
    who = await require_reader(request, request.app[POOL])
    async with request.app[POOL].acquire() as conn:
        current = await store.current_policies(conn, who.tenant, bodies=False)
        candidates = await tenant_candidates(conn, who.tenant)
        personal = await conn.fetch(
            "SELECT device_id, groups FROM devices WHERE tenant_id = $1 "
            "AND ownership = 'personal' AND status = 'enrolled' ORDER BY device_id",
            who.tenant)
        used = await store.stored_bytes(conn, who.tenant)
    storage = {"bytes": used, "cap_bytes": request.app[CONFIG].policy_store_bytes}
    return _json_bytes(await policy_work(
        _policy_list, current, candidates,
        [(d["device_id"], list(d["groups"])) for d in personal], storage))


async def get_policy(request: web.Request) -> web.Response:
    who = await require_reader(request, request.app[POOL])
    async with request.app[POOL].acquire() as conn:
        v = await store.get_policy(conn, who.tenant, request.match_info["name"])
    if v is None:
        raise web.HTTPNotFound(reason="no such policy")
    return _json_bytes(await policy_work(_version_bytes, v))


@body_limit(POLICY_BODY_LIMIT)
async def put_policy(request: web.Request) -> web.Response:
    who = await require_admin(request, request.app[POOL])
    name = request.match_info["name"]
    try:
        prepared = await policy_work(_prepare, await request.read(), name)
    except PolicyError as err:
        return _invalid(err)
    except _DefaultScope:
        return json_error(422, "the policy is not valid", issues=[
            {"path": "applies_to", "message": "the default policy applies to every device"}])
    cap = request.app[CONFIG].policy_store_bytes
    try:
        async with request.app[POOL].acquire() as conn, conn.transaction():
            v, pruned = await store.store_version(conn, who.tenant, name, prepared.text,
                                                  who.name, cap_bytes=cap)
            # Same transaction: the devices are told exactly when the change is committed.
            await enqueue_sync_policy(conn, who.tenant, who.name)
            details: dict[str, Any] = {"version": v.version}
            if pruned:
                details["pruned_versions"] = pruned
            await audit.append(conn, audit_keys(request), tenant=who.tenant, actor=who.name,
                               action="policy.put", target=f"policy:{name}", details=details)
    except store.PolicyStoreFull:
        return json_error(
            409, f"the tenant's policies would take more than the {cap // (1024 * 1024)} MiB "
                 "they may: the policies in force and this version do not fit even with "
                 "every older version pruned; delete or shrink a policy",
            code="policy_storage_full")
    return _json_bytes(await policy_work(_put_answer, v, prepared),
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


def _version_cursor(request: web.Request) -> int | None:
    raw = request.query.get("cursor")
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        raise web.HTTPBadRequest(reason="cursor is not valid")
    return int(raw)


async def list_versions(request: web.Request) -> web.Response:
    """A page of the policy's versions, oldest first, without their bodies (GET
    .../versions/{version} has one)."""
    who = await require_reader(request, request.app[POOL])
    name = request.match_info["name"]
    limit, after = page_limit(request), _version_cursor(request)
    async with request.app[POOL].acquire() as conn:
        versions = await store.list_versions(conn, who.tenant, name, after=after,
                                             limit=limit + 1)
        if not versions and not await store.policy_exists(conn, who.tenant, name):
            raise web.HTTPNotFound(reason="no such policy")
    more = len(versions) > limit
    versions = versions[:limit]
    return web.json_response({"versions": [_meta_json(v) for v in versions],
                              "next": str(versions[-1].version) if more else None})


async def get_version(request: web.Request) -> web.Response:
    """One version with its policy, explanation and warnings (none for a deletion
    or a pruned version)."""
    who = await require_reader(request, request.app[POOL])
    async with request.app[POOL].acquire() as conn:
        v = await store.get_version(conn, who.tenant, request.match_info["name"],
                                    int(request.match_info["version"]))
    if v is None:
        raise web.HTTPNotFound(reason="no such policy version")
    return _json_bytes(await policy_work(_version_bytes, v))


def _preview_input(body: Any, name: str, tenant: str, stored: store.PolicyVersion | None
                   ) -> tuple[Policy, list[Any]]:
    """The policy to preview (the draft, else the stored one) and the sample's
    records. PolicyError, ProtocolError."""
    policy = parse_policy(body["policy"] if stored is None else stored.body, name=name)
    records = decode_telemetry(Topic(tenant, "preview", "telemetry", body["kind"]),
                               orjson.dumps(body.get("payload")),
                               now_ms=int(time.time() * 1000))
    return policy, records


def _preview_answer(policy: Policy, records: list[Any], name: str, version: int, kind: str,
                    checked_out: bool) -> bytes:
    # Never the tenant's key: a preview must not be able to confirm a stored hash.
    compiled = compile_policy(policy, policy_id=name, version=version,
                              hash_key=os.urandom(32))
    result = compiled.filter_batch(
        kind, ["preview"] * len(records), [r.ts_ms for r in records],
        [r.data for r in records], checked_out=lambda _d, _t: checked_out)
    return orjson.dumps({
        "collected": compiled.collects(kind),
        "stored": [{"id": records[k].id, "ts_ms": records[k].ts_ms, "data": data}
                   for k, data in zip(result.kept, result.data, strict=True)],
        "suppressed": [records[k].id for k in result.suppressed],
        "explanation": explain_policy(policy),
        "hash_key": "ephemeral",
        "hash_note": PREVIEW_KEY_NOTE,
        "warnings": _warnings(policy),
    })


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
    body = await policy_work(_decode, await request.read())
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(reason="the body must be a JSON object")
    kind = body.get("kind")
    if kind not in KINDS:
        return json_error(422, "kind must be one of " + ", ".join(KINDS))
    stored = None
    if "policy" not in body:
        async with request.app[POOL].acquire() as conn:
            stored = await store.get_policy(conn, who.tenant, name)
        if stored is None or stored.body is None:
            raise web.HTTPNotFound(reason="no such policy")
    try:
        policy, records = await policy_work(_preview_input, body, name, who.tenant, stored)
    except PolicyError as err:
        return _invalid(err)
    except ProtocolError as err:
        return json_error(422, "the sample payload is not valid telemetry",
                          reason=str(err.reason), detail=err.detail, path=err.path)
    async with request.app[POOL].acquire() as conn:
        await audit.append(conn, audit_keys(request), tenant=who.tenant, actor=who.name,
                           action="policy.preview",
                           target=f"policy:{name}",
                           details={"kind": kind, "draft": stored is None,
                                    "records": len(records)})
    return _json_bytes(await policy_work(
        _preview_answer, policy, records, name, 0 if stored is None else stored.version,
        kind, bool(body.get("checked_out", True))))


def routes() -> list[web.RouteDef]:
    base = "/api/v1/policies"
    return [
        web.get(base, list_policies),
        web.post(f"{base}/{_NAME}:preview", preview),
        web.get(f"{base}/{_NAME}/versions", list_versions),
        web.get(f"{base}/{_NAME}/versions/{_VERSION}", get_version),
        web.get(f"{base}/{_NAME}", get_policy),
        web.put(f"{base}/{_NAME}", put_policy),
        web.delete(f"{base}/{_NAME}", delete_policy),
    ]
