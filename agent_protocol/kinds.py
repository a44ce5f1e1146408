"""Telemetry kinds and the validation of their ``data`` objects.

Each kind has a table of known fields, each with a small checker function that
returns the cleaned value or raises :class:`RemoteProtocolError`. Validation builds a
NEW dict with known fields only: unknown fields are dropped (data minimisation).
``null`` is treated as "field absent". Booleans are not numbers; integers are
accepted (and converted to float) where a float is expected; NaN and infinities
never pass a range check. Strings must not contain NUL (PostgreSQL rejects it).

Hot path: one dict lookup and one checker call per field, no allocation on success
beyond the result dict, no exceptions unless the input is bad.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final

from agent_protocol._time import parse_ts
from agent_protocol.errors import Reason, RemoteProtocolError

__all__ = [
    "APPS_MAX",
    "FIELD_TYPES",
    "KINDS",
    "REQUIRED_FIELDS",
    "STR_MAX",
    "validate_data",
]

KINDS: tuple[str, ...] = ("location", "identity", "sim", "network", "apps", "checkinout")

STR_MAX: Final = 256  # default cap of free-text fields, in characters
NOTES_MAX: Final = 2000
APPS_MAX: Final = 2000  # entries in an apps inventory
MAX_FUTURE_MS: Final = 24 * 3600 * 1000

LOCATION_SOURCES = ("gps", "network", "fused")
SIM_STATES = ("absent", "ready", "pin_required", "puk_required", "locked", "unknown")
NETWORK_TYPES = ("gsm", "umts", "lte", "nr", "wifi", "none")
CHECKINOUT_EVENTS = ("check_out", "check_in")
SCREEN_CONDITIONS = ("ok", "cracked", "missing")
CASE_CONDITIONS = ("ok", "damaged", "missing")

# (value, path of the enclosing object, field name) -> cleaned value
Checker = Callable[[object, str, str], object]
Validator = Callable[[dict[Any, Any], str, int], dict[str, Any]]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _err(reason: str, detail: str, path: str, name: str) -> RemoteProtocolError:
    return RemoteProtocolError(reason, detail, _join(path, name))


# --- checker factories (called once, at import) -------------------------------------


def _number(lo: float, hi: float) -> Checker:
    detail = f"must be a number in [{lo:g}, {hi:g}]"

    def check(v: object, path: str, name: str) -> object:
        t = type(v)
        if t is float or t is int:
            if lo <= v <= hi:  # type: ignore[operator]  # t is int or float here
                return float(v)  # type: ignore[arg-type]  # t is int or float here
            raise _err(Reason.OUT_OF_RANGE, f"{name} {detail}", path, name)
        raise _err(Reason.WRONG_TYPE, f"{name} {detail}", path, name)

    return check


def _integer(lo: int, hi: int) -> Checker:
    detail = f"must be an integer in [{lo}, {hi}]"

    def check(v: object, path: str, name: str) -> object:
        if type(v) is int:
            if lo <= v <= hi:
                return v
            raise _err(Reason.OUT_OF_RANGE, f"{name} {detail}", path, name)
        raise _err(Reason.WRONG_TYPE, f"{name} {detail}", path, name)

    return check


def _string(max_len: int = STR_MAX) -> Checker:
    detail = f"must be a string of at most {max_len} characters without NUL"

    def check(v: object, path: str, name: str) -> object:
        if type(v) is not str:
            raise _err(Reason.WRONG_TYPE, f"{name} {detail}", path, name)
        if len(v) > max_len or "\x00" in v:
            raise _err(Reason.BAD_VALUE, f"{name} {detail}", path, name)
        return v

    return check


def _pattern(regex: str, what: str, max_len: int) -> Checker:
    fullmatch = re.compile(regex).fullmatch
    detail = f"must be a string of {what}, or empty"

    def check(v: object, path: str, name: str) -> object:
        if type(v) is not str:
            raise _err(Reason.WRONG_TYPE, f"{name} {detail}", path, name)
        if len(v) > max_len or (fullmatch(v) is None and v):
            raise _err(Reason.BAD_VALUE, f"{name} {detail}", path, name)
        return v

    return check


def _enum(values: tuple[str, ...]) -> Checker:
    allowed = frozenset(values)
    detail = f"must be one of {', '.join(values)}"

    def check(v: object, path: str, name: str) -> object:
        if type(v) is not str:
            raise _err(Reason.WRONG_TYPE, f"{name} {detail}", path, name)
        if v not in allowed:
            raise _err(Reason.BAD_VALUE, f"{name} {detail}", path, name)
        return v

    return check


def _boolean(v: object, path: str, name: str) -> object:
    if type(v) is not bool:
        raise _err(Reason.WRONG_TYPE, f"{name} must be a boolean", path, name)
    return v


def _ip(v: object, path: str, name: str) -> object:
    detail = f"{name} must be an IPv4 or IPv6 address string"
    if type(v) is not str:
        raise _err(Reason.WRONG_TYPE, detail, path, name)
    if len(v) <= 64:
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            pass  # raised below, outside the handler: the message quotes the value
    raise _err(Reason.BAD_VALUE, detail, path, name)


def _clean(table: dict[str, Checker], data: dict[Any, Any], path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        check = table.get(key)
        if check is not None and value is not None:
            out[key] = check(value, path, key)
    return out


def _object(table: dict[str, Checker]) -> Checker:
    fields = ", ".join(table)

    def check(v: object, path: str, name: str) -> object:
        if type(v) is not dict:
            raise _err(Reason.WRONG_TYPE, f"{name} must be an object ({fields})", path, name)
        return _clean(table, v, _join(path, name))

    return check


def _required(out: dict[str, Any], names: tuple[str, ...], path: str) -> None:
    for name in names:
        if name not in out:
            raise _err(Reason.MISSING_FIELD, f"{name} is required", path, name)


# --- shared field checkers ------------------------------------------------------------

_MCC = _pattern(r"[0-9]{3}", "3 digits", 3)
_MNC = _pattern(r"[0-9]{2,3}", "2-3 digits", 3)
_MAC = _pattern(r"[0-9A-Fa-f]{2}(?:[:-][0-9A-Fa-f]{2}){5}", "a MAC address (aa:bb:cc:dd:ee:ff)", 17)
_CARRIER = _string(128)
_DBM = _number(-200, 0)

# --- kinds ----------------------------------------------------------------------------

LOCATION: dict[str, Checker] = {
    "lat": _number(-90, 90),
    "lon": _number(-180, 180),
    "accuracy_m": _number(0, 20_000_000),
    "altitude_m": _number(-12_000, 100_000),
    "speed_mps": _number(0, 2_000),
    "heading_deg": _number(0, 360),
    "source": _enum(LOCATION_SOURCES),
}

IDENTITY: dict[str, Checker] = {
    "imei": _pattern(r"[0-9]{14,16}", "14-16 digits", 16),
    "serial": _string(64),
    "wifi_mac": _MAC,
    "bluetooth_mac": _MAC,
    "phone_number": _pattern(
        r"\+?[0-9 ().-]{1,31}", "a phone number (+, digits, space ( ) . -)", 32
    ),
    "device_name": _string(),
    "user_name": _string(),
    "user_email": _string(254),
    "first_name": _string(),
    "last_name": _string(),
    "model": _string(),
    "os": _string(64),
    "os_version": _string(64),
}

SIM: dict[str, Checker] = {
    "state": _enum(SIM_STATES),
    "iccid": _pattern(r"[0-9A-Fa-f]{18,22}", "18-22 digits (hex F padding allowed)", 22),
    "imsi": _pattern(r"[0-9]{6,15}", "6-15 digits", 15),
    "carrier": _CARRIER,
    "mcc": _MCC,
    "mnc": _MNC,
    "roaming": _boolean,
}

NETWORK: dict[str, Checker] = {
    "rssi_dbm": _DBM,
    "rsrp_dbm": _DBM,
    "network_type": _enum(NETWORK_TYPES),
    "cell_id": _integer(0, 2**36 - 1),  # 5G NR cell identity is 36 bits
    "lac": _integer(0, 2**24 - 1),  # LAC is 16 bits, LTE/NR TAC up to 24
    "mcc": _MCC,
    "mnc": _MNC,
    "carrier": _CARRIER,
    "wifi_ssid": _string(64),
    "ip": _ip,
}

APP: dict[str, Checker] = {
    "package": _string(STR_MAX),
    "name": _string(STR_MAX),
    "version": _string(128),
    # installed_at is checked in _validate_apps (it needs "now").
}

CONDITION: dict[str, Checker] = {
    "battery_pct": _number(0, 100),
    "screen": _enum(SCREEN_CONDITIONS),
    "case": _enum(CASE_CONDITIONS),
    "notes": _string(NOTES_MAX),
}

CHECKINOUT: dict[str, Checker] = {
    "event": _enum(CHECKINOUT_EVENTS),
    "user_id": _string(128),
    "shift_id": _string(128),
    "condition": _object(CONDITION),
}

_APP_FIELDS = ", ".join((*APP, "installed_at"))


_LOCATION_KEYS = frozenset(LOCATION)
_LOCATION_SOURCES = frozenset(LOCATION_SOURCES)


def _validate_location(data: dict[Any, Any], path: str, now_ms: int) -> dict[str, Any]:
    # Fast path for the common record: only known fields, every number a float in
    # range, the source one of the enum. The table-driven path below would return
    # a copy of ``data`` for it (same fields, same order, floats unchanged), so the
    # fast path returns that copy; anything else (a null, an int, a wrong type, an
    # unknown field, a missing lat/lon) takes the table-driven path, which decides
    # and words every error. The ranges are those of LOCATION (tests/unit compare).
    if data.keys() <= _LOCATION_KEYS:
        lat = data.get("lat")
        lon = data.get("lon")
        acc = data.get("accuracy_m", 0.0)
        alt = data.get("altitude_m", 0.0)
        speed = data.get("speed_mps", 0.0)
        heading = data.get("heading_deg", 0.0)
        source = data.get("source", "gps")
        if (
            type(lat) is float and -90.0 <= lat <= 90.0
            and type(lon) is float and -180.0 <= lon <= 180.0
            and type(acc) is float and 0.0 <= acc <= 20_000_000.0
            and type(alt) is float and -12_000.0 <= alt <= 100_000.0
            and type(speed) is float and 0.0 <= speed <= 2_000.0
            and type(heading) is float and 0.0 <= heading <= 360.0
            and type(source) is str and source in _LOCATION_SOURCES
        ):  # fmt: skip
            return dict(data)
    out = _clean(LOCATION, data, path)
    if "lat" not in out or "lon" not in out:
        _required(out, ("lat", "lon"), path)
    return out


def _validate_identity(data: dict[Any, Any], path: str, now_ms: int) -> dict[str, Any]:
    return _clean(IDENTITY, data, path)


def _validate_sim(data: dict[Any, Any], path: str, now_ms: int) -> dict[str, Any]:
    return _clean(SIM, data, path)


def _validate_network(data: dict[Any, Any], path: str, now_ms: int) -> dict[str, Any]:
    return _clean(NETWORK, data, path)


def _validate_checkinout(data: dict[Any, Any], path: str, now_ms: int) -> dict[str, Any]:
    out = _clean(CHECKINOUT, data, path)
    if "event" not in out:
        _required(out, ("event",), path)
    return out


def _validate_apps(data: dict[Any, Any], path: str, now_ms: int) -> dict[str, Any]:
    apps = data.get("apps")
    if apps is None:
        return {}
    if type(apps) is not list:
        raise _err(Reason.WRONG_TYPE, "apps must be a list of objects", path, "apps")
    if len(apps) > APPS_MAX:
        raise _err(Reason.OUT_OF_RANGE, f"apps must have at most {APPS_MAX} entries", path, "apps")
    apps_path = _join(path, "apps")
    latest = now_ms + MAX_FUTURE_MS
    cleaned = []
    for i, entry in enumerate(apps):
        if type(entry) is not dict:
            raise RemoteProtocolError(
                Reason.WRONG_TYPE,
                f"apps entries must be objects ({_APP_FIELDS})",
                f"{apps_path}[{i}]",
            )
        entry_path = f"{apps_path}[{i}]"
        app = _clean(APP, entry, entry_path)
        if "package" not in app:
            _required(app, ("package",), entry_path)
        installed = entry.get("installed_at")
        if installed is not None:
            ms = parse_ts(installed, _join(entry_path, "installed_at"))
            if ms > latest:
                raise _err(
                    Reason.FUTURE_TIMESTAMP,
                    "installed_at must not be more than 24 h in the future",
                    entry_path,
                    "installed_at",
                )
            app["installed_at"] = ms
        cleaned.append(app)
    return {"apps": cleaned}


_VALIDATORS: dict[str, Validator] = {
    "location": _validate_location,
    "identity": _validate_identity,
    "sim": _validate_sim,
    "network": _validate_network,
    "apps": _validate_apps,
    "checkinout": _validate_checkinout,
}
assert tuple(_VALIDATORS) == KINDS  # import-time consistency check

# --- public description of the fields (read by privacy_filters; no behaviour here) -----

_FIELD_TYPES: dict[str, dict[str, str]] = {
    "location": {
        "lat": "number", "lon": "number", "accuracy_m": "number", "altitude_m": "number",
        "speed_mps": "number", "heading_deg": "number", "source": "enum",
    },
    "identity": {name: "string" for name in IDENTITY},
    "sim": {
        "state": "enum", "iccid": "string", "imsi": "string", "carrier": "string",
        "mcc": "string", "mnc": "string", "roaming": "boolean",
    },
    "network": {
        "rssi_dbm": "number", "rsrp_dbm": "number", "network_type": "enum",
        "cell_id": "integer", "lac": "integer", "mcc": "string", "mnc": "string",
        "carrier": "string", "wifi_ssid": "string", "ip": "string",
    },
    "apps": {"apps": "list"},
    "checkinout": {
        "event": "enum", "user_id": "string", "shift_id": "string", "condition": "object",
        "condition.battery_pct": "number", "condition.screen": "enum",
        "condition.case": "enum", "condition.notes": "string",
    },
}  # fmt: skip

FIELD_TYPES: Final[Mapping[str, Mapping[str, str]]] = MappingProxyType(
    {kind: MappingProxyType(types) for kind, types in _FIELD_TYPES.items()}
)
"""Per kind, every field the contract knows -> its JSON type.

