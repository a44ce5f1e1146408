"""privacy_filters is pure: importing it pulls in no networking or async module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import privacy_filters

FORBIDDEN = ("asyncio", "paho", "aiohttp", "asyncpg", "mdm_server", "socket")
MODULES = ("actions", "compile", "errors", "explain", "location", "policy")


def test_no_io_imports() -> None:
    root = Path(privacy_filters.__file__).resolve().parents[1]
    imports = "".join(f"import privacy_filters.{m}\n" for m in MODULES)
    code = (
        f"import sys, privacy_filters\n{imports}"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_public_api_is_explicit() -> None:
    assert sorted(privacy_filters.__all__) == sorted(set(privacy_filters.__all__))
    for name in privacy_filters.__all__:
        assert hasattr(privacy_filters, name), name
