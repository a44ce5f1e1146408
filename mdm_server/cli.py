"""``mdm-server``: the one command for operators."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Sequence

import asyncpg

from mdm_server import audit
from mdm_server.agents import AGENTS
from mdm_server.api.access_log import AccessLog
from mdm_server.commands.service import lock_unfinished, withdraw_unfinished
from mdm_server.config import (
    Config,
    ConfigError,
    DeviceBroker,
    listen_socket,
    load_config,
    master_key_from_env,
)
from mdm_server.storage.devices import (
    EnrollmentError,
    enroll_device,
    reenroll_device,
    revoke_device,
    start_enrollment,
)
from mdm_server.storage.keyring import Keyring, KeyringError
from mdm_server.storage.master import MasterKeyError
from mdm_server.storage.migrate import apply_migrations
from mdm_server.storage.pool import connect
from mdm_server.storage.roles import RoleError, privileged_because
from mdm_server.storage.tenants import (
    TenantError,
    create_tenant,
    list_tenants,
    require_tenant,
)
from mdm_server.storage.tokens import (
    ADMIN_DEFAULT_DAYS,
    EXPIRES_MAX_DAYS,
    EXPIRES_MIN_DAYS,
    TOKEN_STATES,
    USER_DEFAULT_DAYS,
    create_admin_token,
    create_user_token,
    list_tokens,
    revoke_device_user_tokens,
    revoke_token,
    token_json,
)

__all__ = ["main"]

#: Commands that append to the audit log or read it: they need the master key.
_AUDITED = frozenset({"tenant", "admin", "user", "device", "audit"})
# Commands whose work hangs off the master key: they check it is this database's.
_MASTER_CHECKED = frozenset({"serve", "ingest", "tenant", "admin", "user", "device",
                             "audit", "keys", "broker"})


#: What ``mdm-server --help`` says of the environment (README "Environment" has it all).
ENVIRONMENT = """\
environment (README.md, "Environment", says more of each):
  MDM_DATABASE_URL          postgresql://... : a superuser for migrate, else the
                            server's role (migrate --server-role)
  MDM_SERVER_DB_PASSWORD    the password migrate --server-role gives that role
  MDM_MASTER_KEY, MDM_MASTER_KEY_FILE
                            32 random bytes, base64: hashing keys, device passwords,
                            audit MACs and key wrapping derive from it
  MDM_KEYRING_DIR           the key ring device data keys are wrapped under
  MDM_MQTT_URL              the broker and the server's MQTT user (mqtt:// on
                            loopback, or mqtts://); MDM_MQTT_CA_FILE for mqtts
  MDM_MQTT_PUBLIC_URL, MDM_MQTT_PUBLIC_CA_FILE
                            the address and CA devices are given at enrollment
  MDM_MQTT_SERVER_PASSWORD  the server's MQTT password (docker-compose)
  MDM_HTTP_ADDR             host:port of the API, console and portal (127.0.0.1:8080)
  MDM_INSTANCE              this serve's own name when several share one Mosquitto
                            (it goes into the server's MQTT client ids)
  MDM_PUBLIC_URL            the server's address as devices' apps reach it (printed by
                            device enroll --agent owntracks|osmand|traccar)
  MDM_TLS_CERT, MDM_TLS_KEY serve HTTPS with these PEM files
  MDM_BROKER_HOOK_ADDR      host:port (loopback or private) where serve answers a
                            clustered broker's auth questions (MDM_BROKER_HOOK_PUBLIC=1
                            to allow another address behind a firewall)
  MDM_AMQP_URL, MDM_AMQP_MANAGEMENT_URL, MDM_AMQP_CA_FILE
                            the AMQP cluster's nodes with the server's broker login
                            (set: ingest, acks and commands go through it, and
                            MDM_MQTT_URL is not needed), their management API (closing
                            revoked devices' links), the CA for amqps://
  MDM_EMQX_API_URL, MDM_EMQX_API_KEY, MDM_EMQX_API_SECRET
                            an EMQX cluster's REST API and an API key of it (kicking
                            revoked devices' clients out)
  MDM_LOG_LEVEL             DEBUG, INFO (default), WARNING, ERROR
  MDM_LOG_FORMAT            text (default) or json: one JSON object a line
  MDM_METRICS_ADDR          host:port of serve's GET /metrics (Prometheus), a second
                            listener without a token: keep it private (unset: none)
  PROMETHEUS_MULTIPROC_DIR  where serve's processes keep their metrics (default: a
                            private temporary directory); MDM_RUN_DIR is serve's own
                            note to its ingest workers, never set it
  MDM_INGEST_BATCH, MDM_INGEST_BATCH_DELAY_MS, MDM_INGEST_MAX_PENDING_MB
                            ingest batching and memory
  MDM_INGEST_DEVICE_RATE, MDM_INGEST_DEVICE_BURST
                            one device's messages/s before they are dropped, counted
  MDM_API_RATE_PER_S, MDM_API_BURST, MDM_API_RATE_KEYS
                            API rate limits
  MDM_PREVIEW_PER_MIN       policy previews a minute per tenant
  MDM_LIVE_STREAMS_PER_TOKEN, MDM_LIVE_STREAMS_PER_TENANT
                            live streams open at once
  MDM_POLICY_STORE_MB, MDM_PLACE_STORE_MB
                            what a tenant's stored policy and place versions may take
  MDM_RETENTION_INTERVAL_S  how often serve applies retention
  MDM_ALLOW_PRIVILEGED_DB_ROLE, MDM_ALLOW_PUBLISHED_MASTER_KEY
                            =1 for development only

