"""Pages people can use (issue 13): the portal's summary, fields as words with units,
the console's fixes (policy editor, map legend and labels, the group field, the
favicon, a device list that can be searched, filtered and sorted), and every main
page on a 400 px phone screen. Each main page is left as a PNG in var/screenshots/
at desktop and phone width, for a reviewer.

Its own fleet (the module-scoped fixture): corp1 also sends an apps inventory and a
check-out, and two more devices are enrolled for the device list."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest

from agent_protocol import Record, encode_telemetry, telemetry_topic
from tests.browser.conftest import DESKTOP, LOCATIONS, PHONE, TENANT, Browser, Fleet
from tests.support.mqtt import publish_as_devices
from tests.support.services import wait_for_count

pytestmark = pytest.mark.integration

NOTICE = "Your phone will be locked: call the service desk to unlock it."


@pytest.fixture(autouse=True)
def no_script_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test ends with no CSP violation, no uncaught exception and no failed
    load (a 404 for an icon included) in the browser's console."""
    yield
    if "browser" not in request.fixturenames:
        return
    b: Browser = request.getfixturevalue("browser")
    b.resize(DESKTOP)
    errors = [m for m in b.console_errors()
              if "Content Security Policy" in m or "Uncaught" in m or "404" in m]
    assert not errors, errors


@pytest.fixture(scope="module")
def more(fleet: Fleet) -> Fleet:
    """corp1's apps inventory and a check-out, a lock with a notice, and two more
    devices (a personal one in group depot, a corporate one in no group)."""
    base = int(fleet.base_ts.timestamp() * 1000)
    publish_as_devices(fleet.broker.port, [
        (telemetry_topic(TENANT, "corp1", "apps"), encode_telemetry([Record(
            id="apps-1", ts_ms=base + 60_000, data={"apps": [
                {"package": "com.example.mail", "name": "Mail", "version": "5.2",
                 "installed_at": "2026-01-02T03:04:05Z"},
                {"package": "com.android.settings"}]})], device="corp1", kind="apps")),
        (telemetry_topic(TENANT, "corp1", "checkinout"), encode_telemetry([Record(
            id="cio-1", ts_ms=base + 120_000, data={
                "event": "check_out", "user_id": "u-17", "shift_id": "early",
                "condition": {"battery_pct": 88, "screen": "ok", "case": "damaged",
                              "notes": "scratch on the back"}})],
            device="corp1", kind="checkinout"))])
    wait_for_count(fleet.database, "SELECT count(*) FROM telemetry WHERE device_id = 'corp1'",
                   LOCATIONS + 3, timeout=60)
    for device, ownership, groups in (("van-7", "personal", ["depot"]),
                                      ("kiosk-2", "corporate", [])):
        args = ["device", "enroll", "--tenant", TENANT, "--device", device,
                "--ownership", ownership]
        for g in groups:
            args += ["--group", g]
        fleet.server.cli(*args)
    status, cmd = fleet.api("POST", "/devices/corp1/commands", fleet.alice,
                            {"type": "lock", "reason": "left in the van",
                             "notice": {"text": NOTICE, "lang": "en"}})
    assert status == 201, cmd
    return fleet


# --- the portal -------------------------------------------------------------------------


