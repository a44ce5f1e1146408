"""``serve``'s HTTP access log without query values.

aiohttp's default access log writes the request line as sent, query string
included, and a query may carry a personal value: the shift report's ``?user=`` is
a user id as stored. This log (``aiohttp.access``, INFO) names the query's
parameters, never their values: the client address, method, path and ``?from&user``,
status, size and time taken; no header, no body. A parameter name that is not
spelled like the API's (lower case and ``_``) is logged as ``?``: a value may be
sent as a name.

The path is the matched route's template, never the path as sent
(``/api/v1/devices/{device}/trips``, ``/osmand/{key}``): a path can carry a secret
(the OsmAnd / Traccar Client URL key, which authenticates the device) or an id.
A request that matched no route is logged as ``(no route)``.

A health probe that succeeds (``/livez``, ``/readyz``, ``/healthz``, asked every
few seconds by orchestrators) is not logged; one that fails is.
"""

from __future__ import annotations

import re

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

__all__ = ["AccessLog"]

# A parameter's name as the API's are spelled; any other (which could be a value
# sent as a name) is logged as "?".
_NAME = re.compile(r"[a-z][a-z_]{0,31}")
_PROBES = frozenset({"/livez", "/readyz", "/healthz"})


def _template(request: BaseRequest) -> str:
    match_info = getattr(request, "match_info", None)
    route = getattr(match_info, "route", None)
    resource = getattr(route, "resource", None)
    if resource is None or getattr(match_info, "http_exception", None) is not None:
        return "(no route)"
    return str(resource.canonical)


class AccessLog(AbstractAccessLogger):
    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        if response.status < 400 and request.path in _PROBES:
            return
        names = "&".join(dict.fromkeys(n if _NAME.fullmatch(n) else "?" for n in request.query))
        target = _template(request) + (f"?{names}" if names else "")
        self.logger.info('%s "%s %s HTTP/%d.%d" %d %d %.3fs', request.remote, request.method,
                         target, request.version.major, request.version.minor,
                         response.status, response.body_length, time)
