"""The command-signing key: created once, stored only encrypted, usable only with
the master key it was stored under."""

from __future__ import annotations

import asyncio
import base64
import subprocess

import pytest
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from mdm_server.commands.keys import SigningKeyError, public_keys, signing_key
from mdm_server.storage.devices import EnrollmentError, enroll_device
from mdm_server.storage.pool import connect
from mdm_server.storage.tenants import ensure_tenant

pytestmark = pytest.mark.integration

MASTER = bytes(range(32))
OTHER = bytes(range(1, 33))


async def _fresh(database: str) -> None:
    conn = await connect(database)
    try:
        await conn.execute("DELETE FROM signing_keys")  # create_database seeds one
    finally:
        await conn.close()


async def _first_use_by_many(database: str) -> list[tuple[str, bytes]]:
    conns = [await connect(database) for _ in range(6)]
    try:
        got = await asyncio.gather(*(signing_key(c, MASTER) for c in conns))
    finally:
        for c in conns:
            await c.close()
    return [(kid, k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))
            for kid, k in got]


def test_created_once_stored_encrypted_and_decrypts_only_with_its_master_key(
        database: str) -> None:
    asyncio.run(_fresh(database))
    got = asyncio.run(_first_use_by_many(database))
    assert len(set(got)) == 1  # six concurrent first uses, one key
    key_id, raw = got[0]

    dump = subprocess.run(["pg_dump", "--data-only", database], capture_output=True,
                          check=True).stdout
    assert key_id.encode() in dump
    for spelling in (raw, raw.hex().encode(), base64.b64encode(raw)):
        assert spelling not in dump

    async def check() -> None:
        conn = await connect(database)
        try:
            again_id, again = await signing_key(conn, MASTER)
            assert again_id == key_id
            assert again.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()) == raw
            with pytest.raises(SigningKeyError, match="MDM_MASTER_KEY"):
                await signing_key(conn, OTHER)
            with pytest.raises(SigningKeyError, match="MDM_MASTER_KEY"):
                await signing_key(conn, None)
            public = again.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            assert await public_keys(conn) == {key_id: base64.b64encode(public).decode()}
            # The ciphertext is bound to its key id: moved to another id, it is refused.
            await conn.execute("UPDATE signing_keys SET key_id = 'moved'")
            with pytest.raises(SigningKeyError):
                await signing_key(conn, MASTER)
            # A retired key signs nothing new and is no longer handed to agents.
            await conn.execute("UPDATE signing_keys SET retired_at = now()")
            assert await public_keys(conn) == {}
            new_id, _ = await signing_key(conn, MASTER)
            assert new_id not in ("moved", key_id)
            assert list(await public_keys(conn)) == [new_id]
        finally:
            await conn.close()

    asyncio.run(check())


def test_enrollment_hands_out_the_public_keys_and_needs_the_master_key_for_the_first(
        database: str) -> None:
    asyncio.run(_fresh(database))

    async def run() -> None:
        conn = await connect(database)
        try:
            await ensure_tenant(conn, "acme")
            with pytest.raises(EnrollmentError, match="MDM_MASTER_KEY"):
                await enroll_device(conn, tenant="acme", device="d1", ownership="corporate",
                                    user_email=None, mqtt_url="mqtt://127.0.0.1:1883",
                                    master_key=None)
            assert await conn.fetchval("SELECT count(*) FROM devices") == 0
            first = await enroll_device(conn, tenant="acme", device="d1",
                                        ownership="corporate", user_email=None,
                                        mqtt_url="mqtt://127.0.0.1:1883", master_key=MASTER)
            assert first["server_keys"] == await public_keys(conn)
            assert len(first["server_keys"]) == 1
            # Once a key exists, enrolling still needs the master key: the device's
            # MQTT password is derived from it (mdm_server/broker/credentials.py).
            with pytest.raises(EnrollmentError, match="MQTT passwords"):
                await enroll_device(conn, tenant="acme", device="d2", ownership="corporate",
                                    user_email=None, mqtt_url="mqtt://127.0.0.1:1883",
                                    master_key=None)
            second = await enroll_device(conn, tenant="acme", device="d2",
                                         ownership="corporate", user_email=None,
                                         mqtt_url="mqtt://127.0.0.1:1883", master_key=MASTER)
            assert second["server_keys"] == first["server_keys"]
        finally:
            await conn.close()

    asyncio.run(run())
