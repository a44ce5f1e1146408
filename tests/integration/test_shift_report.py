"""The shift report through a real server: check-ins and check-outs published by
devices over TLS, stored by the real ingest (sealed, shaped by each device's policy),
read back by ``GET /api/v1/reports/shifts`` as JSON and CSV, the overdue limit and
its default, the access log, the bounds, and the device user's own view."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from agent_protocol import Record, encode_telemetry, telemetry_topic
from mdm_server.reports.shifts import CSV_COLUMNS
from tests.support.mqtt import publish_as_devices
from tests.support.services import (
    Server,
    create_database,
    drop_database,
    fetch,
    running_broker,
    server_env,
    wait_for_count,
)

pytestmark = pytest.mark.integration

TENANT, OTHER = "acme", "globex"
SHIFTS = "/api/v1/reports/shifts"
#: van1's check-in notes: a comma, quotes and a line break (RFC 4180 quoting).
NOTES_IN = 'dropped it, "hard"\non the stairs'
#: van2's values that a spreadsheet would run as formulas.
EVIL_USER = "@SUM(A1:A9)"
EVIL_NOTES = '=HYPERLINK("http://evil.example","click")'
MASKED_USER = "m-4711"
MASKED_NOTES = "secret remark"


@dataclass
class World:
    server: Server
    database: str
    admin: str
    auditor: str
    other_admin: str
    day: datetime  # yesterday, 00:00 UTC
    now: datetime  # when the data was published

    def get(self, path: str, token: str | None = None, **headers: str) -> requests.Response:
        h = {"Authorization": f"Bearer {token or self.admin}", **headers}
        return requests.get(self.server.base + path, headers=h, timeout=60)

    def report(self, token: str | None = None, **query: Any) -> dict[str, Any]:
        query.setdefault("from", self.day.isoformat())
        resp = requests.get(self.server.base + SHIFTS, params=query, timeout=60,
                            headers={"Authorization": f"Bearer {token or self.admin}"})
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def put_limit(self, seconds: object, token: str | None = None) -> requests.Response:
        return requests.put(self.server.base + SHIFTS + "/settings",
                            json={"overdue_after_s": seconds}, timeout=30,
                            headers={"Authorization": f"Bearer {token or self.admin}"})


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def _event(tenant: str, device: str, rid: str, at: datetime, event: str,
           **data: Any) -> tuple[str, bytes]:
    rec = Record(rid, _ms(at), {"event": event, **data})
    return (telemetry_topic(tenant, device, "checkinout"),
            encode_telemetry([rec], device=device, kind="checkinout"))


def _messages(day: datetime, now: datetime) -> list[tuple[str, bytes]]:
    h = timedelta(hours=1)
    cond_ok = {"battery_pct": 95, "screen": "ok", "case": "ok", "notes": "all fine"}
    return [
        # The synthetic day: out at 07:00 in good order, back at 15:00 with a damaged case.
        _event(TENANT, "van1", "v1-out", day + 7 * h, "check_out", user_id="u-17",
               shift_id="early", condition=cond_ok),
        _event(TENANT, "van1", "v1-in", day + 15 * h, "check_in", user_id="u-17",
               shift_id="early", condition={"battery_pct": 40, "screen": "ok",
                                            "case": "damaged", "notes": NOTES_IN}),
        # Out for 20 hours and counting: past the default limit (8 h + 1 h).
        _event(TENANT, "van2", "v2-out", now - 20 * h, "check_out", user_id=EVIL_USER,
               condition={"battery_pct": 80, "notes": EVIL_NOTES}),
        # Checked out, then out again without a check-in; that second shift closed.
        _event(TENANT, "van3", "v3-out1", day + 8 * h, "check_out", user_id="u-5"),
        _event(TENANT, "van3", "v3-out2", day + 12 * h, "check_out", user_id="u-6"),
        _event(TENANT, "van3", "v3-in", day + 13 * h, "check_in", user_id="u-6"),
        # Out for an hour: open, not overdue.
        _event(TENANT, "van4", "v4-out", now - h, "check_out", user_id="u-8"),
        # Under a policy that hashes the user id and drops notes and the screen.
        _event(TENANT, "masked1", "m-out", day + 9 * h, "check_out", user_id=MASKED_USER,
               shift_id="late", condition={**cond_ok, "notes": MASKED_NOTES}),
        _event(TENANT, "masked1", "m-in", day + 11 * h, "check_in", user_id=MASKED_USER,
               shift_id="late", condition={"battery_pct": 60, "screen": "cracked", "case": "ok",
                          "notes": MASKED_NOTES + " 2"}),
        # Under a policy that does not collect check-ins/outs at all.
        _event(TENANT, "nocol1", "n-out", day + 10 * h, "check_out", user_id="u-9"),
        _event(TENANT, "nocol1", "n-in", day + 12 * h, "check_in", user_id="u-9"),
        # Another tenant's shift.
        _event(OTHER, "g1", "g-out", day + 7 * h, "check_out", user_id="u-17"),
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("shifts")
    database = asyncio.run(create_database())
    try:
        with running_broker(tmp) as broker:
            srv = Server(server_env(database, broker.url, MDM_API_RATE_PER_S="10000",
                                    MDM_API_BURST="10000"), tmp / "serve.log")
            srv.cli("tenant", "create", TENANT)
            srv.cli("tenant", "create", OTHER)
            for tenant, device, group in ((TENANT, "van1", "fleet"), (TENANT, "van2", "fleet"),
                                          (TENANT, "van3", "fleet"), (TENANT, "van4", "fleet"),
                                          (TENANT, "masked1", "masked"),
                                          (TENANT, "nocol1", "nocollect"),
                                          (OTHER, "g1", "fleet")):
                srv.cli("device", "enroll", "--tenant", tenant, "--device", device,
                        "--ownership", "corporate", "--group", group)
            admin = srv.cli("admin", "create", "--tenant", TENANT, "--name", "alice").strip()
            auditor = srv.cli("admin", "create", "--tenant", TENANT, "--name", "audrey",
                              "--role", "auditor").strip()
            other = srv.cli("admin", "create", "--tenant", OTHER, "--name", "eve").strip()
            srv.start()
            try:
                for name, policy in (
                        ("masked", {"applies_to": {"groups": ["masked"]}, "fields": {
                            "checkinout.user_id": {"action": "hash"},
                            "checkinout.condition.notes": {"action": "drop"},
                            "checkinout.condition.screen": {"action": "drop"}}}),
                        ("nocollect", {"applies_to": {"groups": ["nocollect"]},
                                       "collect": {"checkinout": False}})):
                    status, body = srv.request("PUT", f"/api/v1/policies/{name}", admin, policy)
                    assert status == 201, body
                time.sleep(1.0)  # the ingest reloads the tenant's policies
                now = datetime.now(UTC).replace(microsecond=0)
                day = (now - timedelta(days=1)).replace(hour=0, minute=0, second=0)
                messages = _messages(day, now)
                publish_as_devices(broker.port, messages)
                # Every event is in checkout_events, whatever the policy collects.
                assert wait_for_count(database, "SELECT count(*) FROM checkout_events",
                                      len(messages), timeout=60) == len(messages)
                # ... and every record but nocol1's two is stored (sealed).
                assert wait_for_count(
                    database, "SELECT count(*) FROM telemetry WHERE kind = 'checkinout'",
                    len(messages) - 2, timeout=60) == len(messages) - 2
                yield World(srv, database, admin, auditor, other, day, now)
            finally:
                srv.stop()
    finally:
        asyncio.run(drop_database(database))


def _by_device(shifts: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for s in shifts:
        out.setdefault(s["device"], []).append(s)
    return out


def _reads(world: World, device: str) -> int:
    rows = asyncio.run(fetch(
        world.database, "SELECT count(*) AS n FROM audit_log WHERE action = "
        "'personal_data.read' AND target = $1 AND details->>'what' = 'shifts'",
        f"device:{device}"))
    return int(rows[0]["n"])


# --- the synthetic day ------------------------------------------------------------------


def test_the_synthetic_day_is_one_shift_with_its_condition_change(world: World) -> None:
    body = world.report(device="van1")
    [shift] = body["shifts"]
    h = timedelta(hours=1)
    assert shift["status"] == "closed"
    assert shift["user"] == "u-17" and shift["shift_id"] == "early"
    assert datetime.fromisoformat(shift["checked_out_at"]) == world.day + 7 * h
    assert datetime.fromisoformat(shift["checked_in_at"]) == world.day + 15 * h
    assert shift["duration_s"] == 8 * 3600
    assert shift["check_out"]["condition"] == {"battery_pct": 95, "screen": "ok",
                                               "case": "ok", "notes": "all fine"}
    assert shift["check_in"]["condition"] == {"battery_pct": 40, "screen": "ok",
                                              "case": "damaged", "notes": NOTES_IN}
    assert shift["check_out"]["stored"] and shift["check_out"]["not_stored"] == []
    changes = {c["field"]: c for c in shift["changes"]}
    assert changes["case"] == {"field": "case", "from": "ok", "to": "damaged"}
    assert changes["battery_pct"] == {"field": "battery_pct", "from": 95, "to": 40,
                                      "delta": -55}
    assert set(changes) == {"case", "battery_pct", "notes"}  # the screen stayed ok


def test_every_status_and_the_overdue_devices_under_the_default_limit(world: World) -> None:
    body = world.report()
    # The default: the longest shift of the last 30 days (van1's 8 h) plus an hour.
    assert (body["overdue_after_s"], body["overdue_source"]) == (9 * 3600, "default")
    shifts = _by_device(body["shifts"])
    assert set(shifts) == {"van1", "van2", "van3", "van4", "masked1", "nocol1"}  # not g1
    assert [s["status"] for s in shifts["van2"]] == ["overdue"]
    assert [s["status"] for s in shifts["van4"]] == ["open"]
    assert 3599 <= shifts["van4"][0]["duration_s"] <= 3600 + 120  # so far
    first, second = shifts["van3"]
    assert first["status"] == "no_check_in" and first["checked_in_at"] is None
    assert first["next_check_out_at"] == second["checked_out_at"]
    assert first["duration_s"] is None and first["check_in"] is None
    assert second["status"] == "closed" and second["duration_s"] == 3600
    assert second["user"] == "u-6"
    # The overdue devices head the first page, whatever the range.
    assert [s["device"] for s in body["overdue"]] == ["van2"] and body["overdue_total"] == 1
    late = world.report(**{"from": (world.now - timedelta(hours=2)).isoformat()})
    assert [s["device"] for s in late["overdue"]] == ["van2"]
    # A shift under way when the range begins overlaps it: van2 (out 20 hours) is
    # listed; the van3 shift that ended yesterday is not.
    assert {s["device"] for s in late["shifts"]} == {"van2", "van4"}
    # A range that ends before van4 went out does not list it; status filters.
    early = world.report(to=(world.now - timedelta(hours=2)).isoformat())
    assert "van4" not in _by_device(early["shifts"])
    assert {s["device"] for s in world.report(status="no_check_in")["shifts"]} == {"van3"}
    assert {s["device"] for s in world.report(status="overdue")["shifts"]} == {"van2"}


def test_the_overdue_limit_is_the_tenants_to_set_and_audited(world: World) -> None:
    resp = world.get(SHIFTS + "/settings", world.auditor)
    assert resp.status_code == 200
    assert resp.json() == {"overdue_after_s": 9 * 3600, "source": "default",
                           "setting_s": None, "longest_shift_s": 8 * 3600,
                           "default_s": 9 * 3600, "updated_at": None, "updated_by": None}
    assert world.put_limit(86400, world.auditor).status_code == 403
    for bad in (299, 90 * 86400 + 1, "3600", 3600.5, True):
        resp = world.put_limit(bad)
        assert resp.status_code == 422, (bad, resp.text)
    resp = requests.put(world.server.base + SHIFTS + "/settings", json={}, timeout=30,
                        headers={"Authorization": f"Bearer {world.admin}"})
    assert resp.status_code == 422
    try:
        resp = world.put_limit(86400)
        assert resp.status_code == 200, resp.text
        got = resp.json()
        assert (got["overdue_after_s"], got["source"], got["setting_s"]) == (86400, "tenant",
                                                                             86400)
        assert got["updated_by"] == "alice"
        body = world.report()
        assert body["overdue"] == [] and body["overdue_total"] == 0
        assert [s["status"] for s in _by_device(body["shifts"])["van2"]] == ["open"]
        entries = asyncio.run(fetch(
            world.database, "SELECT actor, target, details FROM audit_log "
            "WHERE action = 'shift_settings.update' ORDER BY seq"))
        assert [(e["actor"], e["target"], e["details"]) for e in entries] == [
            ("alice", "tenant:acme", {"overdue_after_s": 86400})]
    finally:
        resp = world.put_limit(None)
    assert resp.status_code == 200 and resp.json()["source"] == "default"
    assert [s["device"] for s in world.report()["overdue"]] == ["van2"]


def test_a_policy_that_hashes_or_drops_shows_what_is_stored(world: World) -> None:
    resp = world.get(f"{SHIFTS}?device=masked1&from={world.day.isoformat()}".replace(
        "+", "%2B"))
    assert resp.status_code == 200
    assert MASKED_USER not in resp.text and MASKED_NOTES not in resp.text
    [shift] = resp.json()["shifts"]
    assert shift["user"].startswith("hmac-sha256:") and len(shift["user"]) == 44
    for side in (shift["check_out"], shift["check_in"]):
        assert side["stored"] and side["policy"] == "masked"
        assert side["not_stored"] == ["screen", "notes"]
        assert side["condition"]["notes"] is None and side["condition"]["screen"] is None
    # Only what is stored on both sides can change: the screen's cracking is not stored.
    assert shift["changes"] == [{"field": "battery_pct", "from": 95, "to": 60,
                                 "delta": -35}]
    # The user filter matches the id as stored: by its hash, never by the raw id.
    assert world.report(user=shift["user"])["shifts"] == [shift]
    assert world.report(user=MASKED_USER)["shifts"] == []
    # The server's access log names the filter, never its value.
    world.report(user=EVIL_USER, **{"u-4711-as-a-name": "x"})
    log = world.server.log_text()
    assert '"GET /api/v1/reports/shifts?user&from HTTP/1.1" 200' in log
    assert '"GET /api/v1/reports/shifts?user&?&from HTTP/1.1" 200' in log
    assert MASKED_USER not in log and "SUM(A1" not in log and "4711" not in log
    # Not collected at all: the times are kept (checkout_events), nothing else.
    [nocol] = world.report(device="nocol1")["shifts"]
    assert nocol["status"] == "closed" and nocol["duration_s"] == 2 * 3600
    assert nocol["user"] is None
    for side in (nocol["check_out"], nocol["check_in"]):
        assert not side["stored"] and side["not_stored"] == [
            "user_id", "shift_id", "battery_pct", "screen", "case", "notes"]


def test_reading_the_report_is_in_each_listed_devices_access_log(world: World) -> None:
    devices = ("van1", "van2", "van3", "van4", "masked1", "nocol1")
    before = {d: _reads(world, d) for d in devices}
    world.report(device="van1")
    after = {d: _reads(world, d) for d in devices}
    assert after == {**before, "van1": before["van1"] + 1}
    # One entry per device per request, however many of its shifts are listed; the
    # overdue device at the head of the page is read too.
    world.report(status="closed", token=world.auditor)
    again = {d: _reads(world, d) for d in devices}
    assert again == {d: after[d] + (d != "van4") for d in devices}
    # The device's user sees who read it, in which role, and that it was the shifts.
    user = world.server.cli("user", "token", "--tenant", TENANT, "--device", "van3").strip()
    entries = world.get("/api/v1/me/devices/van3/access-log", user).json()["entries"]
    assert (entries[0]["actor"], entries[0]["role"], entries[0]["what"]) == (
        "audrey", "auditor", "shifts")
    user = world.server.cli("user", "token", "--tenant", TENANT, "--device", "van1").strip()
    entries = world.get("/api/v1/me/devices/van1/access-log", user).json()["entries"]
    assert ("alice", "admin", "shifts") in [(e["actor"], e["role"], e["what"])
                                            for e in entries]
    # A user filter that matches nothing lists no device and logs none.
    world.report(user="nobody-at-all")
    assert {d: _reads(world, d) for d in devices} == again


# --- CSV ----------------------------------------------------------------------------------


def test_csv_is_the_same_report_rfc_4180_and_safe_in_a_spreadsheet(world: World) -> None:
    query = f"?from={world.day.isoformat()}".replace("+", "%2B")
    resp = world.get(SHIFTS + query, Accept="text/csv")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert resp.headers["Content-Disposition"].startswith('attachment; filename="shifts-')
    assert resp.headers["Cache-Control"] == "no-store"
    raw = resp.content
    assert world.get(SHIFTS + query + "&format=csv").content == raw
    # Quoted per RFC 4180: CRLF between records, the field with a comma, quotes and a
    # line break in quotes, its quotes doubled.
    assert raw.startswith(",".join(CSV_COLUMNS).encode() + b"\r\n")
    assert b'"dropped it, ""hard""\non the stairs"' in raw
    rows = list(csv.reader(io.StringIO(raw.decode(), newline="")))
    assert rows[0] == list(CSV_COLUMNS)
    table = [dict(zip(CSV_COLUMNS, r, strict=True)) for r in rows[1:]]
    assert len(table) == len(world.report()["shifts"]) == int(resp.headers["X-Shift-Rows"])
    [van1] = [r for r in table if r["device"] == "van1"]
    assert (van1["user"], van1["out_case"], van1["in_case"], van1["in_notes"]) == (
        "u-17", "ok", "damaged", NOTES_IN)
    assert (van1["out_battery_pct"], van1["in_battery_pct"], van1["duration_s"]) == (
        "95", "40", "28800")
    assert "case: ok -> damaged" in van1["changes"]
    # A spreadsheet would run these: they are text now.
    [van2] = [r for r in table if r["device"] == "van2"]
    assert van2["user"] == "'" + EVIL_USER and van2["out_notes"] == "'" + EVIL_NOTES
    assert van2["status"] == "overdue" and van2["checked_in_at"] == ""
    assert not any(cell.startswith(("=", "+", "-", "@")) for r in rows for cell in r)
    [masked] = [r for r in table if r["device"] == "masked1"]
    assert masked["not_stored"] == "check_out: screen, notes; check_in: screen, notes"
    [nocol] = [r for r in table if r["device"] == "nocol1"]
    assert nocol["not_stored"] == "check_out: record; check_in: record"
    # JSON when JSON is preferred (or nothing is said).
    resp = world.get(SHIFTS, **{"Accept": "application/json, text/csv;q=0.5"})
    assert resp.headers["Content-Type"].startswith("application/json")
    # A CSV page: X-Next-Cursor continues it.
    resp = world.get(SHIFTS + query + "&format=csv&limit=2")
    nxt = resp.headers["X-Next-Cursor"]
    assert len(list(csv.reader(io.StringIO(resp.text, newline="")))) == 3
    rest = world.get(SHIFTS + query + f"&format=csv&cursor={nxt}").text
    assert len(list(csv.reader(io.StringIO(rest, newline="")))) == 1 + len(table) - 2


# --- bounds and paging ----------------------------------------------------------------------


def test_bounds_and_pages(world: World) -> None:
    start = world.day.isoformat()
    for query, why in ((
            {"from": start, "to": (world.day + timedelta(days=31, seconds=1)).isoformat()},
            "at most 31 days"), ({"from": start, "to": start}, "after from"),
            ({"limit": "501"}, "limit"), ({"cursor": "nonsense"}, "cursor"),
            ({"status": "lost"}, "status"), ({"format": "xml"}, "format"),
            ({"device": "no/such"}, "device"), ({"user": "x" * 129}, "user"),
            ({"from": "yesterday"}, "RFC 3339")):
        resp = requests.get(world.server.base + SHIFTS, params=query, timeout=30,
                            headers={"Authorization": f"Bearer {world.admin}"})
        assert resp.status_code == 400 and why in resp.json()["error"], (query, resp.text)
    # CSV pages may be larger than JSON ones.
    assert world.get(SHIFTS + "?format=csv&limit=5000").status_code == 200
    # Page by page: every shift once, in order; the overdue list on the first page only.
    whole = world.report(limit=500)
    assert whole["next"] is None
    seen, cursor, pages = [], None, 0
    while True:
        page = world.report(limit=1, **({"cursor": cursor} if cursor else {}))
        pages += 1
        assert (page["overdue"] is None) == (cursor is not None)
        seen += page["shifts"]
        cursor = page["next"]
        if cursor is None:
            break
    assert pages == len(whole["shifts"]) == 7
    key = [(s["device"], s["checked_out_at"]) for s in seen]
    assert key == [(s["device"], s["checked_out_at"]) for s in whole["shifts"]]
    assert key == sorted(key, key=lambda k: (k[1], k[0]))


def test_tenants_see_only_their_own_shifts(world: World) -> None:
    body = world.report(token=world.other_admin)
    assert [s["device"] for s in body["shifts"]] == ["g1"]
    assert body["overdue"] == [] or [s["device"] for s in body["overdue"]] == ["g1"]
    assert "g1" not in _by_device(world.report()["shifts"])


# --- the device user's own view ----------------------------------------------------------


def test_a_device_user_sees_their_own_devices_shifts(world: World) -> None:
    user = world.server.cli("user", "token", "--tenant", TENANT, "--device", "van1").strip()
    before = _reads(world, "van1")
    query = f"?from={world.day.isoformat()}".replace("+", "%2B")
    resp = world.get("/api/v1/me/devices/van1/shifts" + query, user)
    assert resp.status_code == 200, resp.text
    [mine] = resp.json()["shifts"]
    assert mine == world.report(device="van1")["shifts"][0]
    assert _reads(world, "van1") == before + 1  # the admin's read above, not the user's
    assert world.get("/api/v1/me/devices/van2/shifts", user).status_code == 404
    assert world.get(SHIFTS, user).status_code == 403
    assert world.get("/api/v1/me/devices/van1/shifts", world.admin).status_code == 403


def test_a_new_holder_does_not_see_the_previous_holders_shifts(world: World) -> None:
    """Run last: it adds a device. Its first holder's shift was recorded before the
    re-enrollment; the next holder's token shows only their own."""
    srv, h = world.server, timedelta(hours=1)
    srv.cli("device", "enroll", "--tenant", TENANT, "--device", "hand1", "--ownership",
            "corporate", "--group", "fleet")
    port = int(srv.env["MDM_MQTT_URL"].rsplit(":", 1)[1])
    publish_as_devices(port, [
        _event(TENANT, "hand1", "h-out", world.day + 6 * h, "check_out", user_id="first"),
        _event(TENANT, "hand1", "h-in", world.day + 7 * h, "check_in", user_id="first")])
    count = "SELECT count(*) FROM checkout_events WHERE device_id = 'hand1'"
    assert wait_for_count(world.database, count, 2, timeout=60) == 2
    srv.cli("device", "reenroll", "--tenant", TENANT, "--device", "hand1")
    publish_as_devices(port, [
        _event(TENANT, "hand1", "h-out2", world.day + 8 * h, "check_out", user_id="second")],
        generations={(TENANT, "hand1"): 2})
    assert wait_for_count(world.database, count, 3, timeout=60) == 3
    user = srv.cli("user", "token", "--tenant", TENANT, "--device", "hand1").strip()
    query = f"?from={world.day.isoformat()}".replace("+", "%2B")
    mine = world.get("/api/v1/me/devices/hand1/shifts" + query, user).json()["shifts"]
    assert [s["user"] for s in mine] == ["second"]
    # The admin's report has both.
    assert [s["user"] for s in world.report(device="hand1")["shifts"]] == ["first", "second"]
