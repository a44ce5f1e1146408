"""The README's main command, `scripts/run`, end to end: server and simulated
fleet come up on their own and records are stored."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.support.services import REPO

pytestmark = pytest.mark.integration


def test_scripts_run_ingests_the_simulated_fleet() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MDM_")}
    if "MDM_PG_ADMIN_URL" in os.environ:
        env["MDM_PG_ADMIN_URL"] = os.environ["MDM_PG_ADMIN_URL"]
    env["MDM_DEMO_SECONDS"] = "6"
    out = subprocess.run([str(REPO / "scripts" / "run")], env=env, cwd=REPO,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    stored = [int(n.replace(",", "")) for n in re.findall(r"stored=([\d,]+)", text)]
    assert stored and max(stored) > 1000, text[-4000:]
    assert "Traceback" not in text
    # The server ran as its own database role, not the superuser (it would refuse).
    assert re.search(r"database +postgresql://mdm_demo_server:\*\*\*@", text), text[-4000:]
