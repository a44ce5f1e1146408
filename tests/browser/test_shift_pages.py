"""The shift report's pages in a real headless Chromium: the console's "Shifts" page
(overdue devices first, filters, condition changes marked, the limit, CSV) and the
portal's "My shifts", against a real server whose check-ins and check-outs came
through the real broker and ingest."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from agent_protocol import Record, encode_telemetry, telemetry_topic
from tests.browser.conftest import TENANT, Browser, Fleet
from tests.support.mqtt import publish_as_devices
from tests.support.services import wait_for_count

pytestmark = pytest.mark.integration

NOTES_IN = "dropped on the stairs"


@pytest.fixture(autouse=True)
def no_script_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """As in test_pages.py: no CSP violation, no uncaught exception, no stack trace."""
    yield
    if "browser" not in request.fixturenames:
        return
    b: Browser = request.getfixturevalue("browser")
    errors = [m for m in b.console_errors()
              if "Content Security Policy" in m or "Uncaught" in m]
    assert not errors, errors
    body = b.driver.find_element("tag name", "body").text
    assert "Traceback" not in body and "TypeError" not in body


def _event(device: str, rid: str, at: datetime, event: str, **data: Any
           ) -> tuple[str, bytes]:
    rec = Record(rid, int(at.timestamp() * 1000), {"event": event, **data})
    return (telemetry_topic(TENANT, device, "checkinout"),
            encode_telemetry([rec], device=device, kind="checkinout"))


@pytest.fixture(scope="module")
def shifts(fleet: Fleet) -> datetime:
    """corp1: out at 07:00 yesterday in good order, back at 15:00 with a damaged case;
    corp2: out for 20 hours (overdue under the default, 8 h + 1 h); pers1: an hour."""
    now = datetime.now(UTC).replace(microsecond=0)
    day = (now - timedelta(days=1)).replace(hour=0, minute=0, second=0)
    h = timedelta(hours=1)
    messages = [
        _event("corp1", "c1-out", day + 7 * h, "check_out", user_id="u-17",
               condition={"battery_pct": 95, "screen": "ok", "case": "ok"}),
        _event("corp1", "c1-in", day + 15 * h, "check_in", user_id="u-17",
               condition={"battery_pct": 40, "screen": "ok", "case": "damaged",
                          "notes": NOTES_IN}),
        _event("corp2", "c2-out", now - 20 * h, "check_out", user_id="u-20"),
        _event("pers1", "p1-out", now - 2 * h, "check_out", user_id="u-30"),
        _event("pers1", "p1-in", now - h, "check_in", user_id="u-30"),
    ]
    publish_as_devices(fleet.broker.port, messages)
    assert wait_for_count(fleet.database, "SELECT count(*) FROM checkout_events",
                          len(messages), timeout=60) == len(messages)
    assert wait_for_count(fleet.database, "SELECT count(*) FROM telemetry "
                          "WHERE kind = 'checkinout'", len(messages), timeout=60) == len(messages)
    return day


def _rows(b: Browser, table: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for tr in b.find_all(f"{table} tbody tr"):
        out.setdefault(str(tr.get_attribute("data-device")), []).append(str(tr.text))
    return out


def _open_shifts(b: Browser, fleet: Fleet, token: str) -> None:
    b.sign_in("/console/", token)
    b.click("#nav button[data-view=shifts]")
    b.wait_css("#shifts-table tbody tr")


def test_console_shows_overdue_devices_first_and_marks_condition_changes(
        fleet: Fleet, browser: Browser, shifts: datetime) -> None:
    b = browser
    _open_shifts(b, fleet, fleet.alice)
    # Overdue first: corp2, out 20 hours, past the default limit.
    limit = b.wait_text("#overdue-limit", "overdue when")
    assert "longer than 9 h 00 min" in limit
    assert "the longest shift of the last 30 days, 8 h 00 min, plus 1 hour" in limit
    overdue = _rows(b, "#overdue-table")
    assert list(overdue) == ["corp2"] and "u-20" in overdue["corp2"][0]
    assert "1 device overdue" in b.text("#overdue-table caption")
    # Every shift of the last 7 days, each device's condition out and back.
    rows = _rows(b, "#shifts-table")
    assert set(rows) == {"corp1", "corp2", "pers1"}
    [corp1] = rows["corp1"]
    assert "u-17" in corp1 and "checked in" in corp1 and "8 h 00 min" in corp1
    assert "case: ok → damaged" in corp1 and "battery: 95 % → 40 % (-55)" in corp1
    assert "overdue" in rows["corp2"][0] and "so far" in rows["corp2"][0]
    # The changed fields are marked on both sides, the others not; the row stands out.
    tr = b.find("#shifts-table tr[data-device=corp1]")
    assert "changed" in tr.get_attribute("class").split()
    marked = [(m.get_attribute("data-field"), m.text)
              for m in tr.find_elements("css selector", "mark.changed-field")]
    assert sorted(marked) == [("battery_pct", "40 %"), ("battery_pct", "95 %"),
                              ("case", "damaged"), ("case", "ok")]
    # Notes sent only at check-in: not stored at check-out, so no change to mark.
    assert "not stored" in tr.text and NOTES_IN in tr.text
    pers = b.find("#shifts-table tr[data-device=pers1]")
    assert "changed" not in (pers.get_attribute("class") or "").split()

    # Filters: one device, a status, a user id as stored.
    b.fill("#shift-device", "corp1")
    b.click("#shift-show")
    b.wait(lambda: list(_rows(b, "#shifts-table")) == ["corp1"], "only corp1")
    b.fill("#shift-device", "")
    b.select("#shift-status-filter", "overdue")
    b.click("#shift-show")
    b.wait(lambda: list(_rows(b, "#shifts-table")) == ["corp2"], "only the overdue one")
    b.select("#shift-status-filter", "")
    b.fill("#shift-user", "u-30")
    b.click("#shift-show")
    b.wait(lambda: list(_rows(b, "#shifts-table")) == ["pers1"], "only u-30's shift")
    b.fill("#shift-user", "nobody")
    b.click("#shift-show")
    b.wait_text("#shift-box", "No shift in this time range")


def test_console_sets_the_overdue_limit_and_downloads_csv(
        fleet: Fleet, browser: Browser, shifts: datetime) -> None:
    b = browser
    _open_shifts(b, fleet, fleet.alice)
    b.wait_css("#overdue-table")
    b.fill("#overdue-hours", "48")
    b.click("#overdue-save")
    b.wait_text("#overdue-status", "The limit is now 2 days 0 h")
    b.wait_text("#overdue-none", "No device is overdue")
    assert "set by alice" in b.wait_text("#overdue-limit", "set by")
    assert "checked out" in b.text("#shifts-table tr[data-device=corp2]")
    b.click("#overdue-default")
    b.wait_text("#overdue-status", "The default limit is in force again")
    b.wait_css("#overdue-table tr[data-device=corp2]")

    # The same shifts as CSV, saved by the browser.
    for old in b.downloads.glob("shifts-*.csv"):
        old.unlink()
    b.click("#shift-csv")
    b.wait_text("#shift-status", "CSV of 3 shifts")
    path = b.wait(lambda: next((p for p in b.downloads.glob("shifts-*.csv")), None),
                  "the downloaded CSV")
    b.wait(lambda: not list(b.downloads.glob("*.crdownload")) and path.stat().st_size,
           "the download finished")
    rows = list(csv.DictReader(io.StringIO(path.read_text(), newline="")))
    by_device = {r["device"]: r for r in rows}
    assert set(by_device) == {"corp1", "corp2", "pers1"}
    assert (by_device["corp1"]["out_case"], by_device["corp1"]["in_case"]) == ("ok", "damaged")
    assert by_device["corp1"]["in_notes"] == NOTES_IN
    assert by_device["corp2"]["status"] == "overdue"


def test_an_auditor_reads_the_report_but_cannot_set_the_limit(
        fleet: Fleet, browser: Browser, shifts: datetime) -> None:
    token = fleet.server.cli("admin", "create", "--tenant", TENANT, "--name", "audrey",
                             "--role", "auditor").strip()
    b = browser
    _open_shifts(b, fleet, token)
    b.wait_css("#overdue-table tr[data-device=corp2]")
    assert not b.find("#overdue-form").is_displayed()
    assert "corp1" in _rows(b, "#shifts-table")


def test_portal_shows_my_shifts_and_that_an_admin_read_them(
        fleet: Fleet, browser: Browser, shifts: datetime) -> None:
    status, _ = fleet.api("GET", "/reports/shifts?device=corp1", fleet.bob)
    assert status == 200  # bob read corp1's shifts: its user will see it
    b = browser
    b.sign_in("/portal/", fleet.user)
    b.wait_css("#shifts-table tbody tr")
    rows = b.find_all("#shifts-table tbody tr")
    assert len(rows) == 1  # corp1's only: the token covers corp1
    text = rows[0].text
    assert "u-17" in text and "checked in" in text and "case: ok → damaged" in text
    assert [m.text for m in rows[0].find_elements("css selector", "mark.changed-field")
            if m.get_attribute("data-field") == "case"] == ["ok", "damaged"]
    headers = [th.text for th in b.find_all("#shifts-table thead th")]
    assert "Device" not in headers and headers[0] == "User"
    b.wait_text("#access-table", "bob")
    reads = [r.text for r in b.find_all("#access-table tbody tr") if "bob" in r.text]
    assert any("shifts (who had the device, its condition)" in r for r in reads), reads
