"""The aiohttp application factory: every resource lives in a cleanup context.

``serve`` = this app (HTTP API) + the in-process ingest worker + the extra
ingest worker processes asked for with ``--ingest-workers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Handler

from mdm_server.config import Config
from mdm_server.ingest.worker import IngestStats, IngestWorker
from mdm_server.storage.pool import create_pool
from mdm_server.storage.tenants import hash_token

__all__ = ["CONFIG", "INGEST", "POOL", "create_app", "live_line"]

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
POOL = web.AppKey("pool", asyncpg.Pool)
INGEST = web.AppKey("ingest", IngestWorker)


async def live_line(stats: IngestStats, label: str, interval_s: float = 1.0) -> None:
    """Print a line a second: records stored per second, and the totals."""
    last_stored, last_t = stats.records_stored, time.monotonic()
    while True:
        await asyncio.sleep(interval_s)
        now = time.monotonic()
        rate = (stats.records_stored - last_stored) / (now - last_t)
        last_stored, last_t = stats.records_stored, now
        print(f"{label}: {rate:,.0f} records/s  stored={stats.records_stored:,} "
              f"duplicates={stats.duplicates:,} dead_letters={stats.dead_letters:,} "
              f"messages={stats.messages:,}", file=sys.stderr, flush=True)


async def _pool_ctx(app: web.Application) -> AsyncIterator[None]:
    pool = await create_pool(app[CONFIG].database_url)
    app[POOL] = pool
    yield
    await pool.close()


async def _ingest_ctx(app: web.Application) -> AsyncIterator[None]:
    worker = IngestWorker(app[CONFIG], index=0)
    app[INGEST] = worker
    tasks = [
        asyncio.create_task(worker.run(), name="ingest-0"),
        asyncio.create_task(live_line(worker.stats, "ingest-0"), name="ingest-0-live"),
    ]

    def _fatal(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("%s stopped", task.get_name(), exc_info=task.exception())
            raise web.GracefulExit  # never keep serving without ingest

    for t in tasks:
        t.add_done_callback(_fatal)
    yield
    for t in tasks:
        t.remove_done_callback(_fatal)
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            raise
        return web.json_response({"error": exc.reason}, status=exc.status)


async def _admin_tenant(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise web.HTTPUnauthorized(reason="a bearer token is required",
                                   headers={"WWW-Authenticate": "Bearer"})
    row = await request.app[POOL].fetchrow(
        "SELECT tenant_id FROM api_tokens WHERE token_sha256 = $1 AND role = 'admin' "
        "AND revoked_at IS NULL", hash_token(token))
    if row is None:
        raise web.HTTPUnauthorized(reason="the token is not valid",
                                   headers={"WWW-Authenticate": "Bearer"})
    return str(row["tenant_id"])


async def healthz(request: web.Request) -> web.Response:
    await request.app[POOL].fetchval("SELECT 1")
    body: dict[str, object] = {"status": "ok"}
    worker = request.app.get(INGEST)
    if worker is not None:
        s = worker.stats
        body["ingest"] = {
            "broker_connected": worker.consumer.connected.is_set(),
            "messages": s.messages, "records_stored": s.records_stored,
            "duplicates": s.duplicates, "dead_letters": s.dead_letters,
        }
    return web.json_response(body)


async def list_devices(request: web.Request) -> web.Response:
    tenant = await _admin_tenant(request)
    rows = await request.app[POOL].fetch(
        "SELECT device_id, ownership, status, enrolled_at FROM devices "
        "WHERE tenant_id = $1 ORDER BY device_id LIMIT 1000", tenant)
    return web.json_response({"devices": [
        {"device": r["device_id"], "ownership": r["ownership"], "status": r["status"],
         "enrolled_at": r["enrolled_at"].isoformat()} for r in rows]})


def create_app(config: Config, *, ingest: bool = True) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=1024 * 1024)
    app[CONFIG] = config
    app.cleanup_ctx.append(_pool_ctx)
    if ingest:
        app.cleanup_ctx.append(_ingest_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/v1/devices", list_devices)
    return app
