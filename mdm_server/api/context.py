"""Typed keys of what the application holds (aiohttp AppKey)."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from mdm_server.config import Config

__all__ = ["CONFIG", "POOL"]

CONFIG = web.AppKey("config", Config)
POOL = web.AppKey("pool", asyncpg.Pool)
