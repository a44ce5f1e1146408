"""Resource limits of the HTTP API (OWASP API4), against a real server and database.

- The rate limit is keyed on the principal as auth resolves the token: every
  spelling of the ``Authorization`` header shares one bucket.
- Requests without a valid token are limited per client address (the tests talk
  from several loopback addresses: 127.0.0.0/8 is all this machine's), and however
  many of them come, from however many addresses, they cannot make the server
  forget a principal's bucket.
- Bodies: per-route limits on the bytes actually read, Content-Length or chunked
  (413, and the server's memory flat); 415 for a body that is not JSON.
- Every /api/ response carries ``Cache-Control: no-store`` and
  ``X-Content-Type-Options: nosniff``: every route of the router x no token, a bad
  token, a valid one, and the router's own 404 and 405, 413, 415, 429.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest

from mdm_server.app import create_app
from mdm_server.config import Config, MqttSettings
from tests.support.services import (
    Server,
    create_database,
    drop_database,
    enroll_devices,
    running_broker,
    server_env,
)

pytestmark = pytest.mark.integration

PARAM = re.compile(r"\{(\w+)(?::[^}]*)?\}")
COMMAND = {"type": "lock", "reason": "lost"}


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Api:
    server: Server
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return int(self.server.env["MDM_HTTP_ADDR"].rsplit(":", 1)[1])

    def call(self, method: str, path: str, *, auth: str | None = None,
             body: bytes | None = None, headers: dict[str, str] | None = None,
             source: str = "127.0.0.1") -> Answer:
        """One request on a fresh connection from ``source`` (a loopback address);
        ``auth``: the Authorization header as sent, spelling and all."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60,
                                          source_address=(source, 0))
        try:
            sent = dict(headers or {})
            if auth is not None:
                sent["Authorization"] = auth
            conn.request(method, path, body=body, headers=sent)
            resp = conn.getresponse()
            if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                # A live stream does not end: its headers are the answer.
                return Answer(resp.status, resp.headers, b"")
            return Answer(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    def json(self, method: str, path: str, token: str, doc: object, **kw: Any) -> Answer:
        return self.call(method, path, auth=f"Bearer {token}", body=json.dumps(doc).encode(),
                         headers={"Content-Type": "application/json"}, **kw)


def assert_api_headers(answer: Answer, what: str = "") -> None:
    assert answer.headers.get("Cache-Control") == "no-store", (what, answer.status)
    assert answer.headers.get("X-Content-Type-Options") == "nosniff", (what, answer.status)


def _server(tmp: Any, **env: str) -> Iterator[Api]:
    """A served tenant acme (device d1; admins alice, bob, carol; an auditor; a
    user of d1) and globex (admin eve)."""
    database = asyncio.run(create_database())
    try:
        with running_broker(tmp) as broker:
            asyncio.run(enroll_devices(database, broker.url, "acme", ["d1"]))
            srv = Server(server_env(database, broker.url, **env), tmp / "serve.log")
            cli = srv.cli
            api = Api(srv)
            for name in ("alice", "bob", "carol"):
                api.tokens[name] = cli("admin", "create", "--tenant", "acme",
                                       "--name", name).strip()
            api.tokens["auditor"] = cli("admin", "create", "--tenant", "acme", "--name",
                                        "audrey", "--role", "auditor").strip()
            api.tokens["user"] = cli("user", "token", "--tenant", "acme",
                                     "--device", "d1").strip()
            cli("tenant", "create", "globex")
            api.tokens["eve"] = cli("admin", "create", "--tenant", "globex",
                                    "--name", "eve").strip()
            srv.start()
            try:
                yield api
            finally:
                srv.stop()
    finally:
        asyncio.run(drop_database(database))


RATE, BURST, KEYS = 1, 8, 10


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """Rate 1/s after a burst of 8; 10 buckets per table."""
    yield from _server(tmp_path_factory.mktemp("limited"), MDM_API_RATE_PER_S=str(RATE),
                       MDM_API_BURST=str(BURST), MDM_API_RATE_KEYS=str(KEYS))


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """Rate limits out of the way."""
    yield from _server(tmp_path_factory.mktemp("api"), MDM_API_RATE_PER_S="100000",
                       MDM_API_BURST="1000000")


# --- rate limits ------------------------------------------------------------------------

def _spellings(token: str) -> list[str]:
    """The Authorization header as clients may send it; auth reads each as ``token``."""
    return [f"Bearer {token}", f"bearer {token}", f"BEARER {token}", f"BeArEr {token}",
            f"Bearer  {token}", f"Bearer {token}   ", f"bearer \t {token}",
            f"Bearer    {token}\t"]


def _after(spent: float, calls: list[Callable[[], Answer]]
           ) -> tuple[list[Answer], list[float]]:
    """Make the calls in turn; their answers, and the seconds since ``spent`` at which
    each answer was complete (a bucket refills at RATE meanwhile)."""
    answers, elapsed = [], []
    for call in calls:
        answers.append(call())
        elapsed.append(time.monotonic() - spent)
    return answers, elapsed


def test_every_spelling_of_the_header_shares_the_principals_bucket(limited: Api) -> None:
    token = limited.tokens["alice"]
    spellings = _spellings(token)
    assert len(spellings) == BURST
    # The burst, spent with a different spelling each time: every one is the token.
    for auth in spellings:
        spent = time.monotonic()  # (when the last one was counted, at the earliest)
        answer = limited.call("GET", "/api/v1/devices", auth=auth)
        assert answer.status == 200, (answer.status, answer.body)
    # The next request is 429 whatever the spelling (each used to get a fresh burst).
    answers, elapsed = _after(spent, [
        lambda auth=auth: limited.call("GET", "/api/v1/devices", auth=auth)
        for auth in spellings])
    if elapsed[0] < 1 / RATE:
        assert answers[0].status == 429
    # At RATE a second, a request may have been earned back meanwhile; no more.
    assert sum(a.status == 200 for a in answers) <= int(elapsed[-1] * RATE), \
        ([a.status for a in answers], elapsed)
    for a in answers:
        assert_api_headers(a, "429")
        if a.status == 429:
            assert int(a.headers["Retry-After"]) >= 1
            assert a.json() == {"error": "too many requests: slow down",
                                "code": "rate_limited"}
    # Another principal has its own bucket.
    assert limited.call("GET", "/api/v1/devices",
                        auth=f"Bearer {limited.tokens['bob']}").status == 200


def test_requests_without_a_valid_token_are_limited_per_client_address(limited: Api) -> None:
    flood, other = "127.0.0.2", "127.0.0.3"
    attempts = [None, "Bearer not-a-token", "Basic YWxpY2U6c2VjcmV0", "Bearer ",
                "Bearer \u00e9t\u00e9", None, "Bearer mdm_forged", None]
    assert len(attempts) == BURST
    for auth in attempts:  # no token, bad tokens, another scheme: one bucket, the address's
        spent = time.monotonic()
        answer = limited.call("GET", "/api/v1/devices", auth=auth, source=flood)
        assert answer.status == 401, (auth, answer.status)
        assert_api_headers(answer, "401")
    # An unknown route counts against the address too.
    answers, elapsed = _after(spent, [
        *[lambda auth=auth: limited.call("GET", "/api/v1/devices", auth=auth, source=flood)
          for auth in attempts],
        lambda: limited.call("GET", "/api/v1/nothing-here", source=flood)])
    if elapsed[0] < 1 / RATE:
        assert answers[0].status == 429
    assert sum(a.status != 429 for a in answers) <= int(elapsed[-1] * RATE), \
        ([a.status for a in answers], elapsed)
    # Another address has a bucket of its own ...
    assert limited.call("GET", "/api/v1/devices", source=other).status == 401
    # ... and a valid token from the flooding address is its principal's, not the address's.
    answer = limited.call("GET", "/api/v1/devices",
                          auth=f"Bearer {limited.tokens['carol']}", source=flood)
    assert answer.status == 200


def test_traffic_without_a_valid_token_cannot_evict_a_principals_bucket(limited: Api) -> None:
    """With room for 10 buckets a table, 40 addresses with 40 random tokens come and
    go; the exhausted principal is still exhausted (forgetting it would hand it a
    fresh burst of 8)."""
    token = limited.tokens["auditor"]
    for _ in range(BURST):
        spent = time.monotonic()
        assert limited.call("GET", "/api/v1/devices", auth=f"Bearer {token}").status == 200
    for i in range(4 * KEYS):
        answer = limited.call("GET", "/api/v1/devices", auth=f"Bearer forged-{i}",
                              source=f"127.0.1.{i + 1}")
        assert answer.status == 401, answer.status
    answers, elapsed = _after(spent, [
        lambda: limited.call("GET", "/api/v1/devices", auth=f"Bearer {token}")
        for _ in range(BURST)])
    earned = int(elapsed[-1] * RATE)
    assert earned < BURST - 1, "too slow to tell a forgotten bucket from a refilled one"
    assert sum(a.status == 200 for a in answers) <= earned, \
        ([a.status for a in answers], earned)


# --- bodies -----------------------------------------------------------------------------

def _chunked(api: Api, path: str, token: str, total: int, *, chunk: int = 64 * 1024,
             method: str = "POST") -> tuple[int, bytes, int]:
    """Send up to ``total`` bytes as a chunked body (no Content-Length), stopping as
    soon as the server answers; (status, body, bytes of body sent by then)."""
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=60)
    try:
        sock.sendall((f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                      "Transfer-Encoding: chunked\r\n\r\n").encode())
        sock.setblocking(False)
        frame = f"{chunk:x}\r\n".encode() + b'{"a":' + b" " * (chunk - 5) + b"\r\n"
        out, sent, got, ended = memoryview(b""), 0, b"", False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            want_write = not ended or len(out) > 0
            readable, writable, _ = select.select([sock], [sock] if want_write else [], [], 1)
            if readable:
                data = sock.recv(1 << 16)
                if not data:
                    break
                got += data
                head, sep, rest = got.partition(b"\r\n\r\n")
                if sep:
                    found = re.search(rb"(?i)content-length: *(\d+)", head)
                    assert found is not None, head
                    length = int(found[1])
                    if len(rest) >= length:
                        return int(head.split()[1]), rest[:length], sent
                continue
            if writable:
                if not out:
                    if sent >= total:
                        out, ended = memoryview(b"0\r\n\r\n"), True
                    else:
                        out, sent = memoryview(frame), sent + chunk
                try:
                    n = sock.send(out)
                except BlockingIOError:
                    continue
                out = out[n:]
        raise AssertionError(f"no answer after {sent} bytes: {got[:200]!r}")
    finally:
        sock.close()


