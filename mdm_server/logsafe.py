"""Logging an exception without its message: the message of an unexpected
exception may quote the data that caused it (a phone number, a location), so
logs get its type and where it happened, never its text."""

from __future__ import annotations

import traceback

__all__ = ["describe"]


def describe(exc: BaseException, *, frames: int = 5) -> str:
    where = "".join(traceback.format_tb(exc.__traceback__, limit=-frames))
    return f"{type(exc).__name__} (message withheld)\n{where}"
