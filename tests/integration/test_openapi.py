"""The OpenAPI document (mdm_server/api/openapi.py) is true of the running server.

- It is valid OpenAPI 3.1, every schema in it valid JSON Schema 2020-12, every
  ``$ref`` resolvable, and ``GET /api/v1/openapi.json`` serves it without a token.
- Every route the app registers under /api/v1 is documented, and every documented
  operation is registered (but those in ``PENDING``), read from ``app.router``.
- The roles in each operation's ``x-roles`` are the server's: no token is 401, a
  token of another role is 403.
- schemathesis fuzzes every documented operation the server serves (positive and
  negative data, a bounded number of examples each, half of the positive ones on
  real devices, policies and commands; not a stream's 200, which never ends: those
  operations are marked ``x-stream``) against a real ``mdm-server serve`` holding
  devices, telemetry published through the real broker and ingest, a dead letter,
  commands, a group batch and an erasure request: no answer is a 5xx, and every
  answer's status, content type, headers and body match the document.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema_rs
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from mdm_server.api import openapi
from tests.support.mqtt import publish_as_devices
from tests.support.services import (
    REPO,
    Server,
    create_database,
    drop_database,
    running_broker,
    server_env,
    wait_for_count,
)

pytestmark = pytest.mark.integration

TENANT, OTHER = "acme", "globex"
#: Documented operations ("METHOD /path/{param}") whose routes are not registered yet
#: because another change is writing them: not fuzzed, and allowed to be missing
#: from the router. Remove an entry as soon as its route exists.
PENDING: frozenset[str] = frozenset()
#: Examples per operation and generation mode (positive, negative).
EXAMPLES = 20
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


@dataclass
class Api:
    server: Server
    tokens: dict[str, str]  # role -> token: admin, and auditor, user if the CLI makes them
    bob: str  # a second admin
    #: Values of path parameters that exist (device, name, command_id, ...).
    known: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    def call(self, method: str, path: str, token: str | None, body: object = None
             ) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.request(method, self.server.base + path, json=body, headers=headers,
                                timeout=30)


def _cli_help(*args: str) -> str:
    """``mdm-server ARGS --help``, or "" where the CLI has no such command (yet)."""
    out = subprocess.run([sys.executable, "-m", "mdm_server", *args, "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    return out.stdout if out.returncode == 0 else ""


def _telemetry() -> list[tuple[str, bytes]]:
    """A few records of two kinds for two devices, and one message ingest refuses."""
    now = datetime.now(UTC)
    out = []
    for device in ("corp1", "pers1"):
        base = f"mdm/v1/{TENANT}/devices/{device}/telemetry"
        for i in range(5):
            ts = (now - timedelta(hours=i)).isoformat().replace("+00:00", "Z")
            out.append((f"{base}/location", json.dumps({
                "v": 1, "id": f"loc-{i}", "ts": ts,
                "data": {"lat": 52.37 + i / 100, "lon": 4.89, "accuracy_m": 10}}).encode()))
            out.append((f"{base}/identity", json.dumps({
                "v": 1, "id": f"id-{i}", "ts": ts,
                "data": {"imei": "356938035643809", "serial": f"SN{i}"}}).encode()))
    # A shift of corp1 (the shift report), its user id one a spreadsheet would run.
    base = f"mdm/v1/{TENANT}/devices/corp1/telemetry/checkinout"
    for i, event in enumerate(("check_out", "check_in")):
        ts = (now - timedelta(hours=3 - i)).isoformat().replace("+00:00", "Z")
        out.append((base, json.dumps({
            "v": 1, "id": f"cio-{i}", "ts": ts,
            "data": {"event": event, "user_id": "=u-17", "condition": {
                "battery_pct": 90 - 50 * i, "case": ("ok", "damaged")[i]}}}).encode()))
    out.append((f"mdm/v1/{TENANT}/devices/corp1/telemetry/location", b"not json"))
    return out


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("openapi")
    database = asyncio.run(create_database())
    try:
        with running_broker(tmp) as broker:
            # Rate limits far above what the fuzzer sends: 429 is documented, but
            # a throttled fuzzer tests nothing else.
            srv = Server(server_env(database, broker.url, MDM_API_RATE_PER_S="100000",
                                    MDM_API_BURST="1000000", MDM_PREVIEW_PER_MIN="100000"),
                         tmp / "serve.log")
            srv.cli("tenant", "create", TENANT)
            srv.cli("tenant", "create", OTHER)
            for tenant, device, ownership, extra in (
                    (TENANT, "corp1", "corporate", ("--group", "field")),
                    (TENANT, "corp2", "corporate", ("--group", "field")),
                    (TENANT, "pers1", "personal", ("--group", "field", "--user-email",
                                                   "pat@example.org")),
                    (TENANT, "pers2", "personal", ("--user-email", "pat@example.org")),
                    (TENANT, "gone1", "corporate", ()),
                    (TENANT, "pers3", "personal", ()),
                    (OTHER, "g1", "corporate", ())):
                srv.cli("device", "enroll", "--tenant", tenant, "--device", device,
                        "--ownership", ownership, *extra)
            srv.cli("device", "revoke", "--tenant", TENANT, "--device", "gone1")
            tokens = {"admin": srv.cli("admin", "create", "--tenant", TENANT,
                                       "--name", "alice").strip()}
            bob = srv.cli("admin", "create", "--tenant", TENANT, "--name", "bob").strip()
            if "auditor" in _cli_help("admin", "create"):
                tokens["auditor"] = srv.cli("admin", "create", "--tenant", TENANT, "--name",
                                            "audrey", "--role", "auditor").strip()
            if _cli_help("user", "token"):
                tokens["user"] = srv.cli("user", "token", "--tenant", TENANT,
                                         "--device", "pers1").strip()
            srv.start()
            try:
                messages = _telemetry()
                publish_as_devices(broker.port, messages)
                wait_for_count(database, "SELECT count(*) FROM dead_letters", 1, timeout=60)
                # pers1 is personal: the strict built-in policy keeps no location.
                wait_for_count(database, "SELECT count(*) FROM telemetry", 17, timeout=60)
                api = Api(srv, tokens, bob)
                _make_state(api)
                yield api
            finally:
                srv.stop()
    finally:
        asyncio.run(drop_database(database))


_DEPOT = {"type": "Polygon", "coordinates": [[[4.88, 52.36], [4.9, 52.36], [4.9, 52.38],
                                              [4.88, 52.38], [4.88, 52.36]]]}


def _make_state(api: Api) -> None:
    """Commands, a batch, a policy, an erasure request: things for the fuzzer to find."""
    admin = api.tokens["admin"]
    cmds = "/api/v1/devices/{}/commands"

    def post(path: str, body: object, token: str = admin) -> dict[str, Any]:
        resp = api.call("POST", path, token, body)
        assert resp.status_code in (200, 201), (path, resp.status_code, resp.text)
        out: dict[str, Any] = resp.json()
        return out

    lock = post(cmds.format("corp1"), {"type": "lock", "reason": "lost"})
    reset = post(cmds.format("corp2"), {"type": "factory_reset", "reason": "returned"})
    wipe = post(cmds.format("pers1"), {"type": "wipe", "scope": "managed", "reason": "left"},
                api.bob)
    batch = post("/api/v1/groups/field/commands", {"type": "wipe", "scope": "full",
                                                   "reason": "stolen van"})
    resp = api.call("PUT", "/api/v1/policies/field", admin, {
        "applies_to": {"groups": ["field"]},
        "fields": {"identity.imei": {"action": "mask", "keep_last": 4}}})
    assert resp.status_code in (200, 201), resp.text
    resp = api.call("PUT", "/api/v1/places/depot", admin, _DEPOT)
    assert resp.status_code in (200, 201), resp.text
    known: dict[str, list[dict[str, str]]] = {
        "device": [{"device": d} for d in ("corp1", "pers1", "gone1", "g1")],
        "name": [{"name": n} for n in ("default", "field")],
        "version": [{"name": "field", "version": "1"}, {"name": "default", "version": "1"}],
        "group": [{"group": "field"}],
        "command_id": [{"device": c["device"], "command_id": c["command_id"]}
                       for c in (lock, reset, wipe)],
        "batch_id": [{"batch_id": batch["batch_id"]}],
        "place": [{"place": "depot"}],
        "place_version": [{"place": "depot", "version": "1"}],
    }
    # A token nobody uses, for DELETE /api/v1/tokens/{token_id}.
    api.server.cli("admin", "create", "--tenant", TENANT, "--name", "spare")
    listed = api.call("GET", "/api/v1/tokens?state=active", admin).json()["tokens"]
    known["token_id"] = [{"token_id": t["id"]} for t in listed if t["name"] == "spare"]
    if "user" in api.tokens:
        # The fuzzer fulfils it, which revokes the user tokens of its device: not the
        # user token it calls /me with (pers1's).
        other = api.server.cli("user", "token", "--tenant", TENANT, "--device", "pers3")
        made = post("/api/v1/me/devices/pers3/erasure-requests", {}, other.strip())
        known["request_id"] = [{"request_id": made["id"]}]
        # The user's token covers pers1 and pers2 (same e-mail); corp1 is not theirs.
        known["my_device"] = [{"device": d} for d in ("pers1", "pers2", "corp1")]
    api.known = known


# --- the document ----------------------------------------------------------------------

def _norm(path: str) -> str:
    """A path template with its parameter names (and aiohttp's regexes) left out."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def _documented() -> dict[str, str]:
    """``METHOD /normalised/path`` -> the operation's label, for every operation."""
    return {f"{m.upper()} {_norm(p)}": f"{m.upper()} {p}"
            for p, ops in openapi.document()["paths"].items() for m in ops}


def _registered() -> set[str]:
    """What the app's router serves under /api/v1 (and the health probes), read from
    app.router."""
    from mdm_server.app import create_app
    from mdm_server.config import Config, MqttSettings

    app = create_app(Config(database_url="postgresql://unused/unused",
                            mqtt=MqttSettings("127.0.0.1", 1)), ingest=False)
    return {f"{r.method} {_norm(r.resource.canonical)}" for r in app.router.routes()
            if r.method != "HEAD" and r.resource is not None
            and (r.resource.canonical.startswith("/api/v1/") or r.resource.canonical in
                 ("/healthz", "/livez", "/readyz"))}


def _served() -> list[str]:
    """Labels of the documented operations the server serves."""
    registered = _registered()
    return [label for key, label in _documented().items() if key in registered]


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = openapi.document()
    assert doc["openapi"].startswith("3.1")
    schemathesis.openapi.from_dict(doc).validate()  # against the OpenAPI 3.1 meta-schema
    for name, schema in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name
    text = json.dumps(doc)
    for target in set(re.findall(r'"\$ref": "#/([^"]+)"', text)):
        node: Any = doc
        for part in target.split("/"):
            assert part in node, f"unresolved $ref #/{target}"
            node = node[part]
    ids = [o["operationId"] for ops in doc["paths"].values() for o in ops.values()]
    assert len(ids) == len(set(ids))


def test_every_route_is_documented_and_every_documented_route_served() -> None:
    documented, registered = _documented(), _registered()
    assert sorted(registered - set(documented)) == [], "routes missing from openapi.py"
    missing = {documented[k] for k in set(documented) - registered}
    assert missing <= PENDING, f"documented but not served, and not PENDING: {missing}"
    served_pending = PENDING - missing
    assert not served_pending, f"served now: remove from PENDING: {served_pending}"


def test_the_server_serves_the_document_without_a_token(api: Api) -> None:
    resp = api.call("GET", openapi.PATH, None)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.json() == json.loads(json.dumps(openapi.document()))


def _example_path(template: str, api: Api) -> str:
    """The path with a parameter set that exists, so the route is found."""
    names = re.findall(r"\{([^}]+)\}", template)
    values: dict[str, str] = {"kind": "lock"}
    for name in names:
        if name in api.known and name not in values:
            values.update(api.known[name][0])
    return template.format(**{n: values.get(n, "x") for n in names})


def test_no_token_is_401_and_another_role_is_403(api: Api) -> None:
    doc = openapi.document()
    wrong: list[str] = []
    for label in _served():
        method, template = label.split(" ", 1)
        operation = doc["paths"][template][method.lower()]
        if "x-roles" not in operation:
            continue
        path = _example_path(template, api)
        body = {} if "requestBody" in operation else None
        resp = api.call(method, path, None, body)
        if resp.status_code != 401 or resp.headers.get("WWW-Authenticate") != "Bearer":
            wrong.append(f"{label} without a token: {resp.status_code}")
        for role, token in api.tokens.items():
            if role in operation["x-roles"]:
                continue
            resp = api.call(method, path, token, body)
            if resp.status_code != 403:
                wrong.append(f"{label} as {role}: {resp.status_code} (expected 403)")
    assert not wrong, "\n".join(wrong)


# --- the happy paths -------------------------------------------------------------------

def _happy_paths(api: Api) -> list[tuple[str, str, dict[str, Any], int]]:
    """(role, operation label, Case arguments, expected status), in order: every 2xx the
    document promises, once, on real data (random data rarely gets there)."""
    ts = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    reset = next(v for v in api.known["command_id"] if v["device"] == "corp2")
    locate = {"type": "locate", "reason": "where is it", "notice": {"text": "Hallo",
                                                                    "lang": "nl"}}
    cmds = "/api/v1/devices/{device}/commands"
    policy = {"applies_to": {"ownership": "corporate", "groups": ["field"]},
              "collect": {"apps": False},
              "fields": {"identity.serial": {"action": "hash"},
                         "location.accuracy_m": {"action": "coarsen", "step": 100}},
              "location": {"precision_m": 1000, "only_while_checked_out": False},
              "retention_days": {"location": 30, "default": 60}}
    paths: list[tuple[str, str, dict[str, Any], int]] = [
        ("admin", "GET /api/v1/devices", {"query": {"limit": 2}}, 200),
        ("admin", "GET /api/v1/tokens", {"query": {"limit": 2, "state": "active"}}, 200),
        ("admin", "DELETE /api/v1/tokens/{token_id}",
         {"path_parameters": api.known["token_id"][0]}, 204),
        ("admin", "GET /api/v1/devices/{device}", {"path_parameters": {"device": "corp1"}},
         200),
        ("admin", "GET /api/v1/devices/{device}/data",
         {"path_parameters": {"device": "corp1"}, "query": {"kind": "location", "limit": 2}},
         200),
        ("admin", "POST /api/v1/policies/{name}:preview",
         {"path_parameters": {"name": "default"}, "body": {
             "kind": "location", "policy": policy, "payload": {
                 "v": 1, "id": "p-1", "ts": ts, "data": {"lat": 52.37, "lon": 4.89}}}}, 200),
        ("admin", "PUT /api/v1/policies/{name}",
         {"path_parameters": {"name": "happy"}, "body": policy}, 201),
        ("admin", "PUT /api/v1/policies/{name}",
         {"path_parameters": {"name": "happy"}, "body": {"name": "happy"}}, 200),
        ("admin", "GET /api/v1/policies/{name}/versions",
         {"path_parameters": {"name": "happy"}}, 200),
        ("admin", "DELETE /api/v1/policies/{name}", {"path_parameters": {"name": "happy"}},
         204),
        ("admin", "GET /api/v1/devices/{device}/trips", {
            "path_parameters": {"device": "corp1"},
            "query": {"from": (datetime.now(UTC) - timedelta(hours=6)).isoformat(),
                      "to": datetime.now(UTC).isoformat(), "tz": "Europe/Amsterdam",
                      "stop_radius_m": 300, "min_trip_s": 60}}, 200),
        ("admin", "PUT /api/v1/places/{place}",
         {"path_parameters": {"place": "happy"}, "body": _DEPOT}, 201),
        ("admin", "PUT /api/v1/places/{place}", {"path_parameters": {"place": "happy"},
                                                 "body": {"type": "Feature", "properties": {},
                                                          "geometry": _DEPOT}}, 200),
        ("admin", "GET /api/v1/places", {"query": {"limit": 1}}, 200),
        ("admin", "GET /api/v1/places/{place}", {"path_parameters": {"place": "happy"}}, 200),
        ("admin", "GET /api/v1/places/{place}/versions",
         {"path_parameters": {"place": "happy"}}, 200),
        ("admin", "GET /api/v1/places/{place}/versions/{version}",
         {"path_parameters": {"place": "happy", "version": "2"}}, 200),
        ("admin", "DELETE /api/v1/places/{place}", {"path_parameters": {"place": "happy"}},
         204),
        ("admin", f"POST {cmds}", {"path_parameters": {"device": "corp1"}, "body": locate,
                                   "headers": {"Idempotency-Key": "happy-1"}}, 201),
        ("admin", f"POST {cmds}", {"path_parameters": {"device": "corp1"}, "body": locate,
                                   "headers": {"Idempotency-Key": "happy-1"}}, 200),
        ("bob", f"POST {cmds}/{{command_id}}:approve", {"path_parameters": reset}, 200),
        ("admin", f"GET {cmds}/{{command_id}}", {"path_parameters": reset}, 200),
        ("admin", "POST /api/v1/groups/{group}/commands", {
            "path_parameters": {"group": "field"},
            "body": {"type": "sync_policy", "reason": "new rules", "ttl_s": 3600}}, 201),
        ("admin", "PUT /api/v1/notice-templates/{kind}", {
            "path_parameters": {"kind": "wipe-full"},
            "body": {"text": "Alles wird gelöscht.", "lang": "de"}}, 200),
        ("admin", "GET /api/v1/notice-templates/{kind}",
         {"path_parameters": {"kind": "wipe-full"}}, 200),
        ("admin", "GET /api/v1/reports/shifts", {"query": {"device": "corp1"}}, 200),
        ("admin", "GET /api/v1/reports/shifts", {"query": {"format": "csv"}}, 200),
        ("admin", "PUT /api/v1/reports/shifts/settings", {"body": {"overdue_after_s": 7200}},
         200),
        ("admin", "GET /api/v1/reports/shifts/settings", {}, 200),
        ("user", "GET /api/v1/me/devices/{device}/shifts",
         {"path_parameters": {"device": "pers1"}}, 200),
        ("user", "GET /api/v1/me/devices/{device}/data",
         {"path_parameters": {"device": "pers1"}, "query": {"kind": "identity"}}, 200),
        ("user", "GET /api/v1/me/devices/{device}/access-log",
         {"path_parameters": {"device": "corp1"}}, 404),
        ("user", "GET /api/v1/me/devices/{device}/export",
         {"path_parameters": {"device": "pers1"}}, 200),
        ("user", "POST /api/v1/me/devices/{device}/erasure-requests",
         {"path_parameters": {"device": "pers2"}}, 201),
    ]
    return paths


def test_the_happy_paths_match_the_document(api: Api) -> None:
    schema = schemathesis.openapi.from_dict(openapi.document())
    served = set(_served())
    tokens = {**api.tokens, "bob": api.bob}
    cancel = api.call("POST", "/api/v1/devices/corp1/commands", tokens["admin"],
                      {"type": "factory_reset", "reason": "by mistake"}).json()
    steps = [*_happy_paths(api),
             ("admin", "POST /api/v1/devices/{device}/commands/{command_id}:cancel",
              {"path_parameters": {"device": "corp1", "command_id": cancel["command_id"]}},
              200)]
    wrong = []
    for role, label, args, expected in steps:
        if label not in served or role not in tokens:
            continue
        method, path = label.split(" ", 1)
        case = schema[path][method].Case(**args)
        resp = case.call_and_validate(base_url=api.server.base, checks=CHECKS,
                                      headers={"Authorization": f"Bearer {tokens[role]}"})
        if resp.status_code != expected:
            wrong.append(f"{label} {args}: {resp.status_code} {resp.text[:300]}")
    # An erasure request refused, and one fulfilled (pers2, the user's second device).
    if {"user", "admin"} <= set(tokens):
        erasure = "POST /api/v1/erasure-requests/{request_id}"
        mine = "/api/v1/me/devices/pers2/erasure-requests"
        for verb, body in ((":refuse", {"reason": "legal hold"}), (":fulfil", None)):
            listed = api.call("GET", mine, tokens["user"]).json()["erasure_requests"]
            pending = [r["id"] for r in listed if r["state"] == "pending"]
            if not pending:
                pending = [api.call("POST", mine, tokens["user"], {}).json()["id"]]
            if erasure + verb not in served:
                continue
            case = schema[f"/api/v1/erasure-requests/{{request_id}}{verb}"]["POST"].Case(
                path_parameters={"request_id": pending[0]},
                **({} if body is None else {"body": body}))
            resp = case.call_and_validate(base_url=api.server.base, checks=CHECKS, headers={
                "Authorization": f"Bearer {tokens['admin']}"})
            if resp.status_code != 200:
                wrong.append(f"{erasure}{verb}: {resp.status_code} {resp.text[:300]}")
    assert not wrong, "\n".join(wrong)


# --- values a schema cannot describe ---------------------------------------------------

#: Query values the handlers' parsers and PostgreSQL disagree about: a digit int()
#: refuses, a number past bigint, NUL (PostgreSQL refuses it in text), instants whose
#: UTC falls outside datetime's range, and data cursors that decode to such values.
HOSTILE_QUERY = ("\u00b2", "99999999999999999999", "a\x00b", "9999-12-31T23:59:59-14:00",
                 "0001-01-01T00:00:00+14:00",
                 # base64 of ["0001-01-01T00:00:00+14:00","x"] and ["2026-01-01T00:00:00Z","\u0000"]
                 "WyIwMDAxLTAxLTAxVDAwOjAwOjAwKzE0OjAwIiwieCJd",
                 "WyIyMDI2LTAxLTAxVDAwOjAwOjAwWiIsIlx1MDAwMCJd")
#: Header values that are not UTF-8 on the wire (requests sends str headers as Latin-1).
HOSTILE_HEADER = ("\u00e9", "\u00ff" * 3)


def _string_leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, str):
        yield path
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _string_leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _string_leaves(v, (*path, i))


