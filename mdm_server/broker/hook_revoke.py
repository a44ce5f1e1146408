"""Revocation on a broker that asks the hook: close the device's connections at once.

A broker that asks :mod:`mdm_server.broker.hook` checks credentials when a client
logs in and permissions when it publishes or subscribes (RabbitMQ caches both for
``auth_cache.cache_ttl``; its MQTT plugin also remembers a connection's allowed
topics for the connection's life). A revoked device's *next* check is refused,
but a connection that is open stays open, and one that only listens for commands
asks nothing more. So ``serve`` closes the connections of a device whose
credentials end, through RabbitMQ's management API (``MDM_AMQP_MANAGEMENT_URL``,
as the server's broker user, which the hook tags ``administrator``):

- at once, on NOTIFY ``mdm_device_credentials`` (sent in the transaction that
  revokes or re-enrolls the device, mdm_server/storage/devices.py): ``DELETE
  /api/connections/username/{user}`` on the first node that answers (the call
  closes the user's connections on every node of the cluster); and once more
  when the broker's cache of the device's log-in has expired (``cache_ttl_s`` + 1
  s: within the TTL a device may log in again with the cached answer);
- and every ``sweep_s`` (and whenever the database connection comes back, which
  may have missed notifications): the connections of users that are not a
  current principal (a device revoked, re-enrolled... or unknown) are closed.

On EMQX (``MDM_EMQX_API_URL`` and an API key) the same, through its REST API v5:
``DELETE /api/v5/clients/{clientid}`` (a device's client id is its username: the
hook refuses any other) and ``GET /api/v5/clients?page=N&limit=L`` for the sweep
(``data[].username``, ``meta.hasnext``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
from urllib.parse import quote

import aiohttp
import asyncpg

from mdm_server.broker.amqp import ssl_context
from mdm_server.broker.hook import BrokerHook, parse_username
from mdm_server.broker.hook_config import AmqpSettings, EmqxApi
from mdm_server.storage.devices import CREDENTIALS_CHANNEL
from mdm_server.storage.pool import connect

__all__ = ["ConnectionCloser", "ManagementError"]

log = logging.getLogger(__name__)


class ManagementError(Exception):
    """No management node answered (the message names no secret)."""


class ConnectionCloser:
    """Closes revoked devices' connections through a broker's management API:
    RabbitMQ's (``AmqpSettings`` with management URLs, as the server's broker user)
    or EMQX's (``EmqxApi``, with its API key)."""

    def __init__(self, database_url: str, hook: BrokerHook, api: AmqpSettings | EmqxApi, *,
                 sweep_s: float = 60.0, timeout_s: float = 10.0,
                 cache_ttl_s: float = 5.0, page: int = 1000) -> None:
        self._database_url = database_url
        self._hook = hook
        self._sweep_s = sweep_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        # (username, closed once already): a user is closed at once and again once
        # the broker's cache of its log-in has expired (it may have come back with
        # the cached allow in between).
        self._queue: asyncio.Queue[tuple[str, bool]] = asyncio.Queue()
        self._again_s = cache_ttl_s + 1.0
        self._page = page
        self.closed_users = 0  # users whose connections were closed (counted, not named)
        self._tls: ssl.SSLContext | None = None
        if isinstance(api, EmqxApi):
            self._emqx = True
            self._urls = api.urls
            user, password = api.key, api.secret
        else:
            self._emqx = False
            self._urls = api.management_urls
            user, password = api.username, api.password
            if api.ca_file is not None:  # the cluster's own CA signs its https:// too
                self._tls = ssl_context(api)
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        self._auth = {"Authorization": f"Basic {basic}"}

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self._queue.put_nowait((payload, False))

    async def _call(self, session: aiohttp.ClientSession, method: str, path: str
                    ) -> object:
        """``method path`` on the first management node that answers; its JSON (or
        None for a body-less answer). A 404 (nothing to close) is an answer too."""
        last = "no node"
        for base in self._urls:
            try:
                async with session.request(method, base.rstrip("/") + path, ssl=self._tls or True,
                                           headers=self._auth, timeout=self._timeout) as resp:
                    if resp.status == 404 or resp.status == 204:
                        return None
                    if resp.status >= 400:
                        last = f"HTTP {resp.status}"
                        continue
                    if resp.content_type == "application/json":
                        return await resp.json()
                    return None
            except (TimeoutError, aiohttp.ClientError) as exc:
                last = type(exc).__name__
        raise ManagementError(f"no management node answered ({last})")

    async def close_user(self, session: aiohttp.ClientSession, username: str) -> None:
        name = quote(username, safe="")
        await self._call(session, "DELETE", f"/api/v5/clients/{name}" if self._emqx
                         else f"/api/connections/username/{name}")
        self.closed_users += 1

    async def _connected_users(self, session: aiohttp.ClientSession) -> set[str]:
        if not self._emqx:
            listed = await self._call(session, "GET", "/api/connections?columns=user")
            return {str(c.get("user")) for c in listed if isinstance(c, dict)} \
                if isinstance(listed, list) else set()
        users: set[str] = set()
        page = 1
        while True:
            body = await self._call(session, "GET",
                                    f"/api/v5/clients?page={page}&limit={self._page}")
            if not isinstance(body, dict):
                return users
            users |= {str(c.get("username")) for c in body.get("data", [])
                      if isinstance(c, dict)}
            meta = body.get("meta")
            if not (isinstance(meta, dict) and meta.get("hasnext")):
                return users
            page += 1

    async def sweep(self, session: aiohttp.ClientSession) -> int:
        """Close the connections of users that are no current principal; how many
        users. The server's own connections are left alone."""
        users = await self._connected_users(session)
        # Only devices' names: the server's, or users made by hand, are left alone.
        devices = sorted(u for u in users if parse_username(u) is not None)
        enrolled = await self._hook.enrolled_among(devices)
        closed = 0
        for user in devices:
            if user not in enrolled:
                await self.close_user(session, user)
                closed += 1
        return closed

    async def run(self) -> None:
        """Until cancelled; never raises (a management API away is retried)."""
        conn: asyncpg.Connection | None = None
        retry_s = 1.0
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    if conn is None or conn.is_closed():
                        conn = await connect(self._database_url)
                        await conn.add_listener(CREDENTIALS_CHANNEL, self._notified)
                        closed = await self.sweep(session)  # what was missed meanwhile
                        if closed:
                            log.info("broker hook: closed the connections of %d user(s) "
                                     "no longer enrolled", closed)
                    try:
                        user, again = await asyncio.wait_for(self._queue.get(),
                                                             self._sweep_s)
                    except TimeoutError:
                        await self.sweep(session)
                    else:
                        try:
                            await self.close_user(session, user)
                        except ManagementError:
                            self._queue.put_nowait((user, again))  # after the pause
                            raise
                        if not again:
                            asyncio.get_running_loop().call_later(
                                self._again_s, self._queue.put_nowait, (user, True))
                    retry_s = 1.0
                except ManagementError as exc:
                    log.warning("broker hook: connections not closed: %s; retrying in "
                                "%.0f s", exc, retry_s)
                    await asyncio.sleep(retry_s)
                    retry_s = min(retry_s * 2, 30.0)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("broker hook: revocations not followed (database: %s); "
                                "retrying in %.0f s", type(exc).__name__, retry_s)
                    if conn is not None:
                        conn.terminate()
                        conn = None
                    await asyncio.sleep(retry_s)
                    retry_s = min(retry_s * 2, 30.0)
                except asyncio.CancelledError:
                    if conn is not None and not conn.is_closed():
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(conn.close(), 5)
                    raise
