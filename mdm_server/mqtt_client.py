"""How every paho client of the server logs in to the broker: the credentials of
``MDM_MQTT_URL`` and, for ``mqtts://``, TLS that checks the broker's certificate
and host name (against ``MDM_MQTT_CA_FILE`` when set, else the system's CAs)."""

from __future__ import annotations

import paho.mqtt.client as paho

from mdm_server.config import MqttSettings

__all__ = ["configure"]


def configure(client: paho.Client, settings: MqttSettings) -> None:
    """Set ``client``'s login and transport from ``settings`` (before connecting)."""
    if settings.username:
        client.username_pw_set(settings.username, settings.password)
    ctx = settings.ssl_context()
    if ctx is not None:
        client.tls_set_context(ctx)
