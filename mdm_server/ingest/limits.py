"""The per-device ingest rate limit: a token bucket per (tenant, device).

Every message a consumer receives takes a token from its device's bucket, which
refills at ``rate`` tokens a second up to ``burst``. A message that finds the
bucket empty is *rate-limited*: the consumer acknowledges it after the commit of
its batch, like any other, but neither decodes nor stores it; the batch's write
counts it in ``dead_letters`` (reason ``rate_limited``, per device and hour).
That is the one deliberate exception to "nothing the broker accepted is lost":
one device's flood costs the others only the few microseconds a message takes
to be read, counted and acknowledged (docs/architecture.md, "Limits against a
flood").

The check runs for every message on the consumer's hot path, so it is one dict
lookup by the topic string as received (a device's topics share its bucket), one
clock read and a few float operations, about 0.2 us (load_tests/bench_decode.py,
pipeline). The device is taken from the topic (``agent_protocol.outline_topic``)
the first time a topic is seen; topics whose tenant or device does not parse
share one bucket per what did. Both maps are bounded: past ``max_entries`` the
topic map is cleared (it refills from the device map) and the device map loses
its full buckets (a full bucket is the same as a new one).

Limits are per consumer process: with N ingest workers in the shared
subscription, a device gets up to N times the rate (the broker hands each
worker its turn of the device's messages).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from agent_protocol import outline_topic
from mdm_server.agents.topics import foreign_device

__all__ = ["RATE_LIMITED", "DeviceBucket", "DeviceLimiter"]

# Dead-letter reason of a message dropped by the limit (the protocol's own
# reasons are in agent_protocol.Reason).
RATE_LIMITED = "rate_limited"


class DeviceBucket:
    """One device's tokens, and what its dead-letter count is filed under."""

    __slots__ = ("detail", "device", "stamp", "tenant", "tokens", "topic")

    def __init__(self, tenant: str | None, device: str | None, topic: str, detail: str,
                 tokens: float, stamp: float) -> None:
        self.tenant = tenant
        self.device = device
        self.topic = topic  # mdm/v1/{tenant}/devices/{device}/#: all of its topics
        self.detail = detail
        self.tokens = tokens
        self.stamp = stamp


class DeviceLimiter:
    """Token buckets per device; :meth:`check` says whether a message may go on."""

    def __init__(self, rate_per_s: float, burst: int, *,
                 clock: Callable[[], float] = time.monotonic,
                 max_entries: int = 200_000) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be positive and burst at least 1")
        self.rate = float(rate_per_s)
        self.burst = float(burst)
        self._clock = clock
        self._max = max_entries
        self._device_cap = max_entries  # raised when a scan finds too few to forget
        self._by_topic: dict[str, DeviceBucket] = {}
        self._by_device: dict[tuple[str | None, str | None, str], DeviceBucket] = {}
        self._detail = (f"over the device's ingest rate limit ({rate_per_s:g} messages/s "
                        f"after a burst of {burst}): acknowledged, not decoded, not stored")

    def check(self, topic: str) -> DeviceBucket | None:
        """None if a message on ``topic`` may go on (a token taken), else the bucket
        of its device, which was empty (the message is rate-limited)."""
        bucket = self._by_topic.get(topic)
        if bucket is None:
            bucket = self._bucket(topic)
        now = self._clock()
        tokens = bucket.tokens + (now - bucket.stamp) * self.rate
        bucket.stamp = now
        if tokens >= 1.0:
            bucket.tokens = (self.burst if tokens > self.burst else tokens) - 1.0
            return None
        bucket.tokens = tokens
        return bucket

    def _bucket(self, topic: str) -> DeviceBucket:
        tenant: str | None
        device: str | None
        foreign = foreign_device(topic) if not topic.startswith("mdm/") else None
        if foreign is not None:  # a foreign agent's: the same device, the same bucket
            tenant, device = foreign
            name = f"mdm/v1/{tenant}/devices/{device}/#"
        else:
            o = outline_topic(topic)
            tenant, device = o.tenant, o.device
            if o.device is not None:
                name = f"mdm/v1/{o.tenant}/devices/{o.device}/#"
            else:  # shared by every topic that parses as far as this one
                name = o.text
        key = (tenant, device, name)
        bucket = self._by_device.get(key)
        if bucket is None:
            if len(self._by_device) >= self._device_cap:
                self._forget_full()
            bucket = DeviceBucket(tenant, device, name, self._detail, self.burst,
                                  self._clock())
            self._by_device[key] = bucket
        if len(self._by_topic) >= self._max:
            self._by_topic.clear()
        self._by_topic[topic] = bucket
        return bucket

    def _forget_full(self) -> None:
        now, rate, burst = self._clock(), self.rate, self.burst
        self._by_device = {k: b for k, b in self._by_device.items()
                           if b.tokens + (now - b.stamp) * rate < burst}
        self._by_topic.clear()  # it may hold buckets just forgotten
        # That many devices are active: scan again only when twice as many are.
        self._device_cap = max(self._max, 2 * len(self._by_device))
