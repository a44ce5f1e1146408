"""The policy in plain words, for the user of the device.

One sentence per kind (collected or not, and for how long), then, for a collected
kind, one per zone list (location) and one per field rule, in the order of the wire
contract's field table. Deterministic: the same policy gives the same sentences.
"""

from __future__ import annotations

from typing import Final

from agent_protocol import FIELD_TYPES, KINDS
from privacy_filters.policy import FEW_VALUES, FieldRule, Policy

__all__ = ["FIELD_NAMES", "beyond_floor", "explain_policy"]

# field -> (name for "Your ... is", what a kept character is called, unit of coarsen)
FIELD_NAMES: Final[dict[str, tuple[str, str, str]]] = {
    "location.lat": ("latitude", "characters", "degrees"),
    "location.lon": ("longitude", "characters", "degrees"),
    "location.accuracy_m": ("location accuracy", "characters", "m"),
    "location.altitude_m": ("altitude", "characters", "m"),
    "location.speed_mps": ("speed", "characters", "m/s"),
    "location.heading_deg": ("direction of travel", "characters", "degrees"),
    "location.source": ("location source (GPS or network)", "characters", ""),
    "identity.imei": ("IMEI (device identity number)", "digits", ""),
    "identity.serial": ("device serial number", "characters", ""),
    "identity.wifi_mac": ("Wi-Fi MAC address", "characters", ""),
    "identity.bluetooth_mac": ("Bluetooth MAC address", "characters", ""),
    "identity.phone_number": ("phone number", "digits", ""),
    "identity.device_name": ("device name", "characters", ""),
    "identity.user_name": ("user name", "characters", ""),
    "identity.user_email": ("e-mail address", "characters", ""),
    "identity.first_name": ("first name", "characters", ""),
    "identity.last_name": ("last name", "characters", ""),
    "identity.model": ("device model", "characters", ""),
    "identity.os": ("operating system", "characters", ""),
    "identity.os_version": ("operating system version", "characters", ""),
    "sim.state": ("SIM card state", "characters", ""),
    "sim.iccid": ("SIM card number (ICCID)", "digits", ""),
    "sim.imsi": ("subscriber identity (IMSI)", "digits", ""),
    "sim.carrier": ("SIM card's mobile operator", "characters", ""),
    "sim.mcc": ("SIM card's country code", "digits", ""),
    "sim.mnc": ("SIM card's network code", "digits", ""),
    "sim.roaming": ("roaming status", "characters", ""),
    "network.rssi_dbm": ("signal strength", "characters", "dBm"),
    "network.rsrp_dbm": ("LTE/5G signal power", "characters", "dBm"),
    "network.network_type": ("network type", "characters", ""),
    "network.cell_id": ("mobile cell id", "characters", ""),
    "network.lac": ("mobile area code", "characters", ""),
    "network.mcc": ("network's country code", "digits", ""),
    "network.mnc": ("network's operator code", "digits", ""),
    "network.carrier": ("mobile operator", "characters", ""),
    "network.wifi_ssid": ("Wi-Fi network name", "characters", ""),
    "network.ip": ("network IP address", "characters", ""),
    "apps.apps": ("list of installed apps", "characters", ""),
    "checkinout.event": ("check-in or check-out event", "characters", ""),
    "checkinout.user_id": ("user id at check-out", "characters", ""),
    "checkinout.shift_id": ("shift id", "characters", ""),
    "checkinout.condition": ("device condition report", "characters", ""),
    "checkinout.condition.battery_pct": ("battery level at check-in/out", "characters", "%"),
    "checkinout.condition.screen": ("screen condition", "characters", ""),
    "checkinout.condition.case": ("case condition", "characters", ""),
    "checkinout.condition.notes": ("condition notes", "characters", ""),
}
assert set(FIELD_NAMES) == {f"{k}.{f}" for k in KINDS for f in FIELD_TYPES[k]}

# kind -> (subject, verb) of "<subject> <verb> stored and kept for N days"
_KIND_SUBJECTS: Final[dict[str, tuple[str, str]]] = {
    "location": ("Your location", "is"),
    "identity": ("Your device and account details", "are"),
    "sim": ("Your SIM card details", "are"),
    "network": ("Your network connection details", "are"),
    "apps": ("Installed apps", "are"),
    "checkinout": ("Check-in and check-out events", "are"),
}
assert tuple(_KIND_SUBJECTS) == KINDS


def _days(n: int) -> str:
    return "1 day" if n == 1 else f"{n} days"


def _number(x: float) -> str:
    if float(x).is_integer():
        return str(int(x))
    return f"{x:.6g}"


def _distance(m: float) -> str:
    """Metres for humans: two significant digits below 1 km, km above."""
    if m < 1000:
        rounded = float(f"{m:.2g}")
        if rounded < 1000:
            return f"{_number(rounded)} m"
        m = rounded
    km = m / 1000
    return f"{_number(round(km, 1))} km" if km < 10 else f"{round(km)} km"