def test_portal_opens_with_a_summary_of_what_is_held(more: Fleet, browser: Browser) -> None:
    b = browser
    b.sign_in("/portal/", more.user)
    b.wait_css("#summary-table tbody tr")
    counts = {r.find_elements("tag name", "td")[0].text: r.find_elements("tag name", "td")[1].text
              for r in b.find_all("#summary-table tbody tr")}
    assert counts == {"Location": str(LOCATIONS), "Device and account details": "1",
                      "SIM card": "0", "Network connection": "0", "Installed apps": "1",
                      "Check-in and check-out": "1"}
    assert f"{LOCATIONS + 3} records received from corp1 since" in b.text("#summary-total")
    # No page of raw records first: the data section waits to be asked.
    assert not b.find_all("#data-records")
    assert "Choose a kind of data" in b.text("#data-hint")

    # Last values, field names as words with their units, times with their zone.
    loc = b.wait_css("#summary-last [data-kind=location]")
    assert _field(loc, "accuracy_m") == ("Accuracy", "6 m")
    assert _field(loc, "source") == ("Source", "GPS")
    lat_label, lat = _field(loc, "lat")
    assert lat_label == "Latitude" and lat.startswith("52.38") and lat.endswith("°")
    assert "accuracy_m" not in loc.text
    stamp = loc.find_element("css selector", "time").text
    assert stamp.endswith("UTC"), stamp  # the browser runs in UTC: its zone is named
    # Installed apps as a table.
    apps = [[c.text for c in r.find_elements("tag name", "td")]
            for r in b.find_all("#summary-last [data-kind=apps] table.apps tbody tr")]
    assert [a[:3] for a in apps] == [["Mail", "com.example.mail", "5.2"],
                                     ["not stored", "com.android.settings", "not stored"]]
    assert apps[0][3].startswith("2 Jan 2026") or "2026" in apps[0][3]
    # The check-out's condition as text.
    cio = b.find("#summary-last [data-kind=checkinout]")
    assert _field(cio, "event") == ("Event", "checked out")
    assert _field(cio, "condition") == (
        "Condition", 'Battery 88 %, screen OK, case damaged; notes: "scratch on the back"')
    # The policy in plain words and the recent notices, right there.
    assert b.wait_text("#policy-name", "field-staff") == "field-staff"
    assert "IMEI" in b.text("#policy-explanation")
    assert NOTICE in b.wait_text("#recent-notices", NOTICE)
    # Links to the sections.
    links = {a.text: a.get_attribute("href").split("#")[1] for a in b.find_all("#sections a")}
    for text, target in (("My data", "data-h"), ("Notices", "notices-h"),
                         ("Export my data", "export-h"), ("Ask for erasure", "erasure-h")):
        assert links[text] == target
        assert b.find(f"#{target}").is_displayed()

    # "show" next to a kind lists its records.
    b.click("#summary-table button[data-kind=checkinout]")
    b.wait_text("#data-records caption", "Check-in and check-out: page 1, 1 record")
    row = b.text("#data-records tbody tr")
    assert "Battery 88 %" in row and "User\nu-17" in row
    b.click("#summary-table button[data-kind=apps]")
    b.wait_text("#data-records caption", "Installed apps: page 1, 1 record")
    assert b.find_all("#data-records table.apps")


def _field(card: object, name: str) -> tuple[str, str]:
    dt = card.find_element("css selector", f"dt[data-field={name}]")  # type: ignore[attr-defined]
    dd = dt.find_element("xpath", "following-sibling::dd[1]")
    return str(dt.text), str(dd.text)


# --- the console -------------------------------------------------------------------------


def test_device_list_can_be_searched_filtered_and_sorted(more: Fleet, browser: Browser) -> None:
    b = browser
    b.sign_in("/console/", more.alice)
    b.wait_css("#devices-table tbody tr")

    def devices() -> list[str]:
        return [r.text.split()[0] for r in b.find_all("#devices-table tbody tr")]

    assert devices() == ["corp1", "corp2", "kiosk-2", "pers1", "van-7"]
    assert b.text("#devices-table caption") == "5 devices"
    b.fill("#devices-search", "CORP")
    b.wait(lambda: devices() == ["corp1", "corp2"], "the search's two devices")
    assert b.text("#devices-table caption") == "2 of 5 devices"
    b.fill("#devices-search", "nothing-like-it")
    assert "No device matches" in b.wait_text("#devices", "No device matches")
    b.find("#devices-search").clear()
    b.select("#devices-ownership", "personal")
    b.wait(lambda: devices() == ["pers1", "van-7"], "the personal devices")
    b.select("#devices-ownership", "")
    b.select("#devices-group", "depot")
    b.wait(lambda: devices() == ["van-7"], "group depot")
    b.select("#devices-group", "field")
    b.wait(lambda: devices() == ["corp1", "corp2", "pers1"], "group field")
    b.select("#devices-group", "")
    # Sorting: a column header is a button; again reverses; aria-sort says which.
    b.click("#devices-table button[data-sort=device]")
    b.wait(lambda: devices() == ["van-7", "pers1", "kiosk-2", "corp2", "corp1"], "z to a")
    assert b.find("#devices-table th[aria-sort=descending] button").text == "Device"
    b.click("#devices-table button[data-sort=ownership]")
    b.wait(lambda: devices() == ["corp1", "corp2", "kiosk-2", "pers1", "van-7"],
           "corporate first")
    b.click("#devices-table button[data-sort=seen]")
    b.click("#devices-table button[data-sort=seen]")
    b.wait(lambda: devices()[0] == "corp1", "the device seen last first")

    # More devices than one page of GET /devices: every page is read before the list
    # is searched (here pages of 2, by asking the page's own requests for that).
    b.driver.execute_script("""
        const real = window.fetch;
        window.devicePages = 0;
        window.fetch = (url, opts) => {
          if (String(url).startsWith("/api/v1/devices?")) {
            window.devicePages += 1;
            url = String(url).replace("limit=500", "limit=2");
          }
          return real(url, opts);
        };""")
    b.click("#nav button[data-view=policies]")
    b.wait_css("#policies-table")
    b.click("#nav button[data-view=devices]")
    b.wait(lambda: len(devices()) == 5, "all five devices")
    assert b.driver.execute_script("return window.devicePages") == 3
    b.fill("#devices-search", "van")
    b.wait(lambda: devices() == ["van-7"], "a device of the last page found")


