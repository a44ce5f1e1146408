"""Bulk provisioning: every enrolled device's broker account written straight into
the dynamic-security file while the broker is stopped.

Why: Mosquitto 2.0's plugin rewrites its whole JSON file after every change made
at run time, so N accounts created live cost O(N²) bytes of writing. Measured
here (2.0.11): the first 200 devices 4 s, the 200 after 400 others 11 s; 10,000
would take hours. Importing a fleet (a migration, a benchmark) therefore goes:
enroll into the database, stop the broker, ``mdm-server broker provision-offline
FILE``, start the broker. The running server's reconciler then finds nothing to
do. Day-to-day enrollment stays live (``serve``/``device enroll``).

The accounts written are exactly those :mod:`mdm_server.broker.identity` would
create (same username, client id, role, ACLs, description), so the two agree.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from pathlib import Path
from typing import Any

import asyncpg

from mdm_server.agents import URL_KEY_AGENTS
from mdm_server.broker.bootstrap import _hash, _write
from mdm_server.broker.credentials import device_password
from mdm_server.broker.identity import (
    ROLE_PREFIX,
    TEXTNAME,
    _generation_text,
    device_acls,
    device_rolename,
)
from mdm_server.storage.devices import device_identities, mqtt_username

__all__ = ["provision_offline"]

# What the plugin itself uses for passwords set through its API (Mosquitto 2.0).
_ITERATIONS = 101


async def provision_offline(conn: asyncpg.Connection, master_key: bytes, path: Path
                            ) -> dict[str, int]:
    """Make ``path`` (the plugin's config) hold an account for every enrolled device
    and none for others; the server's own account and anything not ours is kept.
    Run only while the broker is stopped (it overwrites the file when it saves)."""
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    ours = {c.get("username"): c for c in doc.get("clients", [])
            if c.get("textname") == TEXTNAME}
    clients = [c for c in doc.get("clients", []) if c.get("textname") != TEXTNAME]
    roles = [r for r in doc.get("roles", [])
             if not str(r.get("rolename", "")).startswith(ROLE_PREFIX)]
    written = skipped = 0
    for dev in await device_identities(conn):
        if not dev.enrolled or dev.agent in URL_KEY_AGENTS:  # HTTP only: no account
            continue
        if dev.generation < 1:
            skipped += 1
            continue
        user = mqtt_username(dev.tenant, dev.device)
        rolename = device_rolename(dev.tenant, dev.device)
        if dev.stale:
            # A password from a master key since rotated away: keep the account the
            # file has (the device's password); none to keep, none to make.
            kept = ours.get(user)
            if kept is None:
                skipped += 1
                continue
            clients.append(kept)
            roles.append({"rolename": rolename,
                          "acls": device_acls(dev.tenant, dev.device, dev.agent)})
            written += 1
            continue
        salt = secrets.token_bytes(12)
        password = device_password(master_key, dev.tenant, dev.device, dev.generation)
        clients.append({
            "username": user, "clientid": user, "textname": TEXTNAME,
            "textdescription": _generation_text(dev.generation),
            "password": _hash(password, salt, _ITERATIONS),
            "salt": base64.b64encode(salt).decode(), "iterations": _ITERATIONS,
            "roles": [{"rolename": rolename}],
        })
        roles.append({"rolename": rolename, "acls": device_acls(dev.tenant, dev.device, dev.agent)})
        written += 1
    doc["clients"], doc["roles"] = clients, roles
    doc.setdefault("groups", [])
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(os.fspath(path), doc)
    return {"devices": written, "not_derivable": skipped}
