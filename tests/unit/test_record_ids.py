"""Record ids as stored: keyed digests (mdm_server/ingest/record_ids.py)."""

from __future__ import annotations

import hashlib
import hmac

from agent_protocol import parse_topic
from mdm_server.ingest.batch import TopicGroup
from mdm_server.ingest.record_ids import (
    RecordIds,
    digest_groups,
    record_id_digest,
    record_id_key,
)

MASTER = b"m" * 32


def test_digest_is_keyed_per_tenant_and_device_and_stable() -> None:
    d = record_id_digest(MASTER, "acme", "phone", "carol@acme.example")
    assert len(d) == 32 and int(d, 16) >= 0
    assert "carol" not in d
    assert d == record_id_digest(MASTER, "acme", "phone", "carol@acme.example")
    # Other device, tenant, id or master key: another digest.
    assert d != record_id_digest(MASTER, "acme", "tablet", "carol@acme.example")
    assert d != record_id_digest(MASTER, "other", "phone", "carol@acme.example")
    assert d != record_id_digest(MASTER, "acme", "phone", "carol@acme.exampl")
    assert d != record_id_digest(b"n" * 32, "acme", "phone", "carol@acme.example")
    # The construction the docs state.
    key = hmac.new(MASTER, b"record-id-key:acme", hashlib.sha256).digest()
    assert record_id_key(MASTER, "acme") == key
    assert d == hashlib.blake2s(b"phone\x00carol@acme.example", key=key,
                                digest_size=16).hexdigest()


def test_groups_get_digests_in_place() -> None:
    g = TopicGroup(parse_topic("mdm/v1/acme/devices/phone/telemetry/location"),
                   msgs=[0, 1], ids=["a", "b"], ts=[1, 2], datas=[{}, {}])
    digest_groups([g], RecordIds(MASTER))
    assert g.ids == [record_id_digest(MASTER, "acme", "phone", x) for x in ("a", "b")]