class _Peak(threading.Thread):
    """The server's peak resident memory while it runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.stop.wait(0.02)


def test_a_chunked_body_is_limited_per_route_as_it_is_read(api: Api) -> None:
    alice = api.tokens["alice"]
    # 7 MiB without Content-Length to a command (64 KiB): it used to be read whole
    # (the app-wide 8 MiB) and handed to the handler.
    status, body, _ = _chunked(api, "/api/v1/devices/d1/commands", alice, 7 * 1024 * 1024)
    assert status == 413, body
    assert json.loads(body) == {"error": "the request body is over 64 KiB (the limit of "
                                         "this route)", "code": "too_large"}
    # An endless body to a policy (8 MiB): answered long before its end, and the
    # server's memory stays flat (it counts what it reads, and stops).
    assert api.server.proc is not None
    peak = _Peak(api.server.proc.pid)
    peak.start()
    try:
        total = 512 * 1024 * 1024
        status, body, sent = _chunked(api, "/api/v1/policies/huge", alice, total,
                                      method="PUT")
    finally:
        peak.stop.set()
        peak.join()
    assert status == 413, body
    assert json.loads(body)["code"] == "too_large"
    assert sent < 64 * 1024 * 1024, sent
    assert peak.peak - peak.base < 64 * 1024 * 1024, (peak.base, peak.peak)
    # A route that takes no body reads at most 1 KiB of one.
    status, body, _ = _chunked(api, "/api/v1/devices/d1/commands/"
                                    "00000000-0000-0000-0000-000000000000:approve",
                               alice, 1024 * 1024)
    assert status == 413, body
    # The server still answers, and within its limit a chunked body is fine.
    status, body, _ = _chunked(api, "/api/v1/devices/d1/commands", alice, 0)
    assert status == 400, body  # an empty body is not JSON; read, not refused for size


def test_content_length_over_the_limit_is_refused_before_reading(api: Api) -> None:
    alice = api.tokens["alice"]
    big = b'{"type": "lock", "reason": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    answer = api.call("POST", "/api/v1/devices/d1/commands", auth=f"Bearer {alice}",
                      body=big, headers={"Content-Type": "application/json"})
    assert answer.status == 413
    assert answer.json()["code"] == "too_large"
    assert_api_headers(answer, "413")
    # Within the command route's 64 KiB, a long reason is the handler's to refuse.
    answer = api.json("POST", "/api/v1/devices/d1/commands", alice,
                      {"type": "lock", "reason": "x" * 60_000})
    assert answer.status == 422, answer.body
    assert api.server.request("GET", "/api/v1/devices?limit=501", alice)[0] == 400


@pytest.mark.parametrize("content_type", [
    None, "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x", "application/json; charset=latin-1",
    "application/jsonp", "application/octet-stream"])
def test_a_body_that_is_not_json_is_415(api: Api, content_type: str | None) -> None:
    body = json.dumps(COMMAND).encode()
    for path in ("/api/v1/devices/d1/commands", "/api/v1/policies/p415",
                 "/api/v1/erasure-requests/00000000-0000-0000-0000-000000000000:fulfil"):
        headers = {} if content_type is None else {"Content-Type": content_type}
        answer = api.call("PUT" if "policies" in path else "POST", path,
                          auth=f"Bearer {api.tokens['alice']}", body=body, headers=headers)
        assert answer.status == 415, (path, answer.status, answer.body)
        assert answer.json() == {"error": "a request body must be JSON, sent as "
                                          "Content-Type: application/json",
                                 "code": "unsupported_media_type"}
        assert_api_headers(answer, "415")


@pytest.mark.parametrize("content_type", [
    "application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF-8"])
def test_json_is_accepted_with_or_without_its_charset(api: Api, content_type: str) -> None:
    answer = api.call("POST", "/api/v1/devices/d1/commands",
                      auth=f"Bearer {api.tokens['alice']}", body=json.dumps(COMMAND).encode(),
                      headers={"Content-Type": content_type})
    assert answer.status == 201, answer.body
    # No body, no Content-Type: nothing to refuse (cancelled, or sent already).
    answer = api.call("POST", f"/api/v1/devices/d1/commands/{answer.json()['command_id']}"
                              ":cancel", auth=f"Bearer {api.tokens['alice']}")
    assert answer.status in (200, 409), answer.body
    assert answer.json().get("code") in (None, "not_cancellable"), answer.body


# --- headers ----------------------------------------------------------------------------

def _routes() -> list[tuple[str, str]]:
    """Every route the application registers under /api/, from its router."""
    cfg = Config(database_url="postgresql://x@127.0.0.1/x", mqtt=MqttSettings("127.0.0.1", 1))
    out = set()
    for r in create_app(cfg, ingest=False).router.routes():
        info = r.resource.get_info() if r.resource else {}
        path = str(info.get("formatter") or info.get("path") or "")
        if path.startswith("/api/") and r.method != "HEAD":
            out.add((r.method, path))
    return sorted(out)


ROUTES = _routes()
VALUES = {"device": "d1", "name": "default", "kind": "lock", "group": "grp", "version": "1",
          "place": "depot",
          "command_id": "00000000-0000-0000-0000-000000000000",
          "batch_id": "00000000-0000-0000-0000-000000000000",
          "request_id": "00000000-0000-0000-0000-000000000000",
          "token_id": "00000000-0000-0000-0000-000000000000"}


def test_every_api_response_is_no_store_and_nosniff(api: Api) -> None:
    assert len(ROUTES) >= 35
    seen: set[int] = set()
    for method, template in ROUTES:
        path = PARAM.sub(lambda m: VALUES[m.group(1)], template)
        if path.endswith("/data"):
            path += "?kind=location"
        body = b"{}" if method in ("POST", "PUT") else None
        headers = {"Content-Type": "application/json"} if body else {}
        callers = [None, "Bearer not-a-token", f"Bearer {api.tokens['alice']}"]
        if "/me/" in path:
            callers.append(f"Bearer {api.tokens['user']}")
        for auth in callers:
            answer = api.call(method, path, auth=auth, body=body, headers=headers)
            assert_api_headers(answer, f"{method} {path}")
            seen.add(answer.status)
    others = [
        api.call("GET", "/api/v1/no-such-route"),  # the router's 404
        api.call("GET", "/api/v1/devices?limit=501", auth=f"Bearer {api.tokens['alice']}"),
        api.call("GET", "/api/elsewhere", auth=f"Bearer {api.tokens['alice']}"),
        api.call("PATCH", "/api/v1/devices", auth=f"Bearer {api.tokens['alice']}"),  # 405
        api.call("POST", "/api/v1/devices/d1/commands", auth=f"Bearer {api.tokens['alice']}",
                 body=b"x" * (128 * 1024), headers={"Content-Type": "application/json"}),
        api.call("POST", "/api/v1/devices/d1/commands", auth=f"Bearer {api.tokens['alice']}",
                 body=b"{}", headers={"Content-Type": "text/plain"}),
        api.call("GET", "/api/v1/me/devices/d1/export", auth=f"Bearer {api.tokens['user']}"),
        api.call("GET", "/api/v1/openapi.json"),
    ]
    for answer in others:
        assert_api_headers(answer, str(answer.status))
        seen.add(answer.status)
    assert {200, 201, 400, 401, 403, 404, 405, 413, 415, 422} <= seen, sorted(seen)
