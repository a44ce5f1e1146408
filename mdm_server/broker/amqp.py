"""The server's AMQP link to a RabbitMQ cluster (``MDM_AMQP_URL``): one node at a time.

Devices speak MQTT to the cluster's nodes; RabbitMQ's MQTT plugin turns each topic
into a routing key on the ``amq.topic`` exchange (``/`` -> ``.``) and each MQTT
subscription into a queue bound to it. The server reads and writes that exchange
over AMQP 0-9-1: the ingest and the ack consumer read quorum queues with their own
minimal consumer (mdm_server/ingest/amqp.py), the command dispatcher
publishes to the device's routing key through aio-pika
(mdm_server/commands/publishers.py). What they share lives here:

- :func:`open_connection`: the server's login (the user and password of
  ``MDM_AMQP_URL``), TLS for ``amqps://`` checked against ``MDM_AMQP_CA_FILE`` (else
  the system's CAs);
- :func:`run_with_failover`: the nodes are tried in turn (a node down: the next
  one at once), with backoff once all failed;
- :func:`routing_key_topic`: a routing key back to its MQTT topic.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection

from mdm_server.broker.hook_config import AmqpSettings
from mdm_server.config import tls_client_context

__all__ = ["EXCHANGE", "open_connection", "routing_key_topic", "run_with_failover",
           "ssl_context"]

log = logging.getLogger(__name__)

#: Where RabbitMQ's MQTT plugin publishes devices' messages and routes commands from.
EXCHANGE = "amq.topic"

#: Errors that mean "this node, this time": the next node is tried.
LINK_ERRORS = (OSError, ConnectionError, TimeoutError, aiormq.exceptions.AMQPError,
               aio_pika.exceptions.AMQPException)

_OWNTRACKS = "owntracks."


def routing_key_topic(routing_key: str) -> str:
    """The MQTT topic a routing key was made from.

    Our agents' ids hold no ``.``, so for ``mdm.v1...`` keys ``.`` -> ``/`` is exact.
    OwnTracks topics are ``owntracks/{username}/{device}[/...]`` with the device's
    username ``{tenant}.{device}``: its ``.`` survives the MQTT plugin unchanged, so
    the second and third words of such a key are the username, joined back with a
    ``.``. (A device publishing ``owntracks/acme/d1/d1`` has the same key as
    ``owntracks/acme.d1/d1``, and the hook judges keys, never topics: it is the same
    device either way, docs/scaling.md.)
    """
    if routing_key.startswith(_OWNTRACKS):
        words = routing_key.split(".")
        if len(words) >= 4:
            return "/".join(["owntracks", f"{words[1]}.{words[2]}", *words[3:]])
    return routing_key.replace(".", "/")


def ssl_context(amqp: AmqpSettings) -> ssl.SSLContext:
    """A client context for ``amqps://`` nodes: their certificate and host name
    checked against ``MDM_AMQP_CA_FILE`` (else the system's CAs), TLS 1.2 at least."""
    return tls_client_context(amqp.ca_file, "MDM_AMQP_CA_FILE")


async def open_connection(amqp: AmqpSettings, url: str, *, timeout: float = 10.0
                          ) -> AbstractConnection:
    """A connection to the node ``url`` (from ``amqp.urls``) as the server's user."""
    parts = urlsplit(url)
    netloc = f"{quote(amqp.username, safe='')}:{quote(amqp.password, safe='')}@{parts.netloc}"
    tls = ssl_context(amqp) if parts.scheme == "amqps" else None
    # Not robust (aio-pika's own reconnection): run_with_failover chooses the next
    # node, and a reader must know when its channel (and delivery tags) changed.
    return await aio_pika.connect(urlunsplit(parts._replace(netloc=netloc)),
                                  timeout=timeout, ssl_context=tls)


async def run_with_failover(amqp: AmqpSettings, label: str,
                            session: Callable[[str], Awaitable[None]],
                            worked: Callable[[], bool]) -> None:
    """Run ``session(url)`` on each node in turn, for ever: a session returns or
    raises when its connection is lost. ``worked()`` says whether the last one got
    going since it was last asked (then the backoff starts again); after each round,
    wait (0.2 s, doubling to 5 s while no node gets going) and go round again.
    Until cancelled."""
    backoff = 0.2
    while True:
        for url in amqp.urls:
            try:
                await session(url)
            except LINK_ERRORS as exc:
                log.warning("%s: AMQP node %s lost or unreachable (%s)", label,
                            urlsplit(url).netloc, type(exc).__name__)
            if worked():
                backoff = 0.2  # it was working: the next node at once
        log.warning("%s: no AMQP node answered; retrying in %.1fs", label, backoff)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 5.0)
