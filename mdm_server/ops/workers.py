"""Where ``serve``'s ingest workers stand: connected to the broker or not, bytes held.

``serve`` runs ingest worker 0 in its own process and workers 1..N-1 as child
processes (``mdm-server ingest --index I``). Each child writes a small status file,
``ingest-I.status`` (JSON: ``connected``, ``pending_bytes``), into the directory
``serve`` made for it (``MDM_RUN_DIR``, which is also PROMETHEUS_MULTIPROC_DIR:
metrics.py), whenever its state changes and at least every few seconds. ``serve``
reads them for ``/readyz`` and for the gauges of ``/metrics``. Nothing in them
names a tenant or a device.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["MULTIPROC_ENV", "RUN_DIR_ENV", "WorkerState", "prepare_run_dir", "read_states",
           "remove_run_dir", "report_status", "status_path"]

#: The directory serve makes for its workers' status files and metrics.
RUN_DIR_ENV = "MDM_RUN_DIR"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_INTERVAL_S = 0.5
_HEARTBEAT_S = 5.0
#: A status file older than this: the worker's event loop is stuck (or stopped).
STALE_S = 3 * _HEARTBEAT_S


class _Worker(Protocol):
    @property
    def broker_connected(self) -> bool: ...

    @property
    def pending_bytes(self) -> int: ...


@dataclass(frozen=True, slots=True)
class WorkerState:
    index: int
    running: bool  # the process is alive (always, for the in-process worker)
    connected: bool
    pending_bytes: int
    stalled: bool = False  # running, but its status is older than STALE_S


def status_path(run_dir: str | os.PathLike[str], index: int) -> Path:
    return Path(run_dir) / f"ingest-{index}.status"


def _write(path: Path, connected: bool, pending: int) -> None:
    data = json.dumps({"connected": connected, "pending_bytes": pending}).encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".status-")
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


async def report_status(worker: _Worker, index: int, run_dir: str) -> None:
    """In an ingest child of serve: keep its status file current, until cancelled."""
    path = status_path(run_dir, index)
    last: tuple[bool, int] | None = None
    written = 0.0
    try:
        while True:
            now = (worker.broker_connected, worker.pending_bytes)
            if now != last or time.monotonic() - written > _HEARTBEAT_S:
                with contextlib.suppress(OSError):  # serve removed the directory: ending
                    _write(path, *now)
                    last, written = now, time.monotonic()
            await asyncio.sleep(_INTERVAL_S)
    finally:
        with contextlib.suppress(OSError):
            _write(path, False, 0)


def read_states(local: _Worker | None, run_dir: str | None,
                children: Sequence[tuple[int, subprocess.Popen[bytes]]]) -> list[WorkerState]:
    """The in-process worker's state and each child's (from its status file)."""
    states = []
    if local is not None:
        states.append(WorkerState(0, True, local.broker_connected, local.pending_bytes))
    for index, proc in children:
        connected, pending, stalled = False, 0, False
        if run_dir is not None:
            path = status_path(run_dir, index)
            try:
                data = json.loads(path.read_bytes())
                connected = data.get("connected") is True
                pending = int(data.get("pending_bytes", 0))
                stalled = time.time() - path.stat().st_mtime > STALE_S
            except (OSError, ValueError, TypeError, AttributeError):
                pass  # not written yet: not connected
        running = proc.poll() is None
        states.append(WorkerState(index, running, connected and running and not stalled,
                                  pending if running else 0, stalled and running))
    return states


def prepare_run_dir() -> tuple[str, bool]:
    """Before serve imports anything that counts: the directory its processes share
    (status files, multiprocess metrics), emptied, and put into the environment the
    worker processes inherit. PROMETHEUS_MULTIPROC_DIR when set (its old files are
    removed, as prometheus-client requires), else a private temporary directory.
    Returns (directory, whether serve made it and removes it at exit)."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for f in path.iterdir():
            if f.is_file() and (f.suffix in (".db", ".status") or f.name.startswith(".status-")):
                f.unlink()
        run_dir, own = str(path), False
    else:
        run_dir, own = tempfile.mkdtemp(prefix="mdm-serve-"), True
    os.environ[MULTIPROC_ENV] = run_dir
    os.environ[RUN_DIR_ENV] = run_dir
    return run_dir, own


def remove_run_dir(run_dir: str, own: bool) -> None:
    if own:
        shutil.rmtree(run_dir, ignore_errors=True)
