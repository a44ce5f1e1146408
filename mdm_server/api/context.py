"""Typed keys of what the application holds (aiohttp AppKey)."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from mdm_server.audit import AuditKeys
from mdm_server.config import Config

__all__ = ["CONFIG", "POOL", "audit_keys", "master_key"]

CONFIG = web.AppKey("config", Config)
POOL = web.AppKey("pool", asyncpg.Pool)


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
