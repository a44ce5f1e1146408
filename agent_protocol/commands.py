"""Typed records of the command channel (server -> device) and acks (device -> server).

Signing and verification live in :mod:`agent_protocol.signing`. Protocol extension:
a command also carries ``tenant`` and ``device`` (signed) so that the agent can
check the command is addressed to itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from agent_protocol._time import format_ms, is_valid_ms, parse_ts
from agent_protocol.envelope import MAX_AGE_MS, MAX_FUTURE_MS, MAX_ID_LEN, PROTOCOL_VERSION
from agent_protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from agent_protocol.topics import is_valid_id

__all__ = [
    "ACK_STATES",
    "COMMAND_TYPES",
    "CONSENT_REFUSALS",
    "CONSENT_TYPES",
    "REMOTE_VIEW_MODES",
    "REMOTE_VIEW_REASON_MAX",
    "STATUS_STATES",
    "WIPE_SCOPES",
    "Ack",
    "Command",
    "Notice",
    "Status",
    "canonical_json",
    "command_signing_fields",
    "decode_ack",
    "decode_command",
    "decode_status",
    "encode_ack",
    "encode_command",
    "encode_status",
]

COMMAND_TYPES: tuple[str, ...] = (
    "lock", "locate", "wipe", "factory_reset", "sync_policy", "trust_key", "distrust_key",
    "remote_view",
)  # fmt: skip
WIPE_SCOPES: tuple[str, ...] = ("managed", "full")
#: Commands the device's user must accept before anything happens: the agent shows
#: the notice, asks, and acks ``consent_given`` or ``consent_refused``.
CONSENT_TYPES: frozenset[str] = frozenset({"remote_view"})
REMOTE_VIEW_MODES: tuple[str, ...] = ("screenshot", "session")
REMOTE_VIEW_REASON_MAX: Final = 500
#: The detail of a ``consent_refused`` ack: the user said no; nobody answered
#: before the agent gave up; the answer came after the command's expiry; the
#: device has nobody to ask (no interactive user).
CONSENT_REFUSALS: tuple[str, ...] = ("refused", "no_answer", "expired", "no_user")
ACK_STATES: tuple[str, ...] = (
    "received", "notice_shown", "consent_given", "completed", "failed", "rejected",
    "consent_refused",
)  # fmt: skip
STATUS_STATES: tuple[str, ...] = ("online", "offline")

NOTICE_TEXT_MAX: Final = 4000
ACK_DETAIL_MAX: Final = 1000
NONCE_MIN: Final = 8
NONCE_MAX: Final = 128
MAX_COMMAND_BYTES: Final = 64 * 1024
SIG_B64_LEN: Final = 88  # base64 of a 64-byte Ed25519 signature, padded

_LANG_RE = re.compile(r"[A-Za-z0-9-]{2,35}")
_NONCE_RE = re.compile(rf"[A-Za-z0-9_-]{{{NONCE_MIN},{NONCE_MAX}}}")
_B64_RE = re.compile(r"[A-Za-z0-9+/]{86}==")
_PUBKEY_RE = re.compile(r"[A-Za-z0-9+/]{43}=")


def _local(reason: str, detail: str, path: str | None) -> LocalProtocolError:
    return LocalProtocolError(reason, detail, path)


def _check_msg_id(value: object, name: str) -> None:
    if type(value) is not str:
        raise _local(Reason.WRONG_TYPE, f"{name} must be a string", name)
    if not 0 < len(value) <= MAX_ID_LEN or "\x00" in value:
        raise _local(
            Reason.BAD_VALUE, f"{name} must be 1-{MAX_ID_LEN} characters without NUL", name
        )


@dataclass(frozen=True, slots=True)
class Notice:
    """The notice shown to the device user before a command acts."""

    text: str
    lang: str

    def __post_init__(self) -> None:
        if type(self.text) is not str:
            raise _local(Reason.WRONG_TYPE, "notice.text must be a string", "notice.text")
        if not 0 < len(self.text) <= NOTICE_TEXT_MAX or "\x00" in self.text:
            raise _local(
                Reason.BAD_VALUE,
                f"notice.text must be 1-{NOTICE_TEXT_MAX} characters without NUL",
                "notice.text",
            )
        if type(self.lang) is not str:
            raise _local(Reason.WRONG_TYPE, "notice.lang must be a string", "notice.lang")
        if _LANG_RE.fullmatch(self.lang) is None:
            raise _local(
                Reason.BAD_VALUE,
                "notice.lang must be a language tag of 2-35 characters [A-Za-z0-9-]",
                "notice.lang",
            )


def _check_params(type_: str, params: object) -> None:
    if type(params) is not dict:
        raise _local(Reason.WRONG_TYPE, "params must be an object", "params")
    if not all(type(k) is str for k in params):
        raise _local(Reason.WRONG_TYPE, "params keys must be strings", "params")
    if type_ == "trust_key":
        key_id, public_key = params.get("key_id"), params.get("public_key")
        if type(key_id) is not str or not is_valid_id(key_id):
            raise _local(Reason.BAD_VALUE, "params.key_id must be 1-64 of [A-Za-z0-9_-]",
                         "params.key_id")
        if type(public_key) is not str or _PUBKEY_RE.fullmatch(public_key) is None:
            raise _local(Reason.BAD_VALUE,
                         "params.public_key must be padded base64 of a 32-byte Ed25519 key",
                         "params.public_key")
    if type_ == "distrust_key":
        key_id = params.get("key_id")
        if type(key_id) is not str or not is_valid_id(key_id):
            raise _local(Reason.BAD_VALUE, "params.key_id must be 1-64 of [A-Za-z0-9_-]",
                         "params.key_id")
    if type_ == "remote_view":
        mode, reason = params.get("mode"), params.get("reason")
        if mode is None:
            raise _local(Reason.MISSING_FIELD, "remote_view needs params.mode", "params.mode")
        if type(mode) is not str or mode not in REMOTE_VIEW_MODES:
            raise _local(Reason.BAD_VALUE,
                         f"params.mode must be one of {', '.join(REMOTE_VIEW_MODES)}",
                         "params.mode")
        if reason is None:
            raise _local(Reason.MISSING_FIELD, "remote_view needs params.reason",
                         "params.reason")
        if type(reason) is not str:
            raise _local(Reason.WRONG_TYPE, "params.reason must be a string", "params.reason")
        if not reason.strip() or len(reason) > REMOTE_VIEW_REASON_MAX or "\x00" in reason:
            raise _local(Reason.BAD_VALUE,
                         f"params.reason must be 1-{REMOTE_VIEW_REASON_MAX} characters, "
                         "not blank, without NUL", "params.reason")
    if type_ == "wipe":
        scope = params.get("scope")
        if scope is None:
            raise _local(Reason.MISSING_FIELD, "wipe needs params.scope", "params.scope")
        if type(scope) is not str or scope not in WIPE_SCOPES:
            raise _local(
                Reason.BAD_VALUE,
                f"params.scope must be one of {', '.join(WIPE_SCOPES)}",
                "params.scope",
            )


@dataclass(frozen=True, slots=True)
class Command:
    """A command for one device. ``sig`` is "" until :func:`sign_command` fills it."""

    command_id: str
    tenant: str
    device: str
    type: str
    params: dict[str, Any]
    notice: Notice | None
    issued_at_ms: int
    expires_at_ms: int
    nonce: str
    key_id: str
    sig: str = ""

    def __post_init__(self) -> None:
        _check_msg_id(self.command_id, "command_id")
        if not is_valid_id(self.tenant):
            raise _local(Reason.BAD_VALUE, "tenant must be 1-64 of [A-Za-z0-9_-]", "tenant")
        if not is_valid_id(self.device):
            raise _local(Reason.BAD_VALUE, "device must be 1-64 of [A-Za-z0-9_-]", "device")
        if type(self.type) is not str or self.type not in COMMAND_TYPES:
            raise _local(
                Reason.BAD_VALUE, f"type must be one of {', '.join(COMMAND_TYPES)}", "type"
            )
        _check_params(self.type, self.params)
        if self.notice is not None and not isinstance(self.notice, Notice):
            raise _local(Reason.WRONG_TYPE, "notice must be a Notice or None", "notice")
        if self.notice is None and self.type in CONSENT_TYPES:
            # The user is asked with the notice: no notice, nothing to ask with.
            raise _local(Reason.MISSING_FIELD, f"{self.type} needs a notice", "notice")
        if not is_valid_ms(self.issued_at_ms):
            raise _local(Reason.BAD_TIMESTAMP, "issued_at must be epoch ms >= 0", "issued_at")
        if not is_valid_ms(self.expires_at_ms):
            raise _local(Reason.BAD_TIMESTAMP, "expires_at must be epoch ms >= 0", "expires_at")
        if self.expires_at_ms <= self.issued_at_ms:
            raise _local(Reason.BAD_TIMESTAMP, "expires_at must be after issued_at", "expires_at")
        if type(self.nonce) is not str or _NONCE_RE.fullmatch(self.nonce) is None:
            raise _local(
                Reason.BAD_VALUE,
                f"nonce must be {NONCE_MIN}-{NONCE_MAX} characters of [A-Za-z0-9_-]",
                "nonce",
            )
        if not is_valid_id(self.key_id):
            raise _local(Reason.BAD_VALUE, "key_id must be 1-64 of [A-Za-z0-9_-]", "key_id")
        if type(self.sig) is not str or (self.sig and _B64_RE.fullmatch(self.sig) is None):
            raise _local(Reason.BAD_VALUE, "sig must be empty or padded base64 of 64 bytes", "sig")


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """Canonical JSON: keys sorted (at every level), separators ``,`` and ``:``, UTF-8,
    non-ASCII unescaped. Equal to ``json.dumps(obj, sort_keys=True,
    separators=(",", ":"), ensure_ascii=False).encode()`` for str/int/bool/None/list/
    dict values (floats may be spelled differently: avoid floats in signed objects).
    """
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        pass  # raised below, outside the handler
    raise LocalProtocolError(Reason.WRONG_TYPE, "object must be JSON-serialisable (str keys)")


def command_signing_fields(cmd: Command) -> dict[str, Any]:
    """Every wire field of ``cmd`` except ``sig`` (the object whose canonical JSON is signed).

    ``notice`` is omitted when None; timestamps are RFC 3339 strings.
    """
    fields: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "command_id": cmd.command_id,
        "tenant": cmd.tenant,
        "device": cmd.device,
        "type": cmd.type,
        "params": cmd.params,
        "issued_at": format_ms(cmd.issued_at_ms),
        "expires_at": format_ms(cmd.expires_at_ms),
        "nonce": cmd.nonce,
        "key_id": cmd.key_id,
    }
    if cmd.notice is not None:
        fields["notice"] = {"text": cmd.notice.text, "lang": cmd.notice.lang}
    return fields


def encode_command(cmd: Command) -> bytes:
    """Wire bytes of a signed command (LocalProtocolError if unsigned)."""
    if not cmd.sig:
        raise LocalProtocolError(Reason.BAD_VALUE, "command must be signed before encoding", "sig")
    fields = command_signing_fields(cmd)
    fields["sig"] = cmd.sig
    return canonical_json(fields)


def _loads_object(payload: bytes, max_bytes: int, what: str) -> dict[str, Any]:
    if len(payload) > max_bytes:
        raise RemoteProtocolError(Reason.TOO_LARGE, f"{what} must be at most {max_bytes} bytes")
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        obj = None  # raised below, outside the handler
    else:
        if type(obj) is dict:
            if type(obj.get("v")) is not int or obj["v"] != PROTOCOL_VERSION:
                raise RemoteProtocolError(
                    Reason.BAD_ENVELOPE, f"v must be the integer {PROTOCOL_VERSION}", "v"
                )
            return obj
        raise RemoteProtocolError(Reason.BAD_ENVELOPE, f"{what} must be a JSON object")
    raise RemoteProtocolError(Reason.NOT_JSON, f"{what} must be UTF-8 JSON")


def _required(obj: Mapping[str, Any], name: str, prefix: str = "") -> Any:
    value = obj.get(name)
    if value is None:
        path = prefix + name
        raise RemoteProtocolError(Reason.MISSING_FIELD, f"{path} is required", path)
    return value


def _to_remote(exc: LocalProtocolError) -> RemoteProtocolError:
    return RemoteProtocolError(exc.reason, exc.detail, exc.path)


def _command_from_obj(obj: Mapping[str, Any]) -> Command:
    notice_obj = obj.get("notice")
    try:
        notice = None
        if notice_obj is not None:
            if type(notice_obj) is not dict:
                raise _local(Reason.WRONG_TYPE, "notice must be an object", "notice")
            notice = Notice(
                _required(notice_obj, "text", "notice."), _required(notice_obj, "lang", "notice.")
            )
        params = obj.get("params")
        return Command(
            command_id=_required(obj, "command_id"),
            tenant=_required(obj, "tenant"),
            device=_required(obj, "device"),
            type=_required(obj, "type"),
            params={} if params is None else params,
            notice=notice,
            issued_at_ms=parse_ts(_required(obj, "issued_at"), "issued_at"),
            expires_at_ms=parse_ts(_required(obj, "expires_at"), "expires_at"),
            nonce=_required(obj, "nonce"),
            key_id=_required(obj, "key_id"),
            sig=_required(obj, "sig"),
        )
    except LocalProtocolError as exc:
        raise _to_remote(exc) from None


def decode_command_object(payload: bytes) -> tuple[Command, dict[str, Any]]:
    """Decode a command; also return the parsed JSON object (for signature checks)."""
    obj = _loads_object(payload, MAX_COMMAND_BYTES, "command")
    return _command_from_obj(obj), obj


def decode_command(payload: bytes) -> Command:
    """Decode and validate a command's structure (no signature check: see verify_command)."""
    return decode_command_object(payload)[0]