exit status: 0 done; 1 a check failed or a key operation was refused (audit
verify, keys); 2 refused: bad settings or arguments, the reason in one line; 3 a
service (database, broker) cannot be used; 4 done, but the broker could not be
told yet (device revoke)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mdm-server", description=__doc__, epilog=ENVIRONMENT,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    mig = sub.add_parser("migrate", help="apply database migrations (as a superuser)")
    mig.add_argument("--server-role", metavar="NAME",
                     help="then create (or bring in line) the LOGIN role NAME that serve "
                          "runs as: in mdm_app, acting as mdm_app; password from "
                          "MDM_SERVER_DB_PASSWORD when set")
    serve = sub.add_parser("serve", help="HTTP API and telemetry ingest")
    serve.add_argument("--ingest-workers", type=int, default=1, metavar="N",
                       help="ingest processes (one per core is the rule)")
    ingest = sub.add_parser("ingest", help="one ingest worker, no HTTP (serve starts these)")
    ingest.add_argument("--index", type=int, default=0, help="worker number: its MQTT session")
    retention = sub.add_parser("retention", help="remove data past its retention")
    retention.add_subparsers(dest="action", required=True).add_parser(
        "run", help="apply every policy's retention now (serve also does it hourly)")
    tenant = sub.add_parser("tenant", help="tenants").add_subparsers(dest="action", required=True)
    tenant.add_parser("create", help="create a tenant (with its open default policy)"
                      ).add_argument("name", help="1-64 characters of A-Z a-z 0-9 _ -")
    tenant.add_parser("list", help="every tenant (JSON lines: tenant, created_at, devices, "
                                   "revoked_devices, admins: working admin and auditor "
                                   "tokens)")
    admin = sub.add_parser("admin", help="admins").add_subparsers(dest="action", required=True)
    ac = admin.add_parser("create", help="create an admin; prints its API token")
    ac.add_argument("--tenant", required=True, help="the tenant the admin works for")
    ac.add_argument("--name", required=True, help="who holds the token (in the audit log)")
    ac.add_argument("--role", choices=["admin", "auditor"], default="admin",
                    help="auditor: reads everything an admin reads, changes nothing")
    ac.add_argument("--expires-in", type=int, metavar="DAYS", dest="expires_in",
                    help=f"the token works this many days ({EXPIRES_MIN_DAYS}-"
                         f"{EXPIRES_MAX_DAYS}; default {ADMIN_DEFAULT_DAYS})")
    ac.add_argument("--rotate", action="store_true",
                    help="the name has a working token already: revoke it and issue a new "
                         "one (without --rotate that is refused)")
    al = admin.add_parser("list", help="the tenant's admins and auditors, newest first (JSON "
                                       "lines as `token list` prints them; never the token)")
    al.add_argument("--tenant", required=True)
    al.add_argument("--state", choices=TOKEN_STATES, help="only tokens in this state")
    user = sub.add_parser("user", help="device users").add_subparsers(dest="action",
                                                                      required=True)
    ut = user.add_parser("token", help="a token for a device's user (the /api/v1/me API "
                                       "and the portal), bound to the device's current "
                                       "enrollment; prints it")
    ut.add_argument("--tenant", required=True)
    ut.add_argument("--device", required=True, help="the device whose user gets the token")
    ut.add_argument("--expires-in", type=int, metavar="DAYS", dest="expires_in",
                    help=f"the token works this many days ({EXPIRES_MIN_DAYS}-"
                         f"{EXPIRES_MAX_DAYS}; default {USER_DEFAULT_DAYS})")
    tok = sub.add_parser("token", help="API tokens of a tenant").add_subparsers(
        dest="action", required=True)
    tl = tok.add_parser("list", help="the tenant's tokens, newest first (JSON lines: id, role, "
                                     "name, device, created_at, expires_at, last_used_at, "
                                     "revoked_at, state; never the token)")
    tl.add_argument("--tenant", required=True)
    tl.add_argument("--state", choices=TOKEN_STATES, help="only tokens in this state")
    tr = tok.add_parser("revoke", help="revoke a token now: it is refused (401) from its "
                                       "next request on")
    tr.add_argument("--tenant", required=True)
    tr.add_argument("--id", required=True, dest="token_id", help="the token's id (token list)")
    device = sub.add_parser("device", help="devices").add_subparsers(dest="action", required=True)
    de = device.add_parser("enroll", help="enroll a device; prints what its agent needs (JSON)")
    de.add_argument("--tenant", required=True)
    de.add_argument("--device", required=True,
                    help="the device's id: 1-64 characters of A-Z a-z 0-9 _ -")
    de.add_argument("--ownership", required=True, choices=["corporate", "personal"],
                    help="personal: held to the personal-device floor (docs/policies.md)")
    de.add_argument("--user-email", help="the e-mail address of the device's user")
    de.add_argument("--group", action="append", default=[], dest="groups",
                    help="a group the device belongs to (repeatable); policies select by it")
    de.add_argument("--agent", default="native", choices=AGENTS,
                    help="the app that reports for it: native (our agent, the default), "
                         "owntracks, osmand or traccar (docs/agents.md); prints that "
                         "app's settings")
    dl = device.add_parser("list", help="the tenant's devices (JSON lines: device, ownership, "
                                        "groups, status, enrolled_at)")
    dl.add_argument("--tenant", required=True)
    ds = device.add_parser("stale", help="devices whose MQTT password comes from a master key "
                                         "since rotated away: re-enroll them (JSON lines)")
    ds.add_argument("--tenant")
    for name, text in (("revoke", "revoke a device: the broker disconnects it and lets it in "
                                  "no more, ingest refuses its telemetry, its unfinished "
                                  "commands are cancelled and its user tokens revoked (exit 4: "
                                  "the broker could not be told yet)"),
                       ("reenroll", "a new enrollment (a new holder), revoked or not: new "
                                    "credentials, unfinished commands cancelled, user tokens "
                                    "revoked; prints what its agent needs (JSON)")):
        dr = device.add_parser(name, help=text)
        dr.add_argument("--tenant", required=True)
        dr.add_argument("--device", required=True)
        if name == "reenroll":
            dr.add_argument("--user-email",
                            help="the new holder's e-mail (left out: none; the previous "
                                 "holder's is never kept)")
    broker = sub.add_parser("broker", help="the MQTT broker's device identities")
    bsub = broker.add_subparsers(dest="action", required=True)
    bsub.add_parser(
        "reconcile", help="make the broker's clients match the database now (serve does it "
                          "at start, when the broker comes back and every 5 minutes)")
    bp = bsub.add_parser(
        "provision-offline", help="write every enrolled device's account into the broker's "
                                  "dynamic-security file while the broker is STOPPED (bulk "
                                  "import: thousands of devices in seconds)")
    bp.add_argument("file", help="the broker's dynamic-security.json")
    keys = sub.add_parser("keys", help="the server's command-signing keys, and the key ring "
                                       "device data keys are wrapped under").add_subparsers(
        dest="action", required=True)
    keys.add_parser("list", help="signing keys and how many devices trust each (JSON lines)")
    keys.add_parser("rotate", help="create a new signing key and hand it to every enrolled "
                                   "device (signed with a key it trusts); prints its id")
    kr = keys.add_parser("retire", help="stop signing with a key, delete its private half "
                                        "and send every device that trusts it a signed "
                                        "distrust_key (refused while a device trusts no "
                                        "newer one)")
    kr.add_argument("key_id", help="the key's id, as `keys list` prints it")
    kr.add_argument("--force", action="store_true",
                    help="retire even if devices are left without a key they trust")
    keys.add_parser("compact", help="re-wrap every device data key under a new key-ring epoch "
                                    "and destroy the older epochs' files now (erasure and "
                                    "serve do it on their own); prints a JSON summary")
    krm = keys.add_parser(
        "rotate-master", help="move every secret to a new master key (signing keys, device "
                              "data keys, the audit log's MACs), with every server process "
                              "stopped, as the database's owner; prints a JSON summary "
                              "(README, \"Rotating the master key\")")
    krm.add_argument("--new-key-file", required=True, metavar="FILE",
                     help="the new master key: 32 bytes, base64, in a file")
    aud = sub.add_parser("audit", help="the audit log").add_subparsers(dest="action",
                                                                       required=True)
    av = aud.add_parser("verify", help="check every chain (MACs under the master key); exit 1 "
                                       "at a broken entry, naming it")
    av.add_argument("--checkpoint", metavar="FILE",
                    help="also detect any rewrite before this checkpoint (entries removed "
                         "or changed); refuse a checkpoint whose signature does not verify")
    ac = aud.add_parser("checkpoint", help="verify, then write the signed head of every chain "
                                           "(JSON) for keeping outside the database")
    ac.add_argument("--out", metavar="FILE", help="write it to FILE (default: stdout)")
    al = aud.add_parser("list", help="a tenant's entries, newest first (JSON lines, each "
                                     "with its integrity)")
    al.add_argument("--tenant", required=True)
    al.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    _describe_common(p)
    return p


