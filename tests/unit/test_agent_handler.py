"""The agent's command handler: every refusal acked with its reason, a good command
acked step by step and executed once, whatever arrives again; a remote view runs
only after its user's yes."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent_protocol import (
    Ack,
    Action,
    Command,
    CommandHandler,
    ConsentRequest,
    NonceStore,
    Notice,
    NoticeShown,
    Outcome,
    canonical_json,
    decode_ack,
    encode_command,
    sign_command,
)

NOW = 1_795_521_600_000
HOUR = 3_600_000
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
FORGER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
KEYS = {"k1": KEY.public_key()}
NOTICE = Notice("Uw telefoon wordt gewist — bel IT: ☎ 1234", "nl")


def command(key: Ed25519PrivateKey = KEY, **over: Any) -> bytes:
    fields: dict[str, Any] = {
        "command_id": "c-1",
        "tenant": "acme",
        "device": "dev-1",
        "type": "wipe",
        "params": {"scope": "managed"},
        "notice": NOTICE,
        "issued_at_ms": NOW,
        "expires_at_ms": NOW + HOUR,
        "nonce": "n0nce-abcdefgh",
        "key_id": "k1",
        **over,
    }
    return encode_command(sign_command(Command(**fields), key))


def handler(**kw: Any) -> CommandHandler:
    return CommandHandler("acme", "dev-1", KEYS, **kw)


def acked(payloads: tuple[bytes, ...]) -> list[tuple[str, str, str | None]]:
    out = []
    for p in payloads:
        a = decode_ack(p, now_ms=NOW)
        out.append((a.command_id, a.state, a.detail))
    return out


def test_good_wipe_with_notice_is_acked_step_by_step_and_executed_once() -> None:
    h = handler()
    r = h.handle(command(), NOW + 5)
    assert r.outcome is Outcome.EXECUTED
    assert r.command_id == "c-1"
    assert r.reason is None
    assert r.action == Action("c-1", "wipe", {"scope": "managed"})
    assert r.notice == NoticeShown("c-1", NOTICE.text, "nl", NOW + 5)
    assert [a.state for a in r.acks] == ["received", "notice_shown", "completed"]
    assert all(a == Ack("c-1", a.state, NOW + 5) for a in r.acks)
    assert acked(r.payloads()) == [
        ("c-1", "received", None), ("c-1", "notice_shown", None), ("c-1", "completed", None),
    ]  # fmt: skip
    assert h.executed("c-1", NOW + 5)


def test_command_without_notice_skips_notice_shown() -> None:
    r = handler().handle(command(type="lock", params={}, notice=None), NOW)
    assert r.outcome is Outcome.EXECUTED
    assert r.notice is None
    assert [a.state for a in r.acks] == ["received", "completed"]
    assert r.action == Action("c-1", "lock", {})


def test_redelivery_of_the_same_bytes_yields_the_same_acks_and_no_action() -> None:
    h = handler()
    payload = command()
    first = h.handle(payload, NOW)
    again = h.handle(payload, NOW + 1000)  # nonce remembered: would be "replayed_nonce"
    assert again.outcome is Outcome.DUPLICATE
    assert again.action is None
    assert again.notice is None  # shown once, not again
    assert again.reason is None
    assert again.acks == first.acks  # the original acks, original times
    assert [a.state for a in again.acks][-1] == "completed"


def test_redelivery_after_the_nonce_store_forgot_is_not_executed_again() -> None:
    nonces = NonceStore()
    h = handler(nonces=nonces)
    payload = command()
    assert h.handle(payload, NOW).action is not None
    nonces.__init__()  # type: ignore[misc]  # an agent restart that lost its nonces
    again = h.handle(payload, NOW + 1)
    assert again.outcome is Outcome.DUPLICATE
    assert again.action is None
    # The same command id re-signed with a fresh nonce is not executed again either.
    resigned = h.handle(command(nonce="another-nonce-1"), NOW + 2)
    assert resigned.outcome is Outcome.DUPLICATE
    assert resigned.action is None


def test_redelivery_past_expiry_tells_what_happened() -> None:
    h = handler()
    payload = command()
    first = h.handle(payload, NOW)
    late = h.handle(payload, NOW + HOUR)  # expired, but it was executed in time
    assert late.outcome is Outcome.DUPLICATE
    assert late.acks == first.acks
    assert h.executed("c-1", NOW + HOUR)
    assert not h.executed("c-1", NOW + HOUR + 24 * HOUR)
    forgotten = h.handle(payload, NOW + 25 * HOUR)
    assert forgotten.outcome is Outcome.REJECTED
    assert forgotten.reason == "expired"
    assert forgotten.action is None


def test_remember_after_expiry_can_be_zero() -> None:
    h = handler(remember_after_expiry_ms=0)
    h.handle(command(), NOW)
    assert not h.executed("c-1", NOW + HOUR)
    assert h.handle(command(), NOW + HOUR).reason == "expired"
    with pytest.raises(ValueError):
        handler(remember_after_expiry_ms=-1)


def _rejected(payload: bytes, reason: str, h: CommandHandler | None = None,
              cid: str = "c-1") -> None:
    r = (h or handler()).handle(payload, NOW)
    assert r.outcome is Outcome.REJECTED
    assert r.reason == reason
    assert r.action is None
    assert r.notice is None
    assert r.command_id == cid
    assert acked(r.payloads()) == [(cid, "rejected", reason)]


def test_forged_signature_is_rejected() -> None:
    _rejected(command(key=FORGER), "bad_signature")


def test_tampered_command_is_rejected() -> None:
    obj = orjson.loads(command())
    obj["params"]["scope"] = "full"
    _rejected(orjson.dumps(obj), "bad_signature")


def test_unknown_key_is_rejected() -> None:
    _rejected(command(key_id="k9"), "unknown_key")


def test_expired_command_is_rejected() -> None:
    _rejected(command(issued_at_ms=NOW - 2 * HOUR, expires_at_ms=NOW), "expired")


def test_command_for_another_device_is_rejected() -> None:
    _rejected(command(device="dev-2"), "not_for_this_device")
    _rejected(command(tenant="other"), "not_for_this_device")


def test_replayed_nonce_with_a_new_command_id_is_rejected() -> None:
    h = handler()
    assert h.handle(command(), NOW).outcome is Outcome.EXECUTED
    _rejected(command(command_id="c-2"), "replayed_nonce", h, cid="c-2")
    assert not h.executed("c-2", NOW)


def test_rejected_command_is_not_remembered_as_executed() -> None:
    h = handler()
    _rejected(command(key=FORGER), "bad_signature", h)
    # The genuine command with the same id is then executed normally.
    assert h.handle(command(), NOW).outcome is Outcome.EXECUTED


def test_a_forgery_of_an_executed_command_does_not_replay_its_acks() -> None:
    h = handler()
    h.handle(command(), NOW)
    _rejected(command(key=FORGER), "bad_signature", h)


def test_malformed_command_with_a_readable_id_is_rejected() -> None:
    obj = orjson.loads(command())
    del obj["nonce"]
    _rejected(orjson.dumps(obj), "missing_field")
    obj = orjson.loads(command())
    obj["v"] = 2
    _rejected(orjson.dumps(obj), "bad_envelope")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", "not_json"),
        (b"[1, 2]", "bad_envelope"),
        (b'{"v": 1, "type": "wipe"}', "missing_field"),
        (b'{"v": 1, "command_id": 7}', "missing_field"),
        (b'{"v": 1, "command_id": ""}', "missing_field"),
        (orjson.dumps({"v": 1, "command_id": "x" * 65}), "missing_field"),
        (b"{" + b" " * (64 * 1024) + b"}", "too_large"),
    ],
)
def test_malformed_command_without_a_readable_id_cannot_be_acked(
    payload: bytes, reason: str
) -> None:
    r = handler().handle(payload, NOW)
    assert r.outcome is Outcome.UNREADABLE
    assert r.reason == reason
    assert r.command_id is None
    assert r.acks == ()
    assert r.payloads() == ()
    assert r.action is None


def test_commands_are_independent() -> None:
    h = handler()
    one = h.handle(command(), NOW)
    two = h.handle(command(command_id="c-2", nonce="n0nce-second", notice=None,
                           type="factory_reset", params={}), NOW + 1)
    assert one.action is not None and two.action is not None
    assert two.action == Action("c-2", "factory_reset", {})
    assert h.executed("c-1", NOW + 1) and h.executed("c-2", NOW + 1)



def test_trust_key_adds_the_new_key_only_when_signed_by_a_trusted_one() -> None:
    import base64

    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    new = Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34)))
    raw = new.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    params = {"key_id": "k2", "public_key": base64.b64encode(raw).decode()}
    h = handler()
    # Signed with a key the agent does not trust: refused, nothing learned.
    r = h.handle(command(FORGER, command_id="t-0", type="trust_key", params=params,
                         notice=None, nonce="nonce-trust-0"), NOW)
    assert (r.outcome, r.reason) == (Outcome.REJECTED, "bad_signature")
    assert set(h.keys) == {"k1"}
    assert h.handle(command(new, key_id="k2", command_id="c-9", nonce="nonce-new-9"),
                    NOW).reason == "unknown_key"
    # Signed with the trusted key: acked received + completed, and k2 now verifies.
    r = h.handle(command(command_id="t-1", type="trust_key", params=params, notice=None,
                         nonce="nonce-trust-1"), NOW)
    assert r.outcome is Outcome.EXECUTED
    assert acked(r.payloads()) == [("t-1", "received", None), ("t-1", "completed", None)]
    assert set(h.keys) == {"k1", "k2"}
    r = h.handle(command(new, key_id="k2", command_id="c-10", nonce="nonce-new-10"), NOW)
    assert r.outcome is Outcome.EXECUTED
    # The old key keeps working until the server stops using it.
    assert h.handle(command(command_id="c-11", nonce="nonce-old-11"), NOW).outcome \
        is Outcome.EXECUTED


# --- across restarts: the state store -------------------------------------------------------


class MemoryStore:
    """A StateStore in memory (a real agent writes a file: load_tests/agent_state.py)."""

    def __init__(self) -> None:
        self.saved: bytes | None = None
        self.saves = 0

    def load(self) -> bytes | None:
        return self.saved

    def save(self, state: bytes) -> None:
        self.saved = state
        self.saves += 1


def test_a_restarted_agent_does_not_execute_a_replayed_command_again() -> None:
    store = MemoryStore()
    first = handler(store=store)
    assert first.handle(command(), NOW).outcome is Outcome.EXECUTED
    assert store.saves == 1  # saved before handle returned: before the action ran
    # The agent restarts: a new handler on the same store.
    again = handler(store=store)
    r = again.handle(command(), NOW + 10)
    assert r.outcome is Outcome.DUPLICATE and r.action is None
    assert [a.state for a in r.acks] == ["received", "notice_shown", "completed"]
    assert all(a.ts_ms == NOW for a in r.acks)  # the first delivery's acks, unchanged
    # A new command reusing the accepted nonce is refused after the restart too.
    r = again.handle(command(command_id="c-2"), NOW + 20)
    assert (r.outcome, r.reason) == (Outcome.REJECTED, "replayed_nonce")
    # Without a store, the same restart would have executed the replay again.
    assert handler().handle(command(), NOW + 10).outcome is Outcome.EXECUTED


def test_the_state_keeps_trusted_keys_and_forgets_what_expired() -> None:
    store = MemoryStore()
    h = handler(store=store, remember_after_expiry_ms=0)
    new = Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34)))
    trust = command(command_id="t-1", type="trust_key", notice=None, nonce="trust-nonce-1",
                    params={"key_id": "k2", "public_key": _b64_public(new)})
    assert h.handle(trust, NOW).outcome is Outcome.EXECUTED
    restarted = handler(store=store, remember_after_expiry_ms=0)
    assert set(restarted.keys) == {"k1", "k2"}
    assert restarted.executed("t-1", NOW + 1)
    assert not restarted.executed("t-1", NOW + HOUR)  # past expiry: forgotten
    # A command signed with the key learnt before the restart verifies.
    r = restarted.handle(command(new, key_id="k2", command_id="c-9", nonce="other-nonce-9"),
                         NOW + 2)
    assert r.outcome is Outcome.EXECUTED


def test_an_unreadable_state_stops_the_agent_rather_than_forget() -> None:
    store = MemoryStore()
    store.saved = b'{"v": 1, "keys": {}, "nonces": [["n", "not a number"]], "executed": []}'
    with pytest.raises(ValueError, match="saved agent state cannot be read"):
        handler(store=store)
    store.saved = b"{}"
    with pytest.raises(ValueError, match="saved agent state cannot be read"):
        handler(store=store)


def test_a_store_that_cannot_save_stops_the_command_before_it_runs() -> None:
    class Broken(MemoryStore):
        def save(self, state: bytes) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError):
        handler(store=Broken()).handle(command(), NOW)


# --- distrust_key -------------------------------------------------------------------------


def _b64_public(key: Ed25519PrivateKey) -> str:
    import base64

    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
                            ).decode("ascii")


def test_distrust_key_drops_a_retired_key_but_never_the_last_one() -> None:
    new = Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34)))
    h = CommandHandler("acme", "dev-1", {"k1": KEY.public_key(), "k2": new.public_key()})
    r = h.handle(command(new, key_id="k2", command_id="d-1", type="distrust_key",
                         notice=None, params={"key_id": "k1"}, nonce="distrust-nonce-1"), NOW)
    assert r.outcome is Outcome.EXECUTED and [a.state for a in r.acks] == ["received",
                                                                             "completed"]
    assert set(h.keys) == {"k2"}
    # Commands signed with the distrusted key are refused from now on.
    r = h.handle(command(command_id="c-5", nonce="after-distrust-1"), NOW + 1)
    assert (r.outcome, r.reason) == (Outcome.REJECTED, "unknown_key")
    # The last key is kept: the agent refuses, the server learns it from the ack.
    r = h.handle(command(new, key_id="k2", command_id="d-2", type="distrust_key",
                         notice=None, params={"key_id": "k2"}, nonce="distrust-nonce-2"), NOW)
    assert [(a.state, a.detail) for a in r.acks] == [("received", None), ("failed", "last_key")]
    assert set(h.keys) == {"k2"}


# --- remote_view: the user's consent ------------------------------------------------------

VIEW = {"mode": "session", "reason": "the scanner app freezes at log-in"}
ASK = Notice("Uw beheerder wil uw scherm zien. Accepteert u dat?", "nl")


def remote_view(**over: Any) -> bytes:
    return command(**{"command_id": "v-1", "type": "remote_view", "params": VIEW,
                      "notice": ASK, "nonce": "view-nonce-1", **over})


def test_remote_view_shows_the_notice_asks_and_does_nothing_yet() -> None:
    h = handler()
    r = h.handle(remote_view(), NOW + 5)
    assert r.outcome is Outcome.CONSENT_NEEDED
    assert r.action is None  # nothing happens before the user's answer
    assert r.notice == NoticeShown("v-1", ASK.text, "nl", NOW + 5)
    assert r.consent == ConsentRequest("v-1", "remote_view", VIEW, ASK.text, "nl", NOW + 5,
                                       NOW + HOUR)
    assert acked(r.payloads()) == [("v-1", "received", None), ("v-1", "notice_shown", None)]
    assert h.pending_consents(NOW + 6) == (r.consent,)


def test_a_yes_runs_the_view_once_and_acks_consent_then_completed() -> None:
    h = handler()
    h.handle(remote_view(), NOW)
    r = h.answer_consent("v-1", given=True, now_ms=NOW + 30_000)
    assert r.outcome is Outcome.EXECUTED
    assert r.action == Action("v-1", "remote_view", VIEW)
    assert acked(r.payloads()) == [("v-1", "consent_given", None), ("v-1", "completed", None)]
    assert all(a.ts_ms == NOW + 30_000 for a in r.acks)  # the time of the answer
    assert h.pending_consents(NOW + 30_001) == ()
    # A second answer, either way, changes nothing: the first counts.
    for given in (True, False):
        again = h.answer_consent("v-1", given=given, now_ms=NOW + 40_000)
        assert again.outcome is Outcome.DUPLICATE and again.action is None
    # The command arriving again: every ack so far, no question, no action.
    dup = h.handle(remote_view(), NOW + 50_000)
    assert dup.outcome is Outcome.DUPLICATE and dup.action is None and dup.consent is None
    assert [a.state for a in dup.acks] == ["received", "notice_shown", "consent_given",
                                           "completed"]


@pytest.mark.parametrize(("detail", "sent"), [(None, "refused"), ("no_answer", "no_answer"),
                                               ("no_user", "no_user")])
def test_a_no_is_acked_with_its_code_and_nothing_ever_runs(detail: str | None,
                                                           sent: str) -> None:
    h = handler()
    h.handle(remote_view(), NOW)
    r = h.answer_consent("v-1", given=False, now_ms=NOW + 1, detail=detail)
    assert (r.outcome, r.reason, r.action) == (Outcome.CONSENT_REFUSED, sent, None)
    assert acked(r.payloads()) == [("v-1", "consent_refused", sent)]
    late_yes = h.answer_consent("v-1", given=True, now_ms=NOW + 2)
    assert late_yes.outcome is Outcome.DUPLICATE and late_yes.action is None
    assert h.handle(remote_view(), NOW + 3).action is None


def test_a_yes_after_the_expiry_is_a_refusal() -> None:
    h = handler()
    h.handle(remote_view(), NOW)
    assert [q.command_id for q in h.pending_consents(NOW + HOUR)] == ["v-1"]  # still open
    r = h.answer_consent("v-1", given=True, now_ms=NOW + HOUR)
    assert (r.outcome, r.reason, r.action) == (Outcome.CONSENT_REFUSED, "expired", None)
    assert acked(r.payloads()) == [("v-1", "consent_refused", "expired")]


def test_a_redelivered_remote_view_is_asked_once() -> None:
    h = handler()
    first = h.handle(remote_view(), NOW)
    again = h.handle(remote_view(), NOW + 1000)
    assert again.outcome is Outcome.DUPLICATE
    assert again.consent is None and again.notice is None and again.action is None
    assert again.acks == first.acks
    assert len(h.pending_consents(NOW + 1000)) == 1


def test_an_open_question_outlives_a_restart() -> None:
    store = MemoryStore()
    handler(store=store).handle(remote_view(), NOW)
    restarted = handler(store=store)
    [question] = restarted.pending_consents(NOW + 10)
    assert (question.command_id, question.params, question.text) == ("v-1", VIEW, ASK.text)
    assert restarted.handle(remote_view(), NOW + 20).outcome is Outcome.DUPLICATE
    r = restarted.answer_consent("v-1", given=True, now_ms=NOW + 30)
    assert r.action == Action("v-1", "remote_view", VIEW)
    # The answer is saved before it returns: after another restart it is not asked
    # again, and not run again.
    once_more = handler(store=store)
    assert once_more.pending_consents(NOW + 40) == ()
    assert once_more.answer_consent("v-1", given=True, now_ms=NOW + 40).action is None


def test_a_state_saved_by_the_previous_version_still_loads() -> None:
    store = MemoryStore()
    handler(store=store).handle(command(), NOW)
    doc = orjson.loads(store.saved or b"")
    doc["v"] = 1
    doc["executed"] = [e[:3] for e in doc["executed"]]  # version 1: no question
    store.saved = orjson.dumps(doc)
    h = handler(store=store)
    assert h.handle(command(), NOW + 1).outcome is Outcome.DUPLICATE
    assert h.pending_consents(NOW + 1) == ()


@pytest.mark.parametrize(("over", "reason"), [
    ({"notice": None}, "missing_field"),  # nothing to ask the user with
    ({"params": {"mode": "keylogger", "reason": "x"}}, "bad_value"),
    ({"params": {"mode": "screenshot"}}, "missing_field"),
    ({"params": {"mode": "screenshot", "reason": " "}}, "bad_value"),
])
def test_a_remote_view_the_agent_cannot_ask_with_is_rejected(over: dict[str, Any],
                                                             reason: str) -> None:
    obj = orjson.loads(remote_view())
    for k, v in over.items():
        if v is None:
            del obj[k]
        else:
            obj[k] = v
    # Signed as the server would: the refusal is about the content, not the signature.
    del obj["sig"]
    obj["sig"] = base64.b64encode(KEY.sign(canonical_json(obj))).decode()
    _rejected(orjson.dumps(obj), reason, cid="v-1")


def test_answers_the_handler_cannot_take_are_errors() -> None:
    h = handler()
    h.handle(remote_view(), NOW)
    h.handle(command(), NOW)  # a wipe: no question
    with pytest.raises(ValueError, match="no consent was asked"):
        h.answer_consent("c-1", given=True, now_ms=NOW)
    with pytest.raises(ValueError, match="no consent was asked"):
        h.answer_consent("nope", given=False, now_ms=NOW)
    with pytest.raises(ValueError, match="only with a refusal"):
        h.answer_consent("v-1", given=True, now_ms=NOW, detail="refused")
    with pytest.raises(ValueError, match="detail must be one of"):
        h.answer_consent("v-1", given=False, now_ms=NOW, detail="the user typed this")
    assert len(h.pending_consents(NOW)) == 1  # none of them answered it
