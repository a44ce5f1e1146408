"""The portal and the console in a real headless Chromium, against a real server,
PostgreSQL, Mosquitto and device agents running the real agent code.

Each test signs in by pasting a token, acts as a person would (clicks, forms) and
asserts what the page shows: text in elements, not just that a page loaded."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mdm_server.api.pages import WEB_ROOT
from tests.browser.conftest import IMEI, LOCATIONS, TENANT, Browser, Fleet
from tests.support.services import fetch

pytestmark = pytest.mark.integration

MASKED_IMEI = "*" * (len(IMEI) - 4) + IMEI[-4:]
IMEI_LINE = "Your IMEI (device identity number) is stored as its last 4 digits only."
WIPE_NOTICE = "Uw organisatie wist de bedrijfsapps en -gegevens op deze telefoon."


@pytest.fixture(autouse=True)
def no_script_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """No page may break its own Content-Security-Policy or throw: every test ends
    with the browser's console free of CSP violations and uncaught exceptions, and no
    page showing anything like a stack trace."""
    yield
    if "browser" not in request.fixturenames:
        return
    b: Browser = request.getfixturevalue("browser")
    errors = [m for m in b.console_errors()
              if "Content Security Policy" in m or "Uncaught" in m]
    assert not errors, errors
    body = b.driver.find_element("tag name", "body").text
    assert "Traceback" not in body and "at async" not in body and "TypeError" not in body


def _row(b: Browser, table: str, command_id: str) -> str:
    return b.text(f"{table} tr[data-command-id='{command_id}']")


def _command_id(b: Browser, status: str) -> str:
    return str(b.wait(lambda: b.find(f"{status} p").get_attribute("data-command-id"),
                      "the command id in the status"))


def _wait_state(b: Browser, table: str, command_id: str, state: str,
                timeout: float = 30.0) -> str:
    return str(b.wait(lambda: (t := _row(b, table, command_id)) and state in t and t,
                      f"command {command_id} {state}", timeout))


# --- served safely ---------------------------------------------------------------------


def test_pages_are_served_with_a_strict_policy_and_nothing_external(fleet: Fleet) -> None:
    for path, ctype in (("/portal/", "text/html"), ("/console/", "text/html"),
                        ("/console/console.js", "text/javascript"),
                        ("/portal/common/api.js", "text/javascript"),
                        ("/console/common/base.css", "text/css")):
        with urllib.request.urlopen(fleet.server.base + path, timeout=10) as resp:
            h = resp.headers
            assert resp.status == 200 and h["Content-Type"].startswith(ctype), path
            csp = h["Content-Security-Policy"]
            assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
            assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
            assert h["X-Content-Type-Options"] == "nosniff"
            assert h["Referrer-Policy"] == "no-referrer"
    with urllib.request.urlopen(fleet.server.base + "/console", timeout=10) as resp:
        assert resp.url.endswith("/console/")  # redirected to the page's directory
    for bad in ("/portal/../app.py", "/portal/nope.js", "/console/common/../../api/pages.py"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(fleet.server.base + bad, timeout=10)
        err.value.close()
        assert err.value.code == 404, bad
    # Nothing in the pages names another origin (the SVG namespace is a name, not a fetch).
    for f in WEB_ROOT.rglob("*"):
        if f.is_file():
            text = f.read_text().replace("http://www.w3.org/2000/svg", "")
            assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text), f
            assert "innerHTML" not in text and "eval(" not in text, f
            if f.suffix == ".html":
                assert "<script>" not in text and "style=" not in text, f


class _Unseekable(io.RawIOBase):
    """Where a streamed ZIP goes: no seeking back, so entries carry data descriptors,
    as the server's export writes them."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.buf += bytes(b)
        return len(b)


