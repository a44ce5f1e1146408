"""Admin commands: issue, approve, cancel, read; the rules before anything is queued.

HTTP lives in :mod:`mdm_server.api.commands`; delivery in
:mod:`mdm_server.commands.outbox`; acks in :mod:`mdm_server.commands.acks`; the
lifecycle rules in :mod:`mdm_server.commands.states`. Everything here runs inside
the caller's transaction, so the command, its first event and its audit entry
are committed together or not at all.

Guards (the order they are checked in):

1. The device exists in the caller's tenant (else "not found": another tenant's
   device is indistinguishable from none) and is not revoked.
2. A personally owned device gets no full wipe and no factory reset: only a
   managed wipe (company apps and data) is allowed there.
3. A factory reset waits in ``pending_approval`` until a different admin of the
   same tenant approves it; nothing is signed or sent before that.
4. A request repeated with the same ``Idempotency-Key`` (per admin) returns the
   command it created the first time; the same key with a different request is
   refused.
5. A command its user must accept (``remote_view``) carries the notice the admin
   wrote (no template: 422 ``notice_required`` without one), and goes to one
   device at a time (``group_remote_view``). Ownership does not matter: the user
   is asked on every device, and the state machine completes it only after the
   user's ``consent_given`` (:mod:`mdm_server.commands.states`, "Consent").

When a device is revoked or re-enrolled (its holder changes), every command of it
that is not finished is withdrawn (:func:`withdraw_unfinished`): cancelled, with an
event and an audit entry each; a factory reset waiting for approval can then no
longer be approved. Issuing and approving read the device's row ``FOR SHARE`` and
the revocation locks the device's unfinished commands before it changes the
device, so a command is either withdrawn with the others or refused
(``device_revoked``), never left queued for a revoked device.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from agent_protocol import CONSENT_TYPES, canonical_json
from mdm_server import audit
from mdm_server.agents import agent_supports, unsupported_text
from mdm_server.commands import states
from mdm_server.commands.outbox import NOTIFY_CHANNEL, check_command

__all__ = [
    "DEFAULT_NOTICES",
    "NOTICE_KINDS",
    "NOTICE_TYPES",
    "CommandRefused",
    "IssueResult",
    "approve",
    "cancel",
    "command_json",
    "get_batch",
    "get_command",
    "issue",
    "issue_group",
    "list_commands",
    "lock_unfinished",
    "notice_log",
    "set_notice_template",
    "withdraw_unfinished",
]

#: Command types that affect the device's user: each carries a notice.
NOTICE_TYPES = ("lock", "locate", "wipe", "factory_reset", "remote_view")
#: Notice texts are kept per kind: a managed and a full wipe differ for the user.
NOTICE_KINDS = ("lock", "locate", "wipe-managed", "wipe-full", "factory_reset")

#: Used when neither the admin nor the tenant's template gives a text.
DEFAULT_NOTICES: dict[str, dict[str, str]] = {
    "lock": {"lang": "en", "text": "Your organisation has locked this device."},
    "locate": {"lang": "en", "text": "Your organisation has asked for this device's "
               "current location. It is sent once, now."},
    "wipe-managed": {"lang": "en", "text": "Your organisation is removing its apps and "
                     "data from this device. Your personal apps and data stay."},
    "wipe-full": {"lang": "en", "text": "Your organisation is erasing all data on this "
                  "device, including anything personal on it."},
    "factory_reset": {"lang": "en", "text": "Your organisation is resetting this device "
                      "to its factory state. Everything on it will be erased."},
}

_SELECT = """SELECT command_id, device_id, type, params, notice, state, reason,
                    requested_by, approved_by, approved_at, cancelled_by, created_at,
                    issued_at, sent_at, received_at, notice_shown_at, consent_at,
                    finished_at, expires_at, outcome_detail, send_count
             FROM commands"""


class CommandRefused(Exception):
    """The request cannot be carried out; ``status`` is the HTTP status to answer
    with, ``code`` a machine-readable reason, the message is for people (it never
    quotes a value from the request)."""

    def __init__(self, status: int, code: str, message: str, **extra: object) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.extra = extra  # more of the answer (e.g. which devices)


@dataclass(frozen=True, slots=True)
class IssueResult:
    command: dict[str, Any]
    created: bool  # False: an earlier request with the same Idempotency-Key


def _iso(value: Any) -> Any:
    return None if value is None else value.isoformat()


def command_json(r: Mapping[str, Any]) -> dict[str, Any]:
    """A command row as the API shows it."""
    return {
        "command_id": str(r["command_id"]),
        "device": r["device_id"],
        "type": r["type"],
        "params": r["params"],
        "notice": r["notice"],
        "state": r["state"],
        "reason": r["reason"],
        "requested_by": r["requested_by"],
        "approved_by": r["approved_by"],
        "approved_at": _iso(r["approved_at"]),
        "cancelled_by": r["cancelled_by"],
        "created_at": _iso(r["created_at"]),
        "issued_at": _iso(r["issued_at"]),
        "sent_at": _iso(r["sent_at"]),
        "received_at": _iso(r["received_at"]),
        "notice_shown_at": _iso(r["notice_shown_at"]),
        "consent_at": _iso(r["consent_at"]),
        "finished_at": _iso(r["finished_at"]),
        "expires_at": _iso(r["expires_at"]),
        "outcome_detail": r["outcome_detail"],
        "send_count": r["send_count"],
    }


def request_digest(device: str, body: Mapping[str, Any]) -> bytes:
    """What an Idempotency-Key is bound to: the device and the request body."""
    return hashlib.sha256(canonical_json({"device": device, "body": dict(body)})).digest()


def consent_of(state: str, consent_at: datetime | None) -> str | None:
    """The user's answer to a command that asked them: ``given`` or ``refused``
    (None: not asked, or not answered)."""
    if consent_at is None:
        return None
    return "refused" if state == "consent_refused" else "given"


def _type_details(type_: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """What of a command's parameters an audit entry names: codes, never text."""
    if type_ == "wipe":
        return {"scope": params["scope"]}
    if type_ == "remote_view":
        return {"mode": params["mode"]}
    return {}


