"""The console's live map and the portal's "now" panel, in a real headless Chromium
against a real fleet (tests/browser/conftest.py): points published over MQTT move
the map's markers; an admin's watching, a stored point and a command appear in the
device user's panel as they happen."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from tests.browser.conftest import LOCATIONS, TENANT, Browser, Fleet
from tests.support.mqtt import publish_as_devices
from tests.support.sse import SseClient

pytestmark = pytest.mark.integration


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


def _publish(fleet: Fleet, device: str, rid: str, lat: float, lon: float) -> None:
    ts = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    publish_as_devices(fleet.broker.port, [(
        f"mdm/v1/{TENANT}/devices/{device}/telemetry/location",
        json.dumps({"v": 1, "id": rid, "ts": ts,
                    "data": {"lat": lat, "lon": lon, "accuracy_m": 5}}).encode())])


def _marker(b: Browser, device: str) -> tuple[float, float]:
    m = b.find(f'#live-map .live-marker[data-device="{device}"]')
    return float(m.get_attribute("data-lat")), float(m.get_attribute("data-lon"))


def test_the_live_map_draws_the_fleet_and_moves_a_marker_when_a_point_arrives(
        fleet: Fleet, browser: Browser) -> None:
    b = browser
    b.sign_in("/console/", fleet.alice)
    b.click('#nav button[data-view="live"]')
    b.wait_css('#live-map .live-marker[data-device="corp1"]')
    lat, _lon = _marker(b, "corp1")  # its last known position, drawn at once
    assert lat == pytest.approx(52.3600 + (LOCATIONS - 1) * 0.0007)
    b.wait(lambda: "Watching 3 devices since" in b.text("#live-status"), "the ready line")
    _publish(fleet, "corp1", "live-browser-1", 52.3812, 4.9043)
    b.wait(lambda: _marker(b, "corp1") == (52.3812, 4.9043), "the marker moved")
    assert "1 live point received" in b.text("#live-count")
    # A device without a stored position appears with its first point.
    assert not b.find_all('#live-map .live-marker[data-device="pers1"]')
    b.open("/console/#devices")  # leaving the page ends the watch


def test_the_portal_now_panel_shows_watching_a_stored_point_and_a_command(
        fleet: Fleet, browser: Browser) -> None:
    b = browser
    b.sign_in("/portal/", fleet.user)
    b.wait(lambda: "Nobody is watching" in b.text("#now-watching"), "nobody watching")
    admin = SseClient(fleet.server.base, "/api/v1/live?device=corp1", fleet.alice)
    try:
        assert admin.status == 200
        admin.wait_for("ready")
        b.wait(lambda: "(alice) is watching your device's live location (since"
               in b.text("#now-watching"), "the watching line")
        # The time with its zone (the browser's is UTC).
        assert re.search(r"\(since \d\d:\d\d UTC\)\.", b.text("#now-watching"))
        b.wait(lambda: "is watching your device's live location" in b.text("#now-events"),
               "the watching event")
        _publish(fleet, "corp1", "live-browser-2", 52.37, 4.90)
        b.wait(lambda: "Your location is being stored (1 point)" in b.text("#now-events"),
               "the stored event")
        status, cmd = fleet.api("POST", "/devices/corp1/commands", fleet.alice,
                                {"type": "lock", "reason": "lost"})
        assert status == 201, cmd
        b.wait(lambda: "A lock command: requested." in b.text("#now-events"),
               "the command event")
    finally:
        admin.close()
    b.wait(lambda: "alice stopped watching your device's live location"
           in b.text("#now-events"), "the end of the watch")
    b.wait(lambda: "Nobody is watching" in b.text("#now-watching"), "nobody watching again")
