"""A PostgreSQL that fails over (Patroni + etcd, scripts/pgcluster): the server's
connections follow the leader through a multi-host URL with
target_session_attrs=read-write; the ingest retries through a failover without
losing or doubling a record; the API answers 503, not 500, while no leader exists.
docs/scaling.md, "A database that fails over"."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mqtt import DeviceStream
from tests.support.pgcluster import PgCluster, mdm_env, query_when_up, running_pgcluster
from tests.support.services import Broker, IngestProcess, Server, enroll

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COUNT = "SELECT count(*) FROM telemetry"
DISTINCT = "SELECT count(DISTINCT (device_id, record_id)) FROM telemetry"
N = 40_000
DEVICES = [f"dev-{i:02d}" for i in range(20)]


@pytest.fixture(scope="module")
def pgcluster() -> Iterator[PgCluster]:
    with running_pgcluster() as cluster:
        yield cluster


def _count(url: str, sql: str = COUNT) -> int:
    return int(asyncio.run(query_when_up(url, sql)))  # type: ignore[call-overload]


def _wait_count(url: str, expected: int, ingest: IngestProcess, *, idle: float) -> int:
    """Poll the count (through failovers) until it reaches ``expected`` or stops
    moving for ``idle`` seconds."""
    count, moved_at = -1, time.monotonic()
    while True:
        now = _count(url)
        if now != count:
            count, moved_at = now, time.monotonic()
        if count >= expected or time.monotonic() - moved_at > idle:
            return count
        if ingest.proc is not None and ingest.proc.poll() is not None:
            raise AssertionError("ingest died:\n" + ingest.log_text()[-3000:])
        time.sleep(0.1)


def test_kill_9_of_the_leader_mid_stream_loses_nothing_and_doubles_nothing(
    pgcluster: PgCluster, broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    admin, server = pgcluster.create_database("mdm_failover_ingest")
    asyncio.run(enroll(admin, broker.url, "acme", DEVICES))
    ingest = IngestProcess(mdm_env(server, broker, tmp_path / "keyring"),
                           tmp_path / "ingest.log")
    ingest.start()
    ingest.wait_ready()
    try:
        with DeviceStream(broker.port, DEVICES, N) as stream:
            _wait_count(admin, N // 4, ingest, idle=120)
            old = pgcluster.leader()
            assert old is not None
            pid = pgcluster.postmaster_pid(old)
            stored_at_kill = _count(admin)
            killed_at = time.time()
            os.kill(pid, signal.SIGKILL)
            new = pgcluster.wait_leader(other_than=old)
            leader_after = time.time() - killed_at
        stored = _wait_count(admin, N, ingest, idle=30)
        time.sleep(2.0)  # anything stored twice would show now
        stored = _count(admin)
        distinct = _count(admin, DISTINCT)
        first_write = float(_count(admin, (
            "SELECT (extract(epoch FROM min(received_at)) * 1000)::bigint FROM telemetry "
            f"WHERE received_at > to_timestamp({killed_at})"))) / 1000
        log = ingest.log_text()
        retries = log.count("database unavailable")
        # Records of a batch written again after its commit's outcome was lost with
        # the connection, which the unique key absorbed (the ingest's own count).
        repeats = re.findall(r"duplicates=([\d,]+)", log)
    finally:
        ingest.stop()
    with capsys.disabled():
        print(f"\nfailover: kill -9 of node {old}'s postmaster with {stored_at_kill} "
              f"of {N} records stored; node {new} leads {leader_after:.1f} s after the "
              f"kill; the ingest's first write after the kill committed at "
              f"{first_write - killed_at:.1f} s; {retries} retries logged; repeats the "
              f"unique key absorbed: {repeats[-1] if repeats else '?'}; stream "
              f"published by {(stream.done_at or 0) - killed_at:.1f} s after the kill; "
              f"stored {stored}, distinct {distinct}")
    assert new != old
    assert stored_at_kill < N, "the stream ended before the kill: nothing was tested"
    assert stored == N
    assert distinct == N


def _get(url: str, token: str) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_the_api_answers_503_while_no_leader_exists_and_200_after(
    pgcluster: PgCluster, broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, server = pgcluster.create_database("mdm_failover_api")
    srv = Server(mdm_env(server, broker, tmp_path / "keyring"), tmp_path / "serve.log")
    srv.cli("tenant", "create", "acme")
    token = srv.cli("admin", "create", "--tenant", "acme", "--name", "alice").strip()
    srv.start()
    devices = srv.base + "/api/v1/devices"
    try:
        assert _get(devices, token)[0] == 200
        # Maintenance mode: Patroni neither restarts nor replaces a lost leader, so
        # there is no writable database until `resume`.
        pgcluster.patronictl("pause", "--wait")
        try:
            leader = pgcluster.leader()
            assert leader is not None
            os.kill(pgcluster.postmaster_pid(leader), signal.SIGKILL)
            pgcluster.wait_no_leader()
            during = [_get(devices, token) for _ in range(5)]
            ready = _get(srv.base + "/readyz", token)[0]
        finally:
            pgcluster.patronictl("resume", "--wait")
        resumed_at = time.monotonic()
        after = _get(devices, token)
        while after[0] != 200 and time.monotonic() - resumed_at < 120:
            time.sleep(0.1)
            after = _get(devices, token)
        back_after = time.monotonic() - resumed_at
    finally:
        srv.stop()
    seen = sorted(set(re.findall(r"database unavailable in \S+ \S+ \((\w+)\)",
                                 srv.log_text())))
    with capsys.disabled():
        print(f"\nno leader: {[s for s, _, _ in during]} from GET /api/v1/devices "
              f"(errors logged: {', '.join(seen)}), /readyz {ready}; 200 again "
              f"{back_after:.1f} s after `patronictl resume`")
    for status, headers, body in during:
        assert status == 503
        assert headers.get("Retry-After", "").isdigit()
        assert json.loads(body)["code"] == "database_unavailable"
        assert b"Traceback" not in body and b"acme" not in body
    assert ready == 503
    assert after[0] == 200
    assert "unhandled error in" not in srv.log_text()  # no request ended in a 500