def notice_kind(type_: str, params: Mapping[str, Any]) -> str:
    return f"wipe-{params['scope']}" if type_ == "wipe" else type_


async def _notice_for(conn: asyncpg.Connection, tenant: str, kind: str) -> dict[str, str]:
    """The tenant's template for this kind of command, else the built-in text."""
    row = await conn.fetchrow(
        "SELECT text, lang FROM notice_templates WHERE tenant_id = $1 AND kind = $2",
        tenant, kind)
    if row is not None:
        return {"text": row["text"], "lang": row["lang"]}
    return dict(DEFAULT_NOTICES[kind])


async def _event(conn: asyncpg.Connection, command_id: uuid.UUID, event: str,
                 from_state: str | None, to_state: str | None, *, accepted: bool = True,
                 detail: str | None = None, actor: str | None = None) -> None:
    await conn.execute(
        """INSERT INTO command_events (command_id, event, from_state, to_state, accepted,
                                       detail, actor)
           VALUES ($1, $2, $3, $4, $5, $6, $7)""",
        command_id, event, from_state, to_state, accepted, detail, actor)


async def issue(conn: asyncpg.Connection, *, tenant: str, device: str, actor: str,
                type_: str, params: Mapping[str, Any], reason: str,
                notice: Mapping[str, str] | None, ttl_s: int, audit_keys: audit.AuditKeys,
                idempotency_key: str | None = None, digest: bytes | None = None
                ) -> IssueResult:
    """Check the guards and create the command (queued, or pending_approval)."""
    if idempotency_key is not None:
        assert digest is not None
        earlier = await conn.fetchrow(
            "SELECT * FROM commands "
            "WHERE tenant_id = $1 AND requested_by = $2 AND idempotency_key = $3",
            tenant, actor, idempotency_key)
        if earlier is not None:
            if earlier["request_sha256"] != digest:
                raise CommandRefused(422, "idempotency_key_reused",
                                     "this Idempotency-Key was used for a different request")
            return IssueResult(command_json(earlier), created=False)
    # FOR SHARE: a revocation waits for this command (and withdraws it), or this
    # waits for the revocation and is refused.
    dev = await conn.fetchrow(
        "SELECT ownership, status, agent FROM devices WHERE tenant_id = $1 AND device_id = $2 "
        "FOR SHARE", tenant, device)
    if dev is None:
        raise CommandRefused(404, "no_such_device", "no such device")
    if dev["status"] != "enrolled":
        raise CommandRefused(409, "device_revoked",
                             "the device is revoked: it cannot receive commands")
    if not agent_supports(dev["agent"], type_):
        # Refused, not queued: it would wait until it expired (mdm_server/agents).
        raise CommandRefused(409, "unsupported_by_agent",
                             unsupported_text(dev["agent"], type_),
                             devices=[{"device": device, "agent": dev["agent"]}])
    if type_ in CONSENT_TYPES and notice is None:
        raise CommandRefused(422, "notice_required",
                             f"a {type_} needs a notice: the device's user is asked with it")
    try:
        check_command(tenant, device, type_, params, notice)
    except ValueError as exc:
        raise CommandRefused(422, "invalid_command", str(exc)) from None
    if dev["ownership"] == "personal" and (
            type_ == "factory_reset" or (type_ == "wipe" and params.get("scope") == "full")):
        raise CommandRefused(
            403, "personal_device",
            "the device is personally owned: only a managed wipe (company apps and data) "
            "is allowed, never a full wipe or a factory reset")
    if notice is None and type_ in NOTICE_TYPES:
        notice = await _notice_for(conn, tenant, notice_kind(type_, params))
    state = "pending_approval" if type_ == "factory_reset" else "queued"
    try:
        async with conn.transaction():  # a savepoint: a lost race is answered below
            row = await conn.fetchrow(
                """INSERT INTO commands (tenant_id, device_id, type, params, notice, state,
                                         reason, requested_by, expires_at, idempotency_key,
                                         request_sha256)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8,
                           now() + make_interval(secs => $9), $10, $11)
                   RETURNING *""",
                tenant, device, type_, dict(params), None if notice is None else dict(notice),
                state, reason, actor, float(ttl_s), idempotency_key, digest)
    except asyncpg.UniqueViolationError:
        # The same Idempotency-Key committed meanwhile by a concurrent request.
        return await issue(conn, tenant=tenant, device=device, actor=actor, type_=type_,
                           params=params, reason=reason, notice=notice, ttl_s=ttl_s,
                           audit_keys=audit_keys, idempotency_key=idempotency_key,
                           digest=digest)
    assert row is not None
    await _event(conn, row["command_id"], "created", None, state, actor=actor)
    await audit.append(conn, audit_keys, tenant=tenant, actor=actor, action="command.issue",
                       target=f"device:{device}",
                       details={"command_id": str(row["command_id"]), "type": type_,
                                **_type_details(type_, params)})
    if state == "queued":
        await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, tenant)
    return IssueResult(command_json(row), created=True)


