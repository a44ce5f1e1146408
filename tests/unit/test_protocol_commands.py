"""Commands and acks: canonical JSON, encode/decode, sign/verify and every rejection."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from agent_protocol import (
    Ack,
    Command,
    CommandRejected,
    LocalProtocolError,
    NonceStore,
    Notice,
    Reason,
    RemoteProtocolError,
    canonical_json,
    command_signing_fields,
    decode_ack,
    decode_command,
    encode_ack,
    encode_command,
    sign_command,
    verify_command,
)

NOW = 1_795_521_600_000
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
KEYS = {"k1": KEY.public_key()}


def reference(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def unsigned(**over: Any) -> Command:
    fields: dict[str, Any] = {
        "command_id": "c-1",
        "tenant": "acme",
        "device": "dev-1",
        "type": "wipe",
        "params": {"scope": "managed"},
        "notice": Notice("Uw telefoon wordt gewist — bel IT: ☎ 1234", "nl"),
        "issued_at_ms": NOW,
        "expires_at_ms": NOW + 3_600_000,
        "nonce": "n0nce-abcdefgh",
        "key_id": "k1",
        **over,
    }
    return Command(**fields)


def verify(payload: bytes, store: NonceStore | None = None, **over: Any) -> Command:
    args: dict[str, Any] = {
        "keys": KEYS,
        "tenant": "acme",
        "device": "dev-1",
        "now_ms": NOW + 1000,
        "seen_nonces": NonceStore() if store is None else store,
        **over,
    }
    return verify_command(payload, **args)


# --- canonical JSON ------------------------------------------------------------------


def test_canonical_json_matches_reference() -> None:
    obj = {
        "z": 1,
        "a": {"y": [{"b": 2, "a": 1}], "x": None},
        "é": 'naïve ☃ 𝄞 \u2028 \x7f \x01 \n " \\',
        "B": True,
        "\U0001d11e": "astral key",
        "\uffff": "bmp max",
    }
    assert canonical_json(obj) == reference(obj)
    assert b"\\u" not in canonical_json({"k": "é☃𝄞"})


canonical_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(), c, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), canonical_values, max_size=6))
def test_canonical_json_property(obj: dict[str, Any]) -> None:
    assert canonical_json(obj) == reference(obj)


def test_signing_fields() -> None:
    fields = command_signing_fields(unsigned())
    assert "sig" not in fields
    assert fields["issued_at"] == "2026-11-24T12:00:00.000Z"
    assert fields["expires_at"] == "2026-11-24T13:00:00.000Z"
    assert fields["tenant"] == "acme" and fields["device"] == "dev-1"
    assert fields["v"] == 1
    assert "notice" not in command_signing_fields(unsigned(notice=None))


# --- encode / decode -------------------------------------------------------------------


def test_command_round_trip() -> None:
    cmd = sign_command(unsigned(), KEY)
    assert len(cmd.sig) == 88
    assert decode_command(encode_command(cmd)) == cmd
    cmd2 = sign_command(unsigned(type="lock", params={}, notice=None), KEY)
    assert decode_command(encode_command(cmd2)) == cmd2


def test_encode_requires_signature() -> None:
    with pytest.raises(LocalProtocolError):
        encode_command(unsigned())


@pytest.mark.parametrize(
    "over",
    [
        {"command_id": ""},
        {"tenant": "a/b"},
        {"device": ""},
        {"type": "self_destruct"},
        {"type": "wipe", "params": {}},
        {"type": "wipe", "params": {"scope": "everything"}},
        {"params": []},
        {"notice": "text"},
        {"issued_at_ms": -1},
        {"expires_at_ms": NOW},
        {"nonce": "short"},
        {"nonce": "n" * 129},
        {"key_id": ""},
        {"sig": "not base64"},
    ],
)
def test_command_validates_when_built(over: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        unsigned(**over)


@pytest.mark.parametrize(
    ("text", "lang"), [("", "nl"), ("x" * 4001, "nl"), ("hi", "n"), ("hi", "nl_NL"), (1, "nl")]
)
def test_notice_validates(text: Any, lang: str) -> None:
    with pytest.raises(LocalProtocolError):
        Notice(text, lang)


def wire(**over: Any) -> bytes:
    obj = {**command_signing_fields(unsigned()), "sig": "A" * 86 + "==", **over}
    return orjson.dumps({k: v for k, v in obj.items() if v is not None})


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff", "not_json"),
        (b"[]", "bad_envelope"),
        (wire(v=2), "bad_envelope"),
        (wire(sig=None), "missing_field"),
        (wire(nonce=None), "missing_field"),
        (wire(type="explode"), "bad_value"),
        (wire(params={"scope": "all"}), "bad_value"),
        (wire(issued_at="yesterday"), "bad_timestamp"),
        (wire(notice={"text": "x"}), "missing_field"),
        (wire(notice={"text": "x", "lang": 5}), "wrong_type"),
        (b" " * (64 * 1024 + 1), "too_large"),
    ],
)
def test_decode_command_rejects(payload: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_command(payload)
    assert info.value.reason == reason
    assert not isinstance(info.value, CommandRejected)


# --- sign / verify ---------------------------------------------------------------------


def test_sign_verify_round_trip() -> None:
    cmd = sign_command(unsigned(), KEY)
    store = NonceStore()
    assert verify(encode_command(cmd), store) == cmd
    assert cmd.nonce in store


def test_signature_is_over_canonical_json() -> None:
    cmd = sign_command(unsigned(), KEY)
    message = reference(command_signing_fields(cmd))
    KEY.public_key().verify(base64.b64decode(cmd.sig), message)  # raises if not


def rejected(payload: bytes, reason: str, store: NonceStore | None = None, **over: Any) -> None:
    with pytest.raises(CommandRejected) as info:
        verify(payload, store, **over)
    assert info.value.reason == reason
    assert isinstance(info.value, RemoteProtocolError)


def test_forged_signature() -> None:
    forged = sign_command(unsigned(), OTHER_KEY)
    rejected(encode_command(forged), Reason.BAD_SIGNATURE)


def test_tampered_field() -> None:
    cmd = sign_command(unsigned(), KEY)
    obj = orjson.loads(encode_command(cmd))
    obj["params"] = {"scope": "full"}
    rejected(orjson.dumps(obj), Reason.BAD_SIGNATURE)


def test_unsigned_extra_field_breaks_signature() -> None:
    obj = orjson.loads(encode_command(sign_command(unsigned(), KEY)))
    obj["also_do"] = "factory_reset"
    rejected(orjson.dumps(obj), Reason.BAD_SIGNATURE)


def test_field_order_and_whitespace_do_not_matter() -> None:
    obj = orjson.loads(encode_command(sign_command(unsigned(), KEY)))
    pretty = json.dumps(dict(reversed(list(obj.items()))), indent=2).encode()
    assert verify(pretty).command_id == "c-1"


def test_unknown_key() -> None:
    cmd = sign_command(unsigned(key_id="k2"), KEY)
    rejected(encode_command(cmd), Reason.UNKNOWN_KEY)


def test_not_for_this_device() -> None:
    payload = encode_command(sign_command(unsigned(), KEY))
    rejected(payload, Reason.NOT_FOR_THIS_DEVICE, device="dev-2")
    rejected(payload, Reason.NOT_FOR_THIS_DEVICE, tenant="other")


def test_expired() -> None:
    payload = encode_command(sign_command(unsigned(), KEY))
    rejected(payload, Reason.EXPIRED, now_ms=NOW + 3_600_000)


def test_replayed_nonce() -> None:
    payload = encode_command(sign_command(unsigned(), KEY))
    store = NonceStore()
    verify(payload, store)
    rejected(payload, Reason.REPLAYED_NONCE, store)
    other = encode_command(sign_command(unsigned(command_id="c-2"), KEY))
    rejected(other, Reason.REPLAYED_NONCE, store)  # same nonce, other command


def test_check_order_signature_before_addressing() -> None:
    forged = encode_command(sign_command(unsigned(), OTHER_KEY))
    rejected(forged, Reason.BAD_SIGNATURE, device="dev-2", now_ms=NOW + 10**9)


def test_nonce_store_prunes_after_expiry() -> None:
    store = NonceStore()
    store.add("a", NOW + 10, NOW)
    store.add("b", NOW + 20, NOW)
    store.add("a", NOW + 5, NOW)  # never shortens
    assert store.seen("a", NOW + 9) and len(store) == 2
    assert not store.seen("a", NOW + 10)
    assert len(store) == 1
    store.prune(NOW + 20)
    assert len(store) == 0
    store.add("c", NOW, NOW)  # already expired: nothing to remember
    assert len(store) == 0


# --- acks ------------------------------------------------------------------------------


def test_ack_round_trip() -> None:
    for ack in (Ack("c-1", "completed", NOW, "wiped managed profile"), Ack("c-1", "received", NOW)):
        assert decode_ack(encode_ack(ack), now_ms=NOW) == ack


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({"command_id": "c", "state": "done", "ts": NOW}, "bad_value"),
        ({"command_id": "c", "state": "failed", "ts": NOW, "detail": "d" * 1001}, "bad_value"),
        ({"command_id": "c", "state": "failed", "ts": NOW, "detail": 5}, "wrong_type"),
        ({"command_id": "c", "state": "failed"}, "missing_field"),
        ({"state": "failed", "ts": NOW}, "missing_field"),
        ({"command_id": "c", "state": "failed", "ts": NOW + 2 * 86_400_000}, "future_timestamp"),
        ({"command_id": "c", "state": "failed", "ts": "2026-11-24T12:00:00"}, "bad_timestamp"),
    ],
)
def test_decode_ack_rejects(obj: dict[str, Any], reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_ack(orjson.dumps({"v": 1, **obj}), now_ms=NOW)
    assert info.value.reason == reason


def test_ack_validates_when_built() -> None:
    with pytest.raises(LocalProtocolError):
        Ack("c", "nope", NOW)
    with pytest.raises(LocalProtocolError):
        Ack("", "received", NOW)
    with pytest.raises(LocalProtocolError):
        dataclasses.replace(Ack("c", "received", NOW), detail="x" * 1001)


def test_status_round_trip_and_bad_status() -> None:
    from agent_protocol import Status, decode_status, encode_status

    for state in ("online", "offline"):
        assert decode_status(encode_status(Status(state, 1_700_000_000_000))) == Status(
            state, 1_700_000_000_000)
    for bad in (b'{"v":1,"state":"away","ts":"2026-11-24T09:31:12.345Z"}',
                b'{"v":1,"state":"online"}', b'{"v":2,"state":"online","ts":"x"}', b"[]",
                b"x" * 2000):
        with pytest.raises(RemoteProtocolError):
            decode_status(bad)


def test_trust_key_params_are_checked() -> None:
    good = {"key_id": "server-2", "public_key": "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="}
    base = dict(command_id="c1", tenant="t", device="d", type="trust_key", notice=None,
                issued_at_ms=1, expires_at_ms=2, nonce="nonce-123", key_id="k")
    assert Command(params=good, **base).params == good  # type: ignore[arg-type]
    for bad in ({}, {**good, "key_id": "a/b"}, {**good, "public_key": "AAAA"},
                {**good, "public_key": 7}):
        with pytest.raises(LocalProtocolError):
            Command(params=bad, **base)  # type: ignore[arg-type]
