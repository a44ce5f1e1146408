"""Realistic, reproducible telemetry data for simulated devices.

Pure: no I/O, no clock reads (callers pass ``now_ms``). Every device gets a stable
identity derived from ``(seed, device id)`` and mutable state that evolves
plausibly from message to message: a random walk around a home area, a SIM and a
serving cell that change rarely, an app inventory that gets occasional updates,
and check-out/check-in events that alternate like shifts.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "DEFAULT_KIND_WEIGHTS",
    "KIND_ORDER",
    "DeviceProfile",
    "Person",
    "imei_with_check_digit",
    "luhn_check_digit",
    "luhn_valid",
    "person_for",
]

KIND_ORDER = ("location", "identity", "sim", "network", "apps", "checkinout")

# Share of records per kind in a realistic mix: location dominates, network next,
# identity/sim/apps are sent on change (rare); check-in/out once per shift edge.
DEFAULT_KIND_WEIGHTS: Mapping[str, float] = {
    "location": 0.70,
    "network": 0.20,
    "checkinout": 0.03,
    "sim": 0.03,
    "identity": 0.02,
    "apps": 0.02,
}

FIRST_NAMES = (
    "Anna", "Bram", "Chloe", "Daan", "Emma", "Finn", "Julia", "Lars", "Lotte", "Milan",
    "Noah", "Sanne", "Sophie", "Thijs", "Yara", "Zeynep", "Mohammed", "Fatima",
)
LAST_NAMES = (
    "de Jong", "Jansen", "de Vries", "van den Berg", "Bakker", "Visser", "Smit",
    "Meijer", "Mulder", "Bos", "Peters", "Hendriks", "Yilmaz", "El Amrani",
)

# (name, lat, lon, radius in degrees of latitude for the home area)
HOME_AREAS = (
    ("Amsterdam", 52.3676, 4.9041, 0.05),
    ("Rotterdam", 51.9244, 4.4777, 0.05),
    ("Utrecht", 52.0907, 5.1214, 0.04),
    ("Eindhoven", 51.4416, 5.4697, 0.04),
    ("Groningen", 53.2194, 6.5665, 0.03),
    ("Antwerpen", 51.2194, 4.4025, 0.04),
    ("Gent", 51.0543, 3.7174, 0.03),
    ("Köln", 50.9375, 6.9603, 0.05),
)

# (carrier, mcc, mnc, iccid issuer id)
CARRIERS = (
    ("KPN", "204", "08", "8931080"),
    ("Vodafone NL", "204", "04", "8931440"),
    ("Odido", "204", "16", "8931160"),
    ("Proximus", "206", "01", "8932010"),
    ("Telekom.de", "262", "01", "8949010"),
)

# (model, TAC prefix of 8 digits, os, os versions)
MODELS = (
    ("Zebra TC52", "35391110", "android", ("11", "13")),
    ("Zebra TC58", "35612311", "android", ("13", "14")),
    ("Samsung Galaxy XCover6 Pro", "35087261", "android", ("13", "14")),
    ("Google Pixel 8", "35899731", "android", ("14", "15")),
    ("iPhone 15", "35493832", "ios", ("17.5", "18.1")),
    ("iPad (10th generation)", "35378919", "ipados", ("17.6", "18.1")),
)

APP_CATALOG = (
    ("com.android.chrome", "Chrome"),
    ("com.google.android.gm", "Gmail"),
    ("com.google.android.apps.maps", "Maps"),
    ("com.microsoft.teams", "Microsoft Teams"),
    ("com.microsoft.office.outlook", "Outlook"),
    ("com.microsoft.office.word", "Word"),
    ("com.microsoft.office.excel", "Excel"),
    ("com.microsoft.skydrive", "OneDrive"),
    ("com.slack", "Slack"),
    ("com.whatsapp", "WhatsApp"),
    ("nl.ns.android.activity", "NS"),
    ("com.zebra.mdna.enterprisekeyboard", "Enterprise Keyboard"),
    ("com.symbol.datawedge", "DataWedge"),
    ("com.symbol.tool.stagenow", "StageNow"),
    ("com.example.warehouse.picker", "Picker"),
    ("com.example.warehouse.inventory", "Inventory"),
    ("com.example.fieldservice", "Field Service"),
    ("com.example.timesheet", "Timesheet"),
    ("com.example.delivery.scan", "Scan & Deliver"),
    ("com.example.retail.pos", "Point of Sale"),
    ("com.google.android.calendar", "Calendar"),
    ("com.google.android.contacts", "Contacts"),
    ("com.google.android.dialer", "Phone"),
    ("com.google.android.apps.messaging", "Messages"),
    ("com.google.android.GoogleCamera", "Camera"),
    ("com.google.android.apps.photos", "Photos"),
    ("com.android.settings", "Settings"),
    ("com.android.vending", "Play Store"),
    ("com.google.android.youtube", "YouTube"),
    ("com.spotify.music", "Spotify"),
    ("com.adobe.reader", "Acrobat Reader"),
    ("com.docusign.ink", "DocuSign"),
    ("com.salesforce.chatter", "Salesforce"),
    ("com.sap.mobile.apps.fiori", "SAP Fiori"),
    ("com.atlassian.android.jira.core", "Jira"),
    ("com.zoom.videomeetings", "Zoom"),
    ("com.cisco.webex.meetings", "Webex"),
    ("org.mozilla.firefox", "Firefox"),
    ("com.duolingo", "Duolingo"),
    ("com.buienradar", "Buienradar"),
    ("nl.rabomobiel", "Rabobank"),
    ("com.ing.mobile", "ING"),
    ("com.bunq.android", "bunq"),
    ("com.google.android.keep", "Keep"),
    ("com.google.android.apps.authenticator2", "Authenticator"),
    ("com.azure.authenticator", "Microsoft Authenticator"),
)

NOTES = (
    "", "", "", "", "", "", "scratch on back", "charging port loose", "sticky trigger",
    "left at depot", "battery drains fast", "screen protector peeling",
)

_SCREEN = ("ok",) * 18 + ("cracked",) * 2 + ("missing",)
_CASE = ("ok",) * 16 + ("damaged",) * 3 + ("missing",)
_SSIDS = ("corp-wifi", "corp-guest", "depot-ap", "warehouse-5g", "home")


def luhn_check_digit(digits: str) -> str:
    """The Luhn check digit to append to ``digits`` (ISO/IEC 7812-1)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 0:  # these get doubled once the check digit is appended
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def luhn_valid(number: str) -> bool:
    return number.isdigit() and luhn_check_digit(number[:-1]) == number[-1]