def _describe_common(parser: argparse.ArgumentParser) -> None:
    """--tenant and --device mean the same everywhere: say so where nothing more is."""
    words = {"--tenant": "the tenant's name", "--device": "the device's id"}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _describe_common(sub)
        elif action.help is None and action.option_strings:
            action.help = words.get(action.option_strings[0])


async def _migrate(cfg: Config, server_role: str | None) -> None:
    from mdm_server.storage.roles import ensure_server_role

    conn = await connect(cfg.database_url)
    try:
        applied = await apply_migrations(conn)
        for m in applied:
            print(f"applied {m.version:03d}_{m.name}")
        if not applied:
            print("database is up to date")
        if server_role is not None:
            created = await ensure_server_role(conn, server_role, cfg.server_db_password)
            print(f"server role {server_role} {'created' if created else 'is in line'}"
                  + ("" if cfg.server_db_password else " (no MDM_SERVER_DB_PASSWORD: "
                                                         "password not set)"))
    finally:
        await conn.close()


async def _retention_run(cfg: Config) -> None:
    from mdm_server.retention import run_retention

    conn = await connect(cfg.database_url)
    try:
        report = await run_retention(conn)
    finally:
        await conn.close()
    print(json.dumps({"dropped_partitions": report.dropped_partitions,
                      "deleted_rows": report.deleted_rows,
                      "deleted_dead_letters": report.deleted_dead_letters,
                      "cleared_ack_details": report.cleared_ack_details,
                      "deleted_command_events": report.deleted_command_events}))


async def _tenant_create(cfg: Config, name: str) -> None:
    conn = await connect(cfg.database_url)
    try:
        async with conn.transaction():
            await create_tenant(conn, name)
            await audit.append(conn, cfg.audit_keys(), tenant=name, actor="cli",
                               action="tenant.create",
                               target=f"tenant:{name}")
    finally:
        await conn.close()
    print(json.dumps({"tenant": name}))