async def issue_group(conn: asyncpg.Connection, *, tenant: str, group: str, actor: str,
                      type_: str, params: Mapping[str, Any], reason: str,
                      notice: Mapping[str, str] | None, ttl_s: int,
                      audit_keys: audit.AuditKeys, idempotency_key: str | None = None,
                      digest: bytes | None = None) -> IssueResult:
    """One command for every enrolled device of ``group`` (a lost shipment), set-based.

    The per-device guards apply: a full wipe skips personally owned devices (listed
    as refused in the batch). A factory reset is not issued to a group: each needs
    its own second-admin approval."""
    if idempotency_key is not None:
        earlier = await conn.fetchrow(
            "SELECT batch_id, request_sha256 FROM command_batches "
            "WHERE tenant_id = $1 AND requested_by = $2 AND idempotency_key = $3",
            tenant, actor, idempotency_key)
        if earlier is not None:
            if earlier["request_sha256"] != digest:
                raise CommandRefused(422, "idempotency_key_reused",
                                     "this Idempotency-Key was used for a different request")
            batch = await get_batch(conn, tenant, earlier["batch_id"])
            assert batch is not None
            return IssueResult(batch, created=False)
    if type_ == "factory_reset":
        raise CommandRefused(403, "group_factory_reset",
                             "a factory reset is requested one device at a time: each needs "
                             "its own approval by a second admin")
    if type_ in CONSENT_TYPES:
        raise CommandRefused(403, f"group_{type_}",
                             "a remote view is requested one device at a time: its user is "
                             "asked, and an admin looks at one screen")
    try:
        check_command(tenant, "group-check", type_, params)
    except ValueError as exc:
        raise CommandRefused(422, "invalid_command", str(exc)) from None
    members = await conn.fetch(
        "SELECT device_id, ownership, agent FROM devices WHERE tenant_id = $1 "
        "AND $2 = ANY(groups) AND status = 'enrolled' ORDER BY device_id FOR SHARE",
        tenant, group)
    if not members:
        raise CommandRefused(404, "empty_group", "no enrolled device is in this group")
    # Devices whose agent cannot carry it out are refused, by name; none able: 409.
    unable = [{"device": m["device_id"], "agent": m["agent"]} for m in members
              if not agent_supports(m["agent"], type_)]
    if len(unable) == len(members):
        raise CommandRefused(409, "unsupported_by_agent",
                             f"no device of the group can carry out a {type_} command: "
                             "their agents cannot", devices=unable)
    unable_ids = [u["device"] for u in unable]
    personal_refused = type_ == "wipe" and params.get("scope") == "full"
    refused = [{"device": m["device_id"], "code": "personal_device"}
               for m in members if personal_refused and m["ownership"] == "personal"
               and m["device_id"] not in unable_ids]
    refused += [{"device": u["device"], "code": "unsupported_by_agent"} for u in unable]
    refused.sort(key=lambda r: str(r["device"]))
    if notice is None and type_ in NOTICE_TYPES:
        notice = await _notice_for(conn, tenant, notice_kind(type_, params))
    try:
        async with conn.transaction():
            batch_id: uuid.UUID = await conn.fetchval(
                """INSERT INTO command_batches (tenant_id, group_name, type, params, reason,
                                                requested_by, commands, refused,
                                                idempotency_key, request_sha256)
                   VALUES ($1, $2, $3, $4, $5, $6, 0, $7, $8, $9) RETURNING batch_id""",
                tenant, group, type_, dict(params), reason, actor, refused, idempotency_key,
                digest)
    except asyncpg.UniqueViolationError:  # the same key, committed meanwhile
        return await issue_group(conn, tenant=tenant, group=group, actor=actor, type_=type_,
                                 params=params, reason=reason, notice=notice, ttl_s=ttl_s,
                                 audit_keys=audit_keys, idempotency_key=idempotency_key,
                                 digest=digest)
    count: int = await conn.fetchval(
        """WITH ins AS (
               INSERT INTO commands (tenant_id, device_id, type, params, notice, state, reason,
                                     requested_by, expires_at, batch_id)
               SELECT tenant_id, device_id, $3, $4, $5, 'queued', $6, $7,
                      now() + make_interval(secs => $8), $9
               FROM devices
               WHERE tenant_id = $1 AND $2 = ANY(groups) AND status = 'enrolled'
                 AND NOT ($10 AND ownership = 'personal')
                 AND device_id <> ALL($11::text[])
               RETURNING command_id),
           ev AS (
               INSERT INTO command_events (command_id, event, from_state, to_state, accepted,
                                           actor)
               SELECT command_id, 'created', NULL, 'queued', true, $7 FROM ins)
           SELECT count(*) FROM ins""",
        tenant, group, type_, dict(params), None if notice is None else dict(notice), reason,
        actor, float(ttl_s), batch_id, personal_refused, unable_ids)
    await conn.execute("UPDATE command_batches SET commands = $2 WHERE batch_id = $1",
                       batch_id, count)
    await audit.append(conn, audit_keys, tenant=tenant, actor=actor,
                       action="command.issue_group",
                       target=f"group:{group}",
                       details={"batch_id": str(batch_id), "type": type_, "commands": count,
                                "refused": len(refused), **_type_details(type_, params)})
    await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, tenant)
    batch = await get_batch(conn, tenant, batch_id)
    assert batch is not None
    return IssueResult(batch, created=True)


