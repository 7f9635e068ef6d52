"""The log events of a pass: one run_id on everything it logs, the hard-limit warning (every pass without a
state log; the daemon's: when it starts and ends, with a reminder every few minutes), bad rows once per
change, and when the pass held the reconciliation lock."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta

import asyncpg
import structlog
from structlog.testing import capture_logs

from reconciler import db
from reconciler.config import Settings
from reconciler.problem_log import ProblemLog
from reconciler.reconcile import STATE_REMINDER, PassOutcome, run_pass
from reconciler.store import writes
from tests.factories import Factory, minutes
from tests.integration.reconcile_support import open_pool, pass_at, settings_for, wait_until_blocked_by


async def test_every_event_of_a_pass_carries_its_run_id(factory: Factory, database_url: str) -> None:
    healthy = await factory.preset(desired=2)
    outdated = await factory.preset(desired=1, template=healthy.template, active=False)
    await factory.prebuild(outdated)
    settings = settings_for(database_url)
    async with open_pool(database_url) as pool:
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as events:
            first = await pass_at(pool, settings, factory.now)
            second = await pass_at(pool, settings, factory.now + timedelta(seconds=1))
    by_run = {first.run_id: 0, second.run_id: 0}
    for event in events:
        assert event.get("run_id") in by_run, event
        by_run[event["run_id"]] += 1
    assert first.run_id != second.run_id
    summaries = [event for event in events if event["event"] == "reconcile.pass"]
    assert [event["run_id"] for event in summaries] == [first.run_id, second.run_id]
    assert summaries[0]["created"] == 2
    assert summaries[0]["deleted"] == 1
    # The pass's own summary is not the only event: the writes it made logged too, with the same id.
    assert by_run[first.run_id] > 1


async def test_a_hard_limited_preset_is_warned_about_on_every_pass(factory: Factory, database_url: str) -> None:
    broken = await factory.preset(desired=1)
    for age in (30, 20, 10):
        await factory.prebuild(broken, status="failed", ago=minutes(age))
    # Past the backoff window of the newest failure, so the warning does not depend on wanting a create.
    settings = settings_for(database_url, failure_hard_limit="3", backoff_lookback="5m")
    async with open_pool(database_url) as pool:
        for offset in (0, 60, 120):
            with capture_logs() as events:
                await pass_at(pool, settings, factory.now + timedelta(seconds=offset))
            warnings = [event for event in events if event["event"] == "preset.creates_skipped_hard_limited"]
            assert [event["preset_id"] for event in warnings] == [str(broken.id)]
            assert warnings[0]["log_level"] == "warning"


async def test_the_daemon_logs_a_hard_limit_when_it_starts_reminds_and_when_it_ends(
    factory: Factory, database_url: str
) -> None:
    """Issue 12.6: 6,069 warnings in 6 minutes. With the daemon's state log: one line when creates start
    being withheld, a reminder at most every STATE_REMINDER (5 minutes), and one when they resume."""
    broken = await factory.preset(desired=1)
    for age in (30, 20, 10):
        await factory.prebuild(broken, status="failed", ago=minutes(age))
    settings = settings_for(database_url, failure_hard_limit="3", backoff_lookback="5m")
    state_log = ProblemLog(remind_every=STATE_REMINDER)
    # Passes every 30 s for 11 minutes: reminders at 5 and 10 minutes.
    offsets = [timedelta(seconds=30 * tick) for tick in range(23)]
    async with open_pool(database_url) as pool:
        with capture_logs() as events:
            for offset in offsets:
                await pass_at_with(pool, settings, factory.now + offset, state_log=state_log)
            await writes.reset_preset(factory.connection, broken.id, factory.now + offsets[-1])
            await pass_at_with(pool, settings, factory.now + offsets[-1] + timedelta(seconds=30), state_log=state_log)

    limited = [event for event in events if event["event"] == "preset.creates_skipped_hard_limited"]
    assert [event.get("reminder", False) for event in limited] == [False, True, True]
    assert {event["preset_id"] for event in limited} == {str(broken.id)}
    (resumed,) = [event for event in events if event["event"] == "preset.creates_resumed"]
    assert resumed["preset_id"] == str(broken.id)
    assert resumed["state"] == "preset.creates_skipped_hard_limited"
    assert resumed["log_level"] == "info"


async def test_a_bad_row_is_logged_once_per_change_by_the_daemon(factory: Factory, database_url: str) -> None:
    """`snapshot.bad_row` was logged on every pass; with the daemon's problem log, once, and once cleared."""
    await factory.connection.execute("alter type prebuild_status add value 'quarantined'")
    quarantined = await factory.preset(desired=1, status="quarantined")
    settings = settings_for(database_url)
    problem_log = ProblemLog()
    async with open_pool(database_url) as pool:
        with capture_logs() as events:
            for tick in range(3):
                await pass_at_with(pool, settings, factory.now + timedelta(minutes=tick), problem_log=problem_log)
            await factory.connection.execute(
                "update template_version_presets set prebuild_status = 'normal' where id = $1", quarantined.id
            )
            await pass_at_with(pool, settings, factory.now + timedelta(minutes=3), problem_log=problem_log)

    (bad,) = [event for event in events if event["event"] == "snapshot.bad_row"]
    assert bad["preset_id"] == str(quarantined.id)
    assert bad["preset_name"] == quarantined.name
    assert bad["consequence"] == "preset skipped this pass"
    (cleared,) = [event for event in events if event["event"] == "preset.problem_cleared"]
    assert (cleared["preset_id"], cleared["problem"]) == (str(quarantined.id), "snapshot.bad_row")
    summaries = [event for event in events if event["event"] == "reconcile.pass"]
    assert [event["bad_rows"] for event in summaries] == [1, 1, 1, 0]  # still counted on every pass


