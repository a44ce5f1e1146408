"""Deterministic telemetry payloads for tests, built with the protocol's own encoder."""

from __future__ import annotations

import time

from agent_protocol import Record, encode_telemetry, telemetry_topic


def location(tenant: str, device: str, n: int, *, ts_ms: int | None = None
             ) -> tuple[str, bytes]:
    ts = ts_ms if ts_ms is not None else int(time.time() * 1000)
    rec = Record(id=f"{device}-{n}", ts_ms=ts,
                 data={"lat": 52.0 + (n % 1000) / 10000, "lon": 4.3, "accuracy_m": 5.0,
                       "source": "gps"})
    return (telemetry_topic(tenant, device, "location"),
            encode_telemetry([rec], device=device, kind="location"))
