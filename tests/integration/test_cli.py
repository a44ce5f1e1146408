"""``mdm-server`` as an operator uses it: real processes, real services."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.support.mqtt import publish_as_devices
from tests.support.services import REPO, Broker, Server, server_env, wait_for_count
from tests.support.telemetry import location

pytestmark = pytest.mark.integration


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mdm_server", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_setup_commands(database: str, broker: Broker) -> None:
    env = server_env(database, broker.url)
    first = cli(env, "migrate")
    assert first.returncode == 0, first.stderr
    assert "up to date" in first.stdout  # the fixture migrated already
    assert cli(env, "tenant", "create", "acme").returncode == 0
    again = cli(env, "tenant", "create", "acme")
    assert again.returncode == 2
    assert "exists already" in again.stderr
    admin = cli(env, "admin", "create", "--tenant", "acme", "--name", "alice")
    assert admin.returncode == 0
    assert admin.stdout.strip().startswith("mdm_")
    enrolled = cli(env, "device", "enroll", "--tenant", "acme", "--device", "phone-1",
                   "--ownership", "personal", "--user-email", "jo@example.com")
    assert enrolled.returncode == 0, enrolled.stderr
    info = json.loads(enrolled.stdout)
    assert info["mqtt"]["username"] == "acme.phone-1"
    assert len(info["mqtt"]["password"]) >= 24
    # Where devices must connect: the broker's TLS listener, trusting its own CA
    # (MDM_MQTT_PUBLIC_URL and MDM_MQTT_PUBLIC_CA_FILE, set by server_env).
    assert info["mqtt"]["url"] == f"mqtts://127.0.0.1:{broker.tls_port}"
    assert (info["mqtt"]["port"], info["mqtt"]["tls"]) == (broker.tls_port, True)
    assert info["mqtt"]["ca_pem"] == broker.ca_pem
    assert "PRIVATE KEY" not in enrolled.stdout
    assert info["topics"]["commands"] == "mdm/v1/acme/devices/phone-1/commands"
    assert info["topics"]["telemetry"] == "mdm/v1/acme/devices/phone-1/telemetry/{kind}"
    # The password is not stored, only its hash.
    dump = subprocess.run(["pg_dump", "--data-only", database], capture_output=True,
                          text=True, check=True).stdout
    assert info["mqtt"]["password"] not in dump


@pytest.mark.parametrize(("args", "message"), [
    (("device", "enroll", "--tenant", "acme", "--device", "bad/id", "--ownership",
      "corporate"), "device ids are"),
    (("device", "enroll", "--tenant", "nope", "--device", "d1", "--ownership", "corporate"),
     "no tenant"),
    (("admin", "create", "--tenant", "nope", "--name", "x"), "no tenant"),
    (("tenant", "create", "has space"), "tenant names are"),
])
def test_refusals_are_clear(database: str, broker: Broker, args: tuple[str, ...],
                            message: str) -> None:
    result = cli(server_env(database, broker.url), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_configuration_is_named(broker: Broker) -> None:
    env = server_env("postgresql://x@127.0.0.1:1/x", broker.url)
    del env["MDM_DATABASE_URL"]
    result = cli(env, "migrate")
    assert result.returncode == 2
    assert "MDM_DATABASE_URL is not set" in result.stderr
    env["MDM_DATABASE_URL"] = "postgresql://x@127.0.0.1:1/x"
    env["MDM_HTTP_ADDR"] = "nowhere"
    result = cli(env, "serve")
    assert result.returncode == 2
    assert "MDM_HTTP_ADDR" in result.stderr


def test_serve_runs_http_and_two_ingest_workers(database: str, broker: Broker,
                                                tmp_path: Path) -> None:
    env = server_env(database, broker.url)
    cli(env, "tenant", "create", "acme")
    token = cli(env, "admin", "create", "--tenant", "acme", "--name", "alice").stdout.strip()
    cli(env, "tenant", "create", "other")
    other = cli(env, "admin", "create", "--tenant", "other", "--name", "eve").stdout.strip()
    for d in ("d1", "d2"):
        cli(env, "device", "enroll", "--tenant", "acme", "--device", d, "--ownership",
            "corporate")
    server = Server(env, tmp_path / "serve.log")
    server.start(ingest_workers=2)
    try:
        assert server.proc is not None
        status, health = server.request("GET", "/healthz")
        assert status == 200
        # Open to anyone: up or not, and nothing about any tenant's traffic.
        assert health == {"status": "ok", "ingest": {"broker_connected": True}}
        assert server.request("GET", "/api/v1/devices")[0] == 401
        assert server.request("GET", "/api/v1/devices", "mdm_wrong")[0] == 401
        status, body = server.request("GET", "/api/v1/devices", token)
        assert status == 200
        assert [d["device"] for d in body["devices"]] == ["d1", "d2"]
        status, body = server.request("GET", "/api/v1/devices", other)
        assert (status, body["devices"]) == (200, [])  # another tenant sees none of acme's
        publish_as_devices(broker.port,
                           [location("acme", f"d{1 + i % 2}", i) for i in range(2000)])
        stored = wait_for_count(database, "SELECT count(*) FROM telemetry", 2000)
        assert stored == 2000
        time.sleep(1.5)
        workers = psutil.Process(server.proc.pid).children()
        assert len(workers) == 1  # ingest-1; ingest-0 runs inside serve
    finally:
        server.stop()
    text = server.log_text()
    # Both workers took part (shared subscription) and printed their live lines.
    assert "ingest-0:" in text
    assert "ingest-1:" in text
    assert "records/s" in text
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