def test_export_progress_finds_each_zip_entry_however_the_bytes_are_cut(
        fleet: Fleet, browser: Browser) -> None:
    """The portal's export progress reads the entry names from the ZIP's local headers
    as the bytes arrive (common/zipscan.js): run it in the browser on a streamed ZIP
    cut into chunks of many sizes, headers split across chunks included."""
    out = _Unseekable()
    names = ["device.json", "notices.json", "telemetry/location.jsonl",
             "telemetry/location.csv", "telemetry/identity.jsonl"]
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for i, name in enumerate(names):
            with z.open(name, "w") as f:
                f.write(os.urandom(3000 * i))  # incompressible: signature look-alikes
                f.write(b"PK\x03\x04" + b"\xff" * 40)  # a fake header in the data
    data = bytes(out.buf)
    sizes = [1, 3, 29, 30, 31, 64, 4096, len(data)]
    b = browser
    b.open("/portal/")
    got = b.driver.execute_async_script("""
        const [b64, sizes, done] = arguments;
        import("/portal/common/zipscan.js").then(({ ZipScan }) => {
          const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
          const out = {};
          for (const size of sizes) {
            const z = new ZipScan();
            for (let i = 0; i < bytes.length; i += size) z.push(bytes.subarray(i, i + size));
            out[size] = { names: z.names, finished: z.finished(false), bytes: z.bytes };
          }
          done(out);
        }).catch((e) => done(String(e)));""", base64.b64encode(data).decode(), sizes)
    assert isinstance(got, dict), got
    for size in sizes:
        assert got[str(size)] == {"names": names, "finished": names[:-1],
                                  "bytes": len(data)}, size


# --- the console --------------------------------------------------------------------------


def test_console_refuses_bad_tokens_and_lists_the_devices(fleet: Fleet, browser: Browser
                                                          ) -> None:
    b = browser
    b.open("/console/")
    b.driver.execute_script("sessionStorage.clear()")
    b.driver.refresh()
    b.fill("#token", "not-a-token")
    b.click("#sign-in button[type=submit]")
    assert "Sign-in failed: the token is not valid" in b.wait_text("#sign-in-status",
                                                                   "not valid")
    assert b.find("#token").is_displayed()
    # A device user's token is not an admin's: the API's answer is shown.
    b.sign_in("/console/", fleet.user)
    assert "this needs an admin or auditor" in b.wait_text("#app-status", "needs an admin")
    assert not b.find("#nav").is_displayed()

    b.sign_in("/console/", fleet.alice)
    b.wait_css("#devices-table tbody tr")
    rows = [r.text for r in b.find_all("#devices-table tbody tr")]
    assert [r.split()[0] for r in rows] == ["corp1", "corp2", "pers1"]
    assert "corporate" in rows[0] and "field" in rows[0] and "enrolled" in rows[0]
    assert "personal" in rows[2]
    assert b.text("#devices-table caption") == "3 devices"
    # The token stays out of the URL and in this tab's sessionStorage only.
    assert fleet.alice not in b.driver.current_url
    assert b.driver.execute_script("return sessionStorage.getItem('mdm.token')") == fleet.alice
    assert b.driver.execute_script("return localStorage.length") == 0


def test_map_draws_every_stored_location_in_the_time_range(fleet: Fleet, browser: Browser
                                                           ) -> None:
    b = browser
    b.sign_in("/console/", fleet.alice)
    b.open("/console/#device=corp1")
    assert b.wait_text("#fact-ownership", "corporate") == "corporate"
    # Last known state: the newest record of each kind, as stored (IMEI masked).
    identity = b.wait_text("#device-last [data-kind=identity]", "IMEI")
    assert MASKED_IMEI in identity and IMEI not in identity
    assert "52.387" in b.text("#device-last [data-kind=location]")  # the 40th point

    # Default range (the last 24 h): every point.
    b.wait_text("#map-summary", f"{LOCATIONS} points")
    assert _polyline_points(b) == LOCATIONS
    assert len(b.find_all("#location-map circle")) == LOCATIONS

    start = fleet.base_ts + timedelta(minutes=10)
    end = fleet.base_ts + timedelta(minutes=30)
    b.set_value("#map-from", start.strftime("%Y-%m-%dT%H:%M"))
    b.set_value("#map-to", end.strftime("%Y-%m-%dT%H:%M"))
    b.click("#map-show")
    expected = fleet.count(
        "SELECT count(*) FROM telemetry WHERE tenant_id = $1 AND device_id = 'corp1' "
        "AND kind = 'location' AND ts >= $2 AND ts < $3", TENANT, start, end)
    assert expected == 20
    summary = b.wait_text("#map-summary", f"{expected} points from")
    assert _polyline_points(b) == expected
    assert len(b.find_all("#location-map circle")) == expected
    assert b.find("#location-map").get_attribute("data-points") == str(expected)
    assert f"{expected} location points of corp1" in b.find("#location-map title").get_attribute(
        "textContent")
    assert "to" in summary
    # Points lie inside the drawing and are not all on one spot.
    xy = [tuple(map(float, p.split(","))) for p in
          b.find("#location-track").get_attribute("points").split()]
    assert all(0 <= x <= 800 and 0 <= y <= 500 for x, y in xy)
    assert len(set(xy)) == expected

    # An empty range says so instead of drawing.
    b.set_value("#map-from", (fleet.base_ts - timedelta(hours=5)).strftime("%Y-%m-%dT%H:%M"))
    b.set_value("#map-to", (fleet.base_ts - timedelta(hours=4)).strftime("%Y-%m-%dT%H:%M"))
    b.click("#map-show")
    b.wait_text("#map-summary", "No location in this time range")
    assert not b.find_all("#location-track")


