"""/api/v1/tokens: the tenant's API tokens, listed and revoked by their public id.

Listing is a read of who may act in the tenant (an access review): admins and
auditors, like every GET of the admin API. Revoking is an admin's, audited
(``token.revoke``). Neither ever shows a token or its digest. The CLI does the
same (``mdm-server token list|revoke``).
"""

from __future__ import annotations

import uuid

from aiohttp import web

from mdm_server import audit
from mdm_server.api.auth import require_admin, require_reader
from mdm_server.api.context import POOL, audit_keys
from mdm_server.api.data import page_limit
from mdm_server.storage.tokens import TOKEN_STATES, list_tokens, revoke_token, token_json

__all__ = ["routes"]

_ID_PARAM = "{token_id:[0-9a-fA-F-]{36}}"


def _uuid(raw: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise web.HTTPBadRequest(reason=f"{what} is not valid") from None


async def get_tokens(request: web.Request) -> web.Response:
    who = await require_reader(request, request.app[POOL])
    state = request.query.get("state")
    if state is not None and state not in TOKEN_STATES:
        raise web.HTTPBadRequest(reason="state must be one of " + ", ".join(TOKEN_STATES))
    limit = page_limit(request)
    raw = request.query.get("cursor")
    after = None if raw is None else _uuid(raw, "cursor")
    async with request.app[POOL].acquire() as conn:
        rows = await list_tokens(conn, who.tenant, state=state, limit=limit + 1, after=after)
    if rows is None:
        raise web.HTTPBadRequest(reason="cursor is not valid")
    more = len(rows) > limit
    rows = rows[:limit]
    return web.json_response({"tokens": [token_json(r) for r in rows],
                              "next": str(rows[-1]["token_id"]) if more else None})


async def delete_token(request: web.Request) -> web.Response:
    who = await require_admin(request, request.app[POOL])
    try:
        token_id = uuid.UUID(request.match_info["token_id"])
    except ValueError:
        raise web.HTTPNotFound(reason="no such token") from None
    async with request.app[POOL].acquire() as conn, conn.transaction():
        found = await revoke_token(conn, who.tenant, token_id)
        if found is None:
            raise web.HTTPNotFound(reason="no such token")
        row, changed = found
        if changed:
            await audit.append(conn, audit_keys(request), tenant=who.tenant, actor=who.name,
                               action="token.revoke", target=f"token:{token_id}",
                               details={"role": row["role"]})
    return web.Response(status=204)


def routes() -> list[web.RouteDef]:
    return [web.get("/api/v1/tokens", get_tokens),
            web.delete(f"/api/v1/tokens/{_ID_PARAM}", delete_token)]
