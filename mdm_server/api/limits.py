"""Resource limits of the HTTP API (OWASP API4: unrestricted resource consumption).

Every request under ``/api/`` passes :func:`limits_middleware`, in this order:

1. **Rate.** A token bucket per *principal*: the tenant and the token, as
   ``auth.authenticate`` resolves the ``Authorization`` header (``bearer_token``
   reads ``Bearer x``, ``bearer  x`` and ``BEARER x`` alike, so no spelling of the
   header gets a bucket of its own). The lookup is the one auth makes anyway: the
   middleware makes it, the handler's ``require_*`` reuses it. A request without a
   valid token (none, a malformed or unknown one, an unknown route, the OpenAPI
   document) is limited per *client address* instead: the TCP peer
   (``request.remote``), an IPv6 peer by its /64 (what one subscriber gets).
   Behind a reverse proxy every such request shares the proxy's bucket; requests
   with a valid token never draw on it. Past the burst: 429 with ``Retry-After``.
   Two tables, each bounded (``MDM_API_RATE_KEYS``, least recently used forgotten
   first): principals and addresses. Only a valid token adds to the principals'
   table, so no amount of traffic without one (random tokens, many addresses) can
   make the server forget a principal's bucket. In memory, per process: ``serve``
   answers HTTP in one process.
2. **Body.** JSON or nothing: a request that has a body with another
   ``Content-Type``, or none, is 415. Its size is limited per route:
   :func:`body_limit` on the handler (8 MiB for policies, :data:`BODY_LIMIT`
   for other JSON bodies), :data:`NO_BODY_LIMIT` where a route takes none. A
   larger ``Content-Length`` is 413 before anything is read; a body without one
   (chunked) is counted as it is read and refused at the limit (413), never read
   whole: the handler gets the request with ``client_max_size`` set to the route's
   limit.
3. **Headers.** :func:`api_headers` (``on_response_prepare``) puts
   ``Cache-Control: no-store`` and ``X-Content-Type-Options: nosniff`` on every
   ``/api/`` response, errors and the router's 404 included.

Policy previews have a bucket per tenant of their own (``PREVIEW_LIMITER``, 20 a
minute after a burst of 20 by default), on top of the above. Page sizes are capped
where lists are read (``limit`` at most 500), and one export runs per user at a
time (mdm_server/api/me.py).
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler

from mdm_server.api.auth import authenticate, bearer_token
from mdm_server.api.context import POOL
from mdm_server.api.errors import json_error
from mdm_server.policy.offload import for_tenant
from mdm_server.storage.tenants import hash_token

__all__ = [
    "BODY_LIMIT",
    "NO_BODY_LIMIT",
    "POLICY_BODY_LIMIT",
    "PREVIEW_LIMITER",
    "RATE_LIMITER",
    "ApiLimiter",
    "RateLimiter",
    "address_key",
    "api_headers",
    "body_limit",
    "client_address",
    "limits_middleware",
    "public",
]

#: A policy with ten thousand work-zone polygons is a few MiB of GeoJSON.
POLICY_BODY_LIMIT = 8 * 1024 * 1024
#: Any other JSON body: a command with its notice, a refusal, a notice template.
BODY_LIMIT = 64 * 1024
#: Routes that take no body: enough to tell "{}" from a body that is not allowed.
NO_BODY_LIMIT = 1024

NO_STORE_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """Token buckets by key; the least recently used are forgotten past ``max_keys``."""

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._buckets: OrderedDict[bytes, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: bytes, now: float | None = None) -> float:
        """0 if a request may go now (and count it), else seconds until it may."""
        now = time.monotonic() if now is None else now
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(self.burst, now)
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            b.tokens = min(self.burst, b.tokens + (now - b.at) * self.rate)
            b.at = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0.0
        return (1.0 - b.tokens) / self.rate


class ApiLimiter:
    """The API's rate limit: one table of buckets for principals (valid tokens),
    one for client addresses (everything else), so that the second cannot push
    anything out of the first."""

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        self.principals = RateLimiter(rate, burst, max_keys)
        self.addresses = RateLimiter(rate, burst, max_keys)


RATE_LIMITER = web.AppKey("rate_limiter", ApiLimiter)
PREVIEW_LIMITER = web.AppKey("preview_limiter", RateLimiter)

# --- per-route settings, declared on the handlers ------------------------------------

_H = TypeVar("_H", bound=Callable[[web.Request], Awaitable[web.StreamResponse]])
_BODY_LIMITS: dict[object, int] = {}
_PUBLIC: set[object] = set()


def body_limit(max_bytes: int) -> Callable[[_H], _H]:
    """The route takes a JSON body of at most ``max_bytes`` (else NO_BODY_LIMIT)."""
    def mark(handler: _H) -> _H:
        _BODY_LIMITS[handler] = max_bytes
        return handler
    return mark


def public(handler: _H) -> _H:
    """The route needs no token: its requests are limited per client address,
    without looking a token up."""
    _PUBLIC.add(handler)
    return handler


# --- the middleware ---------------------------------------------------------------------

def client_address(request: web.Request) -> bytes:
    """The key of the request's client address: the TCP peer's (``request.remote``;
    no proxy header is believed), by :func:`address_key`."""
    return address_key(request.remote)


def address_key(remote: str | None) -> bytes:
    """An IPv4 address as itself (an IPv4-mapped IPv6 one too), an IPv6 address by
    its /64 (one subscriber's usual allocation: a client rotating addresses within
    it stays in one bucket)."""
    try:
        ip = ipaddress.ip_address(remote or "")
    except ValueError:
        return b"?"  # not an IP peer (a Unix socket): all in one bucket
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped.packed
        return ip.packed[:8]
    return ip.packed


async def _wait(request: web.Request, limiter: ApiLimiter) -> float:
    """Count the request against its principal's or its address's bucket."""
    token = bearer_token(request)
    handler = request.match_info.handler
    if token is not None and request.match_info.http_exception is None \
            and handler not in _PUBLIC:
        who = await authenticate(request, request.app[POOL])
        if who is not None:
            for_tenant(who.tenant)  # its policy work takes its tenant's turn
            return limiter.principals.take(who.tenant.encode() + b"\0" + hash_token(token))
    return limiter.addresses.take(client_address(request))


def _is_json(request: web.Request) -> bool:
    """``application/json``, with no charset or UTF-8 (RFC 8259 JSON is UTF-8)."""
    if "Content-Type" not in request.headers or request.content_type != "application/json":
        return False
    charset = request.charset
    return charset is None or charset.lower() in ("utf-8", "utf8")


def _too_large(limit: int) -> web.Response:
    size = f"{limit // (1024 * 1024)} MiB" if limit >= 1024 * 1024 else f"{limit // 1024} KiB"
    return json_error(413, f"the request body is over {size} (the limit of this route)",
                      code="too_large")


@web.middleware
async def limits_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/api/"):
        return await handler(request)
    limiter = request.app.get(RATE_LIMITER)
    if limiter is not None:
        wait = await _wait(request, limiter)
        if wait > 0:
            return web.json_response(
                {"error": "too many requests: slow down", "code": "rate_limited"},
                status=429, headers={"Retry-After": str(max(1, math.ceil(wait)))})
    limit = _BODY_LIMITS.get(request.match_info.handler, NO_BODY_LIMIT)
    if request.body_exists and request.content_length != 0:
        if not _is_json(request):
            return json_error(415, "a request body must be JSON, sent as "
                                   "Content-Type: application/json",
                              code="unsupported_media_type")
        if request.content_length is not None and request.content_length > limit:
            return _too_large(limit)
    try:
        # The limit holds on the bytes read, whether or not Content-Length said.
        return await handler(request.clone(client_max_size=limit))
    except web.HTTPRequestEntityTooLarge:
        return _too_large(limit)


async def api_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: no /api/ answer is stored by a cache or sniffed into
    another type by a browser, whatever produced it."""
    if request.path.startswith("/api/"):
        response.headers.update(NO_STORE_HEADERS)
