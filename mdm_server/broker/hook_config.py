"""The broker hook's settings: ``MDM_BROKER_HOOK_ADDR`` and the AMQP cluster's.

Read by :func:`mdm_server.config.load_config` (the one reader of the environment):

- ``MDM_BROKER_HOOK_ADDR`` (``host:port``): where ``serve`` answers a broker's
  authentication and authorisation questions (mdm_server/broker/hook_http.py); unset,
  no hook. It answers password questions, so it must not be where devices or the
  internet reach it: a loopback or private address (10/8, 172.16/12, 192.168/16,
  fc00::/7, fe80::/10) only, unless ``MDM_BROKER_HOOK_PUBLIC=1`` says a firewall
  lets only the broker's nodes in (never the API's public address).
- ``MDM_AMQP_URL``: the cluster's nodes, ``amqp://USER:PASSWORD@HOST:PORT`` (or
  ``amqps://``) comma-separated; the user and password (the same in every URL, or
  in the first only) are the server's own broker login, which the hook accepts
  (and allows what the server needs). Plain ``amqp://`` to this host's loopback
  only, as for MQTT.
- ``MDM_AMQP_CA_FILE``: the CA (PEM) that ``amqps://`` nodes' certificates (and
  their ``https://`` management API's) are checked against; unset, the system's
  trusted CAs.
- ``MDM_EMQX_API_URL`` with ``MDM_EMQX_API_KEY`` and ``MDM_EMQX_API_SECRET``: an
  EMQX cluster's REST API (``http(s)://HOST:18083``, comma-separated, ``http://``
  to loopback only) and an API key of it; set, ``serve`` kicks a revoked or
  re-enrolled device's client out through it at once, as it closes RabbitMQ's
  connections (mdm_server/broker/hook_revoke.py).
- ``MDM_AMQP_MANAGEMENT_URL``: the nodes' management API, ``http(s)://HOST:PORT``
  comma-separated (``http://`` to loopback only); set, ``serve`` closes a revoked or
  re-enrolled device's connections through it at once
  (mdm_server/broker/hook_revoke.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from mdm_server.config import ConfigError, _parse_addr, is_loopback

__all__ = ["AmqpSettings", "EmqxApi", "amqp_settings", "emqx_api", "hook_addr",
           "is_internal"]


@dataclass(frozen=True, slots=True)
class AmqpSettings:
    """The AMQP cluster: its nodes (URLs without credentials), the server's broker
    user, and the nodes' management API (may be empty)."""

    urls: tuple[str, ...]
    username: str
    password: str = field(repr=False)
    management_urls: tuple[str, ...] = ()
    #: MDM_AMQP_CA_FILE: the CA for ``amqps://`` nodes (None: the system's).
    ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class EmqxApi:
    """An EMQX cluster's REST API (any node answers for the cluster) and the API key
    the server uses (HTTP Basic, key and secret)."""

    urls: tuple[str, ...]
    key: str
    secret: str = field(repr=False)


def is_internal(host: str) -> bool:
    """A loopback or private address (not "every address": ``0.0.0.0``, ``::``)."""
    if is_loopback(host):
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # a name: where it points may change
    return not ip.is_unspecified and (ip.is_private or ip.is_link_local)


def hook_addr(env: Mapping[str, str]) -> tuple[str, int] | None:
    """``MDM_BROKER_HOOK_ADDR`` as (host, port), refused on a public address unless
    ``MDM_BROKER_HOOK_PUBLIC=1``."""
    raw = env.get("MDM_BROKER_HOOK_ADDR", "").strip()
    if not raw:
        return None
    host, port = _parse_addr(raw, "MDM_BROKER_HOOK_ADDR")
    if not is_internal(host) and env.get("MDM_BROKER_HOOK_PUBLIC", "") != "1":
        raise ConfigError(
            f"MDM_BROKER_HOOK_ADDR is {host}, not a loopback or private address: the hook "
            "answers the broker's password questions and must not be reachable by devices "
            "or the internet. Bind it to 127.0.0.1 or the broker nodes' private network, "
            "or set MDM_BROKER_HOOK_PUBLIC=1 if a firewall lets only the broker's nodes in")
    return host, port


