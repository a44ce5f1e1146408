"""The key ring: epoch secrets kept outside the database, so that an erasure does
not depend on PostgreSQL forgetting bytes.

PostgreSQL keeps what it deletes for a while: a deleted row stays in its heap
page until the space is reused (VACUUM does not zero it), and the WAL holds
every version written. A device's data key, deleted by an erasure, can therefore
be read back from a copy of the disk; so can the erased records. What makes them
useless is that the key was stored *wrapped*, and the wrapping key is destroyed
too, outside PostgreSQL:

- ``MDM_KEYRING_DIR`` holds one file per epoch, ``epoch-NNNNNN.key`` (32 random
  bytes, mode 0600, written to a temporary name, fsynced, renamed, directory
  fsynced), and ``keyring.id``, which names the database it belongs to.
- A device data key is wrapped (AES-256-GCM) under the KEK of an epoch:
  HKDF-SHA256 of the master key, with the epoch secret as salt and
  ``mdm device data keys v2/epoch N`` as info. Neither the database plus the
  master key, nor the key ring alone, opens anything. Epoch 0 is the scheme
  before migration 010 (master key only, no file); it exists only until the
  first compaction has re-wrapped its keys.
- ``keystore.epochs`` lists the epochs in use (the newest is current) with a
  fingerprint of each file, and ``keystore.keyring`` the key ring's id: a
  server pointed at the wrong directory says so instead of making keys nobody
  can open.
- :meth:`Keyring.compact` retires epochs: a new epoch is made, every device key
  is re-wrapped under it and the old epochs' rows are deleted in one
  transaction; only after the commit are the old files overwritten, fsynced and
  unlinked. Erasure runs it at once; ``serve`` catches up on its retention
  schedule when one did not finish (``shredded`` epochs, more than one epoch, or
  files of retired epochs left behind by a crash).

Re-wrapping changes neither a key's bytes nor its ``key_id``: the ingest's cache
and the sealed rows stay valid. Concurrency is settled by the database: every
key row references its epoch (foreign key), so a key made under an epoch being
retired either makes the retiring DELETE fail (compaction re-wraps again) or
fails itself (the ingest wraps it again under the current epoch). Compactions
are serialised by an advisory lock, which also guards making epoch files and
destroying leftover ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "CompactionReport",
    "Fresh",
    "Keyring",
    "KeyringError",
    "MasterKeyMismatch",
    "epoch_kek",
    "legacy_kek",
    "same_connection",
    "unwrap_key",
    "wrap_key",
]

if TYPE_CHECKING:
    from mdm_server.config import Config

log = logging.getLogger(__name__)

_SECRET_BYTES = 32
_NONCE = 12
_FILE = re.compile(r"^epoch-(\d{6})\.key$")
_ID_FILE = "keyring.id"
_TMP_PREFIX = ".tmp-"
# pg_advisory_lock key of compaction and of making/destroying epoch files ("mdmkeyrg").
_LOCK = 0x6D646D6B65797267
_V1_INFO = b"mdm device data keys v1"  # epoch 0: before the key ring (migration 008)
_V2_INFO = b"mdm device data keys v2/epoch "
_FP_LABEL = b"mdm key ring epoch fingerprint v1\x1f"
# Re-wrapping is CPU work on the event loop: let other tasks run this often.
_YIELD_EVERY = 2000

#: Opens a connection that sees the latest committed state (outside the caller's
#: snapshot): ``pool.acquire`` for a reader in a REPEATABLE READ transaction.
Fresh = Callable[[], AbstractAsyncContextManager[Any]]


class KeyringError(Exception):
    """The key ring is missing, incomplete or not this database's. The message
    names the directory and the file, never a secret; it says what to do."""


class MasterKeyMismatch(KeyringError):
    """A device data key does not unwrap under the KEK of its epoch: the master
    key is not the one it was wrapped under."""

    def __init__(self) -> None:
        super().__init__("a device data key does not unwrap: MDM_MASTER_KEY is not the key "
                         "it was stored under")


def legacy_kek(master_key: bytes) -> AESGCM:
    """Epoch 0: the KEK derived from the master key alone (before migration 010)."""
    _check_master(master_key)
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                       info=_V1_INFO).derive(master_key))


def epoch_kek(master_key: bytes, epoch: int, secret: bytes) -> AESGCM:
    """The KEK of ``epoch``: needs both the master key and the epoch's secret."""
    _check_master(master_key)
    if epoch == 0:
        return legacy_kek(master_key)
    if len(secret) != _SECRET_BYTES:
        raise ValueError("an epoch secret is 32 bytes")
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=secret,
                       info=_V2_INFO + str(epoch).encode()).derive(master_key))


