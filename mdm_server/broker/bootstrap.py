"""The broker's first dynamic-security config: the server's MQTT user, nothing else.

    MDM_MQTT_SERVER_PASSWORD=... python3 mdm_server/broker/bootstrap.py FILE [--user NAME]
    MDM_MQTT_SERVER_PASSWORD=... python -m mdm_server.broker.bootstrap FILE [--user NAME]

Run before Mosquitto starts (``scripts/broker`` does; docker-compose runs it in its
``broker-init`` service). FILE is the plugin's ``plugin_opt_config_file`` in the
broker's data directory:

- missing or empty: it is created with the server's client (``mdm-server`` unless
  ``--user``) holding the role ``mdm-server`` (:data:`SERVER_ACLS`) and default
  access that denies everything but unsubscribing (:data:`DEFAULT_ACL_ACCESS`);
- present (the broker's saved state, devices included): the server's client,
  role and the default access are set to the above, everything else is kept.
  The file is rewritten only if something changed, so a password given again is
  not re-hashed. Run it while the broker is stopped: a running broker overwrites
  the file with its own state when it next saves.

The password comes from the environment, never from the command line (visible
to every local user in ``ps``), and is never printed. The server's role is set
here, while the broker is stopped, because Mosquitto 2.0 disconnects every client
of a role or client that is changed at run time: the server never changes its own.

Standard library only: ``scripts/broker`` runs this file with the system Python.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import secrets
import sys
from collections.abc import Sequence
from typing import Any

__all__ = [
    "DEFAULT_ACL_ACCESS",
    "DEFAULT_SERVER_USER",
    "PASSWORD_ENV",
    "SERVER_ACLS",
    "SERVER_ROLE",
    "ensure_server",
    "main",
]

DEFAULT_SERVER_USER = "mdm-server"
SERVER_ROLE = "mdm-server"
PASSWORD_ENV = "MDM_MQTT_SERVER_PASSWORD"  # noqa: S105  (a variable name)
MIN_PASSWORD = 16
# PBKDF2-SHA512 as the plugin itself hashes (its own default is 101 rounds); more
# rounds for the server's password, which an operator may have chosen by hand.
_ITERATIONS = 10_000
_SALT_BYTES = 12

# (acltype, topic filter): what the server's processes may do (ingest, acks and
# status consumers, command dispatcher, enrollment and revocation). Shared
# subscriptions are checked by Mosquitto 2.0 as the whole "$share/{group}/{filter}",
# hence the second subscribe pattern.
SERVER_ACLS: tuple[tuple[str, str], ...] = (
    ("publishClientSend", "$CONTROL/dynamic-security/v1"),
    ("publishClientReceive", "$CONTROL/dynamic-security/v1/response"),
    ("subscribePattern", "$CONTROL/dynamic-security/v1/response"),
    ("subscribePattern", "mdm/v1/+/devices/+/#"),
    ("subscribePattern", "$share/+/mdm/v1/+/devices/+/#"),
    ("publishClientReceive", "mdm/v1/+/devices/+/#"),
    ("publishClientSend", "mdm/v1/+/devices/+/commands"),
    # OwnTracks devices (issue 12): the ingest reads them, the dispatcher sends
    # their commands.
    ("subscribePattern", "owntracks/+/+/#"),
    ("subscribePattern", "$share/+/owntracks/+/+/#"),
    ("publishClientReceive", "owntracks/+/+/#"),
    ("publishClientSend", "owntracks/+/+/cmd"),
    ("subscribePattern", "$SYS/#"),
    ("publishClientReceive", "$SYS/#"),
)

# Whatever no role allows is denied; unsubscribing is harmless.
DEFAULT_ACL_ACCESS: dict[str, bool] = {
    "publishClientSend": False,
    "publishClientReceive": False,
    "subscribe": False,
    "unsubscribe": True,
}


def _hash(password: str, salt: bytes, iterations: int) -> str:
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return base64.b64encode(digest).decode()


def _password_matches(client: dict[str, Any], password: str) -> bool:
    try:
        salt = base64.b64decode(client["salt"])
        iterations = int(client["iterations"])
        want = str(client["password"])
    except (KeyError, TypeError, ValueError):
        return False
    return iterations > 0 and hmac.compare_digest(_hash(password, salt, iterations), want)


def _role_acls() -> list[dict[str, Any]]:
    return [{"acltype": t, "topic": topic, "priority": 0, "allow": True}
            for t, topic in SERVER_ACLS]


def _acl_key(acl: dict[str, Any]) -> tuple[str, str, int, bool]:
    return (str(acl.get("acltype")), str(acl.get("topic")), int(acl.get("priority", 0)),
            bool(acl.get("allow")))


def ensure_server(doc: dict[str, Any], user: str, password: str) -> bool:
    """Make ``doc`` (a dynamic-security config) hold the server's client, role and
    the default access; True if anything changed."""
    changed = False
    clients = doc.setdefault("clients", [])
    roles = doc.setdefault("roles", [])
    doc.setdefault("groups", [])

    role = next((r for r in roles if r.get("rolename") == SERVER_ROLE), None)
    if role is None:
        role = {"rolename": SERVER_ROLE}
        roles.append(role)
        changed = True
    want_acls = _role_acls()
    if sorted(map(_acl_key, role.get("acls", []))) != sorted(map(_acl_key, want_acls)):
        role["acls"] = want_acls
        changed = True

    client = next((c for c in clients if c.get("username") == user), None)
    if client is None:
        client = {"username": user, "textname": "MDM server"}
        clients.append(client)
        changed = True
    if not _password_matches(client, password):
        salt = secrets.token_bytes(_SALT_BYTES)
        client.update(password=_hash(password, salt, _ITERATIONS),
                      salt=base64.b64encode(salt).decode(), iterations=_ITERATIONS)
        changed = True
    if client.pop("disabled", False):
        changed = True
    if "clientid" in client:  # the server connects under several client ids
        del client["clientid"]
        changed = True
    client_roles = client.setdefault("roles", [])
    if not any(r.get("rolename") == SERVER_ROLE for r in client_roles):
        client_roles.append({"rolename": SERVER_ROLE})
        changed = True

    if doc.get("defaultACLAccess") != DEFAULT_ACL_ACCESS:
        doc["defaultACLAccess"] = dict(DEFAULT_ACL_ACCESS)
        changed = True
    return changed


def _write(path: str, doc: dict[str, Any]) -> None:
    tmp = f"{path}.bootstrap"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bootstrap", description="Create or update the broker's dynamic-security "
        f"config with the server's MQTT user (password from ${PASSWORD_ENV}).")
    p.add_argument("file", help="the plugin's config file (plugin_opt_config_file)")
    p.add_argument("--user", default=DEFAULT_SERVER_USER,
                   help=f"the server's MQTT username (default {DEFAULT_SERVER_USER})")
    args = p.parse_args(argv)
    password = os.environ.get(PASSWORD_ENV, "")
    if len(password) < MIN_PASSWORD:
        print(f"bootstrap: set {PASSWORD_ENV} to the server's MQTT password "
              f"(at least {MIN_PASSWORD} characters)", file=sys.stderr)
        return 2
    if not args.user or any(c in args.user for c in "+#/") or "." in args.user:
        # Device usernames are "{tenant}.{device}": a name without "." never collides.
        print("bootstrap: --user must be non-empty, without '.', '+', '#' or '/'",
              file=sys.stderr)
        return 2
    doc: dict[str, Any] = {}
    try:
        with open(args.file, encoding="utf-8") as fh:
            text = fh.read()
        if text.strip():
            doc = json.loads(text)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        print(f"bootstrap: cannot read {args.file} ({type(exc).__name__})", file=sys.stderr)
        return 1
    if not isinstance(doc, dict):
        print(f"bootstrap: {args.file} is not a dynamic-security config", file=sys.stderr)
        return 1
    if ensure_server(doc, args.user, password):
        _write(args.file, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
