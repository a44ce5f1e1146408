"""Ed25519 signing and verification of commands.

The signature covers the canonical JSON (:func:`canonical_json`) of every wire field
except ``sig``. The verifier checks the received object as received (all of its
fields, including ones it does not know), so fields added later are signed too.

Verification order: decode, key known, signature, addressed to this device, not
expired, nonce not seen before (then the nonce is remembered until the command
expires).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import heapq
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent_protocol.commands import (
    Command,
    canonical_json,
    command_signing_fields,
    decode_command_object,
)
from agent_protocol.errors import Reason, RemoteProtocolError

__all__ = [
    "CommandRejected",
    "NonceStore",
    "sign_command",
    "verify_command",
]


class CommandRejected(RemoteProtocolError):
    """A well-formed command the agent must refuse.

    ``reason`` is one of ``bad_signature``, ``unknown_key``, ``not_for_this_device``,
    ``expired``, ``replayed_nonce``.
    """


class NonceStore:
    """Nonces of accepted commands, each kept until its command's expiry has passed.

    Pure: the caller supplies "now". Expired commands are refused before the nonce
    check, so forgetting a nonce after its command expired never allows a replay.
    """

    __slots__ = ("_expiry", "_heap")

    def __init__(self) -> None:
        self._expiry: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, nonce: object) -> bool:
        return nonce in self._expiry

    def prune(self, now_ms: int) -> None:
        """Forget nonces whose command expired at or before ``now_ms``."""
        heap = self._heap
        while heap and heap[0][0] <= now_ms:
            expires, nonce = heapq.heappop(heap)
            if self._expiry.get(nonce) == expires:
                del self._expiry[nonce]

    def seen(self, nonce: str, now_ms: int) -> bool:
        """True if ``nonce`` belongs to an accepted command not yet expired."""
        self.prune(now_ms)
        return nonce in self._expiry

    def items(self) -> list[tuple[str, int]]:
        """(nonce, expires_at_ms) of every nonce remembered, for persisting them."""
        return sorted(self._expiry.items(), key=lambda kv: (kv[1], kv[0]))

    def add(self, nonce: str, expires_at_ms: int, now_ms: int) -> None:
        """Remember ``nonce`` until ``expires_at_ms``."""
        self.prune(now_ms)
        if expires_at_ms <= now_ms:
            return
        if self._expiry.get(nonce, -1) < expires_at_ms:
            self._expiry[nonce] = expires_at_ms
            heapq.heappush(self._heap, (expires_at_ms, nonce))


def _b64(sig: bytes) -> str:
    return base64.b64encode(sig).decode("ascii")


def sign_command(unsigned: Command, private_key: Ed25519PrivateKey) -> Command:
    """Return ``unsigned`` with ``sig`` set (any existing sig is replaced)."""
    message = canonical_json(command_signing_fields(unsigned))
    return dataclasses.replace(unsigned, sig=_b64(private_key.sign(message)))


def _reject(reason: str, detail: str, path: str | None = None) -> CommandRejected:
    return CommandRejected(reason, detail, path)


def verify_command(
    payload: bytes,
    *,
    keys: Mapping[str, Ed25519PublicKey],
    tenant: str,
    device: str,
    now_ms: int,
    seen_nonces: NonceStore,
) -> Command:
    """Decode and verify a command received by the agent ``tenant``/``device``.

    Raises :class:`RemoteProtocolError` for malformed input and
    :class:`CommandRejected` for a well-formed command that must be refused. On
    success the nonce is recorded in ``seen_nonces``.
    """
    cmd, obj = decode_command_object(payload)
    key = keys.get(cmd.key_id)
    if key is None:
        raise _reject(Reason.UNKNOWN_KEY, "key_id is not a key this agent trusts", "key_id")
    signed = {k: v for k, v in obj.items() if k != "sig"}
    try:
        key.verify(base64.b64decode(cmd.sig, validate=True), canonical_json(signed))
        valid = True
    except (InvalidSignature, binascii.Error, ValueError):
        valid = False
    if not valid:
        raise _reject(Reason.BAD_SIGNATURE, "signature does not verify", "sig")
    if cmd.tenant != tenant or cmd.device != device:
        raise _reject(Reason.NOT_FOR_THIS_DEVICE, "command is addressed to another device")
    if now_ms >= cmd.expires_at_ms:
        raise _reject(Reason.EXPIRED, "command has expired", "expires_at")
    if seen_nonces.seen(cmd.nonce, now_ms):
        raise _reject(Reason.REPLAYED_NONCE, "nonce was already used", "nonce")
    seen_nonces.add(cmd.nonce, cmd.expires_at_ms, now_ms)
    return cmd