def _check_master(master_key: bytes) -> None:
    if len(master_key) != 32:
        raise ValueError("the master key must be 32 bytes")


def _wrap_aad(tenant: str, device: str) -> bytes:
    return f"device-data-key\x1f{tenant}\x1f{device}".encode()


def wrap_key(kek: AESGCM, tenant: str, device: str, key: bytes) -> bytes:
    """A device data key wrapped for storage: nonce + AES-GCM(key), 60 bytes."""
    nonce = os.urandom(_NONCE)
    return nonce + kek.encrypt(nonce, key, _wrap_aad(tenant, device))


def unwrap_key(kek: AESGCM, tenant: str, device: str, wrapped: bytes) -> bytes:
    """The raw data key; raises :class:`cryptography.exceptions.InvalidTag` if
    ``kek`` is not the key it was wrapped under, or it is another device's."""
    return kek.decrypt(wrapped[:_NONCE], wrapped[_NONCE:], _wrap_aad(tenant, device))


def _unwrap_row(kek: AESGCM, r: asyncpg.Record) -> bytes:
    try:
        return unwrap_key(kek, r["tenant_id"], r["device_id"], r["wrapped"])
    except InvalidTag:
        raise MasterKeyMismatch from None


def fingerprint(secret: bytes, keyring_id: str, epoch: int) -> bytes:
    return hmac.new(secret, _FP_LABEL + f"{keyring_id}\x1f{epoch}".encode(),
                    hashlib.sha256).digest()[:16]


def _file_name(epoch: int) -> str:
    return f"epoch-{epoch:06d}.key"


@contextlib.asynccontextmanager
async def same_connection(conn: asyncpg.Connection) -> AsyncIterator[asyncpg.Connection]:
    """``conn`` itself as a :data:`Fresh`: right for a connection that is not in a
    REPEATABLE READ transaction (each statement sees the latest commits)."""
    yield conn


@dataclass(slots=True)
class CompactionReport:
    """What one compaction did (``mdm-server keys compact`` prints it)."""

    epoch: int | None = None  # the current epoch afterwards (None: nothing was due)
    epochs_retired: list[int] = field(default_factory=list)
    keys_rewrapped: int = 0
    files_destroyed: int = 0  # retired epochs' files, and leftovers of a crash
    attempts: int = 0  # re-wrap transactions (more than 1: a key was made meanwhile)

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "epochs_retired": self.epochs_retired,
                "keys_rewrapped": self.keys_rewrapped,
                "files_destroyed": self.files_destroyed}


