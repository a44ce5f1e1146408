"""A Server-Sent Events client for tests: one HTTP connection read by a thread,
each event put on a queue with the wall-clock time it arrived."""

from __future__ import annotations

import http.client
import json
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Event:
    name: str
    data: Any
    at: float  # time.time() when its last line arrived


class SseClient:
    """``GET path`` with the bearer token; ``status`` and ``headers`` once the
    answer started. :meth:`next` takes events in order; :meth:`close` shuts the
    socket (an abrupt disconnect: no goodbye)."""

    def __init__(self, base: str, path: str, token: str | None) -> None:
        parts = urlsplit(base)
        self._conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        headers = {"Accept": "text/event-stream"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._conn.request("GET", path, headers=headers)
        self._resp = self._conn.getresponse()
        self.status = self._resp.status
        self.headers = dict(self._resp.getheaders())
        self.events: queue.Queue[Event | None] = queue.Queue()
        self.comments = 0
        self.body: Any = None
        if self.status != 200:
            raw = self._resp.read()
            self.body = json.loads(raw) if raw else None
            self._conn.close()
            return
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        name, data = "message", []
        # Held here: close() (on the test's thread) sets the response's fp to None.
        fp = self._resp.fp
        try:
            while True:
                line = fp.readline()
                if not line:
                    break
                text = line.decode().rstrip("\n")
                if text == "":
                    if data:
                        self.events.put(Event(name, json.loads("\n".join(data)), time.time()))
                    name, data = "message", []
                elif text.startswith(":"):
                    self.comments += 1
                elif text.startswith("event: "):
                    name = text[7:]
                elif text.startswith("data: "):
                    data.append(text[6:])
        except (OSError, ValueError):
            pass
        self.events.put(None)

    def next(self, timeout: float = 20.0) -> Event:
        ev = self.events.get(timeout=timeout)
        if ev is None:
            raise EOFError("the stream ended")
        return ev

    def wait_for(self, name: str, pred: Any = None, timeout: float = 20.0) -> Event:
        """The next event called ``name`` (for which ``pred(data)`` holds), skipping
        others; TimeoutError if none comes."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {name!r} event")
            try:
                ev = self.next(left)
            except queue.Empty:
                raise TimeoutError(f"no {name!r} event") from None
            if ev.name == name and (pred is None or pred(ev.data)):
                return ev

    def drain(self, seconds: float) -> list[Event]:
        """Every event arriving within ``seconds``."""
        out: list[Event] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                break
            if ev is None:
                break
            out.append(ev)
        return out

    def close(self) -> None:
        sock = self._conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._conn.close()
