"""Another host for tests: a network namespace joined to this one by a veth pair.

Inside it, 127.0.0.1 is the namespace's own loopback, so a connection from there
to this host comes from outside, to the veth address of this side: what a phone on
the network does. Needs root and iproute2 (``ip netns``); :func:`outside_host`
skips the test when either is missing.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class OutsideHost:
    namespace: str
    #: This host's address as the namespace sees it (the veth on this side).
    host_addr: str
    #: The namespace's own address.
    addr: str

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
    _ip("netns", "add", ns)
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
