"""Ingest benchmark: drain rate, references, live latency, profile (not collected by pytest).

    python -m load_tests.bench_ingest [--messages 100000] [--naive-messages 20000]
        [--live-seconds 60] [--live-rate 10000] [--live-mix] [--skip-live] [--profile]
        [--policy-mix] [--pair-runs 2] [--skip-policy] [--tls] [--tls-runs 2]
        [--live-watchers N] [--watcher-runs 2] [--amqp] [--amqp-runs 2]
        [--failover follower,leader]

Phases, each on a fresh private broker (scripts/broker, the project's config) and the
run's throwaway database (created, migrated, dropped at the end):

drain      ingest primed (started until "subscribed", then SIGTERM), a backlog of
           ``--messages`` single-record location messages from 20 devices published
           at QoS 1 by the simulator (own process), then the ingest started again and
           timed until ``count(*) = messages`` (polled every 100 ms).
c-ref      the same backlog drained by ``mosquitto_sub -q 1 -c -C N`` (C, no database).
naive      ``--naive-messages`` drained by load_tests/naive_consumer.py (paho auto-ack,
           same decode and validation, one INSERT per message).
live       ingest running; simulator at ``--live-rate`` records/s for
           ``--live-seconds`` s; publish->commit latency = received_at - ts in SQL.
profile    (--profile) the drain again with the ingest under cProfile (and a policy-B
           drain under cProfile unless --skip-policy).
micro      CompiledPolicy.filter_batch on 1,000-record batches, strict policy and the
           open default (load_tests/bench_policy.py), best of --micro-repeats.
pair       policy A/B: drains of tenant ``bench`` (its default policy as created: keeps
           everything) and of tenant ``bench-strict`` (default policy = the strictest
           realistic one, bench_policy.strict_policy_doc, set with put_policy before any
           ingest ran), alternating A B B A (--pair-runs each). Before each backlog a
           check_out per device (ts a minute earlier) is ingested by the primed ingest;
           the timed ingest runs until stored + suppressed = backlog. Location only;
           with --policy-mix also the simulator's realistic mix of kinds.
tls        (--tls) the drain with the ingest connected to the broker's TLS listener
           (mqtts://, the broker's CA as MDM_MQTT_CA_FILE) and with it connected in
           plain text to the loopback listener, alternating plain tls tls plain
           (--tls-runs each), each on a fresh broker: the cost of TLS on the ingest
           as a ratio measured in one run.
watchers   (--live-watchers N) the drain with N SSE streams of GET /api/v1/live open on
           a running ``serve`` (its own idle broker: the bench's ingest drains, serve
           fans out each committed batch) and with none, alternating none N N none
           (--watcher-runs each); every watcher must receive every point.
owntracks  (--owntracks) OwnTracks drains beside native ones in the same run,
           alternating native owntracks owntracks native (--owntracks-runs each), then
           one drain of encrypted OwnTracks payloads: ``--messages`` location messages
           from 20 devices enrolled with ``--agent owntracks`` (JSON published on
           owntracks/{username}/{device} with their own credentials over TLS, the
           ingest's shared subscription to owntracks/+/+/#), timed like the drain.
           Reports OwnTracks/native (and encrypted/native) from the same run.
baseline   (--baseline REF) the drain again with the code of another commit (a git
           worktree of REF, its own throwaway database migrated by REF's code, devices
           enrolled and the backlog published by REF's simulator, REF's ingest) and
           with this tree's, alternating REF this this REF (--baseline-runs each): the
           cost of a change as a ratio measured in one run.
amqp       (--amqp) the drain from a RabbitMQ quorum queue over AMQP beside the
           Mosquitto drain, alternating mosquitto amqp1 amqp2 | amqp2 amqp1 mosquitto
           (--amqp-runs rounds): a one-node private cluster (scripts/cluster) whose
           auth asks a ``serve``'s broker hook (a ``serve`` that consumes nothing), the
           same backlog published by the same enrolled devices through the node's MQTT
           listener into ``mdm-ingest``, then one or two ``mdm-server ingest``
           processes (competing consumers on the one node) timed as the drain.
           Reports AMQP/Mosquitto from the same run.
failover   (--amqp; --failover follower,leader) each on a fresh 3-node cluster: the
           backlog queued, one ingest draining it (connected to a follower's node or
           to the leader's), the quorum leader's node SIGKILLed at 30% stored; the time
           to a new leader (management API ``leader``), until the ingest stores again,
           and every record stored once, the queue left empty.

Ingest processes get MDM_MASTER_KEY (the tests' key) through tests/support/services
server_env(); the bench sets the same key in its own environment for enrollment.
Brokers let nobody in anonymously: every fresh broker is given the enrolled devices'
identities (reconcile, as ``serve`` does), devices publish with their own
credentials over the broker's TLS listener (the simulator is told it as enrollment
tells devices: MDM_MQTT_PUBLIC_URL and its CA), and the references (C subscriber,
naive consumer) log in as the server's MQTT user on the plain loopback listener.

Prints a summary and inserts a dated section at the top of load_tests/RESULTS.md
(--no-results: print only). Everything it starts (brokers, ingest and consumer
processes, the database) is stopped or dropped on exit, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import importlib
import io
import itertools
import json
import os
import pstats
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson
import psutil  # type: ignore[import-untyped]  # no stubs installed (types-psutil)

from agent_protocol import Record, encode_telemetry, telemetry_topic
from load_tests import bench_policy
from mdm_server.storage.policies import put_policy
from mdm_server.storage.pool import connect
from privacy_filters import parse_policy

# The tests' helpers (databases, brokers started with the project's config, the
# server's environment), imported at run time: mypy --strict of tests/support is not
# clean with the pinned mypy, and following the import would fail this file's check.
services: Any = importlib.import_module("tests.support.services")
test_mqtt: Any = importlib.import_module("tests.support.mqtt")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "load_tests" / "RESULTS.md"
PY = sys.executable
TENANT = "bench"
STRICT_TENANT = "bench-strict"  # its default policy: load_tests/bench_policy.py
POLICY_SEED = 7  # simulator data seed of the policy pairs (same devices and walks)
MIX_KINDS = "location,identity,sim,network,apps,checkinout"  # simulator's default weights
DEVICES = 20
FILTER = "mdm/v1/+/devices/+/telemetry/+"
CLUSTER_SCRIPT = REPO / "scripts" / "cluster"
AMQP_QUEUE = "mdm-ingest"  # mdm_server.ingest.amqp.INGEST_QUEUE
AMQP_USER = "mdm-server"  # the server's broker user scripts/cluster makes

TARGET_DRAIN = 30_000.0
TARGET_VS_NAIVE = 5.0
TARGET_VS_C = 0.3
TARGET_P99_S = 0.5
TARGET_POLICY_RATIO = 0.85
TARGET_VS_BASELINE = 0.9  # a change's drain rate against the code before it (--baseline)
TARGET_WATCHERS = 0.95  # the drain with 20 live watchers against none (issue 11)


class BenchError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


# --- database ---------------------------------------------------------------------------


class Db:
    """One asyncpg connection driven from synchronous code."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._loop = asyncio.new_event_loop()
        self._conn: asyncpg.Connection = self._loop.run_until_complete(asyncpg.connect(url))

    def val(self, sql: str) -> Any:
        return self._loop.run_until_complete(self._conn.fetchval(sql))

    def row(self, sql: str) -> asyncpg.Record:
        rec = self._loop.run_until_complete(self._conn.fetchrow(sql))
        assert rec is not None
        return rec

    def rows(self, sql: str) -> list[asyncpg.Record]:
        return list(self._loop.run_until_complete(self._conn.fetch(sql)))

    def dead_letters(self) -> int:
        """Messages dead-lettered: counted per row since migration 013, one row each
        before (a baseline ref's database)."""
        counted = self.val("SELECT EXISTS (SELECT 1 FROM information_schema.columns "
                           "WHERE table_name = 'dead_letters' AND column_name = 'count')")
        sql = ("SELECT coalesce(sum(count), 0) FROM dead_letters" if counted
               else "SELECT count(*) FROM dead_letters")
        return int(self.val(sql))

    def execute(self, sql: str) -> None:
        self._loop.run_until_complete(self._conn.execute(sql))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.run_until_complete(self._conn.close())
        self._loop.close()


# --- processes ---------------------------------------------------------------------------


