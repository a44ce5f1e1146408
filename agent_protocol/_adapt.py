"""Helpers shared by the adapters for other agents' formats (``owntracks``, ``osmand``).

Those apps send numbers as JSON numbers or as strings, timestamps in their own units,
and fields under their own names. These helpers turn such values into the contract's
(:mod:`agent_protocol.kinds`), and wrap the contract's validation so that an error
names the field the app sent (``vel``), not the one we store (``speed_mps``). Like the
rest of the package, no error quotes a value from the payload.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from typing import Any, Final

import orjson

from agent_protocol._time import MAX_TS_MS
from agent_protocol.envelope import MAX_AGE_MS, MAX_FUTURE_MS, Record
from agent_protocol.errors import Reason, RemoteProtocolError
from agent_protocol.kinds import validate_data

__all__ = [
    "MAX_NUMERIC_LEN",
    "build_record",
    "check_window",
    "join",
    "number",
    "record_id",
]

MAX_NUMERIC_LEN: Final = 32  # characters of a number sent as a string

# A decimal number as apps write it in a string: no spaces, no "_", no "nan"/"inf",
# no hex, no locale separators (float() alone would accept all but the last).
_numeric = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?").fullmatch


def join(path: str, name: str) -> str:
    """``path.name``; ``path[3]`` when ``name`` is ``[3]``; ``path`` when ``name`` is ""."""
    if not path or not name:
        return path or name
    return f"{path}{name}" if name.startswith("[") else f"{path}.{name}"


def number(value: object, path: str, name: str) -> float | None:
    """A JSON number or a decimal number in a string -> float; None or "" -> None.

    Booleans, other strings, objects and lists are ``wrong_type``; a value that is not
    finite (``"1e999"``) is ``out_of_range``.
    """
    if type(value) is float or type(value) is int:  # not bool
        f = float(value)
    elif isinstance(value, str):
        if value == "":
            return None
        if len(value) > MAX_NUMERIC_LEN or _numeric(value) is None:
            raise RemoteProtocolError(
                Reason.WRONG_TYPE, f"{name} must be a number or a decimal number in a string",
                join(path, name),
            )
        f = float(value)
    elif value is None:
        return None
    else:
        raise RemoteProtocolError(
            Reason.WRONG_TYPE, f"{name} must be a number or a decimal number in a string",
            join(path, name),
        )
    if not math.isfinite(f):
        raise RemoteProtocolError(Reason.OUT_OF_RANGE, f"{name} must be finite", join(path, name))
    return f


def position(lat: float | None, lon: float | None, path: str,
             names: tuple[str, str] = ("lat", "lon")) -> dict[str, Any]:
    """A location's ``{"lat", "lon"}``; ``missing_field`` (named as the app names
    it) when either is absent."""
    for name, value in zip(names, (lat, lon), strict=True):
        if value is None:
            raise RemoteProtocolError(
                Reason.MISSING_FIELD, f"{name} is required", join(path, name)
            )
    return {"lat": lat, "lon": lon}


def check_window(ts_ms: int, now_ms: int, path: str, name: str) -> int:
    """Refuse a time more than 24 h after ``now_ms`` (``future_timestamp``) or more
    than 400 days before it, or before 1970 (``bad_timestamp``), as for our own agents."""
    if ts_ms > now_ms + MAX_FUTURE_MS or ts_ms > MAX_TS_MS:
        raise RemoteProtocolError(
            Reason.FUTURE_TIMESTAMP, f"{name} must not be more than 24 h in the future",
            join(path, name),
        )
    if ts_ms < now_ms - MAX_AGE_MS or ts_ms < 0:
        raise RemoteProtocolError(
            Reason.BAD_TIMESTAMP,
            f"{name} must not be older than {MAX_AGE_MS // 86_400_000} days, nor before 1970",
            join(path, name),
        )
    return ts_ms


def record_id(prefix: str, kind: str, ts_ms: int, data: Mapping[str, Any]) -> str:
    """A record id derived from what is stored: ``prefix`` + 32 hex digits of
    BLAKE2b-128 over the canonical JSON of ``[kind, ts_ms, data]``.

    The same fix sent again (a retry, a redelivery, the other transport, encrypted or
    not, with other fields we drop) gets the same id and time, so the server stores it
    once; the records of different kinds from one message get different ids.
    """
    canonical = orjson.dumps([kind, ts_ms, data], option=orjson.OPT_SORT_KEYS)
    return prefix + hashlib.blake2b(canonical, digest_size=16).hexdigest()


def build_record(
    kind: str,
    ts_ms: int,
    data: dict[str, Any],
    *,
    sources: Mapping[str, str],
    path: str,
    now_ms: int,
    id_prefix: str,
) -> tuple[str, Record]:
    """Validate ``data`` for ``kind`` and build ``(kind, Record)``.

    ``sources`` maps each field of ``data`` to the name the app sent it under; a
    validation error is re-raised naming that field (at ``path``), e.g. ``vel`` for
    ``speed_mps``.
    """
    try:
        clean = validate_data(kind, data, "", now_ms=now_ms)
    except RemoteProtocolError as err:
        field = err.path or ""
        source = sources.get(field, field)
        detail = err.detail if source in (field, "") else f"{err.detail} (from {source})"
        raise RemoteProtocolError(err.reason, detail, join(path, source) or None) from None
    return kind, Record(record_id(id_prefix, kind, ts_ms, clean), ts_ms, clean)