@dataclass(frozen=True, slots=True)
class Ack:
    """A device's acknowledgement of a command's progress."""

    command_id: str
    state: str
    ts_ms: int
    detail: str | None = None

    def __post_init__(self) -> None:
        _check_msg_id(self.command_id, "command_id")
        if type(self.state) is not str or self.state not in ACK_STATES:
            raise _local(Reason.BAD_VALUE, f"state must be one of {', '.join(ACK_STATES)}", "state")
        if not is_valid_ms(self.ts_ms):
            raise _local(Reason.BAD_TIMESTAMP, "ts must be epoch ms >= 0", "ts")
        if self.detail is not None:
            if type(self.detail) is not str:
                raise _local(Reason.WRONG_TYPE, "detail must be a string", "detail")
            if len(self.detail) > ACK_DETAIL_MAX or "\x00" in self.detail:
                raise _local(
                    Reason.BAD_VALUE,
                    f"detail must be at most {ACK_DETAIL_MAX} characters without NUL",
                    "detail",
                )


def decode_ack(payload: bytes, *, now_ms: int) -> Ack:
    """Decode and validate an ack (RemoteProtocolError on bad input)."""
    obj = _loads_object(payload, 16 * 1024, "ack")
    ts_ms = parse_ts(_required(obj, "ts"), "ts")
    if ts_ms > now_ms + MAX_FUTURE_MS:
        raise RemoteProtocolError(
            Reason.FUTURE_TIMESTAMP, "ts must not be more than 24 h in the future", "ts"
        )
    if ts_ms < now_ms - MAX_AGE_MS:
        raise RemoteProtocolError(
            Reason.BAD_TIMESTAMP, f"ts must not be older than {MAX_AGE_MS // 86_400_000} days", "ts"
        )
    try:
        return Ack(
            command_id=_required(obj, "command_id"),
            state=_required(obj, "state"),
            ts_ms=ts_ms,
            detail=obj.get("detail"),
        )
    except LocalProtocolError as exc:
        raise _to_remote(exc) from None


