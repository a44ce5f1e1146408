"""A real fleet for the browser tests: PostgreSQL, the project's Mosquitto, ``mdm-server
serve``, three enrolled devices whose agents run the real agent code (so commands
complete), telemetry stored through ingest, two admins and a device user; and a real
headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by selenium).

Everything is module-scoped: one server and one browser for all the page tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent_protocol import Record, encode_telemetry, telemetry_topic
from tests.support.agents import DeviceAgent
from tests.support.mqtt import publish_as_devices
from tests.support.services import (
    Broker,
    Server,
    create_database,
    drop_database,
    fetchval,
    running_broker,
    server_env,
    wait_for_count,
)

TENANT = "acme"
GROUP = "field"
LOCATIONS = 40
IMEI = "356938035643809"
FIELD_POLICY = {
    "applies_to": {"groups": [GROUP]},
    "fields": {"identity.imei": {"action": "mask", "keep_last": 4}},
    "retention_days": {"default": 90},
}

CHROMIUM = os.environ.get("MDM_CHROMIUM", "/usr/bin/chromium")
#: Where the tests leave a screenshot of each main page, for a reviewer (git-ignored).
SCREENSHOTS = Path(__file__).resolve().parents[2] / "var" / "screenshots"
DESKTOP = (1400, 1000)
PHONE = (400, 860)
CHROMEDRIVER = os.environ.get("MDM_CHROMEDRIVER", "/usr/bin/chromedriver")


@dataclass
class Fleet:
    server: Server
    broker: Broker
    database: str
    alice: str  # admin
    bob: str    # second admin
    user: str   # the user of corp1
    agents: dict[str, DeviceAgent]
    base_ts: datetime  # time of the first location record (minute-aligned, UTC)
    state: dict[str, Any] = field(default_factory=dict)  # shared between tests

    def api(self, method: str, path: str, token: str, body: object = None
            ) -> tuple[int, Any]:
        return self.server.request(method, "/api/v1" + path, token, body)

    def count(self, sql: str, *args: object) -> int:
        value = asyncio.run(fetchval(self.database, sql, *args))
        assert isinstance(value, int)
        return value


def _location_records(base: datetime) -> list[Record]:
    return [Record(id=f"loc-{i}", ts_ms=int((base + timedelta(minutes=i)).timestamp() * 1000),
                   data={"lat": 52.3600 + i * 0.0007, "lon": 4.8800 + (i % 7) * 0.0011,
                         "accuracy_m": 6.0, "source": "gps"})
            for i in range(LOCATIONS)]


async def _put_policy(database: str) -> None:
    from mdm_server.storage.policies import put_policy
    from mdm_server.storage.pool import connect
    from privacy_filters import parse_policy, policy_to_doc

    conn = await connect(database)
    try:
        doc = policy_to_doc(parse_policy(FIELD_POLICY, name="field-staff"))
        await put_policy(conn, TENANT, "field-staff", doc, "test")
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("pages")
    database = asyncio.run(create_database())
    try:
        with running_broker(tmp) as broker:
            srv = Server(server_env(database, broker.url), tmp / "serve.log")
            srv.cli("tenant", "create", TENANT)
            enrolled = {}
            for device, ownership, email in (("corp1", "corporate", "sam@example.org"),
                                             ("corp2", "corporate", None),
                                             ("pers1", "personal", None)):
                args = ["device", "enroll", "--tenant", TENANT, "--device", device,
                        "--ownership", ownership, "--group", GROUP]
                if email:
                    args += ["--user-email", email]
                enrolled[device] = json.loads(srv.cli(*args))
            alice = srv.cli("admin", "create", "--tenant", TENANT, "--name", "alice").strip()
            bob = srv.cli("admin", "create", "--tenant", TENANT, "--name", "bob").strip()
            user = srv.cli("user", "token", "--tenant", TENANT, "--device", "corp1").strip()
            asyncio.run(_put_policy(database))
            agents = {d: DeviceAgent(e) for d, e in enrolled.items()}
            srv.start()
            srv.wait_log("acks subscribed")
            for a in agents.values():
                a.start()
            base = (datetime.now(UTC) - timedelta(hours=3)).replace(second=0, microsecond=0)
            messages = [(telemetry_topic(TENANT, "corp1", "location"),
                         encode_telemetry(_location_records(base), device="corp1",
                                          kind="location")),
                        (telemetry_topic(TENANT, "corp1", "identity"),
                         encode_telemetry([Record(
                             id="id-1", ts_ms=int(base.timestamp() * 1000),
                             data={"imei": IMEI, "model": "Pixel 8", "os": "android"})],
                             device="corp1", kind="identity"))]
            publish_as_devices(broker.port, messages)
            stored = wait_for_count(database, "SELECT count(*) FROM telemetry "
                                              "WHERE device_id = 'corp1'", LOCATIONS + 1,
                                    timeout=60)
            assert stored == LOCATIONS + 1, srv.log_text()[-3000:]
            try:
                yield Fleet(srv, broker, database, alice, bob, user, agents, base)
            finally:
                for a in agents.values():
                    a.stop()
                srv.stop()
    finally:
        asyncio.run(drop_database(database))


# --- the browser --------------------------------------------------------------------


def _have_browser() -> bool:
    return (shutil.which(CHROMIUM) is not None or Path(CHROMIUM).exists()) and \
        Path(CHROMEDRIVER).exists()


@dataclass
class Browser:
    """A headless Chromium with the few waits the page tests need."""

    driver: Any
    base: str
    downloads: Path

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def sign_in(self, page: str, token: str) -> None:
        """Open ``/portal/`` or ``/console/`` signed out, then paste the token."""
        self.open(page)
        self.driver.execute_script("sessionStorage.clear(); location.hash = '';")
        self.driver.refresh()
        self.fill("#token", token)
        self.click("#sign-in button[type=submit]")
        self.wait(lambda: not self.find("#sign-in").is_displayed(), "sign-in form hidden")

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def wait(self, cond: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
        from selenium.common.exceptions import (
            NoSuchElementException,
            StaleElementReferenceException,
        )

        deadline = time.monotonic() + timeout
        while True:
            try:
                got = cond()
                if got:
                    return got
            except (NoSuchElementException, StaleElementReferenceException):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; page text:\n"
                                     + self.driver.find_element("tag name", "body").text[-3000:])
            time.sleep(0.1)

    def wait_css(self, css: str, timeout: float = 20.0) -> Any:
        return self.wait(lambda: self.find(css), css, timeout)

    def text(self, css: str) -> str:
        return str(self.find(css).text)

    def wait_text(self, css: str, expected: str, timeout: float = 20.0) -> str:
        """Wait until the element shows ``expected``; return its whole text."""
        return str(self.wait(lambda: (t := self.text(css)) and expected in t and t,
                             f"{expected!r} in {css}", timeout))

    def click(self, css: str) -> None:
        """Click the element once it is shown and enabled; one that a page redraws
        between finding and clicking (a list reloaded after a save) is found again."""
        def clicked() -> bool:
            el = self.find(css)
            if not (el.is_displayed() and el.is_enabled()):
                return False
            el.click()
            return True

        self.wait(clicked, f"{css} clickable")

    def fill(self, css: str, value: str) -> None:
        el = self.wait_css(css)
        el.clear()
        el.send_keys(value)

    def set_value(self, css: str, value: str) -> None:
        """For inputs whose typing is locale-bound (datetime-local): set and signal."""
        el = self.wait_css(css)
        self.driver.execute_script(
            "arguments[0].value = arguments[1];"
            "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));"
            "arguments[0].dispatchEvent(new Event('change', {bubbles: true}));", el, value)

    def select(self, css: str, value: str) -> None:
        from selenium.webdriver.support.ui import Select

        Select(self.wait_css(css)).select_by_value(value)

    def resize(self, size: tuple[int, int]) -> None:
        """Show pages at ``size``: PHONE is a phone's screen (Chrome's device
        emulation, touch and the viewport meta tag included), DESKTOP the window."""
        if size == DESKTOP:
            self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        else:
            self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                "width": size[0], "height": size[1], "deviceScaleFactor": 1,
                "mobile": True})
        if not self.driver.current_url.startswith("http"):
            self.open("/portal/")  # the blank start page does not take the override
        self.wait(lambda: self.driver.execute_script("return window.innerWidth") == size[0],
                  f"a viewport {size[0]} px wide")

    def page_width(self) -> int:
        """How wide the page's content is (wider than the screen: it scrolls sideways)."""
        return int(self.driver.execute_script("return document.documentElement.scrollWidth"))

    def screenshot(self, name: str) -> Path:
        """The whole page (not only what fits the window) as var/screenshots/NAME.png."""
        import base64

        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        metrics = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"],
                     "height": min(size["height"], 6000), "scale": 1}})
        path = SCREENSHOTS / f"{name}.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def console_errors(self) -> list[str]:
        return [e["message"] for e in self.driver.get_log("browser")
                if e.get("level") == "SEVERE"]


@pytest.fixture(scope="module")
def browser(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    if not _have_browser():
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (scripts/test installs Debian's "
                    "chromium and chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-dev-shm-usage",
                "--disable-extensions", f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
                "--lang=en-GB"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {
        "download.default_directory": str(downloads), "download.prompt_for_download": False,
        "safebrowsing.enabled": False})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The browser's local time is UTC, so the pages' datetime-local inputs are too.
    service = Service(executable_path=CHROMEDRIVER,
                      env={**os.environ, "TZ": "UTC"},
                      log_output=str(downloads.parent / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=opts)
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                               {"behavior": "allow", "downloadPath": str(downloads)})
        yield Browser(driver, fleet.server.base, downloads)
    finally:
        driver.quit()
