"""The audit log: every admin action, append-only, in keyed hash chains.

Admin actions (commands, approvals, policy changes, enrollments, admin tokens,
reads of a user's personal data) each add one entry with :func:`append`, called
inside the transaction of the action itself, so an entry exists exactly when its
action was committed. `mdm-server audit verify` (:func:`verify`) walks the log and
names the first broken entry of each chain; `mdm-server audit checkpoint`
(:func:`make_checkpoint`) writes a signed head of every chain for the operator to
keep outside the database, and `audit verify --checkpoint FILE` also detects any
rewrite before it (the newest entries removed, an entry changed).

**No personal values in entries.** ``target`` and ``details`` hold ids and codes
(``device:phone-7``, a command id, a policy version), never what they point at:
no e-mail addresses, phone numbers, locations or free text a user typed. The log
cannot be edited, so anything put into it could never be erased again.

**Keys.** :class:`AuditKeys` are derived from the master key (HKDF-SHA256, info
``mdm audit log entries v1`` and ``mdm audit checkpoints v1``); the database never
holds them. Whoever lacks the master key (the database's owner, a superuser, the
server's own database role) cannot write an entry, or a checkpoint, that verifies.

**Chains.** One chain per tenant, and one for entries of no tenant (signing-key
rotation from the CLI): column ``chain``, generated from ``tenant_id`` (``''`` for
no tenant). ``seq`` counts 1, 2, 3 ... within a chain, gap-free, so what a
tenant's admins see says nothing about other tenants' actions. Each entry:

    mac = HMAC-SHA256(entry key, prev || canonical JSON of
                      {"seq", "at", "tenant", "actor", "action", "target", "details"})

stored in ``hash``; ``prev`` (``prev_hash``) is the previous entry's ``hash`` in
the chain. ``at`` is an ISO 8601 UTC timestamp with microseconds; canonical JSON
is orjson with sorted keys at every level, and ``details`` is MAC'd as PostgreSQL
stores it (read back through ``jsonb``), so the verifier recomputes the same bytes.
``seq`` is the chain's last + 1 under an advisory lock of that chain, held until
the caller's transaction ends (a rolled-back action leaves no hole); tenants do
not wait for each other. Call ``append`` last in the transaction, in READ
COMMITTED (the default), so that it sees the entry committed just before.

**Legacy entries.** Entries written before migration 011 were chained with plain
SHA-256 (no key) in one global sequence: ``hash = SHA-256(prev || the same JSON)``
with the global number as ``seq``. Migration 011 kept that number in
``legacy_seq`` and numbered them per chain; they stay verifiable by their old rule
(:func:`legacy_hash`), as one chain in ``legacy_seq`` order. The first keyed entry
of every chain takes the hash of the last legacy entry as its ``prev`` (32 zero
bytes if there is none), so once a chain has a keyed entry the legacy entries as
they were then are pinned under the key. What they are worth on their own: no
more than before; anyone who could write the table could have rewritten them
consistently before that first keyed entry was written. Reads flag them
``legacy``. The server's role cannot write ``legacy_seq`` (column privileges).

What a chain cannot show on its own: the removal of its newest entries (or of a
whole chain). A checkpoint kept outside the database shows both.

Who may write: the server's role (``mdm_app``, migration 004) may SELECT and
INSERT (not ``legacy_seq``); UPDATE, DELETE and TRUNCATE are neither granted nor,
through triggers, possible for anyone who cannot disable the table's triggers.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg
import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "GENESIS",
    "AuditEntry",
    "AuditKeys",
    "ChainHead",
    "Checkpoint",
    "CheckpointError",
    "Integrity",
    "LegacyHead",
    "Problem",
    "VerifyResult",
    "append",
    "chain_of",
    "entry_mac",
    "legacy_hash",
    "make_checkpoint",
    "read",
    "read_genuine",
    "rekey",
    "verify",
]

#: prev_hash of the first entry of the legacy chain, and of a chain's first keyed
#: entry when there are no legacy entries.
GENESIS = bytes(32)

_ENTRY_INFO = b"mdm audit log entries v1"
_CHECKPOINT_INFO = b"mdm audit checkpoints v1"
CHECKPOINT_FORMAT = "mdm-audit-checkpoint/1"

# Two-key advisory lock (its own key space, apart from the one-key locks of
# migrations, policies and signing keys): "aud", then the chain.
_LOCK_CLASS = 0x617564

Integrity = Literal["verified", "legacy", "invalid"]

_VERIFY = """SELECT chain, seq, at, tenant_id, actor, action, target,
                    details::text AS details, prev_hash, hash, legacy_seq
             FROM audit_log ORDER BY chain, seq"""
_VERIFY_LEGACY = """SELECT chain, seq, at, tenant_id, actor, action, target,
                           details::text AS details, prev_hash, hash, legacy_seq
                    FROM audit_log WHERE legacy_seq IS NOT NULL ORDER BY legacy_seq"""
_READ = """SELECT chain, seq, at, tenant_id, actor, action, target, details::text AS details,
                  prev_hash, hash, legacy_seq
           FROM audit_log
           WHERE chain = $1 AND ($2::bigint IS NULL OR seq < $2)
             AND ($4::text IS NULL OR action = $4) AND ($5::text IS NULL OR target = $5)
           ORDER BY seq DESC LIMIT $3"""
_HEAD = """
    SELECT last.seq, last.hash, last.legacy_seq IS NOT NULL AS last_is_legacy,
           (SELECT l.hash FROM audit_log l WHERE l.legacy_seq IS NOT NULL
            ORDER BY l.legacy_seq DESC LIMIT 1) AS legacy_head,
           clock_timestamp() AS at, $2::text::jsonb::text AS details
    FROM (SELECT 1) AS one
    LEFT JOIN LATERAL (SELECT seq, hash, legacy_seq FROM audit_log WHERE chain = $1
                       ORDER BY seq DESC LIMIT 1) AS last ON true"""


def _hkdf(master_key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master_key)


@dataclass(frozen=True, slots=True)
class AuditKeys:
    """The audit log's keys, derived from the master key: ``entry`` MACs entries,
    ``checkpoint`` MACs checkpoints. Never stored, never logged."""

    entry: bytes = field(repr=False)
    checkpoint: bytes = field(repr=False)

    @classmethod
    def derive(cls, master_key: bytes) -> AuditKeys:
        if len(master_key) != 32:
            raise ValueError("the master key must be 32 bytes")
        return cls(_hkdf(master_key, _ENTRY_INFO), _hkdf(master_key, _CHECKPOINT_INFO))


def chain_of(tenant: str | None) -> str:
    """The chain an entry of ``tenant`` belongs to (tenant ids are never empty)."""
    return tenant if tenant is not None else ""


def _tenant_of(chain: str) -> str | None:
    return chain or None


def _label(tenant: str | None) -> str:
    return f"tenant {tenant}" if tenant is not None else "entries of no tenant"


def _timestamp(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def _body(*, seq: int, at: datetime, tenant: str | None, actor: str, action: str,
          target: str, details: Any) -> bytes:
    return orjson.dumps(
        {"seq": seq, "at": _timestamp(at), "tenant": tenant, "actor": actor,
         "action": action, "target": target, "details": details},
        option=orjson.OPT_SORT_KEYS)


def entry_mac(keys: AuditKeys, prev: bytes, *, seq: int, at: datetime, tenant: str | None,
              actor: str, action: str, target: str, details: Any) -> bytes:
    """The MAC of one keyed entry, chained to ``prev``."""
    body = _body(seq=seq, at=at, tenant=tenant, actor=actor, action=action, target=target,
                 details=details)
    return hmac.new(keys.entry, prev + body, hashlib.sha256).digest()


def legacy_hash(prev: bytes, *, seq: int, at: datetime, tenant: str | None, actor: str,
                action: str, target: str, details: Any) -> bytes:
    """The hash of one entry written before migration 011 (``seq``: its global
    number, now ``legacy_seq``). Anyone can compute it: it proves nothing alone."""
    body = _body(seq=seq, at=at, tenant=tenant, actor=actor, action=action, target=target,
                 details=details)
    return hashlib.sha256(prev + body).digest()


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    at: datetime
    tenant: str | None
    actor: str
    action: str
    target: str
    details: dict[str, Any]
    prev_hash: bytes
    hash: bytes
    #: ``verified``: its MAC checks under the server's key; ``legacy``: written
    #: before migration 011 (no MAC: only `audit verify` vouches for it, as part of
    #: the legacy chain); ``invalid``: its MAC does not check (forged or altered).
    integrity: Integrity

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "at": _timestamp(self.at), "tenant": self.tenant,
                "actor": self.actor, "action": self.action, "target": self.target,
                "details": self.details, "hash": self.hash.hex(),
                "integrity": self.integrity}


async def append(conn: asyncpg.Connection, keys: AuditKeys, *, tenant: str | None, actor: str,
                 action: str, target: str, details: Mapping[str, Any] | None = None) -> int:
    """Add an entry to ``tenant``'s chain; return its seq in that chain.

    Call it inside the transaction of the action (last, before the commit): the
    entry is committed with the action or not at all. Outside a transaction it
    commits on its own. ``details``: JSON values, ids and codes only (see above).
    """
    text = orjson.dumps(dict(details or {})).decode()
    if not conn.is_in_transaction():
        async with conn.transaction():
            return await _append(conn, keys, tenant, actor, action, target, text)
    return await _append(conn, keys, tenant, actor, action, target, text)


async def _append(conn: asyncpg.Connection, keys: AuditKeys, tenant: str | None, actor: str,
                  action: str, target: str, details_text: str) -> int:
    chain = chain_of(tenant)
    await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _LOCK_CLASS, chain)
    # After the lock, so this statement's snapshot holds the entry committed last.
    row = await conn.fetchrow(_HEAD, chain, details_text)
    assert row is not None
    seq = 1 if row["seq"] is None else row["seq"] + 1
    if row["seq"] is not None and not row["last_is_legacy"]:
        prev = bytes(row["hash"])
    else:  # the chain's first keyed entry: it pins the legacy entries
        prev = GENESIS if row["legacy_head"] is None else bytes(row["legacy_head"])
    at: datetime = row["at"]
    mac = entry_mac(keys, prev, seq=seq, at=at, tenant=tenant, actor=actor, action=action,
                    target=target, details=orjson.loads(row["details"]))
    try:
        await conn.execute(
            """INSERT INTO audit_log (seq, at, tenant_id, actor, action, target, details,
                                      prev_hash, hash)
               VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb, $8, $9)""",
            seq, at, tenant, actor, action, target, details_text, prev, mac)
    except asyncpg.UniqueViolationError:
        raise RuntimeError("audit.append needs a READ COMMITTED transaction: this one's "
                           "snapshot predates the last audit entry") from None
    return seq


def _details(raw: str | None) -> Any:
    return orjson.loads(raw) if raw is not None else None


def _integrity(keys: AuditKeys, r: Mapping[str, Any]) -> Integrity:
    """One entry on its own: cheap (one HMAC), no chain walk."""
    if r["legacy_seq"] is not None:
        return "legacy"
    try:
        mac = entry_mac(keys, bytes(r["prev_hash"]), seq=r["seq"], at=r["at"],
                        tenant=r["tenant_id"], actor=r["actor"], action=r["action"],
                        target=r["target"], details=_details(r["details"]))
    except (orjson.JSONDecodeError, orjson.JSONEncodeError, TypeError, ValueError):
        return "invalid"
    ok = r["hash"] is not None and hmac.compare_digest(bytes(r["hash"]), mac)
    return "verified" if ok else "invalid"


def _entry(keys: AuditKeys, r: Mapping[str, Any]) -> AuditEntry:
    try:
        details = _details(r["details"])
    except orjson.JSONDecodeError:
        details = None
    return AuditEntry(r["seq"], r["at"], r["tenant_id"], r["actor"], r["action"], r["target"],
                      details if isinstance(details, dict) else {}, bytes(r["prev_hash"]),
                      bytes(r["hash"]), _integrity(keys, r))


async def read(conn: asyncpg.Connection, keys: AuditKeys, tenant: str, *, limit: int = 100,
               before: int | None = None, action: str | None = None,
               target: str | None = None) -> list[AuditEntry]:
    """A tenant's entries, newest first: ``limit`` of them with seq below ``before``
    (the smallest seq of the previous page; None for the first page), optionally
    only those of one ``action`` and ``target``. Each says whether its MAC checks
    (``integrity``); none is left out."""
    rows = await conn.fetch(_READ, chain_of(tenant), before, max(1, min(limit, 1000)),
                            action, target)
    return [_entry(keys, r) for r in rows]


async def read_genuine(conn: asyncpg.Connection, keys: AuditKeys, tenant: str, *,
                       limit: int, action: str | None = None,
                       target: str | None = None) -> list[AuditEntry]:
    """As :func:`read`, newest first, but only entries whose MAC checks (and legacy
    ones): up to ``limit`` of them, however many forged entries lie in between."""
    out: list[AuditEntry] = []
    before: int | None = None
    while len(out) < limit:
        page = await read(conn, keys, tenant, limit=1000, before=before, action=action,
                          target=target)
        out += [e for e in page if e.integrity != "invalid"][:limit - len(out)]
        if len(page) < 1000:
            break
        before = page[-1].seq
    return out


# --- verification --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ChainHead:
    """The newest entry of a chain (``tenant`` None: the chain of no tenant)."""

    tenant: str | None
    seq: int
    hash: bytes
    at: datetime


@dataclass(frozen=True, slots=True)
class LegacyHead:
    """The entries written before migration 011: how many, the last one's hash."""

    count: int
    hash: bytes


