"""``serve``'s broker-identity task as an aiohttp cleanup context."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from mdm_server.api.context import CONFIG
from mdm_server.broker.identity import BrokerReconciler

__all__ = ["RECONCILER", "broker_identity_ctx"]

RECONCILER = web.AppKey("broker_reconciler", BrokerReconciler)


async def broker_identity_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run :class:`BrokerReconciler` for the life of the app (when there is a
    Mosquitto: MDM_MQTT_URL). It never raises: an unmanageable broker is logged,
    retried, and does not stop ingest."""
    if app[CONFIG].mqtt is None:
        # No Mosquitto (MDM_AMQP_URL only): the cluster asks the broker hook, which
        # reads the database at every question; there are no accounts to keep.
        yield
        return
    reconciler = BrokerReconciler(app[CONFIG])
    app[RECONCILER] = reconciler
    task = asyncio.create_task(reconciler.run(), name="broker-identity")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