async def _list(cfg: Config, args: argparse.Namespace) -> None:
    """``tenant list``, ``admin list``, ``device list``: JSON lines, never a token."""
    conn = await connect(cfg.database_url)
    try:
        if args.command == "tenant":
            for t in await list_tenants(conn):
                print(json.dumps({"tenant": t["tenant_id"],
                                  "created_at": t["created_at"].isoformat(),
                                  "devices": t["devices"],
                                  "revoked_devices": t["revoked_devices"],
                                  "admins": t["admins"]}))
            return
        await require_tenant(conn, args.tenant)
        if args.command == "admin":
            for row in await list_tokens(conn, args.tenant, state=args.state) or []:
                if row["role"] in ("admin", "auditor"):
                    print(json.dumps(token_json(row)))
            return
        for d in await conn.fetch(
                "SELECT device_id, ownership, groups, status, enrolled_at FROM devices "
                "WHERE tenant_id = $1 ORDER BY device_id", args.tenant):
            print(json.dumps({"device": d["device_id"], "ownership": d["ownership"],
                              "groups": list(d["groups"]), "status": d["status"],
                              "enrolled_at": d["enrolled_at"].isoformat()}))
    finally:
        await conn.close()


async def _admin_create(cfg: Config, args: argparse.Namespace) -> None:
    conn = await connect(cfg.database_url)
    try:
        async with conn.transaction():
            made = await create_admin_token(conn, tenant=args.tenant, name=args.name,
                                            role=args.role, expires_in_days=args.expires_in,
                                            rotate=args.rotate)
            details: dict[str, object] = {"token_id": str(made.token_id),
                                          "expires_at": made.expires_at.isoformat()}
            if made.revoked:
                details["revoked_tokens"] = [str(t) for t in made.revoked]
            await audit.append(conn, cfg.audit_keys(), tenant=args.tenant, actor="cli",
                               action=f"{args.role}.create",
                               target=f"admin:{args.name}", details=details)
    finally:
        await conn.close()
    print(made.token)
    if made.revoked:
        print(f"mdm-server: revoked {len(made.revoked)} earlier token(s) of {args.name!r}",
              file=sys.stderr)
    print(f"mdm-server: token id {made.token_id}, expires {made.expires_at.isoformat()}",
          file=sys.stderr)


async def _user_token(cfg: Config, args: argparse.Namespace) -> None:
    conn = await connect(cfg.database_url)
    try:
        async with conn.transaction():
            made = await create_user_token(conn, tenant=args.tenant, device=args.device,
                                           expires_in_days=args.expires_in)
            await audit.append(conn, cfg.audit_keys(), tenant=args.tenant, actor="cli",
                               action="user_token.create",
                               target=f"device:{args.device}",
                               details={"token_id": str(made.token_id),
                                        "expires_at": made.expires_at.isoformat()})
    finally:
        await conn.close()
    print(made.token)
    print(f"mdm-server: token id {made.token_id}, expires {made.expires_at.isoformat()}",
          file=sys.stderr)


async def _token(cfg: Config, args: argparse.Namespace) -> int:
    conn = await connect(cfg.database_url)
    try:
        if args.action == "list":
            await require_tenant(conn, args.tenant)
            for row in await list_tokens(conn, args.tenant, state=args.state) or []:
                print(json.dumps(token_json(row)))
            return 0
        try:
            token_id = uuid.UUID(args.token_id)
        except ValueError:
            raise TenantError("--id is a token id as `token list` shows it") from None
        async with conn.transaction():
            found = await revoke_token(conn, args.tenant, token_id)
            if found is None:
                raise TenantError(f"no token with that id in tenant {args.tenant!r}")
            row, changed = found
            if changed:
                await audit.append(conn, cfg.audit_keys(), tenant=args.tenant, actor="cli",
                                   action="token.revoke", target=f"token:{token_id}",
                                   details={"role": row["role"]})
        print(json.dumps(token_json(row)))
        if not changed:
            print("mdm-server: the token was revoked already", file=sys.stderr)
        return 0
    finally:
        await conn.close()


async def _end_enrollment(cfg: Config, conn: asyncpg.Connection, tenant: str, device: str,
                          because: str) -> dict[str, object]:
    """The device's holder is gone (revoked) or changes (re-enrolled): its unfinished
    commands are cancelled and its user tokens revoked. Inside the transaction,
    after :func:`lock_unfinished` and the device's own change."""
    withdrawn = await withdraw_unfinished(conn, tenant=tenant, device=device, actor="cli",
                                          because=because, audit_keys=cfg.audit_keys())
    tokens = await revoke_device_user_tokens(conn, tenant, device)
    return {"commands_cancelled": len(withdrawn),
            "user_tokens_revoked": [str(t) for t in tokens]}


def _device_broker(cfg: Config) -> DeviceBroker:
    """The broker address and CA enrollment gives devices; says on stderr when it is
    the server's own address because MDM_MQTT_PUBLIC_URL is not set."""
    broker = cfg.device_broker()
    if broker.fallback:
        print(f"mdm-server: note: MDM_MQTT_PUBLIC_URL is not set, so the enrollment gives "
              f"the server's own broker address, {broker.url} (MDM_MQTT_URL without its "
              "credentials" + (", and MDM_MQTT_CA_FILE's CA" if broker.ca_pem else "")
              + "). Devices elsewhere may not reach it: set MDM_MQTT_PUBLIC_URL to the "
              "address they use (e.g. mqtts://mdm.example.org:8883), and "
              "MDM_MQTT_PUBLIC_CA_FILE if the broker's certificate is not publicly trusted.",
              file=sys.stderr)
    return broker


def _public_url(cfg: Config) -> str:
    """The public base URL enrollment prints for foreign agents; says on stderr when
    it is serve's own address because MDM_PUBLIC_URL is not set."""
    url, fallback = cfg.public_base()
    if fallback:
        print(f"mdm-server: note: MDM_PUBLIC_URL is not set, so the enrollment gives the "
              f"address serve listens on, {url}. Phones elsewhere may not reach it: set "
              "MDM_PUBLIC_URL to the server's public https:// address.", file=sys.stderr)
    return url


