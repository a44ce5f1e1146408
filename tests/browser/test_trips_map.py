"""The console's device map with the trips analysis, and the Places page, in a real
headless Chromium against a real fleet (tests/browser/conftest.py): corp2 reports the
synthetic day of tests/support/trips.py (a 5 km trip, 30 minutes in the depot, the
trip back) through the real ingest, once as it is and, a day earlier, under a policy
that snaps to a 1 km grid."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from tests.browser.conftest import TENANT, Browser, Fleet
from tests.support.mqtt import publish_as_devices
from tests.support.services import wait_for_count
from tests.support.trips import DEPOT, Day, square, synthetic_day

pytestmark = pytest.mark.integration

DEVICE = "corp2"


@pytest.fixture(autouse=True)
def no_script_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """As in test_pages.py: no CSP violation, no uncaught exception, no stack trace."""
    yield
    b: Browser = request.getfixturevalue("browser")
    errors = [m for m in b.console_errors()
              if "Content Security Policy" in m or "Uncaught" in m]
    assert not errors, errors
    body = b.driver.find_element("tag name", "body").text
    assert "Traceback" not in body and "TypeError" not in body


@pytest.fixture(scope="module")
def days(fleet: Fleet) -> Iterator[tuple[Day, Day]]:
    """(the plain day, yesterday; the snapped day, the day before)."""
    base = (datetime.now(UTC) - timedelta(days=1)).replace(hour=7, minute=0, second=0,
                                                           microsecond=0)
    plain = synthetic_day(base)
    snapped = synthetic_day(base - timedelta(days=1))
    status, body = fleet.api("PUT", "/places/depot", fleet.alice, square(DEPOT, 300))
    assert status == 201, body
    publish_as_devices(fleet.broker.port, plain.messages(TENANT, DEVICE))
    sql = f"SELECT count(*) FROM telemetry WHERE device_id = '{DEVICE}' AND kind = 'location'"
    assert wait_for_count(fleet.database, sql, len(plain.points)) == len(plain.points)
    # The field-staff policy (corp2's) now snaps to 1 km: the day before is stored so.
    status, body = fleet.api("GET", "/policies/field-staff", fleet.alice)
    assert status == 200
    snapping = {**body["policy"], "location": {**body["policy"]["location"],
                                               "precision_m": 1000}}
    assert fleet.api("PUT", "/policies/field-staff", fleet.alice, snapping)[0] == 200
    try:
        # Workers reload a changed policy before their next batch (NOTIFY).
        publish_as_devices(fleet.broker.port, snapped.messages(TENANT, DEVICE))
        total = 2 * len(plain.points)
        assert wait_for_count(fleet.database, sql, total) == total
    finally:
        assert fleet.api("PUT", "/policies/field-staff", fleet.alice, body["policy"])[0] == 200
    yield plain, snapped


def _show(b: Browser, day: Day) -> None:
    b.open(f"/console/#device={DEVICE}")
    b.wait_text("#fact-ownership", "corporate")
    # The browser's zone is UTC (conftest): datetime-local values are UTC.
    b.set_value("#map-from", (day.start - timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M"))
    b.set_value("#map-to", (day.end + timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M"))
    b.click("#map-show")


def test_the_map_draws_trips_stops_and_places_with_a_day_summary(
        fleet: Fleet, browser: Browser, days: tuple[Day, Day]) -> None:
    plain, _ = days
    b = browser
    b.sign_in("/console/", fleet.alice)
    _show(b, plain)
    summary = b.wait_text("#trips-summary", "2 trips")
    assert "3 stops" in summary and "10.0 km" in summary, summary
    b.wait_text("#map-summary", f"{len(plain.points)} points")

    tracks = b.find_all("#location-map .trips polyline.trip")
    assert len(tracks) == 2
    colours = [b.driver.execute_script("return getComputedStyle(arguments[0]).stroke", t)
               for t in tracks]
    assert len(set(colours)) == 2, colours
    for t in tracks:
        xy = [tuple(map(float, p.split(","))) for p in t.get_attribute("points").split()]
        assert len(xy) > 50
        assert all(0 <= x <= 800 and 0 <= y <= 500 for x, y in xy)
        assert "5.0 km" in t.find_element("css selector", "title").get_attribute("textContent")
    # The outward track ends where the return track starts: at the depot.
    out_end = tracks[0].get_attribute("points").split()[-1]
    back_start = tracks[1].get_attribute("points").split()[0]
    ox, oy = map(float, out_end.split(","))
    bx, by = map(float, back_start.split(","))
    assert abs(ox - bx) < 5 and abs(oy - by) < 5

    stops = b.find_all("#location-map rect.stop")
    assert len(stops) == 3
    titles = [s.find_element("css selector", "title").get_attribute("textContent")
              for s in stops]
    assert sum("at depot" in t for t in titles) == 1, titles
    assert re.search(r"at depot: .* \((29|30|31) min\)", " ".join(titles)), titles
    place = b.find("#location-map path.place[data-name=depot]")
    assert place.get_attribute("d").startswith("M")

    day_row = b.text("#trips-days tbody tr")
    assert plain.start.date().isoformat() in day_row
    assert "10.0 km" in day_row and re.search(r"depot (29|30|31) min", day_row), day_row
    trips = b.find_all("#trips-table tbody tr")
    assert len(trips) == 2 and all("5.0 km" in r.text for r in trips)
    swatches = [r.find_element("css selector", ".swatch").get_attribute("class")
                for r in trips]
    assert swatches == ["swatch trip-c0", "swatch trip-c1"]
    assert "depot" in b.text("#stops-table")
    events = b.text("#place-events")
    assert "entered" in events and "left" in events
    assert not b.find_all("#trips-notes")


def test_under_snapping_the_console_says_so(fleet: Fleet, browser: Browser,
                                           days: tuple[Day, Day]) -> None:
    _, snapped = days
    b = browser
    b.sign_in("/console/", fleet.alice)
    _show(b, snapped)
    notes = b.wait_text("#trips-notes", "1000 m")
    assert "rounded to a grid of about 1000 m" in notes
    assert "no trip shorter than 1500 m" in notes
    assert "Place depot is smaller than one grid cell" in notes
    assert "2 trips" in b.text("#trips-summary")


def test_reading_the_map_is_in_the_device_users_access_log(
        fleet: Fleet, browser: Browser, days: tuple[Day, Day]) -> None:
    user = fleet.server.cli("user", "token", "--tenant", TENANT, "--device", DEVICE).strip()
    b = browser
    b.sign_in("/console/", fleet.bob)
    _show(b, days[0])
    b.wait_text("#trips-summary", "2 trips")
    status, log = fleet.api("GET", f"/me/devices/{DEVICE}/access-log", user)
    assert status == 200
    reads = [(e["actor"], e["what"]) for e in log["entries"] if e["actor"] == "bob"]
    assert ("bob", "trips") in reads and ("bob", "data:location") in reads


def test_a_range_without_a_start_draws_points_and_says_why_there_are_no_trips(
        fleet: Fleet, browser: Browser, days: tuple[Day, Day]) -> None:
    b = browser
    b.sign_in("/console/", fleet.alice)
    b.open(f"/console/#device={DEVICE}")
    b.wait_text("#fact-ownership", "corporate")
    b.click("#map-form .presets button:last-child")  # everything
    b.click("#map-show")
    b.wait_text("#trips-status", "at most 31 days")
    b.wait_text("#map-summary", "points from")
    assert not b.find_all("#location-map .trips")


def test_places_page_adds_lists_changes_and_deletes_a_place(fleet: Fleet, browser: Browser,
                                                            days: tuple[Day, Day]) -> None:
    b = browser
    b.sign_in("/console/", fleet.alice)
    b.open("/console/#places")
    b.wait_text("#places-table", "depot")
    b.fill("#place-name", "yard")
    bow_tie = ('{"type": "Polygon", "coordinates": [[[5, 52], [5.1, 52.1], [5.1, 52], '
               '[5, 52.1], [5, 52]]]}')
    b.driver.execute_script("arguments[0].value = arguments[1]", b.find("#place-geojson"),
                            bow_tie)
    b.click("#place-save")
    err = b.wait_text("#place-form-status", "Self-intersection")
    assert "coordinates" in err
    b.driver.execute_script("arguments[0].value = arguments[1]", b.find("#place-geojson"),
                            '{"type": "Polygon", "coordinates": [[[5, 52], [5.01, 52], '
                            '[5.01, 52.01], [5, 52.01], [5, 52]]]}')
    b.click("#place-save")
    assert "version 1" in b.wait_text("#place-form-status", "Saved yard")
    b.wait_text("#places-table", "yard")
    b.click("#places-table button[aria-label='Edit yard']")
    b.wait_text("#place-form-status", "Editing yard")
    b.click("#place-save")
    assert "version 2" in b.wait_text("#place-form-status", "Saved yard")
    b.click("#places-table button[aria-label='Delete yard']")
    b.wait_text("#places-status", "Deleted yard")
    assert "yard" not in b.text("#places-table")
    assert fleet.api("GET", "/places/yard/versions", fleet.alice)[1]["versions"][-1][
        "deleted"] is True


def test_an_auditor_sees_places_but_cannot_change_them(fleet: Fleet, browser: Browser,
                                                       days: tuple[Day, Day]) -> None:
    auditor = fleet.server.cli("admin", "create", "--tenant", TENANT, "--name", "audrey",
                               "--role", "auditor").strip()
    b = browser
    b.sign_in("/console/", auditor)
    b.open("/console/#places")
    b.wait_text("#places-table", "depot")
    assert not b.find("#place-form").is_displayed()
    assert not any(btn.is_displayed() for btn in b.find_all("#places-table button"))
