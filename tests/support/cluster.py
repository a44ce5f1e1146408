"""A private RabbitMQ cluster for tests, started and stopped by scripts/cluster.

:func:`rabbitmq_missing` says why the cluster tests cannot run here (RabbitMQ is
not installed: ``scripts/test`` installs Debian's ``rabbitmq-server``), so that
they are skipped with that reason, never silently.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "scripts" / "cluster"


def rabbitmq_missing() -> str | None:
    """None if scripts/cluster can start RabbitMQ here, else why not."""
    if os.environ.get("MDM_RABBITMQ_HOME"):
        return None
    if not glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server"):
        return ("RabbitMQ is not installed (Debian package rabbitmq-server; scripts/test "
                "installs it): the RabbitMQ cluster tests cannot run")
    if shutil.which("epmd") is None and not glob.glob("/usr/lib/erlang/erts-*/bin/epmd"):
        return "Erlang's epmd is missing: the RabbitMQ cluster tests cannot run"
    return None


@dataclass
class Cluster:
    dir: Path
    hook_addr: str
    env: dict[str, str]

    @property
    def amqp_url(self) -> str:
        return self.env["MDM_AMQP_URL"]

    @property
    def management_url(self) -> str:
        return self.env["MDM_AMQP_MANAGEMENT_URL"]

    @property
    def server_password(self) -> str:
        return urlsplit(self.amqp_url.split(",")[0]).password or ""

    def mqtt(self, node: int = 1) -> tuple[str, int]:
        """(host, port) of node ``node``'s device-facing MQTT listener."""
        parts = urlsplit(self.env[f"MDM_CLUSTER_MQTT_{node}"])
        assert parts.hostname and parts.port
        return parts.hostname, parts.port

    def server_env(self) -> dict[str, str]:
        """What serve needs to be the cluster's hook (and to close connections)."""
        return {"MDM_BROKER_HOOK_ADDR": self.hook_addr, "MDM_AMQP_URL": self.amqp_url,
                "MDM_AMQP_MANAGEMENT_URL": self.management_url}


@contextmanager
def running_cluster(tmp: Path, hook_addr: str, nodes: int = 1) -> Iterator[Cluster]:
    """``scripts/cluster up`` (nodes asking the hook at ``hook_addr``), and ``down``
    afterwards, whatever happens (a failed start stops what it started itself)."""
    d = tmp / "cluster"
    started = time.monotonic()
    out = subprocess.run([str(CLUSTER_SCRIPT), "up", "--nodes", str(nodes), "--dir", str(d),
                          "--hook", hook_addr], capture_output=True, text=True,
                         timeout=60 + 60 * nodes, check=False)
    try:
        if out.returncode != 0:
            raise AssertionError(f"scripts/cluster up failed:\n{out.stderr[-3000:]}")
        env = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
        cluster = Cluster(d, hook_addr, env)
        cluster.env["STARTED_IN_S"] = f"{time.monotonic() - started:.1f}"
        yield cluster
    finally:
        subprocess.run([str(CLUSTER_SCRIPT), "down", "--dir", str(d)], capture_output=True,
                       timeout=120, check=False)