async def _device_enroll(cfg: Config, args: argparse.Namespace) -> None:
    broker = _device_broker(cfg)
    public_url = _public_url(cfg) if args.agent != "native" else None
    conn = await connect(cfg.database_url)
    try:
        async with conn.transaction():
            enrollment = await enroll_device(
                conn, tenant=args.tenant, device=args.device, ownership=args.ownership,
                user_email=args.user_email, mqtt_url=broker.url, mqtt_ca_pem=broker.ca_pem,
                master_key=cfg.master_key, groups=tuple(args.groups), agent=args.agent,
                public_url=public_url,
            )
            # Ids and codes only: never the user's e-mail (mdm_server/audit.py).
            await audit.append(conn, cfg.audit_keys(), tenant=args.tenant, actor="cli",
                               action="device.enroll",
                               target=f"device:{args.device}",
                               details={"ownership": args.ownership,
                                        "groups": sorted(set(args.groups)),
                                        "agent": args.agent})
        print(json.dumps(enrollment, indent=2))
        await _sync_broker(cfg, conn, args.tenant, args.device, "is enrolled")
    finally:
        await conn.close()


async def _sync_broker(cfg: Config, conn: asyncpg.Connection, tenant: str, device: str,
                       done: str) -> bool:
    """Give the broker the device's identity (or take it away); on failure say so
    on stderr: a running serve reconciles as soon as it reaches the broker."""
    from mdm_server.broker.identity import sync_or_defer

    if cfg.mqtt is None:
        # Devices are on a cluster (MDM_AMQP_URL) whose nodes ask serve's broker hook:
        # it reads the device's row at every question; nothing to tell.
        return True
    mqtt = cfg.mqtt
    if not mqtt.username:
        print(f"mdm-server: note: the device {done}; MDM_MQTT_URL names no MQTT user, so "
              "the broker was not told (fine only for an anonymous experimental broker)",
              file=sys.stderr)
        return False
    assert cfg.master_key is not None  # enrollment and revocation need it
    why = await sync_or_defer(mqtt, conn, cfg.master_key, [(tenant, device)])
    if why is not None:
        print(f"mdm-server: warning: the device {done} in the database, but the broker was "
              f"not updated: {why}. `mdm-server serve` updates it as soon as it reaches the "
              "broker (or run `mdm-server broker reconcile`).", file=sys.stderr)
        return False
    return True


async def _device_revoke(cfg: Config, args: argparse.Namespace) -> int:
    if cfg.master_key is None:
        raise ConfigError("MDM_MASTER_KEY or MDM_MASTER_KEY_FILE must be set")
    conn = await connect(cfg.database_url)
    try:
        async with conn.transaction():
            await lock_unfinished(conn, args.tenant, args.device)
            changed = await revoke_device(conn, tenant=args.tenant, device=args.device)
            ended = await _end_enrollment(cfg, conn, args.tenant, args.device, "device.revoke")
            if changed or ended["commands_cancelled"] or ended["user_tokens_revoked"]:
                await audit.append(conn, cfg.audit_keys(), tenant=args.tenant, actor="cli",
                                   action="device.revoke", target=f"device:{args.device}",
                                   details=ended)
        print(json.dumps({"tenant": args.tenant, "device": args.device, "status": "revoked"}))
        synced = await _sync_broker(cfg, conn, args.tenant, args.device, "is revoked")
    finally:
        await conn.close()
    return 0 if synced or (cfg.mqtt is not None and not cfg.mqtt.username) else 4


async def _device_reenroll(cfg: Config, args: argparse.Namespace) -> None:
    broker = _device_broker(cfg)
    conn = await connect(cfg.database_url)
    try:
        async with conn.transaction():
            await lock_unfinished(conn, args.tenant, args.device)
            enrollment = await reenroll_device(conn, tenant=args.tenant, device=args.device,
                                               mqtt_url=broker.url, mqtt_ca_pem=broker.ca_pem,
                                               master_key=cfg.master_key,
                                               public_url=cfg.public_base()[0])
            number = await start_enrollment(conn, tenant=args.tenant, device=args.device,
                                            user_email=args.user_email)
            ended = await _end_enrollment(cfg, conn, args.tenant, args.device,
                                          "device.reenroll")
            # Ids and codes only: never the user's e-mail (mdm_server/audit.py).
            await audit.append(conn, cfg.audit_keys(), tenant=args.tenant, actor="cli",
                               action="device.reenroll", target=f"device:{args.device}",
                               details={"enrollment": number, **ended})
        print(json.dumps(enrollment, indent=2))
        await _sync_broker(cfg, conn, args.tenant, args.device, "has new credentials")
    finally:
        await conn.close()


async def _broker_offline(cfg: Config, file: str) -> int:
    from pathlib import Path

    from mdm_server.broker.offline import provision_offline

    if cfg.master_key is None:
        raise ConfigError("MDM_MASTER_KEY or MDM_MASTER_KEY_FILE must be set")
    conn = await connect(cfg.database_url)
    try:
        report = await provision_offline(conn, cfg.master_key, Path(file))
    finally:
        await conn.close()
    print(json.dumps(report))
    return 0


async def _broker_reconcile(cfg: Config) -> int:
    from mdm_server.broker.dynsec import Dynsec, DynsecError
    from mdm_server.broker.identity import reconcile

    if cfg.master_key is None:
        raise ConfigError("MDM_MASTER_KEY or MDM_MASTER_KEY_FILE must be set")
    conn = await connect(cfg.database_url)
    try:
        async with Dynsec(cfg.require_mqtt()) as dynsec:
            report = await reconcile(dynsec, conn, cfg.master_key)
    except DynsecError as exc:
        print(f"mdm-server: {exc}", file=sys.stderr)
        return 3
    finally:
        await conn.close()
    print(json.dumps({"created": report.created, "updated": report.updated,
                      "deleted": report.deleted, "not_derivable": report.not_derivable}))
    return 0


