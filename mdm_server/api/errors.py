"""Every error leaves the API as JSON, ``{"error": "..."}``: never a stack trace,
never a value from the request."""

from __future__ import annotations

import logging
import traceback

from aiohttp import web
from aiohttp.typedefs import Handler

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
    except Exception as exc:
        # The exception's text may quote request data: log its type and where it
        # happened, not its message.
        where = "".join(traceback.format_tb(exc.__traceback__, limit=-3))
        log.error("unhandled %s in %s %s\n%s", type(exc).__name__, request.method,
                  request.match_info.route.resource.canonical if request.match_info.route.resource
                  else "?", where)
        return json_error(500, "internal error")
