"""Configuration: read once from the environment, validated, immutable, passed down.

Nothing else in the package reads the environment. Secrets (passwords inside URLs)
never appear in error messages or in ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from mdm_server.audit import AuditKeys
from mdm_server.ingest.limits import DeviceLimiter

if TYPE_CHECKING:
    from mdm_server.broker.hook_config import AmqpSettings, EmqxApi

__all__ = [
    "Config",
    "ConfigError",
    "DeviceBroker",
    "MqttSettings",
    "device_broker_from",
    "is_loopback",
    "load_config",
    "master_key_from_env",
    "read_ca_pem",
    "tls_client_context",
]


class ConfigError(Exception):
    """A configuration value is missing or invalid; the message names the variable."""


def is_loopback(host: str) -> bool:
    """True for this host's own addresses: 127.0.0.0/8, ::1, ``localhost``."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """A broker address: ``mqtt://`` (plain text) or ``mqtts://`` (TLS, its
    certificate checked against ``ca_file`` if given, else the system's CAs), with
    the credentials to log in with, if any."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: Path | None = None

    @classmethod
    def from_url(cls, url: str, *, var: str = "MDM_MQTT_URL",
                 ca_file: Path | None = None, ca_var: str = "MDM_MQTT_CA_FILE"
                 ) -> MqttSettings:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ConfigError(f"{var} must look like mqtts://[user:pass@]host:port (TLS) "
                              "or mqtt://[user:pass@]host:port (plain text)")
        if not parts.hostname:
            raise ConfigError(f"{var} has no host")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError:
            raise ConfigError(f"{var} has an invalid port") from None
        if ca_file is not None and not tls:
            raise ConfigError(f"{ca_var} is set but {var} is mqtt:// (plain text): a CA is "
                              "for mqtts:// only")
        return cls(
            host=parts.hostname,
            port=port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
            ca_file=ca_file,
        )

    def url(self, *, with_credentials: bool = False) -> str:
        auth = ""
        if with_credentials and self.username:
            auth = self.username + (f":{self.password}" if self.password else "") + "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{auth}{host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """None for plain text; for TLS a client context that checks the broker's
        certificate and host name (TLS 1.2 at least) against ``ca_file``, else the
        system's trusted CAs. ConfigError if ``ca_file`` cannot be used."""
        if not self.tls:
            return None
        return tls_client_context(self.ca_file, "MDM_MQTT_CA_FILE")


def tls_client_context(ca_file: Path | None, var: str) -> ssl.SSLContext:
    """A client context that checks the server's certificate and host name (TLS 1.2
    at least) against ``ca_file``, else the system's trusted CAs; ConfigError naming
    ``var`` if the file cannot be used."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{var} cannot be loaded as PEM certificates "
                          f"({type(exc).__name__})") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def read_ca_pem(path: Path, var: str) -> str:
    """The certificates in the PEM file ``path``, re-encoded (only certificates leave
    this function: a key that found its way into the file is refused, never copied)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{var} cannot be read ({type(exc).__name__})") from None
    if b"PRIVATE KEY" in raw:
        raise ConfigError(f"{var} holds a private key: give the CA's certificate only "
                          "(e.g. scripts/broker's tls/ca.crt), never a key")
    try:
        certs = x509.load_pem_x509_certificates(raw)
    except ValueError:
        raise ConfigError(f"{var} holds no PEM certificate") from None
    return "".join(c.public_bytes(Encoding.PEM).decode("ascii") for c in certs)


@dataclass(frozen=True, slots=True)
class DeviceBroker:
    """What enrollment tells a device about the broker: the address to connect to
    (no credentials: each device has its own) and, for a broker whose certificate is
    not publicly trusted, the CA certificate to trust (PEM)."""

    settings: MqttSettings
    ca_pem: str | None
    #: True: MDM_MQTT_PUBLIC_URL is not set and this is the server's own address.
    fallback: bool = False

    @property
    def url(self) -> str:
        return self.settings.url()


