"""Every error leaves the API as JSON, ``{"error": "..."}``: never a stack trace,
never a value from the request."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from mdm_server.logsafe import describe
from mdm_server.storage.keyring import KeyringError

__all__ = ["error_middleware", "json_error"]

log = logging.getLogger(__name__)

_KEEP_HEADERS = ("WWW-Authenticate", "Retry-After", "Allow")


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
        log.error("unhandled error in %s %s: %s", request.method,
                  resource.canonical if resource else "?", describe(exc))
        return json_error(500, "internal error")
