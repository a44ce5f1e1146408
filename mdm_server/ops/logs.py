"""The log's format: readable text (the default) or one JSON object a line.

``MDM_LOG_FORMAT=json``: every record is ``{"time", "level", "logger", "message",
"worker"}`` (time in UTC, ISO 8601 with milliseconds; ``worker``: ``serve`` or the
ingest worker ``ingest-N``), and for a record carrying an exception, ``error``
(its type's name) and ``where`` (``file:line`` of the innermost frame, the file
relative to the package). Never the exception's message, nor a traceback's text
beyond the frames: a message may quote the data that caused it (mdm_server/logsafe.py).
Messages themselves are the code's own, written to name no telemetry value.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

__all__ = ["FORMATS", "JsonFormatter", "setup_logging"]

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_ROOT = str(Path(__file__).resolve().parents[2]) + os.sep  # the directory of mdm_server/


def _where(exc: BaseException) -> str | None:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return None
    last = frames[-1]
    name = last.filename
    if name.startswith(_ROOT):
        name = name[len(_ROOT):]
    else:
        name = "/".join(Path(name).parts[-2:])  # a library's: its package and file
    return f"{name}:{last.lineno}"


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: str) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "worker": self._worker,
        }
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            entry["error"] = type(exc).__name__
            where = _where(exc)
            if where is not None:
                entry["where"] = where
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(worker: str, fmt: str | None = None, level: str | None = None) -> str:
    """Configure the root logger on stderr; returns the format in use. A format not
    in FORMATS is refused (ValueError) by the caller's configuration check."""
    fmt = (fmt if fmt is not None else os.environ.get("MDM_LOG_FORMAT", "text")) or "text"
    if fmt not in FORMATS:
        raise ValueError(f"MDM_LOG_FORMAT must be one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(worker) if fmt == "json"
                         else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level or os.environ.get("MDM_LOG_LEVEL", "INFO"))
    if fmt == "json":
        # What would reach stderr past logging becomes a JSON line too: an uncaught
        # exception (by its type and place only) and Python's warnings.
        sys.excepthook = _log_uncaught
        logging.captureWarnings(True)
    return fmt


def _log_uncaught(kind: type[BaseException], exc: BaseException,
                  tb: TracebackType | None) -> None:
    logging.getLogger("mdm_server").critical("stopped by an uncaught %s", kind.__name__,
                                             exc_info=(kind, exc, tb))
