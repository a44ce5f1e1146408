"""The broker hook's settings: an internal address only, the AMQP cluster's URLs."""

from __future__ import annotations

import pytest

from mdm_server.config import ConfigError, load_config

BASE = {"MDM_DATABASE_URL": "postgresql://u@127.0.0.1/db"}


def test_no_hook_unless_asked() -> None:
    cfg = load_config(BASE)
    assert cfg.broker_hook_addr is None and cfg.amqp is None


@pytest.mark.parametrize("addr", ["127.0.0.1:9101", "localhost:9101", "[::1]:9101",
                                  "10.1.2.3:9101", "172.16.0.9:9101", "192.168.1.4:9101",
                                  "[fd00::7]:9101"])
def test_the_hook_listens_on_internal_addresses(addr: str) -> None:
    host, port = load_config({**BASE, "MDM_BROKER_HOOK_ADDR": addr}).broker_hook_addr or ("", 0)
    assert port == 9101 and host == addr.rsplit(":", 1)[0].strip("[]")


@pytest.mark.parametrize("addr", ["0.0.0.0:9101", "[::]:9101", "93.184.216.34:9101",
                                  "8.8.8.8:9101", "hook.example.org:9101", ":9101"])
def test_a_public_hook_address_is_refused(addr: str) -> None:
    """The hook answers password questions: never on the public port or every address
    unless the operator says a firewall keeps all but the broker's nodes out."""
    with pytest.raises(ConfigError, match="MDM_BROKER_HOOK"):
        load_config({**BASE, "MDM_BROKER_HOOK_ADDR": addr})
    if addr != ":9101":
        cfg = load_config({**BASE, "MDM_BROKER_HOOK_ADDR": addr, "MDM_BROKER_HOOK_PUBLIC": "1"})
        assert cfg.broker_hook_addr is not None


def test_amqp_urls_carry_the_servers_login_once() -> None:
    cfg = load_config({**BASE, "MDM_AMQP_URL":
                       "amqp://mdm-server:s3cret%2Fx@127.0.0.1:5701,amqp://mdm-server:s3cret%2Fx"
                       "@127.0.0.1:5702",
                       "MDM_AMQP_MANAGEMENT_URL": "http://127.0.0.1:15701,http://127.0.0.1:15702"})
    assert cfg.amqp is not None
    assert cfg.amqp.urls == ("amqp://127.0.0.1:5701", "amqp://127.0.0.1:5702")
    assert (cfg.amqp.username, cfg.amqp.password) == ("mdm-server", "s3cret/x")
    assert cfg.amqp.management_urls == ("http://127.0.0.1:15701", "http://127.0.0.1:15702")
    assert "s3cret" not in repr(cfg)


@pytest.mark.parametrize(("env", "says"), [
    ({"MDM_AMQP_URL": "amqp://127.0.0.1:5701"}, "user and password"),
    ({"MDM_AMQP_URL": "amqp://a:b@127.0.0.1:1,amqp://a:c@127.0.0.1:2"}, "the same"),
    ({"MDM_AMQP_URL": "amqp://a:b@rabbit.example.org:5672"}, "amqps://"),
    ({"MDM_AMQP_URL": "mqtt://a:b@127.0.0.1:1"}, "MDM_AMQP_URL"),
    ({"MDM_AMQP_MANAGEMENT_URL": "http://127.0.0.1:1"}, "MDM_AMQP_URL is not"),
    ({"MDM_AMQP_URL": "amqps://a:b@rabbit.example.org",
      "MDM_AMQP_MANAGEMENT_URL": "http://rabbit.example.org:15672"}, "https://"),
    ({"MDM_AMQP_URL": "amqps://a:b@rabbit.example.org",
      "MDM_AMQP_MANAGEMENT_URL": "https://a:b@rabbit.example.org:15671"}, "credentials"),
])
def test_bad_amqp_settings_are_refused(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=says) as err:
        load_config({**BASE, **env})
    assert ":b@" not in str(err.value) and "b@" not in str(err.value)


def test_the_emqx_api_needs_its_url_key_and_secret_together() -> None:
    base = dict(BASE)
    assert load_config(base).emqx_api is None
    cfg = load_config({**base, "MDM_EMQX_API_URL": "http://127.0.0.1:18083,https://e2:18083",
                       "MDM_EMQX_API_KEY": "k", "MDM_EMQX_API_SECRET": "s3cret"})
    assert cfg.emqx_api is not None
    assert cfg.emqx_api.urls == ("http://127.0.0.1:18083", "https://e2:18083")
    assert "s3cret" not in repr(cfg)
    for env, says in (({"MDM_EMQX_API_URL": "http://127.0.0.1:18083"}, "go together"),
                      ({"MDM_EMQX_API_KEY": "k", "MDM_EMQX_API_SECRET": "s"}, "go together"),
                      ({"MDM_EMQX_API_URL": "http://emqx.example:18083",
                        "MDM_EMQX_API_KEY": "k", "MDM_EMQX_API_SECRET": "s"}, "https://"),
                      ({"MDM_EMQX_API_URL": "https://k:s@e:18083",
                        "MDM_EMQX_API_KEY": "k", "MDM_EMQX_API_SECRET": "s"}, "credentials")):
        with pytest.raises(ConfigError, match=says):
            load_config({**base, **env})
