"""serve picks prometheus-client's multiprocess mode before it is imported."""

from __future__ import annotations

import subprocess
import sys

from tests.support.services import REPO


def test_the_cli_does_not_import_prometheus_client_before_serve_sets_its_directory() -> None:
    # prometheus-client chooses between in-process and multiprocess values when it is
    # first imported: were the CLI to import it first, serve's worker processes would
    # count in memory nobody scrapes.
    code = "import sys, mdm_server.cli; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
