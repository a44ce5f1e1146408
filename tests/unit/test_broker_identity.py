"""The broker's bootstrap config and the derived device passwords (no broker needed;
tests/integration/test_broker_access.py runs them against Mosquitto)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent_protocol import KINDS
from mdm_server.broker import bootstrap
from mdm_server.broker.credentials import device_password
from mdm_server.broker.identity import SyncReport, _plan, device_acls, device_rolename
from mdm_server.storage.devices import DeviceIdentity

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "mdm_server" / "broker" / "bootstrap.py"
KEY = bytes(range(32))


def _bootstrap(path: Path, password: str, *args: str) -> subprocess.CompletedProcess[str]:
    # As scripts/broker runs it: the file on its own, any Python 3, password in the env.
    env = {k: v for k, v in os.environ.items() if k != bootstrap.PASSWORD_ENV}
    env[bootstrap.PASSWORD_ENV] = password
    return subprocess.run([sys.executable, str(SCRIPT), str(path), *args], env=env,
                          capture_output=True, text=True, check=False, cwd="/")


def _verifies(client: dict[str, object], password: str) -> bool:
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(),
                                 base64.b64decode(str(client["salt"])),
                                 int(str(client["iterations"])))
    return base64.b64encode(digest).decode() == client["password"]


def test_bootstrap_writes_the_server_user_and_denies_by_default(tmp_path: Path) -> None:
    path = tmp_path / "dynamic-security.json"
    assert _bootstrap(path, "a-long-enough-password").returncode == 0
    assert path.stat().st_mode & 0o777 == 0o600
    doc = json.loads(path.read_text())
    (client,) = doc["clients"]
    assert client["username"] == "mdm-server" and "clientid" not in client
    assert [r["rolename"] for r in client["roles"]] == ["mdm-server"]
    assert _verifies(client, "a-long-enough-password")
    assert "a-long-enough-password" not in path.read_text()
    (role,) = doc["roles"]
    assert {(a["acltype"], a["topic"]) for a in role["acls"]} == set(bootstrap.SERVER_ACLS)
    assert all(a["allow"] for a in role["acls"])
    # The server may publish commands only (OwnTracks' too), never a device's telemetry.
    sends = {a["topic"] for a in role["acls"] if a["acltype"] == "publishClientSend"}
    assert sends == {"$CONTROL/dynamic-security/v1", "mdm/v1/+/devices/+/commands",
                     "owntracks/+/+/cmd"}
    assert doc["defaultACLAccess"] == {"publishClientSend": False, "publishClientReceive": False,
                                       "subscribe": False, "unsubscribe": True}


def test_bootstrap_keeps_the_devices_and_rewrites_only_on_change(tmp_path: Path) -> None:
    path = tmp_path / "dynamic-security.json"
    assert _bootstrap(path, "first-password-123").returncode == 0
    doc = json.loads(path.read_text())
    doc["clients"].append({"username": "acme.d1", "clientid": "acme.d1", "textname": "x"})
    doc["roles"].append({"rolename": "mdm-device:acme.d1", "acls": []})
    doc["defaultACLAccess"]["subscribe"] = True  # drifted: set back
    path.write_text(json.dumps(doc))
    assert _bootstrap(path, "first-password-123").returncode == 0
    again = json.loads(path.read_text())
    assert {c["username"] for c in again["clients"]} == {"mdm-server", "acme.d1"}
    assert again["defaultACLAccess"]["subscribe"] is False
    before = path.read_text()
    assert _bootstrap(path, "first-password-123").returncode == 0
    assert path.read_text() == before  # same password: not re-hashed, not rewritten
    assert _bootstrap(path, "second-password-456").returncode == 0
    server = next(c for c in json.loads(path.read_text())["clients"]
                  if c["username"] == "mdm-server")
    assert _verifies(server, "second-password-456")


@pytest.mark.parametrize(("password", "args"), [("short", ()), ("long-enough-password", (
    "--user", "acme.d1")), ("long-enough-password", ("--user", "mdm/#"))])
def test_bootstrap_refuses_weak_passwords_and_device_like_names(
        tmp_path: Path, password: str, args: tuple[str, ...]) -> None:
    result = _bootstrap(tmp_path / "f.json", password, *args)
    assert result.returncode == 2
    assert password not in result.stderr
    assert not (tmp_path / "f.json").exists()


def test_device_passwords_are_derived_per_device_and_generation() -> None:
    p = device_password(KEY, "acme", "d1", 1)
    assert p == device_password(KEY, "acme", "d1", 1)
    assert len(p) == 43 and p.replace("-", "").replace("_", "").isalnum()
    others = {device_password(KEY, "acme", "d1", 2), device_password(KEY, "acme", "d2", 1),
              device_password(KEY, "other", "d1", 1), device_password(bytes(32), "acme", "d1", 1)}
    assert p not in others and len(others) == 4
    with pytest.raises(ValueError):
        device_password(KEY, "acme", "d1", 0)  # generation 0: enrolled before, not derivable


def test_a_device_role_names_only_its_own_topics() -> None:
    acls = device_acls("acme", "d1")
    assert all(a["topic"].startswith("mdm/v1/acme/devices/d1/") for a in acls)
    assert all("#" not in a["topic"] for a in acls)
    assert all("+" not in a["topic"] for a in acls)  # literal topics only (issue 10)
    assert {(a["acltype"], a["topic"].rsplit("d1/", 1)[1]) for a in acls} == {
        *(("publishClientSend", f"telemetry/{kind}") for kind in KINDS),
        ("publishClientSend", "acks"), ("publishClientSend", "status"),
        ("subscribeLiteral", "commands"), ("publishClientReceive", "commands")}


def test_reconcile_replaces_the_wildcard_telemetry_acl_of_an_older_role() -> None:
    """A role made before issue 10 allowed telemetry/+ (any sub-topic): the plan
    removes that ACL and adds the kinds' literal topics; an up-to-date role is left
    alone."""
    base = "mdm/v1/acme/devices/d1"
    old = [{"acltype": t, "topic": f"{base}/{topic}", "priority": 0, "allow": True}
           for t, topic in (("publishClientSend", "telemetry/+"),
                            ("publishClientSend", "acks"), ("publishClientSend", "status"),
                            ("subscribeLiteral", "commands"),
                            ("publishClientReceive", "commands"))]
    rolename = device_rolename("acme", "d1")
    client = {"username": "acme.d1", "clientid": "acme.d1",
              "textdescription": "credential generation 1", "roles": [{"rolename": rolename}]}
    want = [DeviceIdentity("acme", "d1", 1, True)]

    def plan(acls: list[dict[str, object]]) -> list[dict[str, object]]:
        return list(_plan(KEY, want, {"acme.d1": client},
                          {rolename: {"rolename": rolename, "acls": acls}}, SyncReport()))

    commands = plan(old)
    assert {(c["command"], c.get("topic")) for c in commands} == {
        ("removeRoleACL", f"{base}/telemetry/+"),
        *(("addRoleACL", f"{base}/telemetry/{kind}") for kind in KINDS)}
    assert all(c["rolename"] == rolename for c in commands)
    assert plan(device_acls("acme", "d1")) == []