def _replaced(value: Any, path: tuple[Any, ...], new: str) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(value[path[0]], path[1:], new)
    return copy


def test_values_no_schema_describes_are_4xx_never_5xx(api: Api) -> None:
    """Each query parameter of each served operation set to each HOSTILE_QUERY value;
    each header parameter, and the Authorization header, to each HOSTILE_HEADER value;
    NUL put into each string of each happy-path body in turn. Every answer must be
    documented and none a 5xx."""
    schema = schemathesis.openapi.from_dict(openapi.document())
    served = set(_served())
    tokens = {**api.tokens, "bob": api.bob}
    wrong: list[str] = []

    def check(label: str, role: str | None, **args: Any) -> None:
        method, path = label.split(" ", 1)
        case = schema[path][method].Case(**args)
        headers = {"Authorization": f"Bearer {tokens[role]}"} if role else None
        try:
            case.call_and_validate(base_url=api.server.base, checks=CHECKS, headers=headers)
        except (AssertionError, FailureGroup) as exc:
            first = str(exc).strip().splitlines()[:6]
            wrong.append(f"{label} {args}: " + " / ".join(x.strip() for x in first if x))

    for result in schema.get_all_operations():
        operation = result.ok()
        raw = operation.definition.raw
        roles = [r for r in raw.get("x-roles", []) if r in tokens]
        if operation.label not in served or (raw.get("x-roles") and not roles):
            continue
        role = roles[0] if roles else None
        known = _known_for(api, operation)
        if operation.path_parameters and not known:
            continue
        params = known[0] if known else {}
        base = {p.name: "location" for p in operation.query if p.is_required}
        for p in operation.query:
            for value in HOSTILE_QUERY:
                check(operation.label, role, path_parameters=params,
                      query={**base, p.name: value})
        body = {"body": {"type": "lock", "reason": "hostile"}} if operation.body else {}
        if raw.get("x-stream"):  # a header that is let through opens a stream that never ends
            continue
        for p in operation.headers:
            for value in HOSTILE_HEADER:
                check(operation.label, role, path_parameters=params, headers={p.name: value},
                      **body)
    for value in HOSTILE_HEADER:  # a token that is not UTF-8
        resp = api.call("GET", "/api/v1/devices", value)
        if resp.status_code != 401:
            wrong.append(f"GET /api/v1/devices with token {value!r}: {resp.status_code}")
    steps = [(r, label, a) for r, label, a, _ in _happy_paths(api) if "body" in a]
    if "user" in tokens:
        mine = "/api/v1/me/devices/pers1/erasure-requests"
        api.call("POST", mine, tokens["user"], {})  # 201, or 409: one is pending already
        listed = api.call("GET", mine, tokens["user"]).json()["erasure_requests"]
        pending = [r["id"] for r in listed if r["state"] == "pending"]
        assert pending, listed
        steps.append(("admin", "POST /api/v1/erasure-requests/{request_id}:refuse",
                      {"path_parameters": {"request_id": pending[0]},
                       "body": {"reason": "legal hold"}}))
    for role, label, args in steps:
        if label not in served or role not in tokens:
            continue
        for leaf in _string_leaves(args["body"]):
            check(label, role, **{**args, "body": _replaced(args["body"], leaf, "a\x00b")})
    assert not wrong, "\n".join(wrong)