def test_policy_editor_status_follows_each_save_and_no_stale_preview(
        more: Fleet, browser: Browser) -> None:
    b = browser
    b.sign_in("/console/", more.alice)
    b.open("/console/#policies")
    b.wait_css("#policies-table")
    b.fill("#new-policy-name", "night-shift")
    b.click("#new-policy-form button[type=submit]")
    assert b.wait_text("#policy-version", "Not saved yet") == "Not saved yet"
    b.click("#policy-save")
    b.wait_text("#policy-status", "Saved night-shift as version 1")
    assert b.wait_text("#policy-version", "Version 1").startswith("Version 1, saved by alice")
    doc = json.loads(b.find("#policy-doc").get_attribute("value"))
    b.set_value("#policy-doc", json.dumps({**doc, "retention_days": {"default": 30}}))
    b.click("#policy-save")
    b.wait_text("#policy-status", "Saved night-shift as version 2")
    assert b.wait_text("#policy-version", "Version 2").startswith("Version 2, saved by alice")
    assert "UTC" in b.text("#policy-version")
    # Edited again, the status no longer says it is saved.
    b.set_value("#policy-doc", json.dumps({**doc, "retention_days": {"default": 20}}))
    assert b.wait_text("#policy-status", "Edited since version 2 was saved") == \
        "Edited since version 2 was saved: Save to keep the changes."
    assert "ok" not in (b.find("#policy-status").get_attribute("class") or "").split()
    b.set_value("#policy-doc", json.dumps({**doc, "retention_days": {"default": 30}}))

    # A preview belongs to the document it ran on.
    b.click("#preview-run")
    b.wait_css("#preview-stored")
    b.set_value("#policy-doc", json.dumps({**doc, "collect": {"location": "yes"}}))
    assert "press Preview" in b.wait_text("#preview-result", "changed since the last preview")
    assert not b.find_all("#preview-stored")
    b.click("#policy-save")
    b.wait_text("#policy-status", "the policy is not valid")
    assert not b.find_all("#preview-stored")  # no old preview next to the error
    assert b.text("#policy-version").startswith("Version 2")  # nothing was saved
    b.click("#preview-run")
    assert "collect.location" in b.wait_text("#preview-result", "collect.location")
    b.set_value("#policy-doc", json.dumps(doc))
    b.wait_css("#preview-stale")
    assert "collect.location" not in b.text("#preview-result")  # the error went too
    b.select("#preview-kind", "identity")
    b.click("#preview-run")
    b.wait_css("#preview-stored")
    b.select("#preview-kind", "sim")
    b.wait_css("#preview-stale")


