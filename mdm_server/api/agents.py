"""HTTP routes of foreign location agents (issue 12; docs/agents.md, docs/api.md):

- ``POST /owntracks``: OwnTracks in HTTP mode. HTTP Basic with the device's own
  broker username (``{tenant}.{device}``) and password (derived, never stored:
  mdm_server/broker/credentials.py); the headers ``X-Limit-U``/``X-Limit-D``,
  when sent, must name that user and device. The body is what the app would
  publish over MQTT (an object or an array). The answer is a JSON array: ``[]``,
  or the device's pending commands in the app's form (``reportLocation``).
- ``GET|POST /osmand/{key}``: the OsmAnd app and Traccar Client. The key in the
  URL (made at enrollment, stored as a keyed digest) is the device's only
  credential; the ``id`` the app sends must be that device's.

Both go through the in-process ingest worker (``IngestWorker.submit``): the same
rate limit per device, decode, policy, sealing and dead letters as MQTT, and the
answer comes only once the records (or the dead letter) are committed: 200 means
stored. Bad input is 400 with the reason and a detail naming the field, never
its value, kept as a dead letter; a body naming another device is 403
(``topic_mismatch``). Failed logins count against the client address's API rate
limit (429 past it), so keys and passwords cannot be guessed at speed. Neither
the key nor a password is ever logged (the access log names the route's
template: mdm_server/api/access_log.py).
"""

from __future__ import annotations

import hmac
import math
from typing import Any

import asyncpg
import orjson
from aiohttp import BasicAuth, web

from agent_protocol import MAX_PAYLOAD_BYTES, Reason
from mdm_server.agents import URL_KEY_AGENTS
from mdm_server.agents.commands import owntracks_form
from mdm_server.agents.events import HttpOutcome, HttpSubmission
from mdm_server.agents.secrets import url_key_digest
from mdm_server.agents.topics import split_username
from mdm_server.api.context import POOL, master_key
from mdm_server.api.errors import json_error
from mdm_server.api.limits import RATE_LIMITER, client_address
from mdm_server.broker.credentials import device_password
from mdm_server.ingest.mqtt import InboundMessage

__all__ = ["OSMAND_ROUTE", "OWNTRACKS_ROUTE", "routes"]

OWNTRACKS_ROUTE = "/owntracks"
OSMAND_ROUTE = "/osmand/{key}"
_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")

# A locate waiting for an HTTP-mode OwnTracks device: taken with this answer.
_FETCH = """
WITH due AS (
    SELECT command_id, state FROM commands
    WHERE tenant_id = $1 AND device_id = $2 AND type = 'locate'
      AND state IN ('queued', 'sent') AND fetched_at IS NULL AND expires_at > now()
    ORDER BY created_at FOR UPDATE SKIP LOCKED),
upd AS (
    UPDATE commands c SET state = 'sent', fetched_at = now(),
                          sent_at = coalesce(c.sent_at, now()),
                          send_count = c.send_count + 1, agent_form = $3
    FROM due WHERE c.command_id = due.command_id
    RETURNING c.command_id, due.state AS old_state),
ev AS (
    INSERT INTO command_events (command_id, event, from_state, to_state, accepted, detail)
    SELECT command_id, 'fetched', old_state, 'sent', true,
           'taken by the device with the answer to its HTTP post' FROM upd)
SELECT count(*) FROM upd"""


def _refused(request: web.Request, status: int, message: str, code: str,
             **headers: str) -> web.Response:
    """A failed login: counted against the client address (a guesser is slowed down
    to the API's rate per address, then 429)."""
    limiter = request.app.get(RATE_LIMITER)
    if limiter is not None:
        wait = limiter.addresses.take(client_address(request))
        if wait > 0:
            return web.json_response(
                {"error": "too many requests: slow down", "code": "rate_limited"},
                status=429, headers={"Retry-After": str(max(1, math.ceil(wait)))})
    return web.json_response({"error": message, "code": code}, status=status,
                             headers=headers)


async def _body(request: web.Request) -> bytes | None:
    """The body, at most the agents' payload limit (None: larger)."""
    if request.content_length is not None and request.content_length > MAX_PAYLOAD_BYTES:
        return None
    data = await request.content.read(MAX_PAYLOAD_BYTES + 1)
    return None if len(data) > MAX_PAYLOAD_BYTES else data


async def _submit(request: web.Request, topic: str, payload: bytes,
                  submission: HttpSubmission) -> HttpOutcome:
    from mdm_server.app import INGEST  # the app imports this module

    worker = request.app.get(INGEST)
    if worker is None:
        raise web.HTTPServiceUnavailable(reason="this server runs no ingest")
    return await worker.submit(InboundMessage(0, -1, topic, payload), submission)


