"""Resource limits of the HTTP API (OWASP API4: unrestricted resource consumption).

- Request bodies: 1 MiB, 8 MiB for policies (a thousand work-zone polygons are a
  few MiB of GeoJSON); a larger Content-Length is 413 before the body is read (a
  chunked body is cut at 8 MiB by aiohttp, also 413).
- Per-token rate limit: a token bucket per bearer token (per client address when
  there is none): a burst, then a steady rate; past it 429 with ``Retry-After``.
  In memory, per process: ``serve`` answers HTTP in one process.
- Policy previews: a bucket per tenant of their own (``PREVIEW_LIMITER``, 20 a
  minute after a burst of 20 by default), on top of the per-token limit.
- Page sizes are capped where lists are read (``limit`` at most 500), and one
  export runs per user at a time (mdm_server/api/me.py).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler

from mdm_server.api.errors import json_error

__all__ = [
    "BODY_LIMIT",
    "POLICY_BODY_LIMIT",
    "PREVIEW_LIMITER",
    "RATE_LIMITER",
    "RateLimiter",
    "limits_middleware",
]

BODY_LIMIT = 1024 * 1024
POLICY_BODY_LIMIT = 8 * 1024 * 1024


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


RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)
PREVIEW_LIMITER = web.AppKey("preview_limiter", RateLimiter)


def _key(request: web.Request) -> bytes:
    auth = request.headers.get("Authorization", "")
    if auth:
        return hashlib.sha256(auth.encode("utf-8", "surrogateescape")).digest()
    return ("addr:" + (request.remote or "?")).encode()


@web.middleware
async def limits_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/api/"):
        limiter = request.app.get(RATE_LIMITER)
        if limiter is not None:
            wait = limiter.take(_key(request))
            if wait > 0:
                return web.json_response(
                    {"error": "too many requests: slow down", "code": "rate_limited"},
                    status=429, headers={"Retry-After": str(max(1, math.ceil(wait)))})
        limit = POLICY_BODY_LIMIT if request.path.startswith("/api/v1/policies") \
            else BODY_LIMIT
        if request.content_length is not None and request.content_length > limit:
            return json_error(413, f"the request body is over {limit // 1024 // 1024} MiB",
                              code="too_large")
    return await handler(request)
