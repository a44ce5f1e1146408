"""The aiohttp application factory: every resource lives in a cleanup context.

``serve`` = this app (HTTP API) + the in-process ingest worker + the extra
ingest worker processes asked for with ``--ingest-workers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator

from aiohttp import web

from mdm_server.api import (
    agents,
    auth,
    commands,
    devices,
    live,
    me,
    openapi,
    pages,
    places,
    policies,
    reports,
    tokens,
    trips,
)
from mdm_server.api.context import CONFIG, KEYRING, POOL
from mdm_server.api.errors import error_middleware
from mdm_server.api.limits import (
    NO_BODY_LIMIT,
    PREVIEW_LIMITER,
    RATE_LIMITER,
    ApiLimiter,
    RateLimiter,
    api_headers,
    limits_middleware,
)
from mdm_server.commands.acks import AckConsumer
from mdm_server.commands.outbox import CommandDispatcher
from mdm_server.config import Config
from mdm_server.ingest.worker import IngestWorker, live_line
from mdm_server.logsafe import describe
from mdm_server.ops import http as ops_http
from mdm_server.ops import metrics
from mdm_server.storage.keyring import Keyring, KeyringError
from mdm_server.storage.pool import create_pool

__all__ = ["ACKS", "CONFIG", "DISPATCHER", "HSTS", "INGEST", "POOL", "create_app"]

log = logging.getLogger(__name__)

INGEST = web.AppKey("ingest", IngestWorker)
DISPATCHER = web.AppKey("dispatcher", CommandDispatcher)
ACKS = web.AppKey("acks", AckConsumer)


def _fatal(task: asyncio.Task[None]) -> None:
    """Done-callback of the server's background tasks: one that fails stops the
    server (to be restarted by its supervisor) rather than serving without ingest
    or leaving accepted commands unsent."""
    exc = None if task.cancelled() else task.exception()
    if isinstance(exc, KeyringError):  # its message names files, never secrets
        log.critical("%s stopped: key ring: %s", task.get_name(), exc)
        raise web.GracefulExit
    if exc is not None:
        log.critical("%s stopped: %s", task.get_name(), describe(exc))
        raise web.GracefulExit


async def _pool_ctx(app: web.Application) -> AsyncIterator[None]:
    pool = await create_pool(app[CONFIG].database_url)
    app[POOL] = pool
    yield
    await pool.close()


async def _live_ctx(app: web.Application) -> AsyncIterator[None]:
    """The live feed (mdm_server/live/hub.py): LISTEN on mdm_live, fan out to the SSE
    streams. Stopped before the pool closes, after the streams' ends are logged."""
    from mdm_server.audit import AuditKeys
    from mdm_server.live.hub import LiveHub

    config = app[CONFIG]
    assert config.master_key is not None
    hub = LiveHub(config.database_url, app[POOL], app[KEYRING],
                  AuditKeys.derive(config.master_key))
    app[live.HUB] = hub
    await hub.start()
    yield
    await hub.stop()


async def _retention_loop(app: web.Application, interval_s: float) -> None:
    from mdm_server.retention import run_retention
    from mdm_server.storage.erasure import fulfil_due
    from mdm_server.storage.partitions import create_ahead

    while True:
        started = time.monotonic()
        try:
            async with app[POOL].acquire() as conn:
                # The coming days' partitions, one at a time (mdm_server/ingest/sink.py):
                # the ingest then creates none for current data.
                await create_ahead(conn, int(time.time() * 1000))
                await run_retention(conn)
                # Erasure requests nobody answered within 30 days are fulfilled (and
                # the key ring compacted at once).
                erased = await fulfil_due(conn, app[KEYRING], app[CONFIG].audit_keys())
                if erased:
                    metrics.ERASURES.inc(erased)
                    log.info("fulfilled %d erasure request(s) that were due", erased)
                # Catch up on a compaction an erasure did not finish (a crash, a
                # failure): at the latest one interval (at most a day) later.
                caught = await app[KEYRING].compact(conn, only_if_due=True)
                if caught.epoch is not None or caught.files_destroyed:
                    log.info("key ring caught up: %s", caught.to_json())
            metrics.retention_done(time.monotonic() - started)
        except KeyringError as exc:  # names files, never secrets or personal values
            metrics.retention_failed()
            log.error("retention run failed: key ring: %s", exc)
        except Exception as exc:  # a failed run is retried next time; serving goes on
            metrics.retention_failed()
            log.error("retention run failed (%s)", type(exc).__name__)
        await asyncio.sleep(interval_s)