@dataclass(frozen=True, slots=True)
class Config:
    database_url: str = field(repr=False)
    # MDM_MQTT_URL (+ MDM_MQTT_CA_FILE): the server's own broker connection; None
    # when unset (serve and ingest then need MDM_AMQP_URL: check_brokers; the broker
    # commands refuse: require_mqtt).
    mqtt: MqttSettings | None
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    # Ingest tuning; defaults are what load_tests/RESULTS.md measured.
    batch_max_records: int = 5000
    batch_max_delay_s: float = 0.1
    max_pending_bytes: int = 64 * 1024 * 1024
    share_group: str = "mdm-ingest"
    # MDM_INSTANCE: this serve's name among several on one Mosquitto (their MQTT
    # client ids must differ: a second session with an id takes the first over);
    # None: the ids of a single serve.
    instance: str | None = None
    # Per-device ingest rate limit (mdm_server/ingest/limits.py): messages a second
    # after a burst, per consumer process; past it a message is acknowledged and
    # counted (dead_letters, reason rate_limited), never decoded or stored. 0: off.
    device_rate_per_s: float = 100.0
    device_burst: int = 50_000
    retention_interval_s: float = 3600.0
    # API rate limit per principal (token), and per client address for requests
    # without a valid token: a burst, then a steady rate (mdm_server/api/limits.py).
    api_rate_per_s: float = 20.0
    api_burst: float = 200.0
    # Buckets kept in each of the limiter's two tables (principals, addresses).
    api_rate_keys: int = 100_000
    # Bytes of policy versions a tenant may keep (old versions' bodies are pruned
    # first; mdm_server/storage/policies.py).
    policy_store_bytes: int = 64 * 1024 * 1024
    # Bytes of place versions a tenant may keep (the same rule as policies;
    # mdm_server/storage/places.py).
    place_store_bytes: int = 16 * 1024 * 1024
    # Policy previews per tenant and minute (and their burst): apart from the above.
    preview_per_min: int = 20
    # Server-Sent Event streams (GET /api/v1/live, .../me/devices/{device}/live) open
    # at once per token and per tenant; past either, 429 (mdm_server/api/live.py).
    live_streams_per_token: int = 4
    live_streams_per_tenant: int = 32
    # 32 bytes from MDM_MASTER_KEY (base64) or MDM_MASTER_KEY_FILE: the root of
    # per-tenant hashing keys. Never stored in the database, so a database dump
    # alone cannot reverse a hashed phone number by trying every number.
    master_key: bytes | None = field(default=None, repr=False)
    # MDM_KEYRING_DIR: the key ring (one secret file per epoch) that device data
    # keys are wrapped under together with the master key; kept outside the
    # database so that an erasure outlives a copy of the database's disk
    # (mdm_server/storage/keyring.py).
    keyring_dir: Path | None = None
    # Test-only: acknowledge before the database commit. Exists so a test can
    # prove that the crash test detects loss; never set it in production.
    unsafe_ack_before_commit: bool = False
    # Development only: let `serve` run as a database role that could disable the
    # audit log's triggers (a superuser, the owner of audit_log or of its schema).
    allow_privileged_db_role: bool = False
    # The password `migrate --server-role` gives the server's database role.
    server_db_password: str | None = field(default=None, repr=False)
    # MDM_MQTT_PUBLIC_URL / MDM_MQTT_PUBLIC_CA_FILE: the broker address enrollment
    # gives devices and the CA they trust it by (device_broker()).
    mqtt_public: MqttSettings | None = None
    mqtt_public_ca_file: Path | None = None
    # MDM_TLS_CERT / MDM_TLS_KEY: serve terminates HTTPS itself (and sends HSTS).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # MDM_BROKER_HOOK_ADDR: where serve answers a broker's authentication and
    # authorisation questions (internal addresses only); MDM_AMQP_URL and
    # MDM_AMQP_MANAGEMENT_URL: the AMQP cluster (mdm_server/broker/hook_config.py).
    broker_hook_addr: tuple[str, int] | None = None
    amqp: AmqpSettings | None = None
    # MDM_EMQX_API_URL, _KEY, _SECRET: an EMQX cluster's REST API, to kick revoked
    # devices' clients out (mdm_server/broker/hook_revoke.py).
    emqx_api: EmqxApi | None = None
    # Development and tests only: let serve start with a master key that is
    # published (mdm_server/published_keys.py).
    allow_published_master_key: bool = False
    # MDM_PUBLIC_URL: the server's public HTTP base URL, as the apps of foreign
    # agents reach it (OwnTracks HTTP mode, OsmAnd / Traccar Client): enrollment
    # prints URLs under it (mdm_server/agents/setup.py).
    public_url: str | None = None

    def public_base(self) -> tuple[str, bool]:
        """The public base URL devices post to, and whether it is a fallback (no
        MDM_PUBLIC_URL: the address serve listens on, which devices may not reach)."""
        if self.public_url is not None:
            return self.public_url, False
        host = f"[{self.http_host}]" if ":" in self.http_host else self.http_host
        scheme = "https" if self.tls_cert is not None else "http"
        return f"{scheme}://{host}:{self.http_port}", True

    def client_id(self, role: str) -> str:
        """The MQTT client id of one of this serve's sessions (``mdm-ingest-0``,
        ``mdm-acks-0``, ``mdm-dispatch``), with ``MDM_INSTANCE`` after ``mdm-``
        when set, so that several serves on one broker keep their own sessions."""
        return role if self.instance is None else f"mdm-{self.instance}-{role[4:]}"

    def require_mqtt(self) -> MqttSettings:
        if self.mqtt is None:
            raise ConfigError(
                "MDM_MQTT_URL is not set: the broker and the server's MQTT user, "
                "mqtts://mdm-server:PASSWORD@HOST:8883 (TLS; MDM_MQTT_CA_FILE for a private "
                "CA) or mqtt://mdm-server:PASSWORD@127.0.0.1:PORT (plain text, this host "
                "only); scripts/broker prints it")
        return self.mqtt

    def check_brokers(self) -> None:
        """A broker to use (``MDM_AMQP_URL`` or ``MDM_MQTT_URL``) and CA files that
        load, or ConfigError. With ``MDM_AMQP_URL`` the devices are on that cluster
        (ingest, acks, status and commands go through it) and ``MDM_MQTT_URL`` is
        optional: set, serve also keeps that Mosquitto's device accounts in step."""
        if self.mqtt is not None or self.amqp is None:
            self.require_mqtt().ssl_context()
        if self.amqp is not None and any(u.startswith("amqps:") for u in self.amqp.urls):
            from mdm_server.broker.amqp import ssl_context

            ssl_context(self.amqp)

    def https_context(self) -> ssl.SSLContext | None:
        """None unless MDM_TLS_CERT and MDM_TLS_KEY are set; then serve's TLS server
        context (TLS 1.2 at least), or ConfigError if the files cannot be used (the
        message names the variables, never the key's content)."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            raise ConfigError(f"MDM_TLS_CERT and MDM_TLS_KEY cannot be used: {reason} (PEM "
                              "files: the certificate, then any intermediates; the "
                              "unencrypted private key that belongs to it)") from None
        return ctx

    def device_broker(self) -> DeviceBroker:
        """The broker address and CA that enrollment gives devices: MDM_MQTT_PUBLIC_URL
        and MDM_MQTT_PUBLIC_CA_FILE; without MDM_MQTT_PUBLIC_URL, the server's own
        (MDM_MQTT_URL without its credentials, and MDM_MQTT_CA_FILE), marked
        ``fallback``."""
        return _device_broker(self.mqtt, self.mqtt_public, self.mqtt_public_ca_file)

    def device_limiter(self) -> DeviceLimiter | None:
        """A fresh per-device rate limit for one consumer; None when switched off."""
        if self.device_rate_per_s <= 0:
            return None
        return DeviceLimiter(self.device_rate_per_s, self.device_burst)

    def require_master_key(self) -> bytes:
        if self.master_key is None:
            raise ConfigError("MDM_MASTER_KEY or MDM_MASTER_KEY_FILE is not set")
        return self.master_key

    def audit_keys(self) -> AuditKeys:
        """The audit log's keys (derived from the master key): every entry is MAC'd."""
        if self.master_key is None:
            raise ConfigError("MDM_MASTER_KEY or MDM_MASTER_KEY_FILE must be set: audit "
                              "entries are signed (HMAC) under a key derived from it")
        return AuditKeys.derive(self.master_key)

    def require_keyring_dir(self) -> Path:
        if self.keyring_dir is None:
            raise ConfigError(
                "MDM_KEYRING_DIR is not set: the directory of the key ring that device data "
                "keys are wrapped under (made on first use; back it up apart from the "
                "database, see README \"Erasure and backups\")")
        return self.keyring_dir

    def tenant_hash_key(self, tenant: str) -> bytes:
        """The key a tenant's policies hash values under (HMAC-SHA256)."""
        return hmac.new(self.require_master_key(), b"tenant-hash-key:" + tenant.encode(),
                        hashlib.sha256).digest()


