"""N live watchers: Server-Sent Event streams of ``GET /api/v1/live`` held open
against a running ``serve`` (load_tests/bench_ingest.py ``--live-watchers``).

    python -m load_tests.live_watchers --url http://127.0.0.1:8080 --streams 20 \\
        --stats out.json     # the admin token in MDM_BENCH_TOKEN

Prints ``connected N`` once every stream is open (its ``ready`` event arrived), then
reads until SIGTERM and writes per stream the live points received (each point's
``received_at`` counted in the raw bytes: the client stays cheap, as a browser
would be on another machine) and the bytes read.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import orjson


async def _watch(session: aiohttp.ClientSession, url: str, token: str, i: int,
                 stats: list[dict[str, int]], ready: asyncio.Event, opened: list[int],
                 total: int) -> None:
    s = stats[i]
    async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
        if resp.status != 200:
            raise SystemExit(f"stream {i}: HTTP {resp.status}: {await resp.text()}")
        seen_ready = False
        tail = b""
        async for chunk in resp.content.iter_any():
            s["bytes"] += len(chunk)
            data = tail + chunk
            s["points"] += data.count(b'"received_at"') - tail.count(b'"received_at"')
            tail = data[-32:]
            if not seen_ready and b"event: ready" in data:
                seen_ready = True
                opened[0] += 1
                if opened[0] == total:
                    ready.set()


async def main(args: argparse.Namespace) -> int:
    token = os.environ["MDM_BENCH_TOKEN"]
    stats = [{"points": 0, "bytes": 0} for _ in range(args.streams)]
    ready, opened = asyncio.Event(), [0]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        tasks = [asyncio.create_task(_watch(session, args.url + "/api/v1/live", token, i,
                                            stats, ready, opened, args.streams))
                 for i in range(args.streams)]
        await asyncio.wait_for(ready.wait(), timeout=60)
        print(f"connected {args.streams}", flush=True)
        while not stop.is_set():
            Path(args.stats).write_bytes(orjson.dumps(stats))
            await asyncio.wait([asyncio.ensure_future(stop.wait())], timeout=0.5)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    Path(args.stats).write_bytes(orjson.dumps(stats))
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--streams", type=int, default=20)
    p.add_argument("--stats", required=True)
    sys.exit(asyncio.run(main(p.parse_args())))
