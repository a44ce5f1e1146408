"""The agent's side of the command channel, sans I/O: command bytes in, acks out.

:class:`CommandHandler` is what a device agent (the fleet simulator, the tests)
runs for every message on its commands topic::

    result = handler.handle(payload, now_ms)
    for ack in result.payloads(): publish(acks_topic(...), ack)
    if result.action is not None: execute(result.action)
    if result.consent is not None: ask_the_user(result.consent)  # remote_view

and, when the device's user has answered (:meth:`CommandHandler.answer_consent`)::

    result = handler.answer_consent(command_id, given=True, now_ms=now_ms)
    for ack in result.payloads(): publish(acks_topic(...), ack)
    if result.action is not None: execute(result.action)

Rules, in order:

1. Verify (:func:`verify_command`: signature, addressed to this device, expiry,
   nonce). A refused or malformed command gets one ack, ``rejected``, whose detail
   is the machine reason (``bad_signature``, ``expired``, ...). A payload without a
   readable ``command_id`` cannot be acked: the result says ``unreadable``.
2. Execute each command id at most once. A command already executed is not
   executed again, whatever the nonce store forgot: its acks are returned again,
   unchanged, and no action. Its id is remembered until ``remember_after_expiry_ms``
   (24 h by default) past the command's expiry, so the same signed bytes arriving
   again (a resend after a reconnect, a broker redelivery, even after the expiry)
   are answered with what happened, not with ``replayed_nonce`` or ``expired``:
   the acks of the first delivery may have been lost.
3. Otherwise: ack ``received``; show the notice, if any, and ack ``notice_shown``;
   return the action and ack ``completed``.
4. A command the user must accept (``remote_view``, :data:`CONSENT_TYPES`) is
   not executed by :meth:`~CommandHandler.handle`: it acks ``received``, shows the
   notice (acks ``notice_shown``) and returns ``consent_needed`` with a
   :class:`ConsentRequest` for the agent's UI, and no action. The UI asks the
   user (the notice, the mode, the admin's reason) and hands the answer to
   :meth:`~CommandHandler.answer_consent`: yes (before the command's expiry)
   acks ``consent_given`` and ``completed`` and returns the action, the only
   way such a command ever gets one; no acks ``consent_refused`` with a code of
   :data:`CONSENT_REFUSALS` (``refused``; ``no_answer`` when the UI gave up
   waiting; ``no_user`` on a device with nobody to ask) and returns no action; a
   yes at or after the expiry is refused as ``expired``. The question is part of
   the state: after a restart :meth:`~CommandHandler.pending_consents` gives
   the questions still open, and a command redelivered meanwhile is a duplicate
   (its acks so far), never a second question. The first answer counts: a
   second one returns the first one's acks.
5. ``trust_key`` (key rotation) is carried out by the handler itself: the new
   public key joins the trusted keys (:attr:`CommandHandler.keys`), acks
   ``received`` and ``completed`` (``failed`` with ``bad_public_key`` if the key
   does not load). ``distrust_key`` (a retired key) removes a key from the trusted
   ones, acks ``received`` and ``completed``; the handler refuses to drop the last
   key it trusts (``failed``, ``last_key``): an agent that trusts no key could never
   verify a command again.

All acks carry ``now_ms``. The handler trusts no clock of its own: the caller
passes "now" to every call.

**Across restarts.** What the handler must not forget when the agent restarts,
the nonces of accepted commands, the ids of executed commands with their acks,
and the keys it trusts, is its *state*: give it a :class:`StateStore` and it loads
the state when built and saves it after every change, before :meth:`handle`
returns, so before the caller executes anything (a command is executed at most
once even if the agent dies right after). The store does the I/O (a file, the
platform's key-value store); this package stays pure. Without a store the state
lives in memory only: fine for tests, wrong for a real agent, which would then
execute a replayed command again after a restart.
"""

from __future__ import annotations

import base64
import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Protocol

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent_protocol.commands import (
    CONSENT_REFUSALS,
    CONSENT_TYPES,
    MAX_COMMAND_BYTES,
    Ack,
    Command,
    decode_command,
    encode_ack,
)
from agent_protocol.envelope import MAX_ID_LEN
from agent_protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from agent_protocol.signing import CommandRejected, NonceStore, verify_command

__all__ = ["REMEMBER_AFTER_EXPIRY_MS", "Action", "CommandHandler", "ConsentRequest",
           "HandleResult", "NoticeShown", "Outcome", "StateStore"]

