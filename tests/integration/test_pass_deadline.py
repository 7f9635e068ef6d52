"""A pass ends by its deadline whatever the database does (issue 12.4): a real freeze, through a proxy."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import asyncpg

from reconciler import db, reconcile
from reconciler.reconcile import PassOutcome, run_pass
from tests.factories import Factory
from tests.integration.reconcile_support import live_prebuilds, settings_for
from tests.tcp_proxy import TcpProxy

LOCK_HOLDERS = """
select count(*) from pg_locks
where locktype = 'advisory' and granted and classid = 0 and objid = $1 and objsubid = 1
      and database = (select oid from pg_database where datname = current_database())
"""


async def test_a_pass_against_a_frozen_database_ends_by_its_deadline_and_the_next_one_runs(
    factory: Factory, database_url: str, connection: asyncpg.Connection
) -> None:
    preset = await factory.preset(desired=1)
    settings = settings_for(database_url, statement_timeout="1s", pass_timeout="2s")
    with TcpProxy.to(database_url) as proxy:
        pool = await db.create_pool(proxy.dsn(database_url), max_size=12, statement_timeout=settings.statement_timeout)
        try:
            proxy.freeze()
            started = time.monotonic()
            frozen = await run_pass(pool, settings, datetime.now(UTC))
            elapsed = time.monotonic() - started
            assert frozen.outcome is PassOutcome.FAILED
            assert frozen.error is not None
            assert frozen.error.startswith("PassDeadlineError"), frozen.error
            # The deadline, then at most the cancel's grace and the closing of its connections.
            deadline = settings.pass_timeout.total_seconds()
            assert deadline <= elapsed < deadline + 2 * reconcile.CLEANUP_SECONDS + 1, elapsed
            assert await live_prebuilds(connection) == {}

            proxy.thaw()
            # A connection closed while frozen reaches the server only now; its session goes with it.
            while await connection.fetchval(LOCK_HOLDERS, db.RECONCILIATION_LOCK_KEY):  # noqa: ASYNC110 - the server's state
                await asyncio.sleep(0.05)
            recovered = await run_pass(pool, settings, datetime.now(UTC))
            assert recovered.outcome is PassOutcome.SUCCESS, recovered.error
            assert await live_prebuilds(connection) == {preset.id: 1}
        finally:
            proxy.thaw()
            await asyncio.wait_for(pool.close(), timeout=30)
