"""Routing keys and topics on a RabbitMQ cluster (mdm_server/broker/amqp.py, hook.py)."""

from __future__ import annotations

from agent_protocol import ACKS_FILTER, STATUS_FILTER, TELEMETRY_FILTER
from agent_protocol.owntracks import OWNTRACKS_FILTER
from mdm_server.broker.amqp import routing_key_topic
from mdm_server.broker.hook import server_routing_key, topic_routing_key
from mdm_server.broker.rules import device_topics, filter_covers


def test_every_device_topic_comes_back_from_its_routing_key() -> None:
    for agent in ("native", "owntracks"):
        topics = device_topics("acme", "d-1_x", agent)
        for topic in (*topics.publish, *topics.subscribe):
            assert routing_key_topic(topic_routing_key(topic)) == topic, topic


def test_the_servers_bindings_cover_every_device_topic_it_reads() -> None:
    bindings = [topic_routing_key(f) for f in (TELEMETRY_FILTER, ACKS_FILTER, STATUS_FILTER)]
    bindings.append(server_routing_key(OWNTRACKS_FILTER))
    for agent in ("native", "owntracks"):
        for topic in device_topics("acme", "d1", agent).publish:
            key = topic_routing_key(topic)
            assert any(filter_covers(b, key, sep=".", one="*") for b in bindings), topic
    # ...and not a command, which the server publishes itself.
    assert not any(filter_covers(b, "mdm.v1.acme.devices.d1.commands", sep=".", one="*")
                   for b in bindings)


def test_an_owntracks_username_is_two_words_of_a_key() -> None:
    assert server_routing_key("owntracks/+/+/cmd") == "owntracks.*.*.*.cmd"
    assert server_routing_key("owntracks/+/+/#") == "owntracks.*.*.*.#"
    assert server_routing_key("mdm/v1/+/devices/+/commands") == "mdm.v1.*.devices.*.commands"
    assert routing_key_topic("owntracks.acme.d1.d1.cmd") == "owntracks/acme.d1/d1/cmd"
