"""Prometheus metrics (prometheus-client), and what ``GET /metrics`` answers.

Labels are bounded and personal-free by construction: a dead letter's reason (a
fixed set of codes), a command's type and state (fixed sets), an API route's
*template* (``/api/v1/devices/{device}``, never the path as sent: paths carry
device ids and keys), its method and status. Never a tenant, device, user, token
or any telemetry value.

``serve`` runs its ingest workers as processes, so it runs prometheus-client in
its multiprocess mode: before anything imports prometheus_client, ``serve`` sets
``PROMETHEUS_MULTIPROC_DIR`` (and ``MDM_RUN_DIR``) to a directory of its own
(ops/workers.py, :func:`prepare_run_dir`), every process's counters and histograms go to files
there, and a scrape adds them up (``MultiProcessCollector``). What is read at
scrape time instead (the workers' broker connection and held bytes, the command
table) comes from collectors that run in ``serve`` itself.

The ingest counts per batch (:func:`batch_committed`), never per record: a few
calls into prometheus-client per batch of up to 5,000 messages.
"""

from __future__ import annotations

import os
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agent_protocol import Reason
from mdm_server.ops.workers import MULTIPROC_ENV, WorkerState

if TYPE_CHECKING:
    from mdm_server.ingest.batch import WriteSet
    from mdm_server.ingest.shaping import ShapeStats
    from mdm_server.ingest.sink import WriteResult

__all__ = ["CONTENT_TYPE_LATEST", "batch_committed", "render"]


# Metrics of this process; in multiprocess mode the scrape reads the files instead.
_REGISTRY = CollectorRegistry(auto_describe=True)

_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0)
_RUN_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)
_ACK_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0)

# --- ingest (every worker process) ---------------------------------------------
INGEST_MESSAGES = Counter(
    "mdm_ingest_messages", "Telemetry messages taken from the broker and acknowledged "
    "(after their batch committed)", registry=_REGISTRY)
RECORDS_STORED = Counter(
    "mdm_ingest_records_stored", "Telemetry records stored (new rows)", registry=_REGISTRY)
DUPLICATES = Counter(
    "mdm_ingest_duplicates", "Records offered again (a redelivery) and absorbed by the "
    "unique key", registry=_REGISTRY)
DEAD_LETTERS = Counter(
    "mdm_ingest_dead_letters", "Messages not stored, by reason (rate_limited: over the "
    "device's rate limit)", ["reason"], registry=_REGISTRY)
NOT_COLLECTED = Counter(
    "mdm_ingest_records_not_collected", "Records of kinds the policy does not collect",
    registry=_REGISTRY)
SUPPRESSED = Counter(
    "mdm_ingest_points_suppressed", "Location points the policy kept out of storage",
    registry=_REGISTRY)
BATCH_MESSAGES = Histogram(
    "mdm_ingest_batch_messages", "Messages per committed batch", buckets=_SIZE_BUCKETS,
    registry=_REGISTRY)
COMMIT_SECONDS = Histogram(
    "mdm_ingest_commit_seconds", "Time to write and commit a batch (retries while the "
    "database is away included)", buckets=_SECONDS_BUCKETS, registry=_REGISTRY)
WAIT_SECONDS = Histogram(
    "mdm_ingest_arrival_to_commit_seconds", "From the arrival of a batch's first message "
    "at the worker to the batch's commit (the envelope carries no send time)",
    buckets=_SECONDS_BUCKETS, registry=_REGISTRY)

# --- commands (serve) ----------------------------------------------------------
ACK_SECONDS = Histogram(
    "mdm_command_ack_seconds", "From a command's publication to the device's first ack",
    buckets=_ACK_BUCKETS, registry=_REGISTRY)

# --- API (serve) ---------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "mdm_http_requests", "API requests by route template, method and status",
    ["route", "method", "status"], registry=_REGISTRY)
HTTP_SECONDS = Histogram(
    "mdm_http_request_seconds", "API request latency by route template and method",
    ["route", "method"], buckets=_SECONDS_BUCKETS, registry=_REGISTRY)

