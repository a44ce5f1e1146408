from __future__ import annotations

from pathlib import Path

import pytest

from mdm_server.config import ConfigError, load_config

DB = "postgresql://mdm@db.example:5432/mdm"


def test_defaults_and_parsing() -> None:
    cfg = load_config({"MDM_DATABASE_URL": DB, "MDM_MQTT_URL": "mqtts://svc:s3cret@broker:1884",
                       "MDM_HTTP_ADDR": "0.0.0.0:9000"})
    mqtt = cfg.require_mqtt()
    assert (mqtt.host, mqtt.port, mqtt.username, mqtt.tls) == ("broker", 1884, "svc", True)
    assert (cfg.http_host, cfg.http_port) == ("0.0.0.0", 9000)
    assert cfg.batch_max_records == 5000
    assert cfg.unsafe_ack_before_commit is False


@pytest.mark.parametrize(("env", "names"), [
    ({}, "MDM_DATABASE_URL"),
    ({"MDM_DATABASE_URL": "mysql://x"}, "MDM_DATABASE_URL"),
    ({"MDM_DATABASE_URL": DB, "MDM_MQTT_URL": "http://broker"}, "MDM_MQTT_URL"),
    ({"MDM_DATABASE_URL": DB, "MDM_MQTT_URL": "mqtt://broker:notaport"}, "MDM_MQTT_URL"),
    ({"MDM_DATABASE_URL": DB, "MDM_MQTT_CA_FILE": "/ca.crt"}, "MDM_MQTT_CA_FILE"),
    ({"MDM_DATABASE_URL": DB, "MDM_MQTT_URL": "mqtt://127.0.0.1:1883",
      "MDM_MQTT_CA_FILE": "/ca.crt"}, "MDM_MQTT_CA_FILE"),
    ({"MDM_DATABASE_URL": DB, "MDM_MQTT_PUBLIC_URL": "mqtts://u:p@mdm.example.org"},
     "MDM_MQTT_PUBLIC_URL must not hold credentials"),
    ({"MDM_DATABASE_URL": DB, "MDM_MQTT_PUBLIC_CA_FILE": "/ca.crt"},
     "MDM_MQTT_PUBLIC_CA_FILE"),
    ({"MDM_DATABASE_URL": DB, "MDM_TLS_CERT": "/cert.pem"}, "MDM_TLS_CERT and MDM_TLS_KEY"),
    ({"MDM_DATABASE_URL": DB, "MDM_TLS_KEY": "/key.pem"}, "MDM_TLS_CERT and MDM_TLS_KEY"),
    ({"MDM_DATABASE_URL": DB, "MDM_HTTP_ADDR": "8080"}, "MDM_HTTP_ADDR"),
    ({"MDM_DATABASE_URL": DB, "MDM_HTTP_ADDR": "host:99999"}, "MDM_HTTP_ADDR"),
    ({"MDM_DATABASE_URL": DB, "MDM_INGEST_BATCH": "many"}, "MDM_INGEST_BATCH"),
    ({"MDM_DATABASE_URL": DB, "MDM_INGEST_BATCH": "0"}, "MDM_INGEST_BATCH"),
])
def test_bad_values_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        load_config(env)


def test_secrets_stay_out_of_repr_and_errors() -> None:
    cfg = load_config({"MDM_DATABASE_URL": "postgresql://u:dbpass@h/db",
                       "MDM_MQTT_URL": "mqtt://u:mqttpass@127.0.0.1:1"})
    assert "dbpass" not in repr(cfg)
    assert "mqttpass" not in repr(cfg)
    assert "mqttpass" not in cfg.require_mqtt().url()
    for bad in ("mqtt://u:mqttpass@h:bad", "mqtt://u:mqttpass@broker:1883"):
        with pytest.raises(ConfigError) as err:
            load_config({"MDM_DATABASE_URL": DB, "MDM_MQTT_URL": bad})
        assert "mqttpass" not in str(err.value)


def test_the_broker_url_is_required_where_it_is_used_and_never_guessed() -> None:
    cfg = load_config({"MDM_DATABASE_URL": DB})
    assert cfg.mqtt is None
    with pytest.raises(ConfigError, match="MDM_MQTT_URL is not set"):
        cfg.require_mqtt()


@pytest.mark.parametrize("url", ["mqtt://u:p@127.0.0.1:1883", "mqtt://localhost:1",
                                 "mqtt://[::1]:1883", "mqtts://u:p@broker:8883"])
def test_plain_text_to_the_broker_only_on_this_host(url: str) -> None:
    assert load_config({"MDM_DATABASE_URL": DB, "MDM_MQTT_URL": url}).mqtt is not None


@pytest.mark.parametrize(("var", "url"), [
    ("MDM_MQTT_URL", "mqtt://u:p@mosquitto:1883"),
    ("MDM_MQTT_URL", "mqtt://u:p@192.0.2.1:1883"),
    ("MDM_MQTT_PUBLIC_URL", "mqtt://mdm.example.org:1883"),
])
def test_plain_text_to_another_host_is_refused(var: str, url: str) -> None:
    with pytest.raises(ConfigError, match=rf"{var} is mqtt:// to .* plain text"):
        load_config({"MDM_DATABASE_URL": DB, var: url})


def _ca(tmp_path: Path) -> Path:
    from mdm_server.broker import certs

    certs.ensure(tmp_path / "tls", [])
    return tmp_path / "tls" / "ca.crt"