# --- schemathesis -------------------------------------------------------------------------

def _known_for(api: Api, operation: Any) -> list[dict[str, str]]:
    """Path parameter sets of the operation that exist (the user's devices for /me)."""
    names = {p.name for p in operation.path_parameters}
    mine = operation.definition.raw.get("x-roles") == ["user"]
    return [v for key, values in api.known.items() for v in values
            if names and set(v) == names and (key == "my_device") == mine]


@dataclass
class Outcome:
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def _fuzz(api: Api, operation: Any, mode: GenerationMode, session: requests.Session,
          outcome: Outcome) -> None:
    roles: list[str] = operation.definition.raw.get("x-roles", [])
    tokens = [api.tokens[r] for r in roles if r in api.tokens]
    strategy = operation.as_strategy(generation_mode=mode)
    known = _known_for(api, operation)
    if mode is GenerationMode.POSITIVE and known:  # half of the cases on things that exist
            strategy = st.one_of(strategy, st.one_of(
                *[operation.as_strategy(path_parameters=v) for v in known]))

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy, token=st.sampled_from(tokens) if tokens else st.none())
    def run(case: Any, token: str | None) -> None:
        _call(api, case, {"Authorization": f"Bearer {token}"} if token else None, session,
              outcome)

    try:
        run()
    except Unsatisfiable:  # nothing to make invalid: no parameters, no body
        assert mode is GenerationMode.NEGATIVE, operation.label


