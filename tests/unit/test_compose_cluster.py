"""docker-compose.yml's `cluster` profile: three RabbitMQ nodes, etcd, two Patroni
PostgreSQL nodes and two servers (docs/scaling.md, "docker-compose's cluster profile").

CI has no Docker engine: Debian's docker-compose (1.29) validates the file without
one (tests/unit/test_compose.py); scripts/compose-cluster-check checks a profile
running in Docker, by hand (docs/scaling.md). These tests check that the profile is valid,
that a plain `docker-compose up` leaves it alone, and that the servers' environment
names what the profile runs: every URL's host is a service of the profile, its port
the one that service's config listens on, and the project's own parsers accept it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from mdm_server.broker.hook_config import amqp_settings, hook_addr
from tests.unit.test_compose import REPO, REQUIRED_ENV, _compose

CLUSTER_DIR = REPO / "deploy" / "cluster"
RABBITS = ("rabbit1", "rabbit2", "rabbit3")
PATRONIS = ("patroni1", "patroni2")
SERVERS = ("server1", "server2")
CLUSTER = {"rabbit-init", *RABBITS, "etcd", *PATRONIS, "migrate-cluster", *SERVERS}
#: What an operator sets for the cluster profile besides REQUIRED_ENV (made up).
CLUSTER_ENV = {
    "MDM_RABBITMQ_COOKIE": "TestOnlyCookieTestOnlyCookie",
    "MDM_AMQP_SERVER_PASSWORD": "test-only-amqp-password",
    "MDM_PATRONI_REPLICATION_PASSWORD": "test-only-replication-password",
}


def _config(*args: str) -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    result = _compose(*args, "config", env={**REQUIRED_ENV, **CLUSTER_ENV})
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = yaml.safe_load(result.stdout)
    return doc


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    svc: dict[str, Any] = _config("--profile", "cluster")["services"]
    return svc


def _conf(path: Path) -> dict[str, str]:
    """A RabbitMQ ``key = value`` config file, comments left out."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_the_cluster_profile_is_valid() -> None:
    result = _compose("--profile", "cluster", "config", "-q",
                      env={**REQUIRED_ENV, **CLUSTER_ENV})
    assert result.returncode == 0, result.stderr


def test_the_profile_stays_valid_without_its_own_secrets() -> None:
    # Defaulted to empty in the file, so that a plain `up` needs only the default
    # profile's variables; the containers refuse an empty one (below).
    for args in ((), ("--profile", "cluster")):
        result = _compose(*args, "config", "-q")
        assert result.returncode == 0, (args, result.stderr)


def test_the_profile_has_its_services_and_a_plain_up_starts_none_of_them(
        services: dict[str, Any]) -> None:
    assert set(services) >= CLUSTER
    for name, svc in services.items():
        if name in CLUSTER:
            assert svc.get("profiles") == ["cluster"], name
        else:  # the default profile's, unchanged: no profile, nothing of the cluster's
            assert "profiles" not in svc, name
            assert not set(svc.get("depends_on", {})) & CLUSTER, name
    # The default profile's own file, as before: the same services, without these.
    default = _config()["services"]
    assert {n for n, s in default.items() if "profiles" not in s} == set(services) - CLUSTER


