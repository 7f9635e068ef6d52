"""The pass lock holds for the whole pass, however long its writes take (issue 13.4)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import asyncpg

from reconciler import db
from reconciler.reconcile import PassOutcome, run_pass
from reconciler.store import reads
from tests.factories import Factory
from tests.integration.reconcile_support import live_prebuilds, settings_for

# Every build insert sleeps: the executor's create takes 2.5 s, while the pass's lock connection waits.
SLOW_CREATES = """
create function test_slow_create() returns trigger language plpgsql as $$
begin
    perform pg_sleep(2.5);
    return new;
end $$;
create trigger test_slow_create before insert on workspace_builds
    for each row execute function test_slow_create();
"""
# The server ends a session idle in its transaction for this long: scaled down from the daemon's 60 s.
IDLE_IN_TRANSACTION = timedelta(seconds=1)

# pg_locks is the whole server's: other databases (other tests') hold the same key, so only this one's count.
SAMPLE = """
select
    (select count(*) from pg_locks
     where locktype = 'advisory' and granted and classid = 0 and objid = $1 and objsubid = 1
      and database = (select oid from pg_database where datname = current_database())) as holders,
    (select max(extract(epoch from clock_timestamp() - query_start))::float8 from pg_stat_activity
     where application_name = 'reconciler' and wait_event = 'PgSleep'
       and datname = current_database()) as sleeping_for
"""
LOCK_HOLDERS = """
select l.pid from pg_locks l
where l.locktype = 'advisory' and l.granted and l.classid = 0 and l.objid = $1 and l.objsubid = 1
    and l.database = (select oid from pg_database where datname = current_database())
"""


async def test_the_lock_holds_through_writes_longer_than_the_idle_in_transaction_timeout(
    factory: Factory, database_url: str, connection: asyncpg.Connection
) -> None:
    preset = await factory.preset(desired=1)
    await connection.execute(SLOW_CREATES)
    settings = settings_for(database_url)
    pool = await db.create_pool(database_url, max_size=12, idle_in_transaction_timeout=IDLE_IN_TRANSACTION)
    try:
        in_flight = asyncio.create_task(run_pass(pool, settings, datetime.now(UTC)))
        # From another connection, throughout the pass: how many backends hold the lock, and for how long
        # the executor's create has slept (null when it is not sleeping), both read at one instant. The
        # lock connection went idle before the create began, so it has been idle at least that long.
        samples: list[tuple[int, float | None]] = []
        while not in_flight.done():
            row = await connection.fetchrow(SAMPLE, db.RECONCILIATION_LOCK_KEY)
            assert row is not None
            samples.append((row["holders"], row["sleeping_for"]))
            await asyncio.sleep(0.05)
        result = in_flight.result()
        assert result.outcome is PassOutcome.SUCCESS, result.error
        assert result.execution is not None
        assert result.execution.created == 1
        during = [(holders, sleeping_for) for holders, sleeping_for in samples if sleeping_for is not None]
        # Every sample taken while the create slept saw the lock held, including some taken well past the
        # idle-in-transaction timeout.
        assert during, samples
        assert all(holders == 1 for holders, _ in during), samples
        assert max(sleeping_for for _, sleeping_for in during) > 1.5 * IDLE_IN_TRANSACTION.total_seconds(), samples
        assert await live_prebuilds(connection) == {preset.id: 1}
        # Released at the end of the pass.
        assert await connection.fetch(LOCK_HOLDERS, db.RECONCILIATION_LOCK_KEY) == []
    finally:
        await pool.close()


async def test_the_writes_stop_as_soon_as_the_lock_connection_is_lost(
    factory: Factory, database_url: str, connection: asyncpg.Connection
) -> None:
    for _ in range(2):
        await factory.preset(desired=1)
    await connection.execute(SLOW_CREATES)
    # One preset at a time: the second preset's create would start only after the first one's.
    settings = settings_for(database_url, executor_concurrency="1")
    pool = await db.create_pool(database_url, max_size=12)
    try:
        in_flight = asyncio.create_task(run_pass(pool, settings, datetime.now(UTC)))
        while not await connection.fetchval(
            "select count(*) > 0 from pg_stat_activity where application_name = 'reconciler' and wait_event = 'PgSleep'"
            # This test's database only: another test's pass may sleep at the same moment (seen with -n 2).
            " and datname = current_database()"
        ):
            assert not in_flight.done(), in_flight.result()
            await asyncio.sleep(0.02)
        # Another component (or a failover) ends the session that holds the lock, mid-write.
        holder = await connection.fetchval(LOCK_HOLDERS, db.RECONCILIATION_LOCK_KEY)
        assert await connection.fetchval("select pg_terminate_backend($1)", holder)
        lost_at = asyncio.get_running_loop().time()
        result = await in_flight
        stopped_after = asyncio.get_running_loop().time() - lost_at
        assert result.outcome is PassOutcome.FAILED
        assert result.error is not None
        assert result.error.startswith("LockLostError"), result.error
        # Stopped at once, not after the sleeping create (2.5 s) and the next one: nothing was written
        # after the lock was lost, and the create in flight was rolled back.
        assert stopped_after < 2.0, stopped_after
        assert await live_prebuilds(connection) == {}
    finally:
        await pool.close()


async def test_a_holder_that_stops_saying_anything_loses_the_lock_after_the_idle_limit(
    database_url: str, connection: asyncpg.Connection
) -> None:
    """A replica stopped mid-pass (SIGSTOP, a paused VM) holds the lock only until its session has idled
    for the limit (the pass deadline and a margin in the daemon; 1 s here); a released lock lifts it."""
    holder = await db.connect(database_url)
    try:
        assert await reads.try_reconciliation_lock(holder, timedelta(seconds=1))
        assert await connection.fetchval(LOCK_HOLDERS, db.RECONCILIATION_LOCK_KEY) == holder.get_server_pid()
        assert await reads.release_reconciliation_lock(holder)
        # Released: the session may idle as long as it likes again.
        await asyncio.sleep(1.5)
        assert await holder.fetchval("select 1") == 1

        assert await reads.try_reconciliation_lock(holder, timedelta(seconds=1))
        taken = time.monotonic()
        # The holder says nothing more: the server ends its session, and the lock goes with it.
        while await connection.fetchval(LOCK_HOLDERS, db.RECONCILIATION_LOCK_KEY) is not None:
            assert time.monotonic() - taken < 10, "the idle holder kept the lock"
            await asyncio.sleep(0.1)
        assert time.monotonic() - taken >= 1.0
    finally:
        holder.terminate()