def _device_broker(mqtt: MqttSettings | None, public: MqttSettings | None,
                   public_ca: Path | None) -> DeviceBroker:
    if public is not None:
        ca = read_ca_pem(public_ca, "MDM_MQTT_PUBLIC_CA_FILE") if public_ca else None
        return DeviceBroker(public, ca)
    if mqtt is None:
        raise ConfigError("MDM_MQTT_PUBLIC_URL (the broker address devices use, e.g. "
                          "mqtts://mdm.example.org:8883) is not set, nor MDM_MQTT_URL")
    own = MqttSettings(mqtt.host, mqtt.port, tls=mqtt.tls, ca_file=mqtt.ca_file)
    ca = read_ca_pem(own.ca_file, "MDM_MQTT_CA_FILE") if own.ca_file else None
    return DeviceBroker(own, ca, fallback=True)


def device_broker_from(env: Mapping[str, str]) -> DeviceBroker:
    """:meth:`Config.device_broker` from these variables alone (MDM_MQTT_URL,
    MDM_MQTT_CA_FILE, MDM_MQTT_PUBLIC_URL, MDM_MQTT_PUBLIC_CA_FILE): for tools that
    enroll devices without a whole Config (the fleet simulator)."""
    return _device_broker(*_mqtt(env))


def master_key_from_env(env: Mapping[str, str]) -> bytes | None:
    """MDM_MASTER_KEY (base64) or the file named by MDM_MASTER_KEY_FILE; None if
    neither is set. For tools that need only the key, not a whole Config."""
    raw = env.get("MDM_MASTER_KEY", "")
    var = "MDM_MASTER_KEY"
    if not raw and env.get("MDM_MASTER_KEY_FILE"):
        var = "MDM_MASTER_KEY_FILE"
        try:
            with open(env["MDM_MASTER_KEY_FILE"], encoding="ascii") as fh:
                raw = fh.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{var} cannot be read ({type(exc).__name__})") from None
    if not raw:
        return None
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{var} must hold 32 bytes in base64") from None
    if len(key) != 32:
        raise ConfigError(f"{var} must hold 32 bytes in base64")
    return key


