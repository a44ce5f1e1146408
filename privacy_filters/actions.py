"""Field actions: pure functions from one value to its stored form.

Each factory is called once, when a policy is compiled, and returns a small closure
that the hot path calls per value. The closures expect the types that
``agent_protocol.validate_data`` produces (``str`` for string fields, ``float`` for
numbers, ``int`` for integers); given anything else they return :data:`DROP`, so an
unexpected value is never stored unfiltered (fail closed).

* ``mask``: keep the last (``keep_last``) or first (``keep_first``) *n* characters
  and replace every other character with ``*``; the length is kept. A value of at
  most *n* characters is masked completely (keeping it whole would reveal it).
* ``hash``: ``"hmac-sha256:"`` + the first 128 bits (32 hex digits) of
  HMAC-SHA256(key, UTF-8 value; a lone surrogate, which no JSON payload can carry,
  is encoded with ``surrogatepass`` so hashing never fails). Equal values give
  equal outputs under one key, so they can still be joined; the value cannot be
  read back without the key.
* ``coarsen``: the nearest multiple of ``step`` (halves round up, towards +inf).
  An ``int`` value with an ``int`` step stays an ``int``; anything else is a
  ``float``, rounded to the step's decimals so 0.1 steps give 0.3, not
  0.30000000000000004.
* ``drop`` / ``keep``: no closure; the compiler removes or leaves the field.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Callable
from decimal import Decimal
from typing import Final

__all__ = [
    "DROP",
    "HASH_PREFIX",
    "MIN_HASH_KEY_BYTES",
    "Action",
    "coarsen",
    "coarsener",
    "hash_value",
    "hasher",
    "mask",
    "masker",
]


class _Drop:
    """Sentinel type: the field is removed from the record."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DROP"


DROP: Final = _Drop()
"""Returned by an action when the field must not be stored."""

Action = Callable[[object], object]
"""A compiled action: value -> stored value, or :data:`DROP`."""

HASH_PREFIX: Final = "hmac-sha256:"
MIN_HASH_KEY_BYTES: Final = 16


# --- mask -------------------------------------------------------------------------------


def mask(value: str, *, keep_last: int | None = None, keep_first: int | None = None) -> str:
    """Mask ``value`` keeping exactly one of ``keep_last`` / ``keep_first`` characters."""
    if (keep_last is None) == (keep_first is None):
        raise ValueError("mask needs exactly one of keep_last and keep_first")
    n = keep_last if keep_last is not None else keep_first
    assert n is not None  # one of the two is set (checked above)
    if n < 0:
        raise ValueError("mask: the number of characters kept must not be negative")
    size = len(value)
    if size <= n:
        return "*" * size
    if n == 0:
        return "*" * size
    if keep_last is not None:
        return "*" * (size - n) + value[-n:]
    return value[:n] + "*" * (size - n)


def masker(*, keep_last: int | None = None, keep_first: int | None = None) -> Action:
    """A compiled ``mask`` action (see :func:`mask`)."""
    if (keep_last is None) == (keep_first is None):
        raise ValueError("mask needs exactly one of keep_last and keep_first")
    n = keep_last if keep_last is not None else keep_first
    assert n is not None  # one of the two is set (checked above)
    if n < 0:
        raise ValueError("mask: the number of characters kept must not be negative")

    if n == 0:

        def mask_all(v: object) -> object:
            if type(v) is not str:
                return DROP
            return "*" * len(v)

        return mask_all

    if keep_last is not None:
        neg = -n

        def mask_last(v: object) -> object:
            if type(v) is not str:
                return DROP
            size = len(v)
            if size <= n:
                return "*" * size
            return "*" * (size - n) + v[neg:]

        return mask_last

    def mask_first(v: object) -> object:
        if type(v) is not str:
            return DROP
        size = len(v)
        if size <= n:
            return "*" * size
        return v[:n] + "*" * (size - n)

    return mask_first


# --- hash -------------------------------------------------------------------------------


def _check_key(key: bytes) -> None:
    if type(key) is not bytes or len(key) < MIN_HASH_KEY_BYTES:
        raise ValueError(f"the hash key must be at least {MIN_HASH_KEY_BYTES} bytes")


def hash_value(value: str, key: bytes) -> str:
    """``"hmac-sha256:"`` + 32 hex digits: the first 128 bits of HMAC-SHA256(key, value)."""
    _check_key(key)
    data = value.encode("utf-8", "surrogatepass")  # never fails, never quotes the value
    return HASH_PREFIX + hmac.digest(key, data, "sha256")[:16].hex()


def hasher(key: bytes) -> Action:
    """A compiled ``hash`` action under ``key`` (at least 16 bytes)."""
    _check_key(key)
    # The padded key blocks are hashed once; each value then costs two copies of a
    # SHA-256 state and two short updates (RFC 2104, identical to hmac.digest).
    block = hashlib.sha256().block_size
    k = hashlib.sha256(key).digest() if len(key) > block else key
    k = k.ljust(block, b"\x00")
    inner0 = hashlib.sha256(bytes(b ^ 0x36 for b in k))
    outer0 = hashlib.sha256(bytes(b ^ 0x5C for b in k))
    prefix = HASH_PREFIX

    def hash_(v: object) -> object:
        if type(v) is not str:
            return DROP
        inner = inner0.copy()
        inner.update(v.encode("utf-8", "surrogatepass"))
        outer = outer0.copy()
        outer.update(inner.digest())
        return prefix + outer.hexdigest()[:32]

    return hash_


# --- coarsen ----------------------------------------------------------------------------


def _decimals(step: float) -> int:
    exp = Decimal(repr(step)).as_tuple().exponent
    return min(max(0, -exp), 12) if isinstance(exp, int) else 12


def coarsen(value: float, step: float) -> float:
    """``value`` rounded to the nearest multiple of ``step`` (see the module doc)."""
    result = coarsener(step)(value)
    if isinstance(result, _Drop):
        raise TypeError("coarsen needs an int or float value")
    return result  # type: ignore[return-value]  # int or float for int/float input


def coarsener(step: float) -> Action:
    """A compiled ``coarsen`` action (``step`` > 0, finite)."""
    if type(step) not in (int, float) or not math.isfinite(step) or step <= 0:
        raise ValueError("coarsen needs a finite step > 0")
    int_step = type(step) is int
    fstep = float(step)
    ndigits = _decimals(fstep)
    floor = math.floor

    def coarsen_(v: object) -> object:
        t = type(v)
        if t is int and int_step:
            q, r = divmod(v, step)  # type: ignore[operator]  # t is int here
            return (q + 1 if 2 * r >= step else q) * step
        if t is float or t is int:
            if not math.isfinite(v):  # type: ignore[arg-type]  # t is int or float here
                return DROP
            return round(floor(v / fstep + 0.5) * fstep, ndigits)  # type: ignore[operator]
        return DROP

    return coarsen_
