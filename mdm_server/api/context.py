"""Typed keys of what the application holds (aiohttp AppKey)."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from mdm_server.audit import AuditKeys
from mdm_server.config import Config
from mdm_server.storage.keyring import Keyring

__all__ = ["CONFIG", "KEYRING", "POOL", "audit_keys", "keyring", "master_key"]

CONFIG = web.AppKey("config", Config)
POOL = web.AppKey("pool", asyncpg.Pool)
KEYRING = web.AppKey("keyring", Keyring)


def master_key(request: web.Request) -> bytes:
    """The master key (``serve`` refuses to start without one): it opens the
    device data keys that telemetry is sealed under."""
    key = request.app[CONFIG].master_key
    if key is None:
        raise web.HTTPServiceUnavailable(reason="the server has no master key")
    return key


def audit_keys(request: web.Request) -> AuditKeys:
    """The audit log's keys: audited actions MAC their entries, reads check them."""
    return AuditKeys.derive(master_key(request))


def keyring(request: web.Request) -> Keyring:
    """The key ring device data keys are wrapped under (``serve`` refuses to start
    without MDM_KEYRING_DIR and the master key)."""
    ring = request.app.get(KEYRING)
    if ring is None:
        raise web.HTTPServiceUnavailable(reason="the server has no key ring")
    return ring
