"""``/livez``, ``/readyz``, the API's request metrics and the metrics listener.

- ``GET /livez``: 200 while the process answers; nothing else is checked.
- ``GET /readyz``: 200 ``{"status": "ready"}`` only when the database answers and
  every ingest worker is running and connected to the broker; else 503
  ``{"status": "not ready", "reason": R}``, R one of ``database``, ``broker``
  (a worker is not connected), ``ingest_worker_exited``. Open to anyone, so it says
  nothing more (no counters, no tenant).
- ``GET /metrics`` on ``MDM_METRICS_ADDR`` only (a second listener, without a
  token: keep it on an address only the scraper reaches), never on the API's port.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterable

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agent_protocol import COMMAND_TYPES
from mdm_server.api.context import POOL
from mdm_server.config import _parse_addr, listen_socket
from mdm_server.ops import metrics
from mdm_server.ops.workers import RUN_DIR_ENV, WorkerState, read_states

__all__ = ["CHILDREN", "METRICS_SOCKET", "install", "listen_metrics", "metrics_addr",
           "metrics_middleware"]

log = logging.getLogger(__name__)

#: serve's ingest worker processes: (index, process).
CHILDREN = web.AppKey("ingest_children", list[tuple[int, subprocess.Popen[bytes]]])
#: The metrics listener's socket, bound by ``serve`` before anything starts.
METRICS_SOCKET = web.AppKey("metrics_socket", socket.socket)
METRICS_ADDR_ENV = "MDM_METRICS_ADDR"
_DB_TIMEOUT_S = 2.0
_COMMANDS_CACHE_S = 10.0
_STATES = ("pending_approval", "queued", "sent", "received", "notice_shown", "completed",
           "failed", "rejected", "expired", "cancelled")


def metrics_addr(env: dict[str, str] | None = None) -> tuple[str, int] | None:
    raw = (os.environ if env is None else env).get(METRICS_ADDR_ENV, "")
    return _parse_addr(raw, METRICS_ADDR_ENV) if raw else None


def listen_metrics() -> socket.socket | None:
    """The metrics listener's socket (an address in use or a malformed
    MDM_METRICS_ADDR is one clear line); None when MDM_METRICS_ADDR is not set."""
    addr = metrics_addr()
    return None if addr is None else listen_socket(addr[0], addr[1], METRICS_ADDR_ENV)


def _states(app: web.Application) -> list[WorkerState]:
    from mdm_server.app import INGEST  # app.py imports this module

    children = app[CHILDREN] if CHILDREN in app else []
    return read_states(app.get(INGEST), os.environ.get(RUN_DIR_ENV), children)


async def livez(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


def _not_ready(reason: str) -> web.Response:
    return web.json_response({"status": "not ready", "reason": reason}, status=503)


async def readyz(request: web.Request) -> web.Response:
    try:
        async with asyncio.timeout(_DB_TIMEOUT_S):
            await request.app[POOL].fetchval("SELECT 1")
    except Exception:  # whatever the failure: not ready (and it names no data)
        return _not_ready("database")
    states = _states(request.app)
    if not all(s.running for s in states):
        return _not_ready("ingest_worker_exited")
    if any(s.stalled for s in states):
        return _not_ready("ingest_worker_stalled")
    if not all(s.connected for s in states):
        return _not_ready("broker")
    return web.json_response({"status": "ready"})


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every request by its route's template (never the path as sent)."""
    started = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away first (nginx's code for it)
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        metrics.http_request(route, request.method, status, time.monotonic() - started)


class _CommandsCollector(Collector):
    """Commands by type and state, and the outbox's depth, from the database (one
    query, at most every 10 s; a scrape never waits more than 2 s for it)."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._at = 0.0
        self._counts: dict[tuple[str, str], int] = {}
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        if time.monotonic() - self._at < _COMMANDS_CACHE_S:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._query())
        try:
            await asyncio.wait_for(asyncio.shield(self._task), _DB_TIMEOUT_S)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass  # the last counts, if any, are reported

    async def _query(self) -> None:
        rows = await self._app[POOL].fetch(
            "SELECT type, state, count(*) AS n FROM commands GROUP BY type, state")
        self._counts = {(r["type"], r["state"]): r["n"] for r in rows
                        if r["type"] in COMMAND_TYPES and r["state"] in _STATES}
        self._at = time.monotonic()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        from mdm_server.app import ACKS, DISPATCHER  # app.py imports this module

        by = GaugeMetricFamily("mdm_commands", "Commands by type and state",
                               labels=["type", "state"])
        for (type_, state), n in sorted(self._counts.items()):
            by.add_metric([type_, state], n)
        yield by
        connected = GaugeMetricFamily(
            "mdm_command_broker_connected", "The command dispatcher (dispatch) and the "
            "ack consumer (acks) connected to the broker (1) or not (0)", labels=["client"])
        dispatcher, acks = self._app.get(DISPATCHER), self._app.get(ACKS)
        if dispatcher is not None:
            connected.add_metric(["dispatch"], int(dispatcher.broker_connected))
        if acks is not None:
            connected.add_metric(["acks"], int(acks.consumer is not None
                                               and acks.consumer.connected.is_set()))
        yield connected
        yield GaugeMetricFamily(
            "mdm_command_outbox_depth", "Commands queued, not yet published",
            value=sum(n for (_, s), n in self._counts.items() if s == "queued"))


_COMMANDS = web.AppKey("commands_collector", _CommandsCollector)
_API = web.AppKey("api", web.Application)


async def metrics_handler(request: web.Request) -> web.Response:
    app = request.app[_API]
    commands = app[_COMMANDS]
    await commands.refresh()
    body = metrics.render([metrics.WorkersCollector(lambda: _states(app)), commands])
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE_LATEST})


async def _metrics_site(app: web.Application) -> AsyncIterator[None]:
    sock = app[METRICS_SOCKET] if METRICS_SOCKET in app else listen_metrics()
    if sock is None:
        yield
        return
    server = web.Application()
    server[_API] = app
    server.router.add_get("/metrics", metrics_handler)
    runner = web.AppRunner(server, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    host, port = sock.getsockname()[:2]
    log.info("metrics on http://%s:%d/metrics", host, port)
    try:
        yield
    finally:
        await runner.cleanup()


def install(app: web.Application) -> None:
    """Health routes, request metrics, and the metrics listener (MDM_METRICS_ADDR)."""
    app.middlewares.insert(0, metrics_middleware)
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app[_COMMANDS] = _CommandsCollector(app)
    app.cleanup_ctx.append(_metrics_site)
