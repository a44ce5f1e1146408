"""The broker's per-client packet limit fits the wire contract exactly (no broker
needed; tests/integration/test_broker_limits.py runs it against Mosquitto)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from agent_protocol import KINDS, MAX_PAYLOAD_BYTES, telemetry_topic
from agent_protocol.commands import MAX_COMMAND_BYTES
from mdm_server.broker import dynsec
from mdm_server.broker.identity import device_acls, device_rolename

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "deploy" / "mosquitto" / "mosquitto.conf"


def conf_value(name: str) -> int:
    """A numeric option of deploy/mosquitto/mosquitto.conf."""
    (value,) = re.findall(rf"^{name} (\d+)$", CONF.read_text(), re.MULTILINE)
    return int(value)


def largest_valid_publish() -> int:
    """What Mosquitto compares with max_packet_size for the wire contract's largest
    valid message: remaining length + 1 (topic length, topic, packet id, payload;
    and the fixed header's first byte), a 256 KiB payload on the longest topic."""
    topic = max((telemetry_topic("t" * 64, "d" * 64, k) for k in KINDS), key=len)
    return 1 + 2 + len(topic) + 2 + MAX_PAYLOAD_BYTES


def test_the_packet_limit_is_the_contracts_largest_message_and_little_more() -> None:
    limit = conf_value("max_packet_size")
    assert largest_valid_publish() <= limit <= largest_valid_publish() + 1024
    assert "message_size_limit" not in re.sub(r"#.*", "", CONF.read_text())


def test_the_servers_own_packets_stay_below_the_limit() -> None:
    """The limit is global in Mosquitto 2.0.11: it holds for the server's commands
    and its dynamic-security requests, which would otherwise cost it its connection."""
    limit = conf_value("max_packet_size")
    assert MAX_COMMAND_BYTES + 1024 < limit
    # The densest requests: roles and clients of devices with 64-character ids.
    commands = []
    for i in range(300):
        device = f"{i:03d}" + "d" * 61
        commands += [
            {"command": "createRole", "rolename": device_rolename("t" * 64, device),
             "acls": device_acls("t" * 64, device)},
            {"command": "createClient", "username": f"{'t' * 64}.{device}",
             "clientid": f"{'t' * 64}.{device}", "password": "p" * 44,
             "textname": "mdm-device", "textdescription": "credential generation 1",
             "roles": [{"rolename": device_rolename("t" * 64, device)}]}]
    chunks = dynsec._chunks(commands)
    assert sum(len(c) for c in chunks) == len(commands)
    sizes = [len(json.dumps({"commands": [{**c, "correlationData": "x" * 19} for c in chunk]}))
             for chunk in chunks]
    assert max(sizes) < limit // 2, sizes
    # Cut by count alone, the first request would not pass the broker.
    assert len(json.dumps({"commands": commands[:dynsec._CHUNK]})) > limit