def test_devices_are_given_the_public_address_and_its_ca(tmp_path: Path) -> None:
    ca = _ca(tmp_path)
    cfg = load_config({"MDM_DATABASE_URL": DB, "MDM_MQTT_URL": "mqtt://u:p@127.0.0.1:1883",
                       "MDM_MQTT_PUBLIC_URL": "mqtts://mdm.example.org",
                       "MDM_MQTT_PUBLIC_CA_FILE": str(ca)})
    broker = cfg.device_broker()
    assert (broker.url, broker.fallback) == ("mqtts://mdm.example.org:8883", False)
    assert broker.ca_pem == ca.read_text()
    # A publicly trusted certificate: no CA to hand out.
    cfg = load_config({"MDM_DATABASE_URL": DB, "MDM_MQTT_PUBLIC_URL": "mqtts://mdm.example.org"})
    assert cfg.device_broker().ca_pem is None


def test_without_a_public_address_devices_get_the_servers_own_marked_as_such(
        tmp_path: Path) -> None:
    ca = _ca(tmp_path)
    cfg = load_config({"MDM_DATABASE_URL": DB, "MDM_MQTT_URL": "mqtts://u:p@broker:8883",
                       "MDM_MQTT_CA_FILE": str(ca)})
    broker = cfg.device_broker()
    assert (broker.url, broker.fallback, broker.ca_pem) == (
        "mqtts://broker:8883", True, ca.read_text())
    with pytest.raises(ConfigError, match=r"MDM_MQTT_PUBLIC_URL .* is not set, nor MDM_MQTT_URL"):
        load_config({"MDM_DATABASE_URL": DB}).device_broker()


def test_a_private_key_is_never_handed_to_devices_as_their_ca(tmp_path: Path) -> None:
    _ca(tmp_path)
    mixed = tmp_path / "mixed.pem"
    mixed.write_bytes((tmp_path / "tls" / "ca.crt").read_bytes()
                      + (tmp_path / "tls" / "ca.key").read_bytes())
    cfg = load_config({"MDM_DATABASE_URL": DB, "MDM_MQTT_PUBLIC_URL": "mqtts://h",
                       "MDM_MQTT_PUBLIC_CA_FILE": str(mixed)})
    with pytest.raises(ConfigError, match="holds a private key") as err:
        cfg.device_broker()
    assert "BEGIN" not in str(err.value)
    (tmp_path / "junk.pem").write_text("not a certificate")
    cfg = load_config({"MDM_DATABASE_URL": DB, "MDM_MQTT_PUBLIC_URL": "mqtts://h",
                       "MDM_MQTT_PUBLIC_CA_FILE": str(tmp_path / "junk.pem")})
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        cfg.device_broker()


def test_the_key_ring_directory_is_absolute_a_directory_and_required_where_needed(
        tmp_path: Path) -> None:
    cfg = load_config({"MDM_DATABASE_URL": DB})
    assert cfg.keyring_dir is None
    with pytest.raises(ConfigError, match="MDM_KEYRING_DIR is not set"):
        cfg.require_keyring_dir()
    ring = tmp_path / "ring"
    assert load_config({"MDM_DATABASE_URL": DB,
                        "MDM_KEYRING_DIR": str(ring)}).require_keyring_dir() == ring
    with pytest.raises(ConfigError, match="MDM_KEYRING_DIR must be an absolute path"):
        load_config({"MDM_DATABASE_URL": DB, "MDM_KEYRING_DIR": "var/keyring"})
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="MDM_KEYRING_DIR names something that is not"):
        load_config({"MDM_DATABASE_URL": DB, "MDM_KEYRING_DIR": str(tmp_path / "file")})


def test_the_retention_run_which_catches_up_on_compaction_is_at_most_a_day_apart() -> None:
    assert load_config({"MDM_DATABASE_URL": DB}).retention_interval_s == 3600
    assert load_config({"MDM_DATABASE_URL": DB, "MDM_RETENTION_INTERVAL_S": "86400"}
                       ).retention_interval_s == 86400
    with pytest.raises(ConfigError, match="MDM_RETENTION_INTERVAL_S must be between 10 and "
                                          "86400"):
        load_config({"MDM_DATABASE_URL": DB, "MDM_RETENTION_INTERVAL_S": "86401"})


def test_a_cluster_alone_is_a_broker_but_mosquittos_commands_still_need_mqtt() -> None:
    cfg = load_config({"MDM_DATABASE_URL": DB,
                       "MDM_AMQP_URL": "amqp://mdm-server:pw@127.0.0.1:5673"})
    cfg.check_brokers()  # serve, ingest, device: the cluster will do
    with pytest.raises(ConfigError, match="MDM_MQTT_URL is not set"):
        cfg.require_mqtt()  # the broker commands: Mosquitto's own
    with pytest.raises(ConfigError, match="MDM_MQTT_URL is not set"):
        load_config({"MDM_DATABASE_URL": DB}).check_brokers()


def test_an_instance_name_goes_into_the_servers_client_ids() -> None:
    one = load_config({"MDM_DATABASE_URL": DB})
    assert [one.client_id(r) for r in ("mdm-ingest-0", "mdm-acks-0", "mdm-dispatch")] == [
        "mdm-ingest-0", "mdm-acks-0", "mdm-dispatch"]
    two = load_config({"MDM_DATABASE_URL": DB, "MDM_INSTANCE": "eu-2"})
    assert [two.client_id(r) for r in ("mdm-ingest-1", "mdm-acks-0", "mdm-dispatch")] == [
        "mdm-eu-2-ingest-1", "mdm-eu-2-acks-0", "mdm-eu-2-dispatch"]
    for bad in ("a/b", "x" * 33, "#", "a b"):
        with pytest.raises(ConfigError, match="MDM_INSTANCE"):
            load_config({"MDM_DATABASE_URL": DB, "MDM_INSTANCE": bad})