def _coverage(api: Api, operation: Any, session: requests.Session, outcome: Outcome) -> None:
    """schemathesis's coverage phase: boundary values and every way each part of a
    request can be wrong, deterministically (one token of the operation's roles)."""
    roles: list[str] = operation.definition.raw.get("x-roles", [])
    token = next((api.tokens[r] for r in roles if r in api.tokens), None)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    schema = operation.schema
    for case in schema.iter_coverage_cases(
            operation, generation_modes=list(GenerationMode),
            generation_config=schema.config.generation_for(operation=operation)):
        _call(api, case, headers, session, outcome)


def _call(api: Api, case: Any, headers: dict[str, str] | None, session: requests.Session,
          outcome: Outcome) -> None:
    try:
        resp = case.call_and_validate(base_url=api.server.base, session=session,
                                      headers=headers, checks=CHECKS)
    except (AssertionError, FailureGroup) as exc:  # keep the first failure per operation
        if not outcome.failures:
            outcome.failures.append(f"{exc}\n  {case.as_curl_command(headers)}")
        return
    outcome.statuses[resp.status_code] += 1


def test_schemathesis_no_server_error_and_every_answer_matches_the_document(
        api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    schema = schemathesis.openapi.from_dict(openapi.document())
    served = set(_served())
    lines, failures = [], []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            if operation.label not in served:
                lines.append(f"  skipped (not served yet)  {operation.label}")
                continue
            if operation.definition.raw.get("x-stream"):
                # Its 200 never ends: tests/integration/test_live.py tests the stream,
                # and the hostile-values test its refusals.
                lines.append(f"  skipped (a stream)  {operation.label}")
                continue
            roles = operation.definition.raw.get("x-roles", [])
            if roles and not any(r in api.tokens for r in roles):
                lines.append(f"  skipped (no {'/'.join(roles)} token: CLI lacks it)  "
                             f"{operation.label}")
                continue
            outcome, t0 = Outcome(), time.monotonic()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                _fuzz(api, operation, mode, session, outcome)
            _coverage(api, operation, session, outcome)
            seen = " ".join(f"{s}x{n}" for s, n in sorted(outcome.statuses.items()))
            lines.append(f"  {operation.label:<62} {time.monotonic() - t0:4.1f} s  {seen}")
            failures += [f"{operation.label}: {f}" for f in outcome.failures]
    with capsys.disabled():
        print(f"\nschemathesis: operations exercised ({time.monotonic() - started:.0f} s, "
              f"status x count):\n" + "\n".join(lines))
    assert not failures, "\n\n".join(failures)