def test_console_says_why_a_personal_device_has_no_location(fleet: Fleet, browser: Browser
                                                           ) -> None:
    """pers1 is in the group of the field-staff policy, which collects location; as a
    personal device it gets that policy merged with the floor, which does not."""
    b = browser
    b.sign_in("/console/", fleet.alice)
    b.open("/console/#device=pers1")
    fact = b.wait_text("#fact-policy", "field-staff+personal-floor")
    assert "merged with the personal-device floor" in fact
    why = b.wait_text("#location-not-collected", "not collected")
    assert why == ("Location is not collected for this device: pers1 is a personal device, "
                   "and the personal-device floor collects no location (policy in force: "
                   "field-staff+personal-floor).")
    assert "No location in this time range" not in b.text("#map-summary")
    assert not b.find_all("#location-map")
    # A corporate device under the same policy still gets its map.
    b.open("/console/#device=corp1")
    b.wait_text("#map-summary", f"{LOCATIONS} points")
    assert not b.find_all("#location-not-collected")
    # The policies page lists which policy decides for each personal device.
    b.open("/console/#policies")
    row = b.wait_text("#personal-table", "pers1")
    assert "field-staff+personal-floor" in row and "merged with the personal-device floor" in row
    b.click("#personal-floor summary")
    assert "Your location is not collected." in b.wait_text("#personal-floor", "location")

    # The personal device's user reads that the floor protects them.
    token = fleet.server.cli("user", "token", "--tenant", TENANT, "--device", "pers1").strip()
    b.sign_in("/portal/", token)
    assert b.wait_text("#policy-name", "field-staff") == "field-staff+personal-floor"
    assert "Your location is not collected." in b.text("#policy-explanation")
    assert "at least the protection every personal device gets" in b.wait_text(
        "#policy-floor", "personal device")


def _polyline_points(b: Browser) -> int:
    pts = b.wait_css("#location-track").get_attribute("points")
    return len(pts.split())


def test_wipe_with_a_notice_is_listed_and_completes(fleet: Fleet, browser: Browser) -> None:
    b = browser
    b.sign_in("/console/", fleet.alice)
    b.open("/console/#commands=corp1")
    b.wait_css("#cmd-device option[value=corp1]")
    b.select("#cmd-type", "wipe")
    b.select("#cmd-scope", "managed")
    # The text sent when none is given: here the built-in one for a managed wipe.
    assert "personal apps and data stay" in b.wait_text("#cmd-template", "Template (built in")
    b.fill("#cmd-reason", "lost on the night shift")
    b.fill("#cmd-notice", WIPE_NOTICE)
    b.fill("#cmd-lang", "nl")
    b.click("#cmd-submit")
    status = b.wait_text("#command-status", "The wipe (managed) of corp1 is")
    assert re.search(r"is (queued|sent)", status), status
    command_id = _command_id(b, "#command-status")
    row = b.wait(lambda: _row(b, "#commands-table", command_id), "the command in the list")
    assert WIPE_NOTICE in row and "[nl]" in row and "lost on the night shift" in row
    row = _wait_state(b, "#commands-table", command_id, "completed")
    assert "alice" in row
    # The real agent verified it and showed exactly that notice.
    agent = fleet.agents["corp1"]
    assert (agent.notices[-1].text, agent.notices[-1].lang) == (WIPE_NOTICE, "nl")
    assert agent.actions[-1].command_id == command_id
    fleet.state["wipe"] = command_id