@dataclass(frozen=True, slots=True)
class Problem:
    """What is wrong, and where: a chain (``tenant acme``, ``entries of no tenant``)
    or the legacy entries as a whole, and the entry ``seq`` in a chain if one."""

    where: str
    seq: int | None
    reason: str

    def __str__(self) -> str:
        at = f", entry {self.seq}" if self.seq is not None else ""
        return f"{self.where}{at}: {self.reason}"


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of :func:`verify`: ``count`` entries, each chain's head (chains
    that verify), the legacy entries, and the problems found (none: OK)."""

    count: int
    heads: tuple[ChainHead, ...] = ()
    legacy: LegacyHead | None = None
    problems: tuple[Problem, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        if self.problems:
            return "\n".join(f"audit log BROKEN: {p}" for p in self.problems)
        text = f"audit log OK: {self.count} entries in {len(self.heads)} chain(s)"
        if self.legacy is not None:
            text += (f", {self.legacy.count} of them legacy (unkeyed, written before "
                     "migration 011)")
        return text


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Signed heads: every chain's newest entry (seq, MAC, time) and the legacy
    entries' head, at ``made_at``. Kept outside the database by the operator."""

    made_at: datetime
    heads: tuple[ChainHead, ...]
    legacy: LegacyHead | None

    def _document(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "made_at": _timestamp(self.made_at),
            "legacy": None if self.legacy is None else {"entries": self.legacy.count,
                                                        "head": self.legacy.hash.hex()},
            "chains": [{"tenant": h.tenant, "seq": h.seq, "hash": h.hash.hex(),
                        "at": _timestamp(h.at)} for h in self.heads],
        }

    def dumps(self, keys: AuditKeys) -> bytes:
        """The checkpoint file: JSON, MAC'd under the checkpoint key."""
        doc = self._document()
        doc["mac"] = _checkpoint_mac(keys, doc).hex()
        return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n"

    @classmethod
    def loads(cls, data: bytes, keys: AuditKeys) -> Checkpoint:
        """Parse a checkpoint file and check its MAC; CheckpointError if it is not a
        checkpoint, or was not made with this master key, or was edited."""
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise CheckpointError("it is not an audit checkpoint (not JSON)") from None
        if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"it is not an audit checkpoint ({CHECKPOINT_FORMAT})")
        mac = doc.pop("mac", None)
        try:
            given = bytes.fromhex(mac) if isinstance(mac, str) else b""
        except ValueError:
            given = b""
        if not hmac.compare_digest(given, _checkpoint_mac(keys, doc)):
            raise CheckpointError("its signature does not verify: it was edited, or not "
                                  "made with this master key")
        try:
            return cls._parse(doc)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError("it is signed but malformed") from None

    @classmethod
    def _parse(cls, doc: dict[str, Any]) -> Checkpoint:
        legacy = doc["legacy"]
        heads = []
        for c in doc["chains"]:
            if not (c["tenant"] is None or isinstance(c["tenant"], str)) \
                    or type(c["seq"]) is not int:
                raise TypeError
            heads.append(ChainHead(c["tenant"], c["seq"], bytes.fromhex(c["hash"]),
                                   datetime.fromisoformat(c["at"])))
        return cls(
            made_at=datetime.fromisoformat(doc["made_at"]), heads=tuple(heads),
            legacy=None if legacy is None else LegacyHead(int(legacy["entries"]),
                                                          bytes.fromhex(legacy["head"])))


