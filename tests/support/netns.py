"""Another host for tests: a network namespace joined to this one by a veth pair.

Inside it, 127.0.0.1 is the namespace's own loopback, so a connection from there
to this host comes from outside, to the veth address of this side: what a phone on
the network does. Needs root and iproute2 (``ip netns``); :func:`outside_host`
skips the test when either is missing or when making a namespace is not permitted.

:func:`tunnel` carries ports of this host's loopback into the namespace, for a
process there (a second ``serve``) that must reach services listening on 127.0.0.1
only, as a second host reaches them through a tunnel (ssh, stunnel, WireGuard): a
forwarder on the namespace's loopback connects across the veth pair to a forwarder
on this side's veth address, which connects to the service. Both are this module
run as a program (``python -m tests.support.netns forward ...``).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import secrets
import select
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class OutsideHost:
    namespace: str
    #: This host's address as the namespace sees it (the veth on this side).
    host_addr: str
    #: The namespace's own address.
    addr: str

    @property
    def prefix(self) -> tuple[str, ...]:
        """What runs a command inside the namespace (it execs the command)."""
        return ("ip", "netns", "exec", self.namespace)

    def run(self, argv: list[str], *, env: dict[str, str] | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace."""
        return subprocess.run(["ip", "netns", "exec", self.namespace, *argv], env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextmanager
def outside_host() -> Iterator[OutsideHost]:
    import pytest

    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for a second network namespace")
    tag = secrets.token_hex(4)
    ns, here, there = f"mdmtest-{tag}", f"mdm{tag}h", f"mdm{tag}n"
    # A /30 of 10.213.0.0/16 chosen at random: tests running at once do not collide.
    net = ipaddress.ip_network(f"10.213.{secrets.randbelow(256)}.{4 * secrets.randbelow(64)}/30")
    host_addr, addr = (str(a) for a in list(net.hosts())[:2])
    made = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True,
                          timeout=30, check=False)
    if made.returncode != 0:
        pytest.skip(f"a second network namespace is not permitted here (ip netns add: "
                    f"{made.stderr.strip()})")
    try:
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        try:
            _ip("link", "set", there, "netns", ns)
            _ip("addr", "add", f"{host_addr}/30", "dev", here)
            _ip("link", "set", here, "up")
            _ip("netns", "exec", ns, "ip", "addr", "add", f"{addr}/30", "dev", there)
            _ip("netns", "exec", ns, "ip", "link", "set", there, "up")
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
            yield OutsideHost(ns, host_addr, addr)
        finally:
            subprocess.run(["ip", "link", "del", here], capture_output=True, check=False)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _start_forwarder(argv: list[str], prefix: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    """This module's forwarder as a process; returns once it listens."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "tests.support.netns", "forward",
                             *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    if not ready or proc.stdout.readline().strip() != "listening":
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"the TCP forwarder did not start: {err[-2000:]}")
    return proc


@contextmanager
def tunnel(host: OutsideHost, ports: Iterable[int]) -> Iterator[dict[int, int]]:
    """For each of ``ports`` (services on this host's 127.0.0.1), a port F that reaches
    it from inside the namespace at 127.0.0.1:F: a forwarder there to
    ``host.host_addr``:F (across the veth pair, the only way out of the namespace),
    and one here from ``host.host_addr``:F to 127.0.0.1:port. Yields {port: F}."""
    from tests.support.services import free_port

    mapping = {port: free_port() for port in ports}
    procs: list[subprocess.Popen[str]] = []
    try:
        procs.append(_start_forwarder(
            [host.host_addr, *(f"{f}:127.0.0.1:{p}" for p, f in mapping.items())]))
        procs.append(_start_forwarder(
            ["127.0.0.1", *(f"{f}:{host.host_addr}:{f}" for f in mapping.values())],
            prefix=host.prefix))
        yield mapping
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate(timeout=10)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass


async def _forward(listen_host: str, routes: list[tuple[int, str, int]]) -> None:
    """Listen on ``listen_host`` at each route's port; connect each connection to the
    route's target and copy both ways until either side ends (then close both)."""

    def handler(target: tuple[str, int]
                ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                t_reader, t_writer = await asyncio.open_connection(*target)
            except OSError:
                writer.close()
                return
            pipes = [asyncio.ensure_future(_pipe(reader, t_writer)),
                     asyncio.ensure_future(_pipe(t_reader, writer))]
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            for task in pipes:
                task.cancel()
            for w in (writer, t_writer):
                w.close()
        return handle

    servers = [await asyncio.start_server(handler((t_host, t_port)), listen_host, port)
               for port, t_host, t_port in routes]
    print("listening", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        for server in servers:
            server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.support.netns")
    sub = parser.add_subparsers(dest="command", required=True)
    fwd = sub.add_parser("forward", help="copy TCP connections to other addresses")
    fwd.add_argument("listen_host")
    fwd.add_argument("routes", nargs="+", metavar="PORT:TARGET_HOST:TARGET_PORT")
    args = parser.parse_args(argv)
    routes = []
    for route in args.routes:
        port, t_host, t_port = route.split(":")
        routes.append((int(port), t_host, int(t_port)))
    asyncio.run(_forward(args.listen_host, routes))


if __name__ == "__main__":
    main()
