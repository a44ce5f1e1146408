"""The API's rate limiter (mdm_server/api/limits.py), without a server: buckets,
their two tables, and what counts as one client address."""

from __future__ import annotations

from mdm_server.api.limits import ApiLimiter, RateLimiter, address_key


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    limiter = RateLimiter(rate=2, burst=3)
    assert [limiter.take(b"k", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take(b"k", now=0.0) == 0.5  # one more in half a second
    assert limiter.take(b"k", now=0.5) == 0.0
    assert limiter.take(b"k", now=0.5) > 0


def test_a_full_table_forgets_the_least_recently_used_key_only() -> None:
    limiter = RateLimiter(rate=1, burst=1, max_keys=3)
    for key in (b"a", b"b", b"c"):
        limiter.take(key, now=0.0)
    limiter.take(b"a", now=0.0)  # a is used again: b is now the oldest
    limiter.take(b"d", now=0.0)
    assert len(limiter) == 3
    assert limiter.take(b"a", now=0.0) > 0  # still remembered, still empty
    assert limiter.take(b"b", now=0.0) == 0.0  # forgotten: a fresh bucket


def test_addresses_cannot_push_principals_out() -> None:
    limiter = ApiLimiter(rate=1, burst=1, max_keys=10)
    assert limiter.principals.take(b"acme\0token", now=0.0) == 0.0
    for i in range(1000):
        limiter.addresses.take(address_key(f"10.0.{i // 250}.{i % 250}"), now=0.0)
    assert len(limiter.addresses) == 10
    assert limiter.principals.take(b"acme\0token", now=0.0) > 0


def test_what_counts_as_one_client_address() -> None:
    assert address_key("192.0.2.7") == bytes([192, 0, 2, 7])
    assert address_key("192.0.2.7") != address_key("192.0.2.8")
    assert address_key("::ffff:192.0.2.7") == address_key("192.0.2.7")
    # One /64 is one client, however it rotates its interface ids ...
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:abcd:ef01:2345:6789")
    # ... and another /64 another.
    assert address_key("2001:db8:1:2::1") != address_key("2001:db8:1:3::1")
    assert address_key("fe80::1%eth0") == address_key("fe80::2%eth1")
    # Not an IP peer (a Unix socket): one bucket for all of them.
    assert address_key(None) == address_key("") == b"?"
