"""agent_protocol is sans-I/O: importing it pulls in no networking or async module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import agent_protocol

FORBIDDEN = ("asyncio", "paho", "aiohttp", "asyncpg", "mdm_server", "socket")


def test_no_io_imports() -> None:
    root = Path(agent_protocol.__file__).resolve().parents[1]
    code = (
        "import sys, agent_protocol, agent_protocol.signing\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_public_api_is_explicit() -> None:
    assert sorted(agent_protocol.__all__) == sorted(set(agent_protocol.__all__))
    for name in agent_protocol.__all__:
        assert hasattr(agent_protocol, name), name
