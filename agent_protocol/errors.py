"""Exceptions and machine-readable reason codes of the wire protocol.

One root, :class:`ProtocolError`, split by who is at fault:

* :class:`RemoteProtocolError` -- the peer (a device agent, or the server as seen
  from the agent) sent bytes that break the contract. Everything a decoder raises.
* :class:`LocalProtocolError` -- our own code tried to build or encode something
  that breaks the contract. A bug on this side, never the peer's fault.

Privacy rule: ``detail`` never contains a value taken from a payload (it may be an
IMEI, a phone number, coordinates). It names field paths, type names, limits and
allowed values only, so errors can be logged and dead-lettered safely.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "LocalProtocolError",
    "ProtocolError",
    "Reason",
    "RemoteProtocolError",
]


class Reason(StrEnum):
    """Every reason code of the protocol, in one place (values are the wire/log codes)."""

    NOT_JSON = "not_json"
    BAD_ENVELOPE = "bad_envelope"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    OUT_OF_RANGE = "out_of_range"
    BAD_VALUE = "bad_value"
    BAD_TIMESTAMP = "bad_timestamp"
    FUTURE_TIMESTAMP = "future_timestamp"
    TOO_LARGE = "too_large"
    BATCH_TOO_LARGE = "batch_too_large"
    EMPTY_BATCH = "empty_batch"
    BAD_TOPIC = "bad_topic"
    UNKNOWN_KIND = "unknown_kind"
    TOPIC_MISMATCH = "topic_mismatch"
    UNKNOWN_DEVICE = "unknown_device"
    # Other agents' formats (owntracks.py): an encrypted payload that does not open.
    BAD_ENCRYPTION = "bad_encryption"
    # Command verification on the agent (raised as CommandRejected).
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KEY = "unknown_key"
    EXPIRED = "expired"
    REPLAYED_NONCE = "replayed_nonce"
    NOT_FOR_THIS_DEVICE = "not_for_this_device"


class ProtocolError(Exception):
    """Root of all protocol errors.

    ``reason`` is a :class:`Reason` value (a ``str``), ``detail`` human text free of
    payload values, ``path`` the offending field (e.g. ``"records[3].data.lat"``) or
    ``None`` when the message as a whole is at fault.
    """

    reason: str
    detail: str
    path: str | None

    def __init__(self, reason: str, detail: str, path: str | None = None) -> None:
        super().__init__(reason, detail, path)
        self.reason = reason
        self.detail = detail
        self.path = path

    def __str__(self) -> str:
        text = f"{self.reason}: {self.detail}"
        if self.path is not None:
            text += f" (at {self.path})"
        return text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(reason={str(self.reason)!r}, "
            f"detail={self.detail!r}, path={self.path!r})"
        )


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the contract (bad input: dead-letter it)."""


class LocalProtocolError(ProtocolError):
    """Our own code built or tried to encode something that breaks the contract."""