async def get_batch(conn: asyncpg.Connection, tenant: str, batch_id: uuid.UUID
                    ) -> dict[str, Any] | None:
    """A group request and its progress: how many of its commands are in each state."""
    row = await conn.fetchrow(
        "SELECT * FROM command_batches WHERE tenant_id = $1 AND batch_id = $2",
        tenant, batch_id)
    if row is None:
        return None
    counts = {r["state"]: r["n"] for r in await conn.fetch(
        "SELECT state, count(*) AS n FROM commands WHERE batch_id = $1 GROUP BY state",
        batch_id)}
    finished = sum(n for st, n in counts.items() if st in states.TERMINAL)
    return {
        "batch_id": str(row["batch_id"]), "group": row["group_name"], "type": row["type"],
        "params": row["params"], "reason": row["reason"], "requested_by": row["requested_by"],
        "created_at": row["created_at"].isoformat(), "commands": row["commands"],
        "refused": row["refused"], "states": counts, "finished": finished,
        "done": finished == row["commands"],
    }


async def _locked(conn: asyncpg.Connection, tenant: str, device: str,
                  command_id: uuid.UUID) -> asyncpg.Record:
    row = await conn.fetchrow(
        _SELECT + " WHERE tenant_id = $1 AND device_id = $2 AND command_id = $3 FOR UPDATE",
        tenant, device, command_id)
    if row is None:
        raise CommandRefused(404, "no_such_command", "no such command")
    return row


