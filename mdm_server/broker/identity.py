"""Device identities on the broker: one dynamic-security client and role per device.

For an enrolled device ``{tenant}/{device}`` at credential generation ``g`` the
broker holds:

- a role ``mdm-device:{tenant}.{device}`` allowing exactly: publish to
  ``mdm/v1/{tenant}/devices/{device}/telemetry/{kind}`` for each of the protocol's
  kinds (literal topics, no ``+``: a "kind" like ``imei=356938035643809`` never
  reaches the server), ``.../acks`` and ``.../status``; subscribe to (literally, no
  wildcard) and receive ``.../commands``;
- a client with username and client id ``{tenant}.{device}`` (the client id is
  bound: nobody can take over the device's session, and the device cannot use
  another id), the password :func:`~mdm_server.broker.credentials.device_password`
  of generation ``g``, textname ``mdm-device`` (what marks the clients this module
  manages) and textdescription ``credential generation g``.

Everything else is denied by the default access the bootstrap set
(mdm_server/broker/bootstrap.py). A revoked device has neither client nor role:
deleting the client disconnects it at once (Mosquitto 2.0.11 kicks a deleted,
disabled or modified client).

Before a client is deleted or gets a new password (revocation, re-enrollment: the
holder changes), its persistent session is discarded: the broker keeps a
device's session, and the commands queued in it while the device was offline,
under its client id after the client is gone, and would hand them to whoever
connects next with that id, i.e. the next holder (:meth:`Dynsec.discard_session`).
First, so that a failure leaves the change planned again for the next try.

The database is the truth; the broker follows it. :func:`sync_devices` makes the
broker match the database for some devices (enrollment, re-enrollment,
revocation); :func:`reconcile` for all of them, deleting managed clients and roles
that match no enrolled device (``serve`` runs it at start, whenever its broker
connection comes back, on NOTIFY ``mdm_broker_identity`` and every 5 minutes).
Both hold a PostgreSQL advisory lock, so syncs never interleave. One broker serves
one database: a managed client that the database does not know is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from mdm_server.agents import URL_KEY_AGENTS
from mdm_server.broker.bootstrap import SERVER_ACLS, SERVER_ROLE
from mdm_server.broker.credentials import device_password
from mdm_server.broker.dynsec import Dynsec, DynsecError
from mdm_server.broker.rules import DeviceTopics, device_topics
from mdm_server.config import Config, MqttSettings
from mdm_server.logsafe import describe
from mdm_server.storage.devices import DeviceIdentity, device_identities, mqtt_username
from mdm_server.storage.pool import connect

__all__ = [
    "NOTIFY_CHANNEL",
    "ROLE_PREFIX",
    "TEXTNAME",
    "BrokerReconciler",
    "SyncReport",
    "device_acls",
    "device_rolename",
    "reconcile",
    "sync_devices",
    "sync_or_defer",
]

log = logging.getLogger(__name__)

ROLE_PREFIX = "mdm-device:"
TEXTNAME = "mdm-device"
NOTIFY_CHANNEL = "mdm_broker_identity"
_LOCK_KEY = 0x6D646D0B  # "mdm" + broker: one sync at a time, across processes
_PAGE = 1000
_IGNORED_ON_DELETE = ("Client not found", "Role not found")
_DISCARD_AT_ONCE = 16


def device_rolename(tenant: str, device: str) -> str:
    return ROLE_PREFIX + mqtt_username(tenant, device)


def _acls(topics: DeviceTopics) -> list[dict[str, Any]]:
    return [{"acltype": t, "topic": topic, "priority": 0, "allow": True} for t, topic in (
        *(("publishClientSend", topic) for topic in topics.publish),
        *(entry for topic in topics.subscribe
          for entry in (("subscribeLiteral", topic), ("publishClientReceive", topic))),
    )]


def owntracks_acls(tenant: str, device: str) -> list[dict[str, Any]]:
    """An OwnTracks device's role: publish on ``owntracks/{username}/{device}`` and
    ``OWNTRACKS_PUBLISH`` (mdm_server/broker/rules.py) below it, subscribe to
    (literally) and receive its own ``.../cmd``; nothing else: no other device's
    topics (the apps' default subscriptions to ``owntracks/+/+`` are refused), no
    wildcard (:func:`~mdm_server.broker.rules.device_topics`)."""
    return _acls(device_topics(tenant, device, "owntracks"))


def device_acls(tenant: str, device: str, agent: str = "native") -> list[dict[str, Any]]:
    """The device's role: its own topics, nothing else, as
    :func:`~mdm_server.broker.rules.device_topics` names them (literal ids, no
    patterns: the ids are [A-Za-z0-9_-], so they hold no wildcard). Telemetry only on
    the six kinds' own topics: roles made before issue 10 allowed ``telemetry/+``,
    any sub-topic; :func:`reconcile` replaces that ACL with these (the ACL sets differ).

    A role cannot refuse the retain flag (the plugin's ACL check in Mosquitto 2.0
    ignores it): the broker's config refuses retained messages, retained wills and
    QoS 2 for every client (deploy/mosquitto/mosquitto.conf). An OwnTracks device
    gets :func:`owntracks_acls` instead."""
    return _acls(device_topics(tenant, device, agent))


def _generation_text(generation: int) -> str:
    return f"credential generation {generation}"


def _acl_set(acls: Sequence[dict[str, Any]]) -> set[tuple[str, str, bool]]:
    return {(str(a.get("acltype")), str(a.get("topic")), bool(a.get("allow"))) for a in acls}


@dataclass
class SyncReport:
    created: int = 0
    updated: int = 0
    deleted: int = 0
    # Enrolled before broker identity (generation 0), or credentials from a master
    # key since rotated away whose broker account is gone: re-enroll them.
    not_derivable: int = 0
    stale_kept: int = 0  # credentials from an earlier master key, account kept as is
    server_acls_added: int = 0  # ACLs the server's own role lacked (an older broker)

    @property
    def changed(self) -> int:
        return self.created + self.updated + self.deleted + self.server_acls_added

    def __str__(self) -> str:
        return (f"created={self.created} updated={self.updated} deleted={self.deleted}"
                f" not_derivable={self.not_derivable} stale_kept={self.stale_kept}"
                f" server_acls_added={self.server_acls_added}")


# --- reading the broker --------------------------------------------------------------


async def _list(dynsec: Dynsec, command: str, key: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    offset = 0
    while True:
        (resp,) = await dynsec.call([{"command": command, "verbose": True,
                                      "count": _PAGE, "offset": offset}])
        if "error" in resp:
            raise DynsecError(f"{command} refused by the broker: {resp['error']}")
        page = resp.get("data", {}).get(key, [])
        out += page
        offset += len(page)
        if len(page) < _PAGE or offset >= int(resp.get("data", {}).get("totalCount", 0)):
            return out


async def _managed_all(dynsec: Dynsec) -> tuple[dict[str, dict[str, Any]],
                                                dict[str, dict[str, Any]]]:
    clients = {c["username"]: c for c in await _list(dynsec, "listClients", "clients")
               if c.get("textname") == TEXTNAME}
    roles = {r["rolename"]: r for r in await _list(dynsec, "listRoles", "roles")
             if str(r.get("rolename", "")).startswith(ROLE_PREFIX)}
    return clients, roles


async def _managed_some(dynsec: Dynsec, keys: Sequence[tuple[str, str]]
                        ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    commands: list[dict[str, Any]] = []
    for t, d in keys:
        commands.append({"command": "getClient", "username": mqtt_username(t, d)})
        commands.append({"command": "getRole", "rolename": device_rolename(t, d)})
    clients: dict[str, dict[str, Any]] = {}
    roles: dict[str, dict[str, Any]] = {}
    for resp in await dynsec.call(commands):
        data = resp.get("data", {})
        if "client" in data and data["client"].get("textname") == TEXTNAME:
            clients[data["client"]["username"]] = data["client"]
        elif "role" in data:
            roles[data["role"]["rolename"]] = data["role"]
        elif resp.get("error") not in _IGNORED_ON_DELETE:
            raise DynsecError(f"{resp.get('command')} refused by the broker: "
                              f"{resp.get('error')}")
    return clients, roles


# --- planning and applying ----------------------------------------------------------------


def _plan(master_key: bytes, want: Sequence[DeviceIdentity],
          clients: dict[str, dict[str, Any]], roles: dict[str, dict[str, Any]],
          report: SyncReport) -> Iterator[dict[str, Any]]:
    """The commands that make the broker hold exactly ``want`` (the managed clients
    and roles given, and no others)."""
    keep_clients: set[str] = set()
    keep_roles: set[str] = set()
    for dev in want:
        if not dev.enrolled or dev.agent in URL_KEY_AGENTS:  # HTTP only: no account
            continue
        if dev.generation < 1:
            report.not_derivable += 1
            continue
        user = mqtt_username(dev.tenant, dev.device)
        rolename = device_rolename(dev.tenant, dev.device)
        keep_clients.add(user)
        keep_roles.add(rolename)
        acls = device_acls(dev.tenant, dev.device, dev.agent)
        role = roles.get(rolename)
        if role is None:
            yield {"command": "createRole", "rolename": rolename, "acls": acls}
        else:
            have, wanted = _acl_set(role.get("acls", [])), _acl_set(acls)
            for acl in role.get("acls", []):
                if (acl.get("acltype"), acl.get("topic"), bool(acl.get("allow"))) not in wanted:
                    yield {"command": "removeRoleACL", "rolename": rolename,
                           "acltype": acl.get("acltype"), "topic": acl.get("topic")}
            for acl in acls:
                if (acl["acltype"], acl["topic"], acl["allow"]) not in have:
                    yield {"command": "addRoleACL", "rolename": rolename, **acl}
        client = clients.get(user)
        description = _generation_text(dev.generation)
        if dev.stale:
            # Its password comes from a master key since rotated away: the broker
            # keeps the one the device has (only a re-enrollment changes it); the
            # server cannot derive it to make the account again.
            if client is None:
                report.not_derivable += 1
            else:
                report.stale_kept += 1
            continue
        if client is None:
            report.created += 1
            yield {"command": "createClient", "username": user, "clientid": user,
                   "password": device_password(master_key, dev.tenant, dev.device,
                                               dev.generation),
                   "textname": TEXTNAME, "textdescription": description,
                   "roles": [{"rolename": rolename}]}
            continue
        change: dict[str, Any] = {}
        if client.get("textdescription") != description:
            change["password"] = device_password(master_key, dev.tenant, dev.device,
                                                 dev.generation)
            change["textdescription"] = description
        if client.get("clientid") != user:
            change["clientid"] = user
        if [r.get("rolename") for r in client.get("roles", [])] != [rolename] or \
                client.get("groups"):
            change["roles"] = [{"rolename": rolename}]
            change["groups"] = []
        if change:
            # Disconnects the device if it is connected (its old password is void).
            report.updated += 1
            yield {"command": "modifyClient", "username": user, **change}
    for user in clients:
        if user not in keep_clients:
            report.deleted += 1
            yield {"command": "deleteClient", "username": user}  # disconnects it
    for rolename in roles:
        if rolename not in keep_roles:
            yield {"command": "deleteRole", "rolename": rolename}


async def _discard_sessions(dynsec: Dynsec, commands: list[dict[str, Any]]) -> None:
    """Discard the sessions of the clients ``commands`` delete or give a new
    password (their client id is their username)."""
    ids = [c["username"] for c in commands if c["command"] == "deleteClient"
           or (c["command"] == "modifyClient" and "password" in c)]
    for i in range(0, len(ids), _DISCARD_AT_ONCE):
        await asyncio.gather(*(dynsec.discard_session(cid)
                               for cid in ids[i:i + _DISCARD_AT_ONCE]))


async def _apply(dynsec: Dynsec, commands: list[dict[str, Any]]) -> None:
    await _discard_sessions(dynsec, commands)
    if not commands:
        return
    failed = [(c["command"], r["error"]) for c, r in
              zip(commands, await dynsec.call(commands), strict=True)
              if "error" in r and not (c["command"].startswith("delete")
                                       and r["error"] in _IGNORED_ON_DELETE)]
    if failed:
        command, error = failed[0]
        raise DynsecError(f"the broker refused {len(failed)} of {len(commands)} "
                          f"dynamic-security commands (first: {command}: {error})")


@contextlib.asynccontextmanager
async def _locked(conn: asyncpg.Connection) -> Any:
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        yield
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


async def sync_devices(dynsec: Dynsec, conn: asyncpg.Connection, master_key: bytes,
                       keys: Sequence[tuple[str, str]]) -> SyncReport:
    """Make the broker match the database for the devices ``keys`` (tenant, device):
    a client and role if enrolled (password of the current generation), none if
    revoked or unknown. Call after the enrolling or revoking transaction committed."""
    report = SyncReport()
    if not keys:
        return report
    async with _locked(conn):
        clients, roles = await _managed_some(dynsec, keys)
        want = await device_identities(conn, list(keys))
        await _apply(dynsec, list(_plan(master_key, want, clients, roles, report)))
    return report


async def upgrade_server_role(dynsec: Dynsec) -> int:
    """Add to the server's own role the ACLs this version needs that it lacks (a
    broker set up by an older version: OwnTracks' topics, issue 12); returns how
    many. Only adds: adding an ACL applies to connected clients at once without
    disconnecting them, whereas changing the role otherwise would disconnect the
    server (the broker's bootstrap sets the whole role at the broker's next start)."""
    (resp,) = await dynsec.call([{"command": "getRole", "rolename": SERVER_ROLE}])
    role = resp.get("data", {}).get("role")
    if not isinstance(role, dict):
        return 0  # not ours to make: the bootstrap does (an anonymous broker has none)
    have = {(str(a.get("acltype")), str(a.get("topic"))) for a in role.get("acls", [])}
    missing = [{"command": "addRoleACL", "rolename": SERVER_ROLE, "acltype": t,
                "topic": topic, "priority": 0, "allow": True}
               for t, topic in SERVER_ACLS if (t, topic) not in have]
    if missing:
        await _apply(dynsec, missing)
    return len(missing)


async def reconcile(dynsec: Dynsec, conn: asyncpg.Connection, master_key: bytes
                    ) -> SyncReport:
    """Make the broker match the database for every device; delete managed
    clients and roles of devices the database does not hold as enrolled. First,
    the server's own role gets what it lacks (:func:`upgrade_server_role`)."""
    report = SyncReport()
    report.server_acls_added = await upgrade_server_role(dynsec)
    async with _locked(conn):
        # The broker's state first, then the database's: under the lock nothing
        # changes between the two, and the plan goes from the older to the newer.
        clients, roles = await _managed_all(dynsec)
        want = await device_identities(conn)
        await _apply(dynsec, list(_plan(master_key, want, clients, roles, report)))
    return report


async def sync_or_defer(settings: MqttSettings, conn: asyncpg.Connection,
                        master_key: bytes, keys: Sequence[tuple[str, str]], *,
                        timeout_s: float = 10.0) -> str | None:
    """:func:`sync_devices` on a connection of its own. None if the broker is in
    step; otherwise why not (a message without secrets), after a NOTIFY that makes
    a running ``serve`` reconcile as soon as it can reach the broker."""
    try:
        async with Dynsec(settings, timeout_s=timeout_s) as dynsec:
            await sync_devices(dynsec, conn, master_key, keys)
        return None
    except DynsecError as exc:
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
        return str(exc)


class BrokerReconciler:
    """``serve``'s task: keeps the broker's device identities in step with the
    database. Reconciles when its broker connection becomes ready (the first time,
    and after every loss: a broker that restarted may have lost its state), on
    NOTIFY ``mdm_broker_identity``, and every ``interval_s``; retries failures with
    backoff. Never raises: a broker that cannot be managed must not stop ingest."""

    def __init__(self, config: Config, *, interval_s: float = 300.0) -> None:
        self._config = config
        self._interval_s = interval_s
        self._wake = asyncio.Event()
        self.runs = 0
        self.last: SyncReport | None = None

    def _notified(self, *args: object) -> None:
        self._wake.set()

    async def run(self) -> None:
        cfg = self._config
        mqtt = cfg.require_mqtt()
        if not mqtt.username:
            log.warning("MDM_MQTT_URL names no MQTT user: device identities on the broker "
                        "are not managed (an anonymous broker is for local experiments "
                        "only)")
            return
        if cfg.master_key is None:
            log.error("no master key: device identities on the broker are not managed")
            return
        dynsec = Dynsec(mqtt)
        conn: asyncpg.Connection | None = None
        retry_s = 1.0
        await dynsec.start()
        try:
            while True:
                delay = self._interval_s
                try:
                    await dynsec.ready()
                    dynsec.take_session_change()
                    if conn is None or conn.is_closed():
                        conn = await connect(cfg.database_url)
                        await conn.add_listener(NOTIFY_CHANNEL, self._notified)
                    self._wake.clear()
                    report = await reconcile(dynsec, conn, cfg.master_key)
                    self.runs += 1
                    self.last = report
                    if report.changed or self.runs == 1:
                        log.info("broker identities reconciled: %s", report)
                    if report.not_derivable:
                        log.warning("%d enrolled devices have no derivable MQTT password "
                                    "(enrolled before broker identity): "
                                    "`mdm-server device reenroll` them", report.not_derivable)
                    retry_s = 1.0
                except DynsecError as exc:
                    log.warning("broker identities not reconciled (%s); retrying in %.0f s",
                                exc, retry_s)
                    delay, retry_s = retry_s, min(retry_s * 2, 60.0)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("broker identities not reconciled (database: %s); "
                                "retrying in %.0f s", type(exc).__name__, retry_s)
                    if conn is not None:
                        conn.terminate()
                        conn = None
                    delay, retry_s = retry_s, min(retry_s * 2, 60.0)
                except Exception as exc:  # a bug: logged without its message, retried
                    log.error("broker identities not reconciled: %s", describe(exc))
                    delay, retry_s = retry_s, min(retry_s * 2, 60.0)
                await _first_of(dynsec.wait_session_change(), self._wake.wait(),
                                asyncio.sleep(delay))
        finally:
            await dynsec.close()
            if conn is not None and not conn.is_closed():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 5)


async def _first_of(*aws: Any) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