def test_the_nodes_form_one_cluster_that_asks_the_servers_hook(
        services: dict[str, Any]) -> None:
    conf = _conf(CLUSTER_DIR / "rabbitmq.conf")
    assert conf["cluster_formation.peer_discovery_backend"] == "classic_config"
    listed = {v for k, v in conf.items() if k.startswith("cluster_formation.classic_config.nodes.")}
    assert listed == {f"rabbit@{services[r]['hostname']}" for r in RABBITS}
    assert [services[r]["hostname"] for r in RABBITS] == list(RABBITS)
    mounted = f"{CLUSTER_DIR / 'rabbitmq.conf'}:/etc/rabbitmq/rabbitmq.conf:ro"
    for r in RABBITS:
        assert mounted in services[r]["volumes"], r
        assert services[r]["build"]["target"] == "rabbitmq"
        assert "brokers" in services[r]["networks"]
    # Classic peer discovery takes no lock: the others start once rabbit1 runs.
    for r in RABBITS[1:]:
        assert services[r]["depends_on"]["rabbit1"] == {"condition": "service_healthy"}, r
    assert conf["auth_backends.1"] == "cache" and conf["auth_cache.cached_backend"] == "http"
    assert conf["auth_http.http_method"] == "post"
    assert conf["mqtt.allow_anonymous"] == "false"
    # The hook the nodes ask: an alias every server carries, on its hook's port.
    for path in ("user", "vhost", "resource", "topic"):
        url = urlsplit(conf[f"auth_http.{path}_path"])
        assert url.path == f"/rabbitmq/{path}"
        for s in SERVERS:
            net = services[s]["networks"]["brokers"]
            assert url.hostname in net["aliases"], s
            host, port = hook_addr(services[s]["environment"]) or ("", 0)
            assert (host, port) == (net["ipv4_address"], url.port), s
    plugins = (CLUSTER_DIR / "Dockerfile").read_text()
    for plugin in ("rabbitmq_mqtt", "rabbitmq_auth_backend_http",
                   "rabbitmq_auth_backend_cache", "rabbitmq_management"):
        assert plugin in plugins


def test_the_servers_env_names_the_profiles_nodes(services: dict[str, Any]) -> None:
    conf = _conf(CLUSTER_DIR / "rabbitmq.conf")
    amqp_port, mgmt_port = int(conf["listeners.ssl.default"]), int(conf["management.ssl.port"])
    mqtt_port = int(conf["mqtt.listeners.ssl.default"])
    published = {int(p["published"]) for r in RABBITS for p in services[r]["ports"]
                 if p["target"] == mqtt_port}
    assert len(published) == len(RABBITS)
    for s in SERVERS:
        env = services[s]["environment"]
        # The server's own parser accepts it (the CA file exists in the container only).
        amqp = amqp_settings({k: v for k, v in env.items() if k != "MDM_AMQP_CA_FILE"})
        assert amqp is not None
        assert amqp.username == "mdm-server" and amqp.password == CLUSTER_ENV[
            "MDM_AMQP_SERVER_PASSWORD"]
        assert [(urlsplit(u).scheme, urlsplit(u).hostname, urlsplit(u).port)
                for u in amqp.urls] == [("amqps", r, amqp_port) for r in RABBITS]
        assert [(urlsplit(u).scheme, urlsplit(u).hostname, urlsplit(u).port)
                for u in amqp.management_urls] == [("https", r, mgmt_port) for r in RABBITS]
        # Devices go to a node's published MQTT listener over TLS, trusting the
        # nodes' CA, which the servers trust for AMQP and management too.
        public = urlsplit(env["MDM_MQTT_PUBLIC_URL"])
        assert public.scheme == "mqtts" and public.hostname == "mdm.example.org"
        assert public.port in published
        rabbit_ca = env["MDM_MQTT_PUBLIC_CA_FILE"]
        assert env["MDM_AMQP_CA_FILE"] == rabbit_ca
        assert "SSL_CERT_FILE" not in env
        assert f"rabbittls:{Path(rabbit_ca).parent}:ro" in services[s]["volumes"]
        # Acks, status and commands go through the cluster too: no Mosquitto.
        assert "MDM_MQTT_URL" not in env and "MDM_MQTT_CA_FILE" not in env
        assert set(services[s]["depends_on"]) == {"migrate-cluster", *RABBITS}
        assert not any(v.startswith("mqtttls:") for v in services[s]["volumes"])
    hooks = {services[s]["environment"]["MDM_BROKER_HOOK_ADDR"] for s in SERVERS}
    assert len(hooks) == len(SERVERS)
    # One key ring for the servers of one database.
    keyrings = {v.split(":")[0] for s in SERVERS for v in services[s]["volumes"]
                if v.split(":")[1] == services[s]["environment"]["MDM_KEYRING_DIR"]}
    assert len(keyrings) == 1
    # The TLS certificate covers every node's name.
    init = " ".join(services["rabbit-init"]["command"])
    for r in RABBITS:
        assert f"--host {r}" in init


