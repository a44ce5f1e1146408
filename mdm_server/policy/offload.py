"""Policy work off the event loop.

Decoding a stored policy's JSON, parsing it (every zone validated by GEOS),
compiling, merging and explaining it, and encoding the answer take seconds for a
policy with thousands of zones (about 2 s for 7 MB). ``serve`` answers every
tenant's HTTP requests and runs the in-process ingest on one event loop, so none of
that may run on it: :func:`policy_work` runs it on a small pool of threads of its
own (``POLICY_THREADS``), which leaves the default executor (DNS, ``to_thread``)
alone.

Fair between tenants: a tenant has at most one job on the pool at a time (the
tenant is the request's, set by the API's middleware with :func:`for_tenant`), so
one tenant's heavy requests queue behind each other while other tenants' policy
work gets the other threads. Work without a tenant (retention) shares one turn.

What remains on the loop while a job runs is the GIL: Python hands it back to the
loop every few milliseconds, but a single C call holds it throughout, the longest
being the JSON decoding of a stored body (a few hundred milliseconds for 8 MiB).
Other requests are slowed by that much at worst, never held for the whole job.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

__all__ = ["POLICY_THREADS", "for_tenant", "policy_work"]

POLICY_THREADS = 2

P = ParamSpec("P")
T = TypeVar("T")

_executor: ThreadPoolExecutor | None = None
_lock = threading.Lock()
_tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar("policy_tenant",
                                                                    default=None)
_turns: dict[str | None, asyncio.Semaphore] = {}


def _pool() -> ThreadPoolExecutor:
    global _executor  # one pool per process, made on first use
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=POLICY_THREADS,
                                           thread_name_prefix="policy")
        return _executor


def for_tenant(tenant: str) -> None:
    """The current task (an API request) works for ``tenant``: its policy work
    takes that tenant's turn."""
    _tenant.set(tenant)


async def policy_work(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` on the policy threads, in the current tenant's turn;
    its result or its exception."""
    tenant = _tenant.get()
    turn = _turns.get(tenant)
    if turn is None:
        turn = _turns[tenant] = asyncio.Semaphore(1)
    await turn.acquire()
    try:
        job = asyncio.get_running_loop().run_in_executor(
            _pool(), functools.partial(fn, *args, **kwargs))
    except BaseException:
        turn.release()
        raise
    # The turn ends when the thread is done, even if the request is cancelled first.
    job.add_done_callback(lambda _: turn.release())
    return await job
