"""mdm_server/broker/purge.py on hand-built persistence files (no broker needed).

The files are built here from the layout of Mosquitto 2.0's src/persist.h;
tests/integration/test_broker_disk.py runs the purge on files a real Mosquitto
wrote. Here: which chunks go and which stay, byte for byte; files that are not
rewritten; files that cannot be read stop the start without printing content.
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mdm_server.broker import purge

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "mdm_server" / "broker" / "purge.py"

IN, OUT = 0, 1


def _chunk(kind: int, body: bytes) -> bytes:
    return struct.pack(">II", kind, len(body)) + body


def _sid(n: int) -> bytes:
    return struct.pack("<Q", n)


def cfg() -> bytes:
    return _chunk(purge.CHUNK_CFG, struct.pack("<Q", 99) + b"\x01\x08" + b"\x00" * 6)


def msg_store(n: int, topic: bytes, payload: bytes, *, retain: bool = False) -> bytes:
    fixed = (_sid(n) + struct.pack("<q", 0) + struct.pack(">IHHHHH", len(payload), n, 0, 0,
                                                           len(topic), 1883)
             + bytes([1, int(retain)]))
    return _chunk(purge.CHUNK_MSG_STORE, fixed + topic + payload)


def client_msg(n: int, client: bytes, direction: int) -> bytes:
    fixed = _sid(n) + struct.pack(">HH", n, len(client)) + bytes([1, 3, 0, direction])
    return _chunk(purge.CHUNK_CLIENT_MSG, fixed + client)


def retain(n: int) -> bytes:
    return _chunk(purge.CHUNK_RETAIN, _sid(n))


def client(name: bytes) -> bytes:
    return _chunk(purge.CHUNK_CLIENT, struct.pack(">qIHHHH", 0, 0, 1, len(name), 1883, 0)
                  + name)


def sub(name: bytes, topic: bytes) -> bytes:
    return _chunk(purge.CHUNK_SUB, struct.pack(">IHHBB", 0, len(name), len(topic), 1, 0)
                  + name + topic)


def dbfile(*chunks: bytes, version: int = 6) -> bytes:
    return purge.MAGIC + b"\x00" * 4 + struct.pack(">I", version) + cfg() + b"".join(chunks)


SERVER, DEVICE = b"mdm-ingest-0", b"acme.d1"
T = b"mdm/v1/acme/devices/d1/status"


def test_retained_and_incoming_messages_go_and_the_servers_queue_stays() -> None:
    keep = [
        client(SERVER), sub(SERVER, b"mdm/v1/+/devices/+/#"), client(DEVICE),
        msg_store(2, T, b"queued-and-retained"), client_msg(2, SERVER, OUT),
        msg_store(4, T, b"queued-only"), client_msg(4, SERVER, OUT),
        msg_store(5, T, b"queued-and-held"), client_msg(5, SERVER, OUT),
        _chunk(42, b"a chunk type Mosquitto ignores"),
    ]
    drop = [
        msg_store(1, T, b"retained-only", retain=True), retain(1),
        retain(2),
        msg_store(3, T, b"held-qos2"), client_msg(3, DEVICE, IN),
        client_msg(5, DEVICE, IN),
    ]
    data = dbfile(*keep[:3], drop[0], keep[3], keep[4], drop[1], drop[2], *keep[5:7],
                  *drop[3:5], *keep[7:9], drop[5], keep[9])

    new, removed = purge.purge(data)

    assert removed == purge.Purged(retained=2, incoming=2)
    assert new == dbfile(*keep)  # the rest byte for byte, in order
    for gone in (b"retained-only", b"held-qos2"):
        assert gone not in new
    assert purge.purge(new) == (new, purge.Purged(0, 0))


def test_a_file_with_nothing_to_remove_is_returned_as_it_is() -> None:
    data = dbfile(client(SERVER), msg_store(1, T, b"x"), client_msg(1, SERVER, OUT))
    new, removed = purge.purge(data)
    assert new is data and not removed
    v5 = dbfile(msg_store(1, T, b"x"), retain(1), version=5)  # Mosquitto 1.6
    assert purge.purge(v5) == (dbfile(version=5), purge.Purged(1, 0))


@pytest.mark.parametrize("data, problem", [
    (b"not a database at all, longer than a header", "bad magic"),
    (purge.MAGIC, "bad magic"),
    (dbfile(version=4), "version 4"),
    (dbfile(retain(1))[:-3], "truncated chunk at"),
    (dbfile() + b"\x00\x00\x00", "truncated chunk header"),
    (dbfile(_chunk(purge.CHUNK_RETAIN, b"1234")), "too short"),
    (dbfile(_chunk(purge.CHUNK_CLIENT_MSG, _sid(1) + b"1234567")), "too short"),
])
def test_what_cannot_be_read_is_refused(data: bytes, problem: str) -> None:
    with pytest.raises(purge.StoreFormatError, match=problem):
        purge.purge(data)


def _run(path: Path) -> subprocess.CompletedProcess[str]:
    # As scripts/broker runs it: the file alone, with whatever Python 3 is there.
    return subprocess.run([sys.executable, str(SCRIPT), str(path)], capture_output=True,
                          text=True, timeout=30, check=False)


def test_the_file_is_replaced_keeping_its_mode_and_a_crashed_save_is_deleted(
        tmp_path: Path) -> None:
    path = tmp_path / "mosquitto.db"
    path.write_bytes(dbfile(msg_store(1, T, b"356938035643809"), retain(1)))
    path.chmod(0o640)
    (tmp_path / "mosquitto.db.new").write_bytes(b"356938035643809 half-written")

    out = _run(path)

    assert out.returncode == 0, out.stderr
    assert "removed 1 retained and 0 incoming" in out.stderr and out.stdout == ""
    assert path.read_bytes() == dbfile()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mosquitto.db"]


def test_a_file_with_nothing_to_remove_is_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "mosquitto.db"
    path.write_bytes(dbfile(client(SERVER)))
    before = path.stat()
    assert _run(path).returncode == 0
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert _run(tmp_path / "missing.db").returncode == 0  # a first start
    (tmp_path / "empty.db").write_bytes(b"")
    assert _run(tmp_path / "empty.db").returncode == 0


def test_an_unreadable_file_stops_the_start_and_its_content_is_not_printed(
        tmp_path: Path) -> None:
    path = tmp_path / "mosquitto.db"
    data = dbfile(msg_store(1, T, b"356938035643809"), retain(1))[:-2]
    path.write_bytes(data)
    out = _run(path)
    assert out.returncode == 1
    assert "truncated" in out.stderr and "move it away" in out.stderr
    assert "356938035643809" not in out.stderr + out.stdout
    assert path.read_bytes() == data  # left for the operator
    assert not (tmp_path / "mosquitto.db.purge").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_the_replaced_file_keeps_its_owner(tmp_path: Path) -> None:
    """broker-init runs as root on a file that the broker's own user must read."""
    path = tmp_path / "mosquitto.db"
    path.write_bytes(dbfile(msg_store(1, T, b"x"), retain(1)))
    os.chown(path, 1883, 1883)
    assert _run(path).returncode == 0
    assert (path.stat().st_uid, path.stat().st_gid) == (1883, 1883)
    assert path.read_bytes() == dbfile()