def test_the_servers_database_is_the_patroni_pair_read_write(services: dict[str, Any]) -> None:
    def hosts(dsn: str) -> list[str]:
        netloc = urlsplit(dsn).netloc.rpartition("@")[2]
        return [h.partition(":")[0] for h in netloc.split(",")]

    migrate = services["migrate-cluster"]
    for name in (*SERVERS, "migrate-cluster"):
        dsn = services[name]["environment"]["MDM_DATABASE_URL"]
        assert hosts(dsn) == list(PATRONIS), name
        assert parse_qs(urlsplit(dsn).query) == {"target_session_attrs": ["read-write"]}
    for s in SERVERS:
        dsn = services[s]["environment"]["MDM_DATABASE_URL"]
        user_pw = urlsplit(dsn).netloc.rpartition("@")[0]
        assert user_pw == f"mdm_server:{migrate['environment']['MDM_SERVER_DB_PASSWORD']}"
        assert migrate["command"][-1] == "mdm_server"
        assert services[s]["depends_on"]["migrate-cluster"] == {
            "condition": "service_completed_successfully"}
    # migrate logs in as the superuser Patroni bootstraps, on the database it makes.
    superuser = urlsplit(migrate["environment"]["MDM_DATABASE_URL"]).netloc.partition(":")[0]
    assert urlsplit(migrate["environment"]["MDM_DATABASE_URL"]).path == "/mdm"
    assert "CREATE DATABASE mdm" in (CLUSTER_DIR / "post-bootstrap.sh").read_text()
    patroni = (CLUSTER_DIR / "patroni.yml").read_text()
    assert "etcd3:\n  hosts: etcd:2379" in patroni
    for p in PATRONIS:
        env = services[p]["environment"]
        assert env["PATRONI_NAME"] == services[p]["hostname"] == p
        assert env["PATRONI_POSTGRESQL_CONNECT_ADDRESS"] == f"{p}:5432"
        assert env["PATRONI_SUPERUSER_USERNAME"] == superuser
        assert "etcd" in services[p]["depends_on"]


def test_the_containers_refuse_empty_secrets() -> None:
    entry = (CLUSTER_DIR / "rabbitmq-entrypoint.sh").read_text()
    assert '"${#MDM_RABBITMQ_COOKIE}" -lt 20' in entry
    # The node in place of the entrypoint, so that SIGTERM stops it: not Debian's
    # /usr/sbin wrapper, which runs it under su and passes no signal on.
    assert "exec setpriv --reuid=rabbitmq" in entry
    code = [line for line in entry.splitlines() if not line.lstrip().startswith("#")]
    assert not any("/usr/sbin/rabbitmq-server" in line for line in code)
    entry = (CLUSTER_DIR / "patroni-entrypoint.sh").read_text()
    assert '"${#PATRONI_REPLICATION_PASSWORD}" -lt 16' in entry
    dockerfile = (CLUSTER_DIR / "Dockerfile").read_text()
    assert 'CMD ["rabbitmq-entrypoint"]' in dockerfile
    assert 'CMD ["patroni-entrypoint"]' in dockerfile
    env = {"MDM_AMQP_URL": "amqps://mdm-server:@rabbit1:5671",
           "MDM_AMQP_MANAGEMENT_URL": "https://rabbit1:15671"}
    from mdm_server.config import ConfigError

    with pytest.raises(ConfigError):
        amqp_settings(env)
