"""The live feed's NOTIFY payloads (mdm_server/live/feed.py): one per batch and
tenant while it fits, split under PostgreSQL's 8,000-byte limit when it does not,
each naming every device's time range exactly; and read back as they were sent."""

from __future__ import annotations

from datetime import UTC, datetime

from mdm_server.live.feed import (
    PAYLOAD_MAX,
    EventNotice,
    LocationNotice,
    location_notices,
    parse_notice,
)

AT = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC)


def _row(tenant: str, device: str, ts: int, kind: str = "location") -> tuple[object, ...]:
    return (tenant, device, kind, "rid", ts, "default", 1, {"lat": 1.0})


def test_one_payload_per_tenant_with_each_devices_range() -> None:
    rows = [_row("acme", "a", 30), _row("acme", "a", 10), _row("acme", "b", 20),
            _row("acme", "a", 20), _row("globex", "g", 5), _row("acme", "c", 1, "identity")]
    notices = [parse_notice(p) for p in location_notices(rows, AT)]
    assert all(isinstance(n, LocationNotice) for n in notices)
    by_tenant = {n.tenant: n for n in notices if isinstance(n, LocationNotice)}
    assert set(by_tenant) == {"acme", "globex"}
    acme = by_tenant["acme"]
    assert acme.received_at == AT  # exact to the microsecond: the rows are found by it
    assert list(zip(acme.devices, acme.lo, acme.hi, strict=True)) == [
        ("a", 10, 30), ("b", 20, 20)]  # not c: an identity record is not announced


def test_no_location_no_notice() -> None:
    assert list(location_notices([_row("acme", "a", 1, "sim")], AT)) == []


def test_a_batch_of_many_devices_is_split_under_the_limit_and_loses_none() -> None:
    devices = [f"device-{i:04d}-{'x' * 50}" for i in range(2000)]
    rows = [_row("acme", d, 1_700_000_000_000 + i) for i, d in enumerate(devices)]
    payloads = list(location_notices(rows, AT))
    assert len(payloads) > 1
    assert all(len(p.encode()) <= PAYLOAD_MAX for p in payloads)
    seen = [d for p in payloads for d in parse_notice(p).devices]  # type: ignore[union-attr]
    assert seen == devices


def test_other_notices_and_junk() -> None:
    assert parse_notice('{"k": "read", "t": "acme", "d": "a", "s": 7}') == \
        EventNotice("read", "acme", "a", 7)
    assert parse_notice('{"k": "cmd", "t": "acme", "d": "a", "e": 9}') == \
        EventNotice("cmd", "acme", "a", 9)
    for junk in ("", "null", "[]", '{"k": "loc"}', '{"k": "loc", "t": "a", "r": 1, "d": []}',
                 '{"k": "nope"}', '{"k": "read", "t": "a", "d": "b", "s": "x"}'):
        assert parse_notice(junk) is None, junk
