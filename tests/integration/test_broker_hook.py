"""The broker hook's contracts: RabbitMQ's HTTP auth backend and EMQX's HTTP authn/authz.

Against a real database with devices enrolled through the real code, and the hook
app served on a real port (the same app ``serve`` runs on MDM_BROKER_HOOK_ADDR),
asked as the brokers ask: RabbitMQ with form-encoded POSTs (or GET queries) to
``user_path``, ``vhost_path``, ``resource_path`` and ``topic_path``, answered in
plain text (``allow``, ``allow TAGS``, ``deny``); EMQX with JSON POSTs to its
authentication and authorisation URLs, answered ``{"result": ...}`` with status 200
(EMQX takes any other status as "ignore" and goes on down its chain, so a refusal
must be a 200 ``deny``). tests/integration/test_broker_cluster.py asks through a
real RabbitMQ node.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent_protocol import KINDS
from mdm_server.broker.hook import BrokerHook, topic_routing_key
from mdm_server.broker.hook_http import create_hook_app
from mdm_server.broker.identity import device_acls
from mdm_server.storage.devices import reenroll_device, revoke_device
from mdm_server.storage.pool import connect, create_pool
from tests.support.services import (
    REPO,
    TEST_MASTER_KEY,
    Broker,
    Server,
    as_server_role,
    device_credentials,
    enroll_devices,
    free_port,
    served,
    server_env,
)

pytestmark = pytest.mark.integration

SERVER_USER = "mdm-server"
SERVER_PASSWORD = "a-server-password-for-the-hook-tests"
KEY = base64.b64decode(TEST_MASTER_KEY)


class Hook:
    """The hook on a real port, asked over HTTP."""

    def __init__(self, base: str, session: aiohttp.ClientSession, hook: BrokerHook) -> None:
        self.base = base
        self.session = session
        self.hook = hook

    async def rabbit(self, path: str, method: str = "POST", **params: str) -> str:
        url = f"{self.base}/rabbitmq/{path}"
        if method == "GET":
            async with self.session.get(url, params=params) as resp:
                assert resp.status == 200
                return await resp.text()
        async with self.session.post(url, data=params) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/plain"
            return await resp.text()

    async def login(self, user: str, password: str, method: str = "POST") -> str:
        return await self.rabbit("user", method, username=user, password=password)

    async def topic(self, user: str, permission: str, routing_key: str,
                    client_id: str | None = None) -> str:
        extra = {"variable_map.client_id": client_id} if client_id else {}
        return await self.rabbit("topic", username=user, vhost="/", resource="topic",
                                 name="amq.topic", permission=permission,
                                 routing_key=routing_key, **extra)

    async def emqx(self, path: str, body: Any) -> dict[str, Any]:
        async with self.session.post(f"{self.base}/emqx/{path}", json=body) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.content_type == "application/json"
            got: dict[str, Any] = await resp.json()
            return got

    async def emqx_raw(self, path: str, data: bytes) -> tuple[int, dict[str, Any]]:
        async with self.session.post(f"{self.base}/emqx/{path}", data=data,
                                     headers={"Content-Type": "application/json"}) as resp:
            return resp.status, await resp.json()


@contextlib.asynccontextmanager
async def hook_server(database: str, **kw: Any) -> AsyncIterator[Hook]:
    pool = await create_pool(as_server_role(database))
    hook = BrokerHook(pool, KEY, server_user=SERVER_USER, server_password=SERVER_PASSWORD,
                      **kw)
    runner = web.AppRunner(create_hook_app(hook), access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield Hook(f"http://127.0.0.1:{port}", session, hook)
    finally:
        await runner.cleanup()
        await pool.close()


def run(database: str, scenario: Callable[[Hook], Awaitable[None]], **kw: Any) -> None:
    async def main() -> None:
        await enroll_devices(database, "mqtt://127.0.0.1:1883", "acme", ["d1", "d2"])
        await enroll_devices(database, "mqtt://127.0.0.1:1883", "globex", ["g1"])
        async with hook_server(database, **kw) as hook:
            await scenario(hook)

    asyncio.run(main())


def key(tenant: str, device: str, rest: str) -> str:
    """The routing key RabbitMQ's MQTT plugin makes of the device's topic."""
    return topic_routing_key(f"mdm/v1/{tenant}/devices/{device}/{rest}")


# --- RabbitMQ ----------------------------------------------------------------------------


def test_rabbitmq_login_with_the_derived_password_only(database: str) -> None:
    async def scenario(h: Hook) -> None:
        user, password = device_credentials("acme", "d1")
        assert await h.login(user, password) == "allow"  # no tags: no management access
        assert await h.login(user, password, method="GET") == "allow"
        assert await h.login(user, password + "x") == "deny"
        assert await h.login(user, "") == "deny"
        # Another device's password, another tenant's, a device nobody enrolled.
        assert await h.login(user, device_credentials("acme", "d2")[1]) == "deny"
        assert await h.login("globex.d1", password) == "deny"
        assert await h.login(*device_credentials("acme", "nobody")) == "deny"
        # Names that are no device's: no dot, two dots, a wildcard.
        for name in ("acme", "acme.d1.x", "acme.+", "#", ""):
            assert await h.login(name, password) == "deny"
        # The server's own user: the management API's tag, to close connections.
        assert await h.login(SERVER_USER, SERVER_PASSWORD) == "allow administrator"
        assert await h.login(SERVER_USER, SERVER_PASSWORD[:-1]) == "deny"
        assert await h.login(SERVER_USER, password) == "deny"

    run(database, scenario)


def test_rabbitmq_vhost_and_resources(database: str) -> None:
    async def scenario(h: Hook) -> None:
        async def resource(user: str, kind: str, name: str, permission: str,
                           vhost: str = "/") -> str:
            return await h.rabbit("resource", username=user, vhost=vhost, resource=kind,
                                  name=name, permission=permission)

        assert await h.rabbit("vhost", username="acme.d1", vhost="/", ip="127.0.0.1") \
            == "allow"
        assert await h.rabbit("vhost", username="acme.d1", vhost="other", ip="1.2.3.4") \
            == "deny"
        assert await h.rabbit("vhost", username="acme.nobody", vhost="/") == "deny"
        # Publishing and subscribing go through amq.topic (routing keys asked apart).
        assert await resource("acme.d1", "exchange", "amq.topic", "write") == "allow"
        assert await resource("acme.d1", "exchange", "amq.topic", "read") == "allow"
        assert await resource("acme.d1", "exchange", "amq.topic", "configure") == "deny"
        assert await resource("acme.d1", "exchange", "amq.direct", "write") == "deny"
        assert await resource("acme.d1", "exchange", "amq.topic", "write", "other") == "deny"
        # Its own MQTT session queues; nobody else's.
        for q in ("mqtt-subscription-acme.d1qos1", "mqtt-subscription-acme.d1qos0"):
            for permission in ("configure", "write", "read"):
                assert await resource("acme.d1", "queue", q, permission) == "allow"
        assert await resource("acme.d1", "queue", "mqtt-subscription-acme.d2qos1",
                              "read") == "deny"
        assert await resource("acme.d1", "queue", "mdm-ingest", "read") == "deny"
        # The server: its own queues (the AMQP ingest's), not a device's session.
        assert await resource(SERVER_USER, "queue", "mdm-ingest", "configure") == "allow"
        assert await resource(SERVER_USER, "queue", "mqtt-subscription-mdm-ingest-0qos1",
                              "read") == "allow"
        assert await resource(SERVER_USER, "queue", "mqtt-subscription-acme.d1qos1",
                              "read") == "deny"
        assert await resource("nobody", "exchange", "amq.topic", "write") == "deny"

    run(database, scenario)


def test_rabbitmq_topics_are_the_device_role(database: str) -> None:
    """The routing keys the MQTT plugin asks about, for every topic of the device's
    Mosquitto role (the rules' one source) and a list of others."""

    async def scenario(h: Hook) -> None:
        for kind in KINDS:
            assert await h.topic("acme.d1", "write", key("acme", "d1", f"telemetry/{kind}")) \
                == "allow"
            # Another device's, another tenant's, the same kind.
            assert await h.topic("acme.d1", "write", key("acme", "d2", f"telemetry/{kind}")) \
                == "deny"
            assert await h.topic("acme.d1", "write",
                                 key("globex", "g1", f"telemetry/{kind}")) == "deny"
        for rest in ("acks", "status"):
            assert await h.topic("acme.d1", "write", key("acme", "d1", rest)) == "allow"
            assert await h.topic("acme.d1", "write", key("acme", "d2", rest)) == "deny"
        # Sub-topics the protocol does not name, wildcards, forged commands.
        for rest in ("telemetry/imei=356938035643809", "telemetry/location/extra",
                     "telemetry/*", "telemetry/#", "acks/extra", "commands"):
            assert await h.topic("acme.d1", "write", key("acme", "d1", rest)) == "deny", rest
        # Subscribing (a binding's key): its own commands, literally.
        assert await h.topic("acme.d1", "read", key("acme", "d1", "commands")) == "allow"
        for pattern in (key("acme", "*", "commands"), key("acme", "d2", "commands"),
                        "mdm.#", "#", key("acme", "d1", "telemetry/location")):
            assert await h.topic("acme.d1", "read", pattern) == "deny", pattern
        # A client id that is not the username (the plugin says it with each question).
        assert await h.topic("acme.d1", "write", key("acme", "d1", "acks"),
                             client_id="acme.d1") == "allow"
        assert await h.topic("acme.d1", "write", key("acme", "d1", "acks"),
                             client_id="acme.d2") == "deny"
        # Another exchange, another vhost.
        assert await h.rabbit("topic", username="acme.d1", vhost="/", resource="topic",
                              name="amq.direct", permission="write",
                              routing_key=key("acme", "d1", "acks")) == "deny"
        # The server: binds every device's telemetry, acks and status; publishes
        # commands only, never a device's telemetry.
        # An OwnTracks topic's username level ({tenant}.{device}) is two words of
        # its key: the server's OwnTracks binding is owntracks.*.*.*.#.
        for pattern in ("mdm.v1.*.devices.*.telemetry.*", "mdm.v1.*.devices.*.#",
                        "mdm.v1.*.devices.*.acks", "owntracks.*.*.*.#"):
            assert await h.topic(SERVER_USER, "read", pattern) == "allow", pattern
        for pattern in ("#", "mdm.#", "*.v1.*.devices.*.acks"):
            assert await h.topic(SERVER_USER, "read", pattern) == "deny", pattern
        assert await h.topic(SERVER_USER, "write", key("acme", "d1", "commands")) == "allow"
        assert await h.topic(SERVER_USER, "write", key("acme", "d1", "telemetry/location")) \
            == "deny"
        # An OwnTracks device's commands (reportLocation), never its locations.
        assert await h.topic(SERVER_USER, "write", "owntracks.acme.d1.d1.cmd") == "allow"
        for forged in ("owntracks.acme.d1.d1", "owntracks.acme.d1.d1.event"):
            assert await h.topic(SERVER_USER, "write", forged) == "deny", forged

    run(database, scenario)


def test_the_hook_and_mosquitto_roles_share_their_rules(database: str) -> None:
    """What the hook allows a device is exactly what its dynamic-security role does."""

    async def scenario(h: Hook) -> None:
        who = await h.hook.principal("acme.d1")
        assert who is not None
        acls = device_acls("acme", "d1")
        sends = {a["topic"] for a in acls if a["acltype"] == "publishClientSend"}
        subs = {a["topic"] for a in acls if a["acltype"] == "subscribeLiteral"}
        candidates = sends | subs | {t.replace("d1", "d2") for t in sends | subs} | {
            "mdm/v1/acme/devices/d1/telemetry/+", "mdm/v1/acme/devices/d1/#"}
        for topic in sorted(candidates):
            assert h.hook.may(who, "publish", topic) == (topic in sends), topic
            assert h.hook.may(who, "subscribe", topic) == (topic in subs), topic
            assert h.hook.may_key(who, "publish", topic_routing_key(topic)) \
                == (topic in sends), topic

    run(database, scenario)


def test_revocation_and_reenrollment_take_effect_at_the_next_question(database: str) -> None:
    async def scenario(h: Hook) -> None:
        user, password = device_credentials("acme", "d1")
        telemetry = key("acme", "d1", "telemetry/location")
        assert await h.login(user, password) == "allow"
        conn = await connect(database)
        try:
            await revoke_device(conn, tenant="acme", device="d1")
        finally:
            await conn.close()
        assert await h.login(user, password) == "deny"
        assert await h.topic(user, "write", telemetry) == "deny"
        assert await h.rabbit("vhost", username=user, vhost="/") == "deny"
        assert (await h.emqx("authz", {"username": user, "clientid": user,
                                       "topic": telemetry, "action": "publish"})
                )["result"] == "deny"
        conn = await connect(database)
        try:
            await reenroll_device(conn, tenant="acme", device="d1",
                                  mqtt_url="mqtt://127.0.0.1:1883", master_key=KEY)
        finally:
            await conn.close()
        # The new holder's password (generation 2) works; the old one no more.
        assert await h.login(user, password) == "deny"
        assert await h.login(*device_credentials("acme", "d1", 2)) == "allow"
        assert await h.topic(user, "write", telemetry) == "allow"

    run(database, scenario)


def test_failed_logins_are_throttled_per_username(database: str) -> None:
    """Past the burst of failures a username's log-ins are refused unchecked (its
    right password too) until the bucket refills; other devices are not affected."""

    async def scenario(h: Hook) -> None:
        user, password = device_credentials("acme", "d1")
        for _ in range(5):
            assert await h.login(user, "guess") == "deny"
        assert await h.login(user, password) == "deny"  # throttled, not checked
        assert h.hook.stats.logins_throttled == 1
        assert await h.login(*device_credentials("acme", "d2")) == "allow"
        # Not the server's user: failing under its name must not lock the ingest out.
        for _ in range(10):
            assert await h.login(SERVER_USER, "guess") == "deny"
        assert await h.login(SERVER_USER, SERVER_PASSWORD) == "allow administrator"

    run(database, scenario, fail_burst=5.0, fail_rate=0.001)


# --- EMQX ------------------------------------------------------------------------------


def test_emqx_authentication(database: str) -> None:
    async def scenario(h: Hook) -> None:
        user, password = device_credentials("acme", "d1")
        ok = await h.emqx("authn", {"username": user, "password": password, "clientid": user,
                                    "peerhost": "10.0.0.7", "proto_name": "MQTT"})
        assert ok == {"result": "allow", "is_superuser": False}
        for body in (
            {"username": user, "password": password + "x", "clientid": user},
            {"username": user, "password": password, "clientid": "acme.d2"},  # bound id
            {"username": "acme.d2", "password": password, "clientid": "acme.d2"},
            {"username": user, "clientid": user},  # no password
        ):
            assert await h.emqx("authn", body) == {"result": "deny", "is_superuser": False}
        # The server's user is no superuser either: its rules are checked like any.
        assert await h.emqx("authn", {"username": SERVER_USER, "password": SERVER_PASSWORD,
                                      "clientid": "mdm-ingest-0"}) == \
            {"result": "allow", "is_superuser": False}
        # Malformed questions are refused with a 200, never ignored.
        for raw in (b"not json", b"[1, 2]", b'{"username": 7, "password": "x"}'):
            assert await h.emqx_raw("authn", raw) == (200, {"result": "deny",
                                                            "is_superuser": False})

    run(database, scenario)


def test_emqx_authorisation(database: str) -> None:
    async def scenario(h: Hook) -> None:
        async def authz(user: str, action: str, topic: str, clientid: str | None = None
                        ) -> str:
            body = {"username": user, "clientid": clientid or user, "action": action,
                    "topic": topic, "qos": 1, "retain": False, "peerhost": "10.0.0.7"}
            return str((await h.emqx("authz", body))["result"])

        base = "mdm/v1/acme/devices/d1"
        for kind in KINDS:
            assert await authz("acme.d1", "publish", f"{base}/telemetry/{kind}") == "allow"
        assert await authz("acme.d1", "publish", f"{base}/acks") == "allow"
        assert await authz("acme.d1", "subscribe", f"{base}/commands") == "allow"
        for action, topic in (
            ("publish", "mdm/v1/acme/devices/d2/telemetry/location"),
            ("publish", "mdm/v1/globex/devices/g1/acks"),
            ("publish", f"{base}/telemetry/imei=356938035643809"),
            ("publish", f"{base}/commands"),
            ("subscribe", "mdm/v1/acme/devices/+/commands"),
            ("subscribe", "#"),
            ("subscribe", f"{base}/#"),
            ("subscribe", f"{base}/telemetry/location"),
            ("all", f"{base}/acks"),
        ):
            assert await authz("acme.d1", action, topic) == "deny", (action, topic)
        assert await authz("acme.d1", "publish", f"{base}/acks", clientid="acme.d2") == "deny"
        assert await authz("acme.nobody", "publish", "mdm/v1/acme/devices/nobody/acks") \
            == "deny"
        # The server: subscribes to every device's topics, publishes commands only.
        assert await authz(SERVER_USER, "subscribe", "mdm/v1/+/devices/+/#",
                           "mdm-ingest-0") == "allow"
        assert await authz(SERVER_USER, "subscribe", "#", "mdm-ingest-0") == "deny"
        assert await authz(SERVER_USER, "publish", f"{base}/commands", "mdm-cmd") == "allow"
        assert await authz(SERVER_USER, "publish", f"{base}/telemetry/location",
                           "mdm-cmd") == "deny"
        status, body = await h.emqx_raw("authz", b"{")
        assert (status, body) == (200, {"result": "deny"})

    run(database, scenario)


# --- in serve ---------------------------------------------------------------------------


def _serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mdm_server", "serve"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_serve_refuses_a_hook_address_it_cannot_or_must_not_use(database: str,
                                                                broker: Broker) -> None:
    """Said in one line before anything starts (exit 2): a port in use, a public
    address (the hook answers password questions)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve(server_env(database, broker.url,
                                   MDM_BROKER_HOOK_ADDR=f"127.0.0.1:{port}"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"mdm-server: cannot listen on 127.0.0.1:{port} (MDM_BROKER_HOOK_ADDR): "
        "Address already in use")
    result = _serve(server_env(database, broker.url, MDM_BROKER_HOOK_ADDR="0.0.0.0:9101"))
    assert result.returncode == 2
    assert "MDM_BROKER_HOOK_ADDR is 0.0.0.0, not a loopback or private address" in \
        result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_serve_answers_on_the_hook_address_apart_from_the_api(tmp_path: Path) -> None:
    """serve's hook: EMQX's dialect on MDM_BROKER_HOOK_ADDR, not on the API's port."""
    hook_port = free_port()

    def setup(srv: Server) -> None:
        srv.cli("device", "enroll", "--tenant", "acme", "--device", "d1",
                "--ownership", "corporate")

    with served(tmp_path, setup=setup, MDM_BROKER_HOOK_ADDR=f"127.0.0.1:{hook_port}") as srv:
        srv.wait_log("broker hook listening")
        user, password = device_credentials("acme", "d1")

        def ask(base: str, body: dict[str, str]) -> tuple[int, bytes]:
            req = urllib.request.Request(f"{base}/emqx/authn", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return resp.status, resp.read()
            except urllib.error.HTTPError as err:
                return err.code, err.read()

        hook = f"http://127.0.0.1:{hook_port}"
        status, body = ask(hook, {"username": user, "password": password, "clientid": user})
        assert (status, json.loads(body)) == (200, {"result": "allow", "is_superuser": False})
        status, body = ask(hook, {"username": user, "password": "guess", "clientid": user})
        assert json.loads(body)["result"] == "deny"
        assert ask(srv.base, {"username": user, "password": password})[0] == 404
        # Nothing of the questions in serve's log: no password, no username.
        assert password not in srv.log_text() and user not in srv.log_text()


# --- EMQX: revocation through its REST API ---------------------------------------------


class FakeEmqxApi:
    """EMQX 5's documented REST API, as much of it as the server uses: HTTP Basic with
    an API key and secret; ``GET /api/v5/clients?page=&limit=`` (``data[].clientid``,
    ``data[].username``, ``meta.page/limit/hasnext``); ``DELETE
    /api/v5/clients/{clientid}``: 204, or 404 ``CLIENTID_NOT_FOUND``. EMQX itself
    cannot be installed here; this is its contract, not a broker."""

    KEY, SECRET = "mdm-revoker", "an-api-secret-for-the-tests"

    def __init__(self, clients: list[str]) -> None:
        self.clients = list(clients)
        self.kicked: list[str] = []
        self.pages: list[int] = []
        app = web.Application()
        app.router.add_get("/api/v5/clients", self.list_clients)
        app.router.add_delete("/api/v5/clients/{clientid}", self.kick)
        self.app = app

    def _authorised(self, request: web.Request) -> bool:
        want = base64.b64encode(f"{self.KEY}:{self.SECRET}".encode()).decode()
        return request.headers.get("Authorization") == f"Basic {want}"

    async def list_clients(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.json_response({"code": "BAD_API_KEY_OR_SECRET"}, status=401)
        page, limit = int(request.query["page"]), int(request.query["limit"])
        self.pages.append(page)
        chunk = self.clients[(page - 1) * limit:page * limit]
        return web.json_response({
            "data": [{"clientid": c, "username": c, "node": "emqx@10.0.0.1"} for c in chunk],
            "meta": {"page": page, "limit": limit, "hasnext": page * limit < len(self.clients)}})

    async def kick(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return web.json_response({"code": "BAD_API_KEY_OR_SECRET"}, status=401)
        clientid = request.match_info["clientid"]
        self.kicked.append(clientid)
        if clientid not in self.clients:
            return web.json_response({"code": "CLIENTID_NOT_FOUND"}, status=404)
        self.clients.remove(clientid)
        return web.Response(status=204)


@contextlib.asynccontextmanager
async def fake_emqx(clients: list[str]) -> AsyncIterator[tuple[FakeEmqxApi, str]]:
    api = FakeEmqxApi(clients)
    runner = web.AppRunner(api.app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield api, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def test_emqx_a_revoked_device_is_kicked_out_at_once_and_again(database: str) -> None:
    """A revocation's NOTIFY: the device's client is kicked out at once, and again
    once the broker's cached allow may have let it back."""
    from mdm_server.broker.hook_config import EmqxApi
    from mdm_server.broker.hook_revoke import ConnectionCloser

    async def scenario(h: Hook) -> None:
        async with fake_emqx(["acme.d1", "acme.d2"]) as (api, base):
            closer = ConnectionCloser(database, h.hook, EmqxApi((base,), api.KEY, api.SECRET),
                                      cache_ttl_s=0.5)
            task = asyncio.create_task(closer.run())
            try:
                await asyncio.sleep(0.5)  # listening (the start sweep found nobody to kick)
                assert api.kicked == []
                conn = await connect(database)
                try:
                    await revoke_device(conn, tenant="acme", device="d1")
                finally:
                    await conn.close()
                for _ in range(100):
                    if api.kicked.count("acme.d1") == 2:
                        break
                    await asyncio.sleep(0.1)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        assert api.kicked == ["acme.d1", "acme.d1"]  # once at once, once after the TTL
        assert api.clients == ["acme.d2"]

    run(database, scenario)


def test_emqx_the_sweep_kicks_out_whoever_is_no_longer_enrolled(database: str) -> None:
    """Every page of the clients list is read; only devices that are not enrolled
    are kicked out (the server's own clients and other names are left alone); a
    wrong API key is an error that names no secret."""
    from mdm_server.broker.hook_config import EmqxApi
    from mdm_server.broker.hook_revoke import ConnectionCloser, ManagementError

    async def scenario(h: Hook) -> None:
        clients = ["acme.d1", "mdm-server", "acme.d2", "globex.g1", "acme.ghost", "x.y.z"]
        async with fake_emqx(clients) as (api, base):
            conn = await connect(database)
            try:  # a revocation nobody heard of: no NOTIFY
                await conn.execute("UPDATE devices SET status = 'revoked' "
                                   "WHERE tenant_id = 'acme' AND device_id = 'd2'")
            finally:
                await conn.close()
            closer = ConnectionCloser(database, h.hook,
                                      EmqxApi((base,), api.KEY, api.SECRET), page=2)
            async with aiohttp.ClientSession() as session:
                assert await closer.sweep(session) == 2
                assert api.pages == [1, 2, 3]
                assert sorted(api.kicked) == ["acme.d2", "acme.ghost"]
                assert sorted(api.clients) == ["acme.d1", "globex.g1", "mdm-server", "x.y.z"]
                wrong = ConnectionCloser(database, h.hook,
                                         EmqxApi((base,), api.KEY, "not-the-secret"))
                with pytest.raises(ManagementError) as err:
                    await wrong.sweep(session)
                assert "HTTP 401" in str(err.value)
                assert "not-the-secret" not in str(err.value) and api.SECRET not in str(
                    err.value)

    run(database, scenario)
