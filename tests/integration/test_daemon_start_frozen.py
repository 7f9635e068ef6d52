"""A stop while the daemon starts, against a database that froze under its schema check (issue 12.4)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from reconciler import db
from reconciler.config import load_settings
from reconciler.service import STOP_TASKS_SECONDS, Daemon
from tests.tcp_proxy import TcpProxy


async def test_cancelling_a_start_stuck_in_its_schema_check_is_bounded(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with TcpProxy.to(database_url) as proxy:
        settings = load_settings(
            {
                "RECONCILER_DATABASE_URL": proxy.dsn(database_url),
                "RECONCILER_HTTP_ADDRESS": "127.0.0.1:0",
                # The schema check's own client deadline would end the wait after 15 s.
                "RECONCILER_STATEMENT_TIMEOUT": "10s",
            }
        )
        real_create_pool = db.create_pool

        async def create_then_freeze(*arguments: Any, **options: Any) -> asyncpg.Pool:
            pool = await real_create_pool(*arguments, **options)
            # The network fails right after the pool's first connection: the schema check gets no answer.
            proxy.freeze()
            return pool

        monkeypatch.setattr(db, "create_pool", create_then_freeze)
        daemon = Daemon(settings, registry=CollectorRegistry())
        starting = asyncio.create_task(daemon.start())
        try:
            # Until the schema check's query is held by the frozen network.
            assert await asyncio.to_thread(proxy.holding.wait, 30)
            cancelled_at = time.monotonic()
            await daemon.cancel_start(starting)
            took = time.monotonic() - cancelled_at
            assert starting.done()
            # The polite end waits STOP_TASKS_SECONDS, then the pool being tried is terminated.
            assert took < 2 * STOP_TASKS_SECONDS + 1, took
        finally:
            proxy.thaw()
            await asyncio.wait_for(daemon.stop(), timeout=30)
