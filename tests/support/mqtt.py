"""A small, exact QoS 1 publisher for tests: every message is PUBACKed or it raises."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def publish_all(
    host: str,
    port: int,
    messages: Iterable[tuple[str, bytes]],
    *,
    client_id: str = "",
    max_inflight: int = 1000,
    timeout: float = 300.0,
) -> int:
    """Publish at QoS 1 with at most ``max_inflight`` unacknowledged (paho's mids
    are 16-bit); return the count once every one is acknowledged by the broker."""
    window = threading.Semaphore(max_inflight)
    done = threading.Event()
    state = {"sent": 0, "acked": 0, "finished": False}
    lock = threading.Lock()

    def on_publish(client: paho.Client, userdata: object, mid: int, rc: object,
                   props: object) -> None:
        window.release()
        with lock:
            state["acked"] += 1
            if state["finished"] and state["acked"] == state["sent"]:
                done.set()

    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=paho.MQTTv311)
    c.max_inflight_messages_set(max_inflight)
    c.max_queued_messages_set(0)
    c.on_publish = on_publish
    c.connect(host, port, keepalive=60)
    c.loop_start()
    deadline = time.monotonic() + timeout
    try:
        for topic, payload in messages:
            if not window.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise TimeoutError("broker stopped acknowledging publishes")
            info = c.publish(topic, payload, qos=1)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"publish failed: {paho.error_string(info.rc)}")
            with lock:
                state["sent"] += 1
        with lock:
            state["finished"] = True
            if state["acked"] == state["sent"]:
                done.set()
        if not done.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"only {state['acked']} of {state['sent']} acknowledged")
        return state["sent"]
    finally:
        c.disconnect()
        c.loop_stop()
