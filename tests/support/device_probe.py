"""A device's first minute, reported: connect to the broker as its enrollment says
(or as told otherwise), log in, publish one QoS 1 message, and say what happened.

    python -m tests.support.device_probe SPEC.json     # prints the result as JSON

Run as a module so it can run where the test cannot reach directly, e.g. inside
another network namespace (tests.support.netns). SPEC::

    {"host": "...", "port": 8883, "tls": true, "ca_pem": "-----BEGIN ...",
     "username": "...", "password": "...", "client_id": "...",
     "topic": "mdm/v1/...", "payload": "<base64>"}

``outcome`` is one of ``published`` (CONNACK accepted, PUBACK received),
``tcp_refused`` (nothing listens there), ``tls_verify_failed`` (the broker's
certificate is not trusted by ``ca_pem`` or not for ``host``), ``refused``
(CONNACK refused), ``closed`` (connection closed before CONNACK or PUBACK),
``timeout``.
"""

from __future__ import annotations

import base64
import json
import ssl
import sys
import threading
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def attempt(spec: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    result: dict[str, Any] = {"outcome": "timeout"}
    done = threading.Event()
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                    client_id=spec["client_id"], protocol=paho.MQTTv311)
    c.username_pw_set(spec["username"], spec["password"])
    if spec.get("tls"):
        ctx = ssl.create_default_context(cadata=spec.get("ca_pem") or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        c.tls_set_context(ctx)

    def on_connect(client: paho.Client, u: Any, flags: Any, rc: Any, p: Any) -> None:
        if rc.is_failure:
            result.update(outcome="refused", detail=str(rc))
            done.set()
            return
        sock = client.socket()
        result["tls_version"] = sock.version() if isinstance(sock, ssl.SSLSocket) else None
        client.publish(spec["topic"], base64.b64decode(spec["payload"]), qos=1)

    def on_publish(client: paho.Client, u: Any, mid: int, rc: Any, p: Any) -> None:
        result["outcome"] = "published"
        done.set()

    def on_disconnect(client: paho.Client, u: Any, flags: Any, rc: Any, p: Any) -> None:
        if result["outcome"] == "timeout":
            result.update(outcome="closed", detail=str(rc))
        done.set()

    c.on_connect, c.on_publish, c.on_disconnect = on_connect, on_publish, on_disconnect
    try:
        c.connect(spec["host"], int(spec["port"]), keepalive=30)
    except ConnectionRefusedError as exc:
        return {"outcome": "tcp_refused", "detail": str(exc)}
    except ssl.SSLCertVerificationError as exc:
        return {"outcome": "tls_verify_failed", "detail": exc.verify_message}
    except (OSError, ssl.SSLError) as exc:
        return {"outcome": "closed", "detail": f"{type(exc).__name__}: {exc}"}
    c.loop_start()
    try:
        done.wait(timeout)
    finally:
        c.disconnect()
        c.loop_stop()
    return result


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    print(json.dumps(attempt(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
