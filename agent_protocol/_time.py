"""Timestamps on the wire: RFC 3339 with offset, or integer epoch milliseconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from agent_protocol.errors import Reason, RemoteProtocolError

# datetime can represent 0001-01-01 .. 9999-12-31; we accept the Unix era only.
MIN_TS_MS = 0
MAX_TS_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_fromisoformat = datetime.fromisoformat

TS_DETAIL = "must be an RFC 3339 string with offset or integer epoch milliseconds"


def parse_ts(value: object, path: str) -> int:
    """Return ``value`` as integer epoch milliseconds (UTC) or raise RemoteProtocolError.

    Strings must look like ``YYYY-MM-DDTHH:MM:SS[.fff...](Z|+hh:mm|-hh:mm)``;
    integers must not be booleans. No bounds relative to "now" are checked here.
    """
    if type(value) is int:
        if MIN_TS_MS <= value <= MAX_TS_MS:
            return value
        raise RemoteProtocolError(Reason.BAD_TIMESTAMP, "epoch milliseconds out of range", path)
    if type(value) is not str:
        raise RemoteProtocolError(Reason.WRONG_TYPE, TS_DETAIL, path)
    n = len(value)
    # Cheap structural check first: fromisoformat alone also accepts ISO 8601 forms
    # that are not RFC 3339 (week dates, basic format, no seconds, ...).
    if (
        n < 20
        or n > 40
        or value[4] != "-"
        or value[7] != "-"
        or value[10] not in "Tt "
        or value[13] != ":"
        or value[16] != ":"
    ):
        raise RemoteProtocolError(Reason.BAD_TIMESTAMP, TS_DETAIL, path)
    last = value[-1]
    if last == "z":
        value = value[:-1] + "Z"
    elif last != "Z" and (value[-6] not in "+-" or value[-3] != ":"):
        raise RemoteProtocolError(
            Reason.BAD_TIMESTAMP, "must carry an offset (Z or +hh:mm / -hh:mm)", path
        )
    try:
        dt = _fromisoformat(value)
    except ValueError:
        dt = None  # raised below, outside the handler: the message quotes the value
    if dt is None or dt.tzinfo is None:
        raise RemoteProtocolError(Reason.BAD_TIMESTAMP, TS_DETAIL, path)
    td = dt - _EPOCH
    ms = td.days * 86_400_000 + td.seconds * 1000 + td.microseconds // 1000
    if not MIN_TS_MS <= ms <= MAX_TS_MS:
        raise RemoteProtocolError(Reason.BAD_TIMESTAMP, "timestamp must be within 1970..9999", path)
    return ms


def format_ms(ms: int) -> str:
    """Epoch milliseconds -> RFC 3339 UTC with milliseconds and ``Z``."""
    dt = _EPOCH + timedelta(milliseconds=ms)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def is_valid_ms(value: object) -> bool:
    """True for an int (not bool) within the representable range."""
    return type(value) is int and MIN_TS_MS <= value <= MAX_TS_MS
