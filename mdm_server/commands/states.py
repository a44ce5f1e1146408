"""The command lifecycle on the server: one state machine, its rules as data.

The tables below are the whole machine; :func:`transition` only reads them.

* ``approve``: ``pending_approval -> queued`` (a second admin approved it).
* ``cancel``: ``pending_approval | queued -> cancelled``. Refused once ``sent``:
  the device may already have the command.
* ``withdraw``: every state but a terminal one ``-> cancelled``: the device was
  revoked or re-enrolled (its holder changed); nothing of it is ever signed or
  sent again, whether the device may have it or not.
* ``publish``: ``queued -> sent``, when the broker PUBACKed the signed bytes.
* ``ack`` (the device reports ``received | notice_shown | consent_given |
  completed | failed | rejected | consent_refused``): accepted from a live state
  the device has (``sent``, ``received``, ``notice_shown``, ``consent_given``)
  when it moves forward in ``sent < received < notice_shown < {consent_given,
  consent_refused} < {completed, failed, rejected}`` (``consent_refused`` is
  terminal). Steps may be skipped (``sent -> completed``: a lock without a
  notice; ``sent -> rejected``: the agent refused a forged command). An ack equal
  to the current state is a ``duplicate``, a lower one ``backwards`` (so a
  ``consent_refused`` after a ``consent_given``: the first answer counts); an
  ack for a command the device cannot have yet (``pending_approval``,
  ``queued``) is ``not_delivered``.
* **Consent** (``consent=True``: a command the device's user must accept,
  ``remote_view``). ``completed`` is accepted only from ``consent_given``:
  from an earlier state it is refused with ``no_consent``, so such a command is
  never completed without the user's yes on record. ``consent_refused`` ends it
  (terminal). For any other command a consent ack is ``consent_not_asked``.
* ``expire`` (only when ``now >= expires_at``): ``pending_approval | queued |
  sent -> expired``. Not once ``received``: the agent accepted the command before
  its expiry and its outcome will follow. With ``consent``, also ``received |
  notice_shown -> expired``: nothing happens on the device before a yes, and a
  yes after the expiry is refused by the agent; not once ``consent_given``.
* ``reconnect`` (the device came back): a command not yet finished that the device
  may lack (``sent``) or whose final acks may have been lost (``received``,
  ``notice_shown``, ``consent_given``), and not past its expiry, is re-sent byte
  for byte; the agent runs a command at most once and answers a copy with the
  acks it sent the first time. The state stays, the action is ``resend``.
* A terminal state (``completed``, ``failed``, ``rejected``, ``consent_refused``,
  ``expired``, ``cancelled``) never changes: every event is refused with
  ``terminal`` (an ack repeating the final state with ``duplicate``).

Refused and ignored events are not errors: the result carries a machine-readable
:class:`Refusal` for the command's event log. Misuse (an unknown state or event, a
missing argument) is a bug of the caller and raises ``ValueError``.

Pure: no I/O. The caller writes an accepted transition with a conditional update,
``... WHERE command_id = $1 AND state = ANY($2::text[])`` with
:func:`from_states`, so a concurrent change makes the update miss instead of
moving a command out of a state it has already left.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final

__all__ = [
    "ACK_FROM_STATES",
    "ACK_STATES",
    "CANCEL_FROM_STATES",
    "CONSENT_EXPIRE_FROM_STATES",
    "EVENTS",
    "EXPIRE_FROM_STATES",
    "STATES",
    "TERMINAL",
    "WITHDRAW_FROM_STATES",
    "Refusal",
    "Transition",
    "from_states",
    "is_terminal",
    "sql_list",
    "transition",
]


class Refusal(StrEnum):
    """Why an event left a command as it was (values are the logged codes)."""

    TERMINAL = "terminal"  # the command is finished; it never changes again
    DUPLICATE = "duplicate"  # an ack repeating the current state
    BACKWARDS = "backwards"  # an ack for a step before the current state
    NOT_DELIVERED = "not_delivered"  # an ack for a command not sent yet
    NO_CONSENT = "no_consent"  # completed, but the user's yes is not on record
    CONSENT_NOT_ASKED = "consent_not_asked"  # a consent ack for a command that asks none
    NOT_PENDING_APPROVAL = "not_pending_approval"  # approve: nothing awaits approval
    NOT_CANCELLABLE = "not_cancellable"  # cancel: the device may already have it
    NOT_QUEUED = "not_queued"  # publish: not waiting in the outbox
    NOT_EXPIRED = "not_expired"  # expire: now is before expires_at
    ALREADY_RECEIVED = "already_received"  # expire: the agent accepted it in time
    NOTHING_TO_RESEND = "nothing_to_resend"  # reconnect: the command is not 'sent'
    PAST_EXPIRY = "past_expiry"  # reconnect: a resend would be refused as expired


# --- the rules ----------------------------------------------------------------

STATES: Final[tuple[str, ...]] = (
    "pending_approval", "queued", "sent", "received", "notice_shown", "consent_given",
    "completed", "failed", "rejected", "consent_refused", "expired", "cancelled",
)  # fmt: skip
TERMINAL: Final[frozenset[str]] = frozenset(
    {"completed", "failed", "rejected", "consent_refused", "expired", "cancelled"}
)
EVENTS: Final[tuple[str, ...]] = ("approve", "cancel", "withdraw", "publish", "ack", "expire",
                                  "reconnect")

# Every event but ``ack``: the live states it applies to and where it takes them.
# In any other live state it is refused with the reason of _REFUSED_ELSEWHERE.
_MOVES: Final[Mapping[str, Mapping[str, str]]] = MappingProxyType({
    "approve":   {"pending_approval": "queued"},
    "cancel":    {"pending_approval": "cancelled", "queued": "cancelled"},
    "withdraw":  {"pending_approval": "cancelled", "queued": "cancelled",
                  "sent": "cancelled", "received": "cancelled", "notice_shown": "cancelled",
                  "consent_given": "cancelled"},
    "publish":   {"queued": "sent"},
    "expire":    {"pending_approval": "expired", "queued": "expired", "sent": "expired"},
    "reconnect": {"sent": "sent", "received": "received", "notice_shown": "notice_shown",
                  "consent_given": "consent_given"},
})  # fmt: skip
# ``expire`` for a command that asks its user: also while the user has not answered.
_CONSENT_EXPIRE: Final[Mapping[str, str]] = MappingProxyType({
    **_MOVES["expire"], "received": "expired", "notice_shown": "expired"})
_ACTIONS: Final[Mapping[str, str]] = MappingProxyType({"reconnect": "resend"})
_REFUSED_ELSEWHERE: Final[Mapping[str, Refusal]] = MappingProxyType({
    "approve":   Refusal.NOT_PENDING_APPROVAL,
    "cancel":    Refusal.NOT_CANCELLABLE,
    "publish":   Refusal.NOT_QUEUED,
    "expire":    Refusal.ALREADY_RECEIVED,
    "reconnect": Refusal.NOTHING_TO_RESEND,
})  # fmt: skip
# Events that also need now_ms and expires_at_ms.
_TIMED: Final[frozenset[str]] = frozenset({"expire", "reconnect"})

# ``ack``: the order of delivery. An ack moves a command in one of the states
# ranked here (the terminal ones excepted) to a state of higher rank.
_ACK_RANK: Final[Mapping[str, int]] = MappingProxyType({
    "sent": 0,
    "received": 1,
    "notice_shown": 2,
    "consent_given": 3,
    "completed": 4, "failed": 4, "rejected": 4,
    "consent_refused": 3,
})  # fmt: skip
ACK_STATES: Final[tuple[str, ...]] = tuple(s for s in _ACK_RANK if s != "sent")
_CONSENT_ACKS: Final = frozenset({"consent_given", "consent_refused"})

def _check_state(state: str) -> None:
    if state not in STATES:
        raise ValueError(f"unknown command state; one of {', '.join(STATES)}")


def _check_event(event: str) -> None:
    if event not in EVENTS:
        raise ValueError(f"unknown command event; one of {', '.join(EVENTS)}")


def _check_ack_state(ack_state: str) -> None:
    if ack_state not in ACK_STATES:
        raise ValueError(f"unknown ack state; one of {', '.join(ACK_STATES)}")


# --- derived sets, for SQL ------------------------------------------------------


def from_states(event: str, ack_state: str | None = None, *, consent: bool = False
                ) -> tuple[str, ...]:
    """The states ``event`` moves or acts on a command from, in :data:`STATES` order.

    For ``ack``, the states an ack may move from; with ``ack_state``, only those
    that an ack of that state moves forward. ``consent``: for a command its user
    must accept. Use it in a WHERE clause: ``state = ANY($n::text[])``, or
    ``state IN (...)`` with :func:`sql_list`.
    """
    _check_event(event)
    if event != "ack":
        if ack_state is not None:
            raise ValueError("ack_state is only for the ack event")
        return tuple(s for s in STATES if s in _moves(event, consent))
    if ack_state is None:
        return tuple(s for s in STATES if s in _ACK_RANK and s not in TERMINAL)
    _check_ack_state(ack_state)
    return tuple(s for s in STATES if s not in TERMINAL
                 and _ack(s, ack_state, consent=consent).changed)


def _moves(event: str, consent: bool) -> Mapping[str, str]:
    return _CONSENT_EXPIRE if consent and event == "expire" else _MOVES[event]


ACK_FROM_STATES: Final[tuple[str, ...]] = from_states("ack")
EXPIRE_FROM_STATES: Final[tuple[str, ...]] = from_states("expire")
#: ``expire`` of a command its user must accept (``remote_view``).
CONSENT_EXPIRE_FROM_STATES: Final[tuple[str, ...]] = from_states("expire", consent=True)
CANCEL_FROM_STATES: Final[tuple[str, ...]] = from_states("cancel")
WITHDRAW_FROM_STATES: Final[tuple[str, ...]] = from_states("withdraw")


def sql_list(states: Iterable[str]) -> str:
    """``'a', 'b'``: state names quoted for ``state IN (...)`` (each checked, so safe)."""
    names = tuple(states)
    for s in names:
        _check_state(s)
    if not names:
        raise ValueError("an SQL list needs at least one state")
    return ", ".join(f"'{s}'" for s in names)


# --- the machine ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transition:
    """The outcome of one event: the state before and after, an action, or a refusal.

    ``reason`` is None when the event was accepted, else a :class:`Refusal` value
    (and then ``to_state == from_state``). ``action`` is ``"resend"`` for a
    reconnect that owes the device the command again.
    """

    event: str
    from_state: str
    to_state: str
    action: str | None = None
    reason: str | None = None

    @property
    def accepted(self) -> bool:
        return self.reason is None

    @property
    def changed(self) -> bool:
        return self.to_state != self.from_state


def is_terminal(state: str) -> bool:
    """True for a state that never changes (ValueError for an unknown state)."""
    _check_state(state)
    return state in TERMINAL


def transition(
    state: str,
    event: str,
    *,
    ack_state: str | None = None,
    now_ms: int | None = None,
    expires_at_ms: int | None = None,
    consent: bool = False,
) -> Transition:
    """Apply ``event`` to a command in ``state``.

    ``ack`` needs ``ack_state`` (what the device reported); ``expire`` and
    ``reconnect`` need ``now_ms`` and ``expires_at_ms`` (epoch milliseconds).
    ``consent``: the command is one its user must accept (``remote_view``).
    """
    _check_state(state)
    _check_event(event)
    if event == "ack":
        if ack_state is None:
            raise ValueError("the ack event needs ack_state")
        _check_ack_state(ack_state)
        return _ack(state, ack_state, consent=consent)
    if ack_state is not None:
        raise ValueError("ack_state is only for the ack event")
    expired = False
    if event in _TIMED:
        if now_ms is None or expires_at_ms is None:
            raise ValueError(f"the {event} event needs now_ms and expires_at_ms")
        expired = now_ms >= expires_at_ms

    if state in TERMINAL:
        return _refuse(event, state, Refusal.TERMINAL)
    target = _moves(event, consent).get(state)
    if target is None:
        return _refuse(event, state, _REFUSED_ELSEWHERE[event])
    if event == "expire" and not expired:
        return _refuse(event, state, Refusal.NOT_EXPIRED)
    if event == "reconnect" and expired:
        return _refuse(event, state, Refusal.PAST_EXPIRY)
    return Transition(event, state, target, action=_ACTIONS.get(event))


def _ack(state: str, ack_state: str, *, consent: bool) -> Transition:
    if ack_state == state:
        return _refuse("ack", state, Refusal.DUPLICATE)
    if state in TERMINAL:
        return _refuse("ack", state, Refusal.TERMINAL)
    rank = _ACK_RANK.get(state)
    if rank is None:  # pending_approval, queued
        return _refuse("ack", state, Refusal.NOT_DELIVERED)
    if ack_state in _CONSENT_ACKS and not consent:
        return _refuse("ack", state, Refusal.CONSENT_NOT_ASKED)
    if _ACK_RANK[ack_state] <= rank:
        return _refuse("ack", state, Refusal.BACKWARDS)
    if consent and ack_state == "completed" and state != "consent_given":
        return _refuse("ack", state, Refusal.NO_CONSENT)
    return Transition("ack", state, ack_state)


def _refuse(event: str, state: str, reason: Refusal) -> Transition:
    return Transition(event, state, state, reason=reason.value)
