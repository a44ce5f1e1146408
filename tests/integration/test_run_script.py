"""The README's main command, `scripts/run`, end to end: server and simulated fleet
come up on their own, the banner's addresses and tokens work while it runs, the
agents answer the demo's commands, and the server's totals match the simulator's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import urllib.error
import urllib.request

import pytest

from tests.support.services import REPO, free_port

pytestmark = pytest.mark.integration


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _get(url: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                 if token else {})
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_scripts_run_shows_the_fleet_and_its_totals_match() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MDM_")}
    if "MDM_PG_ADMIN_URL" in os.environ:
        env["MDM_PG_ADMIN_URL"] = os.environ["MDM_PG_ADMIN_URL"]
    env["MDM_DEMO_SECONDS"] = "15"
    port = free_port()
    env["MDM_HTTP_ADDR"] = f"127.0.0.1:{port}"  # the user's address is honoured
    proc = subprocess.Popen([str(REPO / "scripts" / "run")], env=env, cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    banner = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                banner.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert banner.wait(300), "".join(lines)[-4000:]
        text = "".join(lines)
        base = f"http://127.0.0.1:{port}"
        assert f"console       {base}/console/" in text, text[-4000:]
        assert f"portal        {base}/portal/" in text
        admin = re.search(r"admin alice +token: (\S+)", text)
        user = re.search(r"user of (sim-\d+) \(a personal phone\)\s+token: (\S+)", text)
        assert admin and user, text[-4000:]
        # While it runs: / leads to the console, and the printed tokens work.
        status, headers, _ = _get(base + "/")
        assert status == 302 and headers["Location"] == "/console/"
        assert _get(base + "/console/")[0] == 200
        status, _, body = _get(base + "/api/v1/devices?limit=100", admin.group(1))
        assert status == 200
        devices = json.loads(body)["devices"]
        assert len(devices) == 50
        assert sum(d["ownership"] == "personal" for d in devices) == 15
        assert {g for d in devices for g in d["groups"]} == {"field", "office"}
        status, _, body = _get(base + "/api/v1/me/devices", user.group(2))
        assert status == 200
        assert [d["device"] for d in json.loads(body)["devices"]] == [user.group(1)]
        status, _, body = _get(base + "/api/v1/policies", admin.group(1))
        assert {"field-staff", "personal-devices"} <= {
            p["name"] for p in json.loads(body)["policies"]}
        # The curl line is one an admin can paste.
        assert re.search(rf"curl -X POST {base}/api/v1/devices/sim-\d+/commands", text)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    text = "".join(lines)
    assert proc.returncode == 0, text[-4000:]
    assert "Traceback" not in text
    stored = [int(n.replace(",", "")) for n in re.findall(r"stored=([\d,]+)", text)]
    assert stored and max(stored) > 1000, text[-4000:]
    # The agents showed the commands' notices and acknowledged them.
    assert re.search(r"demo: lock on sim-\d+: completed", text), text[-4000:]
    assert re.search(r"demo: locate on sim-\d+: completed", text), text[-4000:]
    assert re.search(r"agents received \d+ commands, executed \d+ \(.*lock=1", text)
    # The server's totals next to the simulator's, kind by kind, and they match.
    rows = re.findall(r"^ +(\w+) +([\d,]+) \| +([\d,]+) = ([\d,]+) \+ ([\d,]+) \+ ([\d,]+)$",
                      text, re.M)
    assert {r[0] for r in rows} == {"location", "identity", "sim", "network", "apps",
                                    "checkinout"}, text[-4000:]
    for kind, sent, held, *parts in rows:
        assert sent == held, (kind, sent, held)
        assert int(held.replace(",", "")) == sum(int(p.replace(",", "")) for p in parts)
    by_kind = {r[0]: r for r in rows}
    assert by_kind["location"][4] != "0"  # personal phones off shift: suppressed
    assert by_kind["apps"][5] != "0"  # personal phones: apps not collected
    assert "the totals match" in text
    # The server ran as its own database role, not the superuser (it would refuse).
    assert re.search(r"database +postgresql://mdm_demo_server:\*\*\*@", text), text[-4000:]
