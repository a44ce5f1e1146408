"""``mdm-server``: the one command for operators."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from mdm_server.config import Config, ConfigError, load_config
from mdm_server.storage.devices import EnrollmentError, enroll_device
from mdm_server.storage.migrate import apply_migrations
from mdm_server.storage.pool import connect
from mdm_server.storage.tenants import TenantError, create_admin_token, create_tenant

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mdm-server", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply database migrations")
    serve = sub.add_parser("serve", help="HTTP API and telemetry ingest")
    serve.add_argument("--ingest-workers", type=int, default=1, metavar="N",
                       help="ingest processes (one per core is the rule)")
    ingest = sub.add_parser("ingest", help="one ingest worker, no HTTP (serve starts these)")
    ingest.add_argument("--index", type=int, default=0, help="worker number: its MQTT session")
    retention = sub.add_parser("retention", help="remove data past its retention")
    retention.add_subparsers(dest="action", required=True).add_parser(
        "run", help="apply every policy's retention now (serve also does it hourly)")
    tenant = sub.add_parser("tenant", help="tenants").add_subparsers(dest="action", required=True)
    tenant.add_parser("create").add_argument("name")
    admin = sub.add_parser("admin", help="admins").add_subparsers(dest="action", required=True)
    ac = admin.add_parser("create", help="create an admin; prints its API token")
    ac.add_argument("--tenant", required=True)
    ac.add_argument("--name", required=True)
    device = sub.add_parser("device", help="devices").add_subparsers(dest="action", required=True)
    de = device.add_parser("enroll", help="enroll a device; prints what its agent needs (JSON)")
    de.add_argument("--tenant", required=True)
    de.add_argument("--device", required=True)
    de.add_argument("--ownership", required=True, choices=["corporate", "personal"])
    de.add_argument("--user-email")
    de.add_argument("--group", action="append", default=[], dest="groups",
                    help="a group the device belongs to (repeatable); policies select by it")
    return p


async def _migrate(cfg: Config) -> None:
    conn = await connect(cfg.database_url)
    try:
        applied = await apply_migrations(conn)
    finally:
        await conn.close()
    for m in applied:
        print(f"applied {m.version:03d}_{m.name}")
    if not applied:
        print("database is up to date")


async def _retention_run(cfg: Config) -> None:
    from mdm_server.retention import run_retention

    conn = await connect(cfg.database_url)
    try:
        report = await run_retention(conn)
    finally:
        await conn.close()
    print(json.dumps({"dropped_partitions": report.dropped_partitions,
                      "deleted_rows": report.deleted_rows,
                      "deleted_dead_letters": report.deleted_dead_letters}))


async def _tenant_create(cfg: Config, name: str) -> None:
    conn = await connect(cfg.database_url)
    try:
        await create_tenant(conn, name)
    finally:
        await conn.close()
    print(json.dumps({"tenant": name}))


async def _admin_create(cfg: Config, tenant: str, name: str) -> None:
    conn = await connect(cfg.database_url)
    try:
        token = await create_admin_token(conn, tenant=tenant, name=name)
    finally:
        await conn.close()
    print(token)


async def _device_enroll(cfg: Config, args: argparse.Namespace) -> None:
    conn = await connect(cfg.database_url)
    try:
        enrollment = await enroll_device(
            conn, tenant=args.tenant, device=args.device, ownership=args.ownership,
            user_email=args.user_email, mqtt_url=cfg.mqtt.url(), master_key=cfg.master_key,
            groups=tuple(args.groups),
        )
    finally:
        await conn.close()
    print(json.dumps(enrollment, indent=2))


async def _ingest(cfg: Config, index: int) -> None:
    from mdm_server.ingest.worker import IngestWorker, live_line

    worker = IngestWorker(cfg, index=index)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main.cancel)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(worker.run(), name=f"ingest-{index}")
        tg.create_task(live_line(worker.stats, f"ingest-{index}"), name="live")


def _serve(cfg: Config, workers: int) -> None:
    from aiohttp import web

    from mdm_server.app import create_app

    if workers < 1:
        raise ConfigError("--ingest-workers must be at least 1")
    extra = [
        # Our own interpreter and module, fixed arguments: nothing untrusted.
        subprocess.Popen([sys.executable, "-m", "mdm_server", "ingest", "--index", str(i)])  # noqa: S603
        for i in range(1, workers)
    ]
    try:
        web.run_app(create_app(cfg), host=cfg.http_host, port=cfg.http_port,
                    print=lambda msg: print(msg, file=sys.stderr))
    finally:
        for proc in extra:
            proc.terminate()
        for proc in extra:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("MDM_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg = load_config()
        if args.command in ("serve", "ingest") and cfg.master_key is None:
            raise ConfigError("MDM_MASTER_KEY or MDM_MASTER_KEY_FILE must be set: policies "
                              "hash values under keys derived from it (generate one with "
                              "`head -c 32 /dev/urandom | base64`)")
        if args.command == "migrate":
            asyncio.run(_migrate(cfg))
        elif args.command == "serve":
            _serve(cfg, args.ingest_workers)
        elif args.command == "ingest":
            with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
                asyncio.run(_ingest(cfg, args.index))
        elif args.command == "retention":
            asyncio.run(_retention_run(cfg))
        elif args.command == "tenant":
            asyncio.run(_tenant_create(cfg, args.name))
        elif args.command == "admin":
            asyncio.run(_admin_create(cfg, args.tenant, args.name))
        elif args.command == "device":
            asyncio.run(_device_enroll(cfg, args))
    except (ConfigError, TenantError, EnrollmentError) as exc:
        print(f"mdm-server: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mdm-server: cannot reach a service ({type(exc).__name__}: {exc.strerror})",
              file=sys.stderr)
        return 3
    return 0