class _Unavailable(Exception):
    """An epoch's file is not in the directory (retired a moment ago, or lost)."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"epoch {epoch}")
        self.epoch = epoch


class Keyring:
    """One process's view of the key ring: the directory, the master key, and
    the KEKs of the epochs it has used (cached; dropped once retired)."""

    def __init__(self, directory: Path | str, master_key: bytes) -> None:
        _check_master(master_key)
        self.directory = Path(directory)
        self._master = master_key
        self._keks: dict[int, AESGCM] = {}
        self._bound: str | None = None  # the key ring id, once checked

    @classmethod
    def from_config(cls, config: Config) -> Keyring:
        """MDM_KEYRING_DIR and the master key (ConfigError names the one missing)."""
        return cls(config.require_keyring_dir(), config.require_master_key())

    # --- binding: this directory belongs to this database --------------------------
    def _where(self) -> str:
        return f"MDM_KEYRING_DIR ({self.directory})"

    def _read_id(self) -> str | None:
        try:
            raw = (self.directory / _ID_FILE).read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            raise KeyringError(f"{self._where()} is not a directory") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyringError(f"{self._where()}/{_ID_FILE} cannot be read "
                               f"({type(exc).__name__})") from None
        return raw

    def _epoch_files(self) -> dict[int, Path]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise KeyringError(f"{self._where()} cannot be read ({type(exc).__name__})"
                               ) from None
        out = {}
        for name in names:
            m = _FILE.match(name)
            if m:
                out[int(m.group(1))] = self.directory / name
        return out

    async def _bind(self, conn: asyncpg.Connection) -> str:
        """Check (once per process) that the directory is this database's key
        ring; on a database that has none yet, make it. Returns its id."""
        if self._bound is not None:
            return self._bound
        db_id: str | None = await conn.fetchval("SELECT keyring_id FROM keystore.keyring")
        if db_id is None:
            if conn.is_in_transaction():
                raise KeyringError("this database has no key ring yet: start `mdm-server "
                                   "serve` (or `ingest`) once to make it")
            async with self._locked(conn):
                db_id = await conn.fetchval("SELECT keyring_id FROM keystore.keyring")
                if db_id is None:
                    db_id = await self._create_ring(conn)
        dir_id = self._read_id()
        if dir_id is None and self._pending_id() == db_id:
            self._install(_ID_FILE)  # made, but the process stopped before the rename
            dir_id = db_id
        if dir_id != db_id:
            if dir_id is None:
                raise KeyringError(
                    f"{self._where()} holds no key ring (no {_ID_FILE}), but this database's "
                    f"device keys are wrapped under key ring {db_id}: point MDM_KEYRING_DIR "
                    "at that directory (or restore it from its backup)")
            raise KeyringError(
                f"{self._where()} is key ring {dir_id}, which belongs to another database; "
                f"this database's is key ring {db_id}: point MDM_KEYRING_DIR at that one")
        self._bound = db_id
        return db_id

    async def _create_ring(self, conn: asyncpg.Connection) -> str:
        """A database without a key ring gets one (the directory must hold none)."""
        found = self._read_id()
        if found is not None:
            raise KeyringError(
                f"{self._where()} is key ring {found}, which belongs to another database "
                "(this one has none yet): give this database a directory of its own")
        if self._epoch_files():
            raise KeyringError(f"{self._where()} holds epoch files but no {_ID_FILE}: it is "
                               "not a key ring this server made; give this database an empty "
                               "directory")
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise KeyringError(f"{self._where()} cannot be created ({type(exc).__name__}): "
                               "its parent directory must exist and be writable") from None
        # Id file under its temporary name, the row committed, then the rename: a
        # crash in between leaves either nothing bound (the temporary file is
        # replaced next time) or a row whose id _bind finds in the temporary file.
        ring_id = secrets.token_hex(16)
        self._write_tmp(_ID_FILE, ring_id.encode() + b"\n")
        await conn.execute("INSERT INTO keystore.keyring (keyring_id) VALUES ($1)", ring_id)
        self._install(_ID_FILE)
        log.info("made key ring %s in %s", ring_id, self.directory)
        return ring_id

    def _pending_id(self) -> str | None:
        try:
            return (self.directory / f"{_TMP_PREFIX}{_ID_FILE}").read_text("ascii").strip()
        except (OSError, UnicodeDecodeError):
            return None

    def _warn_if_open(self) -> None:
        with contextlib.suppress(OSError):
            mode = self.directory.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning("%s is accessible to other users (mode %o): make it 0700",
                            self._where(), stat.S_IMODE(mode))

    # --- files ------------------------------------------------------------------------
    def _write_tmp(self, name: str, data: bytes) -> None:
        """``data`` durably in the temporary file of ``name`` (mode 0600, fsynced)."""
        tmp = self.directory / f"{_TMP_PREFIX}{name}"
        try:
            if tmp.exists():
                self._destroy_file(tmp)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise KeyringError(f"{self._where()}: cannot write {name} "
                               f"({type(exc).__name__})") from None

    def _install(self, name: str) -> None:
        """Rename the temporary file of ``name`` into place; fsync the directory."""
        try:
            os.replace(self.directory / f"{_TMP_PREFIX}{name}", self.directory / name)
            self._sync_dir()
        except OSError as exc:
            raise KeyringError(f"{self._where()}: cannot write {name} "
                               f"({type(exc).__name__})") from None

    def _sync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _destroy_file(self, path: Path) -> bool:
        """Overwrite with zeros, fsync, unlink, fsync the directory. False if it was
        not there. (The filesystem may still keep old blocks: see the docs.)"""
        try:
            fd = os.open(path, os.O_WRONLY)
        except FileNotFoundError:
            return False
        try:
            size = os.fstat(fd).st_size
            os.write(fd, b"\x00" * max(size, _SECRET_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink()
        self._sync_dir()
        return True

    def _read_secret(self, epoch: int) -> bytes:
        path = self.directory / _file_name(epoch)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise _Unavailable(epoch) from None
        except OSError as exc:
            raise KeyringError(f"{self._where()}: cannot read {path.name} "
                               f"({type(exc).__name__})") from None
        if len(data) != _SECRET_BYTES:
            raise KeyringError(f"{self._where()}: {path.name} is not an epoch key "
                               f"({len(data)} bytes, not {_SECRET_BYTES})")
        return data

    # --- epochs -----------------------------------------------------------------------
    async def _kek(self, conn: asyncpg.Connection, epoch: int) -> AESGCM:
        """The KEK of ``epoch`` as ``conn`` sees the epoch (its fingerprint checked
        against the file). Raises :class:`_Unavailable` when the epoch is not in
        the database as ``conn`` sees it, or its file is not in the directory."""
        kek = self._keks.get(epoch)
        if kek is not None:
            return kek
        if epoch == 0:
            kek = legacy_kek(self._master)
            self._keks[0] = kek
            return kek
        ring_id = await self._bind(conn)
        row = await conn.fetchrow("SELECT fingerprint FROM keystore.epochs WHERE epoch = $1",
                                  epoch)
        if row is None:
            raise _Unavailable(epoch)
        secret = self._read_secret(epoch)
        if not hmac.compare_digest(fingerprint(secret, ring_id, epoch), row["fingerprint"]):
            raise KeyringError(
                f"{self._where()}: {_file_name(epoch)} is not this database's epoch {epoch} "
                "(its fingerprint differs): the file was replaced, or comes from another "
                "key ring")
        kek = epoch_kek(self._master, epoch, secret)
        # A new epoch: forget the KEKs of epochs retired since (no need to keep
        # them in memory; a snapshot that still needs one reads its keys again).
        live = {r["epoch"] for r in await conn.fetch("SELECT epoch FROM keystore.epochs")}
        for old in [e for e in self._keks if e not in live]:
            del self._keks[old]
        self._keks[epoch] = kek
        return kek

    async def current(self, conn: asyncpg.Connection) -> tuple[int, AESGCM]:
        """The epoch new keys are wrapped under, and its KEK (made if there is none:
        a new database, or one from before the key ring)."""
        while True:
            epoch = await conn.fetchval("SELECT max(epoch) FROM keystore.epochs")
            if not epoch:  # none, or only the legacy epoch 0
                async with self._locked(conn):
                    if not await conn.fetchval("SELECT max(epoch) FROM keystore.epochs"):
                        await self._new_epoch(conn)
                continue
            try:
                return epoch, await self._kek(conn, epoch)
            except _Unavailable:
                if await conn.fetchval("SELECT max(epoch) FROM keystore.epochs") != epoch:
                    continue  # retired a moment ago: there is a newer one
                raise self._missing(epoch) from None

    def _missing(self, epoch: int) -> KeyringError:
        return KeyringError(
            f"{self._where()} has no {_file_name(epoch)}, which this database's device keys "
            f"are wrapped under: restore it (from the key ring's backup) or point "
            "MDM_KEYRING_DIR at the right directory")

    async def open(self, conn: asyncpg.Connection) -> int:
        """Check at start-up that the key ring is this database's and complete (each
        epoch in use has its file, with the right fingerprint); make the first
        epoch of a new database. Returns the current epoch. Raises
        :class:`KeyringError` with what is wrong."""
        await self._bind(conn)
        self._warn_if_open()
        epoch, _ = await self.current(conn)
        await self._check_complete(conn)
        return epoch

    async def _check_complete(self, conn: asyncpg.Connection) -> None:
        """Every epoch in use has its file, with this database's fingerprint."""
        for e in [r["epoch"] for r in await conn.fetch("SELECT epoch FROM keystore.epochs")]:
            try:
                await self._kek(conn, e)
            except _Unavailable:
                if await conn.fetchval("SELECT 1 FROM keystore.epochs WHERE epoch = $1", e):
                    raise self._missing(e) from None

    async def unwrap(self, conn: asyncpg.Connection, rows: Sequence[asyncpg.Record],
                     fresh: Fresh | None = None) -> dict[int, bytes]:
        """key_id -> raw data key for ``rows`` (key_id, tenant_id, device_id, epoch,
        wrapped) that ``conn`` read. A row wrapped under an epoch retired since it
        was read is read again by key_id through ``fresh`` (default: ``conn``
        itself, right unless it is in a REPEATABLE READ transaction); a key gone
        by then (erased) is left out. Raises :class:`KeyringError` when an epoch
        in use has no file, :class:`MasterKeyMismatch` when the master key is wrong."""
        out: dict[int, bytes] = {}
        again: list[int] = []
        for i, r in enumerate(rows):
            if i and i % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            try:
                kek = await self._kek(conn, r["epoch"])
            except _Unavailable:
                again.append(r["key_id"])
                continue
            out[r["key_id"]] = _unwrap_row(kek, r)
        if again and fresh is None and conn.is_in_transaction() and await conn.fetchval(
                "SELECT current_setting('transaction_isolation') <> 'read committed'"):
            raise KeyringError("device keys read in a snapshot taken before their epoch was "
                               "retired cannot be read again in it: pass fresh= (a bug)")
        for _ in range(5):
            if not again:
                return out
            async with (fresh or (lambda: same_connection(conn)))() as c:
                rows = await c.fetch(
                    "SELECT key_id, tenant_id, device_id, epoch, wrapped "
                    "FROM keystore.device_keys WHERE key_id = ANY($1::int8[])", again)
                again = []
                for r in rows:
                    try:
                        kek = await self._kek(c, r["epoch"])
                    except _Unavailable:
                        if await c.fetchval("SELECT 1 FROM keystore.epochs WHERE epoch = $1",
                                            r["epoch"]):
                            raise self._missing(r["epoch"]) from None
                        again.append(r["key_id"])
                        continue
                    out[r["key_id"]] = _unwrap_row(kek, r)
        if again:
            raise KeyringError("device keys kept moving to new epochs while being read: "
                               "compactions are running back to back")
        return out

    async def _new_epoch(self, conn: asyncpg.Connection) -> tuple[int, AESGCM]:
        """Make the next epoch: its file first (durably), then its row (committed).
        Call under the lock."""
        ring_id = await self._bind(conn)
        epoch = int(await conn.fetchval("SELECT coalesce(max(epoch), 0) + 1 "
                                        "FROM keystore.epochs"))
        secret = secrets.token_bytes(_SECRET_BYTES)
        # A file of this number with no row is left from a crash before its row was
        # committed: nothing was ever wrapped under it; it is replaced.
        self._write_tmp(_file_name(epoch), secret)
        self._install(_file_name(epoch))
        await conn.execute("INSERT INTO keystore.epochs (epoch, fingerprint) VALUES ($1, $2)",
                           epoch, fingerprint(secret, ring_id, epoch))
        kek = epoch_kek(self._master, epoch, secret)
        self._keks[epoch] = kek
        log.info("key ring epoch %d made", epoch)
        return epoch, kek

    @contextlib.asynccontextmanager
    async def _locked(self, conn: asyncpg.Connection) -> AsyncIterator[None]:
        """The key ring's lock (session-level, on ``conn``): one compaction at a
        time, and nobody makes an epoch file while leftovers are destroyed."""
        if conn.is_in_transaction():
            raise RuntimeError("the key ring's lock must be taken outside a transaction")
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK)
        try:
            yield
        finally:
            # A lost connection has released it already.
            with contextlib.suppress(asyncpg.InterfaceError, asyncpg.PostgresError, OSError):
                await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK)

    def _destroy_leftovers(self, live: set[int]) -> int:
        """Files of epochs the database no longer has (retired, but the process
        stopped before destroying them; or made, but their row never committed)
        and temporary files. Call under the lock, after :meth:`_bind`."""
        n = 0
        for epoch, path in sorted(self._epoch_files().items()):
            if epoch not in live and self._destroy_file(path):
                self._keks.pop(epoch, None)
                n += 1
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.directory):
                if name.startswith(_TMP_PREFIX) and self._destroy_file(self.directory / name):
                    n += 1
        return n

    async def due(self, conn: asyncpg.Connection) -> bool:
        """Is a compaction owed: a key destroyed under the current epoch, or more
        than one epoch in use (a legacy epoch 0, or a compaction that did not finish)?"""
        row = await conn.fetchrow(
            "SELECT count(*) AS n, coalesce(bool_or(shredded), false) AS shredded "
            "FROM keystore.epochs")
        return bool(row["n"] > 1 or row["shredded"])

    async def compact(self, conn: asyncpg.Connection, *, only_if_due: bool = False
                      ) -> CompactionReport:
        """Re-wrap every device key under a new epoch and retire all older epochs:
        their rows go in the re-wrap's transaction, their files (overwritten,
        fsynced, unlinked) after its commit. With ``only_if_due``, do it only if
        :meth:`due` (serve's catch-up); leftover files of retired epochs are
        destroyed either way. ``conn`` must not be in a transaction."""
        report = CompactionReport()
        await self._bind(conn)
        async with self._locked(conn):
            # Nothing is made or destroyed with a key ring that is not complete (the
            # wrong directory, a lost file): an epoch made there would be missing
            # from the right one.
            await self._check_complete(conn)
            live = {r["epoch"] for r in await conn.fetch("SELECT epoch FROM keystore.epochs")}
            report.files_destroyed += self._destroy_leftovers(live)
            if only_if_due and not await self.due(conn):
                return report
            new, new_kek = await self._new_epoch(conn)
            while True:
                report.attempts += 1
                try:
                    rewrapped, retired = await self._rewrap(conn, new, new_kek)
                except asyncpg.ForeignKeyViolationError:
                    # A key was made under a retiring epoch after the re-wrap read
                    # the keys (it committed first): once more, with it.
                    continue
                break
            report.epoch, report.keys_rewrapped = new, rewrapped
            report.epochs_retired = retired
            # Committed: nothing references the retired epochs any more.
            for epoch in retired:
                self._keks.pop(epoch, None)
                if epoch and self._destroy_file(self.directory / _file_name(epoch)):
                    report.files_destroyed += 1
        log.info("key ring compacted: epoch %d current, %d retired, %d key(s) re-wrapped "
                 "(%d attempt(s))", new, len(report.epochs_retired), report.keys_rewrapped,
                 report.attempts)
        return report

    # --- a new master key ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def locked_for_rotation(self, conn: asyncpg.Connection) -> AsyncIterator[None]:
        """The key ring's lock for :meth:`rewrap_under_master`, with the key ring
        checked complete first. ``conn`` must not be in a transaction."""
        await self._bind(conn)
        async with self._locked(conn):
            await self._check_complete(conn)
            yield

    async def rewrap_under_master(self, conn: asyncpg.Connection, new_master: bytes
                                  ) -> tuple[int, int, list[int]]:
        """Master-key rotation, inside the caller's transaction and under
        :meth:`locked_for_rotation`, with no server process running: a new epoch
        whose KEK derives from ``new_master`` (its file written now), every device
        key unwrapped with this key ring's (old) master key and wrapped under it,
        the older epochs' rows deleted. Returns (new epoch, keys re-wrapped, epochs
        retired); call :meth:`retire_files` with the last after the commit. If the
        transaction rolls back, the new epoch's file is a leftover the next
        compaction destroys."""
        _check_master(new_master)
        new, _ = await self._new_epoch(conn)
        self._keks.pop(new, None)  # derived from the old master key: not for use
        new_kek = epoch_kek(new_master, new, self._read_secret(new))
        rows = await conn.fetch("SELECT key_id, tenant_id, device_id, epoch, wrapped "
                                "FROM keystore.device_keys WHERE epoch <> $1", new)
        keys = await self.unwrap(conn, rows)
        ids = [r["key_id"] for r in rows]
        wrapped = [wrap_key(new_kek, r["tenant_id"], r["device_id"], keys[r["key_id"]])
                   for r in rows]
        await conn.execute(
            """UPDATE keystore.device_keys k SET wrapped = x.w, epoch = $1
               FROM unnest($2::int8[], $3::bytea[]) AS x(id, w)
               WHERE k.key_id = x.id""", new, ids, wrapped)
        retired = await conn.fetch(
            "DELETE FROM keystore.epochs WHERE epoch < $1 RETURNING epoch", new)
        return new, len(ids), sorted(r["epoch"] for r in retired)

    def retire_files(self, epochs: Sequence[int]) -> int:
        """After the commit of :meth:`rewrap_under_master`: the retired epochs'
        files destroyed (overwritten, fsynced, unlinked); how many."""
        n = 0
        for epoch in epochs:
            self._keks.pop(epoch, None)
            if epoch and self._destroy_file(self.directory / _file_name(epoch)):
                n += 1
        return n

    async def _rewrap(self, conn: asyncpg.Connection, new: int, new_kek: AESGCM
                      ) -> tuple[int, list[int]]:
        """One transaction: every key not under ``new`` re-wrapped under it, the
        older epochs' rows deleted. Raises ForeignKeyViolationError (rolled back)
        when a key made under an older epoch committed after the keys were read.
        Row locks: the UPDATE takes FOR NO KEY UPDATE, which ingest writes' FOR KEY
        SHARE does not wait for; an erasure's DELETE of a key waits for this commit
        (or this UPDATE for the erasure's, and then skips the deleted row)."""
        async with conn.transaction():
            rows = await conn.fetch(
                "SELECT key_id, tenant_id, device_id, epoch, wrapped "
                "FROM keystore.device_keys WHERE epoch <> $1", new)
            keys = await self.unwrap(conn, rows)
            ids, wrapped = [], []
            for i, r in enumerate(rows):
                if i and i % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                raw = keys.get(r["key_id"])
                if raw is not None:
                    ids.append(r["key_id"])
                    wrapped.append(wrap_key(new_kek, r["tenant_id"], r["device_id"], raw))
            await conn.execute(
                """UPDATE keystore.device_keys k SET wrapped = x.w, epoch = $1
                   FROM unnest($2::int8[], $3::bytea[]) AS x(id, w)
                   WHERE k.key_id = x.id""", new, ids, wrapped)
            retired = await conn.fetch(
                "DELETE FROM keystore.epochs WHERE epoch < $1 RETURNING epoch", new)
        return len(ids), sorted(r["epoch"] for r in retired)