class Monitor:
    """Polls a process (and its children) every 200 ms: peak RSS, last CPU times."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self._proc = psutil.Process(pid)
        self._interval = interval
        self.peak_rss = 0
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        try:
            procs = [self._proc, *self._proc.children(recursive=True)]
            rss, cpu = 0, 0.0
            for p in procs:
                with p.oneshot():
                    rss += p.memory_info().rss
                    t = p.cpu_times()
                    cpu += t.user + t.system
            self.peak_rss = max(self.peak_rss, rss)
            self.cpu_s = max(self.cpu_s, cpu)
        except psutil.Error:
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def stop(self) -> None:
        self.sample()
        self._stop.set()
        self._thread.join(timeout=2)


@dataclass
class Proc:
    """A child process with its log; terminated (then killed) on stop."""

    cmd: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    cwd: Path = REPO

    def start(self) -> Proc:
        with self.log_path.open("ab") as f:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=f, stderr=f,
                                         cwd=self.cwd)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, needle: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log_text():
                return
            if not self.alive():
                raise BenchError(f"{self.cmd[:4]} died:\n{self.log_text()[-2000:]}")
            time.sleep(0.05)
        raise BenchError(f"no {needle!r} from {self.cmd[:4]}:\n{self.log_text()[-2000:]}")

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc


def ing_log_count(path: Path, needle: str) -> int:
    return path.read_text(errors="replace").count(needle) if path.exists() else 0


@dataclass
class RabbitCluster:
    """A private RabbitMQ cluster (scripts/cluster) and the ``serve`` that is its hook."""

    dir: Path
    env: dict[str, str]
    hook_broker: Any  # serve's own Mosquitto (its MQTT side; the simulator's enrolment)
    hook: Proc
    formed_s: float

    def queue(self, node: int = 1, timeout: float = 10.0) -> dict[str, Any]:
        """The ingest queue as node ``node``'s management API shows it."""
        base = self.env["MDM_AMQP_MANAGEMENT_URL"].split(",")[node - 1]
        password = urlsplit(self.env["MDM_AMQP_URL"].split(",")[0]).password or ""
        req = urllib.request.Request(f"{base}/api/queues/%2F/{AMQP_QUEUE}")
        token = base64.b64encode(f"{AMQP_USER}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            doc: dict[str, Any] = json.loads(resp.read())
        return doc

    def kill_node(self, node: int) -> None:
        """SIGKILL node ``node``: the process group scripts/cluster started it in
        (its shell wrapper, beam.smp and their helpers), found by its node name and
        this cluster's HOME (other clusters, the tests', use the same node names)."""
        want = {"RABBITMQ_NODENAME": f"mdm-c{node}@localhost", "HOME": str(self.dir / "home")}
        for p in psutil.process_iter(["name"]):
            if p.info["name"] != "beam.smp":
                continue
            with contextlib.suppress(psutil.Error):
                env = p.environ()
                if all(env.get(k) == v for k, v in want.items()):
                    pgid = os.getpgid(p.pid)
                    if pgid == os.getpgid(0):
                        raise BenchError("the node runs in the bench's own process group")
                    os.killpg(pgid, signal.SIGKILL)
                    return
        raise BenchError(f"no beam.smp process of node {node}")


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    stack: contextlib.ExitStack
    db: Db | None = None
    db_url: str = ""
    results: dict[str, Any] = field(default_factory=dict)
    loads: list[tuple[str, str]] = field(default_factory=list)
    # Whose code the ingest, the simulator and reconcile run: this tree, or the
    # worktree of --baseline (see :meth:`on`).
    tree: Path = REPO
    # The OwnTracks devices' settings (--owntracks), enrolled on first use.
    ot_fleet: list[dict[str, Any]] = field(default_factory=list)

    # -- plumbing ----------------------------------------------------------------

    @contextlib.contextmanager
    def on(self, tree: Path, db: Db) -> Iterator[None]:
        """Run phases with another tree's code against its own database."""
        saved = (self.tree, self.db, self.db_url)
        self.tree, self.db, self.db_url = tree, db, db.url
        try:
            yield
        finally:
            self.tree, self.db, self.db_url = saved

    def tree_env(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` with this side's code first on the import path."""
        return {**env, "PYTHONPATH": str(self.tree)}

    def broker(self, name: str) -> Any:
        """A fresh private broker (the project's config: no anonymous access), given
        the enrolled devices' identities as ``serve`` would (reconcile)."""
        b = services.Broker(services.free_port(), self.tmp / f"broker-{name}")
        b.dir.mkdir(parents=True, exist_ok=True)
        b.start()
        self.stack.callback(b.stop)
        if self.tree == REPO:
            asyncio.run(_reconcile(self.db_url, b.url))
        else:  # the other tree's own code, against its own database
            env = self.tree_env({**os.environ, "MDM_DATABASE_URL": self.db_url,
                                 "MDM_MQTT_URL": b.url})
            subprocess.run([PY, "-m", "mdm_server", "broker", "reconcile"], env=env,
                           cwd=self.tree, check=True, capture_output=True, timeout=120)
        return b

    def proc(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Proc:
        if self.tree != REPO:
            env = self.tree_env(dict(os.environ) if env is None else env)
        p = Proc(cmd, self.tmp / f"{name}.log", env, cwd=self.tree)
        self.stack.callback(p.stop)
        return p.start()

    def ingest(self, name: str, broker: Any, profile: Path | None = None,
               tls: bool = False) -> Proc:
        cmd = [PY]
        if profile is not None:
            cmd += ["-m", "cProfile", "-o", str(profile)]
        cmd += ["-m", "mdm_server", "ingest", "--index", "0"]
        if tls:  # the broker's TLS listener, its certificate checked against its CA
            env = services.server_env(self.db_url, broker.tls_url,
                                      MDM_MQTT_CA_FILE=str(broker.ca_file))
        else:
            env = services.server_env(self.db_url, broker.url)
        return self.proc(name, cmd, env)

    def simulate(self, name: str, broker: Any, *, count: int | None = None,
                 rate: float = 0.0, duration: float = 0.0, kinds: str = "location",
                 enroll: bool = True, tenant: str = TENANT,
                 seed: int | None = None, device_url: str | None = None) -> dict[str, Any]:
        stats = self.tmp / f"{name}-sim.json"
        # The broker's URL (the server's MQTT user, which enrolls or provisions the
        # devices) goes in the environment, not on a command line.
        cmd = [PY, "-m", "load_tests.simulator", "--tenant", tenant, "--devices", str(DEVICES),
               "--kinds", kinds, "--rate", str(rate), "--json-stats", str(stats), "--quiet"]
        if seed is not None:
            cmd += ["--seed", str(seed)]
        cmd += ["--database-url", self.db_url] if enroll else ["--no-enroll"]
        if count is not None:
            cmd += ["--count", str(count)]
        if duration:
            cmd += ["--duration", str(duration)]
        # Devices go where enrollment sends them: the broker's TLS listener, its CA
        # (or ``device_url``: a RabbitMQ node's plain MQTT listener on 127.0.0.1).
        env = {**os.environ, "MDM_MQTT_URL": broker.url,
               "MDM_MQTT_PUBLIC_URL": device_url or broker.device_url,
               "MDM_MQTT_PUBLIC_CA_FILE": str(broker.ca_file)}
        if device_url:
            del env["MDM_MQTT_PUBLIC_CA_FILE"]
        p = self.proc(f"{name}-sim", cmd, env)
        assert p.proc is not None
        rc = p.proc.wait()
        p.proc = None
        if rc != 0 or not stats.exists():
            raise BenchError(f"simulator failed (rc {rc}):\n{p.log_text()[-2000:]}")
        doc: dict[str, Any] = orjson.loads(stats.read_bytes())
        if doc["unacked"]:
            raise BenchError(f"simulator: {doc['unacked']} messages not acknowledged")
        return doc

    def reset_tables(self) -> None:
        assert self.db is not None
        for attempt in range(5):
            try:
                self.db.execute(
                    "TRUNCATE telemetry, dead_letters, checkout_events, suppressed_locations")
                return
            except asyncpg.DeadlockDetectedError:  # a serve's retention run (--amqp's hook)
                if attempt == 4:
                    raise
                time.sleep(1.0)

    def note_load(self, phase: str) -> None:
        self.loads.append((phase, load_line()))
        log(f"{phase}: load average {load_line()}")

    def wait_count(self, n: int, watch: Proc | None, timeout: float,
                   sql: str = "SELECT count(*) FROM telemetry") -> float:
        """Poll ``sql`` (a count) every 100 ms until it reaches n; returns the
        monotonic time."""
        assert self.db is not None
        deadline = time.monotonic() + timeout
        last, moved = -1, time.monotonic()
        while True:
            c = int(self.db.val(sql))
            now = time.monotonic()
            if c >= n:
                return now
            if c != last:
                last, moved = c, now
            if watch is not None and not watch.alive():
                raise BenchError(f"process died at {c}/{n}:\n{watch.log_text()[-2000:]}")
            if now > deadline or now - moved > 30:
                raise BenchError(f"stuck at {c}/{n} rows")
            time.sleep(0.1)

    def commit_span(self) -> tuple[int, float, int]:
        assert self.db is not None
        r = self.db.row(
            "SELECT count(*) AS n, extract(epoch FROM max(received_at) - min(received_at))"
            " AS span, count(DISTINCT received_at) AS commits FROM telemetry")
        return int(r["n"]), float(r["span"] or 0.0), int(r["commits"])

    # -- phases ------------------------------------------------------------------

    def phase_drain(self, name: str, profile: Path | None = None,
                    tls: bool = False) -> dict[str, Any]:
        n = self.args.messages
        self.note_load(name)
        self.reset_tables()
        broker = self.broker(name)
        # Primed as it will drain: the persistent session is the listener's client's.
        prime = self.ingest(f"{name}-prime", broker, tls=tls)
        prime.wait_log("ingest subscribed")
        prime.stop()
        log(f"{name}: ingest primed; publishing {n:,} messages")
        sim = self.simulate(name, broker, count=n)
        log(f"{name}: published at {sim['rate_msgs_per_s']:,.0f} msg/s; starting the ingest"
            + (" (TLS)" if tls else ""))
        ing = self.ingest(name, broker, profile, tls=tls)
        t0 = ing.started_at
        mon = Monitor(ing.pid)
        t1 = self.wait_count(n, ing, timeout=600)
        mon.stop()
        rc = ing.stop()
        wall = t1 - t0
        count, span, commits = self.commit_span()
        assert self.db is not None
        dead = self.db.dead_letters()
        res = {
            "messages": n, "stored": count, "dead_letters": dead, "commits": commits,
            "wall_s": wall, "rate_wall": n / wall, "span_s": span,
            "rate_commits": n / span if span else float("nan"),
            "cpu_s": mon.cpu_s, "cpu_us_per_record": mon.cpu_s / n * 1e6,
            "peak_rss_mb": mon.peak_rss / 2**20, "publish_rate": sim["rate_msgs_per_s"],
            "exit_code": rc, "load": load_line(),
        }
        log(f"{name}: {res['rate_wall']:,.0f} rec/s from start, {res['rate_commits']:,.0f} "
            f"first->last commit, {res['cpu_us_per_record']:.1f} µs CPU/record")
        return res

    def live_server(self) -> tuple[Proc, str, str]:
        """``serve`` for the live watchers: on the run's database, its own broker's
        ingest idle (the bench's ingest process drains), so it only fans out what the
        drain commits. Returns it, its base URL and an admin token."""
        n = self.args.live_watchers
        broker = self.broker("live-serve")
        env = services.server_env(self.db_url, broker.url, MDM_LIVE_STREAMS_PER_TOKEN=str(n),
                                  MDM_LIVE_STREAMS_PER_TENANT=str(n))
        out = subprocess.run([PY, "-m", "mdm_server", "admin", "create", "--tenant", TENANT,
                              "--name", "bench-live"], env=env, cwd=REPO, check=True,
                             capture_output=True, text=True, timeout=60)
        token = out.stdout.strip()
        srv = self.proc("live-serve", [PY, "-m", "mdm_server", "serve"], env)
        srv.wait_log("live feed listening", timeout=60)
        return srv, "http://" + env["MDM_HTTP_ADDR"], token

    def phase_watchers(self) -> dict[str, Any]:
        """Drains with N live watchers connected and with none, alternating
        none N N none (--watcher-runs each): the cost of the live feed on the drain
        as a ratio measured in one run."""
        n, runs = self.args.live_watchers, self.args.watcher_runs
        srv, base, token = self.live_server()
        mon = Monitor(srv.pid)
        order = [w for _ in range(runs) for w in ((0, n) if _ % 2 == 0 else (n, 0))]
        done: list[dict[str, Any]] = []
        for i, watchers in enumerate(order):
            name = f"watch{i}-{watchers}"
            stats = self.tmp / f"{name}.json"
            w: Proc | None = None
            if watchers:
                w = self.proc(name + "-clients", [
                    PY, "-m", "load_tests.live_watchers", "--url", base, "--streams",
                    str(watchers), "--stats", str(stats)],
                    {**os.environ, "MDM_BENCH_TOKEN": token, "PYTHONPATH": str(REPO)})
                w.wait_log(f"connected {watchers}", timeout=60)
            cpu0 = mon.cpu_s
            res = self.phase_drain(name)
            res["watchers"] = watchers
            res["serve_cpu_s"] = mon.cpu_s - cpu0
            if w is not None:
                # Every watcher gets every point (serve's fan-out lags the commit by
                # well under a second); give it a moment, then count.
                want = self.args.messages
                deadline = time.monotonic() + 30
                got: list[int] = []
                while time.monotonic() < deadline:
                    if stats.exists():
                        got = [s["points"] for s in orjson.loads(stats.read_bytes())]
                        if got and min(got) >= want:
                            break
                    time.sleep(0.2)
                w.stop()
                got = [s["points"] for s in orjson.loads(stats.read_bytes())]
                res["points_min"], res["points_max"] = min(got), max(got)
                log(f"{name}: each of {watchers} watchers got {min(got):,}-{max(got):,} "
                    f"of {want:,} points")
                if min(got) < want:
                    raise BenchError(f"a watcher got {min(got)} of {want} points")
            done.append(res)
        mon.stop()
        srv.stop()
        with_ = [r["rate_wall"] for r in done if r["watchers"]]
        without = [r["rate_wall"] for r in done if not r["watchers"]]
        ratio = _mean(with_) / _mean(without)
        log(f"live watchers: {_mean(with_):,.0f} rec/s with {n}, {_mean(without):,.0f} "
            f"without: ratio {ratio:.3f}")
        return {"runs": done, "watchers": n, "ratio": ratio, "with": _mean(with_),
                "without": _mean(without)}

    def publish_checkouts(self, broker: Any, tenant: str, ts_ms: int) -> None:
        """One ``check_out`` event per device at ``ts_ms`` (QoS 1, all PUBACKed), each
        published by its device with its own credentials."""
        assert self.db is not None
        generations = {(tenant, f"sim-{i:04d}"): int(self.db.val(
            f"SELECT mqtt_generation FROM devices WHERE tenant_id = '{tenant}' "
            f"AND device_id = 'sim-{i:04d}'")) for i in range(DEVICES)}
        messages = []
        for i in range(DEVICES):
            device = f"sim-{i:04d}"
            payload = encode_telemetry(
                [Record(id=f"checkout-{ts_ms}-{i}", ts_ms=ts_ms,
                        data={"event": "check_out", "user_id": f"user-{i}",
                              "shift_id": f"{device}-bench"})],
                device=device, kind="checkinout")
            messages.append((telemetry_topic(tenant, device, "checkinout"), payload))
        test_mqtt.publish_as_devices(broker.port, messages, generations=generations,
                                     timeout=30)

    def phase_policy_drain(self, name: str, tenant: str, kinds: str,
                           profile: Path | None = None) -> dict[str, Any]:
        """A drain like phase_drain, for ``tenant`` under its current default policy:
        primed ingest, a check_out per device (ts a minute before the backlog) ingested
        by it, then the backlog (simulator, seed POLICY_SEED), then the timed ingest
        until every record is stored or counted suppressed."""
        n = self.args.messages
        self.note_load(name)
        self.reset_tables()
        broker = self.broker(name)
        prime = self.ingest(f"{name}-prime", broker)
        prime.wait_log("ingest subscribed")
        checkout_ms = int(time.time() * 1000) - 60_000
        self.publish_checkouts(broker, tenant, checkout_ms)
        self.wait_count(DEVICES, prime, timeout=60,
                        sql="SELECT count(*) FROM checkout_events")
        prime.stop()
        log(f"{name}: check-outs ingested; publishing {n:,} messages ({kinds}, {tenant})")
        sim = self.simulate(name, broker, count=n, kinds=kinds, tenant=tenant, seed=POLICY_SEED)
        ing = self.ingest(name, broker, profile)
        t0 = ing.started_at
        mon = Monitor(ing.pid)
        processed = (f"SELECT (SELECT count(*) FROM telemetry) - {DEVICES}"
                     " + (SELECT coalesce(sum(count), 0) FROM suppressed_locations)")
        t1 = self.wait_count(n, ing, timeout=600, sql=processed)
        mon.stop()
        rc = ing.stop()
        wall = t1 - t0
        assert self.db is not None
        # The check-outs above, told apart by their event time (stored ids are digests).
        backlog = (f"NOT (kind = 'checkinout' AND ts = timestamptz 'epoch' + "
                   f"{checkout_ms} * interval '1 millisecond')")
        r = self.db.row(f"""
            SELECT count(*) - {DEVICES} AS stored,
                   count(*) FILTER (WHERE kind = 'location') AS loc_stored,
                   extract(epoch FROM
                       max(received_at) FILTER (WHERE {backlog})
                       - min(received_at) FILTER (WHERE {backlog})
                   ) AS span,
                   count(DISTINCT received_at) FILTER (WHERE {backlog}) AS commits,
                   min(policy_version) AS vmin, max(policy_version) AS vmax,
                   (SELECT coalesce(sum(count), 0) FROM suppressed_locations) AS suppressed
            FROM telemetry""")
        span = float(r["span"] or 0.0)
        res = {
            "tenant": tenant, "kinds": kinds, "messages": n, "stored": int(r["stored"]),
            "loc_stored": int(r["loc_stored"]), "suppressed": int(r["suppressed"]),
            "dead_letters": self.db.dead_letters(), "commits": int(r["commits"]),
            "policy_version": (r["vmin"], r["vmax"]),
            "wall_s": wall, "rate_wall": n / wall, "span_s": span,
            "rate_commits": n / span if span else float("nan"),
            "cpu_s": mon.cpu_s, "cpu_us_per_record": mon.cpu_s / n * 1e6,
            "peak_rss_mb": mon.peak_rss / 2**20, "publish_rate": sim["rate_msgs_per_s"],
            "sim_by_kind": sim.get("unique_by_kind", {}), "exit_code": rc,
        }
        log(f"{name}: {res['rate_wall']:,.0f} rec/s from start, {res['rate_commits']:,.0f} "
            f"first->last commit, {res['cpu_us_per_record']:.1f} µs CPU/record, stored "
            f"{res['stored']:,}, suppressed {res['suppressed']:,}")
        return res

    def phase_policy_pair(self, label: str, kinds: str) -> dict[str, Any]:
        """Drains A (open default) and B (strict default), alternating, --pair-runs each."""
        runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
        order = ["A", "B", "B", "A"] * self.args.pair_runs
        order = order[: 2 * self.args.pair_runs]
        for i, which in enumerate(order):
            tenant = TENANT if which == "A" else STRICT_TENANT
            runs[which].append(self.phase_policy_drain(f"{label}-{which}{i // 2 + 1}",
                                                       tenant, kinds))
        return {"kinds": kinds, "A": runs["A"], "B": runs["B"]}

    def phase_baseline(self, ref: str) -> dict[str, Any]:
        """Drains with REF's code and with this tree's, alternating REF this this REF
        (--baseline-runs each); each side on its own database."""
        tree = self.tmp / "baseline-tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), ref], cwd=REPO,
                       check=True, capture_output=True, timeout=120)
        self.stack.callback(lambda: subprocess.run(
            ["git", "worktree", "remove", "--force", str(tree)], cwd=REPO,
            capture_output=True, timeout=120))
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree,
                                capture_output=True, text=True, check=True).stdout.strip()
        url = asyncio.run(services.create_database("mdm_bench_base", migrate=False))
        self.stack.callback(lambda: asyncio.run(services.drop_database(url)))
        env = {**os.environ, "MDM_DATABASE_URL": url, "PYTHONPATH": str(tree)}
        for cmd in ([PY, "-m", "mdm_server", "migrate"],
                    [PY, "-c", "import asyncio, sys; from load_tests.simulator import "
                     "enroll_fleet; asyncio.run(enroll_fleet(sys.argv[1], "
                     f"'mqtt://127.0.0.1:1883', '{TENANT}', {DEVICES}))", url]):
            out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True,
                                 timeout=300)
            if out.returncode != 0:
                raise BenchError(f"baseline {ref} set-up failed: {out.stderr[-2000:]}")
        base_db = Db(url)
        self.stack.callback(base_db.close)
        runs: dict[str, list[dict[str, Any]]] = {"base": [], "this": []}
        order = (["base", "this", "this", "base"] * self.args.baseline_runs)[
            : 2 * self.args.baseline_runs]
        for i, which in enumerate(order):
            name = f"baseline-{which}{i // 2 + 1}"
            if which == "base":
                with self.on(tree, base_db):
                    runs[which].append(self.phase_drain(name))
            else:
                runs[which].append(self.phase_drain(name))
        return {"ref": ref, "commit": commit, **runs}

    def _owntracks_fleet(self) -> list[dict[str, Any]]:
        """DEVICES devices enrolled for OwnTracks in TENANT (once): their settings."""
        if not self.ot_fleet:
            self.ot_fleet = asyncio.run(_enroll_owntracks(self.db_url, DEVICES))
        return self.ot_fleet

    def publish_owntracks(self, broker: Any, n: int, encrypted: bool) -> float:
        """``n`` OwnTracks location messages, spread over the fleet, each device's
        published on one TLS connection with its own credentials, devices in
        parallel; returns messages/s of the publishing."""
        import base64
        import ssl

        import nacl.secret

        fleet = self._owntracks_fleet()
        now = int(time.time()) - 3600
        per: list[list[tuple[str, bytes]]] = [[] for _ in fleet]
        for i in range(n):
            d = i % len(fleet)
            ot = fleet[d]
            body = orjson.dumps({"_type": "location", "lat": 52.0 + (i % 1000) * 1e-4,
                                 "lon": 5.0 + (i // 1000) * 1e-4, "acc": 8, "alt": 4,
                                 "vel": 30, "cog": 90, "batt": 80, "tid": "bt",
                                 "tst": now + i // len(fleet), "_id": f"{i:08x}"})
            if encrypted:
                box = nacl.secret.SecretBox(ot["encryption_key"].encode().ljust(32, b"\0"))
                body = orjson.dumps({"_type": "encrypted",
                                     "data": base64.b64encode(bytes(box.encrypt(body))).decode()})
            per[d].append((ot["mqtt"]["topic"], body))
        ctx = ssl.create_default_context(cadata=broker.ca_pem)
        t0 = time.monotonic()
        errors: list[BaseException] = []

        def one(d: int) -> None:
            ot = fleet[d]
            try:
                test_mqtt.publish_all("127.0.0.1", broker.tls_port, per[d],
                                      client_id=ot["username"], username=ot["username"],
                                      password=ot["password"], tls=ctx)
            except BaseException as exc:  # reported below, on the main thread
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(d,)) for d in range(len(fleet))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise BenchError(f"publishing OwnTracks messages failed: {errors[0]!r}")
        return n / (time.monotonic() - t0)

    def phase_owntracks_drain(self, name: str, encrypted: bool = False) -> dict[str, Any]:
        """phase_drain with a backlog of OwnTracks location messages."""
        n = self.args.messages
        self._owntracks_fleet()
        self.note_load(name)
        self.reset_tables()
        broker = self.broker(name)
        prime = self.ingest(f"{name}-prime", broker)
        prime.wait_log("ingest subscribed")
        prime.stop()
        log(f"{name}: ingest primed; publishing {n:,} OwnTracks messages"
            + (" (encrypted)" if encrypted else ""))
        rate = self.publish_owntracks(broker, n, encrypted)
        ing = self.ingest(name, broker)
        t0 = ing.started_at
        mon = Monitor(ing.pid)
        t1 = self.wait_count(n, ing, timeout=600)
        mon.stop()
        rc = ing.stop()
        wall = t1 - t0
        count, span, commits = self.commit_span()
        assert self.db is not None
        res = {
            "messages": n, "stored": count, "dead_letters": self.db.dead_letters(),
            "commits": commits, "wall_s": wall, "rate_wall": n / wall, "span_s": span,
            "rate_commits": n / span if span else float("nan"),
            "cpu_s": mon.cpu_s, "cpu_us_per_record": mon.cpu_s / n * 1e6,
            "peak_rss_mb": mon.peak_rss / 2**20, "publish_rate": rate,
            "exit_code": rc, "load": load_line(), "encrypted": encrypted,
        }
        log(f"{name}: {res['rate_wall']:,.0f} rec/s from start, {res['rate_commits']:,.0f} "
            f"first->last commit, {res['cpu_us_per_record']:.1f} µs CPU/record")
        return res

    def phase_owntracks(self) -> dict[str, Any]:
        """Native and OwnTracks drains alternating native ot ot native (--owntracks-runs
        each), then one encrypted OwnTracks drain."""
        runs: dict[str, list[dict[str, Any]]] = {"native": [], "owntracks": []}
        order = (["native", "owntracks", "owntracks", "native"]
                 * self.args.owntracks_runs)[: 2 * self.args.owntracks_runs]
        for i, which in enumerate(order):
            name = f"ot-{which}{i // 2 + 1}"
            runs[which].append(self.phase_drain(name) if which == "native"
                               else self.phase_owntracks_drain(name))
        return {**runs, "encrypted": [self.phase_owntracks_drain("ot-encrypted", True)]}

    # -- AMQP (issue 14): the drain from a RabbitMQ quorum queue beside Mosquitto's ----

    def rabbit(self, name: str, nodes: int) -> RabbitCluster:
        """A private RabbitMQ cluster (scripts/cluster up, ``down`` on exit) and a
        ``serve`` answering its nodes' questions at the broker hook (devices' and the
        ingest's log-ins). That ``serve`` is given the cluster's server password in an
        ``MDM_AMQP_URL`` naming a loopback port nothing listens on: its hook accepts the
        server's user, its own ingest never reaches a node, so the ingest processes the
        bench starts are the queue's only consumers."""
        hook = f"127.0.0.1:{services.free_port()}"
        d = self.tmp / f"rabbit-{name}"
        t0 = time.monotonic()
        self.stack.callback(lambda: subprocess.run(
            [str(CLUSTER_SCRIPT), "down", "--dir", str(d)], capture_output=True, timeout=120))
        out = subprocess.run([str(CLUSTER_SCRIPT), "up", "--nodes", str(nodes), "--dir", str(d),
                              "--hook", hook], capture_output=True, text=True,
                             timeout=90 + 60 * nodes, check=False)
        if out.returncode != 0:
            raise BenchError(f"scripts/cluster up failed:\n{out.stderr[-3000:]}")
        env = dict(ln.split("=", 1) for ln in out.stdout.splitlines() if "=" in ln)
        formed = time.monotonic() - t0
        hook_broker = self.broker(f"{name}-hook")
        password = urlsplit(env["MDM_AMQP_URL"].split(",")[0]).password or ""
        nowhere = f"amqp://{AMQP_USER}:{password}@127.0.0.1:{services.free_port()}"
        srv = self.proc(f"{name}-hook", [PY, "-m", "mdm_server", "serve"], services.server_env(
            self.db_url, hook_broker.url, MDM_BROKER_HOOK_ADDR=hook, MDM_AMQP_URL=nowhere))
        srv.wait_log("broker hook listening", timeout=60)
        log(f"{name}: {nodes} RabbitMQ node(s) formed in {formed:.0f} s; hook at {hook}")
        return RabbitCluster(d, env, hook_broker, srv, formed)

    def amqp_ingest(self, name: str, cl: RabbitCluster, index: int = 0,
                    urls: str | None = None, profile: Path | None = None) -> Proc:
        """``mdm-server ingest --index I`` reading the cluster's queue (``urls``: its
        MDM_AMQP_URL, by default the cluster's, node 1 first), under cProfile if
        ``profile``."""
        env = services.server_env(self.db_url, cl.hook_broker.url,
                                  MDM_AMQP_URL=urls or cl.env["MDM_AMQP_URL"])
        cmd = [PY] + (["-m", "cProfile", "-o", str(profile)] if profile else [])
        return self.proc(name, [*cmd, "-m", "mdm_server", "ingest", "--index", str(index)],
                         env)

    def fill_amqp_backlog(self, name: str, cl: RabbitCluster, node: int = 1) -> dict[str, Any]:
        """The queue declared and bound (an ingest started until subscribed, then
        stopped), then the backlog of ``--messages`` published by the simulator's
        enrolled devices through node ``node``'s MQTT listener with their own
        credentials (QoS 1: PUBACKed once the queue has it)."""
        prime = self.amqp_ingest(f"{name}-prime", cl)
        prime.wait_log("ingest subscribed", timeout=60)
        prime.stop()
        # Nothing left from an earlier drain (the management API's figures lag up to
        # 5 s: wait for them rather than trust the first answer).
        deadline = time.monotonic() + 15
        while (left := cl.queue().get("messages", 0)) and time.monotonic() < deadline:
            time.sleep(0.5)
        if left:
            raise BenchError(f"{name}: {left} messages in the queue before the backlog")
        log(f"{name}: queue {AMQP_QUEUE} declared; publishing {self.args.messages:,} "
            f"messages through node {node}'s MQTT listener")
        return self.simulate(name, cl.hook_broker, count=self.args.messages,
                             device_url=cl.env[f"MDM_CLUSTER_MQTT_{node}"])

    def phase_amqp_drain(self, name: str, cl: RabbitCluster, consumers: int,
                         profile: Path | None = None) -> dict[str, Any]:
        """phase_drain from the cluster's quorum queue: the backlog queued, then
        ``consumers`` ingest processes started together and timed from the first's
        start until ``count(*) = messages``."""
        n = self.args.messages
        self.note_load(name)
        self.reset_tables()
        sim = self.fill_amqp_backlog(name, cl)
        log(f"{name}: published at {sim['rate_msgs_per_s']:,.0f} msg/s; starting "
            f"{consumers} ingest process(es)")
        procs = [self.amqp_ingest(f"{name}-{i}", cl, i, profile=profile)
                 for i in range(consumers)]
        t0 = procs[0].started_at
        mons = [Monitor(p.pid) for p in procs]
        t1 = self.wait_count(n, procs[0], timeout=600)
        for m in mons:
            m.stop()
        rcs = [p.stop() for p in procs]
        wall = t1 - t0
        count, span, commits = self.commit_span()
        assert self.db is not None
        cpu = sum(m.cpu_s for m in mons)
        res = {
            "messages": n, "consumers": consumers, "stored": count,
            "distinct": int(self.db.val(
                "SELECT count(DISTINCT (device_id, record_id)) FROM telemetry")),
            "dead_letters": self.db.dead_letters(), "commits": commits,
            "wall_s": wall, "rate_wall": n / wall, "span_s": span,
            "rate_commits": n / span if span else float("nan"),
            "cpu_s": cpu, "cpu_us_per_record": cpu / n * 1e6,
            "peak_rss_mb": sum(m.peak_rss for m in mons) / 2**20,
            "publish_rate": sim["rate_msgs_per_s"], "exit_code": rcs, "load": load_line(),
        }
        if count != n or res["distinct"] != n:
            raise BenchError(f"{name}: stored {count}, distinct {res['distinct']} of {n}")
        log(f"{name}: {res['rate_wall']:,.0f} rec/s from start, {res['rate_commits']:,.0f} "
            f"first->last commit, {res['cpu_us_per_record']:.1f} µs CPU/record")
        return res

    def phase_amqp(self) -> dict[str, Any]:
        """Mosquitto and AMQP drains (one and two ingest processes on one node),
        alternating mosquitto amqp1 amqp2 | amqp2 amqp1 mosquitto (--amqp-runs rounds)."""
        cl = self.rabbit("amqp", 1)
        runs: dict[str, list[dict[str, Any]]] = {"mosquitto": [], "amqp1": [], "amqp2": []}
        for r in range(self.args.amqp_runs):
            order = ["mosquitto", "amqp1", "amqp2"]
            for which in order if r % 2 == 0 else order[::-1]:
                name = f"amqp-{which}-{r + 1}"
                runs[which].append(self.phase_drain(name) if which == "mosquitto" else
                                   self.phase_amqp_drain(name, cl, int(which[-1])))
        out: dict[str, Any] = {"formed_s": cl.formed_s, **runs}
        if self.args.profile:  # one AMQP drain under cProfile (--profile does Mosquitto's)
            prof = self.tmp / "ingest-amqp.prof"
            out["profile_drain"] = self.phase_amqp_drain("amqp-profile", cl, 1, profile=prof)
            if not prof.exists():
                raise BenchError("cProfile wrote no profile for the AMQP drain")
            keep = REPO / "var" / "bench-ingest-amqp.prof"
            keep.parent.mkdir(exist_ok=True)
            shutil.copy(prof, keep)
            self.results["profile_amqp"] = summarise_profile(prof, self.args.messages)
            log(f"AMQP profile kept in {keep}")
        return out

    def phase_failover(self, name: str, via_leader: bool) -> dict[str, Any]:
        """A 3-node cluster; the backlog queued; one ingest process draining it
        (connected to the queue leader's node if ``via_leader``, else to a follower's),
        the leader's node SIGKILLed (its whole process group) once 30% is stored.
        Measures the time to a new leader (the management API's ``leader``, polled on
        a surviving node every 50 ms) and until the ingest stores again: commits are
        the rows' distinct received_at; the longest pause between commits after the
        kill (counted from the kill) and when it ended. Checks every record stored
        once and the queue left empty."""
        n = self.args.messages
        self.reset_tables()
        cl = self.rabbit(name, 3)
        self.note_load(name)
        sim = self.fill_amqp_backlog(name, cl)
        leader = cl.queue()["leader"]
        lead = int(leader.split("@")[0].rsplit("c", 1)[1])
        others = [i for i in (1, 2, 3) if i != lead]
        urls = cl.env["MDM_AMQP_URL"].split(",")
        order = [lead, *others] if via_leader else [others[0], lead, others[1]]
        ing = self.amqp_ingest(name, cl, urls=",".join(urls[i - 1] for i in order))
        mon = Monitor(ing.pid)
        self.wait_count(int(n * 0.3), ing, timeout=300)
        before = int(self.db.val("SELECT count(*) FROM telemetry")) if self.db else 0
        t_kill = time.time()
        cl.kill_node(lead)
        log(f"{name}: node {lead} (leader {leader}) SIGKILLed at {before:,} stored; "
            f"ingest on node {order[0]}")
        new_leader, t_leader, last = None, None, ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                got = cl.queue(node=others[0], timeout=1.0).get("leader")
                last = repr(got)
                if got and got != leader:
                    new_leader, t_leader = got, time.time()
                    break
            except Exception as exc:  # the node busy electing: ask again
                last = repr(exc)
            time.sleep(0.05)
        if t_leader is None:
            raise BenchError(f"{name}: no new leader within 120 s (last answer {last})")
        log(f"{name}: new leader {new_leader} after {t_leader - t_kill:.2f} s")
        self.wait_count(n, ing, timeout=300)
        mon.stop()
        assert self.db is not None
        times = [float(r[0]) for r in self.db.rows(
            "SELECT DISTINCT extract(epoch FROM received_at) FROM telemetry ORDER BY 1")]
        stored = int(self.db.val("SELECT count(*) FROM telemetry"))
        distinct = int(self.db.val(
            "SELECT count(DISTINCT (device_id, record_id)) FROM telemetry"))
        # Still running: the queue must empty (every delivery acknowledged); the
        # management API's figures lag up to 5 s.
        q: dict[str, Any] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                q = cl.queue(node=others[0], timeout=2.0)
                if q.get("messages") == 0 and q.get("messages_unacknowledged") == 0:
                    break
            time.sleep(0.5)
        rc = ing.stop()
        # Pauses between commits that end after the kill, counted from the kill at
        # the earliest: the longest is the stall the failover caused (if any).
        pauses = [(b - max(a, t_kill), b) for a, b in itertools.pairwise(times) if b > t_kill]
        gap, t_resume = max(pauses) if pauses else (float("nan"), float("nan"))
        first = min((t for t in times if t > t_kill), default=float("nan"))
        stats = q.get("message_stats") or {}
        res = {
            "messages": n, "stored": stored, "distinct": distinct,
            "dead_letters": self.db.dead_letters(), "stored_at_kill": before,
            "leader": leader, "new_leader": new_leader, "via_leader": via_leader,
            "ingest_node": order[0], "killed_node": lead,
            "to_leader_s": t_leader - t_kill, "to_store_s": t_resume - t_kill,
            "first_commit_s": first - t_kill, "longest_pause_s": gap,
            "queue_ready": q.get("messages"),
            "queue_unacked": q.get("messages_unacknowledged"),
            "redelivered": stats.get("redeliver"), "reconnects":
                ing_log_count(self.tmp / f"{name}.log", "ingest subscribed") - 1,
            "cpu_us_per_record": mon.cpu_s / n * 1e6, "publish_rate": sim["rate_msgs_per_s"],
            "formed_s": cl.formed_s, "exit_code": rc, "load": load_line(),
        }
        log(f"{name}: new leader after {res['to_leader_s']:.2f} s; first commit "
            f"{res['first_commit_s']:.2f} s after the kill, longest pause {gap:.2f} s, "
            f"ending {res['to_store_s']:.2f} s after it; stored {stored:,}, "
            f"distinct {distinct:,} of {n:,}; queue ready {res['queue_ready']}, unacked "
            f"{res['queue_unacked']}, redelivered {res['redelivered']}")
        if stored != n or distinct != n:
            raise BenchError(f"{name}: stored {stored}, distinct {distinct} of {n}")
        return res

    def phase_tls(self) -> dict[str, Any]:
        """Drains with the ingest over TLS and in plain text, alternating plain tls tls
        plain (--tls-runs each), each on a fresh broker."""
        runs: dict[str, list[dict[str, Any]]] = {"plain": [], "tls": []}
        order = (["plain", "tls", "tls", "plain"] * self.args.tls_runs)[: 2 * self.args.tls_runs]
        for i, which in enumerate(order):
            runs[which].append(self.phase_drain(f"tls-{which}{i // 2 + 1}",
                                                tls=which == "tls"))
        return runs

    def phase_c_ref(self) -> dict[str, Any]:
        n = self.args.messages
        self.note_load("c-ref")
        broker = self.broker("c-ref")
        base = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-c",
                "-i", "ref-c", "-t", f"$share/ref/{FILTER}"]
        # Logged in as the server's user, from mosquitto_sub's options file rather
        # than the command line (which every local user can read).
        xdg = self.tmp / "xdg-c-ref"
        xdg.mkdir(mode=0o700, exist_ok=True)
        opts = xdg / "mosquitto_sub"
        opts.write_text(f"-u {services.SERVER_USER}\n-P {broker.password}\n")
        opts.chmod(0o600)
        env = {**os.environ, "XDG_CONFIG_HOME": str(xdg)}
        subprocess.run([*base, "-E"], check=True, timeout=30, env=env)
        sim = self.simulate("c-ref", broker, count=n, enroll=False)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        subprocess.run([*base, "-C", str(n)], check=True, timeout=600,
                       stdout=subprocess.DEVNULL, env=env)
        wall = time.monotonic() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        res = {"messages": n, "wall_s": wall, "rate_wall": n / wall, "cpu_s": cpu,
               "cpu_us_per_record": cpu / n * 1e6, "publish_rate": sim["rate_msgs_per_s"]}
        log(f"c-ref: {res['rate_wall']:,.0f} msg/s")
        return res

    def phase_naive(self) -> dict[str, Any]:
        n = self.args.naive_messages
        self.note_load("naive")
        self.reset_tables()
        broker = self.broker("naive")
        base = [PY, "-m", "load_tests.naive_consumer", "--database-url", self.db_url]
        env = {**os.environ, "MDM_MQTT_URL": broker.url}  # the server's MQTT user
        prime = self.proc("naive-prime", [*base, "--prime"], env)
        assert prime.proc is not None
        if prime.proc.wait(timeout=30) != 0:
            raise BenchError("naive consumer could not subscribe:\n" + prime.log_text())
        sim = self.simulate("naive", broker, count=n, enroll=False)
        cons = self.proc("naive", [*base, "--count", str(n)], env)
        t0 = cons.started_at
        mon = Monitor(cons.pid)
        t1 = self.wait_count(n, cons, timeout=600)
        mon.stop()
        cons.stop()
        wall = t1 - t0
        count, span, _commits = self.commit_span()
        res = {"messages": n, "stored": count, "wall_s": wall, "rate_wall": n / wall,
               "span_s": span, "rate_commits": n / span if span else float("nan"),
               "cpu_s": mon.cpu_s, "cpu_us_per_record": mon.cpu_s / n * 1e6,
               "publish_rate": sim["rate_msgs_per_s"]}
        log(f"naive: {res['rate_wall']:,.0f} rec/s from start")
        return res

    def phase_live(self, name: str, kinds: str) -> dict[str, Any]:
        self.note_load(name)
        self.reset_tables()
        broker = self.broker(name)
        ing = self.ingest(name, broker)
        ing.wait_log("ingest subscribed")
        mon = Monitor(ing.pid)
        log(f"{name}: {self.args.live_rate:,} records/s for {self.args.live_seconds} s ({kinds})")
        sim = self.simulate(name, broker, rate=self.args.live_rate,
                            duration=self.args.live_seconds, kinds=kinds)
        self.wait_count(sim["unique_records"], ing, timeout=120)
        mon.stop()
        ing.stop()
        assert self.db is not None
        r = self.db.row("""
            WITH l AS (SELECT extract(epoch FROM received_at - ts) AS lat FROM telemetry)
            SELECT count(*) AS n,
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY lat) AS p50,
                   percentile_cont(0.99) WITHIN GROUP (ORDER BY lat) AS p99,
                   max(lat) AS max, min(lat) AS min FROM l""")
        span = self.db.row("""
            SELECT extract(epoch FROM max(ts) - min(ts)) AS pub,
                   extract(epoch FROM max(received_at) - min(received_at)) AS com
            FROM telemetry""")
        n = int(r["n"])
        res = {"records": n, "sim_records": sim["unique_records"],
               "p50_s": float(r["p50"]), "p99_s": float(r["p99"]), "max_s": float(r["max"]),
               "min_s": float(r["min"]),
               "rate_published": n / float(span["pub"]), "rate_committed": n / float(span["com"]),
               "sim_rate": sim["rate_records_per_s"], "peak_rss_mb": mon.peak_rss / 2**20,
               "cpu_s": mon.cpu_s, "cpu_us_per_record": mon.cpu_s / n * 1e6, "kinds": kinds,
               "load": load_line()}
        log(f"{name}: p50 {res['p50_s'] * 1000:.0f} ms, p99 {res['p99_s'] * 1000:.0f} ms, "
            f"max {res['max_s'] * 1000:.0f} ms, {res['rate_published']:,.0f} rec/s, "
            f"peak RSS {res['peak_rss_mb']:.0f} MB")
        return res


# --- profile summary ---------------------------------------------------------------------

_CATEGORIES = [
    ("privacy_filters (policy filter)", ("privacy_filters/",)),
    ("shapely / numpy (Python side)", ("shapely/", "numpy/")),
    ("paho (MQTT parsing, acks)", ("paho/mqtt",)),
    ("agent_protocol (decode, validation)", ("agent_protocol/",)),
    ("asyncpg (COPY, queries)", ("asyncpg/",)),
    ("our AMQP reader (frames, deliveries)", ("mdm_server/ingest/amqp.py",)),
    ("aiormq / pamqp (AMQP set-up frames; the old reader)", ("aiormq/", "pamqp/")),
    ("aio_pika", ("aio_pika/",)),
    ("asyncio event loop", ("asyncio/", "selectors.py")),
    ("mdm_server (batching, glue)", ("mdm_server/",)),
]


def _where(func: tuple[str, int, str]) -> str:
    file, line, name = func
    if file == "~":
        return name
    parts = Path(file).parts
    for anchor in ("paho", "asyncpg", "aiormq", "pamqp", "aio_pika", "agent_protocol",
                   "mdm_server", "asyncio"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor):]) + f":{line}({name})"
    return f"{Path(file).name}:{line}({name})"


def _category(func: tuple[str, int, str]) -> str:
    file, _, name = func
    if file == "~":
        if "shapely" in name or "numpy" in name:
            return "shapely / numpy (C)"
        if "orjson" in name or "loads" in name:
            return "orjson (C; JSON parse/encode)"
        if "select" in name or "poll" in name:
            return "event loop wait (epoll)"
        if "socket" in name or "recv" in name or "send" in name:
            return "socket I/O (C)"
        return "other built-ins"
    for label, needles in _CATEGORIES:
        if any(nd in file for nd in needles):
            return label
    return "other Python"


def summarise_profile(path: Path, records: int, top: int = 15) -> dict[str, Any]:
    st = pstats.Stats(str(path), stream=io.StringIO())
    raw: dict[Any, Any] = st.stats  # type: ignore[attr-defined]
    total = float(st.total_tt)  # type: ignore[attr-defined]
    rows = []
    cats: dict[str, float] = {}
    for func, (_cc, nc, tt, ct, _callers) in raw.items():
        rows.append((tt, ct, nc, _where(func)))
        cats[_category(func)] = cats.get(_category(func), 0.0) + tt
    rows.sort(reverse=True)
    inclusive = {}
    wanted = {
        "MqttConsumer._readable": ("mdm_server/ingest/mqtt.py", "_readable"),
        "_BufferedClient._packet_read (fast path)": ("mdm_server/ingest/mqtt.py",
                                                     "_packet_read"),
        "MqttConsumer._fast_publish": ("mdm_server/ingest/mqtt.py", "_fast_publish"),
        "MqttConsumer.ack": ("mdm_server/ingest/mqtt.py", "ack"),
        "FrameParser._parse (AMQP deliveries)": ("mdm_server/ingest/amqp.py", "_parse"),
        "AmqpConsumer._deliver": ("mdm_server/ingest/amqp.py", "_deliver"),
        "DecodedBatch.decode": ("mdm_server/ingest/batch.py", "decode"),
        "decode_records": ("agent_protocol/envelope.py", "decode_records"),
        "batch.admit (enrolled devices)": ("mdm_server/ingest/batch.py", "admit"),
        "IngestWorker._shape (check-outs, apply)": ("mdm_server/ingest/worker.py", "_shape"),
        "shaping.plan": ("mdm_server/ingest/shaping.py", "plan"),
        "shaping.apply": ("mdm_server/ingest/shaping.py", "apply"),
        "CompiledPolicy.filter_batch": ("privacy_filters/compile.py", "filter_batch"),
        "checkout_history (query)": ("mdm_server/storage/checkouts.py", "checkout_history"),
        "PolicyEngine.load (incl. compile)": ("mdm_server/policy/engine.py", "load"),
        "TelemetrySink._write_once": ("mdm_server/ingest/sink.py", "_write_once"),
        "copy_records_to_table": ("asyncpg/connection.py", "copy_records_to_table"),
        "paho Client._packet_read": ("paho/mqtt/client.py", "_packet_read"),
        "paho Client._handle_publish": ("paho/mqtt/client.py", "_handle_publish"),
        "paho Client.ack": ("paho/mqtt/client.py", "ack"),
    }
    for label, (file, name) in wanted.items():
        for func, (_cc, nc, _tt, ct, _callers) in raw.items():
            if func[0].endswith(file) and func[2] == name:
                inclusive[label] = (ct, nc)
    return {
        "total_s": total,
        "us_per_record": total / records * 1e6 if records else 0.0,
        "top": rows[:top],
        "categories": sorted(cats.items(), key=lambda kv: -kv[1]),
        "inclusive": inclusive,
    }


# --- report ------------------------------------------------------------------------------


def _pf(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    import asyncpg as _a
    import paho.mqtt as _p

    out["python"] = sys.version.split()[0]
    out["paho-mqtt"] = str(getattr(_p, "__version__", "?"))
    out["asyncpg"] = str(_a.__version__)
    with contextlib.suppress(Exception):
        out["mosquitto"] = subprocess.run(
            ["mosquitto", "-h"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[0].replace("mosquitto version ", "")
    with contextlib.suppress(Exception):
        out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                    capture_output=True, text=True, check=True).stdout.strip()
    with contextlib.suppress(Exception):
        status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout
        others = [ln[3:] for ln in status.splitlines() if not ln[3:].startswith("load_tests/")]
        out["dirty"] = ", ".join(others)
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def render_baseline(b: Bench, add: Any) -> list[str]:
    """The section of --baseline: this tree's drain rate against REF's; the verdict."""
    base = b.results.get("baseline")
    if not base:
        return []
    add(f"### Against commit {base['commit']} ({base['ref']}), in this run")
    add("")
    add(f"The drain above, repeated with the code of {base['commit']} (a git worktree: its "
        "own migrated database, its own simulator enrolling the devices and publishing "
        "the backlog, its own ingest) and with this tree's, alternating "
        f"{base['commit']} · this · this · {base['commit']}, each on a fresh broker.")
    add("")
    add("| Drain | rec/s from start | rec/s first→last commit | CPU µs/rec | peak RSS |")
    add("|---|---:|---:|---:|---:|")
    for which, label in (("base", base["commit"]), ("this", "this tree")):
        for i, d in enumerate(base[which], 1):
            add(f"| {label} #{i} | {d['rate_wall']:,.0f} | {d['rate_commits']:,.0f} | "
                f"{d['cpu_us_per_record']:.1f} | {d['peak_rss_mb']:.0f} MB |")
    add("")
    mean = {k: _mean([d["rate_wall"] for d in base[k]]) for k in ("base", "this")}
    best = {k: max(d["rate_wall"] for d in base[k]) for k in ("base", "this")}
    cpu = {k: _mean([d["cpu_us_per_record"] for d in base[k]]) for k in ("base", "this")}
    ratio = mean["this"] / mean["base"]
    ok = ratio >= TARGET_VS_BASELINE
    add(f"- Mean from start: {base['commit']} {mean['base']:,.0f} rec/s, this tree "
        f"{mean['this']:,.0f} rec/s: **this/{base['commit']} = {ratio:.2f}** (target ≥ "
        f"{TARGET_VS_BASELINE}: **{_pf(ok)}**); best runs {best['this'] / best['base']:.2f}; "
        f"CPU per record {cpu['base']:.1f} → {cpu['this']:.1f} µs "
        f"({cpu['this'] - cpu['base']:+.1f}).")
    add("")
    return [f"vs {base['commit']} {_pf(ok)}"]


def render_owntracks(b: Bench, add: Any) -> list[str]:
    ot = b.results.get("owntracks")
    if not ot:
        return []
    mean = {k: _mean([r["rate_wall"] for r in ot[k]])
            for k in ("native", "owntracks", "encrypted")}
    cpu = {k: _mean([r["cpu_us_per_record"] for r in ot[k]])
           for k in ("native", "owntracks", "encrypted")}
    ratio = mean["owntracks"] / mean["native"]
    add(f"### OwnTracks beside native ({b.args.messages:,} messages a drain, same run)")
    add("")
    add("Drains alternating native, OwnTracks, OwnTracks, native "
        f"(--owntracks-runs {b.args.owntracks_runs}), then one of encrypted OwnTracks "
        "payloads (libsodium secretbox, opened with the device's sealed passphrase). "
        "Each message one location record; 20 devices.")
    add("")
    add("| drain | runs (rec/s from start) | mean rec/s | CPU µs/record | dead letters |")
    add("|---|---|---:|---:|---:|")
    for k in ("native", "owntracks", "encrypted"):
        rates = ", ".join(f"{r['rate_wall']:,.0f}" for r in ot[k])
        dead = sum(r["dead_letters"] for r in ot[k])
        add(f"| {k} | {rates} | {mean[k]:,.0f} | {cpu[k]:.1f} | {dead} |")
    add("")
    add(f"**OwnTracks/native = {ratio:.2f}**; encrypted/native = "
        f"{mean['encrypted'] / mean['native']:.2f}.")
    add("")
    return [f"OwnTracks/native {ratio:.2f}"]


def render_amqp(b: Bench, add: Any) -> list[str]:
    """The section of --amqp: AMQP drains beside Mosquitto's, and the failovers."""
    am, fo = b.results.get("amqp"), b.results.get("failover")
    out: list[str] = []
    if am:
        n = b.args.messages
        add(f"### The drain from RabbitMQ over AMQP beside Mosquitto's ({n:,} messages, "
            "same run)")
        add("")
        add("Drains alternating Mosquitto · AMQP 1 consumer · AMQP 2 consumers, then the "
            f"reverse ({b.args.amqp_runs} round(s)). Mosquitto: `phase_drain` as above. AMQP: "
            f"a one-node private cluster (scripts/cluster, RabbitMQ 3.10; formed in "
            f"{am['formed_s']:.0f} s) whose auth asks a `serve`'s broker hook (that `serve` "
            "consumes nothing); the same backlog (the simulator's 20 enrolled devices, "
            "single-record `location` messages, QoS 1, their own credentials) published "
            "through the node's MQTT listener into the quorum queue `mdm-ingest`, then "
            "`mdm-server ingest` started (two processes, `--index 0` and `1`, competing "
            "consumers on the one node, for 2) and timed from the first's start until "
            "every record is stored. CPU: user+sys of the ingest process(es), summed.")
        add("")
        add("| drain | runs (rec/s from start) | mean rec/s | first→last commit | "
            "CPU µs/record | publish msg/s |")
        add("|---|---|---:|---:|---:|---:|")
        mean = {}
        for k, label in (("mosquitto", "Mosquitto, 1 ingest"), ("amqp1", "AMQP, 1 ingest"),
                         ("amqp2", "AMQP, 2 ingests")):
            rs = am[k]
            mean[k] = _mean([r["rate_wall"] for r in rs])
            rates = ", ".join(f"{r['rate_wall']:,.0f}" for r in rs)
            add(f"| {label} | {rates} | "
                f"{mean[k]:,.0f} | {_mean([r['rate_commits'] for r in rs]):,.0f} | "
                f"{_mean([r['cpu_us_per_record'] for r in rs]):.1f} | "
                f"{_mean([r['publish_rate'] for r in rs]):,.0f} |")
        add("")
        r1, r2 = mean["amqp1"] / mean["mosquitto"], mean["amqp2"] / mean["mosquitto"]
        add(f"**AMQP/Mosquitto = {r1:.2f} (one consumer), {r2:.2f} (two)**; two/one "
            f"consumers = {mean['amqp2'] / mean['amqp1']:.2f}. Load average at each drain: "
            + "; ".join(f"{k} {r['load']}" for k in ("mosquitto", "amqp1", "amqp2")
                        for r in am[k]) + ".")
        add("")
        out.append(f"AMQP/Mosquitto {r1:.2f} (1), {r2:.2f} (2)")
    if fo:
        add("### Failover: the quorum leader's node SIGKILLed during a drain")
        add("")
        add("A fresh 3-node cluster each; the backlog queued through node 1; one "
            "`mdm-server ingest` draining it (its `MDM_AMQP_URL` lists the three nodes, "
            "the one named first is where it connects); once 30% is stored the "
            "leader's node is killed with SIGKILL (its whole process group). New leader: "
            "the management API's `leader` of `mdm-ingest`, polled on a surviving node "
            "every 50 ms. Storing: commits are the rows' distinct `received_at`; the "
            "longest pause between commits after the kill (counted from the kill) and "
            "when it ended (the ingest storing again); the first commit after the kill "
            "may be of messages it held already.")
        add("")
        add("| ingest connected to | new leader after | first commit after | longest "
            "pause | storing again after | stored / distinct of sent | queue ready / "
            "unacked after | redelivered | ingest connections |")
        add("|---|---:|---:|---:|---:|---|---|---:|---:|")
        for r in fo:
            where = "the leader's node" if r["via_leader"] else "a follower's node"
            add(f"| {where} | {r['to_leader_s']:.2f} s | {r['first_commit_s']:.2f} s | "
                f"{r['longest_pause_s']:.2f} s | {r['to_store_s']:.2f} s | "
                f"{r['stored']:,} / {r['distinct']:,} of "
                f"{r['messages']:,} | {r['queue_ready']} / {r['queue_unacked']} | "
                f"{r['redelivered']} | {r['reconnects'] + 1} |")
        add("")
        lost = sum(r["messages"] - r["distinct"] for r in fo)
        doubled = sum(r["stored"] - r["distinct"] for r in fo)
        add(f"Lost {lost}, stored twice {doubled}. Load average: "
            + "; ".join(r["load"] for r in fo) + ".")
        add("")
        out.append(f"failover lost {lost} doubled {doubled}")
    return out


def render_tls(b: Bench, add: Any) -> list[str]:
    """The section of --tls: the drain with the ingest over TLS against plain text."""
    runs = b.results.get("tls")
    if not runs:
        return []
    add("### The drain over TLS against plain text, in this run")
    add("")
    add("The drain above, with the ingest connected to the broker's TLS listener "
        "(`mqtts://`, TLS 1.2+ as negotiated, the broker's private CA as "
        "`MDM_MQTT_CA_FILE`) and in plain text to its loopback listener, alternating "
        "plain · TLS · TLS · plain, each on a fresh broker. Everything else is the same: "
        "the backlog is published by the simulator's devices over TLS in both, the "
        "timed part is the ingest alone, from process start (which includes the TLS "
        "handshake) to the last row.")
    add("")
    add("| Drain | rec/s from start | rec/s first→last commit | CPU µs/rec | peak RSS |")
    add("|---|---:|---:|---:|---:|")
    for which, label in (("plain", "plain"), ("tls", "TLS")):
        for i, d in enumerate(runs[which], 1):
            add(f"| {label} #{i} | {d['rate_wall']:,.0f} | {d['rate_commits']:,.0f} | "
                f"{d['cpu_us_per_record']:.1f} | {d['peak_rss_mb']:.0f} MB |")
    add("")
    mean = {k: _mean([d["rate_wall"] for d in runs[k]]) for k in ("plain", "tls")}
    commits = {k: _mean([d["rate_commits"] for d in runs[k]]) for k in ("plain", "tls")}
    best = {k: max(d["rate_wall"] for d in runs[k]) for k in ("plain", "tls")}
    cpu = {k: _mean([d["cpu_us_per_record"] for d in runs[k]]) for k in ("plain", "tls")}
    ratio = mean["tls"] / mean["plain"]
    add(f"- Mean from start: plain {mean['plain']:,.0f} rec/s, TLS {mean['tls']:,.0f} "
        f"rec/s: **TLS/plain = {ratio:.2f}**; best runs {best['tls'] / best['plain']:.2f}; "
        f"first→last commit {commits['tls'] / commits['plain']:.2f}. CPU per record "
        f"{cpu['plain']:.1f} → {cpu['tls']:.1f} µs ({cpu['tls'] - cpu['plain']:+.1f}: "
        "TLS in the ingest process: decryption, a `recv` per record).")
    add("")
    return [f"TLS/plain {ratio:.2f}"]


def render_watchers(b: Bench, add: Any) -> list[str]:
    """The section of --live-watchers: the drain with N live watchers against none."""
    w = b.results.get("watchers")
    if not w:
        return []
    n = w["watchers"]
    add(f"### The drain with {n} live watchers against none, in this run")
    add("")
    add(f"The drain above, with {n} Server-Sent Event streams of `GET /api/v1/live` (the "
        "whole tenant, an admin token) held open against a running `serve` "
        "(load_tests/live_watchers.py, one process) and with none, alternating "
        "none · N · N · none, each on a fresh broker. `serve` runs on the same database "
        "with its own idle broker: the bench's ingest process drains, and `serve` LISTENs "
        "to its NOTIFY per committed batch, reads each batch's rows back, opens them and "
        f"sends every point to each of the {n} streams. Every watcher is checked to have "
        "received every point.")
    add("")
    add("| Drain | watchers | rec/s from start | rec/s first→last commit | ingest CPU µs/rec "
        "| serve CPU s | points per watcher |")
    add("|---|---:|---:|---:|---:|---:|---:|")
    for i, d in enumerate(w["runs"], 1):
        pts = f"{d['points_min']:,}" if d["watchers"] else "-"
        add(f"| #{i} | {d['watchers']} | {d['rate_wall']:,.0f} | {d['rate_commits']:,.0f} | "
            f"{d['cpu_us_per_record']:.1f} | {d['serve_cpu_s']:.1f} | {pts} |")
    add("")
    ok = w["ratio"] >= TARGET_WATCHERS
    add(f"- Mean from start: none {w['without']:,.0f} rec/s, {n} watchers {w['with']:,.0f} "
        f"rec/s: **with/without = {w['ratio']:.3f}** (target ≥ {TARGET_WATCHERS}: "
        f"**{_pf(ok)}**).")
    add("")
    return [f"live watchers {w['ratio']:.3f} {_pf(ok)}"]


def render_policy(b: Bench, add: Any) -> list[str]:
    """The policy A/B section; returns the verdicts."""
    a, r = b.args, b.results
    verdicts: list[str] = []
    micro = r.get("micro")
    pairs = [(key, r[key]) for key in ("pair_location", "pair_mix") if r.get(key)]
    if not pairs and not micro:
        return verdicts
    add("### Policy cost: open default (A) against the strictest realistic policy (B)")
    add("")
    add(f"A = tenant `{TENANT}` under its `default` policy as created with the tenant "
        "(`{\"applies_to\": {}}`: collects every kind, keeps every field — \"no policy\"; "
        "the engine still runs and copies each record). "
        f"B = tenant `{STRICT_TENANT}` (same 20 device ids, its own enrollment) whose "
        f"`default` policy (version {r.get('strict_version', '?')}, set with `put_policy` "
        "before any ingest ran) is `load_tests/bench_policy.py`'s `strict_policy_doc()`: "
        "IMEI and phone number masked (keep_last 4); serial, Wi-Fi MAC, Bluetooth MAC, "
        "ICCID and IMSI hashed; user e-mail, user name, IP and Wi-Fi SSID dropped; "
        "locations snapped to 1 km, kept only inside 1,000 work-zone polygons (6-20 "
        "vertices, star-shaped so valid, about 1-4 km across, 125 around each of the "
        "simulator's 8 home cities), never inside 10 excluded zones, and only while "
        "checked out. Every drain, A and B alike: fresh broker, tables truncated, ingest "
        "primed, one `check_out` event per device with ts one minute before the backlog "
        "published and ingested by the primed ingest (not timed), then the backlog of "
        f"{a.messages:,} single-record messages published by the simulator (seed "
        f"{POLICY_SEED}: the same devices and walks in A and B, fresh record ids), then "
        "the ingest started and timed until stored + suppressed = backlog. Runs "
        "alternate A B B A; the rate is from process start (includes Python start-up "
        "and, for B, loading and compiling the policy with its 1,010 zones).")
    add("")
    for key, pair in pairs:
        label = "location only" if key == "pair_location" else \
            "realistic mix of kinds (simulator default weights)"
        add(f"**{label.capitalize()}** — each drain:")
        add("")
        add("| Drain | rec/s from start | rec/s first→last commit | CPU µs/rec | "
            "stored | suppressed | peak RSS |")
        add("|---|---:|---:|---:|---:|---:|---:|")
        for which in ("A", "B"):
            for i, d in enumerate(pair[which], 1):
                add(f"| {which}{i} | {d['rate_wall']:,.0f} | {d['rate_commits']:,.0f} | "
                    f"{d['cpu_us_per_record']:.1f} | {d['stored']:,} | {d['suppressed']:,} | "
                    f"{d['peak_rss_mb']:.0f} MB |")
        add("")
        best_a = max(d["rate_wall"] for d in pair["A"])
        best_b = max(d["rate_wall"] for d in pair["B"])
        mean_a = _mean([d["rate_wall"] for d in pair["A"]])
        mean_b = _mean([d["rate_wall"] for d in pair["B"]])
        ca = _mean([d["rate_commits"] for d in pair["A"]])
        cb = _mean([d["rate_commits"] for d in pair["B"]])
        cpu_a = _mean([d["cpu_us_per_record"] for d in pair["A"]])
        cpu_b = _mean([d["cpu_us_per_record"] for d in pair["B"]])
        ratio = best_b / best_a
        ok = ratio >= TARGET_POLICY_RATIO
        last_b = pair["B"][-1]
        by_kind = last_b.get("sim_by_kind") or {}
        add(f"- Best A {best_a:,.0f} rec/s, best B {best_b:,.0f} rec/s: **B/A = {ratio:.2f}** "
            f"(target ≥ {TARGET_POLICY_RATIO}: **{_pf(ok)}**). Means: A {mean_a:,.0f}, B "
            f"{mean_b:,.0f} (B/A {mean_b / mean_a:.2f}); first→last commit A {ca:,.0f}, "
            f"B {cb:,.0f} (B/A {cb / ca:.2f}).")
        add(f"- CPU per record (ingest process, user+sys, psutil; mean of the runs): A "
            f"{cpu_a:.1f} µs, B {cpu_b:.1f} µs, difference **{cpu_b - cpu_a:+.1f} µs** — "
            "the policy's cost inside the real pipeline (filter, check-out history query, "
            "suppressed-count upserts, policy load and compile).")
        loc = by_kind.get("location", a.messages if key == "pair_location" else 0)
        add(f"- B stored {last_b['stored']:,} records ({last_b['loc_stored']:,} locations, "
            f"check-out events of the set-up excluded) and suppressed "
            f"{last_b['suppressed']:,} of {loc:,} locations "
            f"({last_b['suppressed'] / loc * 100 if loc else 0:.1f}%); "
            f"dead letters {last_b['dead_letters']}."
            + (f" Simulated kinds: {', '.join(f'{k} {v:,}' for k, v in by_kind.items())}."
               if key == "pair_mix" else ""))
        add("")
        verdicts.append(f"policy B/A ({'location' if key == 'pair_location' else 'mix'}) "
                        f"{_pf(ok)}")
    if micro:
        loc, ident = micro["kinds"]["location"], micro["kinds"]["identity"]
        add(f"**The filter alone** (`CompiledPolicy.filter_batch`, batches of "
            f"{micro['records']:,} records from the simulator's generator, seed {POLICY_SEED}; "
            f"best of {micro['repeats']} runs of {micro['inner']} calls; check-out state from "
            "the ingest's `checked_out_view`):")
        add("")
        add("| Kind | strict policy µs/rec | open default µs/rec | filter cost µs/rec |")
        add("|---|---:|---:|---:|")
        add(f"| location | {loc['strict']:.2f} | {loc['open']:.2f} | "
            f"{loc['strict'] - loc['open']:.2f} |")
        add(f"| identity | {ident['strict']:.2f} | {ident['open']:.2f} | "
            f"{ident['strict'] - ident['open']:.2f} |")
        add("")
        add(f"Compiling the strict policy (parse excluded): {micro['compile_s'] * 1000:.0f} ms. "
            f"The zones keep {micro['zone_share_100k']:.1%} of 100,000 simulated points "
            f"({loc['kept_share']:.0%} of the first 1,000).")
        add("")
    return verdicts


def render_profile(add: Any, title: str, summary: dict[str, Any], records: int) -> None:
    add(f"### {title}")
    add("")
    add(f"Total profiled time {summary['total_s']:.2f} s = "
        f"{summary['us_per_record']:.1f} µs per record (cProfile inflates Python "
        "function calls; shares matter, not absolutes).")
    add("")
    add("Time by area (sum of tottime):")
    add("")
    add("| Area | s | share |")
    add("|---|---:|---:|")
    for label, t in summary["categories"]:
        add(f"| {label} | {t:.2f} | {t / summary['total_s'] * 100:.1f}% |")
    add("")
    add("Inclusive (cumtime) of the stages:")
    add("")
    add("| Stage | cumtime s | calls | µs/record |")
    add("|---|---:|---:|---:|")
    for label, (ct, nc) in summary["inclusive"].items():
        add(f"| {label} | {ct:.2f} | {nc:,} | {ct / records * 1e6:.1f} |")
    add("")
    add(f"Top {len(summary['top'])} functions by tottime:")
    add("")
    add("| tottime s | cumtime s | calls | function |")
    add("|---:|---:|---:|---|")
    for tt, ct, nc, where in summary["top"]:
        add(f"| {tt:.3f} | {ct:.3f} | {nc:,} | `{where}` |")
    add("")


def render(b: Bench, started: dt.datetime) -> tuple[str, str]:
    a, r = b.args, b.results
    lines: list[str] = []
    add = lines.append
    drain, cref, naive = r.get("drain"), r.get("c_ref"), r.get("naive")
    add(f"## {started:%Y-%m-%d %H:%M} UTC — ingest benchmark")
    add("")
    v = r.get("versions", {})
    dirty = f" (working tree also modified: {v['dirty']})" if v.get("dirty") else ""
    add(f"Commit {v.get('git', '?')}{dirty}; Python {v.get('python')}, "
        f"paho-mqtt {v.get('paho-mqtt')}, "
        f"asyncpg {v.get('asyncpg')}, Mosquitto {v.get('mosquitto')}; "
        f"{os.cpu_count()} cores, shared.")
    add("")
    add("Machine load (1/5/15-min load average) when each phase started: "
        + "; ".join(f"{p} {ld}" for p, ld in b.loads) + ".")
    add(f"Before the run: {r.get('top_before', '?')}.")
    add("")
    add(f"Parameters: drain backlog {a.messages:,} single-record `location` messages from "
        f"{DEVICES} devices (tenant `{TENANT}`), QoS 1, published by the simulator in its own "
        f"process while the consumer was stopped; naive consumer backlog "
        f"{a.naive_messages:,}; live {a.live_rate:,} records/s for {a.live_seconds} s. "
        "Ingest defaults (batch 5,000 / 100 ms, ack after commit, full validation). "
        "Policy in the drain, reference, live and profile phases: the tenant's `default` "
        "policy as created with the tenant (collect everything, keep every field — no "
        "filtering; the policy engine still shapes every record); the strict policy's "
        "cost is measured separately below. One private broker per phase "
        "(scripts/broker, project config); devices publish over its TLS listener, the "
        "ingest and the references read its plain listener on 127.0.0.1 (over TLS in the "
        "TLS drains). Ratios are within this run only.")
    add("")
    add("| Measure | Value | Notes |")
    add("|---|---:|---|")
    if drain:
        add(f"| ingest drain, from process start | {drain['rate_wall']:,.0f} rec/s | "
            f"{drain['messages']:,} in {drain['wall_s']:.2f} s |")
        add(f"| ingest drain, first→last commit | {drain['rate_commits']:,.0f} rec/s | "
            f"span {drain['span_s']:.2f} s, {drain['commits']} commits |")
        add(f"| ingest CPU per record | {drain['cpu_us_per_record']:.1f} µs | "
            f"{drain['cpu_s']:.2f} s CPU (user+sys, psutil) |")
        add(f"| ingest peak RSS during drain | {drain['peak_rss_mb']:.0f} MB | |")
        add(f"| backlog publish rate (simulator) | {drain['publish_rate']:,.0f} msg/s | |")
    if cref:
        add(f"| C subscriber (mosquitto_sub -q 1 -c) | {cref['rate_wall']:,.0f} msg/s | "
            f"{cref['messages']:,} in {cref['wall_s']:.2f} s, "
            f"{cref['cpu_us_per_record']:.1f} µs CPU/msg, no database |")
    if naive:
        add(f"| naive consumer (paho, 1 INSERT/msg) | {naive['rate_wall']:,.0f} rec/s | "
            f"{naive['messages']:,} in {naive['wall_s']:.2f} s from start; first→last "
            f"commit {naive['rate_commits']:,.0f}/s; {naive['cpu_us_per_record']:.1f} µs CPU/rec |")
    for key in ("live", "live_mix"):
        live = r.get(key)
        if live:
            add(f"| live ({live['kinds'] if key == 'live_mix' else 'location'}) publish→commit "
                f"p50 / p99 / max | {live['p50_s'] * 1000:.0f} / {live['p99_s'] * 1000:.0f} / "
                f"{live['max_s'] * 1000:.0f} ms | {live['records']:,} records, "
                f"{live['rate_published']:,.0f} rec/s achieved (simulator "
                f"{live['sim_rate']:,.0f}/s), peak RSS {live['peak_rss_mb']:.0f} MB, "
                f"{live['cpu_us_per_record']:.1f} µs CPU/rec |")
    prof = r.get("profile_drain")
    if prof:
        add(f"| drain under cProfile | {prof['rate_wall']:,.0f} rec/s | profiling overhead "
            "included |")
    prof_b = r.get("profile_drain_b")
    if prof_b:
        add(f"| drain under cProfile, strict policy B | {prof_b['rate_wall']:,.0f} rec/s | "
            f"profiling overhead included; {prof_b['suppressed']:,} suppressed |")
    add("")
    add("Targets:")
    add("")
    add("| Target | Measured | Result |")
    add("|---|---:|---|")
    verdicts: list[str] = []
    if drain:
        ok = drain["rate_wall"] >= TARGET_DRAIN
        add(f"| drain ≥ {TARGET_DRAIN:,.0f} rec/s, one process | {drain['rate_wall']:,.0f} "
            f"(first→last commit {drain['rate_commits']:,.0f}) | {_pf(ok)} |")
        verdicts.append(f"drain {_pf(ok)}")
    if drain and naive:
        ratio = drain["rate_wall"] / naive["rate_wall"]
        ok = ratio >= TARGET_VS_NAIVE
        add(f"| ≥ {TARGET_VS_NAIVE:.0f}x the naive consumer | {ratio:.1f}x | {_pf(ok)} |")
        verdicts.append(f"vs naive {_pf(ok)}")
    if drain and cref:
        ratio = drain["rate_wall"] / cref["rate_wall"]
        ok = ratio >= TARGET_VS_C
        add(f"| ≥ {TARGET_VS_C} of the C subscriber's rate | {ratio:.3f} | {_pf(ok)} |")
        verdicts.append(f"vs C {_pf(ok)}")
    live = r.get("live")
    if live:
        ok = live["p99_s"] < TARGET_P99_S
        add(f"| live p99 < {TARGET_P99_S} s at {a.live_rate:,}/s | "
            f"{live['p99_s'] * 1000:.0f} ms | {_pf(ok)} |")
        verdicts.append(f"live p99 {_pf(ok)}")
    add("")
    verdicts += render_baseline(b, add)
    verdicts += render_tls(b, add)
    verdicts += render_amqp(b, add)
    verdicts += render_watchers(b, add)
    verdicts += render_owntracks(b, add)
    verdicts += render_policy(b, add)
    for key, title in (("profile", "default policy"), ("profile_b", "strict policy B"),
                       ("profile_amqp", "from RabbitMQ over AMQP, default policy")):
        summary = r.get(key)
        if summary:
            render_profile(add, f"Profile (cProfile, one drain of {a.messages:,} messages, "
                           f"{title})", summary, a.messages)
    return "\n".join(lines) + "\n", ", ".join(verdicts)


HEADER = ("# Load test results\n\n"
          "Written by `python -m load_tests.bench_ingest`, newest first: each run inserts "
          "its dated section here, above the earlier ones (which describe earlier code). "
          "The machine is a shared 2-core box: compare ratios within one run, not "
          "absolute figures across runs.\n\n")


def write_results(section: str) -> None:
    """Insert ``section`` after the header, above the earlier runs."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    first = text.find("\n## ")
    rest = text[first + 1:] if first >= 0 else ""
    RESULTS.write_text(HEADER + section.rstrip("\n") + "\n\n" + rest)


# --- main --------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m load_tests.bench_ingest",
                                description="Ingest drain/live benchmark with references.")
    p.add_argument("--messages", type=int, default=100_000, help="drain backlog")
    p.add_argument("--naive-messages", type=int, default=20_000,
                   help="backlog for the naive consumer (a rate; default 20,000)")
    p.add_argument("--live-seconds", type=int, default=60)
    p.add_argument("--live-rate", type=int, default=10_000, help="records/s")
    p.add_argument("--live-mix", action="store_true",
                   help="also a live run with the realistic mix of kinds")
    p.add_argument("--skip-live", action="store_true")
    p.add_argument("--skip-drain", action="store_true", help="no plain drain")
    p.add_argument("--skip-refs", action="store_true", help="no C/naive references")
    p.add_argument("--profile", action="store_true", help="also a drain under cProfile")
    p.add_argument("--skip-policy", action="store_true",
                   help="no policy A/B drains and no filter micro-benchmark")
    p.add_argument("--policy-mix", action="store_true",
                   help="also an A/B pair with the realistic mix of kinds")
    p.add_argument("--pair-runs", type=int, default=2,
                   help="drains of each policy per pair, alternating A B B A (default 2)")
    p.add_argument("--micro-repeats", type=int, default=7,
                   help="runs of the filter micro-benchmark; the best counts")
    p.add_argument("--baseline", metavar="REF",
                   help="also drains with the code of git REF, alternating with this tree's")
    p.add_argument("--baseline-runs", type=int, default=2,
                   help="drains of each side, alternating REF this this REF (default 2)")
    p.add_argument("--tls", action="store_true",
                   help="also drains with the ingest over TLS and in plain text, alternating")
    p.add_argument("--tls-runs", type=int, default=2,
                   help="drains of each, alternating plain tls tls plain (default 2)")
    p.add_argument("--live-watchers", type=int, default=0, metavar="N",
                   help="also drains with N SSE watchers of GET /api/v1/live connected to "
                        "a running serve, against none, alternating")
    p.add_argument("--watcher-runs", type=int, default=2,
                   help="drains with and without the watchers, each (alternating)")
    p.add_argument("--owntracks", action="store_true",
                   help="also OwnTracks drains beside native ones, alternating, and one "
                        "of encrypted OwnTracks payloads: the ratio OwnTracks/native")
    p.add_argument("--owntracks-runs", type=int, default=2,
                   help="drains of each, alternating native ot ot native (default 2)")
    p.add_argument("--amqp", action="store_true",
                   help="also drains from a private RabbitMQ cluster's quorum queue over "
                        "AMQP (one and two ingest processes) beside Mosquitto's, "
                        "alternating, and the failover of the queue's leader")
    p.add_argument("--amqp-runs", type=int, default=2,
                   help="rounds of mosquitto amqp1 amqp2, every other one reversed (2)")
    p.add_argument("--failover", default="follower,leader",
                   help="with --amqp: failover runs, each on a fresh 3-node cluster, by "
                        "where the ingest connects: follower, leader (comma-separated; "
                        "'' for none)")
    p.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md")
    return p.parse_args(argv)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _top_before() -> str:
    try:
        out = subprocess.run(["top", "-bn1"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "top unavailable"
    cpu = next((ln.strip() for ln in out.splitlines() if "Cpu(s)" in ln), "?")
    return f"load {load_line()}, top: `{cpu}`"


async def _reconcile(db_url: str, mqtt_url: str) -> None:
    """Give a fresh broker every enrolled device's identity, as ``serve`` does."""
    import base64

    from mdm_server.broker.dynsec import Dynsec
    from mdm_server.broker.identity import reconcile
    from mdm_server.config import MqttSettings

    conn = await connect(db_url)
    try:
        async with Dynsec(MqttSettings.from_url(mqtt_url)) as dynsec:
            await reconcile(dynsec, conn, base64.b64decode(services.TEST_MASTER_KEY))
    finally:
        await conn.close()


async def _enroll_owntracks(db_url: str, devices: int) -> list[dict[str, Any]]:
    """``devices`` devices of TENANT enrolled for OwnTracks: their settings."""
    import base64

    from mdm_server.storage.devices import enroll_device

    conn = await connect(db_url)
    try:
        out = []
        for i in range(devices):
            e = await enroll_device(
                conn, tenant=TENANT, device=f"ot-{i:04d}", ownership="corporate",
                user_email=None, mqtt_url="mqtts://127.0.0.1:8883",
                master_key=base64.b64decode(services.TEST_MASTER_KEY), agent="owntracks",
                public_url="https://127.0.0.1:8080")
            out.append(e["owntracks"])
        return out
    finally:
        await conn.close()


async def _set_strict_policy(db_url: str) -> int:
    """The strict policy as STRICT_TENANT's ``default`` (validated first); its version."""
    body = bench_policy.strict_policy_doc()
    parse_policy(body, name="default")  # put_policy stores what it is given
    conn = await connect(db_url)
    try:
        pv = await put_policy(conn, STRICT_TENANT, "default", body, "bench")
    finally:
        await conn.close()
    return pv.version


def run(args: argparse.Namespace) -> int:
    started = dt.datetime.now(dt.UTC)
    # Enrollment (here and in the simulator's processes) creates the command-signing
    # key under the master key; the ingest gets the same one from server_env().
    os.environ["MDM_MASTER_KEY"] = services.TEST_MASTER_KEY
    with contextlib.ExitStack() as stack, _sigterm_as_interrupt():
        tmp = Path(tempfile.mkdtemp(prefix="mdm-bench-"))
        stack.callback(shutil.rmtree, tmp, True)
        b = Bench(args, tmp, stack)
        b.results["versions"] = versions()
        b.results["top_before"] = _top_before()
        log(f"work dir {tmp}; {b.results['top_before']}")
        b.db_url = asyncio.run(services.create_database("mdm_bench"))
        stack.callback(lambda: asyncio.run(services.drop_database(b.db_url)))
        b.db = Db(b.db_url)
        stack.callback(b.db.close)
        from load_tests.simulator import enroll_fleet

        asyncio.run(enroll_fleet(b.db_url, "mqtt://127.0.0.1:1883", TENANT, DEVICES))
        if not args.skip_policy:
            asyncio.run(enroll_fleet(b.db_url, "mqtt://127.0.0.1:1883", STRICT_TENANT, DEVICES))
            b.results["strict_version"] = asyncio.run(_set_strict_policy(b.db_url))

        try:
            phases(b, tmp)
        except BenchError:
            keep = REPO / "var" / "bench-ingest-logs"
            shutil.rmtree(keep, ignore_errors=True)
            keep.mkdir(parents=True)
            for f in tmp.glob("*.log"):
                shutil.copy(f, keep / f.name)
            log(f"logs kept in {keep}")
            raise
        section, verdicts = render(b, started)
        print(section)
        print(f"targets: {verdicts}")
        if not args.no_results:
            write_results(section)
            log(f"written to {RESULTS}")
    return 0


def phases(b: Bench, tmp: Path) -> None:
    args = b.args
    if not args.skip_policy:
        log("policy micro-benchmark (filter_batch, 1,000-record batches)")
        b.note_load("micro")
        b.results["micro"] = bench_policy.micro(records=1000, repeats=args.micro_repeats,
                                                seed=POLICY_SEED)
    if not args.skip_drain:
        b.results["drain"] = b.phase_drain("drain")
    if args.baseline:
        b.results["baseline"] = b.phase_baseline(args.baseline)
    if args.tls:
        b.results["tls"] = b.phase_tls()
    if args.amqp:
        if args.amqp_runs:
            b.results["amqp"] = b.phase_amqp()
        b.results["failover"] = [
            b.phase_failover(f"failover-{i + 1}", via_leader=where.strip() == "leader")
            for i, where in enumerate(w for w in args.failover.split(",") if w.strip())]
    if args.live_watchers:
        b.results["watchers"] = b.phase_watchers()
    if args.owntracks:
        b.results["owntracks"] = b.phase_owntracks()
    if not args.skip_policy:
        b.results["pair_location"] = b.phase_policy_pair("pair-loc", "location")
        if args.policy_mix:
            b.results["pair_mix"] = b.phase_policy_pair("pair-mix", MIX_KINDS)
    if not args.skip_refs:
        b.results["c_ref"] = b.phase_c_ref()
        b.results["naive"] = b.phase_naive()
    if not args.skip_live:
        b.results["live"] = b.phase_live("live", "location")
        if args.live_mix:
            b.results["live_mix"] = b.phase_live("live-mix", MIX_KINDS)
    if args.profile:
        prof_path = tmp / "ingest.prof"
        b.results["profile_drain"] = b.phase_drain("profile", profile=prof_path)
        if not prof_path.exists():
            raise BenchError("cProfile wrote no profile (did the ingest exit cleanly?)")
        keep = REPO / "var" / "bench-ingest.prof"
        keep.parent.mkdir(exist_ok=True)
        shutil.copy(prof_path, keep)
        b.results["profile"] = summarise_profile(prof_path, args.messages)
        log(f"profile kept in {keep}")
        if not args.skip_policy:
            prof_b = tmp / "ingest-strict.prof"
            b.results["profile_drain_b"] = b.phase_policy_drain(
                "profile-B", STRICT_TENANT, "location", profile=prof_b)
            if not prof_b.exists():
                raise BenchError("cProfile wrote no profile for the policy B drain")
            keep_b = REPO / "var" / "bench-ingest-strict.prof"
            shutil.copy(prof_b, keep_b)
            b.results["profile_b"] = summarise_profile(prof_b, args.messages)
            log(f"profile of the strict-policy drain kept in {keep_b}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if not shutil.which("mosquitto_sub"):
        print("bench: mosquitto_sub is not installed", file=sys.stderr)
        return 2
    try:
        return run(args)
    except KeyboardInterrupt:
        log("interrupted; cleaned up")
        return 130
    except BenchError as e:
        log(f"failed: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
