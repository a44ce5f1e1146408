"""The fast AMQP reader's frame parser (mdm_server/ingest/amqp.py) on byte
strings made by pamqp's encoder: deliveries come out whole and in order whatever
the split of the stream, a body spread over several body frames included; other
frames are handed over decoded."""

from __future__ import annotations

import pytest
from pamqp import commands as spec
from pamqp import frame as pframe
from pamqp.base import Frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from mdm_server.ingest.amqp import FrameParser, ProtocolError


def delivery(tag: int, key: str, body: bytes, *, frame_body: int = 1 << 20,
             channel: int = 1) -> bytes:
    """A Basic.Deliver, its content header and its body in frames of at most
    ``frame_body`` bytes, as a server sends them."""
    out = [pframe.marshal(spec.Basic.Deliver(consumer_tag="mdm-ingest", delivery_tag=tag,
                                             redelivered=tag % 2 == 0, exchange="amq.topic",
                                             routing_key=key), channel),
           pframe.marshal(ContentHeader(0, len(body), spec.Basic.Properties(
               delivery_mode=2, headers={"x-mqtt-publish-qos": 1})), channel)]
    for i in range(0, len(body), frame_body):
        out.append(pframe.marshal(ContentBody(body[i:i + frame_body]), channel))
    return b"".join(out)


class Sink:
    def __init__(self) -> None:
        self.delivered: list[tuple[int, bytes, bytes]] = []
        self.other: list[tuple[int, Frame | None]] = []
        self.parser = FrameParser(lambda t, k, b: self.delivered.append((t, k, b)),
                                  lambda c, f: self.other.append((c, f)))


KEY = "mdm.v1.acme.devices.d1.telemetry.location"
STREAM = b"".join([
    delivery(1, KEY, b'{"a":1}'),
    pframe.marshal(Heartbeat(), 0),
    delivery(2, "owntracks.acme.d2.d2", b""),  # an empty body: no body frame
    delivery(3, KEY, bytes(range(256)) * 40, frame_body=4088),  # 10,240 bytes, 3 frames
    pframe.marshal(spec.Basic.Cancel(consumer_tag="mdm-ingest"), 1),
    delivery(2**40, KEY, b"last"),
])
EXPECTED = [(1, KEY.encode(), b'{"a":1}'), (2, b"owntracks.acme.d2.d2", b""),
            (3, KEY.encode(), bytes(range(256)) * 40), (2**40, KEY.encode(), b"last")]


def check(sink: Sink) -> None:
    assert sink.delivered == EXPECTED
    assert [c for c, _ in sink.other] == [0, 1]
    assert sink.other[0][1] is None  # the heartbeat
    cancel = sink.other[1][1]
    assert isinstance(cancel, spec.Basic.Cancel) and cancel.consumer_tag == "mdm-ingest"


def test_one_chunk() -> None:
    sink = Sink()
    sink.parser.feed(STREAM)
    check(sink)


def test_split_in_two_at_every_offset() -> None:
    for cut in range(len(STREAM) + 1):
        sink = Sink()
        sink.parser.feed(STREAM[:cut])
        sink.parser.feed(STREAM[cut:])
        check(sink)


def test_split_in_three_around_every_frame_boundary() -> None:
    # Every offset as the first cut, a second cut a frame head later and far later.
    for cut in range(0, len(STREAM), 7):
        for more in (1, 7, 8, 4096):
            sink = Sink()
            sink.parser.feed(STREAM[:cut])
            sink.parser.feed(STREAM[cut:cut + more])
            sink.parser.feed(STREAM[cut + more:])
            check(sink)


def test_byte_by_byte() -> None:
    sink = Sink()
    for i in range(len(STREAM)):
        sink.parser.feed(STREAM[i:i + 1])
    check(sink)


def test_a_message_is_delivered_when_its_last_body_frame_is_whole() -> None:
    big = delivery(7, KEY, b"x" * 9000, frame_body=4088)
    sink = Sink()
    sink.parser.feed(big[:-1])
    assert sink.delivered == []
    sink.parser.feed(big[-1:])
    assert sink.delivered == [(7, KEY.encode(), b"x" * 9000)]


@pytest.mark.parametrize("bad", [
    delivery(1, KEY, b"abc")[:-1] + b"\x00",  # no frame-end octet
    pframe.marshal(ContentBody(b"abc"), 1),  # a body with no delivery
    pframe.marshal(ContentHeader(0, 3, spec.Basic.Properties()), 1),  # a header with none
], ids=["frame-end", "body-first", "header-first"])
def test_malformed_streams_are_refused(bad: bytes) -> None:
    sink = Sink()
    with pytest.raises(ProtocolError):
        sink.parser.feed(bad)
