"""AMQP reader benchmark: aiormq's reader against the fast one (not collected by pytest).

    python -m load_tests.bench_amqp_reader [--messages 50000] [--runs 3] [--batch 5000]
        [--payload 220] [--ingest]

A private one-node RabbitMQ (scripts/cluster) whose broker hook is a stub in this
process (it lets the bench's user do anything: no serve, no database). Each run: a
backlog of ``--messages`` persistent messages of ``--payload`` bytes from 20
devices' telemetry keys is published to ``amq.topic`` (publisher confirms) into a
fresh quorum queue, then one reader drains it, the way the ingest does but without
the core (no decode, policy, sealing or COPY): messages gathered into batches of
``--batch``, each acknowledged (``ack``, one ``basic.ack`` with ``multiple=True``)
when full, the prefetch twice the batch (the worker's default). Timed from the
reader's start to the last delivery (wall) and the process's CPU time over the same
span; the readers alternate old new new old ... (``--runs`` each), in one process.

With ``--ingest``, the whole ingest instead: ``mdm-server ingest`` (one worker,
its own process, a throwaway database migrated here, MDM_PG_ADMIN_URL as for the
tests) drains ``mdm-ingest``, filled with ``--messages`` single-record location
messages of 10 enrolled devices (a fresh tenant a drain), with the old reader
(the process's ``AmqpConsumer`` replaced by ``AiormqConsumer`` before it starts)
or the new; timed from the first stored record to the last (polled every 50 ms),
CPU of the ingest process from its start.

Prints one line per drain, then the best and mean rate of each and the ratio
new/old, and the CPU µs per message.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import aio_pika
from aiohttp import web

from load_tests.aiormq_reader import AiormqConsumer
from mdm_server.broker.hook_config import AmqpSettings, amqp_settings
from mdm_server.ingest.amqp import AmqpConsumer
from mdm_server.ingest.mqtt import InboundMessage
from tests.support.cluster import CLUSTER_SCRIPT
from tests.support.services import free_port

DEVICES = 20


class Reader(Protocol):
    async def run(self) -> None: ...
    def ack(self, messages: list[InboundMessage]) -> int: ...


async def stub_hook(addr: str) -> web.AppRunner:
    """RabbitMQ's HTTP auth backend answered "allow" (administrator) for everything."""
    async def allow(request: web.Request) -> web.Response:
        await request.post()
        return web.Response(text="allow administrator" if request.path.endswith("user")
                            else "allow")

    app = web.Application()
    for what in ("user", "vhost", "resource", "topic"):
        app.router.add_post(f"/rabbitmq/{what}", allow)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = addr.split(":")
    await web.TCPSite(runner, host, int(port)).start()
    return runner


async def publish(amqp: AmqpSettings, queue: str, n: int, size: int) -> None:
    """``n`` persistent messages into ``queue`` (declared and bound here), confirmed."""
    conn = await aio_pika.connect(amqp.urls[0], login=amqp.username, password=amqp.password)
    try:
        channel = await conn.channel()
        q = await channel.declare_queue(queue, durable=True,
                                        arguments={"x-queue-type": "quorum"})
        await q.bind("amq.topic", routing_key=f"mdm.v1.bench.devices.*.telemetry.{queue}")
        exchange = await channel.get_exchange("amq.topic", ensure=False)
        body = b"x" * size
        for start in range(0, n, 1000):
            await asyncio.gather(*(exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=f"mdm.v1.bench.devices.d{i % DEVICES}.telemetry.{queue}")
                for i in range(start, min(start + 1000, n))))
    finally:
        await conn.close()


async def drain(kind: str, amqp: AmqpSettings, n: int, size: int, batch: int
                ) -> tuple[float, float]:
    """One backlog drained by one reader: (messages/s, CPU µs per message)."""
    queue = f"mdm-bench-{uuid.uuid4().hex[:8]}"
    await publish(amqp, queue, n, size)
    done = asyncio.Event()
    pending: list[InboundMessage] = []
    got = 0
    reader: Reader

    def on_message(msg: InboundMessage) -> None:
        nonlocal got
        pending.append(msg)
        got += 1
        if len(pending) >= batch or got >= n:
            reader.ack(pending)
            pending.clear()
            if got >= n:
                done.set()

    make: Callable[..., Any] = AmqpConsumer if kind == "new" else AiormqConsumer
    reader = make(amqp, on_message=on_message, prefetch=2 * batch, queue=queue,
                  bindings=(f"mdm.v1.bench.devices.*.telemetry.{queue}",), label="bench")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    task = asyncio.create_task(reader.run())
    await done.wait()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    conn = await aio_pika.connect(amqp.urls[0], login=amqp.username, password=amqp.password)
    try:
        channel = await conn.channel()
        await channel.queue_delete(queue)
    finally:
        await conn.close()
    return n / wall, cpu / n * 1e6


_OLD_READER = ("import runpy, sys; import mdm_server.ingest.amqp as a; "
               "from load_tests.aiormq_reader import AiormqConsumer; "
               "a.AmqpConsumer = AiormqConsumer; "
               "sys.argv = ['mdm_server', 'ingest', '--index', '1']; "
               "runpy.run_module('mdm_server', run_name='__main__', alter_sys=True)")