def test_factory_reset_needs_a_second_admin(fleet: Fleet, browser: Browser) -> None:
    b = browser
    b.sign_in("/console/", fleet.alice)
    b.open("/console/#commands=corp2")
    b.wait_css("#cmd-device option[value=corp2]")
    b.select("#cmd-type", "factory_reset")
    assert b.text("#cmd-submit") == "Request factory reset"
    b.fill("#cmd-reason", "reissue to a new worker")
    b.click("#cmd-submit")
    b.wait_text("#command-status", "waiting for approval by a second admin")
    command_id = _command_id(b, "#command-status")
    _wait_state(b, "#commands-table", command_id, "pending approval")

    # Alice cannot approve her own request: the page shows the API's refusal.
    b.click("#nav button[data-view=approvals]")
    row = b.wait(lambda: _row(b, "#approvals-table", command_id), "the queued reset")
    assert "factory reset" in row and "alice" in row
    b.click(f"#approvals-table tr[data-command-id='{command_id}'] button[data-action=approve]")
    refusal = b.wait_text("#approvals-status", "cannot approve")
    assert "the admin who requested the command cannot approve it" in refusal
    assert "error" in b.find("#approvals-status").get_attribute("class")
    assert _row(b, "#approvals-table", command_id)  # still waiting
    assert not fleet.agents["corp2"].actions  # nothing was sent

    # Bob sees it in his queue and approves it.
    b.sign_in("/console/", fleet.bob)
    b.open("/console/#approvals")
    row = b.wait(lambda: _row(b, "#approvals-table", command_id), "the reset in bob's queue")
    assert "corp2" in row and "reissue to a new worker" in row and "alice" in row
    b.click(f"#approvals-table tr[data-command-id='{command_id}'] button[data-action=approve]")
    done = b.wait_text("#approvals-status", "Approved")
    assert re.search(r"Approved: the factory reset of corp2 is now (queued|sent)", done), done
    b.wait(lambda: not b.find_all(f"#approvals-table tr[data-command-id='{command_id}']"),
           "the reset left the queue")
    # And it goes on to the device.
    b.open("/console/#commands=corp2")
    row = _wait_state(b, "#commands-table", command_id, "completed")
    assert "approved by bob" in row
    assert fleet.agents["corp2"].actions[-1].type == "factory_reset"


def test_remote_view_needs_the_notice_its_user_is_asked_with(fleet: Fleet,
                                                              browser: Browser) -> None:
    b = browser
    b.sign_in("/console/", fleet.alice)
    b.open("/console/#commands=pers1")
    b.wait_css("#cmd-device option[value=pers1]")
    b.select("#cmd-type", "remote_view")
    assert b.text("#cmd-submit") == "Ask to view the screen"
    assert "No template" in b.wait_text("#cmd-template", "No template")
    b.select("#cmd-mode", "session")
    b.fill("#cmd-reason", "the scanner app freezes at log-in")
    # Without a notice the form is not sent: the user is asked with it.
    b.click("#cmd-submit")
    assert b.driver.execute_script("return !document.querySelector('#cmd-notice')"
                                   ".checkValidity()")
    time.sleep(1)
    assert not b.text("#command-status")
    assert not fleet.agents["pers1"].questions
    b.fill("#cmd-notice", "Your admin asks to see your screen, live. Accept?")
    b.click("#cmd-submit")
    b.wait_text("#command-status", "The remote view (session) of pers1 is")
    command_id = _command_id(b, "#command-status")
    # The agent put the notice to its user, who accepted: then, only then, it ran.
    row = _wait_state(b, "#commands-table", command_id, "completed")
    assert "remote view (session)" in row and "Accept?" in row
    agent = fleet.agents["pers1"]
    assert agent.questions[-1].text == "Your admin asks to see your screen, live. Accept?"
    assert agent.actions[-1].command_id == command_id
    assert dict(agent.actions[-1].params) == {"mode": "session",
                                              "reason": "the scanner app freezes at log-in"}