def _urls(raw: str, var: str, schemes: tuple[str, str]) -> list[tuple[str, str | None,
                                                                      str | None]]:
    """(url without credentials, user, password) for each comma-separated URL."""
    out = []
    for item in (u.strip() for u in raw.split(",")):
        if not item:
            continue
        parts = urlsplit(item)
        if parts.scheme not in schemes or not parts.hostname:
            raise ConfigError(f"{var} must be {schemes[1]}://HOST:PORT (or {schemes[0]}:// "
                              "to this host's loopback), comma-separated")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"{var} has an invalid port") from None
        if parts.scheme == schemes[0] and not is_loopback(parts.hostname):
            raise ConfigError(f"{var} is {schemes[0]}:// to {parts.hostname}: passwords "
                              f"would cross the network readable; use {schemes[1]}://")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        bare = f"{parts.scheme}://{host}" + (f":{port}" if port else "") + parts.path
        out.append((bare, unquote(parts.username) if parts.username else None,
                    unquote(parts.password) if parts.password else None))
    if not out:
        raise ConfigError(f"{var} names no URL")
    return out


def amqp_settings(env: Mapping[str, str]) -> AmqpSettings | None:
    """``MDM_AMQP_URL`` and ``MDM_AMQP_MANAGEMENT_URL``; None without the first."""
    raw = env.get("MDM_AMQP_URL", "").strip()
    mgmt_raw = env.get("MDM_AMQP_MANAGEMENT_URL", "").strip()
    ca_raw = env.get("MDM_AMQP_CA_FILE", "").strip()
    if not raw:
        if mgmt_raw or ca_raw:
            raise ConfigError("MDM_AMQP_MANAGEMENT_URL or MDM_AMQP_CA_FILE is set but "
                              "MDM_AMQP_URL is not")
        return None
    ca_file = Path(ca_raw) if ca_raw else None
    if ca_file is not None and not ca_file.is_file():
        raise ConfigError("MDM_AMQP_CA_FILE names no readable file")
    nodes = _urls(raw, "MDM_AMQP_URL", ("amqp", "amqps"))
    creds = {(u, p) for _, u, p in nodes if u or p}
    if len(creds) != 1:
        raise ConfigError("MDM_AMQP_URL must name the server's broker user and password "
                          "(amqp://USER:PASSWORD@HOST:PORT), the same in every URL")
    ((user, password),) = creds
    if not user or not password:
        raise ConfigError("MDM_AMQP_URL must name the server's broker user and password")
    mgmt = _urls(mgmt_raw, "MDM_AMQP_MANAGEMENT_URL", ("http", "https")) if mgmt_raw else []
    if any(u or p for _, u, p in mgmt):
        raise ConfigError("MDM_AMQP_MANAGEMENT_URL must not hold credentials: the server "
                          "logs in with MDM_AMQP_URL's")
    return AmqpSettings(tuple(u for u, _, _ in nodes), user, password,
                        tuple(u for u, _, _ in mgmt), ca_file)


def emqx_api(env: Mapping[str, str]) -> EmqxApi | None:
    """``MDM_EMQX_API_URL``, ``MDM_EMQX_API_KEY``, ``MDM_EMQX_API_SECRET``: all three
    or none."""
    raw = env.get("MDM_EMQX_API_URL", "").strip()
    key = env.get("MDM_EMQX_API_KEY", "").strip()
    secret = env.get("MDM_EMQX_API_SECRET", "")
    if not raw and not key and not secret:
        return None
    if not (raw and key and secret):
        raise ConfigError("MDM_EMQX_API_URL, MDM_EMQX_API_KEY and MDM_EMQX_API_SECRET go "
                          "together: the REST API of the EMQX cluster and an API key of it")
    urls = _urls(raw, "MDM_EMQX_API_URL", ("http", "https"))
    if any(u or p for _, u, p in urls):
        raise ConfigError("MDM_EMQX_API_URL must not hold credentials: the server uses "
                          "MDM_EMQX_API_KEY and MDM_EMQX_API_SECRET")
    return EmqxApi(tuple(u for u, _, _ in urls), key, secret)
