"""Every master key published in the repository is on serve's refusal list
(mdm_server/published_keys.py), and the scan that keeps it so finds a new one."""

from __future__ import annotations

import base64
import hashlib
import os
import runpy
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from mdm_server.published_keys import is_published
from tests.support.services import TEST_MASTER_KEY

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "published-keys"
COMPOSE_DEV_KEY = "ZGV2LW9ubHktbWFzdGVyLWtleS1jaGFuZ2UtbWUhISE="  # its former default


def _scan(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--repo", str(repo), *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_every_value_in_the_tracked_files_is_listed() -> None:
    # If this fails: scripts/published-keys --update (and commit the list).
    out = _scan(REPO)
    assert out.returncode == 0, out.stderr


def test_the_tests_and_the_compose_development_keys_are_published() -> None:
    assert is_published(base64.b64decode(TEST_MASTER_KEY))
    assert is_published(base64.b64decode(COMPOSE_DEV_KEY))
    assert not is_published(secrets.token_bytes(32))


def test_the_scan_finds_a_new_key_and_the_update_keeps_the_old_ones(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "mdm_server").mkdir(parents=True)
    shutil.copy(REPO / "mdm_server" / "published_keys.py", repo / "mdm_server")
    fresh = secrets.token_bytes(32)
    (repo / "example.env").write_text(f"MDM_MASTER_KEY={base64.b64encode(fresh).decode()}\n"
                                      # not keys: too long, too short, not 32 bytes
                                      f"{base64.b64encode(secrets.token_bytes(33)).decode()}\n"
                                      f"{base64.b64encode(secrets.token_bytes(31)).decode()}\n")
    git = shutil.which("git")
    assert git is not None
    env = {**os.environ, "GIT_CONFIG_GLOBAL": "/dev/null"}
    subprocess.run([git, "init", "-q"], cwd=repo, check=True, env=env)
    subprocess.run([git, "add", "."], cwd=repo, check=True, env=env)
    check = _scan(repo)
    assert check.returncode == 1
    assert "not listed: a key in example.env" in check.stderr
    assert check.stderr.count("not listed") == 1
    assert _scan(repo, "--update").returncode == 0
    assert _scan(repo).returncode == 0
    # The fresh key is refused from now on; the keys listed before are still there,
    # though this tree does not hold them (a key once published stays published).
    listed = runpy.run_path(str(repo / "mdm_server" / "published_keys.py"))["PUBLISHED_SHA256"]
    assert hashlib.sha256(fresh).hexdigest() in listed
    assert hashlib.sha256(base64.b64decode(TEST_MASTER_KEY)).hexdigest() in listed