def test_group_wipe_shows_its_progress(fleet: Fleet, browser: Browser) -> None:
    b = browser
    b.sign_in("/console/", fleet.alice)
    b.open("/console/#commands")
    b.wait_css("#cmd-device option")
    b.click("#target-group")
    b.fill("#cmd-group", "field")
    b.select("#cmd-type", "wipe")
    b.select("#cmd-scope", "full")
    b.fill("#cmd-reason", "shipment lost")
    b.click("#cmd-submit")
    b.wait_text("#command-status", "Group request accepted: 2 commands for group field")
    b.wait_text("#batch-progress-text", "2 of 2 devices done", timeout=40)
    bar = b.find("#batch-progress")
    assert bar.get_attribute("value") == bar.get_attribute("max") == "2"
    assert "completed: 2" in b.text("#batch-states")
    assert "pers1 (personal device)" in b.text("#batch-refused")
    assert "is done" in b.text("#batch .status")


def test_policy_preview_shows_the_masked_output_and_save_lists_every_issue(
        fleet: Fleet, browser: Browser) -> None:
    b = browser
    b.sign_in("/console/", fleet.alice)
    b.open("/console/#policies=field-staff")
    assert "field-staff" in b.wait_text("#policies-table", "field-staff")
    doc = json.loads(b.wait(lambda: b.find("#policy-doc").get_attribute("value"),
                            "the policy document"))
    assert doc["fields"]["identity.imei"] == {"action": "mask", "keep_last": 4}
    assert IMEI_LINE in b.text("#policy-explanation")

    b.select("#preview-kind", "identity")
    sample = json.loads(b.find("#preview-payload").get_attribute("value"))
    sample["data"]["imei"] = IMEI
    b.set_value("#preview-payload", json.dumps(sample))
    b.click("#preview-run")
    stored = b.wait_text("#preview-stored", "imei")
    assert f'"imei": "{MASKED_IMEI}"' in stored and IMEI not in stored
    assert "identity is collected" in b.text("#preview-collected")
    assert IMEI_LINE in b.text("#preview-explanation")
    assert "made for this request only" in b.text("#preview-hash-note")

    # A draft that masks nothing shows the raw value: the preview runs the edited text.
    draft = {**doc, "fields": {}}
    b.set_value("#policy-doc", json.dumps(draft))
    b.click("#preview-run")
    b.wait_text("#preview-stored", IMEI)

    # Save refuses an invalid document and lists every problem with its path.
    bad = {**doc, "fields": {"identity.imei": {"action": "mask", "keep_last": 99}},
           "collect": {"location": "yes"}}
    b.set_value("#policy-doc", json.dumps(bad))
    b.click("#policy-save")
    err = b.wait_text("#policy-status", "the policy is not valid")
    assert 'fields["identity.imei"].keep_last' in err and "collect.location" in err
    # Fixed, it saves as a new version.
    b.set_value("#policy-doc", json.dumps(doc))
    b.click("#policy-save")
    b.wait_text("#policy-status", "Saved field-staff as version 2")


# --- the portal ---------------------------------------------------------------------------