# --- retention and erasure (serve) ---------------------------------------------
RETENTION_RUNS = Counter(
    "mdm_retention_runs", "Retention runs, by result (ok, failed)", ["result"],
    registry=_REGISTRY)
RETENTION_SECONDS = Histogram(
    "mdm_retention_run_seconds", "Duration of a retention run", buckets=_RUN_BUCKETS,
    registry=_REGISTRY)
RETENTION_LAST_OK = Gauge(
    "mdm_retention_last_success_timestamp_seconds", "When a retention run last succeeded "
    "(Unix time)", multiprocess_mode="max", registry=_REGISTRY)
ERASURES = Counter(
    "mdm_erasures_fulfilled", "Erasure requests fulfilled because they fell due",
    registry=_REGISTRY)

_REASONS = frozenset({*(str(r) for r in Reason), "storage_refused", "rate_limited"})
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _reason(reason: str) -> str:
    return reason if reason in _REASONS else "other"


def batch_committed(messages: int, ws: WriteSet, result: WriteResult, shaped: ShapeStats,
                    commit_s: float, wait_s: float) -> None:
    """One committed batch: a dozen calls whatever its size."""
    INGEST_MESSAGES.inc(messages)
    if result.inserted:
        RECORDS_STORED.inc(result.inserted)
    if result.duplicates:
        DUPLICATES.inc(result.duplicates)
    if ws.dead:
        for reason, n in Tally(d.reason for _, d in ws.dead).items():
            DEAD_LETTERS.labels(_reason(reason)).inc(n)
    if result.refused:
        DEAD_LETTERS.labels("storage_refused").inc(result.refused)
    if result.rate_limited:
        DEAD_LETTERS.labels("rate_limited").inc(result.rate_limited)
    if shaped.not_collected:
        NOT_COLLECTED.inc(shaped.not_collected)
    if shaped.suppressed:
        SUPPRESSED.inc(shaped.suppressed)
    BATCH_MESSAGES.observe(messages)
    COMMIT_SECONDS.observe(commit_s)
    WAIT_SECONDS.observe(wait_s)


def http_request(route: str, method: str, status: int, seconds: float) -> None:
    method = method if method in _METHODS else "OTHER"
    HTTP_REQUESTS.labels(route, method, str(status)).inc()
    HTTP_SECONDS.labels(route, method).observe(seconds)


def ack_latency(seconds: Iterable[float]) -> None:
    for s in seconds:
        ACK_SECONDS.observe(max(0.0, s))


def retention_done(seconds: float) -> None:
    RETENTION_RUNS.labels("ok").inc()
    RETENTION_SECONDS.observe(seconds)
    RETENTION_LAST_OK.set(time.time())


def retention_failed() -> None:
    RETENTION_RUNS.labels("failed").inc()


# --- the scrape ----------------------------------------------------------------

class WorkersCollector(Collector):
    """The ingest workers' broker connection and held bytes, read at scrape time."""

    def __init__(self, states: Callable[[], list[WorkerState]]) -> None:
        self._states = states

    def collect(self) -> Iterable[GaugeMetricFamily]:
        states = self._states()
        yield GaugeMetricFamily("mdm_ingest_workers", "Ingest workers serve runs",
                                value=len(states))
        yield GaugeMetricFamily("mdm_ingest_workers_connected",
                                "Ingest workers connected to the broker now",
                                value=sum(s.connected for s in states))
        yield GaugeMetricFamily("mdm_ingest_pending_bytes",
                                "Bytes of messages the ingest workers hold, not yet "
                                "committed", value=sum(s.pending_bytes for s in states))


def render(extra: Iterable[Collector] = ()) -> bytes:
    """The text of ``GET /metrics``: every process's metrics, and ``extra``."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry = CollectorRegistry()
        registry.register(_RegistryView())
    for c in extra:
        registry.register(c)
    return generate_latest(registry)


class _RegistryView(Collector):
    """This process's registry inside a scrape registry (one process: no files)."""

    def collect(self) -> Iterable[object]:  # type: ignore[override]
        return _REGISTRY.collect()