class CheckpointError(Exception):
    """A checkpoint file was refused; the message says why."""


def _checkpoint_mac(keys: AuditKeys, doc: Mapping[str, Any]) -> bytes:
    return hmac.new(keys.checkpoint, orjson.dumps(doc, option=orjson.OPT_SORT_KEYS),
                    hashlib.sha256).digest()


async def verify(conn: asyncpg.Connection, keys: AuditKeys, *,
                 checkpoint: Checkpoint | None = None, prefetch: int = 1000) -> VerifyResult:
    """Walk the whole log (server-side cursors: flat memory): the legacy chain by
    its old rule, then every chain in seq order; report the first broken entry of
    each chain. With a ``checkpoint``, also every difference from it: a chain that
    ends before the checkpoint's seq, an entry at that seq that is not the same."""
    if conn.is_in_transaction():
        return await _Verifier(keys, checkpoint).run(conn, prefetch)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _Verifier(keys, checkpoint).run(conn, prefetch)


async def make_checkpoint(conn: asyncpg.Connection, keys: AuditKeys
                          ) -> tuple[VerifyResult, Checkpoint | None]:
    """Verify the log and, only if it is intact, return its checkpoint (one
    snapshot for both: the heads are those that were verified)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        result = await _Verifier(keys, None).run(conn, 1000)
        made_at: datetime = await conn.fetchval("SELECT now()")
    if not result.ok:
        return result, None
    return result, Checkpoint(made_at=made_at, heads=result.heads, legacy=result.legacy)


async def rekey(conn: asyncpg.Connection, old: AuditKeys, new: AuditKeys) -> int:
    """Master-key rotation: every keyed entry MAC'd again under ``new``, chained as
    before, in the caller's transaction. The log must verify under ``old`` first
    (else ValueError: a rotation must not launder a tampered log). Legacy entries
    keep their plain hashes; the first keyed entry of a chain keeps its ``prev``.
    Needs the table's owner (or a superuser): the append-only trigger is disabled
    for this one statement, as migration 011 does. Returns the entries re-MAC'd."""
    checked = await _Verifier(old, None).run(conn, 1000)
    if not checked.ok:
        raise ValueError("the audit log does not verify under the current master key: "
                         + "; ".join(str(p) for p in checked.problems[:3]))
    chains: list[str] = []
    seqs: list[int] = []
    prevs: list[bytes] = []
    macs: list[bytes] = []
    last: dict[str, bytes] = {}
    async for r in conn.cursor(
            "SELECT chain, seq, at, tenant_id, actor, action, target, "
            "details::text AS details, prev_hash FROM audit_log "
            "WHERE legacy_seq IS NULL ORDER BY chain, seq", prefetch=1000):
        chain = r["chain"]
        prev = last.get(chain, bytes(r["prev_hash"]))
        mac = entry_mac(new, prev, seq=r["seq"], at=r["at"], tenant=r["tenant_id"],
                        actor=r["actor"], action=r["action"], target=r["target"],
                        details=orjson.loads(r["details"]))
        chains.append(chain)
        seqs.append(r["seq"])
        prevs.append(prev)
        macs.append(mac)
        last[chain] = mac
    await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_change")
    await conn.execute(
        """UPDATE audit_log a SET prev_hash = x.p, hash = x.h
           FROM unnest($1::text[], $2::int8[], $3::bytea[], $4::bytea[]) AS x(c, s, p, h)
           WHERE a.chain = x.c AND a.seq = x.s""", chains, seqs, prevs, macs)
    await conn.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_change")
    return len(seqs)