Types: ``number`` (stored as float), ``integer``, ``string`` (free text or a format
such as digits or a MAC address), ``enum`` (a string from a fixed list), ``boolean``,
``object`` and ``list``. Fields of a nested object appear twice: the object itself
(``condition``) and each of its fields with a dotted path (``condition.notes``).
Entries of the ``apps`` list are not described field by field.
"""

REQUIRED_FIELDS: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {"location": ("lat", "lon"), "checkinout": ("event",)}
)
"""Fields without which a record of the kind is invalid (kinds not listed: none)."""

assert tuple(FIELD_TYPES) == KINDS  # import-time consistency checks
assert set(FIELD_TYPES["location"]) == set(LOCATION)
assert set(FIELD_TYPES["identity"]) == set(IDENTITY)
assert set(FIELD_TYPES["sim"]) == set(SIM)
assert set(FIELD_TYPES["network"]) == set(NETWORK)
assert set(FIELD_TYPES["checkinout"]) == set(CHECKINOUT) | {f"condition.{f}" for f in CONDITION}


def validate_data(
    kind: str, data: object, path: str = "data", *, now_ms: int | None = None
) -> dict[str, Any]:
    """Validate the ``data`` object of one record of ``kind``; return a new, clean dict.

    ``path`` prefixes error paths (e.g. ``"records[3].data"``). ``now_ms`` bounds
    timestamps inside the data (apps ``installed_at``: at most 24 h ahead); it
    defaults to the current time. Raises :class:`RemoteProtocolError`; the error never
    quotes a value from ``data``.
    """
    validator = _VALIDATORS.get(kind) if type(kind) is str else None
    if validator is None:
        raise RemoteProtocolError(Reason.UNKNOWN_KIND, f"kind must be one of {', '.join(KINDS)}")
    if type(data) is not dict:
        raise RemoteProtocolError(Reason.WRONG_TYPE, "data must be an object", path or None)
    if now_ms is None:
        now_ms = time.time_ns() // 1_000_000
    return validator(data, path, now_ms)