async def pass_at_with(pool: asyncpg.Pool, settings: Settings, now: datetime, **logs: ProblemLog) -> None:
    result = await run_pass(pool, settings, now, **logs)  # type: ignore[arg-type]
    assert result.outcome is PassOutcome.SUCCESS, result.error


# The reconciliation lock in this test's database (pg_locks shows every database of the server).
RECONCILIATION_LOCKS = (
    "select count(*) from pg_locks where locktype = 'advisory' and objid = $1 "
    "and database = (select oid from pg_database where datname = current_database())"
)


async def test_a_pass_logs_when_it_held_the_reconciliation_lock(
    factory: Factory, database_url: str, connection: asyncpg.Connection
) -> None:
    """`lock_held_from`/`lock_held_until` (the soak's proof that replicas' passes never overlap) cover a
    moment the lock is seen held, and lie within the pass."""
    preset = await factory.preset(desired=1)
    settings = settings_for(database_url)
    platform = await asyncpg.connect(database_url)
    try:
        async with open_pool(database_url) as pool:
            with capture_logs() as events:
                before = time.time()
                # The platform holds the preset's row: the pass's create waits, with the lock held.
                transaction = platform.transaction()
                await transaction.start()
                await platform.execute("select 1 from template_version_presets where id = $1 for update", preset.id)
                running = asyncio.create_task(pass_at(pool, settings, factory.now))
                await wait_until_blocked_by(connection, platform.get_server_pid(), running)
                held = await connection.fetchval(RECONCILIATION_LOCKS + " and granted", db.RECONCILIATION_LOCK_KEY)
                during = time.time()
                await transaction.commit()
                await running
                after = time.time()
            released = await connection.fetchval(RECONCILIATION_LOCKS, db.RECONCILIATION_LOCK_KEY)
    finally:
        await platform.close()
    (summary,) = [event for event in events if event["event"] == "reconcile.pass"]
    assert (held, released) == (1, 0)
    assert before <= summary["lock_held_from"] <= during <= summary["lock_held_until"] <= after