_BAD_ROW = (orjson.JSONDecodeError, orjson.JSONEncodeError, TypeError, AttributeError,
            ValueError, OverflowError)


class _Verifier:
    def __init__(self, keys: AuditKeys, checkpoint: Checkpoint | None) -> None:
        self.keys = keys
        self.checkpoint = checkpoint
        self.cp_heads = {} if checkpoint is None else {
            chain_of(h.tenant): h for h in checkpoint.heads}
        self.problems: list[Problem] = []
        self.heads: list[ChainHead] = []
        self.count = 0

    async def run(self, conn: asyncpg.Connection, prefetch: int) -> VerifyResult:
        legacy = await self._legacy(conn, prefetch)
        anchor = GENESIS if legacy is None else legacy.hash
        chain: _Chain | None = None
        seen: set[str] = set()
        async for r in conn.cursor(_VERIFY, prefetch=prefetch):
            self.count += 1
            if chain is None or r["chain"] != chain.name:
                if chain is not None:
                    self._finish(chain)
                chain = _Chain(r["chain"], anchor)
                seen.add(chain.name)
            if chain.broken:
                continue
            problem = chain.check(self.keys, r)
            if problem is None:
                problem = self._against_checkpoint(r)
            if problem is not None:
                chain.broken = True
                self.problems.append(Problem(_label(_tenant_of(chain.name)), r["seq"],
                                             problem))
        if chain is not None:
            self._finish(chain)
        for name in sorted(set(self.cp_heads) - seen):
            self.problems.append(Problem(
                _label(_tenant_of(name)), None,
                f"the chain is missing: the checkpoint has {self.cp_heads[name].seq} "
                "entries in it"))
        return VerifyResult(count=self.count, heads=tuple(self.heads), legacy=legacy,
                            problems=tuple(self.problems))

    async def _legacy(self, conn: asyncpg.Connection, prefetch: int) -> LegacyHead | None:
        """The legacy chain by its old rule. Returns its head as stored (the hash of
        the last entry by ``legacy_seq``): what the chains' first keyed entries must
        name, whether or not the legacy chain itself checks."""
        expected, prev, problem = 1, GENESIS, None
        stored: bytes | None = None
        async for r in conn.cursor(_VERIFY_LEGACY, prefetch=prefetch):
            stored = bytes(r["hash"])
            if problem is None:
                problem = self._legacy_entry(r, expected, prev)
                if problem is None:
                    prev, expected = stored, expected + 1
                else:
                    self.problems.append(Problem(
                        _label(_tenant_of(r["chain"])), r["seq"],
                        f"in the legacy entries (written before migration 011): {problem}"))
        head = None if stored is None else LegacyHead(expected - 1, stored)
        if problem is None and self.checkpoint is not None:
            cp = self.checkpoint.legacy
            if (cp is None) != (head is None) or (
                    cp is not None and head is not None
                    and (cp.count, cp.hash) != (head.count, head.hash)):
                self.problems.append(Problem(
                    "the legacy entries (written before migration 011)", None,
                    "not those of the checkpoint: they were rewritten"))
        return head

    @staticmethod
    def _legacy_entry(r: Mapping[str, Any], expected: int, prev: bytes) -> str | None:
        n: int = r["legacy_seq"]
        if n != expected:
            return (f"legacy entry {expected} is missing" if n == expected + 1
                    else f"legacy entries {expected} to {n - 1} are missing")
        if r["prev_hash"] is None or bytes(r["prev_hash"]) != prev:
            return f"legacy entry {n}: prev_hash is not the hash of the one before"
        try:
            digest = legacy_hash(prev, seq=n, at=r["at"], tenant=r["tenant_id"],
                                 actor=r["actor"], action=r["action"], target=r["target"],
                                 details=_details(r["details"]))
        except _BAD_ROW:
            return f"legacy entry {n}: hash mismatch: the entry cannot be read"
        if r["hash"] is None or bytes(r["hash"]) != digest:
            return f"legacy entry {n}: hash mismatch: the entry was changed"
        return None

    def _against_checkpoint(self, r: Mapping[str, Any]) -> str | None:
        cp = self.cp_heads.get(r["chain"])
        if cp is None or r["seq"] != cp.seq:
            return None
        if bytes(r["hash"]) != cp.hash:
            return ("not the entry of the checkpoint: the log was rewritten at or before "
                    "this entry")
        return None

    def _finish(self, chain: _Chain) -> None:
        cp = self.cp_heads.get(chain.name)
        if chain.broken or chain.head is None:
            return
        if cp is not None and chain.head.seq < cp.seq:
            self.problems.append(Problem(
                _label(_tenant_of(chain.name)), None,
                f"the newest entries are missing: the chain ends at entry {chain.head.seq}, "
                f"the checkpoint has entry {cp.seq}"))
            return
        self.heads.append(chain.head)