async def _retention_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(
        _retention_loop(app, app[CONFIG].retention_interval_s), name="retention")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _ingest_ctx(app: web.Application) -> AsyncIterator[None]:
    worker = IngestWorker(app[CONFIG], index=0)
    app[INGEST] = worker
    tasks = [
        asyncio.create_task(worker.run(), name="ingest-0"),
        asyncio.create_task(live_line(worker.stats, "ingest-0"), name="ingest-0-live"),
    ]

    for t in tasks:
        t.add_done_callback(_fatal)
    yield
    for t in tasks:
        t.remove_done_callback(_fatal)
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t


async def _dispatch_ctx(app: web.Application) -> AsyncIterator[None]:
    """Signed commands: the outbox dispatcher and the ack consumer, next to the
    in-process ingest."""
    cfg = app[CONFIG]
    dispatcher = CommandDispatcher(cfg, app[POOL], client_id=cfg.client_id("mdm-dispatch"))
    acks = AckConsumer(cfg, app[POOL], client_id=cfg.client_id("mdm-acks-0"))
    app[DISPATCHER] = dispatcher
    app[ACKS] = acks
    tasks = [asyncio.create_task(dispatcher.run(), name="command-dispatch"),
             asyncio.create_task(acks.run(), name="command-acks")]
    for t in tasks:
        t.add_done_callback(_fatal)
    yield
    for t in tasks:
        t.remove_done_callback(_fatal)
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t


#: Sent on every response when serve terminates HTTPS itself (MDM_TLS_CERT): browsers
#: then use https:// for this host for a year, even if a link says http://.
HSTS = "max-age=31536000"


async def _hsts(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Strict-Transport-Security"] = HSTS


async def healthz(request: web.Request) -> web.Response:
    """Up, and is the ingest connected? Open to anyone, so it says nothing more: no
    counters (they would tell anyone how busy every tenant is)."""
    await request.app[POOL].fetchval("SELECT 1")
    body: dict[str, object] = {"status": "ok"}
    worker = request.app.get(INGEST)
    if worker is not None:
        body["ingest"] = {"broker_connected": worker.consumer.connected.is_set()}
    return web.json_response(body)


def create_app(config: Config, *, ingest: bool = True) -> web.Application:
    # Body limits are per route (limits_middleware sets each /api/ request's own);
    # nothing outside /api/ takes a body.
    app = web.Application(middlewares=[error_middleware, limits_middleware],
                          client_max_size=NO_BODY_LIMIT)
    app.on_response_prepare.append(api_headers)
    app[RATE_LIMITER] = ApiLimiter(rate=config.api_rate_per_s, burst=config.api_burst,
                                   max_keys=config.api_rate_keys)
    app[PREVIEW_LIMITER] = RateLimiter(rate=config.preview_per_min / 60,
                                       burst=float(config.preview_per_min))
    app[CONFIG] = config
    if config.tls_cert is not None:  # serve speaks HTTPS (cli._serve)
        app.on_response_prepare.append(_hsts)
    if config.keyring_dir is not None and config.master_key is not None:
        app[KEYRING] = Keyring.from_config(config)
    app.cleanup_ctx.append(_pool_ctx)
    if KEYRING in app:
        app.cleanup_ctx.append(_live_ctx)
    if ingest:
        app.cleanup_ctx.append(_ingest_ctx)
        app.cleanup_ctx.append(_retention_ctx)
        app.cleanup_ctx.append(_dispatch_ctx)
    app.router.add_get("/healthz", healthz)
    ops_http.install(app)  # /livez, /readyz, request metrics, MDM_METRICS_ADDR's /metrics
    app.router.add_routes(auth.routes())  # GET /api/v1/token
    app.router.add_routes(tokens.routes())  # GET /api/v1/tokens, DELETE .../{token_id}
    app.router.add_routes(devices.routes())
    app.router.add_routes(commands.routes())
    app.router.add_routes(me.routes())
    app[me.EXPORTS] = set()
    app.router.add_routes(live.routes())  # /api/v1/live, .../me/devices/{device}/live
    app[live.STREAMS] = Counter()
    app.on_shutdown.append(live.on_shutdown)  # streams end (and log it) before the pool goes
    app.router.add_routes(policies.routes())
    app.router.add_routes(places.routes())  # /api/v1/places (issue 11)
    app.router.add_routes(trips.routes())  # /api/v1/devices/{device}/trips (issue 11)
    app.router.add_routes(reports.routes())  # /api/v1/reports/shifts, .../me/.../shifts
    app[reports.LONGEST_CACHE] = {}
    app.router.add_routes(openapi.routes())  # GET /api/v1/openapi.json, no token
    app.router.add_routes(pages.routes())  # /portal/ and /console/ (mdm_server/web)
    app.router.add_routes(agents.routes())  # /owntracks, /osmand/{key} (issue 12)
    return app
