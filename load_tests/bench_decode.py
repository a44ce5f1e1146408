"""Micro-benchmark of decode_telemetry (not collected by pytest).

Run: .venv/bin/python load_tests/bench_decode.py
Prints the median time per message over several timeit runs.
"""

from __future__ import annotations

import statistics
import time
import timeit
from datetime import UTC, datetime

import orjson

from agent_protocol import decode_telemetry, parse_topic

NOW = time.time_ns() // 1_000_000
TS = datetime.fromtimestamp((NOW - 5_000) / 1000, UTC).isoformat(timespec="milliseconds")
TS = TS.replace("+00:00", "Z")

LOCATION = orjson.dumps(
    {
        "v": 1,
        "id": "0192f1c2-7d3e-7a4b-9c1d-2e3f4a5b6c7d",
        "ts": NOW - 5_000,
        "data": {
            "lat": 52.373102,
            "lon": 4.892254,
            "accuracy_m": 12.5,
            "altitude_m": 3.2,
            "speed_mps": 1.4,
            "heading_deg": 271.0,
            "source": "fused",
        },
    }
)
LOCATION_RFC3339 = orjson.dumps({**orjson.loads(LOCATION), "ts": TS})
IDENTITY = orjson.dumps(
    {
        "v": 1,
        "id": "0192f1c2-7d3e-7a4b-9c1d-2e3f4a5b6c7e",
        "ts": TS,
        "data": {
            "imei": "356938035643809",
            "serial": "R58M123ABC",
            "wifi_mac": "02:00:00:00:00:00",
            "bluetooth_mac": "AA:BB:CC:DD:EE:FF",
            "phone_number": "+31612345678",
            "device_name": "Pixel van Jan",
            "user_name": "jan",
            "user_email": "jan@example.org",
            "first_name": "Jan",
            "last_name": "de Vries",
            "model": "Pixel 8",
            "os": "android",
            "os_version": "15",
        },
    }
)
BATCH = orjson.dumps(
    {"v": 1, "records": [{**orjson.loads(LOCATION), "id": f"r{i}"} for i in range(100)]}
)

CASES = [
    ("location, epoch-ms ts", "mdm/v1/acme/devices/dev-1/telemetry/location", LOCATION, 1),
    ("location, RFC 3339 ts", "mdm/v1/acme/devices/dev-1/telemetry/location", LOCATION_RFC3339, 1),
    ("identity, 13 fields", "mdm/v1/acme/devices/dev-1/telemetry/identity", IDENTITY, 1),
    ("location batch of 100", "mdm/v1/acme/devices/dev-1/telemetry/location", BATCH, 100),
]


def main() -> None:
    now = time.time_ns() // 1_000_000
    for name, topic_name, payload, n_records in CASES:
        number = 20_000 // n_records

        def run(topic_name: str = topic_name, payload: bytes = payload) -> None:
            decode_telemetry(parse_topic(topic_name), payload, now_ms=now)

        run()  # fail fast if the payload is invalid
        runs = timeit.repeat(run, number=number, repeat=7)
        per_msg = statistics.median(runs) / number * 1e6
        print(
            f"{name:24s} {len(payload):6d} B  {per_msg:8.2f} µs/message"
            f"  {per_msg / n_records:6.2f} µs/record"
        )


if __name__ == "__main__":
    main()
