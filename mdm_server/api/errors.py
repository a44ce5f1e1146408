"""Every error leaves the API as JSON, ``{"error": "..."}``: never a stack trace,
never a value from the request."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from mdm_server.logsafe import describe
from mdm_server.storage.keyring import KeyringError
from mdm_server.storage.pool import is_unavailable

__all__ = ["error_middleware", "json_error"]

log = logging.getLogger(__name__)

_KEEP_HEADERS = ("WWW-Authenticate", "Retry-After", "Allow")
# A PostgreSQL failover (Patroni) leaves no writable database for a few seconds
# (about 3 s measured with scripts/pgcluster's settings; docs/scaling.md).
DB_RETRY_AFTER_S = 5


def _db_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_db_unavailable(e) for e in exc.exceptions)
    return is_unavailable(exc)


def json_error(status: int, message: str, **extra: object) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        headers = {k: v for k, v in exc.headers.items() if k in _KEEP_HEADERS}
        return web.json_response({"error": exc.reason}, status=exc.status, headers=headers)
    except KeyringError as exc:
        # Its message names files and what to do, never a secret or personal value.
        log.error("key ring: %s", exc)
        return json_error(503, "the server cannot open stored data now (key ring); "
                               "its operator has the details in the server log",
                          code="keyring_unavailable")
    except Exception as exc:
        resource = request.match_info.route.resource
        if _db_unavailable(exc):
            # Down, restarting, failing over, or a standby: not the request's
            # fault, and it can succeed later. The log names the error's type only.
            log.warning("database unavailable in %s %s (%s)", request.method,
                        resource.canonical if resource else "?", type(exc).__name__)
            return web.json_response(
                {"error": "the database is unavailable now (restarting or failing "
                          "over); try again shortly", "code": "database_unavailable"},
                status=503, headers={"Retry-After": str(DB_RETRY_AFTER_S)})
        log.error("unhandled error in %s %s: %s", request.method,
                  resource.canonical if resource else "?", describe(exc))
        return json_error(500, "internal error")
