"""Remove from Mosquitto's persistence file what the project's config no longer admits.

    python3 mdm_server/broker/purge.py DATA_DIR/mosquitto.db
    python -m mdm_server.broker.purge DATA_DIR/mosquitto.db

The project's broker refuses retained messages (``retain_available false``) and
QoS 2 (``max_qos 1``) (deploy/mosquitto/mosquitto.conf). But Mosquitto 2.0 still
loads what an earlier config saved in ``mosquitto.db`` and saves it again at every
autosave:

- retained messages: handed to every new subscriber, and nobody can clear them any
  more, since clearing one takes a retained publish;
- incoming QoS 2 messages, held in the *sender's* session until the sender's
  PUBREL: a device with a persistent session that never sends it keeps its
  payload there until the session expires.

Either way a device's raw payload (an IMEI, a location) would stay on the broker's
disk. So ``scripts/broker`` and docker-compose's ``broker-init`` run this while the
broker is stopped:

- the file is read chunk by chunk (Mosquitto's format 5 or 6: 1.6 and 2.0); every
  retained-message chunk and every incoming client message is dropped, and so is
  each stored message (its topic and payload) that nothing else refers to;
- everything else -- persistent sessions, their subscriptions, the messages queued
  or in flight *to* them (a message queued for the server's session that was also
  retained stays queued), chunks of a type Mosquitto ignores as unknown -- is
  copied byte for byte;
- the new file is written next to the old one, fsynced, given the old one's owner
  and mode, and renamed over it; a file with nothing to remove is left untouched.
  A ``mosquitto.db.new`` left by a save that crashed (Mosquitto never reads it) is
  deleted.

A device whose incoming QoS 2 message was dropped gets a PUBCOMP for its PUBREL as
usual (Mosquitto answers a PUBREL it has no message for); the message is lost, as
the config would refuse it today. A file that cannot be parsed (bad magic, another
format version, truncated) stops the start (exit 1): it may hold payloads that
cannot be found in it. Move it away (the messages queued in it are then lost) or
restore a backup. Nothing of the file's content is ever printed. What the rename
cannot remove: the old file's blocks stay in the filesystem's free space until
reused (as after every save Mosquitto makes).

Standard library only: ``scripts/broker`` runs this file with the system Python.
Run it while the broker is stopped: a running broker overwrites the file at its
next save.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["MAGIC", "Purged", "StoreFormatError", "main", "purge", "purge_file"]

# The file: 15 bytes of magic, a 4-byte CRC (unused, zero), the format version
# (big-endian), then chunks of {type, length} (big-endian uint32 each) followed by
# ``length`` bytes of body (src/persist.h of Mosquitto 2.0).
MAGIC = b"\x00\xb5\x00mosquitto db"
_HEADER = len(MAGIC) + 4 + 4
_VERSIONS = (5, 6)  # Mosquitto 1.6 wrote 5, 2.0 writes 6: these chunks read alike
CHUNK_CFG, CHUNK_MSG_STORE, CHUNK_CLIENT_MSG, CHUNK_RETAIN, CHUNK_SUB, CHUNK_CLIENT = range(1, 7)
# The bodies of these chunks begin with the stored message's id (8 bytes).
_WITH_STORE_ID = frozenset((CHUNK_MSG_STORE, CHUNK_CLIENT_MSG, CHUNK_RETAIN))
_STORE_ID = 8
# A client message's body: store id (8), mid (2), client id length (2), qos, state,
# retain/dup, direction (1 byte each), then the client id and properties.
_CLIENT_MSG_DIRECTION = 15
_DIRECTION_IN = 0  # enum mosquitto_msg_direction: mosq_md_in = 0, mosq_md_out = 1


class StoreFormatError(ValueError):
    """Not a Mosquitto persistence file this module can read (the message names the
    problem, never the content)."""


class Purged(NamedTuple):
    retained: int  # retained-message entries removed
    incoming: int  # incoming (QoS 2, awaiting the sender's PUBREL) messages removed

    def __bool__(self) -> bool:
        return bool(self.retained or self.incoming)


def _chunks(data: bytes) -> list[tuple[int, int, int]]:
    """(type, start, end) of every chunk, its header included."""
    if len(data) < _HEADER or not data.startswith(MAGIC):
        raise StoreFormatError("not a Mosquitto persistence file (bad magic)")
    (version,) = struct.unpack_from(">I", data, len(MAGIC) + 4)
    if version not in _VERSIONS:
        raise StoreFormatError(f"unsupported persistence format version {version}")
    out: list[tuple[int, int, int]] = []
    pos = _HEADER
    while pos < len(data):
        if pos + 8 > len(data):
            raise StoreFormatError(f"truncated chunk header at byte {pos}")
        kind, length = struct.unpack_from(">II", data, pos)
        end = pos + 8 + length
        if end > len(data):
            raise StoreFormatError(f"truncated chunk at byte {pos}")
        if kind in _WITH_STORE_ID and length < _STORE_ID:
            raise StoreFormatError(f"chunk too short at byte {pos}")
        if kind == CHUNK_CLIENT_MSG and length <= _CLIENT_MSG_DIRECTION:
            raise StoreFormatError(f"chunk too short at byte {pos}")
        out.append((kind, pos, end))
        pos = end
    return out


def purge(data: bytes) -> tuple[bytes, Purged]:
    """``data`` without retained and incoming messages, and what was removed.

    Returns ``data`` itself when there is nothing to remove. Raises
    :class:`StoreFormatError` when ``data`` is not a readable persistence file."""
    chunks = _chunks(data)

    def store_id(start: int) -> bytes:
        return data[start + 8:start + 8 + _STORE_ID]

    def incoming(start: int) -> bool:
        return data[start + 8 + _CLIENT_MSG_DIRECTION] == _DIRECTION_IN

    dropped = [(k, s) for k, s, _ in chunks
               if k == CHUNK_RETAIN or (k == CHUNK_CLIENT_MSG and incoming(s))]
    if not dropped:
        return data, Purged(0, 0)
    drop_starts = {s for _, s in dropped}
    kept_refs = {store_id(s) for k, s, _ in chunks
                 if k == CHUNK_CLIENT_MSG and s not in drop_starts}
    orphans = {store_id(s) for _, s in dropped} - kept_refs
    parts = [data[:_HEADER]]
    for kind, start, end in chunks:
        if start in drop_starts:
            continue
        if kind == CHUNK_MSG_STORE and store_id(start) in orphans:
            continue
        parts.append(data[start:end])
    return b"".join(parts), Purged(sum(k == CHUNK_RETAIN for k, _ in dropped),
                                   sum(k == CHUNK_CLIENT_MSG for k, _ in dropped))


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def purge_file(path: str) -> Purged:
    """Purge the persistence file at ``path`` in place (a missing or empty file
    holds nothing); return what was removed."""
    leftover = f"{path}.new"
    if os.path.lexists(leftover):
        os.unlink(leftover)
        _fsync_dir(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
            st = os.fstat(fh.fileno())
    except FileNotFoundError:
        return Purged(0, 0)
    if not data:
        return Purged(0, 0)
    new, removed = purge(data)
    if not removed:
        return removed
    tmp = f"{path}.purge"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(new)
            fh.flush()
            os.fsync(fh.fileno())
        if (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
            os.chown(tmp, st.st_uid, st.st_gid)  # broker-init runs as root
        os.chmod(tmp, st.st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path)
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="purge", description="Remove retained and incoming QoS 2 messages from "
        "Mosquitto's persistence file (run while the broker is stopped).")
    p.add_argument("file", help="the broker's persistence file (mosquitto.db)")
    args = p.parse_args(argv)
    try:
        removed = purge_file(args.file)
    except StoreFormatError as exc:
        print(f"purge: cannot read {args.file}: {exc}; it may hold device payloads: "
              "move it away (the messages queued in it are lost) or restore a backup",
              file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"purge: cannot rewrite {args.file} ({type(exc).__name__})", file=sys.stderr)
        return 1
    if removed:
        print(f"purge: removed {removed.retained} retained and {removed.incoming} incoming "
              f"message(s) from {args.file}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
