"""Device enrollment and the device registry the ingest core consults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import asyncpg

from agent_protocol import acks_topic, commands_topic, is_valid_id, telemetry_topic
from mdm_server.agents import AGENTS, URL_KEY_AGENTS
from mdm_server.agents.secrets import new_secret, seal_secret, url_key_digest
from mdm_server.agents.setup import osmand_setup, owntracks_setup
from mdm_server.broker.credentials import device_password
from mdm_server.commands.keys import SigningKeyError, public_keys, signing_key
from mdm_server.config import MqttSettings

__all__ = [
    "CREDENTIALS_CHANNEL",
    "DeviceIdentity",
    "DeviceInfo",
    "EnrollmentError",
    "device_identities",
    "enroll_device",
    "lookup_devices",
    "mqtt_username",
    "notify_credentials",
    "reenroll_device",
    "revoke_device",
    "start_enrollment",
]

Ownership = Literal["corporate", "personal"]


class EnrollmentError(Exception):
    """Enrollment refused; the message says why (never a secret)."""


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    tenant: str
    device: str
    ownership: str
    groups: tuple[str, ...]
    enrolled: bool
    agent: str = "native"


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """What the broker must know of a device: its credential generation (0: enrolled
    before broker identity, password not derivable), whether it may connect, and
    whether its password comes from a master key since rotated away (``stale``:
    the broker keeps it, the server cannot derive it; re-enrolling ends that)."""

    tenant: str
    device: str
    generation: int
    enrolled: bool
    stale: bool = False
    agent: str = "native"


def mqtt_username(tenant: str, device: str) -> str:
    # Ids are [A-Za-z0-9_-]: "." cannot occur in either, so the name is unambiguous,
    # and it holds no "+", "#" or "/" (which broker pattern ACLs refuse).
    return f"{tenant}.{device}"


def _password(master_key: bytes | None, tenant: str, device: str, generation: int) -> str:
    if master_key is None:
        raise EnrollmentError("MDM_MASTER_KEY (or MDM_MASTER_KEY_FILE) is not set: device "
                              "MQTT passwords are derived from it")
    return device_password(master_key, tenant, device, generation)


async def _server_keys(conn: asyncpg.Connection, master_key: bytes | None) -> dict[str, str]:
    """The public keys an agent verifies commands with; the first is created if none."""
    keys = await public_keys(conn)
    if keys:
        return keys
    if master_key is None:
        raise EnrollmentError("MDM_MASTER_KEY (or MDM_MASTER_KEY_FILE) is not set: the "
                              "server's command-signing key is created and stored under it")
    try:
        await signing_key(conn, master_key)
    except SigningKeyError as exc:
        raise EnrollmentError(str(exc)) from None
    return await public_keys(conn)


def _enrollment(tenant: str, device: str, ownership: str, password: str, mqtt: MqttSettings,
                ca_pem: str | None, server_keys: dict[str, str]) -> dict[str, Any]:
    user = mqtt_username(tenant, device)
    return {
        "tenant": tenant,
        "device": device,
        "ownership": ownership,
        "mqtt": {
            # Where to connect: mqtts:// is TLS (docs/protocol.md, "Connecting"), the
            # broker's certificate checked against ca_pem when given (a private CA),
            # else against the device's trusted CAs.
            "url": mqtt.url(),
            "host": mqtt.host,
            "port": mqtt.port,
            "tls": mqtt.tls,
            "ca_pem": ca_pem,
            "username": user,
            "password": password,
            "client_id": user,
            "keepalive_s": 60,
            "qos": 1,
        },
        "topics": {
            "telemetry": telemetry_topic(tenant, device, "location").rsplit("/", 1)[0]
            + "/{kind}",
            "acks": acks_topic(tenant, device),
            "commands": commands_topic(tenant, device),
        },
        # key id -> base64 raw Ed25519 public key: commands must verify against one.
        "server_keys": server_keys,
    }


def _agent_enrollment(tenant: str, device: str, ownership: str, agent: str, secret: str,
                      password: str | None, mqtt: MqttSettings, ca_pem: str | None,
                      public_url: str) -> dict[str, Any]:
    """What a foreign agent's app needs (mdm_server/agents/setup.py)."""
    out: dict[str, Any] = {"tenant": tenant, "device": device, "ownership": ownership,
                           "agent": agent}
    if agent == "owntracks":
        assert password is not None
        out["owntracks"] = owntracks_setup(
            device=device, username=mqtt_username(tenant, device), password=password,
            secret=secret, broker=mqtt, ca_pem=ca_pem, public_url=public_url)
    else:
        out[agent] = osmand_setup(agent=agent, device=device, key=secret,
                                  public_url=public_url)
    return out


def _check_agent(agent: str, master_key: bytes | None, public_url: str | None) -> None:
    if agent not in AGENTS:
        raise EnrollmentError(f"agent must be one of {', '.join(AGENTS)}")
    if agent != "native" and master_key is None:
        raise EnrollmentError("MDM_MASTER_KEY (or MDM_MASTER_KEY_FILE) is not set: agent "
                              "secrets are sealed under it")
    if agent != "native" and public_url is None:
        raise EnrollmentError("the server's public URL (MDM_PUBLIC_URL) is needed to "
                              "enroll a device for this agent")