def _parse_addr(value: str, var: str) -> tuple[str, int]:
    host, sep, port_s = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{var} must be host:port, e.g. 127.0.0.1:8080")
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError(f"{var} has a non-numeric port") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{var} port must be 0..65535")
    return host.strip("[]"), port


def listen_socket(host: str, port: int, var: str) -> socket.socket:
    """A listening TCP socket on host:port, bound before anything else starts, so that
    an address in use is one clear line naming the variable that chose it (once the
    app is starting, the error would surface among half-started connections)."""
    try:
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else (exc.strerror or type(exc).__name__)
        raise ConfigError(f"cannot listen on {host}:{port} ({var}): {why}") from None


def _keyring_dir(env: Mapping[str, str]) -> Path | None:
    raw = env.get("MDM_KEYRING_DIR", "")
    if not raw:
        return None
    path = Path(raw)
    if not path.is_absolute():
        raise ConfigError("MDM_KEYRING_DIR must be an absolute path")
    if path.exists() and not path.is_dir():
        raise ConfigError("MDM_KEYRING_DIR names something that is not a directory")
    return path


def _path(env: Mapping[str, str], var: str) -> Path | None:
    raw = env.get(var, "")
    return Path(raw) if raw else None


_PLAIN_ELSEWHERE = ("in plain text to another host, passwords and telemetry would cross "
                    "the network readable: use mqtts:// (the broker's TLS listener)")


