"""The pure packages stay pure: importing every module of agent_protocol or
privacy_filters pulls in no networking, async or server module."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

FORBIDDEN = ("asyncio", "paho", "aiohttp", "asyncpg", "mdm_server", "socket")
PACKAGES = ("agent_protocol", "privacy_filters")


@pytest.mark.parametrize("package", PACKAGES)
def test_no_io_imports(package: str) -> None:
    pkg = importlib.import_module(package)
    modules = [f"{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
    assert len(modules) >= 5  # the walk found the package's modules
    code = (
        "import sys\n" + "".join(f"import {m}\n" for m in modules)
        + f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    root = Path(pkg.__file__ or "").resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("package", PACKAGES)
def test_public_api_is_explicit(package: str) -> None:
    pkg = importlib.import_module(package)
    assert sorted(pkg.__all__) == sorted(set(pkg.__all__))
    for name in pkg.__all__:
        assert hasattr(pkg, name), name
