"""The authorization matrix, generated: every /api/v1 route the application
registers (read from its router, not a hand list) x every kind of caller x
own / other device / other tenant. A caller never gets another tenant's or
another user's data (404, indistinguishable from nothing), a role never gets a
route that is not its own (403), no token is 401, and nothing answers 5xx.

And every route x every way a token stops working (expired, revoked by the CLI or
the API, a user token whose device was re-enrolled), for each role: 401 with
``WWW-Authenticate: Bearer``, from the request after (each token worked before)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from mdm_server.app import create_app
from mdm_server.config import Config, MqttSettings
from tests.support.services import (
    Server,
    create_database,
    drop_database,
    enroll_devices,
    fetch,
    running_broker,
    server_env,
)
from tests.support.sse import SseClient

pytestmark = pytest.mark.integration

ACME, GLOBEX = "acme", "globex"
OWN, SIBLING, FOREIGN = "u1", "c2", "g1"  # the user's device, another acme device, globex's
LEAVER = "x3"  # an acme device that is re-enrolled (a new holder)
ERASED = "e4"  # an acme device whose user's erasure request an admin fulfils
GUARDS = {"same_admin", "personal_device", "group_factory_reset"}
PARAM = re.compile(r"\{(\w+)(?::[^}]*)?\}")

BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/api/v1/devices/{device}/commands"): {"type": "locate", "reason": "authz"},
    ("POST", "/api/v1/groups/{group}/commands"): {"type": "locate", "reason": "authz"},
    ("PUT", "/api/v1/policies/{name}"): {"applies_to": {}},
    ("POST", "/api/v1/policies/{name}:preview"): {
        "kind": "location", "payload": {"v": 1, "id": "p1", "ts": "2026-11-20T08:00:00Z",
                                        "data": {"lat": 1.0, "lon": 2.0}}},
    ("PUT", "/api/v1/notice-templates/{kind}"): {"text": "Your device is locked.",
                                                 "lang": "en"},
    ("POST", "/api/v1/erasure-requests/{request_id}:refuse"): {"reason": "authz"},
    ("PUT", "/api/v1/places/{place}"): {
        "type": "Polygon", "coordinates": [[[5.0, 52.0], [5.01, 52.0], [5.01, 52.01],
                                            [5.0, 52.01], [5.0, 52.0]]]},
    ("PUT", "/api/v1/reports/shifts/settings"): {"overdue_after_s": 3600},
}
#: A place of each tenant, by that name (a DELETE may remove it: made again before
#: each place route's case).
PLACE = "depot"


@dataclass
class World:
    server: Server
    tokens: dict[str, str]  # caller -> token ("none" absent)
    ids: dict[tuple[str, str], str]  # (param, which) -> value; which: own/sibling/foreign
    dead: dict[str, str]  # how a token stopped working -> the token


#: Tokens that worked, then stopped: how, and the role (admin, auditor, user).
DEAD = ("expired_admin", "expired_auditor", "expired_user", "revoked_admin",
        "revoked_auditor", "revoked_user", "reenrolled_user")


def _make_dead(cli: Any, how: str) -> str:
    role = how.split("_")[1]
    if role == "user":
        device = LEAVER if how == "reenrolled_user" else OWN
        return str(cli("user", "token", "--tenant", ACME, "--device", device)).strip()
    return str(cli("admin", "create", "--tenant", ACME, "--name", how, "--role", role)).strip()


def _token_id(database: str, token: str) -> str:
    rows = asyncio.run(fetch(database, "SELECT token_id::text AS id FROM api_tokens "
                                       "WHERE token_sha256 = $1",
                             hashlib.sha256(token.encode()).digest()))
    return str(rows[0]["id"])


def _kill(world: World, database: str) -> None:
    """Each dead token works first; then it expires (time passes: its expires_at is
    moved to the past), is revoked (CLI, API) or its device re-enrolled."""
    srv, cli = world.server, world.server.cli
    for how, token in world.dead.items():
        assert srv.request("GET", "/api/v1/token", token)[0] == 200, how
    for how in ("expired_admin", "expired_auditor", "expired_user"):
        asyncio.run(fetch(database, "UPDATE api_tokens SET expires_at = now() - interval "
                                    "'1 second' WHERE token_sha256 = $1",
                          hashlib.sha256(world.dead[how].encode()).digest()))
    for how in ("revoked_admin", "revoked_user"):
        cli("token", "revoke", "--tenant", ACME, "--id", _token_id(database, world.dead[how]))
    status, _ = srv.request("DELETE", "/api/v1/tokens/" + _token_id(
        database, world.dead["revoked_auditor"]), world.tokens["admin"])
    assert status == 204
    cli("device", "reenroll", "--tenant", ACME, "--device", LEAVER)


def _routes() -> list[tuple[str, str]]:
    cfg = Config(database_url="postgresql://x@127.0.0.1/x", mqtt=MqttSettings("127.0.0.1", 1))
    app = create_app(cfg, ingest=False)
    out = set()
    for r in app.router.routes():
        info = r.resource.get_info() if r.resource else {}
        path = info.get("formatter") or info.get("path")
        if r.method in ("GET", "POST", "PUT", "DELETE") and path and \
                str(path).startswith("/api/v1/") and path != "/api/v1/openapi.json":
            out.add((r.method, str(path)))
    return sorted(out)


ROUTES = _routes()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("authz")
    database = asyncio.run(create_database())
    try:
        with running_broker(tmp) as broker:
            asyncio.run(enroll_devices(database, broker.url, ACME, [OWN, SIBLING, LEAVER,
                                                                   ERASED]))
            asyncio.run(enroll_devices(database, broker.url, GLOBEX, [FOREIGN]))
            asyncio.run(fetch(database, "UPDATE devices SET groups = '{grp}'"))
            srv = Server(server_env(database, broker.url, MDM_API_RATE_PER_S="100000",
                                    MDM_API_BURST="100000"), tmp / "serve.log")
            cli = srv.cli
            tokens = {
                "admin": cli("admin", "create", "--tenant", ACME, "--name", "alice").strip(),
                "auditor": cli("admin", "create", "--tenant", ACME, "--name", "audrey",
                               "--role", "auditor").strip(),
                "user": cli("user", "token", "--tenant", ACME, "--device", OWN).strip(),
                "other_admin": cli("admin", "create", "--tenant", GLOBEX,
                                   "--name", "eve").strip(),
            }
            g_user = cli("user", "token", "--tenant", GLOBEX, "--device", FOREIGN).strip()
            # Fulfilling an erasure revokes the device's user tokens: not the caller's.
            e_user = cli("user", "token", "--tenant", ACME, "--device", ERASED).strip()
            dead = {how: _make_dead(cli, how) for how in DEAD}
            # Tokens to revoke through DELETE /api/v1/tokens/{token_id}: acme's, globex's.
            spare = {which: cli("admin", "create", "--tenant", tenant, "--name",
                                f"spare-{which}").strip()
                     for which, tenant in (("own", ACME), ("sibling", ACME),
                                           ("foreign", GLOBEX))}
            srv.start()
            try:
                ids: dict[tuple[str, str], str] = {
                    ("token_id", which): _token_id(database, token)
                    for which, token in spare.items()}
                for which, device, token in (("own", OWN, tokens["admin"]),
                                             ("sibling", SIBLING, tokens["admin"]),
                                             ("foreign", FOREIGN, tokens["other_admin"])):
                    status, cmd = srv.request("POST", f"/api/v1/devices/{device}/commands",
                                              token, {"type": "lock", "reason": "setup"})
                    assert status == 201, cmd
                    ids[("command_id", which)] = cmd["command_id"]
                for which, token in (("own", tokens["admin"]),
                                     ("foreign", tokens["other_admin"])):
                    status, batch = srv.request("POST", "/api/v1/groups/grp/commands", token,
                                                {"type": "locate", "reason": "setup"})
                    assert status == 201, batch
                    ids[("batch_id", which)] = batch["batch_id"]
                for which, device, token in (("own", ERASED, e_user),
                                             ("foreign", FOREIGN, g_user)):
                    status, req = srv.request(
                        "POST", f"/api/v1/me/devices/{device}/erasure-requests", token)
                    assert status == 201, req
                    ids[("request_id", which)] = req["id"]
                ids[("batch_id", "sibling")] = ids[("batch_id", "own")]
                ids[("request_id", "sibling")] = ids[("request_id", "own")]
                world = World(srv, tokens, ids, dead)
                _kill(world, database)
                yield world
            finally:
                srv.stop()
    finally:
        asyncio.run(drop_database(database))


def _url(template: str, which: str, world: World) -> str:
    device = {"own": OWN, "sibling": SIBLING, "foreign": FOREIGN}[which]
    fixed = {"device": device, "name": "default", "kind": "lock", "group": "grp",
             "version": "1", "place": PLACE}

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in fixed:
            return fixed[name]
        return world.ids[(name, which)]

    url = PARAM.sub(sub, template)
    if template.endswith("/data"):
        url += "?kind=location"
    if template.endswith("/trips"):
        url += "?from=2026-11-20T00:00:00Z&to=2026-11-21T00:00:00Z"
    return url


def _ensure_places(world: World) -> None:
    """Each tenant has its place ``depot`` (a DELETE case may have removed it)."""
    body = BODIES[("PUT", "/api/v1/places/{place}")]
    for admin in ("admin", "other_admin"):
        token = world.tokens[admin]
        if world.server.request("GET", f"/api/v1/places/{PLACE}", token)[0] == 404:
            status, _ = world.server.request("PUT", f"/api/v1/places/{PLACE}", token, body)
            assert status in (200, 201)


# Server-Sent Event streams: a 200 is open until the client closes it.
STREAMS = {"/api/v1/live", "/api/v1/me/devices/{device}/live"}

# GETs an auditor may not make: watching live locations is no review of stored data
# (docs/api.md, "Live").
ADMIN_ONLY_GETS = {"/api/v1/live"}

# Routes every valid token may call, about the token itself.
EVERY_ROLE = {"/api/v1/token"}


def _expected(method: str, template: str, caller: str, which: str) -> set[int] | str:
    """The statuses allowed, or "ok" (anything but 401/403/404 and 5xx)."""
    if caller == "none":
        return {401}
    if template in EVERY_ROLE:
        return "ok"
    scoped = "{" in template and not template.startswith("/api/v1/groups/") and \
        "{name" not in template and "{kind" not in template and "{place" not in template
    if template.startswith("/api/v1/me/"):
        if caller != "user":
            return {403}
        if not scoped or which == "own":
            return "ok"
        return {404}
    if caller == "user":
        return {403}
    if (method != "GET" or template in ADMIN_ONLY_GETS) and caller == "auditor":
        return {403}
    if caller == "other_admin":
        # Everything of acme is invisible to globex's admin; unscoped routes show
        # globex's own data.
        return {404} if scoped and which != "foreign" else "ok"
    if scoped and which == "foreign":
        return {404}
    return "ok"


CASES = [(m, t, c, w) for m, t in ROUTES
         for c in ("none", "admin", "auditor", "user", "other_admin")
         for w in (("own", "sibling", "foreign") if "{" in t else ("own",))]


@pytest.mark.parametrize(("method", "template", "caller", "which"), CASES,
                         ids=[f"{m} {t} {c} {w}" for m, t, c, w in CASES])
def test_authorization(world: World, method: str, template: str, caller: str,
                       which: str) -> None:
    if "{place" in template:
        _ensure_places(world)
    url = _url(template, which, world)
    body = BODIES.get((method, template))
    if template in STREAMS:  # its 200 never ends: the status and the first event
        stream = SseClient(world.server.base, url, world.tokens.get(caller))
        status, answer = stream.status, stream.body
        if status == 200:
            assert stream.next().name == "ready"
            stream.close()
    else:
        status, answer = world.server.request(method, url, world.tokens.get(caller), body)
    assert status < 500, (status, answer)
    expected = _expected(method, template, caller, which)
    if expected == "ok":
        # A 403 that is a guard of the request itself (approving one's own
        # factory reset...) is not an authorization refusal.
        guard = status == 403 and isinstance(answer, dict) and answer.get("code") in GUARDS
        assert status not in (401, 404) and (status != 403 or guard), (status, answer)
    else:
        assert status in expected, (status, answer)


DEAD_CASES = [(m, t, how) for m, t in ROUTES for how in DEAD]


@pytest.mark.parametrize(("method", "template", "how"), DEAD_CASES,
                         ids=[f"{m} {t} {how}" for m, t, how in DEAD_CASES])
def test_a_token_that_stopped_working_is_401_everywhere(world: World, method: str,
                                                        template: str, how: str) -> None:
    url = world.server.base + _url(template, "own", world)
    body = BODIES.get((method, template))
    req = urllib.request.Request(url, method=method,
                                 data=None if body is None else json.dumps(body).encode())
    req.add_header("Authorization", f"Bearer {world.dead[how]}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, headers, raw = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        status, headers, raw = err.code, err.headers, err.read()
    assert status == 401, (status, raw[:300])
    assert headers["WWW-Authenticate"] == "Bearer"
    assert json.loads(raw) == {"error": "the token is not valid (unknown, expired or revoked)"}


def test_the_matrix_covers_every_route() -> None:
    assert len(ROUTES) >= 30
    templates = {t for _, t in ROUTES}
    for expected in ("/api/v1/me/devices/{device}/export", "/api/v1/devices/{device}/data",
                     "/api/v1/devices/{device}/commands/{command_id}:approve",
                     "/api/v1/me/devices", "/api/v1/token", "/api/v1/tokens/{token_id}",
                     "/api/v1/devices/{device}/trips", "/api/v1/places/{place}"):
        assert expected in templates, sorted(templates)