def imei_with_check_digit(fourteen: str) -> str:
    if len(fourteen) != 14 or not fourteen.isdigit():
        raise ValueError("an IMEI body is 14 digits (TAC 8 + serial 6)")
    return fourteen + luhn_check_digit(fourteen)


def _device_rng(seed: int | None, device: str, salt: str = "") -> random.Random:
    material = f"{seed!r}/{device}/{salt}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(material).digest()[:8], "big"))


@dataclass(frozen=True, slots=True)
class Person:
    first_name: str
    last_name: str
    user_name: str
    email: str


def person_for(device: str, seed: int | None = None) -> Person:
    """The stable user of ``device`` (same answer for the same seed)."""
    rng = _device_rng(seed, device, "person")
    first = rng.choice(FIRST_NAMES)
    last = rng.choice(LAST_NAMES)
    local = f"{first}.{last}".lower().replace(" ", "")
    n = rng.randrange(1, 100)
    return Person(first, last, f"{local}{n}", f"{local}{n}@example.com")


def _mac(rng: random.Random) -> str:
    first = (rng.randrange(256) & 0b11111100) | 0b10  # unicast, locally administered
    rest = [rng.randrange(256) for _ in range(5)]
    return ":".join(f"{b:02x}" for b in [first, *rest])


def _rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


def _version(rng: random.Random) -> str:
    return f"{rng.randrange(1, 30)}.{rng.randrange(0, 20)}.{rng.randrange(0, 100)}"


