"""OsmAnd / Traccar Client (the "OsmAnd protocol" of Traccar): HTTP requests in,
typed records out.

These apps report a position per HTTP request, GET or POST, in one of these shapes
(docs/agents.md, "OsmAnd / Traccar Client: request mapping", has the full table):

- query parameters (``?id=...&lat=...&lon=...&timestamp=...``): the OsmAnd app, the
  legacy Traccar Clients (which POST with an empty body);
- the same parameters as an ``application/x-www-form-urlencoded`` body, when the
  query has none (Traccar Client SDK);
- a JSON body (``Content-Type: application/json``): the Transistorsoft
  background-geolocation object of Traccar Client 9 (``{"location": {...},
  "device_id": ...}``; ``location`` may also be a list, the plugin's batch form),
  a flat object of the query parameters, or a JSON array of either.

Each position becomes an :class:`OsmAndPoint`: the device id the app sent and the
records to store (a ``location`` record; a ``network`` record per ``cell``
parameter). Bad input raises :class:`RemoteProtocolError` with a reason; the error
never quotes a value from the request.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal
from urllib.parse import parse_qsl

import orjson

from agent_protocol._adapt import build_record, check_window, join, number, position
from agent_protocol.envelope import MAX_BATCH_RECORDS, MAX_PAYLOAD_BYTES, Record
from agent_protocol.errors import LocalProtocolError, Reason, RemoteProtocolError

__all__ = ["SPEED_UNITS", "OsmAndPoint", "SpeedUnit", "decode_osmand"]

SpeedUnit = Literal["knots", "mps"]
SPEED_UNITS: Final = ("knots", "mps")
"""Units of the ``speed`` parameter: Traccar Client sends knots (Traccar's default),
the OsmAnd app m/s. The Transistorsoft JSON body is always m/s."""

MAX_ID_LEN: Final = 128
MAX_FORM_FIELDS: Final = 1000

_KNOT_MPS: Final = 1852 / 3600
_MS_FROM: Final = 2**31 - 1  # Traccar: an epoch at or above Integer.MAX_VALUE is in ms
_ID_PREFIX: Final = "os-"
_ID_NAMES: Final = ("id", "deviceid", "device_id")
# Parameters that carry one value; a second, different value is refused.
_SINGLE: Final = frozenset(
    {*_ID_NAMES, "timestamp", "lat", "lon", "location", "speed", "bearing", "heading",
     "altitude", "accuracy", "hdop"}
)  # fmt: skip
_id_ok = re.compile(rf"[^\x00-\x1f\x7f]{{1,{MAX_ID_LEN}}}").fullmatch
_datetime = re.compile(
    # "+" as the separator: a query string whose "+" the HTTP layer left undecoded.
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt +]([0-9]{2}):([0-9]{2})"
    r"(?::([0-9]{2})(?:[.,]([0-9]{1,9}))?)?"
    r"(Z|z|[+-][0-9]{2}(?::?[0-9]{2})?)?"
).fullmatch
_epoch = re.compile(r"[0-9]{1,16}(?:\.[0-9]{1,9})?").fullmatch
_cell_int = re.compile(r"[0-9]{1,12}").fullmatch
_TS_DETAIL: Final = (
    "timestamp must be epoch seconds or milliseconds, ISO 8601, or yyyy-MM-dd HH:mm:ss (UTC)"
)
_LOCATION_FIELDS: Final = {
    "lat": "lat", "lon": "lon", "accuracy_m": "accuracy", "altitude_m": "altitude",
    "speed_mps": "speed", "heading_deg": "bearing",
}  # fmt: skip
_COORDS_FIELDS: Final = {
    "lat": "coords.latitude", "lon": "coords.longitude", "accuracy_m": "coords.accuracy",
    "altitude_m": "coords.altitude", "speed_mps": "coords.speed",
    "heading_deg": "coords.heading",
}  # fmt: skip
_CELL_DETAIL: Final = "cell must be mcc,mnc,lac,cid[,rssi] (integers; rssi a number)"
_CELL_FIELDS: Final = {"mcc": "", "mnc": "", "lac": "", "cell_id": "", "rssi_dbm": ""}


@dataclass(frozen=True, slots=True)
class OsmAndPoint:
    """One reported position: ``device_id`` is the ``id`` (or ``deviceid``,
    ``device_id``) the app sent, as sent; ``records`` the ``(kind, Record)`` pairs to
    store: the ``location`` (when the app sent coordinates), then a ``network``
    record per ``cell`` parameter, in the order sent."""

    device_id: str
    records: tuple[tuple[str, Record], ...]


def decode_osmand(
    *,
    method: str,
    query: Sequence[tuple[str, str]],
    content_type: str | None,
    body: bytes,
    now_ms: int,
    speed_unit: SpeedUnit,
) -> list[OsmAndPoint]:
    """Decode one OsmAnd-protocol HTTP request.

    ``query`` holds the URL's query parameters, decoded, in order, repeated ones
    repeated (e.g. ``list(request.query.items())``). ``speed_unit`` is the unit of
    ``speed`` in query, form and flat JSON requests (:data:`SPEED_UNITS`).

    A ``Content-Type`` of ``application/json`` with a non-empty body selects the JSON
    forms; otherwise the query parameters, or, when the query has none, the body
    parsed as a form. The method (GET or POST) changes nothing else.

    Returns the points in order (an empty JSON array gives none). Raises
    :class:`RemoteProtocolError`: ``bad_value`` (a method other than GET/POST, a
    parameter given twice with different values, a bad ``id``, a malformed ``cell``
    or ``location``, a form body that is not UTF-8), ``too_large``,
    ``batch_too_large`` (more than 1000 records), ``not_json``, ``bad_envelope``,
    ``missing_field`` (no id, no coordinates), ``wrong_type``, ``out_of_range``,
    ``bad_timestamp``, ``future_timestamp``. One bad point fails the request.
    Raises :class:`LocalProtocolError` for a ``speed_unit`` not in :data:`SPEED_UNITS`.
    """
    if speed_unit not in SPEED_UNITS:
        raise LocalProtocolError(
            Reason.BAD_VALUE, f"speed_unit must be one of {', '.join(SPEED_UNITS)}", "speed_unit"
        )
    if type(method) is not str or method.upper() not in ("GET", "POST"):
        raise RemoteProtocolError(Reason.BAD_VALUE, "method must be GET or POST")
    if len(body) > MAX_PAYLOAD_BYTES:
        raise RemoteProtocolError(
            Reason.TOO_LARGE, f"body must be at most {MAX_PAYLOAD_BYTES} bytes"
        )
    decoder = _Decoder(now_ms, _KNOT_MPS if speed_unit == "knots" else 1.0)
    media = (content_type or "").split(";", 1)[0].strip().lower()
    text = body.strip()
    if media == "application/json" and text:
        points = decoder.json(_loads(text))
    elif query:
        points = [decoder.params(list(query), "")]
    else:
        points = [decoder.params(_form(text), "")]
    if sum(len(p.records) for p in points) > MAX_BATCH_RECORDS:
        raise RemoteProtocolError(
            Reason.BATCH_TOO_LARGE, f"a request must hold at most {MAX_BATCH_RECORDS} records"
        )
    return points


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass  # raised below, outside the handler
    raise RemoteProtocolError(
        Reason.NOT_JSON, "body must be UTF-8 JSON (no NaN/Infinity, finite numbers)"
    )


def _form(body: bytes) -> list[tuple[str, str]]:
    """The body as ``application/x-www-form-urlencoded`` (UTF-8, ``+`` for space)."""
    try:
        return parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict",
                         max_num_fields=MAX_FORM_FIELDS)  # fmt: skip
    except UnicodeDecodeError:  # a ValueError too: first
        reason, detail = Reason.BAD_VALUE, "a form body must be UTF-8, percent-encoded"
    except ValueError:  # more than MAX_FORM_FIELDS
        reason, detail = Reason.TOO_LARGE, f"a form must hold at most {MAX_FORM_FIELDS} fields"
    raise RemoteProtocolError(reason, detail)


def _timestamp(value: object, path: str, now_ms: int) -> int:
    """Epoch seconds or milliseconds (a number, or digits in a string), ISO 8601 or
    ``yyyy-MM-dd HH:mm:ss`` (no zone: UTC); None or "" -> now."""
    p = join(path, "timestamp")
    if value is None or value == "":
        return now_ms
    epoch: float
    if isinstance(value, str):
        if _epoch(value) is None:
            return check_window(_datetime_ms(value, p), now_ms, path, "timestamp")
        epoch = float(value) if "." in value else int(value)
    elif type(value) is int or type(value) is float:
        epoch = value
    else:
        raise RemoteProtocolError(Reason.WRONG_TYPE, _TS_DETAIL, p)
    if epoch <= 0:
        raise RemoteProtocolError(Reason.BAD_TIMESTAMP, "timestamp must be after 1970", p)
    if epoch >= 10**16:
        raise RemoteProtocolError(
            Reason.FUTURE_TIMESTAMP, "timestamp must not be more than 24 h in the future", p
        )
    ms = int(epoch) if epoch >= _MS_FROM else int(epoch * 1000)
    return check_window(ms, now_ms, path, "timestamp")


def _datetime_ms(s: str, p: str) -> int:
    m = _datetime(s)
    if m is None:
        raise RemoteProtocolError(Reason.BAD_TIMESTAMP, _TS_DETAIL, p)
    year, month, day, hour, minute, second, fraction, zone = m.groups()
    try:
        dt = datetime(int(year), int(month), int(day), int(hour), int(minute),
                      int(second or 0), tzinfo=UTC)  # fmt: skip
    except ValueError:
        dt = None  # raised below, outside the handler: the message quotes the value
    if dt is None:
        raise RemoteProtocolError(Reason.BAD_TIMESTAMP, _TS_DETAIL, p)
    ms = int(dt.timestamp()) * 1000 + int((fraction or "0")[:3].ljust(3, "0"))
    if zone and zone not in "Zz":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        offset_min = int(digits[:2]) * 60 + int(digits[2:] or 0)
        if offset_min > 18 * 60:
            raise RemoteProtocolError(Reason.BAD_TIMESTAMP, _TS_DETAIL, p)
        ms -= sign * offset_min * 60_000
    return ms


def _device_id(value: object, path: str, name: str) -> str | None:
    if value is None or value == "":
        return None
    if type(value) is int:
        value = str(value)
    if not isinstance(value, str):
        raise RemoteProtocolError(Reason.WRONG_TYPE, f"{name} must be a string", join(path, name))
    if _id_ok(value) is None:
        raise RemoteProtocolError(
            Reason.BAD_VALUE,
            f"{name} must be 1-{MAX_ID_LEN} characters without control characters",
            join(path, name),
        )
    return value


class _Decoder:
    __slots__ = ("now_ms", "speed_factor")

    def __init__(self, now_ms: int, speed_factor: float) -> None:
        self.now_ms = now_ms
        self.speed_factor = speed_factor

    def json(self, obj: Any) -> list[OsmAndPoint]:
        if type(obj) is dict:
            return self.json_object(obj, "")
        if type(obj) is not list:
            raise RemoteProtocolError(
                Reason.BAD_ENVELOPE, "body must be a JSON object or an array of objects"
            )
        if len(obj) > MAX_BATCH_RECORDS:
            raise RemoteProtocolError(
                Reason.BATCH_TOO_LARGE, f"an array must hold at most {MAX_BATCH_RECORDS} positions"
            )
        out: list[OsmAndPoint] = []
        for i, item in enumerate(obj):
            if type(item) is not dict:
                raise RemoteProtocolError(
                    Reason.BAD_ENVELOPE, "each array entry must be an object", f"[{i}]"
                )
            out += self.json_object(item, f"[{i}]")
        return out

    def json_object(self, obj: dict[str, Any], path: str) -> list[OsmAndPoint]:
        if "location" not in obj or type(obj["location"]) is str:
            # A flat object of the query parameters ("location" as "lat,lon").
            pairs: list[tuple[str, object]] = []
            for key, value in obj.items():
                if key == "cell" and type(value) is list:
                    pairs += (("cell", v) for v in value)
                else:
                    pairs.append((key, value))
            return [self.params(pairs, path)]
        # Transistorsoft background-geolocation: {"location": {...} or [...], "device_id"}
        device_id = _device_id(obj.get("device_id"), path, "device_id")
        if device_id is None:
            raise RemoteProtocolError(
                Reason.MISSING_FIELD, "device_id is required", join(path, "device_id")
            )
        loc = obj["location"]
        loc_path = join(path, "location")
        if type(loc) is dict:
            return [self.transistorsoft(loc, loc_path, device_id)]
        if type(loc) is not list:
            raise RemoteProtocolError(
                Reason.WRONG_TYPE, "location must be an object or a list of objects", loc_path
            )
        if len(loc) > MAX_BATCH_RECORDS:
            raise RemoteProtocolError(
                Reason.BATCH_TOO_LARGE, f"location must hold at most {MAX_BATCH_RECORDS} entries",
                loc_path,
            )
        out = []
        for i, entry in enumerate(loc):
            entry_path = f"{loc_path}[{i}]"
            if type(entry) is not dict:
                raise RemoteProtocolError(
                    Reason.WRONG_TYPE, "location must hold objects", entry_path
                )
            out.append(self.transistorsoft(entry, entry_path, device_id))
        return out

    def transistorsoft(self, loc: dict[str, Any], path: str, device_id: str) -> OsmAndPoint:
        coords = loc.get("coords")
        coords_path = join(path, "coords")
        if coords is None:
            raise RemoteProtocolError(Reason.MISSING_FIELD, "coords is required", coords_path)
        if type(coords) is not dict:
            raise RemoteProtocolError(Reason.WRONG_TYPE, "coords must be an object", coords_path)
        lat = number(coords.get("latitude"), coords_path, "latitude")
        lon = number(coords.get("longitude"), coords_path, "longitude")
        data = position(lat, lon, coords_path, ("latitude", "longitude"))
        # -1 is the plugin's "unknown" for speed, heading and the accuracies.
        acc = number(coords.get("accuracy"), coords_path, "accuracy")
        if acc is not None and acc > 0:
            data["accuracy_m"] = acc
        alt = number(coords.get("altitude"), coords_path, "altitude")
        if alt is not None:
            data["altitude_m"] = alt
        speed = number(coords.get("speed"), coords_path, "speed")
        if speed is not None and speed >= 0:
            data["speed_mps"] = speed  # m/s, whatever speed_unit says
        heading = number(coords.get("heading"), coords_path, "heading")
        if heading is not None and heading >= 0:
            data["heading_deg"] = heading
        ts_ms = _timestamp(loc.get("timestamp"), path, self.now_ms)
        record = build_record("location", ts_ms, data, sources=_COORDS_FIELDS, path=path,
                              now_ms=self.now_ms, id_prefix=_ID_PREFIX)  # fmt: skip
        return OsmAndPoint(device_id, (record,))

    def params(self, pairs: Sequence[tuple[str, object]], path: str) -> OsmAndPoint:
        single: dict[str, object] = {}
        cells: list[object] = []
        for name, value in pairs:
            if name == "cell":
                cells.append(value)
            elif name in _SINGLE:
                if name in single and single[name] != value:
                    raise RemoteProtocolError(
                        Reason.BAD_VALUE, f"{name} is given more than once, with different values",
                        join(path, name),
                    )
                single[name] = value
        device_id = None
        for name in _ID_NAMES:
            this = _device_id(single.get(name), path, name)
            if this is None:
                continue
            if device_id is not None and this != device_id:
                raise RemoteProtocolError(
                    Reason.BAD_VALUE, "id, deviceid and device_id must agree", join(path, name)
                )
            device_id = this
        if device_id is None:
            raise RemoteProtocolError(Reason.MISSING_FIELD, "id is required", join(path, "id"))
        ts_ms = _timestamp(single.get("timestamp"), path, self.now_ms)
        records = []
        location = self.location(single, path)
        if location is not None:
            records.append(
                build_record("location", ts_ms, location, sources=_LOCATION_FIELDS, path=path,
                             now_ms=self.now_ms, id_prefix=_ID_PREFIX)
            )  # fmt: skip
        for i, cell in enumerate(cells):
            cell_path = join(path, f"cell[{i}]") if len(cells) > 1 else join(path, "cell")
            record = build_record("network", ts_ms, _cell(cell, cell_path), sources=_CELL_FIELDS,
                                  path=cell_path, now_ms=self.now_ms, id_prefix=_ID_PREFIX)
            if record not in records:  # the same cell twice: stored once anyway
                records.append(record)
        if not records:
            raise RemoteProtocolError(
                Reason.MISSING_FIELD, "lat and lon (or location, or a cell) are required",
                join(path, "lat"),
            )
        return OsmAndPoint(device_id, tuple(records))

    def location(self, single: dict[str, object], path: str) -> dict[str, Any] | None:
        lat = number(single.get("lat"), path, "lat")
        lon = number(single.get("lon"), path, "lon")
        if lat is None and lon is None:
            combined = single.get("location")
            if combined is None or combined == "":
                return None
            parts = combined.split(",") if type(combined) is str else []
            if len(parts) != 2:
                raise RemoteProtocolError(
                    Reason.BAD_VALUE, "location must be lat,lon", join(path, "location")
                )
            lat = number(parts[0], path, "location")
            lon = number(parts[1], path, "location")
        data = position(lat, lon, path)
        # Accuracy 0.0 is the legacy Android client's "unknown" (GPS fixes); negative
        # values are nobody's real accuracy. The OsmAnd app sends accuracy as "hdop".
        acc = number(single.get("accuracy"), path, "accuracy")
        if acc is None:
            acc = number(single.get("hdop"), path, "hdop")
        if acc is not None and acc > 0:
            data["accuracy_m"] = acc
        alt = number(single.get("altitude"), path, "altitude")
        if alt is not None:
            data["altitude_m"] = alt
        speed = number(single.get("speed"), path, "speed")
        if speed is not None and speed >= 0:
            data["speed_mps"] = speed * self.speed_factor
        heading = number(single.get("bearing"), path, "bearing")
        if heading is None:
            heading = number(single.get("heading"), path, "heading")
        if heading is not None and heading >= 0:
            data["heading_deg"] = heading
        return data


def _cell(value: object, path: str) -> dict[str, Any]:
    """``mcc,mnc,lac,cid[,rssi]`` (Traccar's ``cell`` parameter) -> network data."""
    parts = value.split(",") if type(value) is str else []
    if len(parts) not in (4, 5) or not all(_cell_int(x) for x in parts[:4]):
        raise RemoteProtocolError(Reason.BAD_VALUE, _CELL_DETAIL, path)
    data: dict[str, Any] = {
        "mcc": parts[0], "mnc": parts[1], "lac": int(parts[2]), "cell_id": int(parts[3]),
    }  # fmt: skip
    if len(parts) == 5 and parts[4]:
        try:
            data["rssi_dbm"] = number(parts[4], "", "rssi")
        except RemoteProtocolError:
            rssi_ok = False
        else:
            rssi_ok = True
        if not rssi_ok:
            raise RemoteProtocolError(Reason.BAD_VALUE, _CELL_DETAIL, path)
    return data
