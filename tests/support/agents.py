"""Device agents for integration tests: real MQTT clients running the real agent
code (:class:`agent_protocol.agent.CommandHandler`) on their enrollment credentials,
connected where their enrollment says: over TLS for ``mqtts://``, trusting only the
CA it gave (:func:`tests.support.mqtt.device_tls_context`).

Each agent subscribes to its commands topic, publishes ``online`` on its status
topic after every (re)connection (``offline`` is its will), verifies each command,
records the notice it shows and the action it executes, and publishes its acks.
``hold()`` makes it swallow commands without acting or acking (a phone that died
right after receiving), to test re-sends.

A remote view asks the device's user (:meth:`CommandHandler.answer_consent`):
``consent`` says how the user answers, ``accept`` or ``refuse`` at once, or ``ask``:
the question waits in ``questions`` until the test calls :meth:`DeviceAgent.answer`.
"""

from __future__ import annotations

import base64
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion

from agent_protocol import Status, acks_topic, commands_topic, encode_status, status_topic
from agent_protocol.agent import (
    Action,
    CommandHandler,
    ConsentRequest,
    HandleResult,
    NoticeShown,
)
from tests.support.mqtt import device_tls_context


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class DeviceAgent:
    enrollment: dict[str, Any]
    # Where to connect instead of the enrollment's address (plain text on this host).
    host: str | None = None
    port: int | None = None
    results: list[HandleResult] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    notices: list[NoticeShown] = field(default_factory=list)
    swallowed: list[bytes] = field(default_factory=list)
    retained: int = 0  # commands that arrived with the retain flag: must stay 0
    holding: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    client: paho.Client | None = None
    # A file for the agent's command state (nonces, executed commands, keys), kept
    # across restarts as a real agent must; None: in memory only.
    state: Path | None = None
    # How the user answers a remote view: "accept", "refuse", or "ask" (answer()).
    consent: str = "accept"
    questions: list[ConsentRequest] = field(default_factory=list)
    answers: list[HandleResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        from load_tests.agent_state import FileStateStore

        if self.consent not in ("accept", "refuse", "ask"):
            raise ValueError("consent is accept, refuse or ask")
        e = self.enrollment
        self.tenant, self.device = e["tenant"], e["device"]
        keys = {k: Ed25519PublicKey.from_public_bytes(base64.b64decode(v))
                for k, v in e["server_keys"].items()}
        store = None if self.state is None else FileStateStore(self.state)
        self.handler = CommandHandler(self.tenant, self.device, keys, store=store)
        self.subscribed = threading.Event()

    # -- MQTT ----------------------------------------------------------------

    def start(self, *, clean_session: bool = False, timeout: float = 10.0) -> None:
        m = self.enrollment["mqtt"]
        c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                        client_id=m["client_id"], clean_session=clean_session,
                        protocol=paho.MQTTv311)
        c.username_pw_set(m["username"], m["password"])
        if self.host is None and self.port is None:
            ctx = device_tls_context(self.enrollment)
            if ctx is not None:
                c.tls_set_context(ctx)
        c.will_set(status_topic(self.tenant, self.device),
                   encode_status(Status("offline", _now_ms())), qos=1)
        c.reconnect_delay_set(1, 2)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self.subscribed.clear()
        c.connect(self.host or m["host"], self.port or m["port"], keepalive=30)
        c.loop_start()
        self.client = c
        if not self.subscribed.wait(timeout):
            raise TimeoutError(f"agent {self.device}: no SUBACK")

    def stop(self) -> None:
        c, self.client = self.client, None
        if c is not None:
            c.disconnect()
            c.loop_stop()

    def _on_connect(self, c: paho.Client, u: Any, flags: Any, rc: Any, p: Any) -> None:
        if not rc.is_failure:
            c.subscribe(commands_topic(self.tenant, self.device), qos=1)

    def _on_subscribe(self, c: paho.Client, u: Any, mid: int, rcs: Any, p: Any) -> None:
        c.publish(status_topic(self.tenant, self.device),
                  encode_status(Status("online", _now_ms())), qos=1)
        self.subscribed.set()

    def _on_message(self, c: paho.Client, u: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.retained += int(msg.retain)
            if self.holding:
                self.swallowed.append(msg.payload)
                return
            result = self.handler.handle(msg.payload, _now_ms())
            self.results.append(result)
            if result.action is not None:
                self.actions.append(result.action)
            if result.notice is not None:
                self.notices.append(result.notice)
            payloads = result.payloads()
            if result.consent is not None:
                self.questions.append(result.consent)
                if self.consent != "ask":
                    payloads += self._answer(result.consent.command_id,
                                             self.consent == "accept", _now_ms(), None)
        for payload in payloads:
            c.publish(acks_topic(self.tenant, self.device), payload, qos=1)

    def _answer(self, command_id: str, given: bool, now_ms: int, detail: str | None
                ) -> tuple[bytes, ...]:
        """The user's answer (under the lock): recorded, its acks returned."""
        result = self.handler.answer_consent(command_id, given=given, now_ms=now_ms,
                                             detail=detail)
        self.answers.append(result)
        if result.action is not None:
            self.actions.append(result.action)
        return result.payloads()

    # -- test controls ---------------------------------------------------------

    def hold(self, on: bool = True) -> None:
        with self.lock:
            self.holding = on

    def answer(self, command_id: str, given: bool, *, now_ms: int | None = None,
               detail: str | None = None) -> HandleResult:
        """The device's user answers a question (``consent="ask"``); ``now_ms``: when
        (default now). The acks are published; returns the handler's result."""
        with self.lock:
            payloads = self._answer(command_id, given,
                                    _now_ms() if now_ms is None else now_ms, detail)
            result = self.answers[-1]
        for payload in payloads:
            self.publish_ack(payload)
        return result

    def wait_questions(self, n: int, timeout: float = 30.0) -> list[ConsentRequest]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.questions) >= n:
                    return list(self.questions)
            time.sleep(0.05)
        raise AssertionError(f"agent {self.device}: {len(self.questions)} of {n} questions")

    def publish_ack(self, payload: bytes) -> None:
        """Publish raw ack bytes as this device (forged, late or malformed acks)."""
        assert self.client is not None
        info = self.client.publish(acks_topic(self.tenant, self.device), payload, qos=1)
        info.wait_for_publish(10)

    def wait_results(self, n: int, timeout: float = 30.0) -> list[HandleResult]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.results) >= n:
                    return list(self.results)
            time.sleep(0.05)
        with self.lock:
            raise AssertionError(f"agent {self.device}: {len(self.results)} of {n} commands")