class DeviceProfile:
    """One simulated device: stable identity plus evolving state.

    ``data(kind, now_ms)`` returns the ``data`` object of the next record of that
    kind. Not thread-safe; one driver owns a profile.
    """

    __slots__ = (
        "_apps",
        "_battery",
        "_cell",
        "_checked_out",
        "_heading",
        "_home",
        "_identity",
        "_ip",
        "_last_ms",
        "_lat",
        "_lon",
        "_network_type",
        "_rng",
        "_shift_seq",
        "_sim",
        "_speed",
        "_wifi_ssid",
        "device",
        "ownership",
        "person",
    )

    def __init__(
        self,
        device: str,
        *,
        seed: int | None = None,
        ownership: str = "corporate",
        user_email: str | None = None,
    ) -> None:
        self.device = device
        self.ownership = ownership
        rng = _device_rng(seed, device)
        self._rng = rng
        person = person_for(device, seed)
        if user_email is not None:
            person = Person(person.first_name, person.last_name, person.user_name, user_email)
        self.person = person

        model, tac, os_name, os_versions = rng.choice(MODELS)
        body = tac + "".join(str(rng.randrange(10)) for _ in range(6))
        carrier, mcc, mnc, issuer = rng.choice(CARRIERS)
        self._identity: dict[str, Any] = {
            "imei": imei_with_check_digit(body),
            "serial": "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(12)),
            "wifi_mac": _mac(rng),
            "bluetooth_mac": _mac(rng),
            "phone_number": "+316" + "".join(str(rng.randrange(10)) for _ in range(8)),
            "device_name": f"{model.split(' ')[0]}-{device}",
            "user_name": person.user_name,
            "user_email": person.email,
            "first_name": person.first_name,
            "last_name": person.last_name,
            "model": model,
            "os": os_name,
            "os_version": rng.choice(os_versions),
        }
        iccid_body = issuer + "".join(str(rng.randrange(10)) for _ in range(11))
        self._sim: dict[str, Any] = {
            "state": "ready",
            "iccid": iccid_body + luhn_check_digit(iccid_body),
            "imsi": mcc + mnc + "".join(str(rng.randrange(10)) for _ in range(15 - len(mcc + mnc))),
            "carrier": carrier,
            "mcc": mcc,
            "mnc": mnc,
            "roaming": False,
        }
        _, lat0, lon0, radius = rng.choice(HOME_AREAS)
        self._home = (
            lat0 + rng.uniform(-radius, radius),
            lon0 + rng.uniform(-radius, radius) / math.cos(math.radians(lat0)),
            radius,
        )
        self._lat, self._lon = self._home[0], self._home[1]
        self._speed = 0.0
        self._heading = rng.uniform(0, 360)
        self._network_type = rng.choice(("lte", "lte", "lte", "nr", "wifi"))
        self._cell = (rng.randrange(1, 268_435_455), rng.randrange(1, 65_535))
        self._wifi_ssid = rng.choice(_SSIDS)
        self._ip = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        n_apps = rng.randint(10, 40)
        base_ms = 1_700_000_000_000
        self._apps = [
            {
                "package": pkg,
                "name": name,
                "version": _version(rng),
                "installed_at": _rfc3339(base_ms + rng.randrange(0, 60 * 86_400_000)),
            }
            for pkg, name in sorted(rng.sample(APP_CATALOG, n_apps))
        ]
        self._checked_out = rng.random() < 0.5
        self._shift_seq = 0
        self._battery = rng.randint(40, 100)
        self._last_ms = 0

    # -- kinds -----------------------------------------------------------------

    def data(self, kind: str, now_ms: int) -> dict[str, Any]:
        if kind == "location":
            return self._location(now_ms)
        if kind == "network":
            return self._network()
        if kind == "identity":
            return dict(self._identity)
        if kind == "sim":
            return self._sim_state()
        if kind == "apps":
            return self._apps_inventory(now_ms)
        if kind == "checkinout":
            return self._checkinout()
        raise ValueError(f"unknown kind {kind!r}")

    def _location(self, now_ms: int) -> dict[str, Any]:
        rng = self._rng
        dt = 5.0 if self._last_ms == 0 else min(max((now_ms - self._last_ms) / 1000, 0.5), 60.0)
        self._last_ms = now_ms
        home_lat, home_lon, radius = self._home
        # Walk (or drive) with a pull back towards the home area.
        if rng.random() < 0.1:
            self._speed = rng.choice((0.0, 0.0, 1.4, 1.4, 4.0, 12.0, 25.0)) * rng.uniform(0.7, 1.3)
        self._heading = (self._heading + rng.gauss(0, 25)) % 360
        cos_lat = math.cos(math.radians(self._lat))
        dist_m = self._speed * dt
        dlat = dist_m * math.cos(math.radians(self._heading)) / 111_320
        dlon = dist_m * math.sin(math.radians(self._heading)) / (111_320 * cos_lat)
        off_lat, off_lon = self._lat - home_lat, self._lon - home_lon
        if math.hypot(off_lat, off_lon * cos_lat) > radius:
            dlat -= off_lat * 0.05
            dlon -= off_lon * 0.05
        self._lat = max(-89.9, min(89.9, self._lat + dlat))
        self._lon = ((self._lon + dlon + 180) % 360) - 180
        r = rng.random()
        if r < 0.6:
            source, acc = "gps", 3 + r * 20  # 3-15 m
        elif r < 0.9:
            source, acc = "fused", 5 + (r - 0.6) * 116  # 5-40 m
        else:
            source, acc = "network", 50 + (r - 0.9) * 7500  # 50-800 m
        out: dict[str, Any] = {
            "lat": round(self._lat, 6),
            "lon": round(self._lon, 6),
            "accuracy_m": round(acc, 1),
            "speed_mps": round(self._speed, 2),
            "heading_deg": round(self._heading, 1),
            "source": source,
        }
        if source == "gps":
            out["altitude_m"] = round(r * 100 - 5, 1)
        return out

    def _network(self) -> dict[str, Any]:
        rng = self._rng
        if rng.random() < 0.05:
            self._network_type = rng.choice(("lte", "lte", "lte", "nr", "umts", "wifi", "none"))
        if rng.random() < 0.1:
            self._cell = (rng.randrange(1, 268_435_455), rng.randrange(1, 65_535))
        kind = self._network_type
        if kind == "none":
            return {"network_type": "none"}
        sim = self._sim
        if kind == "wifi":
            return {
                "network_type": "wifi",
                "rssi_dbm": rng.randint(-85, -35),
                "wifi_ssid": self._wifi_ssid,
                "ip": "192.168." + self._ip.split(".", 2)[2],
            }
        out: dict[str, Any] = {
            "network_type": kind,
            "rssi_dbm": rng.randint(-113, -51),
            "cell_id": self._cell[0],
            "lac": self._cell[1],
            "mcc": sim["mcc"],
            "mnc": sim["mnc"],
            "carrier": sim["carrier"],
            "ip": self._ip,
        }
        if kind in ("lte", "nr"):
            out["rsrp_dbm"] = rng.randint(-125, -75)
        return out

    def _sim_state(self) -> dict[str, Any]:
        rng = self._rng
        r = rng.random()
        sim = self._sim
        if r < 0.02:
            sim["state"] = rng.choice(("absent", "pin_required", "unknown"))
        elif r < 0.3:
            sim["state"] = "ready"
        sim["roaming"] = rng.random() < 0.03
        if sim["state"] == "absent":
            return {"state": "absent"}
        return dict(sim)

    def _apps_inventory(self, now_ms: int) -> dict[str, Any]:
        rng = self._rng
        if self._apps and rng.random() < 0.3:  # an app updated since the last report
            app = rng.choice(self._apps)
            app["version"] = _version(rng)
            app["installed_at"] = _rfc3339(now_ms - rng.randrange(0, 86_400_000))
        return {"apps": [dict(a) for a in self._apps]}

    def _checkinout(self) -> dict[str, Any]:
        rng = self._rng
        if self._checked_out:
            event = "check_in"  # end of the shift: the device comes back, maybe worse off
            self._battery = max(3, self._battery - rng.randint(10, 70))
        else:
            event = "check_out"  # start of a new shift, from the charging rack
            self._shift_seq += 1
            self._battery = rng.randint(80, 100)
        self._checked_out = not self._checked_out
        return {
            "event": event,
            "user_id": self.person.user_name,
            "shift_id": f"{self.device}-shift-{self._shift_seq}",
            "condition": {
                "battery_pct": self._battery,
                "screen": rng.choice(_SCREEN),
                "case": rng.choice(_CASE),
                "notes": rng.choice(NOTES),
            },
        }
