from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.services import (
    Broker,
    create_database,
    drop_database,
    running_broker,
)


@pytest.fixture
def database() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database (real server), dropped afterwards."""
    url = asyncio.run(create_database())
    try:
        yield url
    finally:
        asyncio.run(drop_database(url))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A private Mosquitto with the project's configuration."""
    with running_broker(tmp_path) as b:
        yield b
