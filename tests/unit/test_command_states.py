"""The server's command state machine: every rule, cell by cell (for commands the
user must accept, remote_view, too), and a model of several commands travelling
between the server and a real agent (Ed25519 signed), whose user answers."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

import agent_protocol
from agent_protocol import (
    CONSENT_TYPES,
    Command,
    CommandHandler,
    NonceStore,
    Notice,
    Outcome,
    decode_ack,
    encode_command,
    sign_command,
)
from mdm_server.commands.states import (
    ACK_FROM_STATES,
    ACK_STATES,
    CANCEL_FROM_STATES,
    CONSENT_EXPIRE_FROM_STATES,
    EVENTS,
    EXPIRE_FROM_STATES,
    STATES,
    TERMINAL,
    WITHDRAW_FROM_STATES,
    Refusal,
    Transition,
    from_states,
    is_terminal,
    sql_list,
    transition,
)

# --- the rules, written out independently of the module -----------------------
# A cell is the new state (accepted) or "!reason" (refused; the state stays).
# Timed events are written for a command before its expiry (expire: after it).

EVENT_TABLE = """
state             approve                cancel            withdraw   publish
pending_approval  queued                 cancelled         cancelled  !not_queued
queued            !not_pending_approval  cancelled         cancelled  sent
sent              !not_pending_approval  !not_cancellable  cancelled  !not_queued
received          !not_pending_approval  !not_cancellable  cancelled  !not_queued
notice_shown      !not_pending_approval  !not_cancellable  cancelled  !not_queued
consent_given     !not_pending_approval  !not_cancellable  cancelled  !not_queued
completed         !terminal              !terminal         !terminal  !terminal
failed            !terminal              !terminal         !terminal  !terminal
rejected          !terminal              !terminal         !terminal  !terminal
consent_refused   !terminal              !terminal         !terminal  !terminal
expired           !terminal              !terminal         !terminal  !terminal
cancelled         !terminal              !terminal         !terminal  !terminal
"""

TIMED_TABLE = """
state             expire             reconnect
pending_approval  expired            !nothing_to_resend
queued            expired            !nothing_to_resend
sent              expired            sent
received          !already_received  received
notice_shown      !already_received  notice_shown
consent_given     !already_received  consent_given
completed         !terminal          !terminal
failed            !terminal          !terminal
rejected          !terminal          !terminal
consent_refused   !terminal          !terminal
expired           !terminal          !terminal
cancelled         !terminal          !terminal
"""

# A command its user must accept (remote_view): until the user said yes nothing
# happened on the device, so it still expires; once they did, it no longer does.
CONSENT_TIMED_TABLE = """
state             expire             reconnect
pending_approval  expired            !nothing_to_resend
queued            expired            !nothing_to_resend
sent              expired            sent
received          expired            received
notice_shown      expired            notice_shown
consent_given     !already_received  consent_given
completed         !terminal          !terminal
failed            !terminal          !terminal
rejected          !terminal          !terminal
consent_refused   !terminal          !terminal
expired           !terminal          !terminal
cancelled         !terminal          !terminal
"""

_ND, _NA = "!not_delivered", "!consent_not_asked"
ACK_TABLE = f"""
state            received   notice_shown consent_given completed  failed     rejected   consent_refused
pending_approval {_ND}      {_ND}        {_ND}         {_ND}      {_ND}      {_ND}      {_ND}
queued           {_ND}      {_ND}        {_ND}         {_ND}      {_ND}      {_ND}      {_ND}
sent             received   notice_shown {_NA}         completed  failed     rejected   {_NA}
received         !duplicate notice_shown {_NA}         completed  failed     rejected   {_NA}
notice_shown     !backwards !duplicate   {_NA}         completed  failed     rejected   {_NA}
consent_given    !backwards !backwards   !duplicate    completed  failed     rejected   {_NA}
completed        !terminal  !terminal    !terminal     !duplicate !terminal  !terminal  !terminal
failed           !terminal  !terminal    !terminal     !terminal  !duplicate !terminal  !terminal
rejected         !terminal  !terminal    !terminal     !terminal  !terminal  !duplicate !terminal
consent_refused  !terminal  !terminal    !terminal     !terminal  !terminal  !terminal  !duplicate
expired          !terminal  !terminal    !terminal     !terminal  !terminal  !terminal  !terminal
cancelled        !terminal  !terminal    !terminal     !terminal  !terminal  !terminal  !terminal
"""  # noqa: E501

# remote_view: completed only after the user's yes; a no ends it; the first answer
# counts (a no after a yes goes backwards).
CONSENT_ACK_TABLE = f"""
state            received   notice_shown consent_given completed   failed     rejected   consent_refused
pending_approval {_ND}      {_ND}        {_ND}         {_ND}       {_ND}      {_ND}      {_ND}
queued           {_ND}      {_ND}        {_ND}         {_ND}       {_ND}      {_ND}      {_ND}
sent             received   notice_shown consent_given !no_consent failed     rejected   consent_refused
received         !duplicate notice_shown consent_given !no_consent failed     rejected   consent_refused
notice_shown     !backwards !duplicate   consent_given !no_consent failed     rejected   consent_refused
consent_given    !backwards !backwards   !duplicate    completed   failed     rejected   !backwards
completed        !terminal  !terminal    !terminal     !duplicate  !terminal  !terminal  !terminal
failed           !terminal  !terminal    !terminal     !terminal   !duplicate !terminal  !terminal
rejected         !terminal  !terminal    !terminal     !terminal   !terminal  !duplicate !terminal
consent_refused  !terminal  !terminal    !terminal     !terminal   !terminal  !terminal  !duplicate
expired          !terminal  !terminal    !terminal     !terminal   !terminal  !terminal  !terminal
cancelled        !terminal  !terminal    !terminal     !terminal   !terminal  !terminal  !terminal
"""  # noqa: E501


def cells(table: str) -> list[tuple[str, str, str]]:
    """(state, column, cell) for every cell of a table above."""
    header, *rows = (line.split() for line in table.strip().splitlines())
    out = []
    for row in rows:
        assert len(row) == len(header)
        out += [(row[0], col, cell) for col, cell in zip(header[1:], row[1:], strict=True)]
    return out


NOW = 1_795_521_600_000
EXPIRES = NOW + 60_000


def check(t: Transition, state: str, event: str, cell: str) -> None:
    assert t.event == event
    assert t.from_state == state
    if cell.startswith("!"):
        assert not t.accepted
        assert t.reason == cell[1:]
        assert Refusal(t.reason) is not None
        assert t.to_state == state
        assert not t.changed
        assert t.action is None
    else:
        assert t.accepted
        assert t.reason is None
        assert t.to_state == cell
        assert t.changed == (cell != state)


def test_tables_cover_every_state_and_event() -> None:
    assert [s for s, *_ in cells(EVENT_TABLE)][::4] == list(STATES)
    assert [s for s, *_ in cells(TIMED_TABLE)][::2] == list(STATES)
    assert [s for s, *_ in cells(CONSENT_TIMED_TABLE)][::2] == list(STATES)
    assert [s for s, *_ in cells(ACK_TABLE)][::7] == list(STATES)
    assert [s for s, *_ in cells(CONSENT_ACK_TABLE)][::7] == list(STATES)
    events = {c for _, c, _ in cells(EVENT_TABLE) + cells(TIMED_TABLE)}
    assert events | {"ack"} == set(EVENTS)
    assert [c for _, c, _ in cells(ACK_TABLE)][:7] == list(ACK_STATES)
    assert [c for _, c, _ in cells(CONSENT_ACK_TABLE)][:7] == list(ACK_STATES)


@pytest.mark.parametrize("consent", [False, True])
@pytest.mark.parametrize(("state", "event", "cell"), cells(EVENT_TABLE))
def test_event(state: str, event: str, cell: str, consent: bool) -> None:
    check(transition(state, event, consent=consent), state, event, cell)


@pytest.mark.parametrize(("consent", "state", "event", "cell"),
                         [(False, *c) for c in cells(TIMED_TABLE)]
                         + [(True, *c) for c in cells(CONSENT_TIMED_TABLE)])
def test_timed_event(consent: bool, state: str, event: str, cell: str) -> None:
    # expire: at expires_at; reconnect: before it.
    now = EXPIRES if event == "expire" else EXPIRES - 1
    t = transition(state, event, now_ms=now, expires_at_ms=EXPIRES, consent=consent)
    check(t, state, event, cell)
    resent = event == "reconnect" and not cell.startswith("!")
    assert t.action == ("resend" if resent else None)


@pytest.mark.parametrize(("state", "ack_state", "cell"), cells(ACK_TABLE))
def test_ack(state: str, ack_state: str, cell: str) -> None:
    check(transition(state, "ack", ack_state=ack_state), state, "ack", cell)


@pytest.mark.parametrize(("state", "ack_state", "cell"), cells(CONSENT_ACK_TABLE))
def test_ack_of_a_command_the_user_must_accept(state: str, ack_state: str, cell: str) -> None:
    check(transition(state, "ack", ack_state=ack_state, consent=True), state, "ack", cell)


def test_only_remote_view_asks_its_user() -> None:
    assert CONSENT_TYPES == {"remote_view"}


@pytest.mark.parametrize("state", ["received", "notice_shown"])
def test_an_unanswered_remote_view_waits_for_expires_at(state: str) -> None:
    t = transition(state, "expire", now_ms=EXPIRES - 1, expires_at_ms=EXPIRES, consent=True)
    check(t, state, "expire", "!not_expired")


@pytest.mark.parametrize("state", ["pending_approval", "queued", "sent"])
def test_expire_waits_for_expires_at(state: str) -> None:
    t = transition(state, "expire", now_ms=EXPIRES - 1, expires_at_ms=EXPIRES)
    check(t, state, "expire", "!not_expired")
    check(transition(state, "expire", now_ms=EXPIRES + 1, expires_at_ms=EXPIRES),
          state, "expire", "expired")


def test_reconnect_past_expiry_resends_nothing() -> None:
    t = transition("sent", "reconnect", now_ms=EXPIRES, expires_at_ms=EXPIRES)
    check(t, "sent", "reconnect", "!past_expiry")
    t = transition("sent", "reconnect", now_ms=EXPIRES - 1, expires_at_ms=EXPIRES)
    assert (t.accepted, t.changed, t.action) == (True, False, "resend")


def test_terminal_states() -> None:
    assert TERMINAL == {"completed", "failed", "rejected", "consent_refused", "expired",
                        "cancelled"}
    assert [s for s in STATES if is_terminal(s)] == [s for s in STATES if s in TERMINAL]
    with pytest.raises(ValueError):
        is_terminal("done")


def test_sets_for_sql_follow_the_tables() -> None:
    for event in ("approve", "cancel", "withdraw", "publish", "expire", "reconnect"):
        moving = [s for s, c, cell in cells(EVENT_TABLE) + cells(TIMED_TABLE)
                  if c == event and cell[0] != "!"]
        assert list(from_states(event)) == moving
    for event in ("expire", "reconnect"):
        moving = [s for s, c, cell in cells(CONSENT_TIMED_TABLE)
                  if c == event and cell[0] != "!"]
        assert list(from_states(event, consent=True)) == moving
    assert CANCEL_FROM_STATES == ("pending_approval", "queued")
    assert WITHDRAW_FROM_STATES == tuple(s for s in STATES if s not in TERMINAL)
    assert EXPIRE_FROM_STATES == ("pending_approval", "queued", "sent")
    assert CONSENT_EXPIRE_FROM_STATES == (
        "pending_approval", "queued", "sent", "received", "notice_shown")
    assert ACK_FROM_STATES == ("sent", "received", "notice_shown", "consent_given")
    assert from_states("ack") == ACK_FROM_STATES
    for table, consent in ((ACK_TABLE, False), (CONSENT_ACK_TABLE, True)):
        for ack_state in ACK_STATES:
            moving = [s for s, c, cell in cells(table) if c == ack_state and cell[0] != "!"]
            assert list(from_states("ack", ack_state, consent=consent)) == moving
    assert sql_list(EXPIRE_FROM_STATES) == "'pending_approval', 'queued', 'sent'"


def _latest_check(constraint: str, column: str) -> list[str]:
    """The values of the newest migration's CHECK (column IN (...)) of a constraint:
    the one the database has."""
    migrations = sorted((Path(__file__).parents[2] / "mdm_server/storage/migrations")
                        .glob("*.sql"))
    found = None
    for m in migrations:
        text = m.read_text()
        named = re.findall(rf"ADD CONSTRAINT {constraint}\s+CHECK \({column} IN \(([^)]*)\)\)",
                           text)
        inline = re.findall(rf"{column}\s+text\s+NOT NULL CHECK \({column} IN \(([^)]*)\)\)",
                            text) if m.name.startswith("003_") else []
        found = (named or inline or [found])[-1]
    assert found is not None
    return re.findall(r"'(\w+)'", found)


def test_states_match_the_protocol_and_the_schema() -> None:
    assert ACK_STATES == agent_protocol.ACK_STATES
    assert _latest_check("commands_state_check", "state") == list(STATES)
    assert _latest_check("commands_type_check", "type") == list(agent_protocol.COMMAND_TYPES)


def test_misuse_raises() -> None:
    with pytest.raises(ValueError):
        transition("done", "approve")
    with pytest.raises(ValueError):
        transition("queued", "launch")
    with pytest.raises(ValueError):
        transition("sent", "ack")
    with pytest.raises(ValueError):
        transition("sent", "ack", ack_state="sent")
    with pytest.raises(ValueError):
        transition("sent", "cancel", ack_state="completed")
    with pytest.raises(ValueError):
        transition("sent", "expire")
    with pytest.raises(ValueError):
        transition("sent", "reconnect", now_ms=NOW)
    with pytest.raises(ValueError):
        from_states("launch")
    with pytest.raises(ValueError):
        from_states("cancel", "completed")
    with pytest.raises(ValueError):
        from_states("ack", "sent")
    with pytest.raises(ValueError):
        sql_list(["sent", "x'); DROP TABLE commands; --"])
    with pytest.raises(ValueError):
        sql_list([])


# --- the model: server state machine <-> agent, with real signatures -----------

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
KEYS = {"k1": KEY.public_key()}
RANK = {"pending_approval": 0, "queued": 1, "sent": 2, "received": 3, "notice_shown": 4,
        "consent_given": 5}
TTL = 60_000
PICK = st.integers(0, 1000)
TYPES = st.sampled_from(["wipe", "lock", "factory_reset", "remote_view"])
REMOTE_VIEW = {"mode": "screenshot", "reason": "the app crashes on start"}


def rank(state: str) -> int:
    return RANK.get(state, 6)


class ForgetfulNonces(NonceStore):
    def forget(self) -> None:
        NonceStore.__init__(self)  # as after an agent restart without saved nonces


@dataclass
class ServerCommand:
    command_id: str
    type: str
    notice: Notice | None
    expires_at_ms: int
    state: str
    payload: bytes | None = None  # signed once, at the first publish
    held: bool = False  # published while the device was away: the broker holds it
    in_flight: list[bytes] = field(default_factory=list)  # acks not at the server yet
    arrived: list[bytes] = field(default_factory=list)  # acks the server had, in order
    executions: int = 0
    refused: bool = False  # the agent refused it (only ever as expired)
    history: list[str] = field(default_factory=list)  # every state, the first included
    asked: int = 0  # times the agent put the question to its user
    answers: list[tuple[bool, int]] = field(default_factory=list)  # (yes, when) per answer

    def __post_init__(self) -> None:
        self.history.append(self.state)

    @property
    def consent(self) -> bool:
        return self.type in CONSENT_TYPES


class CommandLifecycle(RuleBasedStateMachine):
    """Several commands between the server's state machine and one agent."""

    def __init__(self) -> None:
        super().__init__()
        self.now = NOW
        self.nonces = ForgetfulNonces()
        self.agent = CommandHandler("acme", "dev-1", KEYS, nonces=self.nonces)
        self.server: dict[str, ServerCommand] = {}
        self.seen: dict[str, str] = {}  # state at the last invariant check

    # -- the server's side: every change goes through transition() --

    def apply(self, cmd: ServerCommand, t: Transition) -> None:
        assert t.from_state == cmd.state
        if t.accepted:
            cmd.state = t.to_state
            cmd.history.append(t.to_state)

    def feed(self, cmd: ServerCommand, payload: bytes) -> None:
        ack = decode_ack(payload, now_ms=self.now)
        assert ack.command_id == cmd.command_id
        t = transition(cmd.state, "ack", ack_state=ack.state, consent=cmd.consent)
        if cmd.state in TERMINAL:
            assert not t.accepted
        self.apply(cmd, t)
        cmd.arrived.append(payload)

    def agent_receives(self, cmd: ServerCommand, flush: bool) -> None:
        """The agent handles the command's bytes; its acks are in flight (or flushed)."""
        assert cmd.payload is not None
        result = self.agent.handle(cmd.payload, self.now)
        assert result.outcome in (Outcome.EXECUTED, Outcome.DUPLICATE, Outcome.REJECTED,
                                  Outcome.CONSENT_NEEDED)
        # A command its user must accept is never executed by handle(): it asks.
        assert (result.outcome is Outcome.CONSENT_NEEDED) == (result.consent is not None)
        if result.consent is not None:
            assert cmd.consent and result.action is None and result.notice is not None
            cmd.asked += 1
        if result.action is not None:
            assert not cmd.consent
            assert result.outcome is Outcome.EXECUTED
            assert result.action.command_id == cmd.command_id
            assert result.action.type == cmd.type
            assert (result.notice is not None) == (cmd.notice is not None)
            cmd.executions += 1
        if result.outcome is Outcome.REJECTED:  # only once past its expiry
            assert result.reason == "expired"
            assert self.now >= cmd.expires_at_ms
            cmd.refused = True
        self.acks_out(cmd, result.payloads(), flush)

    def acks_out(self, cmd: ServerCommand, payloads: tuple[bytes, ...], flush: bool) -> None:
        cmd.in_flight += payloads
        while flush and cmd.in_flight:
            self.feed(cmd, cmd.in_flight.pop(0))

    # -- rules --

    @initialize(first=st.lists(st.tuples(TYPES, st.booleans()), min_size=1, max_size=4))
    def issue_some(self, first: list[tuple[str, bool]]) -> None:
        for type_, with_notice in first:
            self.issue(type_, with_notice)

    @rule(type_=TYPES, with_notice=st.booleans())
    def issue(self, type_: str, with_notice: bool) -> None:
        cid = f"c-{len(self.server)}"
        with_notice = with_notice or type_ in CONSENT_TYPES  # the user is asked with it
        notice = Notice("Your phone will be wiped; call IT.", "en") if with_notice else None
        state = "pending_approval" if type_ == "factory_reset" else "queued"
        self.server[cid] = ServerCommand(cid, type_, notice, self.now + TTL, state)

    def live(self, pick: int) -> ServerCommand | None:
        """A command not finished yet, mostly (rules aimed at any command: 1 in 4)."""
        cmds = list(self.server.values())
        live = [c for c in cmds if c.state not in TERMINAL]
        pool = live if live and pick % 4 else cmds
        return pool[pick % len(pool)] if pool else None

    @rule(pick=PICK)
    def approve(self, pick: int) -> None:
        cmd = self.live(pick)
        if cmd is not None:
            self.apply(cmd, transition(cmd.state, "approve"))

    @rule(pick=PICK)
    def cancel(self, pick: int) -> None:
        cmd = self.live(pick)
        if cmd is not None and pick % 3 == 0:  # one in three: it ends a story early
            self.apply(cmd, transition(cmd.state, "cancel"))

    @rule(pick=PICK, online=st.booleans(), flush=st.booleans())
    def deliver(self, pick: int, online: bool, flush: bool) -> None:
        """The dispatcher publishes a queued command; the agent handles it, or the
        broker holds it until the device is back."""
        cmd = self.live(pick)
        if cmd is None:
            return
        if self.now >= cmd.expires_at_ms:  # the dispatcher picks only live commands
            return
        t = transition(cmd.state, "publish")
        self.apply(cmd, t)
        if not t.accepted:
            return
        if cmd.payload is None:
            unsigned = Command(
                command_id=cmd.command_id, tenant="acme", device="dev-1", type=cmd.type,
                params={"wipe": {"scope": "managed"},
                        "remote_view": REMOTE_VIEW}.get(cmd.type, {}),
                notice=cmd.notice, issued_at_ms=self.now, expires_at_ms=cmd.expires_at_ms,
                nonce=f"nonce-{cmd.command_id}-0000", key_id="k1",
            )
            cmd.payload = encode_command(sign_command(unsigned, KEY))
        if online:
            self.agent_receives(cmd, flush)
        else:
            cmd.held = True

    def some(self, pick: int, where: Callable[[ServerCommand], bool]) -> ServerCommand | None:
        pool = [c for c in self.server.values() if where(c)]
        return pool[pick % len(pool)] if pool else None

    @rule(pick=PICK, flush=st.booleans())
    def duplicate_delivery(self, pick: int, flush: bool) -> None:
        """The broker delivers the same bytes again."""
        cmd = self.some(pick, lambda c: c.payload is not None)
        if cmd is not None:
            self.agent_receives(cmd, flush)

    @rule(pick=PICK, which=st.integers(0, 3))
    def ack_arrives(self, pick: int, which: int) -> None:
        """One ack in flight reaches the server (not necessarily the oldest)."""
        cmd = self.some(pick, lambda c: bool(c.in_flight))
        if cmd is not None:
            self.feed(cmd, cmd.in_flight.pop(which % len(cmd.in_flight)))

    @rule(pick=PICK)
    def acks_lost(self, pick: int) -> None:
        """The device went away before its acks reached the broker."""
        cmd = self.some(pick, lambda c: bool(c.in_flight))
        if cmd is not None:
            cmd.in_flight.clear()

    @rule(pick=PICK)
    def duplicate_ack(self, pick: int) -> None:
        cmd = self.some(pick, lambda c: bool(c.arrived))
        if cmd is not None:
            self.feed(cmd, cmd.arrived[-1])

    @rule(pick=PICK)
    def late_ack(self, pick: int) -> None:
        """The oldest ack arrives again, after newer ones."""
        cmd = self.some(pick, lambda c: bool(c.arrived))
        if cmd is not None:
            self.feed(cmd, cmd.arrived[0])

    @rule(pick=PICK, yes=st.booleans(), flush=st.booleans())
    def user_answers(self, pick: int, yes: bool, flush: bool) -> None:
        """The device's user answers an open question (yes or no), or answers again."""
        cmd = self.some(pick, lambda c: c.asked > 0)
        if cmd is None:
            return
        result = self.agent.answer_consent(cmd.command_id, given=yes, now_ms=self.now)
        open_before = not cmd.answers
        cmd.answers.append((yes, self.now))
        if not open_before:  # the first answer counts
            assert result.outcome is Outcome.DUPLICATE and result.action is None
        elif yes and self.now < cmd.expires_at_ms:
            assert result.outcome is Outcome.EXECUTED and result.action is not None
            assert result.action.params == REMOTE_VIEW
            cmd.executions += 1
        else:
            assert result.outcome is Outcome.CONSENT_REFUSED and result.action is None
            assert result.reason == ("expired" if yes else "refused")
        if result.outcome is not Outcome.DUPLICATE:
            self.acks_out(cmd, result.payloads(), flush)

    @rule(advance=st.sampled_from([1, TTL // 10, TTL // 4, TTL]) | st.integers(0, TTL // 2))
    def tick(self, advance: int) -> None:
        self.now += advance

    @rule()
    def expire(self) -> None:
        """The server's expiry job."""
        for cmd in self.server.values():
            t = transition(cmd.state, "expire", now_ms=self.now, expires_at_ms=cmd.expires_at_ms,
                           consent=cmd.consent)
            if cmd.state in from_states("expire", consent=cmd.consent) \
                    and self.now >= cmd.expires_at_ms:
                assert t.accepted and t.to_state == "expired"
            self.apply(cmd, t)

    @rule(flush=st.booleans())
    def reconnect(self, flush: bool) -> None:
        """The device is back: the broker delivers what it held, the server resends."""
        for cmd in self.server.values():
            if cmd.held:
                cmd.held = False
                self.agent_receives(cmd, flush)
        for cmd in self.server.values():
            t = transition(cmd.state, "reconnect", now_ms=self.now,
                           expires_at_ms=cmd.expires_at_ms, consent=cmd.consent)
            self.apply(cmd, t)
            if t.action == "resend":
                assert t.accepted and cmd.state in ("sent", "received", "notice_shown",
                                                    "consent_given")
                self.agent_receives(cmd, flush)

    @rule()
    def agent_forgets_nonces(self) -> None:
        self.nonces.forget()

    # -- invariants --

    @invariant()
    def terminal_states_never_change_and_states_only_move_forward(self) -> None:
        for cid, cmd in self.server.items():
            before = self.seen.get(cid)
            if before is not None:
                if before in TERMINAL:
                    assert cmd.state == before
                assert rank(cmd.state) >= rank(before)
            states = cmd.history
            assert [rank(s) for s in states] == sorted(rank(s) for s in states)
            assert sum(s in TERMINAL for s in states) <= 1
            assert states[-1] == cmd.state
            self.seen[cid] = cmd.state

    @invariant()
    def a_command_the_agent_accepted_does_not_expire(self) -> None:
        for cmd in self.server.values():
            if cmd.state == "expired" and not cmd.consent:
                assert cmd.history[-2] in EXPIRE_FROM_STATES
                assert "received" not in cmd.history
            if cmd.state == "expired" and cmd.consent:  # only while its user had not said yes
                assert cmd.history[-2] in CONSENT_EXPIRE_FROM_STATES
                assert "consent_given" not in cmd.history

    @invariant()
    def each_command_is_executed_at_most_once(self) -> None:
        for cmd in self.server.values():
            assert cmd.executions <= 1

    @invariant()
    def undelivered_commands_are_never_executed(self) -> None:
        for cmd in self.server.values():
            if cmd.state == "cancelled" or (cmd.state == "expired" and cmd.payload is None):
                assert cmd.executions == 0
            if cmd.state in ("pending_approval", "queued", "cancelled"):
                assert cmd.payload is None

    @invariant()
    def the_server_reports_only_what_the_agent_did(self) -> None:
        for cmd in self.server.values():
            if cmd.state in ("received", "notice_shown", "completed") and not cmd.consent:
                assert cmd.executions == 1
            if cmd.state == "notice_shown":
                assert cmd.notice is not None
            assert cmd.state != "failed"
            if cmd.state == "rejected":  # refused as expired, never executed
                assert cmd.refused and cmd.executions == 0
            if not cmd.consent:
                assert cmd.asked == 0 and not cmd.answers
                assert "consent_given" not in cmd.history
                assert "consent_refused" not in cmd.history

    @invariant()
    def a_remote_view_runs_only_after_its_users_yes_in_time(self) -> None:
        for cmd in self.server.values():
            if not cmd.consent:
                continue
            assert cmd.asked <= 1  # asked once, whatever arrives again
            yes_in_time = bool(cmd.answers) and cmd.answers[0][0] \
                and cmd.answers[0][1] < cmd.expires_at_ms
            assert cmd.executions == int(yes_in_time)
            if cmd.state in ("consent_given", "completed"):
                assert yes_in_time and "consent_given" in cmd.history
            if cmd.state == "completed":
                assert cmd.history[-2] == "consent_given"
            if cmd.state == "consent_refused":
                assert cmd.executions == 0 and not yes_in_time


TestCommandLifecycle = CommandLifecycle.TestCase
TestCommandLifecycle.settings = settings(
    max_examples=200, stateful_step_count=100, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