def _failed(outcome: HttpOutcome) -> web.Response | None:
    if outcome.status == "limited":
        return web.json_response(
            {"error": "over the device's ingest rate limit: not stored",
             "code": "rate_limited"}, status=429, headers={"Retry-After": "1"})
    if outcome.status == "dead":
        status = 403 if outcome.reason == Reason.TOPIC_MISMATCH else 400
        return json_error(status, outcome.detail or "refused", code=outcome.reason)
    return None


async def _too_large() -> web.Response:
    return json_error(413, f"the body is over {MAX_PAYLOAD_BYTES // 1024} KiB",
                      code="too_large")


async def owntracks_post(request: web.Request) -> web.Response:
    unauthorized = {"WWW-Authenticate": 'Basic realm="mdm"'}
    try:
        auth = BasicAuth.decode(request.headers.get("Authorization", ""))
    except ValueError:
        return _refused(request, 401, "HTTP Basic authentication with the device's "
                        "username and password is required", "unauthorized", **unauthorized)
    who = split_username(auth.login)
    row = None
    if who is not None:
        row = await request.app[POOL].fetchrow(
            "SELECT agent, status, mqtt_generation, mqtt_stale FROM devices "
            "WHERE tenant_id = $1 AND device_id = $2", *who)
    ok = False
    if row is not None and who is not None and row["mqtt_generation"] >= 1:
        want = device_password(master_key(request), who[0], who[1], row["mqtt_generation"])
        ok = hmac.compare_digest(want.encode(), auth.password.encode())
    if not ok or who is None or row is None:
        return _refused(request, 401, "the username or password is not valid",
                        "unauthorized", **unauthorized)
    tenant, device = who
    if row["status"] != "enrolled" or row["agent"] != "owntracks":
        return json_error(403, "the device is not enrolled for OwnTracks", code="forbidden")
    if row["mqtt_stale"]:
        return json_error(403, "the device's password comes from a master key since "
                          "rotated away: re-enroll it", code="stale_credentials")
    limit_u = request.headers.get("X-Limit-U")
    limit_d = request.headers.get("X-Limit-D")
    if (limit_u is not None and limit_u != auth.login) or \
            (limit_d is not None and limit_d != device):
        return json_error(403, "X-Limit-U and X-Limit-D must name the login's own user "
                          "and device", code=str(Reason.TOPIC_MISMATCH))
    payload = await _body(request)
    if payload is None:
        return await _too_large()
    topic = f"owntracks/{auth.login}/{device}"
    outcome = await _submit(request, topic, payload, HttpSubmission(
        "owntracks", tenant, device, f"POST {OWNTRACKS_ROUTE}"))
    failed = _failed(outcome)
    if failed is not None:
        return failed
    form = owntracks_form("locate")
    async with request.app[POOL].acquire() as conn, conn.transaction():
        taken: int = await conn.fetchval(_FETCH, tenant, device, form)
    answer: list[dict[str, Any]] = [form] if taken else []
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


async def osmand_request(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    row: asyncpg.Record | None = None
    if 20 <= len(key) <= 64 and set(key) <= _KEY_CHARS:
        row = await request.app[POOL].fetchrow(
            "SELECT tenant_id, device_id, agent, status FROM devices "
            "WHERE http_key_digest = $1", url_key_digest(master_key(request), key))
    if row is None or row["agent"] not in URL_KEY_AGENTS:
        return _refused(request, 404, "no device has this tracking URL (the enrollment "
                        "prints it)", "unknown_url")
    if row["status"] != "enrolled":
        return json_error(403, "the device is revoked", code="forbidden")
    payload = await _body(request)
    if payload is None:
        return await _too_large()
    tenant, device, agent = row["tenant_id"], row["device_id"], row["agent"]
    outcome = await _submit(request, f"{agent}/{tenant}.{device}/{device}", payload,
                            HttpSubmission(agent, tenant, device,
                                           f"{request.method} {OSMAND_ROUTE}",
                                           method=request.method,
                                           query=list(request.query.items()),
                                           content_type=request.headers.get("Content-Type")))
    failed = _failed(outcome)
    if failed is not None:
        return failed
    return web.Response(status=200)


def routes() -> list[web.RouteDef]:
    return [
        web.post(OWNTRACKS_ROUTE, owntracks_post),
        web.get(OSMAND_ROUTE, osmand_request),
        web.post(OSMAND_ROUTE, osmand_request),
    ]

