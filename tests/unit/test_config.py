from __future__ import annotations

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
