"""docker-compose.yml is valid and runs the broker with the project's own config.

Docker cannot run here, but Debian's docker-compose (1.29) validates a compose file
without an engine; scripts/test installs it. The broker config in the compose setup
(deploy/mosquitto/docker.conf) must be exactly what scripts/broker renders from
deploy/mosquitto/mosquitto.conf, so people, tests and containers share one config.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
BROKER_SCRIPT = Path(os.environ.get("MDM_BROKER_SCRIPT") or REPO / "scripts" / "broker")
TEMPLATE = REPO / "deploy" / "mosquitto" / "mosquitto.conf"
DOCKER_CONF = REPO / "deploy" / "mosquitto" / "docker.conf"
PLACEHOLDERS = {"@PORT@", "@BIND@", "@DATA_DIR@", "@USER@", "@LOG_DEST@", "@DYNSEC_PLUGIN@",
                "@TLS_PORT@", "@TLS_BIND@", "@TLS_CERTFILE@", "@TLS_KEYFILE@"}


#: What an operator must set before `docker-compose up` (made-up values for tests).
REQUIRED_ENV = {
    "POSTGRES_PASSWORD": "test-only-postgres-password",
    "MDM_SERVER_DB_PASSWORD": "test-only-server-db-password",
    "MDM_MQTT_SERVER_PASSWORD": "test-only-mqtt-password",
    "MDM_MASTER_KEY": base64.b64encode(b"k" * 32).decode(),
    "MDM_MQTT_PUBLIC_HOST": "mdm.example.org",
}


def _compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed (scripts/test installs Debian's package)")
    base = {k: v for k, v in os.environ.items() if k not in REQUIRED_ENV}
    return subprocess.run(
        [exe, "-f", str(REPO / "docker-compose.yml"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**base, **(REQUIRED_ENV if env is None else env)},
    )


def _render(*args: str) -> str:
    result = subprocess.run(
        [str(BROKER_SCRIPT), *args], capture_output=True, text=True, timeout=30, check=True
    )
    return result.stdout


def _settings(conf: str) -> dict[str, list[str]]:
    """Directive -> values, comments and blank lines left out."""
    settings: dict[str, list[str]] = {}
    for line in conf.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            settings.setdefault(key, []).append(value)
    return settings


def test_compose_file_is_valid() -> None:
    result = _compose("config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_mounts_the_rendered_project_config() -> None:
    result = _compose("config")
    assert result.returncode == 0, result.stderr
    assert f"{DOCKER_CONF}:/mosquitto/config/mosquitto.conf:ro" in result.stdout


def test_docker_conf_is_the_current_rendering_of_the_template() -> None:
    # If this fails: scripts/broker --docker-config > deploy/mosquitto/docker.conf
    assert DOCKER_CONF.read_text() == _render("--docker-config")


def test_docker_conf_differs_from_the_template_only_in_placeholders() -> None:
    template = _settings(TEMPLATE.read_text())
    docker = _settings(DOCKER_CONF.read_text())
    assert set(re.findall(r"@[A-Z_]+@", TEMPLATE.read_text())) == PLACEHOLDERS
    assert docker.keys() == template.keys()
    for key, values in template.items():
        if not any(p in v for v in values for p in PLACEHOLDERS):
            assert docker[key] == values, key
    # Plain text only inside the container (its health check); the server and the
    # devices use TLS, the one port docker-compose publishes.
    assert docker["listener"] == ["1883 127.0.0.1", "8883 0.0.0.0"]
    assert docker["certfile"] == ["/mosquitto/tls/server.crt"]
    assert docker["keyfile"] == ["/mosquitto/tls/server.key"]
    assert docker["tls_version"] == ["tlsv1.2"]
    # max_qos is per listener: both listeners refuse QoS 2.
    assert docker["max_qos"] == ["1", "1"]
    assert docker["persistence_location"] == ["/mosquitto/data/"]
    # The eclipse-mosquitto image's plugin, its config next to the broker's data.
    assert docker["plugin"] == ["/usr/lib/mosquitto_dynamic_security.so"]
    assert docker["plugin_opt_config_file"] == ["/mosquitto/data/dynamic-security.json"]
    assert docker["allow_anonymous"] == ["false"]


def test_local_rendering_uses_the_given_port_and_dir(tmp_path: Path) -> None:
    path = _render("--render", "--port", "18999", "--tls-port", "18998",
                   "--dir", str(tmp_path)).strip()
    assert Path(path) == tmp_path / "mosquitto.conf"
    local = _settings(Path(path).read_text())
    # Plain text on loopback only unless asked (--plain-bind); TLS on every address.
    assert local["listener"] == ["18999 127.0.0.1", "18998 0.0.0.0"]
    assert local["certfile"] == [f"{tmp_path}/tls/server.crt"]
    assert local["keyfile"] == [f"{tmp_path}/tls/server.key"]
    assert local["max_qos"] == ["1", "1"]
    assert local["persistence_location"] == [f"{tmp_path}/"]
    assert local["log_dest"] == [f"file {tmp_path}/mosquitto.log"]
    assert local["plugin_opt_config_file"] == [f"{tmp_path}/dynamic-security.json"]
    assert local["plugin"][0].endswith("/mosquitto_dynamic_security.so")
    assert local["allow_anonymous"] == ["false"]
    assert local["max_queued_messages"] == _settings(DOCKER_CONF.read_text())["max_queued_messages"]


def test_local_rendering_binds_where_asked(tmp_path: Path) -> None:
    path = _render("--render", "--port", "18999", "--tls-port", "18998", "--dir",
                   str(tmp_path), "--plain-bind", "0.0.0.0", "--tls-bind", "10.0.0.7",
                   "--tls-cert", str(TEMPLATE), "--tls-key", str(TEMPLATE)).strip()
    local = _settings(Path(path).read_text())
    assert local["listener"] == ["18999 0.0.0.0", "18998 10.0.0.7"]
    assert local["certfile"] == local["keyfile"] == [str(TEMPLATE)]


def _config() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    result = _compose("config")
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = yaml.safe_load(result.stdout)
    return doc


def test_compose_refuses_to_start_without_real_secrets() -> None:
    assert _compose("config", "-q").returncode == 0
    for var in REQUIRED_ENV:
        env = {k: v for k, v in REQUIRED_ENV.items() if k != var}
        result = _compose("config", "-q", env=env)
        assert result.returncode != 0, var
        assert var in result.stderr, var


def test_compose_publishes_only_the_brokers_tls_port_and_the_server_uses_tls() -> None:
    services = _config()["services"]
    assert [p["target"] for p in services["mosquitto"]["ports"]] == [8883]
    env = services["server"]["environment"]
    assert env["MDM_MQTT_URL"].startswith("mqtts://mdm-server:")
    assert env["MDM_MQTT_URL"].endswith("@mosquitto:8883")
    assert env["MDM_MQTT_PUBLIC_URL"] == "mqtts://mdm.example.org:8883"
    assert env["MDM_MQTT_CA_FILE"] == env["MDM_MQTT_PUBLIC_CA_FILE"]
    init = " ".join(services["broker-init"]["command"])
    assert "mdm_server.broker.certs /mosquitto/tls --host mosquitto" in init
    assert "--owner 1883:1883" in init


def test_a_new_public_host_recreates_the_broker() -> None:
    # broker-init issues a certificate for the new name; Mosquitto reads it at start.
    services = _config()["services"]
    assert services["mosquitto"]["environment"]["MDM_MQTT_PUBLIC_HOST"] == "mdm.example.org"


def test_the_server_is_healthy_when_ready_and_its_metrics_stay_inside() -> None:
    server = _config()["services"]["server"]
    check = server["healthcheck"]["test"]
    assert check[0] == "CMD"
    assert "http://127.0.0.1:8080/readyz" in " ".join(check)
    # /metrics has no token: its listener is on the compose network, never published.
    assert server["environment"]["MDM_METRICS_ADDR"] == "0.0.0.0:9464"
    assert [p["target"] for p in server["ports"]] == [8080]
