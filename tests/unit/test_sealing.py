"""Sealing records at rest: a sealed value opens only under its device's key and
only for the row it was sealed for."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mdm_server.storage.keyring import epoch_kek, legacy_kek, unwrap_key, wrap_key
from mdm_server.storage.sealing import (
    DeviceReader,
    SealError,
    open_value,
    seal_value,
    ts_ms,
)

TS = 1_764_000_000_123
DATA = {"imei": "356938035643809", "lat": 52.1}


def _key() -> AESGCM:
    return AESGCM(AESGCM.generate_key(256))


def test_a_sealed_value_opens_to_what_was_sealed_and_hides_it() -> None:
    key = _key()
    sealed = seal_value(key, "acme", "d1", "identity", "r1", TS, DATA)
    assert b"356938035643809" not in sealed
    assert open_value(key, "acme", "d1", "identity", "r1", TS, sealed) == DATA
    # A random nonce per record: the same record sealed twice differs.
    assert seal_value(key, "acme", "d1", "identity", "r1", TS, DATA) != sealed


@pytest.mark.parametrize("row", [
    ("other", "d1", "identity", "r1", TS), ("acme", "d2", "identity", "r1", TS),
    ("acme", "d1", "location", "r1", TS), ("acme", "d1", "identity", "r2", TS),
    ("acme", "d1", "identity", "r1", TS + 1)])
def test_a_sealed_value_does_not_open_for_another_row(row: tuple[str, str, str, str, int]
                                                      ) -> None:
    key = _key()
    sealed = seal_value(key, "acme", "d1", "identity", "r1", TS, DATA)
    with pytest.raises(SealError):
        open_value(key, *row, sealed)


def test_a_changed_byte_or_another_key_does_not_open() -> None:
    key = _key()
    sealed = bytearray(seal_value(key, "acme", "d1", "identity", "r1", TS, DATA))
    with pytest.raises(SealError):
        open_value(_key(), "acme", "d1", "identity", "r1", TS, bytes(sealed))
    sealed[-1] ^= 1
    with pytest.raises(SealError):
        open_value(key, "acme", "d1", "identity", "r1", TS, bytes(sealed))
    with pytest.raises(SealError, match="unknown sealed format"):
        open_value(key, "acme", "d1", "identity", "r1", TS, b"\x02" + bytes(sealed[1:]))


def test_a_device_key_unwraps_only_under_its_epoch_kek_and_for_its_device() -> None:
    raw = AESGCM.generate_key(256)
    secret = b"s" * 32
    wrapped = wrap_key(epoch_kek(b"m" * 32, 3, secret), "acme", "d1", raw)
    assert len(wrapped) == 60 and raw not in wrapped
    assert unwrap_key(epoch_kek(b"m" * 32, 3, secret), "acme", "d1", wrapped) == raw
    sealed = seal_value(AESGCM(raw), "acme", "d1", "sim", "r", TS, DATA)
    assert open_value(AESGCM(raw), "acme", "d1", "sim", "r", TS, sealed) == DATA
    # Neither the master key alone (the scheme before the key ring), nor the epoch
    # secret with another master key, nor the secret under another epoch number,
    # nor another device's associated data opens it.
    for kek, device in [(legacy_kek(b"m" * 32), "d1"),
                        (epoch_kek(b"n" * 32, 3, secret), "d1"),
                        (epoch_kek(b"m" * 32, 3, b"t" * 32), "d1"),
                        (epoch_kek(b"m" * 32, 4, secret), "d1"),
                        (epoch_kek(b"m" * 32, 3, secret), "d2")]:
        with pytest.raises(InvalidTag):
            unwrap_key(kek, "acme", device, wrapped)


def test_epoch_0_is_the_master_key_only_scheme_of_before_the_key_ring() -> None:
    raw = AESGCM.generate_key(256)
    wrapped = wrap_key(legacy_kek(b"m" * 32), "acme", "d1", raw)
    assert unwrap_key(epoch_kek(b"m" * 32, 0, b""), "acme", "d1", wrapped) == raw
    with pytest.raises(ValueError, match="32 bytes"):
        epoch_kek(b"m" * 32, 1, b"short")


def test_the_reader_opens_by_key_id_and_says_none_once_the_key_is_gone() -> None:
    key = _key()
    ts = datetime.fromtimestamp(TS / 1000, UTC)
    assert ts_ms(ts) == TS
    row = {"kind": "location", "record_id": "r1", "ts": ts, "key_id": 7, "data": None,
           "sealed": seal_value(key, "acme", "d1", "location", "r1", TS, DATA)}
    assert DeviceReader("acme", "d1", {7: key}).data(row) == DATA
    assert DeviceReader("acme", "d1", {8: _key()}).data(row) is None
    legacy = {**row, "key_id": None, "sealed": None, "data": {"lat": 1.0}}
    assert DeviceReader("acme", "d1", {}).data(legacy) == {"lat": 1.0}
