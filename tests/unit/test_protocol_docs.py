"""The examples in docs/protocol.md decode with the implementation (the doc stays true)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

import agent_protocol
from agent_protocol import (
    KINDS,
    CommandHandler,
    NonceStore,
    Outcome,
    decode_ack,
    decode_telemetry,
    parse_topic,
    verify_command,
)

NOW = 1_795_521_600_000  # 2026-11-24T12:00:00Z
DOC = Path(agent_protocol.__file__).resolve().parents[1] / "docs" / "protocol.md"
EXAMPLE = re.compile(r"<!-- example: (\S+) -->\n```json\n(.*?)```", re.S)
DOC_PUBLIC_KEY = "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="


def examples() -> list[tuple[str, bytes]]:
    return [(m[1], m[2].encode()) for m in EXAMPLE.finditer(DOC.read_text("utf-8"))]


def test_one_example_per_kind() -> None:
    kinds = {t.rsplit("/", 1)[1] for t, _ in examples() if "/telemetry/" in t}
    assert kinds == set(KINDS)
    assert {t for t, _ in examples()} >= {"command", "ack", "command:remote_view",
                                          "ack:consent_refused"}


@pytest.mark.parametrize(("target", "payload"), examples())
def test_example_decodes(target: str, payload: bytes) -> None:
    what, _, variant = target.partition(":")
    if what == "ack":
        ack = decode_ack(payload, now_ms=NOW)
        assert ack.state == (variant or "completed")
        if variant == "consent_refused":
            assert ack.detail in agent_protocol.CONSENT_REFUSALS
    elif what == "command":
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(DOC_PUBLIC_KEY))
        cmd = verify_command(
            payload,
            keys={"server-2026": key},
            tenant="acme",
            device="dev-1",
            now_ms=1_795_512_600_000 + 1000,
            seen_nonces=NonceStore(),
        )
        assert cmd.type == (variant or "wipe")
        if variant == "remote_view":
            assert cmd.params["mode"] in agent_protocol.REMOTE_VIEW_MODES
            assert cmd.notice is not None
            # The agent asks, and does nothing else yet.
            handler = CommandHandler("acme", "dev-1", {"server-2026": key})
            result = handler.handle(payload, 1_795_512_600_000 + 1000)
            assert result.outcome is Outcome.CONSENT_NEEDED and result.action is None
        else:
            assert cmd.params == {"scope": "managed"}
    else:
        records = decode_telemetry(parse_topic(target), payload, now_ms=NOW)
        assert records and all(r.data for r in records)
