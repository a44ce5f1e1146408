"""The fleet simulator against a private broker (project config) and a plain subscriber."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent_protocol import KINDS, decode_telemetry, parse_topic
from load_tests.fleet_data import luhn_valid, person_for
from load_tests.simulator import (
    Fleet,
    Stats,
    TokenBucket,
    enroll_fleet,
    provision_synthetic,
    synthetic_enrollments,
)
from mdm_server.config import MqttSettings
from tests.support.services import REPO, TEST_MASTER_KEY, Broker

pytestmark = pytest.mark.integration


class Subscriber:
    """A plain paho QoS 1 subscriber that keeps every (topic, payload) it receives;
    logged in as the server's user (the only one that may read every device)."""

    def __init__(self, broker: Broker, topic_filter: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{uuid.uuid4().hex[:8]}",
                        protocol=paho.MQTTv311)
        server = MqttSettings.from_url(broker.url)
        c.username_pw_set(server.username, server.password)
        c.on_message = self._on_message
        c.on_subscribe = lambda *a: self._subscribed.set()
        c.on_connect = lambda client, *a: client.subscribe(topic_filter, qos=1)
        c.connect("127.0.0.1", broker.port, keepalive=60)
        c.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("no SUBACK")
        self.client = c

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def wait_for(self, n: int, timeout: float = 60.0, settle: float = 0.5) -> int:
        """Wait until ``n`` messages arrived (then ``settle`` s more, to catch extras)."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(settle)
        return len(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def subscriber(broker: Broker, tenant: str) -> Iterator[Subscriber]:
    sub = Subscriber(broker, f"mdm/v1/{tenant}/devices/+/telemetry/+")
    try:
        yield sub
    finally:
        sub.close()


def unique_tenant() -> str:
    return f"sim{uuid.uuid4().hex[:10]}"


def synthetic(broker: Broker, tenant: str, n: int, **kwargs: Any) -> list[dict[str, Any]]:
    """Synthetic devices with broker clients of their own (no database), sent to the
    broker's TLS listener with its CA, as an enrollment sends them."""
    enrollments = synthetic_enrollments(tenant, n, broker.url, device_url=broker.device_url,
                                        ca_pem=broker.ca_pem, **kwargs)
    asyncio.run(provision_synthetic(broker.url, enrollments))
    return enrollments


def record_keys(messages: list[tuple[str, bytes]]) -> list[tuple[str, str, str]]:
    """(device, kind, record id) of every record of every message, decoded strictly."""
    now_ms = int(time.time() * 1000)
    keys = []
    for topic, payload in messages:
        t = parse_topic(topic)
        assert t.kind is not None
        for rec in decode_telemetry(t, payload, now_ms=now_ms):
            keys.append((t.device, t.kind, rec.id))
    return keys


def test_70k_messages_on_one_connection_all_arrive(broker: Broker) -> None:
    """More than 65,535 publishes on one connection while the broker stalls: the
    inflight bound holds the publisher at 1000 unacknowledged (paho's message ids are
    16-bit; unbounded, paho refuses or overwrites pending ones), and every record id
    arrives once the broker resumes."""
    assert broker.proc is not None
    pid = broker.proc.pid  # scripts/broker execs mosquitto: same pid
    tenant = unique_tenant()
    fleet = Fleet(synthetic(broker, tenant, 1), broker.url, connections=1,
                  max_inflight=1000, seed=1)
    results: list[Stats] = []
    with subscriber(broker, tenant) as sub, fleet:
        os.kill(pid, signal.SIGSTOP)
        try:
            worker = threading.Thread(
                target=lambda: results.append(fleet.publish(70_000, kinds=["location"])))
            worker.start()
            time.sleep(2.0)
            stalled_inflight = fleet.inflight
        finally:
            os.kill(pid, signal.SIGCONT)
        worker.join(120)
        received = sub.wait_for(70_000, timeout=120)
    assert stalled_inflight == 1000
    (stats,) = results
    assert stats.messages == stats.acked == 70_000
    assert stats.max_inflight_seen == 1000
    ids = {orjson.loads(p)["id"] for _, p in sub.messages}
    assert len(ids) == 70_000
    assert received == 70_000
    assert stats.unique_by_device_kind == Counter({("sim-0000", "location"): 70_000})


def test_every_kind_decodes_and_counts_match(broker: Broker) -> None:
    tenant = unique_tenant()
    enrollments = synthetic(broker, tenant, 5, personal_share=0.4, seed=7)
    fleet = Fleet(enrollments, broker.url, seed=7)
    with subscriber(broker, tenant) as sub, fleet:
        stats = fleet.publish(
            4_000, kinds={k: 1.0 for k in KINDS}, batch_share=0.1, dup_share=0.1
        )
        sub.wait_for(stats.messages)
    assert stats.unacked == 0
    assert len(sub.messages) == stats.messages == 4_000
    assert stats.batch_messages > 0 and stats.dup_messages > 0
    keys = record_keys(sub.messages)  # raises RemoteProtocolError on any bad record
    assert len(keys) == stats.records
    distinct = Counter((d, k) for d, k, _ in set(keys))
    assert distinct == stats.unique_by_device_kind
    assert sum(distinct.values()) == stats.unique_records < stats.records
    assert {k for _, k in distinct} == set(KINDS)

    # The data looks like a device's: valid IMEI, stable identity, personal users' emails.
    now_ms = int(time.time() * 1000)
    personal = {e["device"]: e["user_email"] for e in enrollments if "user_email" in e}
    assert len(personal) == 2
    identities: dict[str, set[bytes]] = {}
    for topic, payload in sub.messages:
        t = parse_topic(topic)
        if t.kind != "identity":
            continue
        for rec in decode_telemetry(t, payload, now_ms=now_ms):
            assert luhn_valid(rec.data["imei"]) and len(rec.data["imei"]) == 15
            assert rec.data["phone_number"].startswith("+")
            identities.setdefault(t.device, set()).add(
                orjson.dumps({k: rec.data[k] for k in ("imei", "serial", "wifi_mac")}))
            if t.device in personal:
                assert rec.data["user_email"] == personal[t.device]
    assert identities and all(len(v) == 1 for v in identities.values())


