"""Rotating MDM_MASTER_KEY (`mdm-server keys rotate-master`), end to end with a real
server, PostgreSQL and Mosquitto: what was wrapped under the old key opens under
the new one (stored telemetry, the signing key), the audit log verifies under the
new key and no longer under the old, a process started with the old key refuses,
the old key ring epochs are destroyed, and devices keep working on the broker
until they are re-enrolled, which gives them credentials under the new key."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import nacl.secret
import pytest

from agent_protocol import Record, encode_telemetry, telemetry_topic
from mdm_server import audit
from mdm_server.storage.pool import connect
from tests.support.agents import DeviceAgent
from tests.support.mqtt import publish_all, publish_as_devices
from tests.support.services import (
    REPO,
    TEST_MASTER_KEY,
    Broker,
    Server,
    fetchval,
    keyring_dir_for,
    server_env,
    wait_for_count,
)

pytestmark = pytest.mark.integration

IMEI = "356938035643809"


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mdm_server", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _identity(device: str, rid: str) -> tuple[str, bytes]:
    rec = Record(rid, int(time.time() * 1000), {"imei": IMEI, "model": "Pixel 8"})
    return (telemetry_topic("acme", device, "identity"),
            encode_telemetry([rec], device=device, kind="identity"))


def _lock(server: Server, admin: str) -> str:
    status, cmd = server.request("POST", "/api/v1/devices/d1/commands", admin,
                                 {"type": "lock", "reason": "rotation test"})
    assert status == 201, cmd
    path = f"/api/v1/devices/d1/commands/{cmd['command_id']}"
    deadline = time.monotonic() + 30
    while (state := server.request("GET", path, admin)[1]["state"]) != "completed":
        assert time.monotonic() < deadline, f"the lock never completed ({state})"
        time.sleep(0.1)
    return str(cmd["command_id"])


def _owntracks_encrypted(broker: Broker, ot: dict[str, object]) -> None:
    key = str(ot["encryption_key"]).encode().ljust(32, b"\0")[:32]
    plain = json.dumps({"_type": "location", "lat": 52.1, "lon": 5.1,
                        "tst": int(time.time())}).encode()
    data = base64.b64encode(bytes(nacl.secret.SecretBox(key).encrypt(plain))).decode()
    mqtt = ot["mqtt"]
    assert isinstance(mqtt, dict)
    publish_all("127.0.0.1", broker.tls_port,
                [(str(mqtt["topic"]), json.dumps({"_type": "encrypted", "data": data}).encode())],
                client_id=str(ot["username"]), username=str(ot["username"]),
                password=str(ot["password"]),
                tls=ssl.create_default_context(cadata=str(mqtt["ca_pem"])))


async def _verify(database: str, master: bytes) -> audit.VerifyResult:
    conn = await connect(database)
    try:
        return await audit.verify(conn, audit.AuditKeys.derive(master))
    finally:
        await conn.close()


def test_rotating_the_master_key(database: str, broker: Broker, tmp_path: Path) -> None:
    old = base64.b64decode(TEST_MASTER_KEY)
    new = secrets.token_bytes(32)
    new_file = tmp_path / "new.key"
    new_file.write_text(base64.b64encode(new).decode())
    server = Server(server_env(database, broker.url), tmp_path / "serve.log")
    server.cli("tenant", "create", "acme")
    admin = server.cli("admin", "create", "--tenant", "acme", "--name", "alice").strip()
    enrollment = json.loads(server.cli("device", "enroll", "--tenant", "acme", "--device",
                                       "d1", "--ownership", "corporate"))
    # Foreign agents (issue 12): their sealed secrets must open after the rotation.
    ot = json.loads(server.cli("device", "enroll", "--tenant", "acme", "--device", "ot1",
                               "--ownership", "corporate", "--agent", "owntracks"))["owntracks"]
    osm = json.loads(server.cli("device", "enroll", "--tenant", "acme", "--device", "os1",
                                "--ownership", "corporate", "--agent", "osmand"))["osmand"]
    agent = DeviceAgent(enrollment, port=broker.port)
    server.start()
    server.wait_log("acks subscribed")
    agent.start()
    ring = keyring_dir_for(database)
    try:
        publish_as_devices(broker.port, [_identity("d1", "before")])
        wait_for_count(database, "SELECT count(*) FROM telemetry", 1, timeout=30)
        _lock(server, admin)
        epochs_before = sorted(p.name for p in ring.glob("epoch-*.key"))
        # Refused while a server process is connected to the database.
        owner_env = server_env(database, broker.url, superuser=True)
        busy = _cli(owner_env, "keys", "rotate-master", "--new-key-file", str(new_file))
        assert busy.returncode == 2 and "stop serve" in busy.stderr, busy.stderr
    finally:
        server.stop()
    # Refused to the server's own role: the audit log must be MAC'd again.
    as_server = _cli(server.env, "keys", "rotate-master", "--new-key-file", str(new_file))
    assert as_server.returncode == 2 and "owner" in as_server.stderr, as_server.stderr

    done = _cli(owner_env, "keys", "rotate-master", "--new-key-file", str(new_file))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["signing_keys"] >= 1 and report["device_keys"] == 1
    assert report["devices_to_reenroll"] == 2 and report["audit_entries"] >= 3
    assert report["agent_secrets"] == 2
    # The old epochs' files are destroyed; the new epoch's is there.
    after = sorted(p.name for p in ring.glob("epoch-*.key"))
    assert after == [f"epoch-{report['epoch']:06d}.key"]
    assert not set(epochs_before) & set(after)
    for secret in (base64.b64encode(old).decode(), base64.b64encode(new).decode()):
        assert secret not in done.stdout + done.stderr
    # The audit log verifies under the new key and no longer under the old one.
    assert asyncio.run(_verify(database, new)).ok
    assert not asyncio.run(_verify(database, old)).ok

    # A process with the old key refuses at once.
    stale_env = dict(server.env)
    refused = _cli(stale_env, "audit", "verify")
    assert refused.returncode == 2 and "not this database's master key" in refused.stderr

    new_env = {**server.env, "MDM_MASTER_KEY": base64.b64encode(new).decode()}
    server = Server(new_env, tmp_path / "serve-new.log")
    server.start()
    server.wait_log("acks subscribed")
    try:
        # What was sealed under the old key opens; new telemetry is stored and opens.
        publish_as_devices(broker.port, [_identity("d1", "after")])  # its old password
        wait_for_count(database, "SELECT count(*) FROM telemetry", 2, timeout=30)
        status, body = server.request("GET", "/api/v1/devices/d1/data?kind=identity", admin)
        assert status == 200
        assert [r["data"]["imei"] for r in body["records"]] == [IMEI, IMEI]
        # An OwnTracks device's encrypted payload still opens (its secret was sealed
        # again), over MQTT with its old password; the OsmAnd URL still finds its device.
        _owntracks_encrypted(broker, ot)
        wait_for_count(database, "SELECT count(*) FROM telemetry WHERE device_id = 'ot1'",
                       1, timeout=30)
        with urllib.request.urlopen(osm["tracking_url"].split("?")[0] + "?" + urlencode(
                {"id": "os1", "lat": 52.1, "lon": 5.1}), timeout=30) as resp:
            assert resp.status == 200
        assert asyncio.run(fetchval(database, "SELECT count(*) FROM dead_letters")) == 0
        # The signing key was re-encrypted, not replaced: the agent still verifies.
        _lock(server, admin)
        assert len(agent.actions) == 2
        # The device's password cannot be derived any more: listed until re-enrolled.
        assert [json.loads(line) for line in server.cli(
            "device", "stale", "--tenant", "acme").splitlines()] == [
            {"tenant": "acme", "device": "d1"}, {"tenant": "acme", "device": "ot1"}]
        agent.stop()
        fresh = json.loads(server.cli("device", "reenroll", "--tenant", "acme", "--device",
                                      "d1"))
        assert fresh["mqtt"]["password"] != enrollment["mqtt"]["password"]
        assert json.loads(server.cli("device", "stale", "--tenant", "acme")) == {
            "tenant": "acme", "device": "ot1"}
        agent = DeviceAgent(fresh, port=broker.port)
        agent.start()
        _lock(server, admin)
        assert len(agent.actions) == 1
        assert asyncio.run(_verify(database, new)).ok
    finally:
        agent.stop()
        server.stop()