def _ensure_wipe_notice(fleet: Fleet) -> None:
    """The wipe with the Dutch notice (issued through the console in its own test; here
    through the API when that test did not run first)."""
    if "wipe" in fleet.state:
        return
    status, cmd = fleet.api("POST", "/devices/corp1/commands", fleet.alice,
                            {"type": "wipe", "scope": "managed", "reason": "lost",
                             "notice": {"text": WIPE_NOTICE, "lang": "nl"}})
    assert status == 201, cmd
    deadline = time.monotonic() + 30
    while fleet.api("GET", f"/devices/corp1/commands/{cmd['command_id']}",
                    fleet.alice)[1]["state"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    fleet.state["wipe"] = cmd["command_id"]


def test_portal_shows_my_data_notices_policy_and_who_read_it(fleet: Fleet, browser: Browser
                                                             ) -> None:
    _ensure_wipe_notice(fleet)
    status, _ = fleet.api("GET", "/devices/corp1/data?kind=location&limit=1", fleet.bob)
    assert status == 200  # an admin's read of personal data: the user will see it
    b = browser
    # An admin token is not a device user's: the API's answer is shown.
    b.sign_in("/portal/", fleet.alice)
    assert "this needs a device user's token" in b.wait_text("#devices-status", "device user")

    b.sign_in("/portal/", fleet.user)
    b.wait_css("#devices button[data-device=corp1]")
    assert b.find("#devices button[data-device=corp1]").get_attribute("aria-pressed") == "true"
    assert "company owned, enrolled" in b.text("#devices li")

    # My data, a page at a time with the API's cursor (asked for: the page opens with
    # a summary, not with records).
    b.wait_css("#summary-table")
    assert not b.find_all("#data-records")
    b.select("#data-kind", "location")
    b.select("#data-limit", "25")
    b.click("#data-show")
    b.wait_text("#data-records caption", "Location: page 1, 25 records")
    assert len(b.find_all("#data-records tbody tr")) == 25
    first_page = b.text("#data-records tbody tr")
    assert "Latitude" in first_page and "52.36" in first_page and "field-staff v1" in first_page
    assert "Accuracy\n6 m" in first_page
    b.click("#data-next")
    b.wait_text("#data-records caption", f"Location: page 2, {LOCATIONS - 25} records")
    assert not b.find("#data-next").is_displayed()
    assert "no more records" in b.text("#data-status")
    b.select("#data-kind", "identity")
    b.click("#data-show")
    identity = b.wait_text("#data-records", "IMEI")
    assert MASKED_IMEI in identity and IMEI not in identity

    # My notices: the wipe's text and language as sent, when sent and shown, the outcome.
    row = b.wait(lambda: next((r.text for r in b.find_all("#notices-table tbody tr")
                               if WIPE_NOTICE in r.text), None), "the wipe's notice")
    assert "wipe (company apps and data)" in row and "nl" in row and "completed" in row
    assert b.find("#notices-table .notice-text[lang=nl]").text == WIPE_NOTICE
    cells = b.find_all("#notices-table tbody tr")[0].find_elements("tag name", "td")
    assert cells[4].text.strip() not in ("", "—") and cells[5].text.strip() not in ("", "—")

    # My policy in plain words.
    assert b.wait_text("#policy-name", "field-staff") == "field-staff"
    assert IMEI_LINE in b.text("#policy-explanation")

    # Who read my data: bob's read above, when, and what it was.
    b.wait_text("#access-table", "bob")
    [row] = [r for r in b.find_all("#access-table tbody tr") if "bob" in r.text]
    when, who, what = (c.text.strip() for c in row.find_elements("tag name", "td"))
    assert when and who.startswith("bob") and what


def test_portal_export_shows_progress_and_finishes(fleet: Fleet, browser: Browser) -> None:
    b = browser
    status, summary = fleet.api("GET", "/me/devices/corp1/export/summary", fleet.user)
    assert status == 200 and summary["total"] == LOCATIONS + 1
    b.sign_in("/portal/", fleet.user)
    b.wait_css("#devices button[data-device=corp1]")
    b.click("#export-start")
    done = b.wait_text("#export-status", "finished", timeout=60)
    assert f"Export of corp1 finished: {summary['total']} records" in done
    progress = b.text("#export-progress-text")
    assert progress.startswith(f"{summary['total']} of {summary['total']} records")
    bar = b.find("#export-progress")
    assert bar.get_attribute("value") == bar.get_attribute("max") == str(summary["total"])
    assert b.find("#export-download").text.startswith("Save corp1-export.zip")
    # The browser saved the ZIP: the whole export, streamed.
    path = b.downloads / "corp1-export.zip"
    b.wait(lambda: path.exists() and not list(b.downloads.glob("*.crdownload")),
           "the downloaded export")
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        assert {"device.json", "notices.json", "access-log.json", "policy.json",
                "telemetry/location.jsonl", "telemetry/location.csv"} <= names
        assert len(z.read("telemetry/location.jsonl").splitlines()) == LOCATIONS
        assert MASKED_IMEI.encode() in z.read("telemetry/identity.jsonl")


def test_portal_erasure_request_is_pending_with_a_due_date_until_an_admin_decides(
        fleet: Fleet, browser: Browser) -> None:
    b = browser
    b.sign_in("/portal/", fleet.user)
    b.wait_css("#erasure-list p, #erasure-table")
    before = datetime.now(UTC)
    b.click("#erasure-submit")
    shown = b.wait_text("#erasure-status", "Your erasure request is pending")
    assert "It is due by" in shown
    due = datetime.fromisoformat(b.find("#erasure-status time").get_attribute("datetime"))
    assert timedelta(days=29, hours=23) < due - before < timedelta(days=30, minutes=5)
    row = b.wait_text("#erasure-table tbody tr", "pending")
    assert b.find("#erasure-table tbody tr time").text in row
    assert not b.find("#erasure-submit").is_enabled()  # one pending request at a time

    # An admin refuses it with a reason; the user sees the decision.
    b.sign_in("/console/", fleet.bob)
    b.open("/console/#erasure")
    row = b.wait_text("#erasure-table tbody tr", "corp1")
    assert "pending" in row
    b.fill("#erasure-table input[type=text]", "legal hold on this device")
    b.click("#erasure-table button.secondary")
    b.wait_text("#erasure-status", "The erasure request for corp1 is refused")
    b.sign_in("/portal/", fleet.user)
    row = b.wait_text("#erasure-table tbody tr", "refused")
    assert "legal hold on this device" in row and "bob" in row
    assert b.find("#erasure-submit").is_enabled()


def test_auditor_sees_the_console_read_only(fleet: Fleet, browser: Browser) -> None:
    auditor = fleet.server.cli("admin", "create", "--tenant", TENANT, "--name", "audrey",
                               "--role", "auditor").strip()
    b = browser
    b.sign_in("/console/", fleet.alice)
    assert b.wait_text("#who", "alice") == "alice (admin)"
    assert not b.find("#read-only-note").is_displayed()
    assert b.find("#nav button[data-view=commands]").is_displayed()

    b.sign_in("/console/", auditor)
    assert b.wait_text("#who", "audrey") == "audrey (auditor, read-only)"
    assert "the console is read-only" in b.text("#read-only-note")
    assert not b.find("#nav button[data-view=commands]").is_displayed()
    # What an auditor may read is there...
    b.wait_text("#devices-table", "corp1")
    b.open("/console/#device=corp1")
    b.wait_css("#device-last [data-kind=location]")
    assert b.wait_text("#fact-ownership", "corporate") == "corporate"
    # ... and nothing that writes is offered.
    assert not b.find("#send-command").is_displayed()
    b.open("/console/#policies=field-staff")
    b.wait_css("#policy-doc")
    assert b.find("#policy-doc").get_attribute("readonly") is not None
    assert not b.find("#policy-save").is_displayed()
    assert not b.find("#preview-run").is_displayed()
    assert not b.find("#new-policy-form").is_displayed()
    b.open("/console/#erasure")
    b.select("#erasure-state", "")
    b.wait_css("#erasure-table, #erasure-requests p.empty")
    assert not [btn for btn in b.find_all("#erasure-table button") if btn.is_displayed()]
    b.open("/console/#approvals")
    b.wait_css("#approvals-table, #approvals p.empty")
    assert not [btn for btn in b.find_all("#approvals-table button") if btn.is_displayed()]


def test_console_fulfils_an_erasure_and_the_portal_keeps_only_the_fact(
        fleet: Fleet, browser: Browser) -> None:
    from agent_protocol import Record, encode_telemetry, telemetry_topic
    from tests.support.mqtt import publish_as_devices
    from tests.support.services import wait_for_count

    base = int(fleet.base_ts.timestamp() * 1000)
    records = [Record(id=f"c2-{i}", ts_ms=base + i * 60_000,
                      data={"lat": 51.9 + i / 1000, "lon": 4.4, "accuracy_m": 8.0})
               for i in range(5)]
    publish_as_devices(fleet.broker.port, [(telemetry_topic(TENANT, "corp2", "location"),
                                            encode_telemetry(records, device="corp2",
                                                             kind="location"))])
    wait_for_count(fleet.database, "SELECT count(*) FROM telemetry WHERE device_id = 'corp2'",
                   5, timeout=30)
    user2 = fleet.server.cli("user", "token", "--tenant", TENANT, "--device", "corp2").strip()

    b = browser
    b.sign_in("/portal/", user2)
    b.wait_css("#erasure-list p, #erasure-table")
    b.click("#erasure-submit")
    b.wait_text("#erasure-status", "Your erasure request is pending")

    b.sign_in("/console/", fleet.alice)
    b.open("/console/#erasure")
    b.click("#erasure-table button[aria-label='Fulfil the erasure request for corp2']")
    done = b.wait_text("#erasure-status", "The data of corp2 is erased")
    assert "request fulfilled" in done and "telemetry 5" in done
    assert "data_keys_destroyed 1" in done
    assert fleet.count("SELECT count(*) FROM telemetry WHERE device_id = 'corp2'") == 0
    assert fleet.count("SELECT count(*) FROM keystore.device_keys "
                       "WHERE device_id = 'corp2'") == 0

    # The erasure revoked the user's token: the portal refuses it.
    b.open("/portal/")
    b.driver.execute_script("sessionStorage.clear()")
    b.driver.refresh()
    b.fill("#token", user2)
    b.click("#sign-in button[type=submit]")
    assert "the token is not valid" in b.wait_text("#sign-in-status", "not valid")
    # With a token issued afterwards the user sees the fact, and no data any more.
    after = fleet.server.cli("user", "token", "--tenant", TENANT, "--device", "corp2").strip()
    b.sign_in("/portal/", after)
    row = b.wait_text("#erasure-table tbody tr", "fulfilled")
    assert "alice" in row
    b.select("#data-kind", "location")
    b.click("#data-show")
    assert "No records of this kind" in b.wait_text("#data-records", "No records")


def test_a_revoked_or_expired_token_is_refused_by_both_pages(fleet: Fleet, browser: Browser
                                                             ) -> None:
    """A token revoked (or expired) while a page is open: its next call shows the
    API's 401 text, and the page asks for a token again when reloaded."""
    def token_id(token: str) -> str:
        [row] = asyncio.run(fetch(fleet.database, "SELECT token_id::text AS id FROM api_tokens "
                                                  "WHERE token_sha256 = $1",
                                  hashlib.sha256(token.encode()).digest()))
        return str(row["id"])

    refused = "the token is not valid (unknown, expired or revoked)"
    b = browser
    user = fleet.server.cli("user", "token", "--tenant", TENANT, "--device", "corp1").strip()
    b.sign_in("/portal/", user)
    b.wait_css("#devices button[data-device=corp1]")
    b.wait_css("#summary-table")
    status, _ = fleet.api("DELETE", f"/tokens/{token_id(user)}", fleet.alice)
    assert status == 204
    b.select("#data-kind", "location")
    b.click("#data-show")
    assert refused in b.wait_text("#data-status", "not valid")
    b.driver.refresh()
    assert f"Sign-in failed: {refused}" in b.wait_text("#sign-in-status", "not valid")
    assert b.find("#token").is_displayed() and not b.find("#app").is_displayed()

    carol = fleet.server.cli("admin", "create", "--tenant", TENANT, "--name",
                             "carol-pages").strip()
    b.sign_in("/console/", carol)
    b.wait_css("#devices-table tbody tr")
    asyncio.run(fetch(fleet.database, "UPDATE api_tokens SET expires_at = now() - interval "
                                      "'1 second' WHERE token_id = $1::uuid", token_id(carol)))
    b.driver.refresh()
    assert f"Sign-in failed: {refused}" in b.wait_text("#sign-in-status", "not valid")
    assert b.find("#token").is_displayed() and not b.find("#nav").is_displayed()
