"""The per-device rate limit (ingest/limits.py) and the dead-letter tally
(ingest/dead_letters.py): pure, with a clock the test turns."""

from __future__ import annotations

import timeit

import pytest

from mdm_server.ingest.batch import DeadLetter
from mdm_server.ingest.dead_letters import DeadLetterTally
from mdm_server.ingest.limits import RATE_LIMITED, DeviceLimiter

LOC = "mdm/v1/acme/devices/d1/telemetry/location"
IDENT = "mdm/v1/acme/devices/d1/telemetry/identity"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_device_gets_its_burst_then_its_rate_across_all_its_topics() -> None:
    clock = Clock()
    lim = DeviceLimiter(10, 100, clock=clock)
    assert all(lim.check(LOC if i % 2 else IDENT) is None for i in range(100))
    over = lim.check(LOC)
    assert over is not None and (over.tenant, over.device) == ("acme", "d1")
    assert over.topic == "mdm/v1/acme/devices/d1/#"
    assert lim.check(IDENT) is over  # one bucket for the device's topics
    clock.t += 1.0  # 10 tokens later
    assert [lim.check(LOC) is None for _ in range(11)] == [True] * 10 + [False]
    clock.t += 3600.0  # a long pause refills to the burst, no more
    assert sum(lim.check(LOC) is None for _ in range(150)) == 100


def test_other_devices_are_not_limited_by_one_that_floods() -> None:
    clock = Clock()
    lim = DeviceLimiter(10, 100, clock=clock)
    for _ in range(10_000):
        lim.check(LOC)
    assert lim.check(LOC) is not None
    assert lim.check("mdm/v1/acme/devices/d2/telemetry/location") is None
    assert lim.check("mdm/v1/other/devices/d1/telemetry/location") is None


def test_topics_that_do_not_parse_share_a_bucket_per_what_parsed() -> None:
    lim = DeviceLimiter(1, 2, clock=Clock())
    a = [lim.check(f"junk/{i}") for i in range(3)]
    assert a[:2] == [None, None] and a[2] is not None
    assert (a[2].tenant, a[2].device, a[2].topic) == (None, None, "{topic}")
    # A device's sub-topic that names no kind still counts against its device.
    for _ in range(2):
        lim.check("mdm/v1/acme/devices/d9/telemetry/location")
    over = lim.check("mdm/v1/acme/devices/d9/telemetry/imei=356938035643809")
    assert over is not None and over.topic == "mdm/v1/acme/devices/d9/#"
    assert "356938035643809" not in over.detail + over.topic


def test_the_maps_stay_bounded_and_forget_only_full_buckets() -> None:
    clock = Clock()
    lim = DeviceLimiter(1, 5, clock=clock, max_entries=100)
    for _ in range(5):
        lim.check(LOC)  # d1 is empty, and kept so: a message a second
    for i in range(1000):
        clock.t += 1.0  # each new device is full again a second after its message
        assert lim.check(LOC) is None
        lim.check(f"mdm/v1/acme/devices/x{i}/telemetry/location")
    assert len(lim._by_topic) <= 100 and len(lim._by_device) <= 100
    assert lim.check(LOC) is not None  # still empty: not forgotten
    # Devices that are all active are all kept (the scan backs off, no loss).
    busy = DeviceLimiter(1, 5, clock=Clock(), max_entries=100)
    for i in range(1000):
        busy.check(f"mdm/v1/acme/devices/x{i}/telemetry/location")
    assert len(busy._by_device) == 1000


def test_a_check_costs_well_under_a_microsecond() -> None:
    lim = DeviceLimiter(1e9, 10**9)  # never over: the common case
    topics = [f"mdm/v1/acme/devices/d{i % 50}/telemetry/location" for i in range(50)]
    for t in topics:
        lim.check(t)
    check = lim.check
    best = min(timeit.repeat(lambda: [check(t) for t in topics], number=2000, repeat=5))
    per_check = best / (2000 * len(topics))
    assert per_check < 1e-6, f"{per_check * 1e9:.0f} ns a check"


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        DeviceLimiter(0, 10)
    with pytest.raises(ValueError):
        DeviceLimiter(1, 0)


def test_the_tally_sums_per_device_reason_and_topic_and_keeps_the_first_detail() -> None:
    lim = DeviceLimiter(1, 1, clock=Clock())
    lim.check(LOC)
    bucket = lim.check(LOC)
    assert bucket is not None
    tally = DeadLetterTally()
    for i in range(1000):
        tally.add(DeadLetter(LOC, "acme", "d1", None, "not_json", f"detail {i}", 10))
    tally.add(DeadLetter(LOC, "acme", "d1", None, "wrong_type", "data.lat: number", 7))
    tally.add(DeadLetter("{topic}", None, None, "prefix", "bad_topic", "topic", 3))
    tally.add_limited(bucket, 5000, 50_000)
    tally.add_limited(bucket, 1, 10)
    assert tally.messages == 1000 + 1 + 1 + 5001
    cols = tally.columns()
    rows = sorted(zip(*cols, strict=True), key=lambda r: (str(r[0]), str(r[2])))
    assert rows == [
        (None, None, "bad_topic", "{topic}", "prefix", "topic", 1, 3),
        ("acme", "d1", "not_json", LOC, None, "detail 0", 1000, 10_000),
        ("acme", "d1", RATE_LIMITED, "mdm/v1/acme/devices/d1/#", None, bucket.detail,
         5001, 50_010),
        ("acme", "d1", "wrong_type", LOC, None, "data.lat: number", 1, 7),
    ]
