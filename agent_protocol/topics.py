"""MQTT topic names of the protocol: parse and format.

``mdm/v1/{tenant}/devices/{device}/telemetry/{kind}``, ``.../acks``, ``.../status``,
``.../commands``;
``{tenant}`` and ``{device}`` are 1-64 characters of ``[A-Za-z0-9_-]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, get_args

from agent_protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from agent_protocol.kinds import KINDS

__all__ = [
    "ACKS_FILTER",
    "COMMANDS_FILTER",
    "STATUS_FILTER",
    "TELEMETRY_FILTER",
    "Channel",
    "Topic",
    "TopicOutline",
    "acks_topic",
    "commands_topic",
    "is_valid_id",
    "outline_topic",
    "parse_topic",
    "shared_subscription",
    "status_topic",
    "telemetry_topic",
]

Channel = Literal["telemetry", "acks", "status", "commands"]
CHANNELS: tuple[str, ...] = get_args(Channel)

PREFIX = "mdm/v1/"
TELEMETRY_FILTER = "mdm/v1/+/devices/+/telemetry/+"
ACKS_FILTER = "mdm/v1/+/devices/+/acks"
STATUS_FILTER = "mdm/v1/+/devices/+/status"
COMMANDS_FILTER = "mdm/v1/+/devices/+/commands"

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_id_match = _ID_RE.fullmatch
_KINDS = frozenset(KINDS)
_ID_DETAIL = "must be 1-64 characters of [A-Za-z0-9_-]"


def is_valid_id(s: str) -> bool:
    """True if ``s`` is a valid tenant or device id."""
    return type(s) is str and _id_match(s) is not None


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed topic. ``kind`` is set for the telemetry channel only."""

    tenant: str
    device: str
    channel: Channel
    kind: str | None = None

    def __post_init__(self) -> None:
        if not is_valid_id(self.tenant):
            raise LocalProtocolError(Reason.BAD_TOPIC, f"tenant {_ID_DETAIL}", "tenant")
        if not is_valid_id(self.device):
            raise LocalProtocolError(Reason.BAD_TOPIC, f"device {_ID_DETAIL}", "device")
        if self.channel == "telemetry":
            if type(self.kind) is not str or self.kind not in _KINDS:
                raise LocalProtocolError(
                    Reason.UNKNOWN_KIND, f"kind must be one of {', '.join(KINDS)}", "kind"
                )
        elif self.channel in ("acks", "status", "commands"):
            if self.kind is not None:
                raise LocalProtocolError(
                    Reason.BAD_TOPIC, "kind is only set on the telemetry channel", "kind"
                )
        else:
            raise LocalProtocolError(
                Reason.BAD_TOPIC, f"channel must be one of {', '.join(CHANNELS)}", "channel"
            )

    def __str__(self) -> str:
        base = f"{PREFIX}{self.tenant}/devices/{self.device}/{self.channel}"
        return base if self.kind is None else f"{base}/{self.kind}"


