"""Commands to Mosquitto's dynamic-security plugin, as the server's MQTT user.

The plugin takes ``{"commands": [...]}`` published to ``$CONTROL/dynamic-security/v1``
and answers ``{"responses": [...]}`` on ``.../v1/response``, one response per
command, in order. Every administrator connection receives every response, so
each command carries a random ``correlationData`` and only ours are taken.

Facts of Mosquitto 2.0.11 this relies on (tests/integration/test_broker_access.py
checks the ones that matter for security):

- a client that is deleted, disabled or modified (password, client id, roles)
  is disconnected at once; a role's ACLs are checked at every publish and
  subscribe, so adding or removing one applies at once to its connected clients,
  without disconnecting them (tested);
- a publish to ``$CONTROL`` that nobody handles (a broker without the plugin) is
  simply never answered, hence the timeout.

paho runs on its own network thread (``loop_start``), reconnecting by itself;
responses and connection events hop to the event loop with
``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from mdm_server.config import MqttSettings
from mdm_server.mqtt_client import configure

__all__ = ["CONTROL_TOPIC", "RESPONSE_TOPIC", "Dynsec", "DynsecError"]

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"
# Commands per request, and bytes: each request stays far below the broker's
# max_packet_size (263,168 bytes, deploy/mosquitto/mosquitto.conf), which holds for
# the server's connections too: a larger request would get this connection
# dropped. 200 roles of devices with 64-character ids are ~450 KB.
_CHUNK = 200
_CHUNK_BYTES = 128 * 1024


def _chunks(commands: Sequence[Mapping[str, Any]]) -> list[Sequence[Mapping[str, Any]]]:
    """``commands`` cut into requests of at most _CHUNK commands and about
    _CHUNK_BYTES of JSON each (a single larger command goes alone)."""
    out: list[Sequence[Mapping[str, Any]]] = []
    start, size = 0, 0
    for i, command in enumerate(commands):
        n = len(json.dumps(command)) + 64  # its correlationData and separators
        if i > start and (i - start >= _CHUNK or size + n > _CHUNK_BYTES):
            out.append(commands[start:i])
            start, size = i, 0
        size += n
    if start < len(commands):
        out.append(commands[start:])
    return out


class DynsecError(Exception):
    """The broker could not be reached, refused the server's credentials, or did not
    answer. The message names the broker and the cause, never a password."""


class Dynsec:
    """One connection to the broker for dynamic-security commands.

    ``await start()`` then ``await ready()``; ``await call([...])`` returns the
    responses; ``await close()``. The connection is re-established by paho after a
    loss; :attr:`sessions` counts the connections that became ready, so a caller can
    tell that the broker came back (and may have lost its state).
    """

    def __init__(self, settings: MqttSettings, *, client_id: str | None = None,
                 timeout_s: float = 10.0) -> None:
        self._settings = settings
        self._timeout_s = timeout_s
        self._client_id = client_id or f"mdm-dynsec-{secrets.token_hex(4)}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ready = asyncio.Event()
        self._session_changed = asyncio.Event()
        self._refused: str | None = None
        self._sub_mid: int | None = None
        self.sessions = 0

    @property
    def where(self) -> str:
        return f"{self._settings.host}:{self._settings.port}"

    # -- paho callbacks (paho's thread) -----------------------------------------

    def _call(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closing
                loop.call_soon_threadsafe(fn, *args)

    def _on_connect(self, client: paho.Client, userdata: object, flags: object,
                    rc: ReasonCode, props: object) -> None:
        if rc.is_failure:
            self._call(self._set_refused, str(rc))
            return
        self._sub_mid = client.subscribe(RESPONSE_TOPIC, qos=1)[1]

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int,
                      rcs: list[ReasonCode], props: object) -> None:
        if any(rc.is_failure for rc in rcs):
            self._call(self._set_refused, "subscription to the responses refused")
        else:
            self._call(self._became_ready)

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: object,
                       rc: ReasonCode, props: object) -> None:
        self._call(self._lost)

    def _on_message(self, client: paho.Client, userdata: object,
                    msg: paho.MQTTMessage) -> None:
        try:
            doc = json.loads(msg.payload)
            responses = doc["responses"]
        except (ValueError, KeyError, TypeError):
            return
        if isinstance(responses, list):
            self._call(self._answer, responses)

    # -- on the event loop --------------------------------------------------------

    def _set_refused(self, reason: str) -> None:
        self._refused = reason
        self._ready.set()  # wakes ready(), which raises

    def _became_ready(self) -> None:
        self._refused = None
        self.sessions += 1
        self._ready.set()
        self._session_changed.set()

    def _lost(self) -> None:
        self._ready.clear()
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(DynsecError(f"lost the connection to the broker at "
                                              f"{self.where}"))
        self._waiting.clear()

    def _answer(self, responses: list[Any]) -> None:
        for r in responses:
            if isinstance(r, dict):
                fut = self._waiting.pop(str(r.get("correlationData")), None)
                if fut is not None and not fut.done():
                    fut.set_result(r)

    # -- public ---------------------------------------------------------------------

    async def start(self) -> None:
        """Begin connecting (paho retries until :meth:`close`)."""
        self._loop = asyncio.get_running_loop()
        s = self._settings
        c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                        client_id=self._client_id, clean_session=True,
                        protocol=paho.MQTTv311)
        configure(c, s)
        c.reconnect_delay_set(min_delay=1, max_delay=5)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.connect_async(s.host, s.port, keepalive=30)
        c.loop_start()
        self._client = c

    async def ready(self, timeout_s: float | None = None) -> None:
        """Wait until connected and subscribed to the responses (DynsecError if
        refused or not within the timeout)."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s or self._timeout_s)
        except TimeoutError:
            raise DynsecError(f"cannot reach the broker at {self.where}") from None
        if self._refused is not None:
            raise DynsecError(f"the broker at {self.where} refused the server's MQTT "
                              f"user ({self._refused}): check the credentials in "
                              "MDM_MQTT_URL") from None

    async def wait_session_change(self) -> None:
        """Return once a new connection is ready (the first, or after a loss) that
        :meth:`take_session_change` has not taken yet."""
        await self._session_changed.wait()

    def take_session_change(self) -> bool:
        """True if a connection became ready since the last call."""
        seen = self._session_changed.is_set()
        self._session_changed.clear()
        return seen

    async def __aenter__(self) -> Dynsec:
        await self.start()
        try:
            await self.ready()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            await asyncio.get_running_loop().run_in_executor(None, client.loop_stop)
        for fut in self._waiting.values():
            fut.cancel()
        self._waiting.clear()

    async def discard_session(self, client_id: str) -> None:
        """Connect once as ``client_id`` with a clean session, then leave: the broker
        drops the persistent session it keeps for that id, with the messages queued
        in it, and disconnects a client using it. (The server's user is bound to no
        client id, so it may use a device's.)"""
        async with Dynsec(self._settings, client_id=client_id, timeout_s=self._timeout_s):
            pass

    async def call(self, commands: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Send ``commands``; return one response per command, in order. A response
        holds ``error`` when the plugin refused that command (the others still ran)."""
        out: list[dict[str, Any]] = []
        for chunk in _chunks(commands):
            out += await self._call_chunk(chunk)
        return out

    async def _call_chunk(self, commands: Sequence[Mapping[str, Any]]
                          ) -> list[dict[str, Any]]:
        await self.ready()
        client, loop = self._client, self._loop
        assert client is not None and loop is not None
        tag = secrets.token_hex(8)
        ids = [f"{tag}-{i}" for i in range(len(commands))]
        futures = []
        for cid in ids:
            fut: asyncio.Future[dict[str, Any]] = loop.create_future()
            self._waiting[cid] = fut
            futures.append(fut)
        payload = json.dumps({"commands": [{**c, "correlationData": cid}
                                           for c, cid in zip(commands, ids, strict=True)]})
        try:
            info = client.publish(CONTROL_TOPIC, payload.encode(), qos=1)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise DynsecError(f"lost the connection to the broker at {self.where}")
            _, pending = await asyncio.wait(futures, timeout=self._timeout_s)
            if pending:
                raise DynsecError(
                    f"the broker at {self.where} did not answer dynamic-security commands "
                    f"within {self._timeout_s:.0f} s: is its dynamic-security plugin loaded "
                    "(deploy/mosquitto/mosquitto.conf) and does the server's MQTT user "
                    "hold the mdm-server role?")
            errors = [e for e in (f.exception() for f in futures) if e is not None]
            if errors:
                raise errors[0]
            return [f.result() for f in futures]
        finally:
            for cid in ids:
                left = self._waiting.pop(cid, None)
                if left is not None and not left.done():
                    left.cancel()
