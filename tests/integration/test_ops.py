"""What an operator watches, on real processes: /livez and /readyz, /metrics
(MDM_METRICS_ADDR), and the logs."""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent_protocol import Record, encode_telemetry, telemetry_topic
from tests.support.mqtt import publish_as_devices
from tests.support.services import (
    REPO,
    Broker,
    Server,
    free_port,
    server_env,
    wait_for_count,
)
from tests.support.telemetry import location

pytestmark = pytest.mark.integration

TENANT = "opsacme"
DEVICES = ("phone-7f3a9c", "tablet-2b8e41")


def cli(env: dict[str, str], *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mdm_server", *args], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_until(check: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics text, parsed by prometheus-client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def exposed_names(text: str) -> set[str]:
    """Every name a PromQL query may use: samples' names, and each family's (a family
    without samples yet, e.g. commands when there are none, has its HELP and TYPE)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


def dashboard_metric_names() -> set[str]:
    """The metric names deploy/grafana/mdm.json's queries use."""
    dashboard = json.loads((REPO / "deploy" / "grafana" / "mdm.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    return {m for e in exprs for m in re.findall(r"\bmdm_[a-z_]+\b", e)}


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def setup(database: str, broker: Broker) -> dict[str, str]:
    env = server_env(database, broker.url, MDM_METRICS_ADDR=f"127.0.0.1:{free_port()}")
    cli(env, "tenant", "create", TENANT)
    for d in DEVICES:
        cli(env, "device", "enroll", "--tenant", TENANT, "--device", d, "--ownership",
            "corporate")
    return env


def compose_healthcheck(base: str) -> int:
    """docker-compose.yml's health check of the server, run against ``base``."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    check = compose["services"]["server"]["healthcheck"]["test"]
    assert check[:2] == ["CMD", "python"]
    args = [a.replace("http://127.0.0.1:8080", base) for a in check[2:]]
    return subprocess.run([sys.executable, *args], capture_output=True, timeout=30).returncode


def test_readyz_follows_the_broker_livez_stays(setup: dict[str, str], broker: Broker,
                                               tmp_path: Path) -> None:
    server = Server(setup, tmp_path / "serve.log")
    server.start(ingest_workers=2)
    try:
        # Ready within a moment of the workers' subscriptions (a worker process
        # reports its state twice a second).
        wait_until(lambda: get(server.base + "/readyz")[0] == 200, timeout=10,
                   what="never ready")
        status, body = get(server.base + "/readyz")
        assert (status, json.loads(body)) == (200, {"status": "ready"})
        assert get(server.base + "/livez")[0] == 200
        assert compose_healthcheck(server.base) == 0
        broker.stop()

        def not_ready() -> bool:
            status, body = get(server.base + "/readyz")
            return status == 503 and json.loads(body) == {"status": "not ready",
                                                          "reason": "broker"}
        wait_until(not_ready, what="/readyz still ready with the broker stopped")
        assert get(server.base + "/livez")[0] == 200
        assert compose_healthcheck(server.base) != 0
        # /healthz keeps its old meaning and shape (nothing more for anonymous callers).
        status, body = get(server.base + "/healthz")
        assert status == 200
        assert json.loads(body) == {"status": "ok", "ingest": {"broker_connected": False}}
        broker.start()
        wait_until(lambda: get(server.base + "/readyz")[0] == 200, timeout=60,
                   what="/readyz not ready again after the broker came back")
        assert get(server.base + "/livez")[0] == 200
    finally:
        server.stop()


def _identity(device: str, imei: str) -> tuple[str, bytes]:
    rec = Record(id=f"r-{uuid.uuid4().hex[:8]}", ts_ms=int(time.time() * 1000),
                 data={"imei": imei, "model": "test"})
    return (telemetry_topic(TENANT, device, "identity"),
            encode_telemetry([rec], device=device, kind="identity"))


def test_metrics_count_every_worker_and_name_nobody(setup: dict[str, str], database: str,
                                                    broker: Broker, tmp_path: Path) -> None:
    token = cli(setup, "admin", "create", "--tenant", TENANT, "--name", "opsalice").strip()
    server = Server(setup, tmp_path / "serve.log")
    server.start(ingest_workers=2)
    metrics_url = f"http://{setup['MDM_METRICS_ADDR']}/metrics"
    imei = f"35{secrets.randbelow(10**13):013d}"
    n = 3000
    try:
        # Not on the API's port.
        assert get(server.base + "/metrics")[0] == 404
        messages = [location(TENANT, DEVICES[i % 2], i) for i in range(n - 1)]
        messages.append(_identity(DEVICES[0], imei))
        messages.append((telemetry_topic(TENANT, DEVICES[1], "location"), b"not json"))
        publish_as_devices(broker.port, messages)
        wait_for_count(database, "SELECT count(*) FROM telemetry", n)
        status, _ = server.request("GET", f"/api/v1/devices/{DEVICES[0]}/commands", token)
        assert status == 200
        assert server.request("GET", f"/api/v1/devices/{DEVICES[1]}/commands")[0] == 401

        def scraped() -> str:
            status, body = get(metrics_url)
            assert status == 200
            return body.decode()

        wait_until(lambda: value(scraped(), "mdm_ingest_records_stored_total") >= n,
                   what="records stored never reached n")
        wait_until(lambda: value(scraped(), "mdm_ingest_dead_letters_total",
                                 reason="not_json") >= 1, what="no dead letter counted")
        text = scraped()
        assert value(text, "mdm_ingest_records_stored_total") == n
        assert value(text, "mdm_ingest_messages_total") == n + 1
        assert value(text, "mdm_ingest_dead_letters_total", reason="not_json") == 1
        assert value(text, "mdm_ingest_workers") == 2
        wait_until(lambda: value(scraped(), "mdm_ingest_workers_connected") == 2,
                   what="not every worker reported connected")
        route = "/api/v1/devices/{device}/commands"
        assert value(text, "mdm_http_requests_total", route=route, method="GET",
                     status="200") == 1
        assert value(text, "mdm_http_requests_total", route=route, method="GET",
                     status="401") == 1
        assert value(text, "mdm_http_request_seconds_count", route=route, method="GET") == 2
        assert value(text, "mdm_ingest_batch_messages_count") >= 2  # two workers' batches
        # The Grafana dashboard in deploy/ asks for nothing /metrics lacks.
        missing = dashboard_metric_names() - exposed_names(text)
        assert not missing, missing
        # Nothing personal, no tenant, no device, no value from telemetry.
        for secret in (*DEVICES, TENANT, imei, token, "opsalice"):
            assert secret not in text
    finally:
        server.stop()
    # The total is both processes' own: each stored some (their live lines, the
    # last one at the stop, say).
    stored = {m[1]: int(m[2].replace(",", "")) for m in re.finditer(
        r"(ingest-\d+): .*? stored=([\d,]+)", server.log_text())}
    assert stored.get("ingest-0", 0) > 0, stored
    assert stored.get("ingest-1", 0) > 0, stored


def _json_lines(text: str) -> list[dict[str, object]]:
    entries = []
    for line in text.splitlines():
        entry = json.loads(line)  # every line: one JSON object
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_json_logs_name_no_value_idle_is_quiet_and_shutdown_warns_nothing(
        setup: dict[str, str], database: str, broker: Broker, tmp_path: Path,
        stop: signal.Signals) -> None:
    env = {**setup, "MDM_LOG_FORMAT": "json"}
    server = Server(env, tmp_path / "serve.log")
    server.start(ingest_workers=2)
    imei = f"35{secrets.randbelow(10**13):013d}"
    lat = 48.8566135
    try:
        # A raw value in a stored record and in one the database refuses: neither
        # may reach the log.
        rec = Record(id="r-1", ts_ms=int(time.time() * 1000),
                     data={"lat": lat, "lon": 2.3522, "accuracy_m": 3.0, "source": "gps"})
        publish_as_devices(broker.port, [
            _identity(DEVICES[0], imei),
            (telemetry_topic(TENANT, DEVICES[1], "location"),
             encode_telemetry([rec], device=DEVICES[1], kind="location")),
            (telemetry_topic(TENANT, DEVICES[0], "identity"),
             b'{"v": 1, "imei": "' + imei.encode() + b'", "broken": '),
        ])
        wait_for_count(database, "SELECT count(*) FROM telemetry", 2)
        wait_until(lambda: get(server.base + "/readyz")[0] == 200, what="never ready")
        time.sleep(2.5)  # the last live lines of the publishing above
        before = len(server.log_text().splitlines())
        time.sleep(6)  # idle
        idle = server.log_text().splitlines()[before:]
        assert len(idle) <= 2, idle
        before = len(server.log_text().splitlines())
        assert server.proc is not None
        server.proc.send_signal(stop)
        server.proc.wait(timeout=30)
        server.proc = None
    finally:
        server.stop()
    text = server.log_text()
    entries = _json_lines(text)
    assert entries, "nothing logged"
    for e in entries:
        assert {"time", "level", "logger", "message", "worker"} <= e.keys(), e
    assert {e["worker"] for e in entries} >= {"serve", "ingest-1"}
    assert any("records/s" in str(e["message"]) for e in entries)  # the live line
    for value in (imei, str(lat), "48.856"):
        assert value not in text
    shutdown = entries[before:]
    assert shutdown, "the shutdown logged nothing at all"
    assert not [e for e in shutdown if e["level"] in ("WARNING", "ERROR", "CRITICAL")], shutdown


def test_a_metrics_address_in_use_is_said_plainly(setup: dict[str, str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**setup, "MDM_METRICS_ADDR": f"127.0.0.1:{port}"}
        out = subprocess.run([sys.executable, "-m", "mdm_server", "serve"], env=env,
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        f"mdm-server: cannot listen on 127.0.0.1:{port} (MDM_METRICS_ADDR): "
        "Address already in use")
    assert "Traceback" not in out.stderr


def test_readyz_sees_a_stuck_or_dead_worker_process(setup: dict[str, str],
                                                     tmp_path: Path) -> None:
    import psutil

    server = Server(setup, tmp_path / "serve.log")
    server.start(ingest_workers=2)
    try:
        wait_until(lambda: get(server.base + "/readyz")[0] == 200, timeout=10,
                   what="never ready")
        assert server.proc is not None
        (child,) = psutil.Process(server.proc.pid).children()

        def reason() -> str | None:
            status, body = get(server.base + "/readyz")
            return None if status == 200 else str(json.loads(body)["reason"])

        child.suspend()  # its event loop stops: it reports nothing any more
        try:
            wait_until(lambda: reason() == "ingest_worker_stalled", timeout=40,
                       what="a stopped worker still counted as ready")
        finally:
            child.resume()
        wait_until(lambda: reason() is None, timeout=20, what="not ready after SIGCONT")
        child.kill()
        wait_until(lambda: reason() == "ingest_worker_exited", timeout=20,
                   what="a killed worker still counted as ready")
        assert get(server.base + "/livez")[0] == 200
    finally:
        server.stop()


def test_readyz_follows_the_database(broker: Broker, tmp_path: Path) -> None:
    import asyncio

    from tests.support.services import private_postgres

    with private_postgres() as pg:
        database = asyncio.run(pg.create_database())
        server = Server(server_env(database, broker.url), tmp_path / "serve.log")
        server.start()
        try:
            wait_until(lambda: get(server.base + "/readyz")[0] == 200, timeout=10,
                       what="never ready")
            pg.stop()
            wait_until(lambda: get(server.base + "/readyz") == (
                503, b'{"status": "not ready", "reason": "database"}'),
                what="ready without its database")
            assert get(server.base + "/livez")[0] == 200
            pg.start()
            wait_until(lambda: get(server.base + "/readyz")[0] == 200, timeout=60,
                       what="not ready again after the database came back")
        finally:
            server.stop()


def test_commands_are_counted_by_type_and_state_with_their_ack_latency(
        database: str, broker: Broker, tmp_path: Path) -> None:
    import asyncio

    from tests.support.agents import DeviceAgent
    from tests.support.services import enroll_devices

    [enrolled] = asyncio.run(enroll_devices(database, broker.url, TENANT, [DEVICES[0]]))
    env = server_env(database, broker.url, MDM_METRICS_ADDR=f"127.0.0.1:{free_port()}")
    admin = cli(env, "admin", "create", "--tenant", TENANT, "--name", "opsalice").strip()
    server = Server(env, tmp_path / "serve.log")
    agent = DeviceAgent(enrolled)
    server.start()
    server.wait_log("acks subscribed")
    agent.start()
    metrics_url = f"http://{env['MDM_METRICS_ADDR']}/metrics"
    try:
        status, cmd = server.request("POST", f"/api/v1/devices/{DEVICES[0]}/commands", admin,
                                     {"type": "lock", "reason": "left on a train"})
        assert status == 201, cmd

        def completed() -> bool:
            text = get(metrics_url)[1].decode()
            return (value(text, "mdm_commands", type="lock", state="completed") == 1
                    and value(text, "mdm_command_ack_seconds_count") >= 1)
        # The command table is read at most every 10 s.
        wait_until(completed, timeout=40, what="the completed lock was never counted")
        text = get(metrics_url)[1].decode()
        assert value(text, "mdm_command_outbox_depth") == 0
        assert value(text, "mdm_command_broker_connected", client="dispatch") == 1
        assert value(text, "mdm_command_broker_connected", client="acks") == 1
        assert DEVICES[0] not in text and TENANT not in text
        assert "left on a train" not in text
    finally:
        agent.stop()
        server.stop()
