"""Faults of the database under a pass (issue 8): killed connections, statement timeouts, a full disk.

Each test breaks something real on a real server, checks that the pass fails cleanly or isolates the
damage to one preset, and then that the next pass, with the same pool, succeeds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from reconciler import db, executor
from reconciler.config import Settings, load_settings
from reconciler.executor import ActionOutcome
from reconciler.metrics import Metrics
from reconciler.plan import CreateAction
from reconciler.reconcile import PassOutcome, PassResult, read_plan, run_pass
from tests.factories import Factory, Preset
from tests.integration.reconcile_support import live_prebuilds

# Our pools and connections (db.create_pool, db.connect) name themselves so; the test's own do too.
APPLICATION_NAME = "reconciler"


def settings_for(database_url: str, **environment: str) -> Settings:
    return load_settings({"RECONCILER_DATABASE_URL": database_url, **environment})


async def open_pool(settings: Settings) -> asyncpg.Pool:
    assert settings.database_url is not None
    return await db.create_pool(
        settings.database_url.get_secret_value(),
        max_size=settings.pool_max_size,
        statement_timeout=settings.statement_timeout,
    )


@pytest.fixture
async def outsider(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of "another component", not named like ours, so that it is never terminated."""
    connection = await asyncpg.connect(database_url, server_settings={"application_name": "platform"})
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def watcher(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """The test's eyes on pg_stat_activity (never inside a transaction) and its hand on backends."""
    connection = await asyncpg.connect(database_url, server_settings={"application_name": "watcher"})
    try:
        yield connection
    finally:
        await connection.close()


async def assert_no_partial_prebuild(connection: asyncpg.Connection) -> None:
    """Every workspace has its first build and that build its job; every job belongs to a build."""
    orphans = await connection.fetchval(
        "select count(*) from workspaces w where not exists "
        "(select 1 from workspace_builds b where b.workspace_id = w.id and b.build_number = 1)"
    )
    jobless = await connection.fetchval(
        "select count(*) from workspace_builds b "
        "where not exists (select 1 from provisioner_jobs j where j.id = b.job_id)"
    )
    buildless = await connection.fetchval(
        "select count(*) from provisioner_jobs j "
        "where not exists (select 1 from workspace_builds b where b.job_id = j.id)"
    )
    assert (orphans, jobless, buildless) == (0, 0, 0)


async def wait_until_waiting_on_lock(watcher: asyncpg.Connection, within: float = 30) -> None:
    """Until one of our backends (a pass) waits on a lock held by the test.

    `watcher` must not be inside a transaction: pg_stat_activity is read once per transaction.
    """
    deadline = time.monotonic() + within
    while True:
        waiting = await watcher.fetchval(
            "select count(*) from pg_stat_activity where datname = current_database() "
            "and application_name = $1 and wait_event_type = 'Lock'",
            APPLICATION_NAME,
        )
        if waiting:
            return
        assert time.monotonic() < deadline, "no pass ever waited on the test's lock"
        await asyncio.sleep(0.05)


async def terminate_our_backends(watcher: asyncpg.Connection, *spared: asyncpg.Connection) -> int:
    """pg_terminate_backend every backend of our application name, except the `spared` connections'."""
    terminated = await watcher.fetchval(
        "select count(*) filter (where pg_terminate_backend(pid)) from pg_stat_activity "
        "where datname = current_database() and application_name = $1 and pid <> all($2::int[])",
        APPLICATION_NAME,
        [watcher.get_server_pid(), *(connection.get_server_pid() for connection in spared)],
    )
    return int(terminated)


async def pass_now(pool: asyncpg.Pool, settings: Settings, metrics: Metrics | None = None) -> PassResult:
    return await run_pass(pool, settings, datetime.now(UTC), observe_action=metrics.observe_action if metrics else None)


async def presets(factory: Factory, count: int, desired: int = 1) -> list[Preset]:
    return [await factory.preset(desired=desired) for _ in range(count)]


# --- connections terminated by the server -----------------------------------------------------------


async def test_backends_terminated_mid_pass_fail_it_and_the_next_pass_succeeds(
    factory: Factory, database_url: str, outsider: asyncpg.Connection, watcher: asyncpg.Connection
) -> None:
    blocked, *others = await presets(factory, 3, desired=2)
    settings = settings_for(database_url)
    pool = await open_pool(settings)
    try:
        # The test holds the blocked preset's row: the pass waits inside its create, mid-pass.
        async with outsider.transaction():
            await outsider.execute("select 1 from template_version_presets where id = $1 for update", blocked.id)
            in_flight = asyncio.create_task(pass_now(pool, settings))
            await wait_until_waiting_on_lock(watcher)
            # The pass's lock holder and its create, at least.
            assert await terminate_our_backends(watcher, factory.connection) >= 2
            result = await asyncio.wait_for(in_flight, timeout=30)
        # The pass lost its lock connection: it failed, with the reason, and did not crash.
        assert result.outcome is PassOutcome.FAILED
        assert result.error is not None
        assert "terminat" in result.error.lower() or "connection" in result.error.lower(), result.error
        await assert_no_partial_prebuild(outsider)
        assert blocked.id not in await live_prebuilds(outsider)

        # Same pool: the dead connections are replaced, and the next pass finishes the job.
        with capture_logs() as events:
            recovered = await pass_now(pool, settings)
        assert recovered.outcome is PassOutcome.SUCCESS, recovered.error
        assert recovered.execution is not None
        assert recovered.execution.presets_failed == 0
        assert not [event for event in events if event["log_level"] == "error"]
        assert await live_prebuilds(outsider) == {preset.id: 2 for preset in (blocked, *others)}
        await assert_no_partial_prebuild(outsider)
    finally:
        await pool.close()


async def test_idle_pool_connections_terminated_between_passes_are_replaced(
    factory: Factory, database_url: str, outsider: asyncpg.Connection, watcher: asyncpg.Connection
) -> None:
    first, second = await presets(factory, 2)
    settings = settings_for(database_url)
    pool = await open_pool(settings)
    try:
        assert (await pass_now(pool, settings)).outcome is PassOutcome.SUCCESS
        assert await terminate_our_backends(watcher, factory.connection) >= 1
        await outsider.execute("update template_version_presets set desired_instances = 3 where id = $1", first.id)
        await asyncio.sleep(0.2)  # let the client notice the closed sockets, as a real idle gap would

        result = await pass_now(pool, settings)

        assert result.outcome is PassOutcome.SUCCESS, result.error
        assert await live_prebuilds(outsider) == {first.id: 3, second.id: 1}
    finally:
        await pool.close()


# --- statement timeouts -----------------------------------------------------------------------------


async def test_a_snapshot_past_the_statement_timeout_fails_the_pass_cleanly(
    factory: Factory, database_url: str, outsider: asyncpg.Connection
) -> None:
    preset = await factory.preset(desired=2)
    settings = settings_for(database_url, RECONCILER_STATEMENT_TIMEOUT="1s")
    pool = await open_pool(settings)
    try:
        # Another component holds an exclusive lock on workspaces (a long migration, say).
        async with outsider.transaction():
            await outsider.execute("lock table workspaces in access exclusive mode")
            started = time.monotonic()
            with capture_logs() as events:
                result = await pass_now(pool, settings)
            elapsed = time.monotonic() - started
        assert result.outcome is PassOutcome.FAILED
        assert result.error is not None
        assert "QueryCanceledError" in result.error
        assert "statement timeout" in result.error
        assert 1 <= elapsed < 10
        # One error line (the pass's), no traceback: a timeout is an outage, not a bug.
        errors = [event for event in events if event["log_level"] == "error"]
        assert [event["event"] for event in errors] == ["reconcile.pass"]
        assert not [event for event in events if event["event"] == "reconcile.pass_crashed"]
        assert await live_prebuilds(outsider) == {}

        result = await pass_now(pool, settings)
        assert result.outcome is PassOutcome.SUCCESS, result.error
        assert await live_prebuilds(outsider) == {preset.id: 2}
    finally:
        await pool.close()


async def test_a_create_past_the_statement_timeout_fails_only_its_preset(
    factory: Factory, database_url: str, outsider: asyncpg.Connection
) -> None:
    blocked, *others = await presets(factory, 3, desired=2)
    settings = settings_for(database_url, RECONCILER_STATEMENT_TIMEOUT="1s")
    pool = await open_pool(settings)
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    try:
        async with outsider.transaction():
            await outsider.execute("select 1 from template_version_presets where id = $1 for update", blocked.id)
            with capture_logs() as events:
                result = await pass_now(pool, settings, metrics)
        assert result.outcome is PassOutcome.SUCCESS, result.error
        assert result.execution is not None
        assert result.execution.failed_preset_ids == [blocked.id]
        assert result.execution.created == 4
        (failed,) = [event for event in events if event["event"] == "reconcile.preset_failed"]
        assert failed["preset_id"] == str(blocked.id)
        assert "statement timeout" in failed["error"]
        assert (
            metrics.registry.get_sample_value(
                "prebuilds_reconciler_actions_total", {"kind": "create", "outcome": "error", "reason": ""}
            )
            == 2  # the prebuilds of the failed create, not the action
        )
        assert await live_prebuilds(outsider) == {preset.id: 2 for preset in others}

        result = await pass_now(pool, settings)
        assert result.outcome is PassOutcome.SUCCESS, result.error
        assert await live_prebuilds(outsider) == {preset.id: 2 for preset in (blocked, *others)}
    finally:
        await pool.close()


# --- a full disk ------------------------------------------------------------------------------------

DISK_FULL_TRIGGER = """
create table test_disk_full_presets (preset_id uuid primary key);
create function test_disk_full() returns trigger language plpgsql as $$
begin
    if exists (select 1 from test_disk_full_presets where preset_id = new.template_version_preset_id) then
        raise exception 'could not extend file "base/16384/16421": No space left on device'
            using errcode = '53100', hint = 'Check free disk space.';
    end if;
    return new;
end $$;
-- On the last insert of a create (the build): the workspace and job rows before it must roll back too.
create trigger test_disk_full before insert on workspace_builds
    for each row execute function test_disk_full();
"""


async def test_a_disk_full_insert_fails_one_preset_and_the_rest_are_created(
    factory: Factory, database_url: str, outsider: asyncpg.Connection
) -> None:
    full, *others = await presets(factory, 4, desired=2)
    await outsider.execute(DISK_FULL_TRIGGER)
    await outsider.execute("insert into test_disk_full_presets values ($1)", full.id)
    settings = settings_for(database_url)
    pool = await open_pool(settings)
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    try:
        with capture_logs() as events:
            result = await pass_now(pool, settings, metrics)

        assert result.outcome is PassOutcome.SUCCESS, result.error
        assert result.execution is not None
        assert result.execution.presets_failed == 1
        assert result.execution.failed_preset_ids == [full.id]
        assert result.execution.created == 6
        assert result.execution.actions[("create", ActionOutcome.ERROR)] == 1
        assert result.execution.actions[("create", ActionOutcome.SUCCESS)] == 3
        assert (
            metrics.registry.get_sample_value(
                "prebuilds_reconciler_actions_total", {"kind": "create", "outcome": "error", "reason": ""}
            )
            == 2  # the prebuilds of the failed create, not the action
        )
        (failed,) = [event for event in events if event["event"] == "reconcile.preset_failed"]
        assert failed["preset_id"] == str(full.id)
        assert failed["preset_name"] == full.name
        assert failed["template_name"] == full.template.name
        assert failed["error"].startswith("DiskFullError: could not extend file")
        (summary,) = [event for event in events if event["event"] == "reconcile.pass"]
        assert (summary["outcome"], summary["created"], summary["presets_failed"]) == ("success", 6, 1)
        # Atomic: nothing of the failed creates is left behind, not even the workspace or job rows.
        assert await live_prebuilds(outsider) == {preset.id: 2 for preset in others}
        await assert_no_partial_prebuild(outsider)
        assert await outsider.fetchval("select count(*) from workspaces where template_id = $1", full.template.id) == 0

        # Space is back: the next pass creates the missing ones, and only those.
        await outsider.execute("delete from test_disk_full_presets")
        result = await pass_now(pool, settings, metrics)
        assert result.outcome is PassOutcome.SUCCESS, result.error
        assert result.execution is not None
        assert (result.execution.created, result.execution.presets_failed) == (2, 0)
        assert await live_prebuilds(outsider) == {preset.id: 2 for preset in (full, *others)}
    finally:
        await pool.close()


# --- the platform changing a preset during a pass ----------------------------------------------------


async def test_schedules_replaced_after_the_snapshot_clamp_the_creates(factory: Factory, database_url: str) -> None:
    """BEHAVIOR.md 3.6: the create clamps to a target computed afresh, schedules included.

    Found by the soak's reasoning: a pass read a schedule giving 5, the platform then replaced it by one
    that does not apply (so `desired_instances`, 1, decides), and the pass created 5.
    """
    settings = settings_for(database_url)
    lowered = await factory.preset(desired=1, timezone="UTC", schedules=[("* * * * *", 5)])
    raised = await factory.preset(desired=1, timezone="UTC", schedules=[("* * 31 2 *", 5)])
    now = datetime.now(UTC)
    plan = await read_plan(factory.connection, settings, now)
    assert {preset_plan.preset.id: preset_plan.actions for preset_plan in plan.presets} == {
        lowered.id: (CreateAction(count=5),),
        raised.id: (CreateAction(count=1),),
    }
    # The platform swaps the two presets' schedules between the snapshot and the writes.
    await factory.connection.execute(
        "update template_version_preset_prebuild_schedules set cron_expression = "
        "case when preset_id = $1 then '* * 31 2 *' else '* * * * *' end",
        lowered.id,
    )
    pool = await open_pool(settings)
    try:
        summary = await executor.execute(pool, plan, now)
    finally:
        await pool.close()
    assert (summary.created, summary.creates_clamped) == (2, 4)
    # Never above the plan's count either: the raised one gets its 4 more on the next pass.
    assert await live_prebuilds(factory.connection) == {lowered.id: 1, raised.id: 1}
