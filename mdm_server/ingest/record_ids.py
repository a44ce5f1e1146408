"""Record ids as stored: a keyed digest, never the id the agent chose.

An agent picks its records' ids (docs/protocol.md), and some pick ids that are
personal data (``carol@acme.example+31612345678`` was seen in a data-only
pg_dump). The id is needed only to absorb a redelivery: the same message must
not be stored twice. A keyed digest does that as well as the id itself, so the
id is replaced, before anything is stored, by

    BLAKE2s-128(key = HMAC-SHA256(master key, "record-id-key:" + tenant),
                data = device + NUL + id), as 32 lowercase hex digits.

The same id from the same device always gives the same digest (deduplication
works, a resend is stored once); the same id from two devices gives two digests
(no link between devices); without the master key nobody can compute a digest,
so a copy of the database cannot be searched for a guessed id. Device ids never
hold NUL, so the input is unambiguous.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable

from mdm_server.ingest.batch import TopicGroup

__all__ = ["RecordIds", "digest_groups", "record_id_digest", "record_id_key"]

DIGEST_BYTES = 16
_CACHE_MAX = 200_000  # devices whose digest state is kept; past it, start over

Digester = Callable[[str], str]


def record_id_key(master_key: bytes, tenant: str) -> bytes:
    """The tenant's key for record-id digests (32 bytes)."""
    return hmac.new(master_key, b"record-id-key:" + tenant.encode(), hashlib.sha256).digest()


def record_id_digest(master_key: bytes, tenant: str, device: str, record_id: str) -> str:
    """One record id as stored (tests and tools; the ingest uses :class:`RecordIds`)."""
    return RecordIds(master_key).digester(tenant, device)(record_id)


class RecordIds:
    """Digests record ids per device, with the keyed state made once per device."""

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != 32:
            raise ValueError("the master key must be 32 bytes")
        self._master = master_key
        self._tenant_keys: dict[str, bytes] = {}
        self._devices: dict[tuple[str, str], Digester] = {}

    def digester(self, tenant: str, device: str) -> Digester:
        """``record id -> stored id`` for one device."""
        found = self._devices.get((tenant, device))
        if found is not None:
            return found
        key = self._tenant_keys.get(tenant)
        if key is None:
            key = self._tenant_keys[tenant] = record_id_key(self._master, tenant)
        base = hashlib.blake2s(key=key, digest_size=DIGEST_BYTES)
        base.update(device.encode() + b"\x00")
        copy = base.copy

        def digest(record_id: str) -> str:
            h = copy()
            h.update(record_id.encode("utf-8", "surrogatepass"))
            return h.hexdigest()

        if len(self._devices) >= _CACHE_MAX:
            self._devices.clear()
        self._devices[(tenant, device)] = digest
        return digest


def digest_groups(groups: Iterable[TopicGroup], ids: RecordIds) -> None:
    """Replace, in place, the record ids of each topic group by their digests."""
    for g in groups:
        g.ids = list(map(ids.digester(g.topic.tenant, g.topic.device), g.ids))
