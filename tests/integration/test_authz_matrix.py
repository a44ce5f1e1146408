"""The authorization matrix, generated: every /api/v1 route the application
registers (read from its router, not a hand list) x every kind of caller x
own / other device / other tenant. A caller never gets another tenant's or
another user's data (404, indistinguishable from nothing), a role never gets a
route that is not its own (403), no token is 401, and nothing answers 5xx."""

from __future__ import annotations

import asyncio
import re
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

pytestmark = pytest.mark.integration

ACME, GLOBEX = "acme", "globex"
OWN, SIBLING, FOREIGN = "u1", "c2", "g1"  # the user's device, another acme device, globex's
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
}


@dataclass
class World:
    server: Server
    tokens: dict[str, str]  # caller -> token ("none" absent)
    ids: dict[tuple[str, str], str]  # (param, which) -> value; which: own/sibling/foreign


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
            asyncio.run(enroll_devices(database, broker.url, ACME, [OWN, SIBLING]))
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
            srv.start()
            try:
                ids: dict[tuple[str, str], str] = {}
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
                for which, device, token in (("own", OWN, tokens["user"]),
                                             ("foreign", FOREIGN, g_user)):
                    status, req = srv.request(
                        "POST", f"/api/v1/me/devices/{device}/erasure-requests", token)
                    assert status == 201, req
                    ids[("request_id", which)] = req["id"]
                ids[("batch_id", "sibling")] = ids[("batch_id", "own")]
                ids[("request_id", "sibling")] = ids[("request_id", "own")]
                yield World(srv, tokens, ids)
            finally:
                srv.stop()
    finally:
        asyncio.run(drop_database(database))


def _url(template: str, which: str, world: World) -> str:
    device = {"own": OWN, "sibling": SIBLING, "foreign": FOREIGN}[which]
    fixed = {"device": device, "name": "default", "kind": "lock", "group": "grp",
             "version": "1"}

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in fixed:
            return fixed[name]
        return world.ids[(name, which)]

    url = PARAM.sub(sub, template)
    if template.endswith("/data"):
        url += "?kind=location"
    return url


# Routes every valid token may call, about the token itself.
EVERY_ROLE = {"/api/v1/token"}


def _expected(method: str, template: str, caller: str, which: str) -> set[int] | str:
    """The statuses allowed, or "ok" (anything but 401/403/404 and 5xx)."""
    if caller == "none":
        return {401}
    if template in EVERY_ROLE:
        return "ok"
    scoped = "{" in template and not template.startswith("/api/v1/groups/") and \
        "{name" not in template and "{kind" not in template
    if template.startswith("/api/v1/me/"):
        if caller != "user":
            return {403}
        if not scoped or which == "own":
            return "ok"
        return {404}
    if caller == "user":
        return {403}
    if method != "GET" and caller == "auditor":
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
    url = _url(template, which, world)
    body = BODIES.get((method, template))
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


def test_the_matrix_covers_every_route() -> None:
    assert len(ROUTES) >= 30
    templates = {t for _, t in ROUTES}
    for expected in ("/api/v1/me/devices/{device}/export", "/api/v1/devices/{device}/data",
                     "/api/v1/devices/{device}/commands/{command_id}:approve"):
        assert expected in templates, sorted(templates)
