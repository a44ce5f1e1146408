"""MDM_LOG_FORMAT=json: one object a line; an error by its type and place only."""

from __future__ import annotations

import json
import logging

import pytest

from mdm_server.ops.logs import JsonFormatter, setup_logging


def _record(exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord("mdm_server.ingest.sink", logging.ERROR, __file__, 1,
                             "write failed (%s)", ("ValueError",), exc_info)  # type: ignore[arg-type]


def test_an_error_is_named_by_type_and_place_never_by_its_message() -> None:
    try:
        raise ValueError("lat=48.8566135 imei=356938035643809")
    except ValueError as exc:
        record = _record((type(exc), exc, exc.__traceback__))
        line = exc.__traceback__.tb_lineno if exc.__traceback__ else 0
    text = JsonFormatter("ingest-1").format(record)
    assert "\n" not in text
    entry = json.loads(text)
    assert entry["level"] == "ERROR"
    assert entry["logger"] == "mdm_server.ingest.sink"
    assert entry["message"] == "write failed (ValueError)"
    assert entry["worker"] == "ingest-1"
    assert entry["time"].endswith("Z")
    assert entry["error"] == "ValueError"
    assert entry["where"] == f"tests/unit/test_log_format.py:{line}"
    assert "48.8566135" not in text
    assert "356938035643809" not in text


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="MDM_LOG_FORMAT"):
        setup_logging("serve", fmt="xml")


def test_json_mode_makes_an_uncaught_exception_a_json_line_without_its_message() -> None:
    import subprocess
    import sys

    from tests.support.services import REPO

    code = ("from mdm_server.ops.logs import setup_logging\n"
            "setup_logging('serve', fmt='json')\n"
            "raise RuntimeError('imei=356938035643809')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1
    [line] = out.stderr.splitlines()
    entry = json.loads(line)
    assert (entry["level"], entry["error"]) == ("CRITICAL", "RuntimeError")
    assert entry["where"] == "<string>:3"
    assert "356938035643809" not in out.stderr