async def _set_agent_secret(conn: asyncpg.Connection, master_key: bytes, tenant: str,
                            device: str, agent: str) -> str:
    """A fresh secret for the device's agent, stored sealed (its URL key's digest
    too); returned once, for the enrollment's output."""
    secret = new_secret(agent)
    await conn.execute(
        "UPDATE devices SET agent = $3, agent_secret = $4, http_key_digest = $5 "
        "WHERE tenant_id = $1 AND device_id = $2",
        tenant, device, agent, seal_secret(master_key, tenant, device, agent, secret),
        url_key_digest(master_key, secret) if agent in URL_KEY_AGENTS else None)
    return secret


async def enroll_device(
    conn: asyncpg.Connection,
    *,
    tenant: str,
    device: str,
    ownership: str,
    user_email: str | None,
    mqtt_url: str,
    master_key: bytes | None,
    groups: tuple[str, ...] = (),
    mqtt_ca_pem: str | None = None,
    agent: str = "native",
    public_url: str | None = None,
) -> dict[str, Any]:
    """Register a device; return what its agent needs (credentials shown only here).

    ``mqtt_url`` is the broker address the device must use (credentials in it are
    left out), ``mqtt_ca_pem`` the CA certificate it should trust the broker by
    (Config.device_broker()).

    ``master_key`` (Config.master_key) derives the device's MQTT password
    (mdm_server/broker/credentials.py), and creates the first command-signing key
    if none exists yet. This writes the database only: the caller gives the device
    its broker client once the transaction has committed
    (:func:`mdm_server.broker.identity.sync_devices`)."""
    if not is_valid_id(device):
        raise EnrollmentError("device ids are 1-64 characters of A-Z a-z 0-9 _ -")
    if not all(is_valid_id(g) for g in groups):
        raise EnrollmentError("group names are 1-64 characters of A-Z a-z 0-9 _ -")
    if ownership not in ("corporate", "personal"):
        raise EnrollmentError("ownership must be corporate or personal")
    check_user_email(user_email)
    _check_agent(agent, master_key, public_url)
    mqtt = MqttSettings.from_url(mqtt_url)
    password = _password(master_key, tenant, device, 1)
    server_keys = await _server_keys(conn, master_key)
    try:
        await conn.execute(
            """INSERT INTO devices (tenant_id, device_id, ownership, user_email,
                                    mqtt_username, groups, mqtt_generation, trusted_key_ids)
               VALUES ($1, $2, $3, $4, $5, $6, 1, $7)""",
            tenant, device, ownership, user_email,
            mqtt_username(tenant, device), sorted(set(groups)), list(server_keys),
        )
    except asyncpg.UniqueViolationError:
        raise EnrollmentError(f"device {device!r} is enrolled already") from None
    except asyncpg.ForeignKeyViolationError:
        raise EnrollmentError(f"no tenant {tenant!r}") from None
    if agent != "native":
        assert master_key is not None and public_url is not None  # _check_agent
        secret = await _set_agent_secret(conn, master_key, tenant, device, agent)
        return _agent_enrollment(tenant, device, ownership, agent, secret, password, mqtt,
                                 mqtt_ca_pem, public_url)
    return _enrollment(tenant, device, ownership, password, mqtt, mqtt_ca_pem, server_keys)


async def reenroll_device(
    conn: asyncpg.Connection, *, tenant: str, device: str, mqtt_url: str,
    master_key: bytes | None, mqtt_ca_pem: str | None = None,
    public_url: str | None = None,
) -> dict[str, Any]:
    """Issue new credentials to a device, revoked or not: the next credential
    generation. The old password stops working once the broker is synced
    (:func:`mdm_server.broker.identity.sync_devices`, after the commit). A foreign
    agent's secret (encryption passphrase, URL key) is made afresh too: the next
    holder gets none of the previous one's."""
    _password(master_key, tenant, device, 1)  # refuses early without a master key
    server_keys = await _server_keys(conn, master_key)
    async with conn.transaction():
        row = await conn.fetchrow(
            """UPDATE devices SET mqtt_generation = mqtt_generation + 1,
                                  status = 'enrolled', revoked_at = NULL, mqtt_stale = false
               WHERE tenant_id = $1 AND device_id = $2
               RETURNING ownership, mqtt_generation, agent""",
            tenant, device,
        )
        if row is None:
            raise EnrollmentError(f"device {device!r} is not enrolled in tenant {tenant!r}")
        await notify_credentials(conn, tenant, device)
        password = _password(master_key, tenant, device, row["mqtt_generation"])
        agent = row["agent"]
        if agent != "native":
            _check_agent(agent, master_key, public_url)
            assert master_key is not None and public_url is not None
            secret = await _set_agent_secret(conn, master_key, tenant, device, agent)
            return _agent_enrollment(tenant, device, row["ownership"], agent, secret,
                                     password, MqttSettings.from_url(mqtt_url), mqtt_ca_pem,
                                     public_url)
        # The new enrollment hands out every current public key: trusted from now.
        await conn.execute(
            "UPDATE devices SET trusted_key_ids = $3 WHERE tenant_id = $1 AND device_id = $2",
            tenant, device, list(server_keys))
    return _enrollment(tenant, device, row["ownership"], password,
                       MqttSettings.from_url(mqtt_url), mqtt_ca_pem, server_keys)