def _mqtt(env: Mapping[str, str]) -> tuple[MqttSettings | None, MqttSettings | None,
                                           Path | None]:
    """MDM_MQTT_URL (+ MDM_MQTT_CA_FILE) and MDM_MQTT_PUBLIC_URL (+ its CA file).
    Plain text (mqtt://) only to this host's loopback addresses."""
    mqtt = None
    ca = _path(env, "MDM_MQTT_CA_FILE")
    if env.get("MDM_MQTT_URL"):
        mqtt = MqttSettings.from_url(env["MDM_MQTT_URL"], ca_file=ca)
        if not mqtt.tls and not is_loopback(mqtt.host):
            raise ConfigError(f"MDM_MQTT_URL is mqtt:// to {mqtt.host}: {_PLAIN_ELSEWHERE}, "
                              "or plain text to 127.0.0.1")
    elif ca is not None:
        raise ConfigError("MDM_MQTT_CA_FILE is set but MDM_MQTT_URL is not")
    public = None
    public_ca = _path(env, "MDM_MQTT_PUBLIC_CA_FILE")
    if env.get("MDM_MQTT_PUBLIC_URL"):
        public = MqttSettings.from_url(env["MDM_MQTT_PUBLIC_URL"], var="MDM_MQTT_PUBLIC_URL",
                                       ca_file=public_ca, ca_var="MDM_MQTT_PUBLIC_CA_FILE")
        if public.username or public.password:
            raise ConfigError("MDM_MQTT_PUBLIC_URL must not hold credentials: each device "
                              "logs in with its own (enrollment prints them)")
        if not public.tls and not is_loopback(public.host):
            raise ConfigError(f"MDM_MQTT_PUBLIC_URL is mqtt:// to {public.host}: devices "
                              f"{_PLAIN_ELSEWHERE}")
        # Devices get the CA's certificate; the path is the server's business.
        public = MqttSettings(public.host, public.port, tls=public.tls)
    elif public_ca is not None:
        raise ConfigError("MDM_MQTT_PUBLIC_CA_FILE is set but MDM_MQTT_PUBLIC_URL is not")
    return mqtt, public, public_ca


def _public_url(env: Mapping[str, str]) -> str | None:
    raw = env.get("MDM_PUBLIC_URL", "").strip()
    if not raw:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
            or parts.fragment or parts.username or parts.password:
        raise ConfigError("MDM_PUBLIC_URL must be the server's public base URL, "
                          "https://HOST[:PORT][/PATH], without credentials, query or fragment")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ConfigError("MDM_PUBLIC_URL is http:// to another host: devices' passwords "
                          "and locations would cross the network readable; use https://")
    return raw.rstrip("/")


def _int(env: Mapping[str, str], var: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(var)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{var} must be an integer") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{var} must be between {lo} and {hi}")
    return value


_INSTANCE_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")


