"""``mdm-server`` as an operator uses it: real processes, real services."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil
import pytest

from tests.support.mqtt import publish_as_devices
from tests.support.services import (
    REPO,
    Broker,
    Server,
    create_database,
    drop_database,
    pg_admin_url,
    server_env,
    wait_for_count,
    with_database,
)
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


def test_listing_tenants_admins_and_devices(database: str, broker: Broker) -> None:
    env = server_env(database, broker.url)
    assert cli(env, "tenant", "create", "acme").returncode == 0
    assert cli(env, "tenant", "create", "globex").returncode == 0
    token = cli(env, "admin", "create", "--tenant", "acme", "--name", "alice").stdout.strip()
    cli(env, "admin", "create", "--tenant", "acme", "--name", "eve", "--role", "auditor")
    cli(env, "user", "token", "--tenant", "acme", "--device", "nope")  # refused: no device
    for device, ownership in (("phone-2", "corporate"), ("phone-1", "personal")):
        assert cli(env, "device", "enroll", "--tenant", "acme", "--device", device,
                   "--ownership", ownership, "--group", "field").returncode == 0
    tenants = [json.loads(line) for line in cli(env, "tenant", "list").stdout.splitlines()]
    assert [(t["tenant"], t["devices"], t["admins"]) for t in tenants] == [
        ("acme", 2, 2), ("globex", 0, 0)]
    admins = cli(env, "admin", "list", "--tenant", "acme")
    assert admins.returncode == 0
    listed = [json.loads(line) for line in admins.stdout.splitlines()]
    assert sorted((a["name"], a["role"], a["state"]) for a in listed) == [
        ("alice", "admin", "active"), ("eve", "auditor", "active")]
    assert token not in admins.stdout
    devices = cli(env, "device", "list", "--tenant", "acme")
    assert devices.returncode == 0
    assert [(d["device"], d["ownership"], d["groups"], d["status"]) for d in
            map(json.loads, devices.stdout.splitlines())] == [
        ("phone-1", "personal", ["field"], "enrolled"),
        ("phone-2", "corporate", ["field"], "enrolled")]
    assert cli(env, "device", "list", "--tenant", "globex").stdout == ""
    for args in (("admin", "list"), ("device", "list"), ("audit", "list"), ("token", "list")):
        nope = cli(env, *args, "--tenant", "nope")
        assert (nope.returncode, nope.stderr.strip()) == (2, "mdm-server: no tenant 'nope'")


def test_a_database_that_is_missing_unknown_or_not_migrated_is_one_clear_line(
        broker: Broker) -> None:
    missing = server_env(with_database(pg_admin_url(), "mdm_no_such_db"), broker.url)
    result = cli(missing, "tenant", "list")
    assert result.returncode == 3
    assert result.stderr.strip().splitlines() == [
        "mdm-server: the database named in MDM_DATABASE_URL does not exist: create it "
        "(createdb NAME, as a superuser), then run `mdm-server migrate`"]
    admin = urlsplit(pg_admin_url())
    nobody = server_env(urlunsplit(admin._replace(
        netloc="mdm_no_such_role@" + admin.netloc.rsplit("@", 1)[-1])), broker.url)
    result = cli(nobody, "tenant", "list")
    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "refused the login" in result.stderr
    assert 'role "mdm_no_such_role" does not exist' in result.stderr
    bare = asyncio.run(create_database("mdm_bare", migrate=False))
    try:
        for args in (("tenant", "list"), ("tenant", "create", "acme")):
            result = cli(server_env(bare, broker.url, superuser=True), *args)
            assert result.returncode == 3, result.stderr
            assert result.stderr.strip().splitlines() == [
                "mdm-server: the database is not migrated to this version of mdm-server: "
                "run `mdm-server migrate` first (as a superuser)"]
    finally:
        asyncio.run(drop_database(bare))


def test_a_port_in_use_is_named_before_anything_starts(database: str, broker: Broker) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = server_env(database, broker.url, MDM_HTTP_ADDR=f"127.0.0.1:{port}")
        result = cli(env, "serve")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"mdm-server: cannot listen on 127.0.0.1:{port} (MDM_HTTP_ADDR): "
        "Address already in use")
    assert "Traceback" not in result.stderr
    assert "cannot reach" not in result.stderr


def test_help_names_the_environment_and_exit_statuses() -> None:
    text = cli({**{k: v for k, v in os.environ.items() if not k.startswith("MDM_")},
                "PYTHONPATH": str(REPO)}, "--help").stdout
    used = set(re.findall(r'"(MDM_[A-Z_]+)"', "\n".join(
        p.read_text() for p in (REPO / "mdm_server").rglob("*.py"))))
    used.discard("MDM_TEST_UNSAFE_ACK_BEFORE_COMMIT")  # the tests' own switch
    assert used and all(name in text for name in used), sorted(n for n in used if n not in text)
    assert "exit status:" in text


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


def test_every_option_of_every_command_is_described() -> None:
    import argparse

    from mdm_server.cli import _parser

    bare: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif not action.help:
                bare.append(" ".join([*path, *(action.option_strings or [action.dest])]))

    walk(_parser(), ["mdm-server"])
    assert bare == []