async def ingest_drain(kind: str, amqp: AmqpSettings, env: dict[str, str], database: str,
                       n: int, log: Path) -> tuple[float, float]:
    """The backlog drained by one ``mdm-server ingest``: (records/s, CPU µs/record)."""
    import psutil  # type: ignore[import-untyped]

    from mdm_server.ingest.amqp import INGEST_BINDINGS, INGEST_QUEUE
    from tests.support.services import enroll, fetchval
    from tests.support.telemetry import location

    tenant = "b" + uuid.uuid4().hex[:8]
    devices = [f"d{i}" for i in range(10)]
    await enroll(database, "mqtt://127.0.0.1:1", tenant, devices)
    conn = await aio_pika.connect(amqp.urls[0], login=amqp.username, password=amqp.password)
    try:
        channel = await conn.channel()
        q = await channel.declare_queue(INGEST_QUEUE, durable=True,
                                        arguments={"x-queue-type": "quorum"})
        for key in INGEST_BINDINGS:
            await q.bind("amq.topic", routing_key=key)
        exchange = await channel.get_exchange("amq.topic", ensure=False)
        for start in range(0, n, 1000):
            msgs = [location(tenant, devices[i % 10], i) for i in range(start,
                                                                         min(start + 1000, n))]
            await asyncio.gather(*(exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=topic.replace("/", ".")) for topic, body in msgs))
    finally:
        await conn.close()
    args = (["-c", _OLD_READER] if kind == "old"
            else ["-m", "mdm_server", "ingest", "--index", "1"])
    count = f"SELECT count(*) FROM telemetry WHERE tenant_id = '{tenant}'"
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, *args], env=env, stdout=out, stderr=out)
    try:
        first = last = 0.0
        stored = 0
        deadline = time.monotonic() + 300
        while stored < n:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the ingest stopped or stalled at {stored}; see {log}")
            stored = int(str(await fetchval(database, count)))
            now = time.monotonic()
            if stored and not first:
                first = now
            last = now
            await asyncio.sleep(0.05)
        times = psutil.Process(proc.pid).cpu_times()
        cpu = times.user + times.system
    finally:
        proc.terminate()
        proc.wait(30)
    if last == first:  # every record came in one poll: no span to divide by
        sys.exit(f"{n:,} records were stored within one 50 ms poll: too few to time; "
                 "give more --messages")
    return n / (last - first), cpu / n * 1e6


async def bench(args: argparse.Namespace, amqp: AmqpSettings) -> None:
    results: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
    order = ["old", "new", "new", "old"] * ((args.runs + 1) // 2)
    counts = {"old": 0, "new": 0}
    for kind in order:
        if counts[kind] >= args.runs:
            continue
        counts[kind] += 1
        if args.ingest:
            rate, cpu = await ingest_drain(kind, amqp, args.env, args.database,
                                           args.messages, args.log)
        else:
            rate, cpu = await drain(kind, amqp, args.messages, args.payload, args.batch)
        results[kind].append((rate, cpu))
        print(f"{kind}: {rate:,.0f} msg/s, {cpu:.1f} µs CPU/msg", flush=True)
    for kind in ("old", "new"):
        rates = [r for r, _ in results[kind]]
        cpus = [c for _, c in results[kind]]
        print(f"{kind}: best {max(rates):,.0f} msg/s, mean {statistics.mean(rates):,.0f}; "
              f"CPU {min(cpus):.1f}-{max(cpus):.1f} µs/msg")
    best = max(r for r, _ in results["new"]) / max(r for r, _ in results["old"])
    mean = (statistics.mean(r for r, _ in results["new"])
            / statistics.mean(r for r, _ in results["old"]))
    print(f"new/old: best {best:.2f}, mean {mean:.2f}")


async def main_async(args: argparse.Namespace) -> None:
    hook = f"127.0.0.1:{free_port()}"
    runner = await stub_hook(hook)
    with tempfile.TemporaryDirectory(prefix="bench-amqp-") as tmp:
        d = Path(tmp) / "cluster"
        try:
            out = await asyncio.to_thread(subprocess.run, [
                str(CLUSTER_SCRIPT), "up", "--nodes", "1", "--dir", str(d), "--hook", hook],
                capture_output=True, text=True, timeout=180, check=False)
            if out.returncode != 0:
                sys.exit(f"scripts/cluster up failed:\n{out.stderr[-2000:]}")
            env = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
            amqp = amqp_settings(env)
            assert amqp is not None
            if args.ingest:
                from tests.support.services import create_database, drop_database, server_env

                args.database = await create_database("mdm_bench_amqp")
                args.env = server_env(args.database, "mqtt://127.0.0.1:1",
                                      MDM_AMQP_URL=env["MDM_AMQP_URL"],
                                      MDM_INGEST_BATCH=str(args.batch))
                args.log = Path(tmp) / "ingest.log"
            try:
                await bench(args, amqp)
            finally:
                if args.ingest:
                    await drop_database(args.database)
        finally:
            await asyncio.to_thread(subprocess.run, [str(CLUSTER_SCRIPT), "down", "--dir",
                                                     str(d)], capture_output=True,
                                    timeout=120, check=False)
            await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=50_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch", type=int, default=5000)
    p.add_argument("--payload", type=int, default=220)
    p.add_argument("--ingest", action="store_true",
                   help="the whole ingest (mdm-server ingest) instead of the reader alone")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