def load_config(env: Mapping[str, str] | None = None) -> Config:
    """Build the configuration from ``env`` (default: the process environment)."""
    from mdm_server.broker.hook_config import amqp_settings, emqx_api, hook_addr

    env = os.environ if env is None else env
    db = env.get("MDM_DATABASE_URL", "")
    if not db:
        raise ConfigError("MDM_DATABASE_URL is not set (postgresql://user@host:port/db)")
    if urlsplit(db).scheme not in ("postgresql", "postgres"):
        raise ConfigError("MDM_DATABASE_URL must start with postgresql://")
    mqtt, public, public_ca = _mqtt(env)
    tls_cert, tls_key = _path(env, "MDM_TLS_CERT"), _path(env, "MDM_TLS_KEY")
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("MDM_TLS_CERT and MDM_TLS_KEY go together (PEM files: the "
                          "certificate chain and its private key)")
    host, port = _parse_addr(env.get("MDM_HTTP_ADDR", "127.0.0.1:8080"), "MDM_HTTP_ADDR")
    unsafe = env.get("MDM_TEST_UNSAFE_ACK_BEFORE_COMMIT", "") == "1"
    instance = env.get("MDM_INSTANCE", "").strip() or None
    if instance is not None and not _INSTANCE_RE.fullmatch(instance):
        raise ConfigError("MDM_INSTANCE must be 1-32 letters, digits, '_' or '-' (it "
                          "becomes part of the server's MQTT client ids)")
    return Config(
        instance=instance,
        database_url=db,
        mqtt=mqtt,
        http_host=host,
        http_port=port,
        batch_max_records=_int(env, "MDM_INGEST_BATCH", 5000, 1, 100_000),
        batch_max_delay_s=_int(env, "MDM_INGEST_BATCH_DELAY_MS", 100, 1, 10_000) / 1000,
        max_pending_bytes=_int(env, "MDM_INGEST_MAX_PENDING_MB", 64, 1, 4096) * 1024 * 1024,
        device_rate_per_s=float(_int(env, "MDM_INGEST_DEVICE_RATE", 100, 0, 10_000_000)),
        device_burst=_int(env, "MDM_INGEST_DEVICE_BURST", 50_000, 1, 1_000_000_000),
        master_key=master_key_from_env(env),
        keyring_dir=_keyring_dir(env),
        # At most a day: the retention run also catches up on a key-ring compaction
        # an erasure did not finish, and the docs promise that within 24 hours.
        retention_interval_s=float(_int(env, "MDM_RETENTION_INTERVAL_S", 3600, 10, 86400)),
        api_rate_per_s=float(_int(env, "MDM_API_RATE_PER_S", 20, 1, 100_000)),
        api_burst=float(_int(env, "MDM_API_BURST", 200, 1, 1_000_000)),
        api_rate_keys=_int(env, "MDM_API_RATE_KEYS", 100_000, 10, 10_000_000),
        policy_store_bytes=_int(env, "MDM_POLICY_STORE_MB", 64, 1, 65536) * 1024 * 1024,
        preview_per_min=_int(env, "MDM_PREVIEW_PER_MIN", 20, 1, 100_000),
        place_store_bytes=_int(env, "MDM_PLACE_STORE_MB", 16, 1, 65536) * 1024 * 1024,
        live_streams_per_token=_int(env, "MDM_LIVE_STREAMS_PER_TOKEN", 4, 1, 1000),
        live_streams_per_tenant=_int(env, "MDM_LIVE_STREAMS_PER_TENANT", 32, 1, 10_000),
        unsafe_ack_before_commit=unsafe,
        allow_privileged_db_role=env.get("MDM_ALLOW_PRIVILEGED_DB_ROLE", "") == "1",
        server_db_password=env.get("MDM_SERVER_DB_PASSWORD") or None,
        mqtt_public=public,
        mqtt_public_ca_file=public_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
        broker_hook_addr=hook_addr(env),
        amqp=amqp_settings(env),
        emqx_api=emqx_api(env),
        allow_published_master_key=env.get("MDM_ALLOW_PUBLISHED_MASTER_KEY", "") == "1",
        public_url=_public_url(env),
    )
