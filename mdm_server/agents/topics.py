"""Which device a foreign agent's topic names (pure; the rate limit needs it before
anything is decoded)."""

from __future__ import annotations

from functools import lru_cache

__all__ = ["foreign_device", "split_username"]


def split_username(user: str) -> tuple[str, str] | None:
    """(tenant, device) of a broker username ``{tenant}.{device}`` (ids hold no ".")."""
    tenant, dot, device = user.partition(".")
    return (tenant, device) if dot and tenant and device and "." not in device else None


@lru_cache(maxsize=65536)
def foreign_device(topic: str) -> tuple[str, str] | None:
    """(tenant, device) of a foreign agent's topic (``owntracks/{username}/{device}/...``,
    and the pseudo-topics ``{agent}/{username}/{device}`` of HTTP posts), or None
    when it names none consistently."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] not in ("owntracks", "osmand", "traccar"):
        return None
    who = split_username(parts[1])
    if who is None or who[1] != parts[2]:
        return None
    return who