def check_user_email(user_email: str | None) -> None:
    if user_email is not None and ("@" not in user_email or len(user_email) > 320):
        raise EnrollmentError("user email is not an e-mail address")


async def start_enrollment(conn: asyncpg.Connection, *, tenant: str, device: str,
                           user_email: str | None) -> int:
    """Begin the device's next enrollment (a new holder, ``device reenroll``): its
    user is ``user_email`` (None: nobody named), and what a device user may read
    of it starts now. User tokens issued under an earlier enrollment cover it no
    more (mdm_server/storage/tokens.py). Returns the enrollment's number.
    Credentials are :func:`reenroll_device`'s business."""
    check_user_email(user_email)
    number: int | None = await conn.fetchval(
        """UPDATE devices SET enrollment_no = enrollment_no + 1,
                              enrollment_started_at = now(), user_email = $3
           WHERE tenant_id = $1 AND device_id = $2 RETURNING enrollment_no""",
        tenant, device, user_email)
    if number is None:
        raise EnrollmentError(f"device {device!r} is not enrolled in tenant {tenant!r}")
    return number


async def revoke_device(conn: asyncpg.Connection, *, tenant: str, device: str) -> bool:
    """Mark a device revoked; False if it was revoked already. The caller then
    deletes its broker client (:func:`mdm_server.broker.identity.sync_devices`),
    which disconnects it; ingest refuses its telemetry from the commit on."""
    was: str | None = await conn.fetchval(
        """WITH old AS (SELECT status FROM devices
                        WHERE tenant_id = $1 AND device_id = $2 FOR UPDATE)
           UPDATE devices d
           SET status = 'revoked',
               revoked_at = CASE WHEN old.status = 'revoked' THEN d.revoked_at ELSE now() END
           FROM old WHERE d.tenant_id = $1 AND d.device_id = $2
           RETURNING old.status""",
        tenant, device,
    )
    if was is None:
        raise EnrollmentError(f"device {device!r} is not enrolled in tenant {tenant!r}")
    await notify_credentials(conn, tenant, device)
    return was != "revoked"


#: NOTIFY channel: a device's broker credentials ended (revocation, re-enrollment);
#: the payload is its MQTT username. ``serve``'s broker hook closes its connections
#: on a broker that holds no accounts of its own (mdm_server/broker/hook_revoke.py).
CREDENTIALS_CHANNEL = "mdm_device_credentials"


async def notify_credentials(conn: asyncpg.Connection, tenant: str, device: str) -> None:
    """Say, at the commit, that the device's current broker credentials ended."""
    await conn.execute("SELECT pg_notify($1, $2)", CREDENTIALS_CHANNEL,
                       mqtt_username(tenant, device))


async def device_identities(
    conn: asyncpg.Connection, keys: list[tuple[str, str]] | None = None
) -> list[DeviceIdentity]:
    """Every device (``keys`` None) or those among ``keys`` (tenant, device)."""
    if keys is None:
        rows = await conn.fetch(
            "SELECT tenant_id, device_id, mqtt_generation, status, mqtt_stale, agent "
            "FROM devices")
    else:
        rows = await conn.fetch(
            """SELECT d.tenant_id, d.device_id, d.mqtt_generation, d.status, d.mqtt_stale,
                      d.agent
               FROM devices d
               JOIN unnest($1::text[], $2::text[]) AS k(t, dev)
                 ON d.tenant_id = k.t AND d.device_id = k.dev""",
            [k[0] for k in keys], [k[1] for k in keys],
        )
    return [DeviceIdentity(r["tenant_id"], r["device_id"], r["mqtt_generation"],
                           r["status"] == "enrolled", r["mqtt_stale"], r["agent"])
            for r in rows]


async def lookup_devices(
    conn: asyncpg.Connection, keys: list[tuple[str, str]]
) -> dict[tuple[str, str], DeviceInfo]:
    """The enrolled devices among ``keys`` (tenant, device)."""
    if not keys:
        return {}
    rows = await conn.fetch(
        """SELECT d.tenant_id, d.device_id, d.ownership, d.groups, d.status, d.agent
           FROM devices d
           JOIN unnest($1::text[], $2::text[]) AS k(t, dev)
             ON d.tenant_id = k.t AND d.device_id = k.dev""",
        [k[0] for k in keys], [k[1] for k in keys],
    )
    return {
        (r["tenant_id"], r["device_id"]): DeviceInfo(
            r["tenant_id"], r["device_id"], r["ownership"], tuple(r["groups"]),
            r["status"] == "enrolled", r["agent"],
        )
        for r in rows
    }
