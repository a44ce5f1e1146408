"""Bulk provisioning: accounts written into the stopped broker's dynamic-security
file work exactly like accounts created live (the reconciler finds nothing to do)."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent_protocol import commands_topic
from load_tests.simulator import enroll_fleet
from tests.support.services import (
    TEST_MASTER_KEY,
    Broker,
    Server,
    create_database,
    drop_database,
    free_port,
    server_env,
)

pytestmark = pytest.mark.integration


def _subscribe(enrollment: dict[str, Any], port: int, topic: str) -> int:
    """Connect as the device, subscribe to ``topic``; the SUBACK's reason code."""
    m = enrollment["mqtt"]
    got: list[int] = []
    done = threading.Event()
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                    client_id=m["client_id"], protocol=paho.MQTTv311)
    c.username_pw_set(m["username"], m["password"])

    def on_connect(c: paho.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
        if rc.is_failure:
            got.append(-1)
            done.set()
        else:
            c.subscribe(topic, qos=1)

    def on_subscribe(c: paho.Client, u: Any, mid: int, rcs: Any, p: Any) -> None:
        got.append(rcs[0].value)
        done.set()

    c.on_connect, c.on_subscribe = on_connect, on_subscribe
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        assert done.wait(10), "no CONNACK/SUBACK"
    finally:
        c.disconnect()
        c.loop_stop()
    return got[0]


def test_offline_provisioned_devices_connect_and_stay_confined(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    monkeypatch.setenv("MDM_MASTER_KEY", TEST_MASTER_KEY)
    database = asyncio.run(create_database())
    broker = Broker(free_port(), tmp_path / "broker")
    broker.dir.mkdir()
    try:
        # No server credentials in the URL: the broker is not told (it is not running).
        enrolled = asyncio.run(enroll_fleet(database, f"mqtt://127.0.0.1:{broker.port}",
                                            "bulk", 3))
        srv = Server(server_env(database, broker.url), tmp_path / "serve.log")
        report = json.loads(srv.cli("broker", "provision-offline",
                                    str(broker.dir / "dynamic-security.json")))
        assert report == {"devices": 3, "not_derivable": 0}
        broker.start()
        try:
            first, second = enrolled[0], enrolled[1]
            assert _subscribe(first, broker.port, commands_topic("bulk", first["device"])) == 1
            assert _subscribe(first, broker.port,
                              commands_topic("bulk", second["device"])) == 0x80
            # The live reconciler agrees with what was written offline.
            assert json.loads(srv.cli("broker", "reconcile")) == {
                "created": 0, "updated": 0, "deleted": 0, "not_derivable": 0}
        finally:
            broker.stop()
    finally:
        asyncio.run(drop_database(database))
