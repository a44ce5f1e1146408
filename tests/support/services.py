"""Real PostgreSQL databases and real Mosquitto brokers for tests.

PostgreSQL: the server named by ``MDM_PG_ADMIN_URL`` (scripts/test sets it; else
the local one on 127.0.0.1:5432); each test gets a throwaway database, migrated (as
the superuser). The server and the CLI run as the server's restricted role, as in
a deployment: ``mdm_test_server`` (cluster-wide, made if missing by
``mdm-server migrate --server-role``'s code), a member of ``mdm_app`` acting as it;
:func:`server_env` gives them its URL. Tests inspect and tamper as the superuser.
Mosquitto: a private broker per test, started with the project's configuration
through ``scripts/broker`` (so tests run what production runs): the server connects
to its plain listener on 127.0.0.1, devices to its TLS listener with its CA, as
their enrollment says (:func:`server_env` sets MDM_MQTT_PUBLIC_URL and
MDM_MQTT_PUBLIC_CA_FILE for a broker of this module).
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

if TYPE_CHECKING:
    from mdm_server.storage.keyring import Keyring

REPO = Path(__file__).resolve().parents[2]
BROKER_SCRIPT = Path(os.environ.get("MDM_BROKER_SCRIPT", REPO / "scripts" / "broker"))


# A fixed key for tests only (32 bytes, base64).
TEST_MASTER_KEY = "dGVzdC1vbmx5LW1hc3Rlci1rZXktMzItYnl0ZXMhISE="
# The role the server and the CLI run as in tests (neither superuser nor owner).
TEST_SERVER_ROLE = "mdm_test_server"
TEST_SERVER_DB_PASSWORD = "test-only-server-db-password"
# Clusters (host:port) where TEST_SERVER_ROLE was brought in line by this process.
_server_role_ready: set[str] = set()


def audit_keys_for_tests() -> Any:
    """The audit log's keys under TEST_MASTER_KEY (an ``mdm_server.audit.AuditKeys``)."""
    from mdm_server.audit import AuditKeys

    return AuditKeys.derive(base64.b64decode(TEST_MASTER_KEY))


def keyring_dir_for(database_url: str) -> Path:
    """The key ring (MDM_KEYRING_DIR) that belongs with a test database: one per
    database (host, port, name), under the system temp dir; made on first use by
    whatever opens it, removed with the database."""
    parts = urlsplit(database_url)
    base = Path(tempfile.gettempdir()) / "mdm-keyrings"
    base.mkdir(mode=0o700, exist_ok=True)
    return base / f"{parts.hostname}-{parts.port or 5432}-{parts.path.lstrip('/')}"


def keyring_for(database_url: str) -> Keyring:
    """A :class:`~mdm_server.storage.keyring.Keyring` on the test database's key
    ring, with the tests' master key: what a server run with :func:`server_env` uses."""
    from mdm_server.storage.keyring import Keyring

    return Keyring(keyring_dir_for(database_url), base64.b64decode(TEST_MASTER_KEY))


def pg_admin_url() -> str:
    return os.environ.get("MDM_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


async def create_database(prefix: str = "mdm_test", *, migrate: bool = True) -> str:
    """Create a fresh database, migrated unless ``migrate`` is false; return its URL."""
    from mdm_server.storage.migrate import apply_migrations

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_admin_url())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_database(pg_admin_url(), name)
    if not migrate:
        return url
    conn = await asyncpg.connect(url)
    try:
        await apply_migrations(conn)
        await _seed_signing_key(conn)
        await ensure_test_server_role(conn, url)
    finally:
        await conn.close()
    return url


async def ensure_test_server_role(conn: asyncpg.Connection, url: str) -> None:
    """TEST_SERVER_ROLE on the cluster of ``url`` (a superuser's connection, after
    the migrations): made once per cluster and process."""
    from mdm_server.storage.roles import ensure_server_role

    cluster = urlsplit(url).netloc.rsplit("@", 1)[-1]
    if cluster not in _server_role_ready:
        await ensure_server_role(conn, TEST_SERVER_ROLE, TEST_SERVER_DB_PASSWORD)
        _server_role_ready.add(cluster)


