"""The broker hook's HTTP side: RabbitMQ's and EMQX's dialects, on an internal address.

``serve`` runs this app on ``MDM_BROKER_HOOK_ADDR`` (a second site in the same
process, apart from the API's public port) when it is set:

RabbitMQ (``rabbitmq_auth_backend_http``; POST form-encoded or GET query, as the
plugin's ``auth_http.http_method`` says; the answer is ``text/plain``):

- ``/rabbitmq/user``: ``username``, ``password`` -> ``allow`` (a device: no tags,
  so no management access), ``allow administrator`` (the server's own user: it
  closes revoked devices' connections through the management API), ``deny``;
- ``/rabbitmq/vhost``: ``username``, ``vhost`` -> ``allow`` for a current principal
  on the MQTT vhost ``/``;
- ``/rabbitmq/resource``: ``username``, ``vhost``, ``resource`` (exchange, queue,
  topic), ``name``, ``permission`` (configure, write, read);
- ``/rabbitmq/topic``: ... and ``routing_key``: the MQTT topic the plugin turned
  into a routing key on ``amq.topic``; ``variable_map.client_id`` where it is given
  must be the device's username.

EMQX (HTTP authentication and authorisation, JSON in, JSON out, always ``200``:
EMQX takes any other status as "ignore" and would go on down its chain):

- ``/emqx/authn``: ``{"username", "password", "clientid", ...}`` ->
  ``{"result": "allow"|"deny", "is_superuser": false}``;
- ``/emqx/authz``: ``{"username", "topic", "action": "publish"|"subscribe",
  "clientid", ...}`` -> ``{"result": "allow"|"deny"}``.

Anything malformed is denied, never an error page. No access log: a GET request
(RabbitMQ's default method) carries the password in its query string.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import asyncpg
from aiohttp import web

from mdm_server.broker.hook import Action, BrokerHook, Principal
from mdm_server.broker.hook_revoke import ConnectionCloser
from mdm_server.config import Config, listen_socket

__all__ = ["CLOSER", "HOOK", "broker_hook_ctx", "create_hook_app", "listen_hook"]

log = logging.getLogger(__name__)

HOOK = web.AppKey("broker_hook", BrokerHook)
CLOSER = web.AppKey("broker_hook_closer", ConnectionCloser)

#: The vhost RabbitMQ's MQTT plugin uses (``mqtt.vhost``).
MQTT_VHOST = "/"
_MAX_BODY = 16 * 1024  # a question is a few hundred bytes

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _params(request: web.Request) -> Mapping[str, str]:
    params: Mapping[str, str]
    if request.method == "POST":
        params = await request.post()  # type: ignore[assignment]
    else:
        params = request.query
    if log.isEnabledFor(logging.DEBUG):  # the names asked with, never their values
        log.debug("broker hook: %s with %s", request.path, ",".join(sorted(params)))
    return params


def _text(allowed: bool, tags: str = "") -> web.Response:
    return web.Response(text=("allow" + (f" {tags}" if tags else "")) if allowed else "deny",
                        content_type="text/plain")


def _denied_on_failure(handler: _Handler, deny: Callable[[], web.Response]) -> _Handler:
    """Any failure (malformed question, database away) is a refusal, logged by kind
    only: never the question (it may hold a password)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except (KeyError, ValueError, TypeError, UnicodeDecodeError, json.JSONDecodeError,
                web.HTTPException):
            return deny()
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("broker hook: refused a question, database unavailable (%s)",
                        type(exc).__name__)
            return deny()

    return wrapped


# --- RabbitMQ -------------------------------------------------------------------------


async def rabbit_user(request: web.Request) -> web.Response:
    p = await _params(request)
    hook = request.app[HOOK]
    who = await hook.authenticate(p["username"], p.get("password", ""),
                                  p.get("client_id") or None)
    if who is None:
        return _text(False)
    return _text(True, "administrator" if who.is_server else "")


async def rabbit_vhost(request: web.Request) -> web.Response:
    p = await _params(request)
    who = await request.app[HOOK].principal(p["username"])
    return _text(who is not None and p["vhost"] == MQTT_VHOST)


async def rabbit_resource(request: web.Request) -> web.Response:
    p = await _params(request)
    ok = p["vhost"] == MQTT_VHOST and await request.app[HOOK].rabbit_resource(
        p["username"], p["resource"], p["name"], p["permission"])
    return _text(ok)


