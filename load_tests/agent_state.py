"""A file-backed :class:`agent_protocol.agent.StateStore`: how an agent keeps its
command state (accepted nonces, executed command ids and their acks, trusted
keys) across restarts. The simulator's devices and the tests' agents use it.

A save is durable before it returns: the state goes to a new file beside the old
one, which is fsynced, renamed over it, and the directory fsynced; a crash leaves
either the old state or the new one, never half of one.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["FileStateStore"]


class FileStateStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def save(self, state: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, state)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