def encode_ack(ack: Ack) -> bytes:
    """Wire bytes of an ack (``detail`` omitted when None)."""
    obj: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "command_id": ack.command_id,
        "state": ack.state,
        "ts": format_ms(ack.ts_ms),
    }
    if ack.detail is not None:
        obj["detail"] = ack.detail
    return orjson.dumps(obj)


@dataclass(frozen=True, slots=True)
class Status:
    """A device's connection status: ``online`` is published by the agent right after
    every (re)connection, ``offline`` is its MQTT will. On ``online`` the server
    re-sends commands the device has not yet acknowledged receiving."""

    state: str
    ts_ms: int

    def __post_init__(self) -> None:
        if type(self.state) is not str or self.state not in STATUS_STATES:
            raise _local(
                Reason.BAD_VALUE, f"state must be one of {', '.join(STATUS_STATES)}", "state"
            )
        if not is_valid_ms(self.ts_ms):
            raise _local(Reason.BAD_TIMESTAMP, "ts must be epoch ms >= 0", "ts")


def decode_status(payload: bytes) -> Status:
    """Decode a status message (RemoteProtocolError on bad input). Its ``ts`` is
    informational (a will is published by the broker, possibly much later)."""
    obj = _loads_object(payload, 1024, "status")
    try:
        return Status(state=_required(obj, "state"),
                      ts_ms=parse_ts(_required(obj, "ts"), "ts"))
    except LocalProtocolError as exc:
        raise _to_remote(exc) from None


def encode_status(status: Status) -> bytes:
    return orjson.dumps({"v": PROTOCOL_VERSION, "state": status.state,
                         "ts": format_ms(status.ts_ms)})