REMEMBER_AFTER_EXPIRY_MS: Final = 24 * 3600 * 1000

# Refusals verify_command raises only after the signature and the addressee held.
_AFTER_SIGNATURE: Final = frozenset({Reason.EXPIRED, Reason.REPLAYED_NONCE})


class Outcome(StrEnum):
    """What :meth:`CommandHandler.handle` did with a payload."""

    EXECUTED = "executed"  # verified, first time: the action is to be executed
    DUPLICATE = "duplicate"  # already executed: its acks again, no action
    REJECTED = "rejected"  # refused or malformed: one ``rejected`` ack
    UNREADABLE = "unreadable"  # malformed, no command_id to ack: nothing to send
    CONSENT_NEEDED = "consent_needed"  # verified, notice shown: ask the user, no action yet
    CONSENT_REFUSED = "consent_refused"  # the user's no (or no yes in time): no action ever


@dataclass(frozen=True, slots=True)
class Action:
    """What the agent must do: the command's type and parameters."""

    command_id: str
    type: str
    params: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class NoticeShown:
    """The notice shown to the device's user, and when."""

    command_id: str
    text: str
    lang: str
    shown_at_ms: int


@dataclass(frozen=True, slots=True)
class ConsentRequest:
    """What the agent's UI asks the device's user before a command of
    :data:`CONSENT_TYPES` runs: the notice (``text`` in ``lang``) and the request
    (``params``; ``remote_view``: ``mode`` ``screenshot`` or ``session``, and the
    admin's ``reason``). An answer at or after ``expires_at_ms`` can only be a
    refusal: close the prompt then (and answer ``no_answer``)."""

    command_id: str
    type: str
    params: Mapping[str, Any]
    text: str
    lang: str
    asked_at_ms: int
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class HandleResult:
    """The outcome of one payload.

    ``reason`` is the machine reason of a ``rejected`` or ``unreadable`` outcome
    (also the detail of the ``rejected`` ack). ``command_id`` is None only for
    ``unreadable``. ``notice`` is the notice shown by this call (never on a
    duplicate: it was shown the first time). ``consent`` is the question to put to
    the user (``consent_needed`` only); ``reason`` of ``consent_refused`` is the
    code its ack carries.
    """

    outcome: Outcome
    command_id: str | None
    acks: tuple[Ack, ...] = ()
    action: Action | None = None
    notice: NoticeShown | None = None
    reason: str | None = None
    consent: ConsentRequest | None = None

    def payloads(self) -> tuple[bytes, ...]:
        """The acks as wire bytes, in the order to publish them."""
        return tuple(encode_ack(a) for a in self.acks)


@dataclass(frozen=True, slots=True)
class _Executed:
    forget_at_ms: int
    acks: tuple[Ack, ...]
    asking: ConsentRequest | None = None  # the user has not answered yet


class StateStore(Protocol):
    """Where an agent keeps its command state across restarts (see the module doc).

    ``load`` returns what ``save`` was last given, or None when nothing was saved
    yet. ``save`` must be durable when it returns (write a new file, fsync, rename);
    if it raises, :meth:`CommandHandler.handle` raises too and nothing is executed.
    """

    def load(self) -> bytes | None: ...

    def save(self, state: bytes) -> None: ...


_STATE_VERSION: Final = 2  # 2: an executed command may hold an open consent question
_READABLE_VERSIONS: Final = frozenset({1, 2})


def _ack_doc(a: Ack) -> list[Any]:
    return [a.command_id, a.state, a.ts_ms, a.detail]


def _ask_doc(q: ConsentRequest | None) -> dict[str, Any] | None:
    if q is None:
        return None
    return {"type": q.type, "params": dict(q.params), "text": q.text, "lang": q.lang,
            "asked_at": q.asked_at_ms, "expires_at": q.expires_at_ms}


def _ask_from(cid: str, doc: Any) -> ConsentRequest | None:
    if doc is None:
        return None
    if type(doc) is not dict or type(doc["params"]) is not dict:
        raise ValueError("bad consent question")
    return ConsentRequest(cid, str(doc["type"]), doc["params"], str(doc["text"]),
                          str(doc["lang"]), int(doc["asked_at"]), int(doc["expires_at"]))


