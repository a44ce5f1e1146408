"""Each device's MQTT password, derived rather than stored.

``password = base64url(HMAC-SHA256(K, "{tenant}/{device}/{generation}"))`` with
``K = HMAC-SHA256(master key, "mqtt-device-password")``. The database keeps only
the generation (``devices.mqtt_generation``, bumped by every re-enrollment) and a
PBKDF2 hash of the password; the broker keeps its own hash. So the server can give
a broker that lost its state every device's client again without a stored
password, a database dump alone reveals no password, and a new generation makes
the old password useless. Whoever holds the master key can compute every
device's password: it is the root secret already (docs/architecture.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

__all__ = ["device_password"]

_LABEL = b"mqtt-device-password"


def device_password(master_key: bytes, tenant: str, device: str, generation: int) -> str:
    """The MQTT password of ``tenant``/``device`` at credential ``generation`` (>= 1):
    43 URL-safe characters (256 bits)."""
    if len(master_key) != 32:
        raise ValueError("the master key is 32 bytes")
    if generation < 1:
        raise ValueError("credential generations start at 1")
    if "/" in tenant or "/" in device:  # ids are [A-Za-z0-9_-]; "/" keeps the input unambiguous
        raise ValueError("tenant and device ids cannot contain '/'")
    key = hmac.new(master_key, _LABEL, hashlib.sha256).digest()
    mac = hmac.new(key, f"{tenant}/{device}/{generation}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")