def _bad(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(Reason.BAD_TOPIC, detail)


def parse_topic(topic: str) -> Topic:
    """Parse an MQTT topic name of the protocol.

    Raises RemoteProtocolError with reason ``bad_topic`` or ``unknown_kind``. The
    error never quotes the topic (its ids may be personal data). Valid results are
    cached (bounded LRU): topics repeat per device.
    """
    if type(topic) is not str:
        raise _bad("topic must be a string")
    return _parse_topic(topic)


@lru_cache(maxsize=65_536)
def _parse_topic(topic: str) -> Topic:
    parts = topic.split("/")
    n = len(parts)
    if n not in (6, 7) or parts[0] != "mdm" or parts[1] != "v1" or parts[3] != "devices":
        raise _bad("topic must be mdm/v1/{tenant}/devices/{device}/{channel}[/{kind}]")
    tenant = parts[2]
    device = parts[4]
    if _id_match(tenant) is None:
        raise _bad(f"tenant {_ID_DETAIL}")
    if _id_match(device) is None:
        raise _bad(f"device {_ID_DETAIL}")
    channel = parts[5]
    if n == 7:
        if channel != "telemetry":
            raise _bad("only the telemetry channel has a kind level")
        kind = parts[6]
        if kind not in _KINDS:
            if _id_match(kind) is None:
                raise _bad("kind must be 1-64 characters of [A-Za-z0-9_-]")
            raise RemoteProtocolError(
                Reason.UNKNOWN_KIND, f"kind must be one of {', '.join(KINDS)}"
            )
        return Topic(tenant, device, "telemetry", kind)
    if channel == "acks":
        return Topic(tenant, device, "acks")
    if channel == "status":
        return Topic(tenant, device, "status")
    if channel == "commands":
        return Topic(tenant, device, "commands")
    if channel == "telemetry":
        raise _bad("telemetry topic must end with /{kind}")
    raise _bad(f"channel must be one of {', '.join(CHANNELS)}")


@dataclass(frozen=True, slots=True)
class TopicOutline:
    """What of a topic name may be kept, e.g. with a dead letter: the levels that
    parsed, and the name of the first that did not, never its value (a device id
    in the wrong place, or a "kind" like ``imei=356938035643809``, may be personal
    data). ``text`` is the topic with that level, and all after it, replaced by
    its name in braces: ``mdm/v1/acme/devices/phone-7/telemetry/{kind}``;
    ``failed`` is None when the whole topic is valid."""

    tenant: str | None
    device: str | None
    failed: str | None
    text: str


def outline_topic(topic: str) -> TopicOutline:
    """Parse ``topic`` as far as it goes (see :class:`TopicOutline`); never raises."""
    parts = topic.split("/") if type(topic) is str else []
    if len(parts) < 5 or parts[0] != "mdm" or parts[1] != "v1" or parts[3] != "devices":
        return TopicOutline(None, None, "prefix", "{topic}")
    tenant, device = parts[2], parts[4]
    if _id_match(tenant) is None:
        return TopicOutline(None, None, "tenant", "mdm/v1/{tenant}")
    base = f"{PREFIX}{tenant}/devices"
    if _id_match(device) is None:
        return TopicOutline(tenant, None, "device", base + "/{device}")
    base += f"/{device}"
    channel = parts[5] if len(parts) > 5 else None
    if channel not in CHANNELS:
        return TopicOutline(tenant, device, "channel", base + "/{channel}")
    base += f"/{channel}"
    if channel == "telemetry":
        if len(parts) < 7 or parts[6] not in _KINDS:
            return TopicOutline(tenant, device, "kind", base + "/{kind}")
        base += f"/{parts[6]}"
        extra = len(parts) > 7
    else:
        extra = len(parts) > 6
    if extra:
        return TopicOutline(tenant, device, "extra", base + "/{extra}")
    return TopicOutline(tenant, device, None, base)


def _check_ids(tenant: str, device: str) -> None:
    if not is_valid_id(tenant):
        raise LocalProtocolError(Reason.BAD_TOPIC, f"tenant {_ID_DETAIL}", "tenant")
    if not is_valid_id(device):
        raise LocalProtocolError(Reason.BAD_TOPIC, f"device {_ID_DETAIL}", "device")


def telemetry_topic(tenant: str, device: str, kind: str) -> str:
    """``mdm/v1/{tenant}/devices/{device}/telemetry/{kind}`` (LocalProtocolError if bad)."""
    _check_ids(tenant, device)
    if type(kind) is not str or kind not in _KINDS:
        raise LocalProtocolError(
            Reason.UNKNOWN_KIND, f"kind must be one of {', '.join(KINDS)}", "kind"
        )
    return f"{PREFIX}{tenant}/devices/{device}/telemetry/{kind}"


def acks_topic(tenant: str, device: str) -> str:
    """``mdm/v1/{tenant}/devices/{device}/acks`` (LocalProtocolError if bad)."""
    _check_ids(tenant, device)
    return f"{PREFIX}{tenant}/devices/{device}/acks"


def status_topic(tenant: str, device: str) -> str:
    """``mdm/v1/{tenant}/devices/{device}/status`` (LocalProtocolError if bad)."""
    _check_ids(tenant, device)
    return f"{PREFIX}{tenant}/devices/{device}/status"


def commands_topic(tenant: str, device: str) -> str:
    """``mdm/v1/{tenant}/devices/{device}/commands`` (LocalProtocolError if bad)."""
    _check_ids(tenant, device)
    return f"{PREFIX}{tenant}/devices/{device}/commands"


def shared_subscription(group: str, topic_filter: str) -> str:
    """``$share/{group}/{filter}`` (MQTT 5 shared subscription)."""
    if type(group) is not str or not group or any(c in group for c in "/+#"):
        raise LocalProtocolError(
            Reason.BAD_TOPIC, "share group must be non-empty without '/', '+' or '#'", "group"
        )
    if type(topic_filter) is not str or not topic_filter:
        raise LocalProtocolError(Reason.BAD_TOPIC, "topic filter must be non-empty", "filter")
    return f"$share/{group}/{topic_filter}"