def test_map_legend_shows_the_map_colours(more: Fleet, browser: Browser) -> None:
    b = browser
    b.sign_in("/console/", more.alice)
    b.open("/console/#device=corp1")
    b.wait_text("#map-summary", f"{LOCATIONS} points")
    b.wait_css("#map-legend")

    def colour(css: str, prop: str) -> str:
        return str(b.driver.execute_script(
            "return getComputedStyle(document.querySelector(arguments[0]))[arguments[1]]",
            css, prop))

    for legend, mark in (("#map-legend .legend-start svg circle", "#location-map circle.start"),
                         ("#map-legend .legend-end svg circle", "#location-map circle.end")):
        assert colour(legend, "fill") == colour(mark, "fill")
        assert colour(legend, "stroke") == colour(mark, "stroke")
    assert colour("#map-legend .legend-start circle", "fill") != \
        colour("#map-legend .legend-end circle", "fill")
    b.wait_css("#location-map .trips polyline")
    b.wait_css("#map-legend .legend-trip")
    assert colour("#map-legend .legend-trip polyline", "stroke") == \
        colour("#location-map .trips polyline.trip-c0", "stroke") == \
        colour("#trips-table .swatch", "color")
    assert colour("#map-legend .legend-track polyline", "stroke") == \
        colour("#location-track", "stroke")
    # Only what this map shows is explained: it has no stop and no named place.
    assert not b.find_all("#location-map .stop") and not b.find_all("#map-legend .legend-stop")
    assert not b.find_all("#map-legend .legend-place")
    b.driver.execute_script("document.querySelector('#map-legend').scrollIntoView()")


@pytest.mark.parametrize("scale", [1, 2.2], ids=["desktop", "phone"])
def test_map_axis_labels_never_overlap(more: Fleet, browser: Browser, scale: float) -> None:
    """Maps of many extents, each drawn by the console's own code: no two axis labels
    (latitudes on the left, longitudes along the bottom, the scale) overlap, and none
    sticks out of the drawing; also with the text drawn larger for a phone."""
    b = browser
    b.open("/console/")
    boxes = [(52.0 + i * 0.0137, 4.0 + i * 0.0291, 0.002 * (1 + i % 7) ** 2,
              0.003 * (1 + (i * 3) % 11) ** 2) for i in range(60)]
    got = b.driver.execute_async_script("""
        const [boxes, scale, done] = arguments;
        import("/console/map.js").then(({ locationMap }) => {
          const out = [];
          for (const [lat, lon, dlat, dlon] of boxes) {
            const recs = [[lat, lon], [lat + dlat, lon + dlon], [lat + dlat / 3, lon]]
              .map(([a, o], i) => ({ ts: new Date(i * 60000).toISOString(),
                                     data: { lat: a, lon: o } }));
            const svg = locationMap(recs, { scale });
            document.body.append(svg);
            const r = [...svg.querySelectorAll(".grid-label, .scale-label")].map((t) => {
              const bb = t.getBBox();
              return [t.textContent, bb.x, bb.y, bb.width, bb.height];
            });
            svg.remove();
            out.push(r);
          }
          done(out);
        }).catch((e) => done(String(e)));""", boxes, scale)
    assert isinstance(got, list), got
    for labels in got:
        assert sum(1 for t in labels if t[0].endswith("°")) >= 2, labels
        for i, (t1, x1, y1, w1, h1) in enumerate(labels):
            assert 0 <= x1 and x1 + w1 <= 800 and 0 <= y1 and y1 + h1 <= 500, (t1, labels)
            for t2, x2, y2, w2, h2 in labels[i + 1:]:
                apart = x1 + w1 <= x2 or x2 + w2 <= x1 or y1 + h1 <= y2 or y2 + h2 <= y1
                assert apart, (t1, t2, labels)


def test_group_field_is_usable_without_hunting_for_the_radio(more: Fleet,
                                                             browser: Browser) -> None:
    b = browser
    b.sign_in("/console/", more.alice)
    b.open("/console/#commands")
    b.wait_css("#cmd-device option")
    group = b.find("#cmd-group")
    assert group.is_enabled() and b.find("#target-device").is_selected()
    # The known groups are offered.
    assert {o.get_attribute("value") for o in b.find_all("#cmd-groups option")} == \
        {"field", "depot"}
    group.click()
    assert b.find("#target-group").is_selected()
    group.send_keys("depot")
    assert group.get_attribute("value") == "depot"
    b.select("#cmd-type", "lock")
    b.fill("#cmd-reason", "stocktake")
    b.click("#cmd-submit")
    b.wait_text("#command-status", "Group request accepted")
    assert "for group depot" in b.text("#command-status")
    # Back to one device: choosing in its field is enough.
    b.find("#cmd-device").click()
    assert b.find("#target-device").is_selected()


