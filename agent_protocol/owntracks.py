"""OwnTracks (iOS and Android apps; MQTT and HTTP mode): bytes in, typed records out.

The apps publish JSON objects with a ``_type`` on ``owntracks/{user}/{device}[/{sub}]``
(MQTT) or POST the same JSON, sometimes an array of it (HTTP). This module maps them
onto the contract's kinds (docs/agents.md, "OwnTracks: message mapping", has the full
table): a ``location`` becomes a ``location`` record and, when the app said how it is
connected, a ``network`` record; ``lwt`` says the device went offline; a ``transition``
is a region enter/leave event and, where it has a position, a ``location`` record;
everything else the apps send (cards, waypoints,
commands, steps, beacons, configuration dumps, tour requests, types we do not know)
is returned flagged ``ignored``, never an error.

Encrypted payloads (``{"_type": "encrypted", "data": ...}``) are opened with
libsodium's secretbox (XSalsa20-Poly1305), as the apps seal them: ``data`` is base64 of
nonce (24 bytes) || MAC (16) || ciphertext, and the key is the UTF-8 passphrase
zero-padded or truncated to 32 bytes.

Bad input raises :class:`RemoteProtocolError` with a reason; the error never quotes a
value from the payload or the topic.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple

import nacl.exceptions
import nacl.secret
import orjson

from agent_protocol._adapt import build_record, check_window, join, number, position
from agent_protocol.envelope import MAX_BATCH_RECORDS, MAX_PAYLOAD_BYTES, Record
from agent_protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from agent_protocol.kinds import LOCATION_SOURCES

__all__ = [
    "IGNORED_TYPES",
    "MESSAGE_TYPES",
    "OWNTRACKS_FILTER",
    "SUBTOPICS",
    "TRIGGERS",
    "OwnTracksMessage",
    "OwnTracksTopic",
    "OwnTracksTransition",
    "decode_owntracks",
    "parse_owntracks_topic",
]

SUBTOPICS: Final = (
    "event", "info", "status", "waypoint", "waypoints", "step", "cmd", "dump", "beacon",
    "request", "lwt",
)  # fmt: skip
"""Levels the apps (and the Recorder's conventions) use below ``owntracks/{user}/{device}``."""

OWNTRACKS_FILTER: Final = "owntracks/+/+/#"
"""MQTT filter for every OwnTracks topic (``#`` also matches the base topic itself)."""

IGNORED_TYPES: Final = frozenset(
    {"card", "waypoint", "waypoints", "cmd", "steps", "beacon", "dump", "request",
     "configuration"}
)  # fmt: skip
"""``_type`` values the server has no use for: returned with ``ignored=True``."""

MESSAGE_TYPES: Final = ("location", "lwt", "transition", "status", *sorted(IGNORED_TYPES),
                        "unknown")  # fmt: skip
"""Every value of :attr:`OwnTracksMessage.type` (a ``_type`` we do not know, or none,
is ``"unknown"``: the value sent is never passed on, so it cannot flood a metric)."""

TRIGGERS: Final = frozenset("pcCbrutvme")
"""A location's ``t`` values the apps document (FORMAT.md of the corpus, section 4)."""

MAX_LEVEL_LEN: Final = 129  # "{tenant}.{device}" as a user name: 64 + 1 + 64
_level = re.compile(rf"[A-Za-z0-9_.@-]{{1,{MAX_LEVEL_LEN}}}").fullmatch
_LEVEL_DETAIL = f"must be 1-{MAX_LEVEL_LEN} characters of [A-Za-z0-9_.@-]"

# Greenwich hardware trackers publish CSV, which the OwnTracks Recorder converts to a
# location (recorder.c csv_to_json): tid, hex epoch seconds, trigger, lat*1e6, lon*1e6,
# cog/10, vel (km/h), alt/10, dist, trip/1000. Only these exact shapes are taken.
_greenwich = re.compile(
    rb"([A-Za-z0-9]{1,16}),([0-9A-Fa-f]{1,12}),([A-Za-z0-9]),([0-9]{1,12}),([0-9]{1,12}),"
    rb"([0-9]{1,6}),([0-9]{1,6}),([0-9]{1,8}),[0-9]{1,12},[0-9]{1,12}"
).fullmatch

_KMH_TO_MPS: Final = 1 / 3.6
_NONCE_AND_MAC: Final = 24 + 16
_LOCATION_SOURCES = frozenset(LOCATION_SOURCES)
_KNOWN_TYPES = frozenset(MESSAGE_TYPES)
_CONN_TYPES: Final = {"w": "wifi", "o": "none"}  # "m" (mobile): no generation given
_LOCATION_FIELDS: Final = {
    "lat": "lat", "lon": "lon", "accuracy_m": "acc", "altitude_m": "alt",
    "speed_mps": "vel", "heading_deg": "cog", "source": "source",
}  # fmt: skip
_NETWORK_FIELDS: Final = {"wifi_ssid": "SSID", "network_type": "conn"}
_TRANSITION_FIELDS: Final = {"lat": "lat", "lon": "lon", "accuracy_m": "acc"}
_ID_PREFIX: Final = "ot-"
_LABEL_MAX: Final = 256
_SSID_MAX: Final = 64


class OwnTracksTopic(NamedTuple):
    """``owntracks/{user}/{device}[/{subtopic}]``, parsed."""

    user: str
    device: str
    subtopic: str | None


@dataclass(frozen=True, slots=True)
class OwnTracksTransition:
    """A region enter/leave the app detected (``_type: transition``).

    ``lat``/``lon`` are where the device was (None when the app sent 0, 0, as
    iBeacon transitions do); ``desc`` is the region's name and ``rid`` its id (iOS
    only), both as the user named them on the phone; ``tid`` the tracker id.
    """

    event: Literal["enter", "leave"]
    ts_ms: int
    lat: float | None
    lon: float | None
    accuracy_m: float | None
    desc: str | None
    rid: str | None
    tid: str | None


@dataclass(frozen=True, slots=True)
class OwnTracksMessage:
    """One decoded OwnTracks message.

    - ``type``: the ``_type`` (of the plaintext, for an encrypted one), one of
      :data:`MESSAGE_TYPES`; ``"unknown"`` for a type we do not know or none.
    - ``records``: ``(kind, Record)`` pairs to store, validated for their kind: for
      a ``location``, a ``location`` record and, when the app sent its Wi-Fi name or
      connection type, a ``network`` record (with another id). Empty otherwise.
    - ``online``: ``False`` for ``lwt`` (the broker published the app's will: it is
      gone). ``None`` for every other type, ``status`` included: nothing in the
      apps' status messages says online or offline. That a message arrived at all
      is the sign of life (as in the OwnTracks Recorder); that is the server's call.
    - ``transition``: set for ``transition`` messages.
    - ``ignored``: True for the types the server has no use for
      (:data:`IGNORED_TYPES`, unknown types) and for everything on the ``cmd``
      subtopic (messages *to* the device): count them, store nothing.
    - ``topic``: the ``topic`` field HTTP-mode bodies carry
      (``owntracks/{user}/{device}``), as sent, or None.
    - ``trigger``: a location's ``t`` (what made the app send it) when it is one of
      :data:`TRIGGERS`, else None; ``"r"`` answers the server's ``reportLocation``.
    """

    type: str
    records: tuple[tuple[str, Record], ...] = ()
    online: bool | None = None
    transition: OwnTracksTransition | None = None
    ignored: bool = False
    topic: str | None = None
    trigger: str | None = None


def _bad_topic(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(Reason.BAD_TOPIC, detail)


def parse_owntracks_topic(topic: str) -> OwnTracksTopic:
    """Parse ``owntracks/{user}/{device}[/{subtopic}]`` (subtopic one of
    :data:`SUBTOPICS`). Raises :class:`RemoteProtocolError` ``bad_topic``, never
    quoting the topic."""
    if type(topic) is not str:
        raise _bad_topic("topic must be a string")
    parts = topic.split("/")
    n = len(parts)
    if n not in (3, 4) or parts[0] != "owntracks":
        raise _bad_topic("topic must be owntracks/{user}/{device}[/{subtopic}]")
    if _level(parts[1]) is None:
        raise _bad_topic(f"user {_LEVEL_DETAIL}")
    if _level(parts[2]) is None:
        raise _bad_topic(f"device {_LEVEL_DETAIL}")
    if n == 3:
        return OwnTracksTopic(parts[1], parts[2], None)
    if parts[3] not in SUBTOPICS:
        raise _bad_topic(f"subtopic must be one of {', '.join(SUBTOPICS)}")
    return OwnTracksTopic(parts[1], parts[2], parts[3])


def decode_owntracks(
    payload: bytes, *, subtopic: str | None, now_ms: int, secret: bytes | None = None
) -> list[OwnTracksMessage]:
    """Decode one OwnTracks MQTT payload or HTTP body.

    ``subtopic`` is the topic's level after the device (None for the base topic and
    for HTTP). ``secret`` is the device's encryption passphrase (UTF-8), if any.

    Returns the messages in order: a JSON object gives one, an array one per element;
    an empty body (the apps publish one for a deleted friend), whitespace, ``null``,
    ``{}`` and ``[]`` give none. Raises :class:`RemoteProtocolError`: ``too_large``,
    ``batch_too_large``, ``not_json``, ``bad_envelope`` (not an object or an array of
    objects), ``bad_encryption`` (encrypted but no secret, or it does not open), and
    for a location, lwt or transition the reason of its first bad field
    (``missing_field``, ``wrong_type``, ``out_of_range``, ``bad_value``,
    ``bad_timestamp``, ``future_timestamp``). One bad message fails the whole payload.
    Raises :class:`LocalProtocolError` for a ``subtopic`` not in :data:`SUBTOPICS`.
    """
    if subtopic is not None and subtopic not in SUBTOPICS:
        raise LocalProtocolError(
            Reason.BAD_TOPIC, f"subtopic must be None or one of {', '.join(SUBTOPICS)}"
        )
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise RemoteProtocolError(
            Reason.TOO_LARGE, f"payload must be at most {MAX_PAYLOAD_BYTES} bytes"
        )
    body = payload.strip()
    if not body:
        return []
    csv = _greenwich(body)
    if csv is not None:
        obj: Any = _from_greenwich(csv)
    else:
        obj = _loads(body, "")
    return _Decoder(now_ms, secret, to_device=subtopic == "cmd").value(obj, "", False)


def _loads(data: bytes, path: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass  # raised below, outside the handler
    raise RemoteProtocolError(
        Reason.NOT_JSON, "payload must be UTF-8 JSON (no NaN/Infinity, finite numbers)",
        path or None,
    )


def _from_greenwich(m: re.Match[bytes]) -> dict[str, Any]:
    tid, tst, trigger, lat, lon, cog, vel, alt = (g.decode("ascii") for g in m.groups())
    return {
        "_type": "location", "tid": tid, "t": trigger, "tst": int(tst, 16),
        "lat": int(lat) / 1e6, "lon": int(lon) / 1e6, "cog": int(cog) * 10,
        "vel": int(vel), "alt": int(alt) * 10,
    }  # fmt: skip


class _Decoder:
    __slots__ = ("now_ms", "secret", "to_device")

    def __init__(self, now_ms: int, secret: bytes | None, *, to_device: bool) -> None:
        self.now_ms = now_ms
        self.secret = secret
        self.to_device = to_device

    def value(self, obj: Any, path: str, decrypted: bool) -> list[OwnTracksMessage]:
        if obj is None:
            return []
        if type(obj) is dict:
            return self.message(obj, path, decrypted)
        if type(obj) is not list:
            raise RemoteProtocolError(
                Reason.BAD_ENVELOPE, "payload must be a JSON object or an array of objects",
                path or None,
            )
        if len(obj) > MAX_BATCH_RECORDS:
            raise RemoteProtocolError(
                Reason.BATCH_TOO_LARGE, f"an array must hold at most {MAX_BATCH_RECORDS} messages",
                path or None,
            )
        out: list[OwnTracksMessage] = []
        for i, item in enumerate(obj):
            item_path = join(path, f"[{i}]")
            if type(item) is not dict:
                raise RemoteProtocolError(
                    Reason.BAD_ENVELOPE, "each message must be an object", item_path
                )
            out += self.message(item, item_path, decrypted)
        return out

    def message(self, obj: dict[str, Any], path: str, decrypted: bool) -> list[OwnTracksMessage]:
        if not obj:
            return []
        t = obj.get("_type")
        if t == "encrypted":
            if decrypted:
                raise RemoteProtocolError(
                    Reason.BAD_ENCRYPTION, "an encrypted payload must not hold another",
                    join(path, "_type"),
                )
            plaintext = self.open(obj, path)
            return self.value(_loads(plaintext, join(path, "data")), path, True)
        kind = t if type(t) is str and t in _KNOWN_TYPES else "unknown"
        topic = obj.get("topic")
        topic = topic if type(topic) is str else None
        if self.to_device or kind in IGNORED_TYPES or kind == "unknown":
            return [OwnTracksMessage(kind, ignored=True, topic=topic)]
        if kind == "location":
            records = self.location(obj, path)
            t = obj.get("t")
            return [OwnTracksMessage(kind, records=records, topic=topic,
                                     trigger=t if type(t) is str and t in TRIGGERS else None)]
        if kind == "lwt":
            _tst(obj, path)  # required (the time the app connected); not bounded
            return [OwnTracksMessage(kind, online=False, topic=topic)]
        if kind == "transition":
            tr = self.transition(obj, path)
            return [OwnTracksMessage(kind, records=self.where(tr, path), transition=tr,
                                     topic=topic)]
        return [OwnTracksMessage(kind, topic=topic)]  # status

    def open(self, obj: dict[str, Any], path: str) -> bytes:
        data_path = join(path, "data")
        if not self.secret:
            raise RemoteProtocolError(
                Reason.BAD_ENCRYPTION, "payload is encrypted but the device has no secret",
                path or None,
            )
        data = obj.get("data")
        if type(data) is not str:
            raise RemoteProtocolError(
                Reason.BAD_ENCRYPTION, "data must be a base64 string", data_path
            )
        try:
            sealed: bytes | None = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            sealed = None
        if sealed is None or len(sealed) < _NONCE_AND_MAC:
            raise RemoteProtocolError(
                Reason.BAD_ENCRYPTION,
                f"data must be base64 of at least {_NONCE_AND_MAC} bytes (nonce, MAC, ciphertext)",
                data_path,
            )
        key = self.secret[: nacl.secret.SecretBox.KEY_SIZE].ljust(
            nacl.secret.SecretBox.KEY_SIZE, b"\0"
        )
        try:
            return nacl.secret.SecretBox(key).decrypt(sealed)
        except (nacl.exceptions.CryptoError, ValueError):
            pass  # raised below, outside the handler
        raise RemoteProtocolError(
            Reason.BAD_ENCRYPTION, "data does not open with the device's secret", data_path
        )

    def location(self, obj: dict[str, Any], path: str) -> tuple[tuple[str, Record], ...]:
        now_ms = self.now_ms
        ts_ms = check_window(_tst(obj, path), now_ms, path, "tst")
        lat = number(obj.get("lat"), path, "lat")
        lon = number(obj.get("lon"), path, "lon")
        loc = position(lat, lon, path)
        # Negative acc, vel and cog are the apps' "unknown" (old iOS, Queclink: -1).
        acc = number(obj.get("acc"), path, "acc")
        if acc is not None and acc >= 0:
            loc["accuracy_m"] = acc
        alt = number(obj.get("alt"), path, "alt")
        if alt is not None:
            loc["altitude_m"] = alt
        vel = number(obj.get("vel"), path, "vel")
        if vel is not None and vel >= 0:
            loc["speed_mps"] = vel * _KMH_TO_MPS
        cog = number(obj.get("cog"), path, "cog")
        if cog is not None and cog >= 0:
            loc["heading_deg"] = cog
        source = obj.get("source")
        if type(source) is str and source in _LOCATION_SOURCES:
            loc["source"] = source
        records = [
            build_record("location", ts_ms, loc, sources=_LOCATION_FIELDS, path=path,
                         now_ms=now_ms, id_prefix=_ID_PREFIX)
        ]  # fmt: skip
        net: dict[str, Any] = {}
        ssid = _ssid(obj)
        if ssid is not None:
            net["wifi_ssid"] = ssid
        conn = obj.get("conn")
        if type(conn) is str and conn in _CONN_TYPES:
            net["network_type"] = _CONN_TYPES[conn]
        if net:
            records.append(
                build_record("network", ts_ms, net, sources=_NETWORK_FIELDS, path=path,
                             now_ms=now_ms, id_prefix=_ID_PREFIX)
            )  # fmt: skip
        return tuple(records)

    def where(self, tr: OwnTracksTransition, path: str) -> tuple[tuple[str, Record], ...]:
        """Where the device was when it crossed a region's edge, as a location
        record (none for iBeacon transitions, which have no position): the
        analysis finds the enter and leave of the tenant's places in it like in
        any point. The app's region name and id are not kept."""
        if tr.lat is None or tr.lon is None:
            return ()
        loc: dict[str, Any] = {"lat": tr.lat, "lon": tr.lon}
        if tr.accuracy_m is not None:
            loc["accuracy_m"] = tr.accuracy_m
        return (build_record("location", tr.ts_ms, loc, sources=_TRANSITION_FIELDS,
                             path=path, now_ms=self.now_ms, id_prefix=_ID_PREFIX),)

    def transition(self, obj: dict[str, Any], path: str) -> OwnTracksTransition:
        event = obj.get("event")
        if event is None:
            raise RemoteProtocolError(
                Reason.MISSING_FIELD, "event is required", join(path, "event")
            )
        if event != "enter" and event != "leave":
            raise RemoteProtocolError(
                Reason.BAD_VALUE if type(event) is str else Reason.WRONG_TYPE,
                "event must be one of enter, leave", join(path, "event"),
            )
        ts_ms = check_window(_tst(obj, path), self.now_ms, path, "tst")
        # The schema types these as numbers, and the apps send numbers: a string here
        # is refused (the Recorder's leniency for strings is for converted locations).
        lat = _strict_number(obj, "lat", path, -90.0, 90.0, required=True)
        lon = _strict_number(obj, "lon", path, -180.0, 180.0, required=True)
        acc = _strict_number(obj, "acc", path, float("-inf"), float("inf"), required=False)
        if lat == 0.0 and lon == 0.0:  # iBeacon transitions: no position
            lat = lon = None
        return OwnTracksTransition(
            event=event, ts_ms=ts_ms, lat=lat, lon=lon,
            accuracy_m=acc if acc is not None and acc > 0 else None,
            desc=_label(obj.get("desc")), rid=_label(obj.get("rid")), tid=_label(obj.get("tid")),
        )  # fmt: skip


def _tst(obj: dict[str, Any], path: str) -> int:
    """``tst``, epoch seconds (an integer, a float or a string of digits) -> ms.

    0 is refused, as the Android app refuses it: it is an unset time, not 1970."""
    tst = obj.get("tst")
    p = join(path, "tst")
    if tst is None:
        raise RemoteProtocolError(Reason.MISSING_FIELD, "tst is required", p)
    t = type(tst)
    if t is str and 0 < len(tst) <= 12 and tst.isascii() and tst.isdigit():
        seconds: float = int(tst)
    elif t is int or t is float:
        seconds = tst
    else:
        raise RemoteProtocolError(
            Reason.WRONG_TYPE, "tst must be epoch seconds (a number or a string of digits)", p
        )
    if seconds <= 0:
        raise RemoteProtocolError(Reason.BAD_TIMESTAMP, "tst must be positive epoch seconds", p)
    if seconds > 253_402_300_799:  # 9999-12-31T23:59:59Z
        raise RemoteProtocolError(
            Reason.FUTURE_TIMESTAMP, "tst must not be more than 24 h in the future", p
        )
    return int(seconds * 1000)


def _strict_number(
    obj: dict[str, Any], name: str, path: str, lo: float, hi: float, *, required: bool
) -> float | None:
    v = obj.get(name)
    if v is None:
        if required:
            raise RemoteProtocolError(Reason.MISSING_FIELD, f"{name} is required", join(path, name))
        return None
    t = type(v)
    if t is not int and t is not float:
        raise RemoteProtocolError(Reason.WRONG_TYPE, f"{name} must be a number", join(path, name))
    if not lo <= v <= hi:
        raise RemoteProtocolError(
            Reason.OUT_OF_RANGE, f"{name} must be a number in [{lo:g}, {hi:g}]", join(path, name)
        )
    return float(v)


def _label(v: object) -> str | None:
    """A region name or id as the phone's user set it; one we cannot keep is left out."""
    if type(v) is str and 0 < len(v) <= _LABEL_MAX and "\x00" not in v:
        return v
    return None


def _ssid(obj: dict[str, Any]) -> str | None:
    """``SSID`` (booklet, Android, iOS before 2025) or ``ssid`` (iOS since 2025)."""
    for key in ("SSID", "ssid"):
        v = obj.get(key)
        if type(v) is not str:
            continue
        if len(v) >= 2 and v[0] == '"' and v[-1] == '"':  # Android's WifiInfo quotes it
            v = v[1:-1]
        if v and v != "<unknown ssid>" and len(v) <= _SSID_MAX and "\x00" not in v:
            return v
    return None
