"""serve's directory for its workers' status and metrics: emptied at start (a
previous run's counters must not be added to this one's), private by default."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mdm_server.ops.workers import (
    MULTIPROC_ENV,
    RUN_DIR_ENV,
    prepare_run_dir,
    remove_run_dir,
)


def test_a_given_directory_loses_the_last_runs_metrics_and_keeps_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    (tmp_path / "counter_4242.db").write_bytes(b"old")
    (tmp_path / "histogram_4242.db").write_bytes(b"old")
    (tmp_path / "ingest-1.status").write_text('{"connected": true, "pending_bytes": 0}')
    (tmp_path / "notes.txt").write_text("the operator's")
    run_dir, own = prepare_run_dir()
    assert (run_dir, own) == (str(tmp_path), False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert os.environ[RUN_DIR_ENV] == str(tmp_path)
    remove_run_dir(run_dir, own)
    assert tmp_path.exists()  # not serve's to remove


def test_by_default_a_private_directory_removed_at_the_end(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    run_dir, own = prepare_run_dir()
    try:
        assert own
        assert os.environ[MULTIPROC_ENV] == os.environ[RUN_DIR_ENV] == run_dir
        assert Path(run_dir).stat().st_mode & 0o077 == 0  # private to serve's user
    finally:
        remove_run_dir(run_dir, own)
    assert not Path(run_dir).exists()
