"""Transport security as a device and an operator meet it, against real PostgreSQL,
Mosquitto (scripts/broker) and ``mdm-server serve``:

- a device connects over TLS with the CA its enrollment printed, and what it
  publishes is stored; a CA other than that one, or a name the broker's
  certificate is not for, fails verification;
- from another host (a second network namespace) the broker's plain listener is
  not there at all, its TLS listener is; a broker told ``--plain-bind 0.0.0.0``
  shows the namespace could have reached plain text;
- the server reaches the broker over TLS too (mqtts://, MDM_MQTT_CA_FILE), and
  refuses a broker whose certificate its CA did not sign;
- serve terminates HTTPS with a self-made certificate and sends HSTS;
- serve and ingest refuse to start without MDM_MQTT_URL, with plain text to
  another host, or with a master key published in the repository.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agent_protocol import Record, encode_telemetry, telemetry_topic
from mdm_server.broker import certs
from tests.support.netns import OutsideHost, outside_host
from tests.support.services import (
    BROKER_SCRIPT,
    REPO,
    TEST_MASTER_KEY,
    Broker,
    Server,
    enroll_devices,
    fetch_telemetry,
    free_port,
    server_env,
    wait_for_count,
    wait_port,
)

pytestmark = pytest.mark.integration

TENANT = "acme"
COMPOSE_DEV_KEY = "ZGV2LW9ubHktbWFzdGVyLWtleS1jaGFuZ2UtbWUhISE="  # docker-compose's old default


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mdm_server", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def enroll(env: dict[str, str], device: str) -> dict[str, Any]:
    """``mdm-server device enroll`` (creating the tenant first if needed): its JSON."""
    cli(env, "tenant", "create", TENANT)
    out = cli(env, "device", "enroll", "--tenant", TENANT, "--device", device,
              "--ownership", "corporate")
    assert out.returncode == 0, out.stderr
    enrollment: dict[str, Any] = json.loads(out.stdout)
    return enrollment


def location(device: str, record_id: str) -> tuple[str, bytes]:
    now = int(time.time() * 1000)
    return (telemetry_topic(TENANT, device, "location"),
            encode_telemetry([Record(id=record_id, ts_ms=now,
                                     data={"lat": 52.37, "lon": 4.89})],
                             device=device, kind="location"))


def spec(enrollment: dict[str, Any], record_id: str, **override: Any) -> dict[str, Any]:
    """What the device does with its enrollment (tests.support.device_probe),
    ``override`` changing where it goes or what it trusts."""
    m = enrollment["mqtt"]
    topic, payload = location(enrollment["device"], record_id)
    return {"host": m["host"], "port": m["port"], "tls": m["url"].startswith("mqtts://"),
            "ca_pem": m["ca_pem"], "username": m["username"], "password": m["password"],
            "client_id": m["client_id"], "topic": topic,
            "payload": base64.b64encode(payload).decode(), **override}


def probe(tmp: Path, name: str, s: dict[str, Any],
          outside: OutsideHost | None = None) -> dict[str, Any]:
    """The device (tests.support.device_probe) in a process of its own, inside the
    other namespace if ``outside``."""
    path = tmp / f"probe-{name}.json"
    path.write_text(json.dumps(s))
    path.chmod(0o600)  # the device's password
    argv = [sys.executable, "-m", "tests.support.device_probe", str(path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if outside is not None:
        out = outside.run(argv, env=env)
    else:
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60,
                             check=False)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def stored(database: str, device: str) -> list[dict[str, Any]]:
    return asyncio_run(fetch_telemetry(database, f"device_id = '{device}'"))


def asyncio_run(coro: Any) -> Any:
    import asyncio

    return asyncio.run(coro)


# --- a device over TLS ----------------------------------------------------------------


def test_a_device_connects_over_tls_with_the_ca_its_enrollment_printed(
        database: str, broker: Broker, tmp_path: Path) -> None:
    env = server_env(database, broker.url)
    e = enroll(env, "phone-1")
    assert e["mqtt"]["url"] == f"mqtts://127.0.0.1:{broker.tls_port}"
    assert e["mqtt"]["tls"] is True
    assert e["mqtt"]["ca_pem"] == broker.ca_pem
    server = Server(env, tmp_path / "serve.log")
    server.start()
    try:
        result = probe(tmp_path, "r-1", spec(e, "r-1"))
        assert result["outcome"] == "published", result
        assert result["tls_version"] in ("TLSv1.2", "TLSv1.3")
        assert wait_for_count(database, "SELECT count(*) FROM telemetry", 1) == 1
    finally:
        server.stop()
    (row,) = stored(database, "phone-1")
    assert row["data"]["lat"] == 52.37
    # It came in on the TLS listener.
    log = (broker.dir / "mosquitto.log").read_text()
    assert f"on port {broker.tls_port}" in log
    assert f"as {TENANT}.phone-1" in log


def test_a_ca_other_than_the_enrollments_fails_verification(
        database: str, broker: Broker, tmp_path: Path) -> None:
    (e,) = asyncio_run(enroll_devices(database, broker.url, TENANT, ["d1"]))
    certs.ensure(tmp_path / "other", [])
    other_ca = (tmp_path / "other" / "ca.crt").read_text()
    # Another broker's CA (an attacker's look-alike would have one like it).
    wrong = probe(tmp_path, "w-1", spec(e, "w-1", ca_pem=other_ca))
    assert wrong["outcome"] == "tls_verify_failed", wrong
    # The system's CAs only, as a device that ignored the printed CA would.
    system = probe(tmp_path, "w-2", spec(e, "w-2", ca_pem=None))
    assert system["outcome"] == "tls_verify_failed", system
    # The right CA, but a name the broker's certificate is not for (127.0.0.2 is
    # this host too: the listener answers there).
    name = probe(tmp_path, "w-3", spec(e, "w-3", host="127.0.0.2"))
    assert name["outcome"] == "tls_verify_failed", name
    assert "mismatch" in name["detail"], name
    # The printed CA and address: in.
    assert probe(tmp_path, "w-4", spec(e, "w-4"))["outcome"] == "published"


# --- plain text from another host --------------------------------------------------------


@contextmanager
def project_broker(tmp: Path, *args: str) -> Iterator[dict[str, str]]:
    """scripts/broker with ``args``; yields the variables it printed (and PID, PORT)."""
    port = free_port()
    cmd = [str(BROKER_SCRIPT), "--port", str(port), "--dir", str(tmp / "broker"), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "MDM_MQTT_SERVER_PASSWORD": "x" * 24})
    try:
        assert proc.stdout is not None
        printed = dict(proc.stdout.readline().strip().split("=", 1) for _ in range(3))
        wait_port(port)
        yield {**printed, "PORT": str(port)}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


def test_plain_text_is_refused_from_outside_this_host_and_tls_is_not(
        database: str, tmp_path: Path) -> None:
    with outside_host() as outside, \
            project_broker(tmp_path, "--host", outside.host_addr) as printed:
        tls_port = printed["MDM_MQTT_PUBLIC_URL"].rsplit(":", 1)[1]
        assert printed["MDM_MQTT_PUBLIC_URL"] == f"mqtts://{outside.host_addr}:{tls_port}"
        env = server_env(database, printed["MDM_MQTT_URL"],
                         MDM_MQTT_PUBLIC_URL=printed["MDM_MQTT_PUBLIC_URL"],
                         MDM_MQTT_PUBLIC_CA_FILE=printed["MDM_MQTT_PUBLIC_CA_FILE"])
        e = enroll(env, "field-1")
        assert e["mqtt"]["url"] == printed["MDM_MQTT_PUBLIC_URL"]
        server = Server(env, tmp_path / "serve.log")
        server.start()
        try:
            # As printed: TLS to this host's address, trusting the printed CA.
            over_tls = probe(tmp_path, "tls", spec(e, "t-1"), outside)
            assert over_tls["outcome"] == "published", over_tls
            # The same device, same credentials, plain text to the plain listener's
            # port on this host's address: nothing listens there.
            plain = probe(tmp_path, "plain",
                          spec(e, "p-1", tls=False, port=int(printed["PORT"])), outside)
            assert plain["outcome"] == "tcp_refused", plain
            assert wait_for_count(database, "SELECT count(*) FROM telemetry", 1,
                                  settle=1.0) == 1
        finally:
            server.stop()
    assert [r["data"]["lat"] for r in stored(database, "field-1")] == [52.37]


def test_a_broker_told_to_listen_in_plain_text_everywhere_is_reachable_from_outside(
        database: str, tmp_path: Path) -> None:
    # The contrast that shows the test above can fail: the namespace reaches this
    # host's plain listener once it binds there (--plain-bind, an operator's choice).
    with outside_host() as outside, \
            project_broker(tmp_path, "--plain-bind", "0.0.0.0") as printed:
        env = server_env(database, printed["MDM_MQTT_URL"])
        e = enroll(env, "field-2")
        plain = probe(tmp_path, "plain", spec(
            e, "p-2", tls=False, host=outside.host_addr, port=int(printed["PORT"])), outside)
        assert plain["outcome"] == "published", plain


# --- the server's own connection ----------------------------------------------------------


def test_the_server_reaches_the_broker_over_tls_and_checks_its_certificate(
        database: str, broker: Broker, tmp_path: Path) -> None:
    env = server_env(database, broker.tls_url, MDM_MQTT_CA_FILE=str(broker.ca_file))
    cli(env, "tenant", "create", TENANT)
    out = cli(env, "device", "enroll", "--tenant", TENANT, "--device", "d2",
              "--ownership", "corporate")
    assert out.returncode == 0, out.stderr
    # No MDM_MQTT_PUBLIC_URL here: the device is given the server's own address
    # (TLS, with MDM_MQTT_CA_FILE's CA), and the operator is told so.
    assert "MDM_MQTT_PUBLIC_URL is not set" in out.stderr
    assert "broker was not updated" not in out.stderr  # enrolled on the broker over TLS
    e = json.loads(out.stdout)
    assert (e["mqtt"]["url"], e["mqtt"]["ca_pem"]) == (
        f"mqtts://127.0.0.1:{broker.tls_port}", broker.ca_pem)
    assert broker.password not in out.stdout + out.stderr
    server = Server(env, tmp_path / "serve.log")
    server.start()
    try:
        assert probe(tmp_path, "s-1", spec(e, "s-1"))["outcome"] == "published"
        assert wait_for_count(database, "SELECT count(*) FROM telemetry", 1) == 1
    finally:
        server.stop()
    # A broker certificate its CA did not sign: the server does not talk to it.
    certs.ensure(tmp_path / "other", [])
    wrong = server_env(database, broker.tls_url,
                       MDM_MQTT_CA_FILE=str(tmp_path / "other" / "ca.crt"))
    refused = cli(wrong, "broker", "reconcile")
    assert refused.returncode == 3, refused.stderr
    assert "cannot reach the broker" in refused.stderr


# --- HTTPS ---------------------------------------------------------------------------------


def _get(url: str, ctx: ssl.SSLContext) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=30) as resp:
            return resp.status, resp.headers
    except urllib.error.HTTPError as err:
        return err.code, err.headers


def test_serve_terminates_https_and_sends_hsts(database: str, broker: Broker,
                                               tmp_path: Path) -> None:
    tls = tmp_path / "https"
    certs.ensure(tls, ["127.0.0.1"])  # a self-made CA and a certificate it signed
    env = server_env(database, broker.url, MDM_TLS_CERT=str(tls / "server.crt"),
                     MDM_TLS_KEY=str(tls / "server.key"))
    server = Server(env, tmp_path / "serve.log")
    server.start()
    try:
        base = "https://" + env["MDM_HTTP_ADDR"]
        ctx = ssl.create_default_context(cafile=str(tls / "ca.crt"))
        for path, status in (("/healthz", 200), ("/api/v1/devices", 401), ("/portal/", 200),
                             ("/no/such/page", 404)):
            got, headers = _get(base + path, ctx)
            assert got == status, path
            assert headers["Strict-Transport-Security"] == "max-age=31536000", path
        # Nothing is served in plain text on that port.
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen("http://" + env["MDM_HTTP_ADDR"] + "/healthz", timeout=10)
    finally:
        server.stop()


def test_serve_without_https_sends_no_hsts(database: str, broker: Broker,
                                           tmp_path: Path) -> None:
    server = Server(server_env(database, broker.url), tmp_path / "serve.log")
    server.start(ingest_workers=1)
    try:
        with urllib.request.urlopen(server.base + "/healthz", timeout=10) as resp:
            assert resp.status == 200
            assert "Strict-Transport-Security" not in resp.headers
    finally:
        server.stop()


def test_a_key_that_does_not_match_the_certificate_stops_serve(database: str, broker: Broker,
                                                                tmp_path: Path) -> None:
    tls = tmp_path / "https"
    certs.ensure(tls, [])
    env = server_env(database, broker.url, MDM_TLS_CERT=str(tls / "server.crt"),
                     MDM_TLS_KEY=str(tls / "ca.key"))
    out = cli(env, "serve")
    assert out.returncode == 2
    assert "MDM_TLS_CERT and MDM_TLS_KEY cannot be used" in out.stderr
    assert "PRIVATE" not in out.stderr and "Traceback" not in out.stderr


# --- refusals at start --------------------------------------------------------------------


@pytest.mark.parametrize("command", [("serve",), ("ingest",), ("device", "revoke", "--tenant",
                                                                 TENANT, "--device", "x")])
def test_no_broker_url_is_an_error_not_a_guess(database: str, broker: Broker,
                                               command: tuple[str, ...]) -> None:
    env = server_env(database, broker.url)
    del env["MDM_MQTT_URL"]
    out = cli(env, *command)
    assert out.returncode == 2
    (line,) = out.stderr.splitlines()  # one clear line
    assert line.startswith("mdm-server: MDM_MQTT_URL is not set")


def test_plain_text_to_another_host_is_refused(database: str, broker: Broker) -> None:
    env = server_env(database, f"mqtt://mdm-server:{broker.password}@192.0.2.1:1883")
    out = cli(env, "serve")
    assert out.returncode == 2
    assert "MDM_MQTT_URL is mqtt:// to 192.0.2.1" in out.stderr
    assert broker.password not in out.stderr


@pytest.mark.parametrize("command", ["serve", "ingest"])
def test_a_published_master_key_is_refused(database: str, broker: Broker, tmp_path: Path,
                                           command: str) -> None:
    env = server_env(database, broker.url)
    del env["MDM_ALLOW_PUBLISHED_MASTER_KEY"]
    out = cli(env, command)  # the tests' own key
    assert out.returncode == 2, out.stderr
    assert "master key (MDM_MASTER_KEY or MDM_MASTER_KEY_FILE) is published" in out.stderr
    assert "MDM_ALLOW_PUBLISHED_MASTER_KEY=1" in out.stderr
    assert TEST_MASTER_KEY not in out.stderr
    # docker-compose's former development default, from a file.
    key_file = tmp_path / "master.key"
    key_file.write_text(COMPOSE_DEV_KEY + "\n")
    del env["MDM_MASTER_KEY"]
    env["MDM_MASTER_KEY_FILE"] = str(key_file)
    out = cli(env, command)
    assert out.returncode == 2 and "is published" in out.stderr, out.stderr


def test_the_way_out_for_development_is_explicit_and_loud(database: str, broker: Broker,
                                                          tmp_path: Path) -> None:
    env = server_env(database, broker.url)
    assert env["MDM_ALLOW_PUBLISHED_MASTER_KEY"] == "1"
    server = Server(env, tmp_path / "serve.log")
    server.start()
    server.stop()
    assert "WARNING: the master key (MDM_MASTER_KEY or MDM_MASTER_KEY_FILE) is published" \
        in server.log_text()
