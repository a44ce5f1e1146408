from __future__ import annotations

from pathlib import Path

import pytest

from mdm_server.config import ConfigError, load_config

DB = "postgresql://mdm@db.example:5432/mdm"


def test_defaults_and_parsing() -> None:
    cfg = load_config({"MDM_DATABASE_URL": DB, "MDM_MQTT_URL": "mqtt://svc:s3cret@broker:1884",
                       "MDM_HTTP_ADDR": "0.0.0.0:9000"})
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.username) == ("broker", 1884, "svc")
    assert (cfg.http_host, cfg.http_port) == ("0.0.0.0", 9000)
    assert cfg.batch_max_records == 5000
    assert cfg.unsafe_ack_before_commit is False


@pytest.mark.parametrize(("env", "names"), [
    ({}, "MDM_DATABASE_URL"),
    ({"MDM_DATABASE_URL": "mysql://x"}, "MDM_DATABASE_URL"),
    ({"MDM_DATABASE_URL": DB, "MDM_MQTT_URL": "http://broker"}, "MDM_MQTT_URL"),
    ({"MDM_DATABASE_URL": DB, "MDM_MQTT_URL": "mqtt://broker:notaport"}, "MDM_MQTT_URL"),
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
                       "MDM_MQTT_URL": "mqtt://u:mqttpass@h:1"})
    assert "dbpass" not in repr(cfg)
    assert "mqttpass" not in repr(cfg)
    assert "mqttpass" not in cfg.mqtt.url()
    with pytest.raises(ConfigError) as err:
        load_config({"MDM_DATABASE_URL": DB, "MDM_MQTT_URL": "mqtt://u:mqttpass@h:bad"})
    assert "mqttpass" not in str(err.value)


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
