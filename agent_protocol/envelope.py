"""The telemetry envelope: bytes <-> records.

Single form ``{"v": 1, "id", "ts", "data"}`` or batch form
``{"v": 1, "records": [{"id", "ts", "data"}, ...]}`` (1..1000 records), at most
256 KiB. Optional envelope fields ``device`` and ``kind`` (protocol extension) must
equal the topic's when present. Unknown envelope fields are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from agent_protocol._time import MAX_TS_MS, MIN_TS_MS, format_ms, is_valid_ms, parse_ts
from agent_protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from agent_protocol.kinds import KINDS, validate_data
from agent_protocol.topics import Topic, is_valid_id

__all__ = [
    "MAX_AGE_MS",
    "MAX_BATCH_RECORDS",
    "MAX_FUTURE_MS",
    "MAX_ID_LEN",
    "MAX_PAYLOAD_BYTES",
    "PROTOCOL_VERSION",
    "Record",
    "RecordTuple",
    "decode_records",
    "decode_telemetry",
    "encode_telemetry",
]

PROTOCOL_VERSION: Final = 1
MAX_PAYLOAD_BYTES: Final = 256 * 1024
MAX_BATCH_RECORDS: Final = 1000
MAX_FUTURE_MS: Final = 24 * 3600 * 1000
MAX_AGE_MS: Final = 400 * 24 * 3600 * 1000
MAX_ID_LEN: Final = 64

_ID_DETAIL = f"id must be a non-empty string of at most {MAX_ID_LEN} characters without NUL"
_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError


@dataclass(frozen=True, slots=True)
class Record:
    """One telemetry record: ``ts_ms`` is integer epoch milliseconds (UTC)."""

    id: str
    ts_ms: int
    data: dict[str, Any]

    def __post_init__(self) -> None:
        i = self.id
        if type(i) is not str or not 0 < len(i) <= MAX_ID_LEN or "\x00" in i:
            raise LocalProtocolError(Reason.BAD_VALUE, _ID_DETAIL, "id")
        if not is_valid_ms(self.ts_ms):
            raise LocalProtocolError(
                Reason.BAD_TIMESTAMP, "ts_ms must be an int of epoch milliseconds >= 0", "ts_ms"
            )
        if type(self.data) is not dict:
            raise LocalProtocolError(Reason.WRONG_TYPE, "data must be a dict", "data")


# (id, ts_ms, data) of one record, as decode_records returns it.
RecordTuple = tuple[str, int, dict[str, Any]]


def _decode_record(
    obj: dict[Any, Any], path: str, kind: str, now_ms: int, earliest: int, latest: int
) -> RecordTuple:
    """Validate one record object (``path`` is "" for the single form)."""
    rid = obj.get("id")
    if type(rid) is not str or not 0 < len(rid) <= MAX_ID_LEN or "\x00" in rid:
        p = f"{path}.id" if path else "id"
        if rid is None:
            raise RemoteProtocolError(Reason.MISSING_FIELD, "id is required", p)
        reason = Reason.WRONG_TYPE if type(rid) is not str else Reason.BAD_VALUE
        raise RemoteProtocolError(reason, _ID_DETAIL, p)
    ts = obj.get("ts")
    if ts is None:
        raise RemoteProtocolError(
            Reason.MISSING_FIELD, "ts is required", f"{path}.ts" if path else "ts"
        )
    ts_ms = ts if type(ts) is int and earliest <= ts <= latest else None
    if ts_ms is None:
        ts_ms = parse_ts(ts, f"{path}.ts" if path else "ts")
        if ts_ms > latest:
            raise RemoteProtocolError(
                Reason.FUTURE_TIMESTAMP,
                "ts must not be more than 24 h in the future",
                f"{path}.ts" if path else "ts",
            )
        if ts_ms < earliest:
            raise RemoteProtocolError(
                Reason.BAD_TIMESTAMP,
                f"ts must not be older than {MAX_AGE_MS // 86_400_000} days",
                f"{path}.ts" if path else "ts",
            )
    data = obj.get("data")
    data_path = f"{path}.data" if path else "data"
    if data is None:
        raise RemoteProtocolError(Reason.MISSING_FIELD, "data is required", data_path)
    return (rid, ts_ms, validate_data(kind, data, data_path, now_ms=now_ms))


def decode_telemetry(topic: Topic, payload: bytes, *, now_ms: int) -> list[Record]:
    """Decode and validate a telemetry message received on ``topic``.

    Returns the records in message order, each ``data`` a new dict of known fields
    only. Raises :class:`RemoteProtocolError` for any bad input; the first bad record
    fails the whole message and the error path names it (``records[3].data.lat``).
    Raises :class:`LocalProtocolError` if ``topic`` is not a telemetry topic.
    """
    return [Record(rid, ts_ms, data) for rid, ts_ms, data in
            decode_records(topic, payload, now_ms=now_ms)]


def decode_records(topic: Topic, payload: bytes, *, now_ms: int) -> list[RecordTuple]:
    """:func:`decode_telemetry` for a hot path: the same checks, the same errors, the
    records as ``(id, ts_ms, data)`` tuples instead of :class:`Record` objects."""
    kind = topic.kind
    if topic.channel != "telemetry" or kind is None:
        raise LocalProtocolError(Reason.BAD_TOPIC, "decode_telemetry needs a telemetry topic")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise RemoteProtocolError(
            Reason.TOO_LARGE, f"payload must be at most {MAX_PAYLOAD_BYTES} bytes"
        )
    try:
        obj = _loads(payload)
    except _JSONDecodeError:
        obj = _JSONDecodeError  # sentinel; raised below, outside the handler
    if obj is _JSONDecodeError:
        raise RemoteProtocolError(
            Reason.NOT_JSON, "payload must be UTF-8 JSON (no NaN/Infinity, finite numbers)"
        )
    if type(obj) is not dict:
        raise RemoteProtocolError(Reason.BAD_ENVELOPE, "envelope must be a JSON object")
    v = obj.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            Reason.BAD_ENVELOPE, f"v must be the integer {PROTOCOL_VERSION}", "v"
        )
    device = obj.get("device")
    if device is not None and device != topic.device:
        if type(device) is not str:
            raise RemoteProtocolError(Reason.WRONG_TYPE, "device must be a string", "device")
        raise RemoteProtocolError(
            Reason.TOPIC_MISMATCH, "device must equal the topic's device", "device"
        )
    env_kind = obj.get("kind")
    if env_kind is not None and env_kind != kind:
        if type(env_kind) is not str:
            raise RemoteProtocolError(Reason.WRONG_TYPE, "kind must be a string", "kind")
        raise RemoteProtocolError(Reason.TOPIC_MISMATCH, "kind must equal the topic's kind", "kind")
    earliest = now_ms - MAX_AGE_MS
    latest = now_ms + MAX_FUTURE_MS
    records = obj.get("records")
    if records is None:
        if "records" in obj:
            raise RemoteProtocolError(Reason.BAD_ENVELOPE, "records must be a list", "records")
        one = _decode_record(obj, "", kind, now_ms, earliest, latest)
        if earliest < MIN_TS_MS or latest > MAX_TS_MS:
            Record(*one)  # see below
        return [one]
    if "id" in obj or "ts" in obj or "data" in obj:
        raise RemoteProtocolError(
            Reason.BAD_ENVELOPE, "envelope must have either records or id/ts/data, not both"
        )
    if type(records) is not list:
        raise RemoteProtocolError(Reason.BAD_ENVELOPE, "records must be a list", "records")
    n = len(records)
    if n == 0:
        raise RemoteProtocolError(Reason.EMPTY_BATCH, "records must not be empty", "records")
    if n > MAX_BATCH_RECORDS:
        raise RemoteProtocolError(
            Reason.BATCH_TOO_LARGE,
            f"records must hold at most {MAX_BATCH_RECORDS} records",
            "records",
        )
    # With a now_ms within MAX_AGE_MS of either end of the representable range, an
    # integer ts can pass the window check yet not be a valid time: Record refuses
    # it then, with its own error, as when decode_telemetry built each Record here.
    check = earliest < MIN_TS_MS or latest > MAX_TS_MS
    out = []
    for i, rec in enumerate(records):
        if type(rec) is not dict:
            raise RemoteProtocolError(
                Reason.BAD_ENVELOPE, "each record must be an object", f"records[{i}]"
            )
        one = _decode_record(rec, f"records[{i}]", kind, now_ms, earliest, latest)
        if check:
            Record(*one)
        out.append(one)
    return out


def _record_obj(rec: Record) -> dict[str, Any]:
    return {"id": rec.id, "ts": format_ms(rec.ts_ms), "data": rec.data}


def encode_telemetry(
    records: Sequence[Record], *, device: str | None = None, kind: str | None = None
) -> bytes:
    """Encode records: one -> single form, several -> batch form.

    ``device`` and ``kind``, when given, are written into the envelope (they must
    then match the topic the message is published on). When ``kind`` is given, each
    record's data is validated for that kind too. Raises :class:`LocalProtocolError`.
    ``ts`` is written as RFC 3339 UTC with milliseconds and ``Z``.
    """
    n = len(records)
    if n == 0:
        raise LocalProtocolError(Reason.EMPTY_BATCH, "need at least one record", "records")
    if n > MAX_BATCH_RECORDS:
        raise LocalProtocolError(
            Reason.BATCH_TOO_LARGE, f"at most {MAX_BATCH_RECORDS} records", "records"
        )
    for i, rec in enumerate(records):
        if not isinstance(rec, Record):
            raise LocalProtocolError(Reason.WRONG_TYPE, "records must be Record", f"records[{i}]")
    if device is not None and not is_valid_id(device):
        raise LocalProtocolError(
            Reason.BAD_VALUE, "device must be 1-64 characters of [A-Za-z0-9_-]", "device"
        )
    if kind is not None:
        if kind not in KINDS:
            raise LocalProtocolError(
                Reason.UNKNOWN_KIND, f"kind must be one of {', '.join(KINDS)}", "kind"
            )
        for i, rec in enumerate(records):
            path = "data" if n == 1 else f"records[{i}].data"
            try:
                validate_data(kind, rec.data, path)
            except RemoteProtocolError as exc:
                raise LocalProtocolError(exc.reason, exc.detail, exc.path) from None
    env: dict[str, Any] = {"v": PROTOCOL_VERSION}
    if device is not None:
        env["device"] = device
    if kind is not None:
        env["kind"] = kind
    if n == 1:
        env.update(_record_obj(records[0]))
    else:
        env["records"] = [_record_obj(r) for r in records]
    try:
        payload = orjson.dumps(env)
    except orjson.JSONEncodeError:
        payload = None  # raised below, outside the handler
    if payload is None:
        raise LocalProtocolError(Reason.WRONG_TYPE, "data must be JSON-serialisable (str keys)")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise LocalProtocolError(
            Reason.TOO_LARGE, f"encoded payload exceeds {MAX_PAYLOAD_BYTES} bytes"
        )
    return payload
