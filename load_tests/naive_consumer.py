"""A naive telemetry consumer: the reference the ingest's drain rate is compared with.

What a first attempt looks like: paho-mqtt on its own network thread, a persistent
session (clean_session=False) in a shared subscription at QoS 1, paho's automatic
PUBACK once ``on_message`` returns, and in ``on_message`` the same decoding and
validation as the ingest (``agent_protocol.decode_telemetry``) followed by ONE
``INSERT`` per message (asyncpg on an asyncio loop in a second thread, waited for
with ``run_coroutine_threadsafe(...).result()``). No batching, no COPY, no device
lookup (every device is taken as enrolled); bad messages are counted and dropped.

    python -m load_tests.naive_consumer --database-url URL --mqtt-url URL --prime
        connect, subscribe, exit once the broker has acknowledged the subscription
        (creates the persistent session: from then on the broker queues for it)
    python -m load_tests.naive_consumer --database-url URL --mqtt-url URL [--count N]
        consume until N messages were handled (default: until SIGTERM/SIGINT)

Not collected by pytest; used by load_tests/bench_ingest.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent_protocol import ProtocolError, decode_telemetry, parse_topic
from mdm_server.storage.partitions import create_partitions, partitions_around
from mdm_server.storage.pool import connect

__all__ = ["NaiveConsumer", "main"]

FILTER = "mdm/v1/+/devices/+/telemetry/+"
_INSERT = """
INSERT INTO telemetry (tenant_id, device_id, kind, record_id, ts, received_at, data)
VALUES ($1, $2, $3, $4, timestamptz 'epoch' + $5::bigint * interval '1 millisecond',
        statement_timestamp(), $6)
ON CONFLICT DO NOTHING"""


class NaiveConsumer:
    """paho network thread -> decode -> one INSERT per record -> auto PUBACK."""

    def __init__(self, database_url: str, mqtt_url: str, *, client_id: str = "naive-0",
                 group: str = "naive", count: int | None = None) -> None:
        parts = urlsplit(mqtt_url)
        if parts.scheme != "mqtt" or not parts.hostname:
            raise ValueError("--mqtt-url must look like mqtt://[user:pass@]host:port")
        self._host, self._port = parts.hostname, parts.port or 1883
        self._dsn = database_url
        self._topic = f"$share/{group}/{FILTER}"
        self._count = count
        self.handled = 0
        self.inserted = 0
        self.bad = 0
        self.subscribed = threading.Event()
        self.done = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._conn: asyncpg.Connection | None = None
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                        clean_session=False, protocol=paho.MQTTv311)
        if parts.username:  # the server's MQTT user: the broker lets no one in anonymously
            c.username_pw_set(unquote(parts.username),
                              unquote(parts.password) if parts.password else None)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        self._client = c

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _open(self) -> asyncpg.Connection:
        conn = await connect(self._dsn)
        await create_partitions(conn, partitions_around(int(time.time() * 1000)))
        return conn

    def start(self, *, db: bool = True) -> None:
        self._loop_thread.start()
        if db:
            self._conn = self._run(self._open())
        self._client.connect(self._host, self._port, keepalive=30)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        if self._conn is not None:
            self._run(self._conn.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=5)

    # -- paho callbacks (paho's network thread) -----------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any,
                    props: Any = None) -> None:
        if not rc.is_failure:
            client.subscribe(self._topic, qos=1)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, rcs: Any,
                      props: Any = None) -> None:
        self.subscribed.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            topic = parse_topic(msg.topic)
            records = decode_telemetry(topic, bytes(msg.payload), now_ms=int(time.time() * 1000))
        except (ProtocolError, UnicodeDecodeError):
            self.bad += 1
        else:
            conn = self._conn
            assert conn is not None and topic.kind is not None
            for r in records:
                status: str = self._run(conn.execute(
                    _INSERT, topic.tenant, topic.device, topic.kind, r.id, r.ts_ms, r.data))
                self.inserted += int(status.rsplit(" ", 1)[1])
        self.handled += 1
        if self._count is not None and self.handled >= self._count:
            self.done.set()
        # returning lets paho send the PUBACK


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m load_tests.naive_consumer",
                                description="One INSERT per message: a reference consumer.")
    p.add_argument("--database-url", default=os.environ.get("MDM_DATABASE_URL"))
    p.add_argument("--mqtt-url", default=os.environ.get("MDM_MQTT_URL"),
                   help="mqtt://mdm-server:PASSWORD@host:port, the server's MQTT user "
                        "(default: $MDM_MQTT_URL)")
    p.add_argument("--client-id", default="naive-0")
    p.add_argument("--group", default="naive", help="shared subscription group")
    p.add_argument("--count", type=int, default=None, help="exit after N messages")
    p.add_argument("--prime", action="store_true",
                   help="subscribe (creating the persistent session), then exit")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if not args.mqtt_url or (not args.database_url and not args.prime):
        print("naive: set --mqtt-url and --database-url", file=sys.stderr)
        return 2
    consumer = NaiveConsumer(args.database_url or "", args.mqtt_url,
                             client_id=args.client_id, group=args.group, count=args.count)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        consumer.done.set()

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    t0 = time.monotonic()
    consumer.start(db=not args.prime)
    try:
        if args.prime:
            if not consumer.subscribed.wait(10):
                print("naive: no SUBACK within 10 s", file=sys.stderr)
                return 1
            print("naive: subscribed", file=sys.stderr, flush=True)
            return 0
        consumer.subscribed.wait(10)
        print("naive: subscribed", file=sys.stderr, flush=True)
        while not consumer.done.wait(1.0):
            pass
    finally:
        consumer.stop()
    dt = time.monotonic() - t0
    print(f"naive: handled={consumer.handled} inserted={consumer.inserted} bad={consumer.bad} "
          f"elapsed_s={dt:.3f} rate={consumer.handled / dt if dt else 0:.0f}/s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