class _Chain:
    """The walk through one chain: what the next entry must be."""

    def __init__(self, name: str, anchor: bytes) -> None:
        self.name = name
        self.anchor = anchor
        self.expected = 1
        self.prev: bytes | None = None  # the last keyed MAC; None: no keyed entry yet
        self.head: ChainHead | None = None
        self.broken = False

    def check(self, keys: AuditKeys, r: Mapping[str, Any]) -> str | None:
        seq: int = r["seq"]
        if seq != self.expected:
            return (f"gap in seq: entry {self.expected} is missing" if seq == self.expected + 1
                    else f"gap in seq: entries {self.expected} to {seq - 1} are missing")
        if r["legacy_seq"] is not None:
            if self.prev is not None:
                return "a legacy entry after keyed ones: entries were moved"
        else:
            want = self.anchor if self.prev is None else self.prev
            if r["prev_hash"] is None or bytes(r["prev_hash"]) != want:
                what = (f"the MAC of entry {seq - 1}" if self.prev is not None
                        else "the hash of the last legacy entry (the legacy entries were "
                             "rewritten, or this entry was)" if self.anchor != GENESIS
                        else "the genesis (zero) hash")
                return f"prev_hash mismatch: it is not {what}"
            try:
                mac = entry_mac(keys, want, seq=seq, at=r["at"], tenant=r["tenant_id"],
                                actor=r["actor"], action=r["action"], target=r["target"],
                                details=_details(r["details"]))
            except _BAD_ROW:
                return "MAC mismatch: the entry cannot be read"
            if r["hash"] is None or not hmac.compare_digest(bytes(r["hash"]), mac):
                return ("MAC mismatch: the entry was changed, or not written with this "
                        "master key")
            self.prev = mac
        self.head = ChainHead(_tenant_of(self.name), seq, bytes(r["hash"]), r["at"])
        self.expected += 1
        return None
