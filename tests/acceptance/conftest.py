"""Fixtures of the acceptance tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest


@pytest.fixture
async def platform(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """The test's own connection, playing the platform, named so that nobody mistakes it for the daemon's."""
    connection = await asyncpg.connect(database_url, server_settings={"application_name": "platform"})
    try:
        yield connection
    finally:
        await connection.close()
