"""The corpus of what real location agents send (OwnTracks, OsmAnd / Traccar Client),
read where it lies at run time, never copied into the project.

Where: ``$MDM_CORPUS_DIR`` if set; else ``<repo>/../shared/corpus`` (beside the
checkout, as on CI and in the main checkout); else, in a git worktree (whose ``.git``
is a file ``gitdir: <main>/.git/worktrees/<name>``), ``<main>/../shared/corpus``.
A missing corpus fails the tests that need it, with this explanation: it never skips.
It never fails the collection either, which would stop every other test of the run:
parameters drawn from the corpus go through :func:`params`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def _candidates() -> list[Path]:
    env = os.environ.get("MDM_CORPUS_DIR")
    if env:
        return [Path(env)]
    found = [REPO.parent / "shared" / "corpus"]
    git = REPO / ".git"
    if git.is_file():
        text = git.read_text("utf-8").strip()
        if text.startswith("gitdir:"):
            gitdir = Path(text.split(":", 1)[1].strip())
            if len(gitdir.parents) >= 3:
                found.append(gitdir.parents[2].parent / "shared" / "corpus")
    return found


def _find() -> Path | None:
    for path in _candidates():
        if (path / "owntracks" / "payloads.jsonl").is_file():
            return path
    return None


def corpus_dir() -> Path:
    """The corpus directory (the one with README.md, owntracks/ and osmand/)."""
    found = _find()
    if found is not None:
        return found
    candidates = _candidates()
    pytest.fail(
        "corpus of real agent payloads not found (looked in "
        + ", ".join(str(p) for p in candidates)
        + "); it lies beside the repository as shared/corpus: set MDM_CORPUS_DIR to it"
    )


def load_jsonl(relative: str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file of the corpus, e.g. ``owntracks/payloads.jsonl``."""
    path = corpus_dir() / relative
    if not path.is_file():
        pytest.fail(f"corpus file {relative} missing under {path.parent.parent}")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def params(make: Callable[[], Sequence[Any]]) -> Sequence[Any]:
    """Test parameters drawn from the corpus at collection time: ``make()``, or, when
    the corpus is missing, a single ``None`` (id ``corpus-missing``) whose test must
    call :func:`corpus_dir` (or :func:`load_jsonl`) and so fails with the explanation."""
    if _find() is None:
        return [pytest.param(None, id="corpus-missing")]
    return make()