def test_same_seed_same_data() -> None:
    url = "mqtt://127.0.0.1:1"
    a = Fleet(synthetic_enrollments("t", 2, url, seed=3), url, seed=3)
    b = Fleet(synthetic_enrollments("t", 2, url, seed=3), url, seed=3)
    for kind in KINDS:
        assert a.devices[1].profile.data(kind, 1_000) == b.devices[1].profile.data(kind, 1_000)
    assert person_for("sim-0001", 3) == person_for("sim-0001", 3)


def test_rate_limit_2000_per_second(broker: Broker) -> None:
    tenant = unique_tenant()
    with Fleet(synthetic(broker, tenant, 20), broker.url, seed=2) as fleet:
        t0 = time.monotonic()
        stats = fleet.publish(rate=2000, duration=3.0)
        elapsed = time.monotonic() - t0
    assert stats.unacked == 0
    assert 6000 * 0.85 <= stats.records <= 6000 * 1.15, stats.summary()
    assert elapsed < 5


def test_token_bucket_is_exact_over_time() -> None:
    bucket = TokenBucket(10_000)
    now, taken = 0.0, 0
    bucket._last = now
    while now < 2.0:  # a consumer that polls every 0.3 ms, with jitter
        if bucket.delay(1, now) == 0:
            taken += 1
        else:
            now += 0.0003 if taken % 7 else 0.0011
    assert abs(taken - 20_000) <= 10_000 * 0.05 + 1


def test_enroll_fleet_then_reenroll(database: str, broker: Broker) -> None:
    tenant = unique_tenant()
    key = base64.b64decode(TEST_MASTER_KEY)
    first = asyncio.run(enroll_fleet(database, broker.url, tenant, 5, personal_share=0.2,
                                     master_key=key))
    again = asyncio.run(enroll_fleet(database, broker.url, tenant, 5, personal_share=0.2,
                                     master_key=key))
    assert [e["device"] for e in first] == [f"sim-{i:04d}" for i in range(5)]
    assert [e["device"] for e in again] == [e["device"] for e in first]
    assert all(a["mqtt"]["password"] != b["mqtt"]["password"]
               for a, b in zip(first, again, strict=True))

    async def ownership() -> Counter[str]:
        conn = await asyncpg.connect(database)
        try:
            rows = await conn.fetch(
                "SELECT ownership, user_email FROM devices WHERE tenant_id = $1", tenant)
        finally:
            await conn.close()
        assert all((r["user_email"] is not None) == (r["ownership"] == "personal")
                   for r in rows)
        return Counter(r["ownership"] for r in rows)

    assert asyncio.run(ownership()) == Counter({"corporate": 4, "personal": 1})
    # The fleet logs in with the enrollment's credentials and publishes.
    with subscriber(broker, tenant) as sub, Fleet(again, broker.url) as fleet:
        stats = fleet.publish(500)
        sub.wait_for(500)
    assert stats.acked == 500
    assert len(set(record_keys(sub.messages))) == stats.unique_records == 500


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "load_tests.simulator", "--no-enroll", *args]


def _cli_env(broker: Broker) -> dict[str, str]:
    """The simulator sends devices where the server's enrollment would: this broker's
    TLS listener, trusting its CA."""
    return {**os.environ, "PYTHONPATH": str(REPO), "MDM_MQTT_PUBLIC_URL": broker.device_url,
            "MDM_MQTT_PUBLIC_CA_FILE": str(broker.ca_file)}


def test_cli_count_and_json_stats(broker: Broker, tmp_path: Path) -> None:
    out = tmp_path / "stats.json"
    proc = subprocess.run(
        _cli("--mqtt-url", broker.url, "--tenant", unique_tenant(), "--devices", "3",
             "--count", "2000", "--rate", "0", "--batch-share", "0.05", "--json-stats",
             str(out)),
        cwd=REPO, capture_output=True, text=True, timeout=60, env=_cli_env(broker),
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["messages"] == doc["acked"] == 2000
    assert sum(doc["unique_by_kind"].values()) == doc["unique_records"]
    assert set(doc["unique_by_device_kind"]) == {"sim-0000", "sim-0001", "sim-0002"}
    assert "sim: done" in proc.stderr


def test_cli_sigterm_drains_and_summarises(broker: Broker, tmp_path: Path) -> None:
    out = tmp_path / "stats.json"
    proc = subprocess.Popen(
        _cli("--mqtt-url", broker.url, "--tenant", unique_tenant(), "--devices", "4",
             "--rate", "1000", "--json-stats", str(out)),
        cwd=REPO, stderr=subprocess.PIPE, text=True, env=_cli_env(broker),
    )
    time.sleep(2.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "sim: sent=" in err  # the live line (plain lines: stderr is not a TTY)
    doc = json.loads(out.read_text())
    assert doc["interrupted"] is True
    assert doc["unacked"] == 0 and doc["messages"] > 1000


def test_stats_json_roundtrip() -> None:
    s = Stats(messages=2, acked=2, records=3, unique_records=3, elapsed_s=1.0)
    s.unique_by_device_kind[("d", "location")] = 3
    s.unique_by_kind["location"] = 3
    doc = orjson.loads(s.to_json())
    assert doc["unique_by_device_kind"] == {"d": {"location": 3}}
    assert doc["rate_msgs_per_s"] == 2.0