async def _keys_compact(cfg: Config) -> int:
    from mdm_server.storage.erasure import shred

    ring = Keyring.from_config(cfg)
    conn = await connect(cfg.database_url)
    try:
        report = await shred(conn, ring)
    finally:
        await conn.close()
    print(json.dumps(report.to_json()))
    return 0


async def _open_keyring(cfg: Config, *, wait: bool = False) -> None:
    """Refuse to start with a key ring that is not this database's or incomplete
    (and make the first epoch of a new database); with ``wait``, waits for a
    database that is away (the ingest does, serve says so and exits)."""
    from mdm_server.ingest.sink import retry_while_away

    async def once() -> None:
        conn = await connect(cfg.database_url)
        try:
            await Keyring.from_config(cfg).open(conn)
        finally:
            await conn.close()

    await (retry_while_away(once, lambda: None) if wait else once())


async def _rotate_master(cfg: Config, new_key_file: str) -> int:
    from mdm_server.storage.master import rotate_master_key

    new = master_key_from_env({"MDM_MASTER_KEY_FILE": new_key_file})
    if new is None:
        raise ConfigError("--new-key-file is empty")
    conn = await connect(cfg.database_url)
    try:
        report = await rotate_master_key(conn, cfg.require_keyring_dir(),
                                         cfg.require_master_key(), new)
    except ValueError as exc:  # the audit log does not verify: nothing was changed
        print(f"mdm-server: {exc}", file=sys.stderr)
        return 1
    finally:
        await conn.close()
    print(json.dumps(report.to_json()))
    print("master key rotated: start every server process with the new key; re-enroll the "
          f"{report.devices_to_reenroll} device(s) `mdm-server device stale` lists; take a new "
          "audit checkpoint", file=sys.stderr)
    return 0


async def _check_master(cfg: Config) -> None:
    from mdm_server.storage.master import check_master_key

    conn = await connect(cfg.database_url)
    try:
        await check_master_key(conn, cfg.require_master_key())
    finally:
        await conn.close()


async def _device_stale(cfg: Config, tenant: str | None) -> None:
    conn = await connect(cfg.database_url)
    try:
        if tenant is not None:
            await require_tenant(conn, tenant)
        for r in await conn.fetch(
                "SELECT tenant_id, device_id FROM devices WHERE mqtt_stale AND status = "
                "'enrolled' AND ($1::text IS NULL OR tenant_id = $1) "
                "ORDER BY tenant_id, device_id", tenant):
            print(json.dumps({"tenant": r["tenant_id"], "device": r["device_id"]}))
    finally:
        await conn.close()


async def _keys(cfg: Config, args: argparse.Namespace) -> int:
    from mdm_server.commands import keys

    if args.action == "compact":
        return await _keys_compact(cfg)
    if args.action == "rotate-master":
        return await _rotate_master(cfg, args.new_key_file)
    conn = await connect(cfg.database_url)
    try:
        if args.action == "list":
            for r in await conn.fetch(
                    """SELECT k.key_id, k.created_at, k.retired_at,
                              (SELECT count(*) FROM devices d WHERE d.status = 'enrolled'
                                 AND k.key_id = ANY(d.trusted_key_ids)) AS devices
                       FROM signing_keys k ORDER BY k.created_at"""):
                print(json.dumps({"key_id": r["key_id"], "created_at": r["created_at"].isoformat(),
                                  "retired_at": r["retired_at"] and r["retired_at"].isoformat(),
                                  "trusted_by_devices": r["devices"]}))
            return 0
        if cfg.master_key is None:
            raise ConfigError("MDM_MASTER_KEY or MDM_MASTER_KEY_FILE must be set: signing "
                              "keys are stored encrypted under it")
        try:
            async with conn.transaction():
                if args.action == "rotate":
                    key_id, told = await keys.rotate_key(conn, cfg.master_key, actor="cli")
                    print(key_id)
                    print(f"trust_key queued for {told} device(s)", file=sys.stderr)
                else:
                    stranded, told = await keys.retire_key(conn, args.key_id, actor="cli",
                                                           audit_keys=cfg.audit_keys(),
                                                           force=args.force)
                    print(f"distrust_key queued for {told} device(s); the key's private "
                          "half is deleted", file=sys.stderr)
                    if stranded:
                        print(f"warning: {stranded} device(s) trust no current key now: "
                              "re-enroll them", file=sys.stderr)
        except keys.SigningKeyError as exc:
            print(f"mdm-server: {exc}", file=sys.stderr)
            return 1
        return 0
    finally:
        await conn.close()


