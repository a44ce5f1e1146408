"""A private PostgreSQL pair that fails over (Patroni + etcd, ``scripts/pgcluster``)
for tests, and what tests do with it: databases on it, migrated with the project's
CLI, the environment of ``mdm-server`` processes pointed at its multi-host URL,
which node leads, its postmaster's pid."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

from tests.support.services import (
    REPO,
    TEST_MASTER_KEY,
    Broker,
    free_port,
)

PGCLUSTER = REPO / "scripts" / "pgcluster"
PG15 = Path("/usr/lib/postgresql/15/bin/postgres")
NODES = (1, 2)
#: The restricted role ``migrate --server-role`` makes for the server, and its password.
SERVER_ROLE = "mdm_failover_server"
SERVER_PASSWORD = secrets.token_urlsafe(24)


def missing() -> str | None:
    """Why a pair cannot be started here, or None."""
    absent = [name for name in ("patroni", "patronictl", "etcd") if shutil.which(name) is None]
    if not PG15.exists():
        absent.append(str(PG15))
    if absent:
        return ("Patroni + etcd not installed (missing: " + ", ".join(absent) + "); "
                "scripts/test installs Debian's patroni, etcd-server, etcd-client and "
                "postgresql-15 when it can")
    return None


@dataclass
class PgCluster:
    """A running pair: what ``scripts/pgcluster up`` printed, and its directory."""

    dir: Path
    env: dict[str, str]

    @property
    def url(self) -> str:
        """The superuser's multi-host URL (target_session_attrs=read-write)."""
        return self.env["MDM_PG_CLUSTER_URL"]

    def database_url(self, name: str, user: str | None = None,
                     password: str | None = None) -> str:
        """The multi-host URL for database ``name`` (as ``user`` with ``password``)."""
        parts = urlsplit(self.url)  # .port is never read: the netloc names two hosts
        userinfo, hosts = parts.netloc.rsplit("@", 1)
        if user is not None:
            userinfo = f"{quote(user, safe='')}:{quote(password or '', safe='')}"
        return urlunsplit(parts._replace(netloc=f"{userinfo}@{hosts}", path="/" + name))

    def node_url(self, node: int, name: str, user: str | None = None,
                 password: str | None = None) -> str:
        """Node ``node`` alone, with target_session_attrs=read-write."""
        parts = urlsplit(self.database_url(name, user, password))
        userinfo = parts.netloc.rsplit("@", 1)[0]
        port = self.env[f"MDM_PG_NODE_{node}_PORT"]
        return urlunsplit(parts._replace(netloc=f"{userinfo}@127.0.0.1:{port}"))

    def rest(self, node: int) -> str:
        return self.env[f"MDM_PG_NODE_{node}_REST"]

    def leader(self) -> int | None:
        """The node Patroni says leads (its REST ``/leader`` answers 200), or None."""
        for node in NODES:
            try:
                with urllib.request.urlopen(self.rest(node) + "/leader", timeout=2) as resp:
                    if resp.status == 200:
                        return node
            except (urllib.error.URLError, OSError):
                pass
        return None

    def wait_leader(self, *, other_than: int | None = None, timeout: float = 120.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            node = self.leader()
            if node is not None and node != other_than:
                return node
            time.sleep(0.05)
        raise TimeoutError("no new leader:\n" + self.status())

    def wait_no_leader(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.leader() is not None:
            if time.monotonic() > deadline:
                raise TimeoutError("a leader remains:\n" + self.status())
            time.sleep(0.05)

    def postmaster_pid(self, node: int) -> int:
        """The node's postmaster (line 1 of its data directory's postmaster.pid)."""
        pid_file = Path(self.env[f"MDM_PG_NODE_{node}_DATA"]) / "postmaster.pid"
        return int(pid_file.read_text().splitlines()[0])

    def patronictl(self, *args: str) -> str:
        out = subprocess.run([str(PGCLUSTER), "patronictl", "--dir", str(self.dir), "--",
                              *args], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise AssertionError(f"patronictl {' '.join(args)} failed: {out.stderr[-2000:]}")
        return out.stdout

    def status(self) -> str:
        out = subprocess.run([str(PGCLUSTER), "status", "--dir", str(self.dir)],
                             capture_output=True, text=True, timeout=60)
        return out.stdout + out.stderr

    def create_database(self, name: str) -> tuple[str, str]:
        """Create database ``name`` and migrate it with ``mdm-server migrate
        --server-role`` through the multi-host URL. Returns (the superuser's URL, the
        server role's URL), both multi-host."""
        asyncio.run(_execute_when_up(self.database_url("postgres"), f'CREATE DATABASE "{name}"'))
        admin = self.database_url(name)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MDM_")}
        env.update({"MDM_DATABASE_URL": admin, "MDM_SERVER_DB_PASSWORD": SERVER_PASSWORD,
                    "PYTHONPATH": str(REPO)})
        out = subprocess.run([sys.executable, "-m", "mdm_server", "migrate", "--server-role",
                              SERVER_ROLE], env=env, cwd=REPO, capture_output=True,
                             text=True, timeout=300)
        if out.returncode != 0:
            raise AssertionError(f"mdm-server migrate failed: {out.stderr[-3000:]}")
        return admin, self.database_url(name, SERVER_ROLE, SERVER_PASSWORD)


async def _execute_when_up(url: str, sql: str, timeout: float = 60.0) -> None:
    await query_when_up(url, sql, timeout=timeout, execute=True)


async def query_when_up(url: str, sql: str, *, timeout: float = 60.0,
                        execute: bool = False) -> object:
    """Run ``sql`` (fetchval, or execute) on a new connection, retrying while the
    database is away (a failover) for up to ``timeout`` seconds."""
    from mdm_server.storage.pool import connect, is_unavailable

    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = await connect(url)
            try:
                if execute:
                    await conn.execute(sql)
                    return None
                return await conn.fetchval(sql)
            finally:
                await conn.close()
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            if not is_unavailable(exc) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def mdm_env(database_url: str, broker: Broker, keyring_dir: Path, **extra: str
            ) -> dict[str, str]:
    """The environment of an ``mdm-server`` process on the pair (as
    tests.support.services.server_env makes it for a single server, whose key-ring
    path it derives from the URL's one host and port)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MDM_")}
    env.update({"MDM_DATABASE_URL": database_url, "MDM_MQTT_URL": broker.url,
                "PYTHONPATH": str(REPO), "MDM_HTTP_ADDR": f"127.0.0.1:{free_port()}",
                "MDM_MASTER_KEY": TEST_MASTER_KEY, "MDM_ALLOW_PUBLISHED_MASTER_KEY": "1",
                "MDM_KEYRING_DIR": str(keyring_dir),
                "MDM_MQTT_PUBLIC_URL": broker.device_url,
                "MDM_MQTT_PUBLIC_CA_FILE": str(broker.ca_file)})
    env.update(extra)
    return env


@contextmanager
def running_pgcluster() -> Iterator[PgCluster]:
    """``scripts/pgcluster up`` in a fresh directory under the system's temp dir
    (the cluster's owner, postgres when we are root, must reach it; pytest's
    tmp_path is closed to it); ``down`` and the directory removed afterwards.
    Skips the test, saying why, where Patroni or etcd is not installed."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    d = Path(tempfile.mkdtemp(prefix="mdm-pgcluster-"))
    try:
        out = subprocess.run([str(PGCLUSTER), "up", "--dir", str(d)], capture_output=True,
                             text=True, timeout=300)
        if out.returncode != 0:
            raise AssertionError(f"scripts/pgcluster up failed:\n{out.stderr[-3000:]}")
        env = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
        yield PgCluster(d, env)
    finally:
        subprocess.run([str(PGCLUSTER), "down", "--dir", str(d)], capture_output=True,
                       timeout=180)
        shutil.rmtree(d, ignore_errors=True)
