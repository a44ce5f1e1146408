"""Resource limits (OWASP API4): rate limits per token, body size, page size."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.services import (
    Server,
    create_database,
    drop_database,
    enroll_devices,
    running_broker,
    server_env,
)

pytestmark = pytest.mark.integration


def _post_raw(srv: Server, path: str, token: str, body: bytes) -> int:
    req = urllib.request.Request(srv.base + path, data=body, method="POST")
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def test_rate_limit_per_token_body_limit_and_page_cap(tmp_path: Path) -> None:
    database = asyncio.run(create_database())
    try:
        with running_broker(tmp_path) as broker:
            asyncio.run(enroll_devices(database, broker.url, "acme", ["d1"]))
            srv = Server(server_env(database, broker.url, MDM_API_RATE_PER_S="1",
                                    MDM_API_BURST="5"), tmp_path / "serve.log")
            alice = srv.cli("admin", "create", "--tenant", "acme", "--name", "alice").strip()
            bob = srv.cli("admin", "create", "--tenant", "acme", "--name", "bob").strip()
            srv.start()
            try:
                statuses = [srv.request("GET", "/api/v1/devices", alice)[0] for _ in range(8)]
                assert statuses[:5] == [200] * 5
                assert 429 in statuses[5:]
                req = urllib.request.Request(srv.base + "/api/v1/devices")
                req.add_header("Authorization", f"Bearer {alice}")
                try:
                    urllib.request.urlopen(req, timeout=10)
                    raise AssertionError("expected 429")
                except urllib.error.HTTPError as err:
                    assert err.code == 429
                    assert int(err.headers["Retry-After"]) >= 1
                    assert json.loads(err.read())["code"] == "rate_limited"
                # Another token has its own budget.
                assert srv.request("GET", "/api/v1/devices", bob)[0] == 200
                # 2 MiB to a 1 MiB route: refused before it is read.
                big = b'{"type": "lock", "reason": "' + b"x" * (2 * 1024 * 1024) + b'"}'
                assert _post_raw(srv, "/api/v1/devices/d1/commands", bob, big) == 413
                assert srv.request("GET", "/api/v1/devices?limit=501", bob)[0] == 400
            finally:
                srv.stop()
    finally:
        asyncio.run(drop_database(database))