async def approve(conn: asyncpg.Connection, *, tenant: str, device: str,
                  command_id: uuid.UUID, actor: str, audit_keys: audit.AuditKeys
                  ) -> dict[str, Any]:
    """A second admin approves a command waiting in pending_approval."""
    row = await _locked(conn, tenant, device, command_id)
    if row["requested_by"] == actor:
        raise CommandRefused(403, "same_admin",
                             "the admin who requested the command cannot approve it: "
                             "another admin of the tenant must")
    # After the command's lock, as a revocation takes them (commands, then device).
    status = await conn.fetchval(
        "SELECT status FROM devices WHERE tenant_id = $1 AND device_id = $2 FOR SHARE",
        tenant, device)
    if status != "enrolled":
        raise CommandRefused(409, "device_revoked",
                             "the device is revoked: its commands were withdrawn and "
                             "cannot be approved")
    t = states.transition(row["state"], "approve")
    if not t.changed:
        raise CommandRefused(409, t.reason or "not_pending",
                             f"the command is {row['state']}: only a command waiting "
                             "for approval can be approved")
    new = await conn.fetchrow(
        "UPDATE commands SET state = $2, approved_by = $3, approved_at = now() "
        "WHERE command_id = $1 RETURNING *", command_id, t.to_state, actor)
    await _event(conn, command_id, "approved", row["state"], t.to_state, actor=actor)
    await audit.append(conn, audit_keys, tenant=tenant, actor=actor, action="command.approve",
                       target=f"device:{device}",
                       details={"command_id": str(command_id), "type": row["type"]})
    await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, tenant)
    assert new is not None
    return command_json(new)


async def cancel(conn: asyncpg.Connection, *, tenant: str, device: str,
                 command_id: uuid.UUID, actor: str, audit_keys: audit.AuditKeys
                 ) -> dict[str, Any]:
    """Cancel a command that has not been delivered to the broker yet."""
    row = await _locked(conn, tenant, device, command_id)
    t = states.transition(row["state"], "cancel")
    if not t.changed:
        raise CommandRefused(409, t.reason or "not_cancellable",
                             f"the command is {row['state']}: only a command not yet sent "
                             "can be cancelled")
    new = await conn.fetchrow(
        "UPDATE commands SET state = $2, cancelled_by = $3, finished_at = now() "
        "WHERE command_id = $1 RETURNING *", command_id, t.to_state, actor)
    await _event(conn, command_id, "cancelled", row["state"], t.to_state, actor=actor)
    await audit.append(conn, audit_keys, tenant=tenant, actor=actor, action="command.cancel",
                       target=f"device:{device}",
                       details={"command_id": str(command_id), "type": row["type"]})
    assert new is not None
    return command_json(new)


async def lock_unfinished(conn: asyncpg.Connection, tenant: str, device: str) -> None:
    """Lock the device's unfinished commands (inside the caller's transaction),
    before the device's row is changed: the order approvals and acks take them in,
    so a revocation and an approval never wait for each other in a circle."""
    await conn.execute(
        "SELECT command_id FROM commands WHERE tenant_id = $1 AND device_id = $2 "
        "AND state = ANY($3::text[]) ORDER BY command_id FOR UPDATE",
        tenant, device, list(states.WITHDRAW_FROM_STATES))


async def withdraw_unfinished(conn: asyncpg.Connection, *, tenant: str, device: str,
                              actor: str, because: str, audit_keys: audit.AuditKeys
                              ) -> list[uuid.UUID]:
    """Cancel every command of the device that is not finished (``withdraw``: the
    device was revoked or re-enrolled), whatever its state: an event
    (``withdrawn``, with ``because``) and an audit entry (``command.cancel``) each.
    Nothing of them is signed or sent from then on, and a resend owed to the
    device is dropped. Returns their ids. Call inside the revoking transaction,
    after :func:`lock_unfinished` and the change of the device."""
    rows = await conn.fetch(
        """WITH live AS (SELECT command_id, state FROM commands
                         WHERE tenant_id = $1 AND device_id = $2 AND state = ANY($3::text[])
                         ORDER BY command_id FOR UPDATE)
           UPDATE commands c SET state = 'cancelled', cancelled_by = $4,
                                 finished_at = now(), resend = false
           FROM live WHERE c.command_id = live.command_id
           RETURNING c.command_id, c.type, live.state AS old_state""",
        tenant, device, list(states.WITHDRAW_FROM_STATES), actor)
    rows = sorted(rows, key=lambda r: r["command_id"])
    for r in rows:
        t = states.transition(r["old_state"], "withdraw")
        assert t.to_state == "cancelled", t
        await _event(conn, r["command_id"], "withdrawn", r["old_state"], t.to_state,
                     detail=because, actor=actor)
        await audit.append(conn, audit_keys, tenant=tenant, actor=actor,
                           action="command.cancel", target=f"device:{device}",
                           details={"command_id": str(r["command_id"]), "type": r["type"],
                                    "state": r["old_state"], "because": because})
    return [r["command_id"] for r in rows]