def _raw_key(key: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return base64.b64encode(key.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode("ascii")


class CommandHandler:
    """Verifies and runs commands for one device; see the module docstring.

    ``keys`` are the server's public keys the agent was enrolled with, by key id.
    ``nonces`` may be shared or persisted by the caller; by default the handler
    keeps its own. ``remember_after_expiry_ms``: how long past a command's expiry
    its execution is remembered (at least 0).
    """

    __slots__ = ("_device", "_executed", "_forget_heap", "_keys", "_nonces", "_remember_ms",
                 "_store", "_tenant")

    def __init__(
        self,
        tenant: str,
        device: str,
        keys: Mapping[str, Ed25519PublicKey],
        *,
        nonces: NonceStore | None = None,
        remember_after_expiry_ms: int = REMEMBER_AFTER_EXPIRY_MS,
        store: StateStore | None = None,
    ) -> None:
        if remember_after_expiry_ms < 0:
            raise ValueError("remember_after_expiry_ms must be >= 0")
        self._tenant = tenant
        self._device = device
        self._keys = dict(keys)
        self._nonces = NonceStore() if nonces is None else nonces
        self._remember_ms = remember_after_expiry_ms
        self._executed: dict[str, _Executed] = {}
        self._forget_heap: list[tuple[int, str]] = []
        self._store = store
        if store is not None:
            saved = store.load()
            if saved is not None:
                self._restore(saved)

    # -- state -----------------------------------------------------------------

    def state(self) -> bytes:
        """The state a :class:`StateStore` keeps: JSON of the trusted keys, the
        remembered nonces and the executed commands with their acks."""
        return orjson.dumps({
            "v": _STATE_VERSION,
            "keys": {k: _raw_key(v) for k, v in sorted(self._keys.items())},
            "nonces": [[n, exp] for n, exp in self._nonces.items()],
            "executed": [[cid, e.forget_at_ms, [_ack_doc(a) for a in e.acks],
                          _ask_doc(e.asking)]
                         for cid, e in sorted(self._executed.items())],
        })

    def _restore(self, saved: bytes) -> None:
        try:
            doc = orjson.loads(saved)
            if type(doc) is not dict or doc.get("v") not in _READABLE_VERSIONS:
                raise ValueError("unknown state version")
            keys = {k: Ed25519PublicKey.from_public_bytes(base64.b64decode(v))
                    for k, v in doc["keys"].items()}
            nonces = [(str(n), int(exp)) for n, exp in doc["nonces"]]
            executed = {str(e[0]): _Executed(int(e[1]), tuple(
                Ack(a[0], a[1], a[2], detail=a[3]) for a in e[2]),
                _ask_from(str(e[0]), e[3] if len(e) > 3 else None))  # v1: no question
                for e in doc["executed"]}
        except (orjson.JSONDecodeError, ValueError, TypeError, KeyError, IndexError,
                LocalProtocolError) as exc:
            # Refusing to start beats forgetting what was executed: the caller
            # must decide (restore a backup, or re-enroll the device).
            raise ValueError(f"the saved agent state cannot be read ({type(exc).__name__})"
                             ) from None
        self._keys = keys
        for nonce, expires in nonces:
            self._nonces.add(nonce, expires, now_ms=-1)
        self._executed = executed
        self._forget_heap = [(e.forget_at_ms, cid) for cid, e in executed.items()]
        heapq.heapify(self._forget_heap)

    def _save(self) -> None:
        if self._store is not None:
            self._store.save(self.state())

    def executed(self, command_id: str, now_ms: int) -> bool:
        """True while ``command_id`` is remembered as executed."""
        self._prune(now_ms)
        return command_id in self._executed

    def handle(self, payload: bytes, now_ms: int) -> HandleResult:
        """Verify ``payload`` (a command's wire bytes) and decide what to do with it."""
        self._prune(now_ms)
        try:
            cmd = verify_command(
                payload,
                keys=self._keys,
                tenant=self._tenant,
                device=self._device,
                now_ms=now_ms,
                seen_nonces=self._nonces,
            )
        except CommandRejected as exc:
            if exc.reason in _AFTER_SIGNATURE:
                # Signed for this device: if it is a command already executed, its
                # acks are the truth (the first ones may have been lost).
                again = self._again_same(payload)
                if again is not None:
                    return again
            return _rejected(payload, exc, now_ms)
        except RemoteProtocolError as exc:
            return _rejected(payload, exc, now_ms)
        done = self._executed.get(cmd.command_id)
        if done is not None:
            return HandleResult(Outcome.DUPLICATE, cmd.command_id, done.acks)
        result = self._execute(cmd, now_ms)
        # Saved before the caller acts: executed at most once, even across a crash.
        self._save()
        return result

    def answer_consent(self, command_id: str, *, given: bool, now_ms: int,
                       detail: str | None = None) -> HandleResult:
        """The device's user answered the :class:`ConsentRequest` of ``command_id``.

        ``given``: yes, before ``expires_at_ms``: acks ``consent_given`` and
        ``completed``, outcome ``executed`` with the action. A yes at or after the
        expiry, or a no: one ``consent_refused`` ack whose detail is ``detail``
        (one of :data:`CONSENT_REFUSALS`, ``refused`` by default; ``expired`` for a
        late yes), outcome ``consent_refused``, no action. A second answer changes
        nothing: ``duplicate``, with the acks so far. The state is saved before
        this returns. ``acks`` are only the new ones (publish them).

        ValueError: a detail with a yes or one not in :data:`CONSENT_REFUSALS`, or
        no question was asked for ``command_id`` (never, or forgotten:
        ``remember_after_expiry_ms`` past its expiry).
        """
        if given and detail is not None:
            raise ValueError("a detail goes only with a refusal")
        if not given:
            detail = "refused" if detail is None else detail
            if detail not in CONSENT_REFUSALS:
                raise ValueError(f"detail must be one of {', '.join(CONSENT_REFUSALS)}")
        self._prune(now_ms)
        done = self._executed.get(command_id)
        if done is None or (done.asking is None and not _answered(done.acks)):
            raise ValueError("no consent was asked for this command")
        ask = done.asking
        if ask is None:
            return HandleResult(Outcome.DUPLICATE, command_id, done.acks)
        cid = ask.command_id
        if given and now_ms >= ask.expires_at_ms:
            given, detail = False, "expired"  # too late: the server no longer waits
        if given:
            new: tuple[Ack, ...] = (Ack(cid, "consent_given", now_ms),
                                    Ack(cid, "completed", now_ms))
            result = HandleResult(Outcome.EXECUTED, cid, new,
                                  Action(cid, ask.type, dict(ask.params)))
        else:
            new = (Ack(cid, "consent_refused", now_ms, detail=detail),)
            result = HandleResult(Outcome.CONSENT_REFUSED, cid, new, reason=detail)
        # The same forget time: the entry already in the forget heap stays valid.
        self._executed[cid] = _Executed(done.forget_at_ms, done.acks + new)
        self._save()  # before the caller acts, as in handle()
        return result

    def pending_consents(self, now_ms: int) -> tuple[ConsentRequest, ...]:
        """The questions the user has not answered yet, oldest first (for the UI
        after a restart), including any past its expiry: answer those
        ``no_answer``."""
        self._prune(now_ms)
        return tuple(sorted((e.asking for e in self._executed.values() if e.asking),
                            key=lambda q: (q.asked_at_ms, q.command_id)))

    def _again_same(self, payload: bytes) -> HandleResult | None:
        cmd = decode_command(payload)  # decoded and verified once already
        done = self._executed.get(cmd.command_id)
        if done is None:
            return None
        return HandleResult(Outcome.DUPLICATE, cmd.command_id, done.acks)

    def _execute(self, cmd: Command, now_ms: int) -> HandleResult:
        cid = cmd.command_id
        if cmd.type == "trust_key":
            return self._trust_key(cmd, now_ms)
        if cmd.type == "distrust_key":
            return self._distrust_key(cmd, now_ms)
        if cmd.type in CONSENT_TYPES:
            return self._ask(cmd, now_ms)
        acks = [Ack(cid, "received", now_ms)]
        shown = None
        if cmd.notice is not None:
            shown = NoticeShown(cid, cmd.notice.text, cmd.notice.lang, now_ms)
            acks.append(Ack(cid, "notice_shown", now_ms))
        acks.append(Ack(cid, "completed", now_ms))
        done = _Executed(cmd.expires_at_ms + self._remember_ms, tuple(acks))
        self._executed[cid] = done
        heapq.heappush(self._forget_heap, (done.forget_at_ms, cid))
        action = Action(cid, cmd.type, dict(cmd.params))
        return HandleResult(Outcome.EXECUTED, cid, done.acks, action, shown)

    def _ask(self, cmd: Command, now_ms: int) -> HandleResult:
        """A command the user must accept: the notice is shown, the question asked;
        nothing runs until :meth:`answer_consent` has a yes."""
        cid, notice = cmd.command_id, cmd.notice
        assert notice is not None  # Command refuses a consent type without a notice
        ask = ConsentRequest(cid, cmd.type, dict(cmd.params), notice.text, notice.lang,
                             now_ms, cmd.expires_at_ms)
        acks = (Ack(cid, "received", now_ms), Ack(cid, "notice_shown", now_ms))
        done = _Executed(cmd.expires_at_ms + self._remember_ms, acks, ask)
        self._executed[cid] = done
        heapq.heappush(self._forget_heap, (done.forget_at_ms, cid))
        return HandleResult(Outcome.CONSENT_NEEDED, cid, acks,
                            notice=NoticeShown(cid, notice.text, notice.lang, now_ms),
                            consent=ask)

    def _trust_key(self, cmd: Command, now_ms: int) -> HandleResult:
        """Key rotation: a new server key, signed by one already trusted, is trusted
        from now on (the caller persists :attr:`keys` with the agent's state)."""
        cid = cmd.command_id
        try:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(cmd.params["public_key"]))
        except ValueError:
            acks: tuple[Ack, ...] = (Ack(cid, "received", now_ms),
                                     Ack(cid, "failed", now_ms, detail="bad_public_key"))
        else:
            self._keys[cmd.params["key_id"]] = key
            acks = (Ack(cid, "received", now_ms), Ack(cid, "completed", now_ms))
        done = _Executed(cmd.expires_at_ms + self._remember_ms, acks)
        self._executed[cid] = done
        heapq.heappush(self._forget_heap, (done.forget_at_ms, cid))
        return HandleResult(Outcome.EXECUTED, cid, acks, Action(cid, cmd.type, dict(cmd.params)))

    def _distrust_key(self, cmd: Command, now_ms: int) -> HandleResult:
        """A retired server key: trusted no more, unless it is the last one (an
        agent that trusts no key could never verify a command again)."""
        cid, key_id = cmd.command_id, cmd.params["key_id"]
        acks: tuple[Ack, ...]
        if key_id in self._keys and len(self._keys) == 1:
            acks = (Ack(cid, "received", now_ms), Ack(cid, "failed", now_ms, detail="last_key"))
        else:
            self._keys.pop(key_id, None)  # one not trusted: nothing to drop, completed
            acks = (Ack(cid, "received", now_ms), Ack(cid, "completed", now_ms))
        done = _Executed(cmd.expires_at_ms + self._remember_ms, acks)
        self._executed[cid] = done
        heapq.heappush(self._forget_heap, (done.forget_at_ms, cid))
        return HandleResult(Outcome.EXECUTED, cid, acks, Action(cid, cmd.type, dict(cmd.params)))

    @property
    def keys(self) -> Mapping[str, Ed25519PublicKey]:
        """The server keys this agent trusts (``trust_key`` adds, ``distrust_key``
        removes)."""
        return self._keys

    def _prune(self, now_ms: int) -> None:
        # Forgotten only past the command's expiry, from when verify_command refuses
        # it as expired: forgetting never allows a second execution.
        heap = self._forget_heap
        while heap and heap[0][0] <= now_ms:
            forget_at, cid = heapq.heappop(heap)
            done = self._executed.get(cid)
            if done is not None and done.forget_at_ms == forget_at:
                del self._executed[cid]


def _answered(acks: tuple[Ack, ...]) -> bool:
    return any(a.state in ("consent_given", "consent_refused") for a in acks)


def _rejected(payload: bytes, exc: RemoteProtocolError, now_ms: int) -> HandleResult:
    reason = str(exc.reason)
    cid = _readable_command_id(payload)
    if cid is None:
        return HandleResult(Outcome.UNREADABLE, None, reason=reason)
    return HandleResult(
        Outcome.REJECTED, cid, (Ack(cid, "rejected", now_ms, detail=reason),), reason=reason
    )


def _readable_command_id(payload: bytes) -> str | None:
    """The ``command_id`` of a payload that is not a valid command, if it has a usable one."""
    if len(payload) > MAX_COMMAND_BYTES:
        return None
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    if type(obj) is not dict:
        return None
    cid = obj.get("command_id")
    if type(cid) is not str or not 0 < len(cid) <= MAX_ID_LEN or "\x00" in cid:
        return None
    return cid