def _read_checkpoint(path: str, keys: audit.AuditKeys) -> audit.Checkpoint | None:
    """The checkpoint in ``path``; None (after saying why) if it is refused. A file
    that cannot be read at all is a usage error (ConfigError, exit 2)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(16 * 1024 * 1024)
    except OSError as exc:
        raise ConfigError(f"the checkpoint file cannot be read ({type(exc).__name__})") from None
    try:
        return audit.Checkpoint.loads(data, keys)
    except audit.CheckpointError as exc:
        print(f"audit checkpoint REFUSED: {exc}")
        return None


def _write_checkpoint(path: str | None, data: bytes) -> None:
    if path is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigError(f"the checkpoint cannot be written ({type(exc).__name__})") from None


async def _audit(cfg: Config, args: argparse.Namespace) -> int:
    keys = cfg.audit_keys()
    checkpoint = None
    if args.action == "verify" and args.checkpoint is not None:
        checkpoint = _read_checkpoint(args.checkpoint, keys)
        if checkpoint is None:
            return 1
    conn = await connect(cfg.database_url)
    try:
        if args.action == "verify":
            result = await audit.verify(conn, keys, checkpoint=checkpoint)
            print(result)
            if result.ok and checkpoint is not None:
                print(f"checkpoint of {checkpoint.made_at.isoformat()} holds: nothing before "
                      "it was removed or changed")
            return 0 if result.ok else 1
        if args.action == "checkpoint":
            result, made = await audit.make_checkpoint(conn, keys)
            if made is None:
                print(result, file=sys.stderr)
                print("mdm-server: no checkpoint of a log that does not verify",
                      file=sys.stderr)
                return 1
            _write_checkpoint(args.out, made.dumps(keys))
            print(f"checkpoint: {result.count} entries in {len(made.heads)} chain(s)"
                  + (f", written to {args.out}" if args.out else ""), file=sys.stderr)
            return 0
        await require_tenant(conn, args.tenant)
        for entry in await audit.read(conn, keys, args.tenant, limit=args.limit):
            print(json.dumps(entry.to_json()))
        return 0
    finally:
        await conn.close()


async def _ingest(cfg: Config, index: int) -> None:
    from mdm_server.ingest.worker import IngestWorker, live_line
    from mdm_server.ops.workers import RUN_DIR_ENV, report_status

    await _open_keyring(cfg, wait=True)
    worker = IngestWorker(cfg, index=index)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main.cancel)
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(worker.run(), name=f"ingest-{index}")
            tg.create_task(live_line(worker.stats, f"ingest-{index}"), name="live")
            run_dir = os.environ.get(RUN_DIR_ENV)
            if run_dir:  # a worker of serve: /readyz and /metrics read its status
                tg.create_task(report_status(worker, index, run_dir), name="status")
    except* KeyringError as group:  # said plainly by main(), not as a traceback
        raise group.exceptions[0] from None


async def _check_db_role(cfg: Config) -> None:
    """Refuse to serve as a database role that could set the audit log's protection
    aside (see mdm_server/storage/roles.py), unless allowed for development."""
    conn = await connect(cfg.database_url)
    try:
        why = await privileged_because(conn)
        role = await conn.fetchval("SELECT session_user")
    finally:
        await conn.close()
    if why is None:
        return
    text = (f"the database role {role} {why}: it could disable the audit log's "
            "append-only triggers or alter the table. Run serve as a login role in mdm_app "
            "(`mdm-server migrate --server-role NAME`, README \"Using it\")")
    if not cfg.allow_privileged_db_role:
        raise RoleError(f"serve refuses to start: {text}, or set "
                        "MDM_ALLOW_PRIVILEGED_DB_ROLE=1 for development only")
    logging.getLogger("mdm_server").warning(
        "WARNING: %s. Allowed only because MDM_ALLOW_PRIVILEGED_DB_ROLE=1 "
        "(development only).", text)


def _serve(cfg: Config, workers: int) -> None:
    from mdm_server.ops.workers import prepare_run_dir, remove_run_dir

    if workers < 1:
        raise ConfigError("--ingest-workers must be at least 1")
    # Before anything imports prometheus_client: its multiprocess mode is chosen then.
    run_dir, own_run_dir = prepare_run_dir()
    try:
        _serve_in(cfg, workers)
    finally:
        remove_run_dir(run_dir, own_run_dir)


def _serve_in(cfg: Config, workers: int) -> None:
    from aiohttp import web

    from mdm_server.app import create_app
    from mdm_server.broker.hook_http import broker_hook_ctx, listen_hook
    from mdm_server.broker.service import broker_identity_ctx
    from mdm_server.ops.http import CHILDREN, METRICS_SOCKET, listen_metrics

    https = cfg.https_context()  # a bad certificate or key: said before anything starts
    sock = _listen(cfg)  # a port in use: said before anything starts
    metrics_sock = listen_metrics()  # MDM_METRICS_ADDR likewise (None: no metrics)
    hook_sock = listen_hook(cfg)  # MDM_BROKER_HOOK_ADDR likewise (None: no hook)
    asyncio.run(_open_keyring(cfg))
    extra = [
        # Our own interpreter and module, fixed arguments: nothing untrusted.
        (i, subprocess.Popen([sys.executable, "-m", "mdm_server", "ingest", "--index", str(i)]))  # noqa: S603
        for i in range(1, workers)
    ]
    app = create_app(cfg)
    app[CHILDREN] = extra  # /readyz: each must be running and connected
    if metrics_sock is not None:
        app[METRICS_SOCKET] = metrics_sock
    # Device identities on the broker: reconciled at start and whenever it comes back.
    app.cleanup_ctx.append(broker_identity_ctx)
    if hook_sock is not None:  # the broker asks us (RabbitMQ, EMQX): docs/scaling.md
        app.cleanup_ctx.append(broker_hook_ctx(hook_sock))
    try:
        web.run_app(app, sock=sock, ssl_context=https,
                    access_log_class=AccessLog,  # no query values: they may be personal
                    print=lambda msg: logging.getLogger("mdm_server").info(
                        "%s", " ".join(msg.split())))  # a log line, in either format
    finally:
        for _, proc in extra:
            proc.terminate()
        for _, proc in extra:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def _listen(cfg: Config) -> socket.socket:
    """The API's listening socket, bound before any worker or connection starts, so
    that an address in use is one clear line (it used to surface, after start-up, as
    "cannot reach a service")."""
    return listen_socket(cfg.http_host, cfg.http_port, "MDM_HTTP_ADDR")


def _refuse_published_master_key(cfg: Config) -> None:
    """A master key found in the project's repository (mdm_server/published_keys.py)
    protects nothing: refuse it, unless explicitly allowed for development."""
    from mdm_server.published_keys import is_published

    if not is_published(cfg.require_master_key()):
        return
    text = ("the master key (MDM_MASTER_KEY or MDM_MASTER_KEY_FILE) is published: it "
            "appears in the project's repository (the tests' key, docker-compose's old "
            "development default or another example), so anyone can derive every device's "
            "MQTT password, forge audit entries and, with the key ring, open stored data")
    if not cfg.allow_published_master_key:
        raise ConfigError(f"{text}. Make your own: head -c 32 /dev/urandom | base64 "
                          "(development and tests only: MDM_ALLOW_PUBLISHED_MASTER_KEY=1)")
    logging.getLogger("mdm_server").warning(
        "WARNING: %s. Allowed only because MDM_ALLOW_PUBLISHED_MASTER_KEY=1 (development "
        "and tests only).", text)


def main(argv: Sequence[str] | None = None) -> int:
    from mdm_server.ops.logs import setup_logging

    args = _parser().parse_args(argv)
    worker = f"ingest-{args.index}" if args.command == "ingest" else args.command
    try:
        setup_logging(worker)  # MDM_LOG_FORMAT: text (default) or json
    except ValueError as exc:
        print(f"mdm-server: {exc}", file=sys.stderr)
        return 2
    try:
        cfg = load_config()
        if args.command in ("serve", "ingest") and cfg.master_key is None:
            raise ConfigError("MDM_MASTER_KEY or MDM_MASTER_KEY_FILE must be set: policies "
                              "hash values under keys derived from it (generate one with "
                              "`head -c 32 /dev/urandom | base64`)")
        if args.command in _AUDITED or (args.command == "token" and args.action == "revoke"):
            cfg.audit_keys()  # the master key, or a clear error before anything is done
        if args.command in ("serve", "ingest") or (
                args.command == "keys" and args.action in ("compact", "rotate-master")):
            cfg.require_master_key()
            cfg.require_keyring_dir()  # stored telemetry is sealed under keys it wraps
        if args.command == "broker":  # Mosquitto's own accounts and files
            cfg.require_mqtt().ssl_context()
        elif args.command in ("serve", "ingest") or (
                args.command == "device" and args.action not in ("list", "stale")):
            # Where the broker is, and CA files that load, before anything starts.
            cfg.check_brokers()
        if args.command in ("serve", "ingest"):
            _refuse_published_master_key(cfg)
        if args.command == "serve":
            asyncio.run(_check_db_role(cfg))  # before anything else touches the database
        if cfg.master_key is not None and args.command in _MASTER_CHECKED and not (
                args.command == "keys" and args.action == "rotate-master"):
            asyncio.run(_check_master(cfg))  # this database's key, or a clear refusal
        if args.command == "migrate":
            asyncio.run(_migrate(cfg, args.server_role))
        elif args.command == "serve":
            _serve(cfg, args.ingest_workers)
        elif args.command == "ingest":
            with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
                asyncio.run(_ingest(cfg, args.index))
        elif args.command == "retention":
            asyncio.run(_retention_run(cfg))
        elif args.command in ("tenant", "admin", "device") and args.action == "list":
            asyncio.run(_list(cfg, args))
        elif args.command == "tenant":
            asyncio.run(_tenant_create(cfg, args.name))
        elif args.command == "admin":
            asyncio.run(_admin_create(cfg, args))
        elif args.command == "user":
            asyncio.run(_user_token(cfg, args))
        elif args.command == "token":
            return asyncio.run(_token(cfg, args))
        elif args.command == "device" and args.action == "enroll":
            asyncio.run(_device_enroll(cfg, args))
        elif args.command == "device" and args.action == "reenroll":
            asyncio.run(_device_reenroll(cfg, args))
        elif args.command == "device" and args.action == "stale":
            asyncio.run(_device_stale(cfg, args.tenant))
        elif args.command == "device":
            return asyncio.run(_device_revoke(cfg, args))
        elif args.command == "broker" and args.action == "provision-offline":
            return asyncio.run(_broker_offline(cfg, args.file))
        elif args.command == "broker":
            return asyncio.run(_broker_reconcile(cfg))
        elif args.command == "audit":
            return asyncio.run(_audit(cfg, args))
        elif args.command == "keys":
            return asyncio.run(_keys(cfg, args))
    except (ConfigError, TenantError, EnrollmentError, RoleError, KeyringError,
            MasterKeyError) as exc:
        print(f"mdm-server: {exc}", file=sys.stderr)
        return 2
    except asyncpg.InvalidCatalogNameError:
        print("mdm-server: the database named in MDM_DATABASE_URL does not exist: create it "
              "(createdb NAME, as a superuser), then run `mdm-server migrate`", file=sys.stderr)
        return 3
    except (asyncpg.InvalidAuthorizationSpecificationError,
            asyncpg.InvalidPasswordError) as exc:
        # The server's own words name the role, never the password.
        print(f"mdm-server: the database refused the login in MDM_DATABASE_URL: "
              f"{exc.args[0] if exc.args else type(exc).__name__}", file=sys.stderr)
        return 3
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError,
            asyncpg.UndefinedFunctionError):
        print("mdm-server: the database is not migrated to this version of mdm-server: run "
              "`mdm-server migrate` first (as a superuser)", file=sys.stderr)
        return 3
    except OSError as exc:
        print(f"mdm-server: cannot reach a service ({type(exc).__name__}: {exc.strerror})",
              file=sys.stderr)
        return 3
    return 0