async def rabbit_topic(request: web.Request) -> web.Response:
    p = await _params(request)
    ok = p["vhost"] == MQTT_VHOST and p.get("resource", "topic") == "topic" and \
        await request.app[HOOK].rabbit_topic(
            p["username"], p["name"], p["permission"], p["routing_key"],
            p.get("variable_map.client_id") or None)
    return _text(ok)


# --- EMQX -----------------------------------------------------------------------------


def _emqx(result: bool, *, authn: bool = False) -> web.Response:
    body: dict[str, Any] = {"result": "allow" if result else "deny"}
    if authn:
        body["is_superuser"] = False
    return web.json_response(body)


async def _json(request: web.Request) -> dict[str, Any]:
    body = await request.json()
    if not isinstance(body, dict):
        raise ValueError("not an object")
    return body


def _str(body: Mapping[str, Any], key: str, *, required: bool = True) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ValueError(key)
    return value


async def emqx_authn(request: web.Request) -> web.Response:
    body = await _json(request)
    who: Principal | None = await request.app[HOOK].authenticate(
        _str(body, "username") or "", _str(body, "password") or "",
        _str(body, "clientid", required=False) or None)
    return _emqx(who is not None, authn=True)


async def emqx_authz(request: web.Request) -> web.Response:
    body = await _json(request)
    action: Action
    if _str(body, "action") == "publish":
        action = "publish"
    elif _str(body, "action") == "subscribe":
        action = "subscribe"
    else:
        return _emqx(False)
    ok = await request.app[HOOK].check(
        _str(body, "username") or "", action, _str(body, "topic") or "",
        _str(body, "clientid", required=False) or None)
    return _emqx(ok)


def create_hook_app(hook: BrokerHook) -> web.Application:
    app = web.Application(client_max_size=_MAX_BODY)
    app[HOOK] = hook
    text_deny = lambda: _text(False)  # noqa: E731
    for path, handler in (("/rabbitmq/user", rabbit_user), ("/rabbitmq/vhost", rabbit_vhost),
                          ("/rabbitmq/resource", rabbit_resource),
                          ("/rabbitmq/topic", rabbit_topic)):
        app.router.add_route("POST", path, _denied_on_failure(handler, text_deny))
        app.router.add_route("GET", path, _denied_on_failure(handler, text_deny))
    app.router.add_post("/emqx/authn", _denied_on_failure(
        emqx_authn, lambda: _emqx(False, authn=True)))
    app.router.add_post("/emqx/authz", _denied_on_failure(emqx_authz, lambda: _emqx(False)))
    return app


# --- in serve -------------------------------------------------------------------------


def listen_hook(cfg: Config) -> socket.socket | None:
    """The hook's listening socket (MDM_BROKER_HOOK_ADDR), bound before anything
    starts so that an address in use is one clear line; None if no hook is set."""
    if cfg.broker_hook_addr is None:
        return None
    host, port = cfg.broker_hook_addr
    return listen_socket(host, port, "MDM_BROKER_HOOK_ADDR")


def broker_hook_ctx(sock: socket.socket) -> Callable[[web.Application],
                                                     AsyncIterator[None]]:
    """A cleanup context for ``serve``'s app: the hook on ``sock``, with the app's
    database pool, for the life of the app; and, with ``MDM_AMQP_MANAGEMENT_URL``
    (or ``MDM_EMQX_API_URL``), the task that closes revoked devices' connections."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        from mdm_server.api.context import CONFIG, POOL
        cfg: Config = app[CONFIG]
        master_key = cfg.require_master_key()
        amqp = cfg.amqp
        hook = BrokerHook(app[POOL], master_key,
                          server_user=amqp.username if amqp else None,
                          server_password=amqp.password if amqp else None)
        app[HOOK] = hook
        runner = web.AppRunner(create_hook_app(hook), access_log=None,
                               handle_signals=False)
        await runner.setup()
        site = web.SockSite(runner, sock)
        await site.start()
        log.info("broker hook listening on %s:%d (%s)", *sock.getsockname()[:2],
                 "server user accepted" if amqp else "no MDM_AMQP_URL: devices only")
        task = None
        api = amqp if amqp is not None and amqp.management_urls else cfg.emqx_api
        if api is not None:
            closer = ConnectionCloser(cfg.database_url, hook, api)
            app[CLOSER] = closer
            task = asyncio.create_task(closer.run(), name="broker-hook-revoke")
        yield
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()

    return ctx
