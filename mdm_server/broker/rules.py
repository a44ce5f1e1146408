"""Who may use which MQTT topic: the one source of the broker's access rules.

Two things enforce these rules, and both are built from this module:

- Mosquitto's dynamic-security roles (:func:`mdm_server.broker.identity.device_acls`,
  the server's role in :data:`mdm_server.broker.bootstrap.SERVER_ACLS`);
- the broker hook (:mod:`mdm_server.broker.hook`), which answers RabbitMQ's and
  EMQX's questions from the database.

A **device** ``{tenant}/{device}`` may publish to literal topics only (its
telemetry of each of the protocol's kinds, its acks and status; an OwnTracks device
its own ``owntracks/...`` topics) and subscribe to, literally, the one topic it
receives (its commands). Ids are ``[A-Za-z0-9_-]``, so a device's topics hold no
wildcard, and no ``.`` either (which RabbitMQ's routing keys use as separator).

The **server** may subscribe to and receive every device's topics and publish only
commands: :data:`SERVER_SUBSCRIBE` and :data:`SERVER_PUBLISH`, taken from the
server's Mosquitto role so that the two cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent_protocol import KINDS
from mdm_server.broker.bootstrap import SERVER_ACLS
from mdm_server.storage.devices import mqtt_username

__all__ = [
    "OWNTRACKS_PUBLISH",
    "SERVER_PUBLISH",
    "SERVER_SUBSCRIBE",
    "DeviceTopics",
    "device_topics",
    "filter_covers",
]

#: OwnTracks' subtopics a device may publish on below its base topic (the base
#: topic itself carries its locations and, published by the broker, its will).
OWNTRACKS_PUBLISH: tuple[str, ...] = ("event", "info", "status", "waypoint", "waypoints",
                                      "step")


@dataclass(frozen=True, slots=True)
class DeviceTopics:
    """A device's own topics: what it may publish to, and what it may subscribe to
    (literally: no wildcard filter) and receive."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def device_topics(tenant: str, device: str, agent: str = "native") -> DeviceTopics:
    """The device's topics: its own, nothing else. Telemetry only on the six kinds'
    own topics (no ``telemetry/+``: a "kind" like ``imei=356938035643809`` never
    reaches the server). An OwnTracks device publishes on ``owntracks/{username}/
    {device}`` and :data:`OWNTRACKS_PUBLISH` below it and receives its ``.../cmd``;
    the username is ``{tenant}.{device}``, so the topic holds no wildcard."""
    if agent == "owntracks":
        base = f"owntracks/{mqtt_username(tenant, device)}/{device}"
        return DeviceTopics(
            publish=(base, *(f"{base}/{sub}" for sub in OWNTRACKS_PUBLISH)),
            subscribe=(f"{base}/cmd",))
    base = f"mdm/v1/{tenant}/devices/{device}"
    return DeviceTopics(
        publish=(*(f"{base}/telemetry/{kind}" for kind in KINDS), f"{base}/acks",
                 f"{base}/status"),
        subscribe=(f"{base}/commands",))


def _server(acltype: str) -> tuple[str, ...]:
    return tuple(topic for t, topic in SERVER_ACLS
                 if t == acltype and not topic.startswith(("$", "#")))


#: Filters of the device topics the server may subscribe to (and receive), and the
#: topics (patterns) it may publish to: the server's Mosquitto role without its
#: ``$CONTROL``, ``$SYS`` and ``$share`` entries, which are Mosquitto's own.
SERVER_SUBSCRIBE: tuple[str, ...] = _server("subscribePattern")
SERVER_PUBLISH: tuple[str, ...] = _server("publishClientSend")


def filter_covers(pattern: str, topic: str, *, sep: str = "/", one: str = "+",
                  rest: str = "#") -> bool:
    """True if the MQTT filter ``pattern`` (``+``: one level, ``#``: the rest)
    matches everything ``topic`` can name. ``topic`` may itself be a filter: its
    ``+`` is covered only by a ``+`` (or ``#``) of the pattern, its ``#`` only by a
    ``#``, so a subscription is allowed only if all it could receive is. With
    ``sep="."``, ``one="*"``: the same for AMQP topic patterns and routing keys."""
    want = pattern.split(sep)
    have = topic.split(sep)
    for i, level in enumerate(want):
        if level == rest:  # the rest, whatever it is ('a/#' also matches 'a')
            return True
        if i >= len(have):
            return False
        if level == one:
            if have[i] == rest:
                return False
            continue
        if have[i] != level:  # a literal level: a wildcard in topic is not covered
            return False
    return len(have) == len(want)
