"""What ``device enroll ... --agent`` prints for a foreign agent: the app's settings.

OwnTracks (MQTT or HTTP mode, the user's choice on the phone):

- MQTT: the broker's host, port and TLS as enrollment gives every device, the
  device's own broker username and password (the native agent's: one account),
  client id = username, device id, tracker id (``tid``, 2 characters), the
  payload encryption passphrase; the app then publishes on
  ``owntracks/{username}/{device}``. Publishing is at QoS 1, never retained (the
  broker refuses retained messages and QoS 2: docs/architecture.md, "Broker
  durability"), and the app subscribes only to its own ``.../cmd``.
- HTTP: ``{MDM_PUBLIC_URL}/owntracks``, HTTP Basic with the same username and
  password.

Each comes with an ``.otrc`` configuration (``_type: configuration``) the apps
import, mode 0 (MQTT) and mode 3 (HTTP).

OsmAnd / Traccar Client: the URL to paste into the app,
``{MDM_PUBLIC_URL}/osmand/{key}``: for the OsmAnd app a whole tracking URL
template with ``id=`` and its placeholders; for Traccar Client the server URL
and the device identifier (= the device id). The key is the only credential
these apps can send.
"""

from __future__ import annotations

import re
from typing import Any

from mdm_server.config import MqttSettings

__all__ = ["osmand_setup", "owntracks_setup", "owntracks_topic_base", "tracker_id"]

_TID = re.compile(r"[A-Za-z0-9]{2}")
# The OsmAnd app's online tracking URL template (its placeholders, in its order).
_OSMAND_TEMPLATE = ("lat={0}&lon={1}&timestamp={2}&hdop={3}&altitude={4}&speed={5}"
                    "&bearing={6}")


def tracker_id(device: str) -> str:
    """The app's 2-character tracker id: the device id's last two letters or digits
    (the apps' own default), else ``MD``."""
    tail = re.sub(r"[^A-Za-z0-9]", "", device)[-2:]
    return tail if _TID.fullmatch(tail) else "MD"


def owntracks_topic_base(username: str, device: str) -> str:
    return f"owntracks/{username}/{device}"


def owntracks_setup(*, device: str, username: str, password: str, secret: str,
                    broker: MqttSettings, ca_pem: str | None, public_url: str
                    ) -> dict[str, Any]:
    tid = tracker_id(device)
    http_url = public_url.rstrip("/") + "/owntracks"
    common = {"_type": "configuration", "auth": True, "username": username,
              "password": password, "deviceId": device, "tid": tid,
              "encryptionKey": secret}
    return {
        "device_id": device,
        "tracker_id": tid,
        "username": username,
        "password": password,
        "encryption_key": secret,
        "mqtt": {
            "host": broker.host, "port": broker.port, "tls": broker.tls,
            "ca_pem": ca_pem, "client_id": username,
            "topic": owntracks_topic_base(username, device),
            "qos": 1, "retain": False,
        },
        "http": {"url": http_url},
        "otrc_mqtt": {
            **common, "mode": 0, "host": broker.host, "port": broker.port,
            "tls": broker.tls, "clientId": username,
            "pubTopicBase": "owntracks/%u/%d", "pubQos": 1, "pubRetain": False,
            "willRetain": False, "sub": False, "cmd": True,
            "subTopic": owntracks_topic_base(username, device) + "/cmd",
            "cleanSession": False, "keepalive": 60,
        },
        "otrc_http": {**common, "mode": 3, "url": http_url, "cmd": True},
    }


def osmand_setup(*, agent: str, device: str, key: str, public_url: str) -> dict[str, Any]:
    url = f"{public_url.rstrip('/')}/osmand/{key}"
    out: dict[str, Any] = {"device_id": device, "url": url}
    if agent == "osmand":
        out["tracking_url"] = f"{url}?id={device}&{_OSMAND_TEMPLATE}"
    else:
        out["server_url"] = url
        out["device_identifier"] = device
    return out