def test_favicon_is_there(more: Fleet, browser: Browser) -> None:
    for path in ("/favicon.ico", "/console/common/favicon.svg", "/portal/common/favicon.svg"):
        with urllib.request.urlopen(more.server.base + path, timeout=10) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == "image/svg+xml"
            assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
            assert resp.read().startswith(b"<svg")
    b = browser
    for page in ("/console/", "/portal/"):
        b.open(page)
        icon = b.find("link[rel=icon]").get_attribute("href")
        assert icon == more.server.base + page + "common/favicon.svg"


# --- every main page, at desktop and phone width -------------------------------------------

PAGES = [
    ("portal", "/portal/", "user", "#summary-table tbody tr"),
    ("console-devices", "/console/#devices", "alice", "#devices-table tbody tr"),
    ("console-device", "/console/#device=corp1", "alice", "#trips-summary"),
    ("console-commands", "/console/#commands=corp1", "alice", "#commands-table, "
                                                               "#device-commands p"),
    ("console-policies", "/console/#policies=field-staff", "alice", "#policy-explanation li"),
    ("console-shifts", "/console/#shifts", "alice", "#shifts-table, #shifts p.empty"),
    ("console-live", "/console/#live", "alice", "#live-map"),
    ("console-places", "/console/#places", "alice", "#places-table, #places p.empty"),
    ("console-approvals", "/console/#approvals", "alice", "#approvals-table, "
                                                          "#approvals p.empty"),
    ("console-erasure", "/console/#erasure", "alice", "#erasure-table, "
                                                      "#erasure-requests p.empty"),
]


@pytest.mark.parametrize("size", [DESKTOP, PHONE], ids=["desktop", "phone"])
@pytest.mark.parametrize(("name", "path", "who", "ready"), PAGES, ids=[p[0] for p in PAGES])
def test_main_pages_fit_the_screen(more: Fleet, browser: Browser, name: str, path: str,
                                   who: str, ready: str, size: tuple[int, int]) -> None:
    """Nothing sticks out sideways (a wide table scrolls in its own box); the page
    is left in var/screenshots/ for a reviewer."""
    b = browser
    b.resize(size)
    page = path.split("#")[0]
    b.sign_in(page, getattr(more, who))
    if "#" in path:
        b.open(path)
    b.wait_css(ready, timeout=30)
    time.sleep(0.5)  # let the last sections (fetched in parallel) draw: not asserted on
    assert b.page_width() <= size[0], (name, b.page_width())
    if size == PHONE:
        # Each thing on the page starts inside the screen (not cut off at the left).
        lefts = b.driver.execute_script(
            "return [...document.querySelectorAll('main *')].filter((e) => e.offsetParent)"
            ".map((e) => e.getBoundingClientRect().left).filter((x) => x < -1)")
        assert not lefts
    if name == "console-device":
        # The map's labels read at about 11 px whatever the width it is shown at.
        heights = b.driver.execute_script(
            "return [...document.querySelectorAll('#location-map .grid-label')]"
            ".map((t) => t.getBoundingClientRect().height)")
        assert heights and min(heights) >= 10, heights
    shot = b.screenshot(f"{name}-{'phone' if size == PHONE else 'desktop'}")
    assert shot.stat().st_size > 1000


def test_summary_counts_and_last_values_are_the_records_held(more: Fleet) -> None:
    """GET /me/devices/{device} (the portal's summary) says what the data route lists:
    as many records, and the newest of them."""
    status, summary = more.api("GET", "/me/devices/corp1", more.user)
    assert status == 200
    status, page = more.api("GET", "/me/devices/corp1/data?kind=location&limit=500", more.user)
    assert status == 200 and page["next"] is None
    assert summary["records"]["location"] == len(page["records"]) == LOCATIONS
    assert summary["total"] == sum(summary["records"].values()) == LOCATIONS + 3
    newest = page["records"][-1]  # oldest first
    assert summary["last"]["location"] == {k: newest[k] for k in ("id", "ts", "received_at",
                                                                  "data")}
    assert datetime.fromisoformat(newest["ts"]) == more.base_ts + timedelta(minutes=LOCATIONS - 1)
    assert set(summary["last"]) == {"location", "identity", "apps", "checkinout"}
    # Another device's user reads nothing of corp1's.
    status, _ = more.api("GET", "/me/devices/corp1", more.alice)
    assert status == 403