async def get_command(conn: asyncpg.Connection, tenant: str, device: str,
                      command_id: uuid.UUID) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        _SELECT + " WHERE tenant_id = $1 AND device_id = $2 AND command_id = $3",
        tenant, device, command_id)
    if row is None:
        return None
    out = command_json(row)
    events = await conn.fetch(
        "SELECT at, event, from_state, to_state, accepted, detail, actor "
        "FROM command_events WHERE command_id = $1 ORDER BY event_id", command_id)
    out["events"] = [{"at": e["at"].isoformat(), "event": e["event"],
                      "from": e["from_state"], "to": e["to_state"],
                      "accepted": e["accepted"], "detail": e["detail"],
                      "actor": e["actor"]} for e in events]
    return out


async def list_commands(conn: asyncpg.Connection, tenant: str, device: str | None, *,
                        limit: int, state: str | None = None) -> list[dict[str, Any]]:
    """A device's commands (or the tenant's, ``device=None``), newest first."""
    rows = await conn.fetch(
        _SELECT + " WHERE tenant_id = $1 AND ($2::text IS NULL OR device_id = $2) "
        "AND ($3::text IS NULL OR state = $3) ORDER BY created_at DESC, command_id LIMIT $4",
        tenant, device, state, limit)
    return [command_json(r) for r in rows]


async def notice_log(conn: asyncpg.Connection, tenant: str, device: str, *,
                     limit: int, since: datetime | None = None) -> list[dict[str, Any]]:
    """Every command that affected the device's user, newest first: the notice text
    and language as sent, when it was sent, when the device reported it shown, the
    user's answer where they were asked (``consent``, ``consent_at``), and the
    outcome. What the device's user (and their admins) may read; ``since``:
    only commands requested since then (the user's enrollment)."""
    rows = await conn.fetch(
        """SELECT command_id, type, params, notice, state, created_at, sent_at, received_at,
                  notice_shown_at, consent_at, finished_at, outcome_detail, agent_form
           FROM commands WHERE tenant_id = $1 AND device_id = $2 AND type = ANY($3::text[])
             AND ($5::timestamptz IS NULL OR created_at >= $5)
           ORDER BY created_at DESC, command_id LIMIT $4""",
        tenant, device, list(NOTICE_TYPES), limit, since)
    return [{"command_id": str(r["command_id"]), "type": r["type"], "params": r["params"],
             "notice": r["notice"], "state": r["state"],
             "requested_at": _iso(r["created_at"]), "sent_at": _iso(r["sent_at"]),
             "received_at": _iso(r["received_at"]),
             "notice_shown_at": _iso(r["notice_shown_at"]),
             "consent": consent_of(r["state"], r["consent_at"]),
             "consent_at": _iso(r["consent_at"]),
             "finished_at": _iso(r["finished_at"]), "outcome_detail": r["outcome_detail"],
             "agent_form": r["agent_form"]}
            for r in rows]


async def set_notice_template(conn: asyncpg.Connection, *, tenant: str, kind: str,
                              text: str, lang: str, actor: str,
                              audit_keys: audit.AuditKeys) -> None:
    await conn.execute(
        """INSERT INTO notice_templates (tenant_id, kind, text, lang, updated_by)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (tenant_id, kind) DO UPDATE
           SET text = EXCLUDED.text, lang = EXCLUDED.lang, updated_by = EXCLUDED.updated_by,
               updated_at = now()""", tenant, kind, text, lang, actor)
    await audit.append(conn, audit_keys, tenant=tenant, actor=actor,
                       action="notice_template.set",
                       target=f"notice_template:{kind}", details={"lang": lang})