def as_server_role(database_url: str) -> str:
    """``database_url`` (a superuser's) for the server's restricted test role."""
    parts = urlsplit(database_url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(
        netloc=f"{TEST_SERVER_ROLE}:{TEST_SERVER_DB_PASSWORD}@{host}"))


async def _seed_signing_key(conn: asyncpg.Connection) -> None:
    """The command-signing key, as a server run with :func:`server_env` (the test
    master key) creates it, so every database starts as a served one would."""
    import base64

    from mdm_server.commands.keys import signing_key

    await signing_key(conn, base64.b64decode(TEST_MASTER_KEY))


async def drop_database(url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    admin = await asyncpg.connect(pg_admin_url())
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
    shutil.rmtree(keyring_dir_for(url), ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


SERVER_USER = "mdm-server"


#: Brokers of this process by their server URL and their plain port: for the
#: helpers that are given only a URL or a port (enrollment, publish_as_devices).
_BROKERS: dict[str | int, Broker] = {}


def broker_for(url_or_port: str | int) -> Broker | None:
    """The :class:`Broker` of this process with that server URL or plain port."""
    return _BROKERS.get(url_or_port)


@dataclass
class Broker:
    """A private Mosquitto with the project's config; restartable on the same data.

    Nobody is let in anonymously: ``url`` carries the server's MQTT user and this
    broker's password for it (given to scripts/broker, which writes it into the
    dynamic-security config); devices log in with their enrollment credentials.
    Two listeners, as scripts/broker opens them: plain text on 127.0.0.1:``port``
    (the server's), TLS on ``tls_port`` (the devices'), its certificate signed by
    the broker's own CA, ``ca_file`` (made on the first start, kept after)."""

    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    tls_port: int = 0

    def __post_init__(self) -> None:
        if not self.tls_port:
            self.tls_port = free_port()
            while self.tls_port == self.port:
                self.tls_port = free_port()
        _BROKERS[self.url] = _BROKERS[self.port] = self

    @property
    def url(self) -> str:
        """The server's URL: ``mqtt://mdm-server:PASSWORD@127.0.0.1:PORT``."""
        return f"mqtt://{SERVER_USER}:{self.password}@127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        """The server's URL over TLS (with :attr:`ca_file` as MDM_MQTT_CA_FILE)."""
        return f"mqtts://{SERVER_USER}:{self.password}@127.0.0.1:{self.tls_port}"

    @property
    def device_url(self) -> str:
        """What devices are told (MDM_MQTT_PUBLIC_URL): the TLS listener."""
        return f"mqtts://127.0.0.1:{self.tls_port}"

    @property
    def ca_file(self) -> Path:
        """The broker's CA (MDM_MQTT_PUBLIC_CA_FILE), made by scripts/broker."""
        return self.dir / "tls" / "ca.crt"

    @property
    def ca_pem(self) -> str:
        return self.ca_file.read_text()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(BROKER_SCRIPT), "--port", str(self.port), "--tls-port", str(self.tls_port),
             "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "MDM_MQTT_SERVER_PASSWORD": self.password},
        )
        wait_port(self.port)
        wait_port(self.tls_port)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None


@contextmanager
def running_broker(tmp: Path) -> Iterator[Broker]:
    broker = Broker(free_port(), tmp / "broker")
    broker.dir.mkdir(parents=True, exist_ok=True)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@dataclass
class MdmProcess:
    """An ``mdm-server`` subcommand as a real process, its output in a log file.
    ``prefix``: a command it runs under, e.g. ``ip netns exec NS`` (one that execs it,
    so that ``proc`` is the server's own process)."""

    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    prefix: tuple[str, ...] = ()
    stop_signal = signal.SIGTERM

    def spawn(self, *args: str) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "mdm_server",
                                          *args],
                                         env=self.env, stdout=log, stderr=log, cwd=REPO)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=30)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, count: int = 1, timeout: float = 30.0) -> None:
        """Block until ``text`` appears ``count`` times in the process's log."""
        deadline = time.monotonic() + timeout
        while self.log_text().count(text) < count:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError("process died:\n" + self.log_text()[-3000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {text!r} in the log:\n" + self.log_text()[-3000:])
            time.sleep(0.05)

    def wait_subscribed(self, count: int = 1, timeout: float = 30.0) -> None:
        """Block until ``count`` ingest subscriptions are acknowledged by the broker:
        from then on the broker keeps messages for their sessions."""
        deadline = time.monotonic() + timeout
        while self.log_text().count("ingest subscribed") < count:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError("process died:\n" + self.log_text()[-3000:])
            if time.monotonic() > deadline:
                raise TimeoutError("no subscription:\n" + self.log_text()[-3000:])
            time.sleep(0.05)


@dataclass
class IngestProcess(MdmProcess):
    """``mdm-server ingest``, so tests can SIGKILL it."""

    index: int = 0

    def start(self) -> None:
        self.spawn("ingest", "--index", str(self.index))

    def wait_ready(self, timeout: float = 30.0) -> None:
        self.wait_subscribed(1, timeout)


def server_env(database_url: str, mqtt_url: str, *, superuser: bool = False,
               **extra: str) -> dict[str, str]:
    """The environment of an ``mdm-server`` process. A superuser's ``database_url``
    (as the ``database`` fixture gives it) becomes the restricted server role's, as
    a deployment runs the server, unless ``superuser`` (migrations; or a test of
    what a privileged role is refused); any other role's URL is kept."""
    if not superuser and urlsplit(database_url).username in (
            urlsplit(pg_admin_url()).username, "postgres"):
        database_url = as_server_role(database_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MDM_")}
    env.update({"MDM_DATABASE_URL": database_url, "MDM_MQTT_URL": mqtt_url,
                "PYTHONPATH": str(REPO), "MDM_HTTP_ADDR": f"127.0.0.1:{free_port()}",
                "MDM_MASTER_KEY": TEST_MASTER_KEY,
                # The tests' key is published (in this file): serve refuses it without.
                "MDM_ALLOW_PUBLISHED_MASTER_KEY": "1",
                "MDM_KEYRING_DIR": str(keyring_dir_for(database_url))})
    broker = broker_for(mqtt_url)
    if broker is not None:  # devices are told the TLS listener and its CA
        env.update({"MDM_MQTT_PUBLIC_URL": broker.device_url,
                    "MDM_MQTT_PUBLIC_CA_FILE": str(broker.ca_file)})
    env.update(extra)
    return env


async def enroll(database_url: str, mqtt_url: str, tenant: str, devices: list[str],
                 ownership: str = "corporate", groups: tuple[str, ...] = ()) -> None:
    """Create ``tenant`` (if needed) and enroll ``devices`` in it."""
    await enroll_devices(database_url, mqtt_url, tenant, devices, ownership, groups)


async def enroll_devices(database_url: str, mqtt_url: str, tenant: str, devices: list[str],
                         ownership: str = "corporate", groups: tuple[str, ...] = ()
                         ) -> list[dict[str, Any]]:
    """As :func:`enroll`; returns each device's enrollment JSON (with server_keys).
    When ``mqtt_url`` names the server's user (``Broker.url`` does), the devices get
    their broker clients too, as the CLI gives them. When it is a :class:`Broker`'s,
    the enrollment gives its TLS listener and CA, as :func:`server_env` makes the CLI
    do; any other URL is given to the devices as it is (its credentials left out)."""
    import base64

    from mdm_server.broker.identity import sync_or_defer
    from mdm_server.config import MqttSettings
    from mdm_server.storage.devices import enroll_device
    from mdm_server.storage.pool import connect
    from mdm_server.storage.tenants import ensure_tenant

    master_key = base64.b64decode(TEST_MASTER_KEY)
    broker = broker_for(mqtt_url)
    device_url, ca_pem = (broker.device_url, broker.ca_pem) if broker else (mqtt_url, None)
    conn = await connect(database_url)
    try:
        await ensure_tenant(conn, tenant)
        out = [await enroll_device(conn, tenant=tenant, device=d, ownership=ownership,
                                   user_email=None, mqtt_url=device_url, mqtt_ca_pem=ca_pem,
                                   master_key=master_key, groups=groups)
               for d in devices]
        settings = MqttSettings.from_url(mqtt_url)
        if settings.username:
            why = await sync_or_defer(settings, conn, master_key, [(tenant, d) for d in devices])
            assert why is None, why
        return out
    finally:
        await conn.close()


def stored_id(tenant: str, device: str, record_id: str) -> str:
    """A record id as the ingest stores it: a keyed digest under the tests' master
    key (mdm_server/ingest/record_ids.py), never the id the agent sent."""
    from mdm_server.ingest.record_ids import record_id_digest

    return record_id_digest(base64.b64decode(TEST_MASTER_KEY), tenant, device, record_id)


def device_credentials(tenant: str, device: str, generation: int = 1) -> tuple[str, str]:
    """(username, password) of a device enrolled with the tests' master key, as its
    enrollment JSON gave them (credential ``generation``: 1, +1 per re-enrollment)."""
    import base64

    from mdm_server.broker.credentials import device_password

    return (f"{tenant}.{device}",
            device_password(base64.b64decode(TEST_MASTER_KEY), tenant, device, generation))


async def broker_only_devices(mqtt_url: str, tenant: str, devices: list[str]) -> None:
    """Give ``devices`` broker clients (as enrollment would, generation 1) without
    enrolling them in any database: for tests of the broker alone, and of what
    ingest does with telemetry of devices the database does not know."""
    from mdm_server.broker.dynsec import Dynsec
    from mdm_server.broker.identity import TEXTNAME, device_acls, device_rolename
    from mdm_server.config import MqttSettings

    commands: list[dict[str, Any]] = []
    for d in devices:
        user, password = device_credentials(tenant, d)
        commands += [
            {"command": "createRole", "rolename": device_rolename(tenant, d),
             "acls": device_acls(tenant, d)},
            {"command": "createClient", "username": user, "clientid": user,
             "password": password, "textname": TEXTNAME,
             "textdescription": "credential generation 1",
             "roles": [{"rolename": device_rolename(tenant, d)}]},
        ]
    async with Dynsec(MqttSettings.from_url(mqtt_url)) as dynsec:
        responses = await dynsec.call(commands)
    errors = [r["error"] for r in responses if "error" in r]
    assert not errors, errors


async def allow_any_telemetry_subtopic(mqtt_url: str, tenant: str, device: str) -> None:
    """Give a device's broker role the ACL roles had before issue 10: publish to
    ``.../telemetry/+``, any sub-topic, as a broker that no ``serve`` has reconciled
    since still holds. For tests of what the ingest does with topics the broker now
    refuses (a running ``serve`` takes the ACL away again at its next reconcile).
    Disconnects the device if it is connected (its role changed)."""
    from mdm_server.broker.dynsec import Dynsec
    from mdm_server.broker.identity import device_rolename
    from mdm_server.config import MqttSettings

    async with Dynsec(MqttSettings.from_url(mqtt_url)) as dynsec:
        (resp,) = await dynsec.call([{
            "command": "addRoleACL", "rolename": device_rolename(tenant, device),
            "acltype": "publishClientSend",
            "topic": f"mdm/v1/{tenant}/devices/{device}/telemetry/+",
            "priority": 0, "allow": True}])
    # Given already (an earlier test) is as good.
    assert resp.get("error") in (None, "ACL with this topic already exists"), resp


async def fetchval(database_url: str, sql: str, *args: object) -> object:
    from mdm_server.storage.pool import connect

    conn = await connect(database_url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def fetch(database_url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    """Rows with jsonb decoded, as the server reads them."""
    from mdm_server.storage.pool import connect

    conn = await connect(database_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def fetch_telemetry(database_url: str, where: str, *args: object
                          ) -> list[dict[str, Any]]:
    """Telemetry rows matching ``where`` (SQL after WHERE), their data opened from
    its seal with the test master key, as the server reads them."""
    from mdm_server.storage.pool import connect
    from mdm_server.storage.sealing import DeviceReader

    keyring = keyring_for(database_url)
    conn = await connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT tenant_id, device_id, kind, record_id, ts, policy_id, policy_version, "
            f"key_id, sealed, data FROM telemetry WHERE {where}", *args)
        readers: dict[tuple[str, str], DeviceReader] = {}
        out = []
        for r in rows:
            dev = (r["tenant_id"], r["device_id"])
            if dev not in readers:
                readers[dev] = await DeviceReader.load(conn, keyring, *dev)
            out.append({**dict(r), "data": readers[dev].data(r)})
        return out
    finally:
        await conn.close()


def wait_for_count(database_url: str, sql: str, expected: int, *, timeout: float = 120.0,
                   settle: float = 0.0, idle: float | None = None,
                   proc: IngestProcess | None = None) -> int:
    """Poll ``sql`` (a count) until it reaches ``expected``, or until it has not
    moved for ``idle`` seconds; then, if ``settle``, keep watching that long to
    catch anything stored twice. Returns the count."""
    import asyncio

    deadline = time.monotonic() + timeout
    count, moved_at = -1, time.monotonic()
    while time.monotonic() < deadline:
        now_count = int(asyncio.run(fetchval(database_url, sql)))  # type: ignore[arg-type]
        if now_count != count:
            count, moved_at = now_count, time.monotonic()
        if count >= expected or (idle is not None and time.monotonic() - moved_at > idle):
            break
        if proc is not None and proc.proc is not None and proc.proc.poll() is not None:
            raise AssertionError("ingest process died:\n" + proc.log_text()[-3000:])
        time.sleep(0.2)
    if settle:
        time.sleep(settle)
        count = int(asyncio.run(fetchval(database_url, sql)))  # type: ignore[arg-type]
    return count


def _pg_bindir() -> Path:
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / "initdb").exists():
            return d
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise RuntimeError("PostgreSQL server binaries not found (scripts/test installs them)")


@dataclass
class PrivatePostgres:
    """A throwaway PostgreSQL cluster that a test may stop and start at will."""

    root: Path
    port: int

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        cmd = [str(_pg_bindir() / args[0]), *args[1:]]
        if os.geteuid() == 0:  # postgres refuses to run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.root / "data"), "-U", "postgres", "-A", "trust",
                  "-E", "UTF8", "--no-locale")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "log"),
                  "-w", "-t", "60", "-o",
                  f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")

    async def create_database(self) -> str:
        from mdm_server.storage.migrate import apply_migrations

        admin = await asyncpg.connect(self.admin_url)
        try:
            await admin.execute("CREATE DATABASE mdm")
        finally:
            await admin.close()
        url = with_database(self.admin_url, "mdm")
        shutil.rmtree(keyring_dir_for(url), ignore_errors=True)  # a cluster before on this port
        conn = await asyncpg.connect(url)
        try:
            await apply_migrations(conn)
            from mdm_server.storage.roles import ensure_server_role

            await ensure_server_role(conn, TEST_SERVER_ROLE, TEST_SERVER_DB_PASSWORD)
        finally:
            await conn.close()
        return url


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    # Under the system temp dir, not the test's tmp_path: the postgres user must
    # be able to reach its data directory.
    base = Path(tempfile.gettempdir()) / f"mdm-pg-{uuid.uuid4().hex[:8]}"
    pg = PrivatePostgres(base, free_port())
    pg.init()
    pg.start()
    try:
        yield pg
    finally:
        try:
            pg.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped by the test
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(keyring_dir_for(with_database(pg.admin_url, "mdm")), ignore_errors=True)


@dataclass
class Server(MdmProcess):
    """``mdm-server serve``, with its HTTP base URL."""

    stop_signal = signal.SIGINT

    @property
    def base(self) -> str:
        return "http://" + self.env["MDM_HTTP_ADDR"]

    def start(self, ingest_workers: int = 1) -> None:
        self.spawn("serve", "--ingest-workers", str(ingest_workers))
        host, port = self.env["MDM_HTTP_ADDR"].rsplit(":", 1)
        wait_port(int(port), timeout=30, host=host.strip("[]"))
        self.wait_subscribed(ingest_workers)
        if "MDM_TLS_CERT" not in self.env and self._broker_up():
            # Every worker subscribed, not just some subscription acknowledged (a
            # worker subscribes to more than one filter, and a restarted server's
            # log holds its earlier lines): messages published from now on are
            # shared among all of them. (A test may start serve with the broker
            # stopped: then there is nothing to wait for.)
            self.wait_ready()

    def _broker_up(self) -> bool:
        import socket

        from mdm_server.config import MqttSettings

        if not self.env.get("MDM_MQTT_URL"):
            return bool(self.env.get("MDM_AMQP_URL"))  # devices on a cluster only
        m = MqttSettings.from_url(self.env["MDM_MQTT_URL"])
        try:
            with socket.create_connection((m.host, m.port), timeout=2):
                return True
        except OSError:
            return False

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until GET /readyz is 200: the database answers and every ingest
        worker is connected to the broker and subscribed."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.base + "/readyz", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError("process died:\n" + self.log_text()[-3000:])
            if time.monotonic() > deadline:
                raise TimeoutError("never ready:\n" + self.log_text()[-3000:])
            time.sleep(0.1)

    def cli(self, *args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "mdm_server", *args], env=self.env,
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise AssertionError(f"mdm-server {' '.join(args)} failed: {out.stderr}")
        return out.stdout

    def wait_command(self, token: str, device: str, command_id: str, state: str,
                     timeout: float = 20.0) -> dict[str, Any]:
        """Poll the command through the admin API until it is in ``state``; its body."""
        deadline = time.monotonic() + timeout
        while True:
            status, cmd = self.request(
                "GET", f"/api/v1/devices/{device}/commands/{command_id}", token)
            assert status == 200, cmd
            if cmd["state"] == state:
                return cmd  # type: ignore[no-any-return]
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {state}, command is {cmd['state']}: {cmd}")
            time.sleep(0.1)

    def request(self, method: str, path: str, token: str | None = None,
                body: object = None) -> tuple[int, Any]:
        """One HTTP call; returns (status, decoded JSON body or None)."""
        import json
        import urllib.error
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
                if "json" not in resp.headers.get("Content-Type", "json"):
                    return resp.status, raw  # a download (export ZIP), a page
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as err:
            raw = err.read()
            return err.code, json.loads(raw) if raw else None


@contextmanager
def served(tmp: Path, *, tenants: tuple[str, ...] = ("acme",),
           setup: Callable[[Server], object] | None = None, **env: str) -> Iterator[Server]:
    """A fresh migrated database, a private broker and ``mdm-server serve`` on them,
    for a test module: ``tenants`` created and ``setup(server)`` run (CLI calls)
    before it starts; ``env`` added to the server's environment. The server's env
    also names ``TEST_DATABASE`` (the superuser's URL, for inspecting) and
    ``BROKER_PORT``. Everything is stopped and dropped afterwards."""
    import asyncio

    database = asyncio.run(create_database())
    try:
        with running_broker(tmp) as broker:
            srv = Server(server_env(database, broker.url, **env), tmp / "serve.log")
            srv.env["BROKER_PORT"] = str(broker.port)
            srv.env["TEST_DATABASE"] = database
            for tenant in tenants:
                srv.cli("tenant", "create", tenant)
            if setup is not None:
                setup(srv)
            srv.start()
            try:
                yield srv
            finally:
                srv.stop()
    finally:
        asyncio.run(drop_database(database))