def _areas(n: int, what: str, many: str) -> str:
    return f"the {what} area" if n == 1 else f"{many}{n} {what} areas"


def _location_sentence(policy: Policy) -> str:
    rules = policy.location
    text = "Your location is stored"
    if rules.only_while_checked_out:
        text += " only while you are checked out"
    if rules.precision_m is not None:
        text += f", rounded to about {_distance(rules.precision_m)},"
    return f"{text} and kept for {_days(policy.retention_for('location'))}."


def _subject(key: str) -> str:
    return "The list of installed apps" if key == "apps.apps" else f"Your {FIELD_NAMES[key][0]}"


def _rule_phrase(key: str, rule: FieldRule) -> str:
    """What happens to the field, after "is": "stored as its last 4 digits only"."""
    _, chars, unit = FIELD_NAMES[key]
    if rule.action == "drop":
        return "not stored"
    if rule.action == "keep":
        return "stored as sent"
    if rule.action == "hash":
        if key in FEW_VALUES:
            return ("stored as a keyed fingerprint. That hides it from anyone who has only a "
                    "copy of the stored data, but as there are few possible values, someone "
                    "able to make the server compute fingerprints (an administrator, for "
                    "example) could find it by trying them all")
        return ("stored as a keyed fingerprint: the same value always gives the same "
                "fingerprint, and a guess can be checked against it only with the server's "
                "secret key")
    if rule.action == "mask":
        n = rule.keep_last if rule.keep_last is not None else rule.keep_first
        if not n:
            return "stored with every character hidden; only its length is kept"
        end = "last" if rule.keep_last is not None else "first"
        what = chars[:-1] if n == 1 else chars
        return f"stored as its {end} {n} {what} only"
    assert rule.step is not None  # coarsen
    step = _number(rule.step)
    if unit == "%":
        return f"stored rounded to the nearest {step}%"
    if unit:
        return f"stored rounded to the nearest {step} {unit}"
    return f"stored rounded to the nearest multiple of {step}"


def _short_phrase(key: str, rule: FieldRule | None) -> str:
    if rule is None:
        return "stored as sent"
    return "stored as a keyed fingerprint" if rule.action == "hash" else _rule_phrase(key, rule)


def _rule_sentence(key: str, rule: FieldRule) -> str:
    return f"{_subject(key)} is {_rule_phrase(key, rule)}."


def explain_policy(policy: Policy) -> list[str]:
    """Plain-language English sentences describing ``policy`` to the device's user."""
    out: list[str] = []
    for kind in KINDS:
        subject, verb = _KIND_SUBJECTS[kind]
        if not policy.collect[kind]:
            out.append(f"{subject} {verb} not collected.")
            continue
        if kind == "location":
            out.append(_location_sentence(policy))
            rules = policy.location
            if rules.only_inside:
                out.append(
                    f"Locations outside {_areas(len(rules.only_inside), 'allowed', 'all of the ')} "
                    "are never stored."
                )
            if rules.never_inside:
                out.append(
                    f"Locations inside {_areas(len(rules.never_inside), 'excluded', '')} "
                    "are never stored."
                )
        else:
            days = _days(policy.retention_for(kind))
            out.append(f"{subject} {verb} stored and kept for {days}.")
        for name in FIELD_TYPES[kind]:
            rule = policy.fields.get(f"{kind}.{name}")
            if rule is not None:
                out.append(_rule_sentence(f"{kind}.{name}", rule))
    return out


def beyond_floor(policy: Policy, floor: Policy) -> list[str]:
    """Where ``policy`` collects or keeps more than ``floor`` (the personal-device
    floor), one sentence each: what a policy written for personal devices adds to
    the minimum every personal device gets. Empty when it adds nothing."""
    from privacy_filters.floor import stricter_rule

    out: list[str] = []
    for kind in KINDS:
        if not policy.collect[kind]:
            continue
        subject, verb = _KIND_SUBJECTS[kind]
        if not floor.collect[kind]:
            out.append(f"{subject} {verb} collected (the minimum for personal devices: "
                       "not collected).")
            continue
        days, floor_days = policy.retention_for(kind), floor.retention_for(kind)
        if days > floor_days:
            out.append(f"{subject} {verb} kept for {_days(days)} (the minimum for personal "
                       f"devices: {_days(floor_days)}).")
        for name in FIELD_TYPES[kind]:
            key = f"{kind}.{name}"
            mine, theirs = policy.fields.get(key), floor.fields.get(key)
            if mine is not None and mine.action == "keep":
                mine = None
            if stricter_rule(mine, theirs) != mine:
                assert theirs is not None  # only a floor rule can be stricter
                out.append(f"{_subject(key)} is {_short_phrase(key, mine)} (the minimum for "
                           f"personal devices: {_short_phrase(key, theirs)}).")
    return out
