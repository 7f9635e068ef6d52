"""BEHAVIOR.md sections 1 and 5 on a real database: the hard limit, validation failures, capacity failures,
pause and resume, and the reconciliation lock, through real passes at explicit instants.

Failures are placed long enough before the pass (30 minutes and more) that backoff is over: these tests
are about what the limit does, not about backoff.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from reconciler import db
from reconciler.plan import CreateAction, CreateBlock, DeleteAction, DeleteReason
from reconciler.reconcile import PassOutcome, run_pass
from reconciler.sdnotify import SystemdNotifier
from reconciler.service import Daemon
from reconciler.snapshot import PrebuildStatus
from tests.factories import Factory, Preset, minutes, seconds
from tests.integration.reconcile_support import (
    PASS_BOOKKEEPING,
    complete_memberships,
    ids,
    open_pool,
    pass_at,
    plan_of,
    prebuild_workspaces,
    preset_row,
    settings_for,
    table_checksums,
)


async def fail_pending_jobs(connection: asyncpg.Connection, preset: Preset, at: datetime) -> int:
    """A provisioner fails every pending first build of `preset`."""
    status = await connection.execute(
        """
        update provisioner_jobs j set started_at = $2, completed_at = $2, error = 'terraform apply failed'
        from workspace_builds b
        where b.job_id = j.id and b.template_version_preset_id = $1 and j.job_status = 'pending'
        """,
        preset.id,
        at,
    )
    return int(status.split()[-1])


async def messages_of(connection: asyncpg.Connection, preset: Preset) -> list[str]:
    rows = await connection.fetch(
        "select kind from notification_messages where preset_id = $1 order by created_at, kind", preset.id
    )
    return [row["kind"] for row in rows]


async def test_limit_zero_disables_the_hard_limit(factory: Factory, pool: asyncpg.Pool, database_url: str) -> None:
    settings = settings_for(database_url, failure_hard_limit="0")
    preset = await factory.preset(desired=1)
    for age in range(40, 35, -1):
        await factory.prebuild(preset, status="failed", ago=minutes(age))

    result = await pass_at(pool, settings, factory.now)
    assert result.plan is not None
    assert not plan_of(result.plan, preset).hard_limited
    assert plan_of(result.plan, preset).actions == (CreateAction(count=1),)
    assert result.status_changes.hard_limited == ()
    assert (await preset_row(factory.connection, preset))["prebuild_status"] == "normal"


@pytest.mark.parametrize("limit", [1, 2, 3])
async def test_the_limit_is_reached_after_exactly_that_many_consecutive_failures(
    factory: Factory, pool: asyncpg.Pool, database_url: str, limit: int
) -> None:
    settings = settings_for(database_url, failure_hard_limit=str(limit))
    preset = await factory.preset(desired=1)
    for age in range(limit - 1):
        await factory.prebuild(preset, status="failed", ago=minutes(50 + age))

    # One failure short of the limit: the preset still creates.
    first = await pass_at(pool, settings, factory.now)
    assert first.plan is not None
    assert not plan_of(first.plan, preset).hard_limited
    assert plan_of(first.plan, preset).actions == (CreateAction(count=1),)
    assert (await preset_row(factory.connection, preset))["prebuild_status"] == "normal"
    # While the new prebuild is still being built it is not a failure: still not at the limit.
    building = await pass_at(pool, settings, factory.now + minutes(1))
    assert building.plan is not None
    assert not plan_of(building.plan, preset).hard_limited

    # It fails: that makes `limit` consecutive failures.
    assert await fail_pending_jobs(factory.connection, preset, factory.now + minutes(2)) == 1
    later = factory.now + minutes(30)
    limited = await pass_at(pool, settings, later)
    assert limited.plan is not None
    preset_plan = plan_of(limited.plan, preset)
    assert preset_plan.hard_limited
    assert preset_plan.actions == ()
    assert (preset_plan.create_blocked, preset_plan.creates_withheld) == (CreateBlock.HARD_LIMITED, 1)
    assert limited.status_changes.hard_limited == (preset.id,)
    row = await preset_row(factory.connection, preset)
    assert (row["prebuild_status"], row["prebuild_status_changed_at"], row["failure_episode"]) == (
        "hard_limited",
        later,
        1,
    )
    assert len(await prebuild_workspaces(factory.connection, preset)) == limit


async def test_a_success_breaks_the_streak(factory: Factory, pool: asyncpg.Pool, database_url: str) -> None:
    settings = settings_for(database_url, failure_hard_limit="3")
    preset = await factory.preset(desired=2)
    await factory.prebuild(preset, status="failed", ago=minutes(50))
    await factory.prebuild(preset, status="failed", ago=minutes(49))
    await factory.prebuild(preset, ago=minutes(48))
    await factory.prebuild(preset, status="failed", ago=minutes(47))
    await factory.prebuild(preset, status="failed", ago=minutes(46))
    # Four failures in all, but only two since the last success.

    result = await pass_at(pool, settings, factory.now)
    assert result.plan is not None
    assert not plan_of(result.plan, preset).hard_limited
    assert plan_of(result.plan, preset).actions == (CreateAction(count=1),)
    assert (await preset_row(factory.connection, preset))["prebuild_status"] == "normal"


async def test_deletions_continue_while_hard_limited(factory: Factory, pool: asyncpg.Pool, database_url: str) -> None:
    settings = settings_for(database_url, failure_hard_limit="1")
    short = await factory.preset(desired=2, ttl_seconds=3600)
    expired = await factory.prebuild(short, ago=minutes(120))
    await factory.prebuild(short, ago=minutes(50))
    await factory.prebuild(short, status="failed", ago=minutes(30))
    crowded = await factory.preset(desired=1, version=short.version)
    oldest, older, _newest = [await factory.prebuild(crowded, ago=minutes(age)) for age in (50, 45, 40)]
    await factory.prebuild(crowded, status="failed", ago=minutes(30))
    # An outdated preset of the same template is deleted as usual too.
    outdated = await factory.preset(desired=1, template=short.template, active=False)
    outdated_running = await factory.prebuild(outdated, ago=minutes(70))
    await factory.version(short.template, active=False)

    result = await pass_at(pool, settings, factory.now)
    assert result.plan is not None
    assert set(result.status_changes.hard_limited) == {short.id, crowded.id}
    short_plan = plan_of(result.plan, short)
    assert short_plan.actions == (DeleteAction(ids(expired), DeleteReason.EXPIRED),)
    assert (short_plan.create_blocked, short_plan.creates_withheld) == (CreateBlock.HARD_LIMITED, 1)
    assert plan_of(result.plan, crowded).actions == (DeleteAction(ids(oldest, older), DeleteReason.EXTRANEOUS),)
    assert plan_of(result.plan, outdated).actions == (DeleteAction(ids(outdated_running), DeleteReason.INACTIVE),)
    assert result.execution is not None
    assert (result.execution.deleted, result.execution.created) == (4, 0)


async def test_the_status_is_written_once_and_not_rewritten(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url, failure_hard_limit="1")
    preset = await factory.preset(desired=1)
    await factory.user(site_roles=["template-admin"])
    await factory.prebuild(preset, status="failed", ago=minutes(30))

    first = await pass_at(pool, settings, factory.now)
    assert first.status_changes.hard_limited == (preset.id,)
    assert first.status_changes.notifications_enqueued == 1
    written = await preset_row(factory.connection, preset)
    assert (written["prebuild_status"], written["prebuild_status_changed_at"], written["failure_episode"]) == (
        "hard_limited",
        factory.now,
        1,
    )
    assert await messages_of(factory.connection, preset) == ["hard_limited"]

    for later in (minutes(1), minutes(2), minutes(90)):
        again = await pass_at(pool, settings, factory.now + later)
        assert again.status_changes.hard_limited == ()
        assert again.status_changes.notifications_enqueued == 0
        assert again.plan is not None
        assert plan_of(again.plan, preset).create_blocked is CreateBlock.HARD_LIMITED
        assert await preset_row(factory.connection, preset) == written
        assert await messages_of(factory.connection, preset) == ["hard_limited"]


async def test_a_broken_streak_recovers_and_a_new_episode_notifies_again(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url, failure_hard_limit="1")
    preset = await factory.preset(desired=1)
    failed = await factory.prebuild(preset, status="failed", ago=minutes(30))
    await pass_at(pool, settings, factory.now)
    assert (await preset_row(factory.connection, preset))["prebuild_status"] == "hard_limited"

    # The operator removes the failed prebuild: the streak is broken; the preset recovers and creates.
    await factory.connection.execute("update workspaces set deleted = true where id = $1", failed.id)
    recovered = await pass_at(pool, settings, factory.now + minutes(1))
    assert recovered.status_changes.recovered == (preset.id,)
    assert recovered.plan is not None
    assert plan_of(recovered.plan, preset).actions == (CreateAction(count=1),)
    assert (await preset_row(factory.connection, preset))["prebuild_status"] == "normal"

    # The new prebuild fails too: a second episode, notified again.
    assert await fail_pending_jobs(factory.connection, preset, factory.now + minutes(2)) == 1
    again = await pass_at(pool, settings, factory.now + minutes(40))
    assert again.status_changes.hard_limited == (preset.id,)
    row = await preset_row(factory.connection, preset)
    assert (row["prebuild_status"], row["failure_episode"]) == ("hard_limited", 2)
    assert await messages_of(factory.connection, preset) == ["hard_limited", "recovered", "hard_limited"]


async def test_a_non_retryable_error_code_marks_validation_failed_at_once(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url, failure_hard_limit="3")
    preset = await factory.preset(desired=2)
    await factory.prebuild(preset, status="failed", error_code="REQUIRED_TEMPLATE_VARIABLES", ago=minutes(30))
    # A retryable code on another preset is an ordinary failure, one of three allowed.
    ordinary = await factory.preset(desired=1)
    await factory.prebuild(ordinary, status="failed", error_code="SOMETHING_TRANSIENT", ago=minutes(30))

    result = await pass_at(pool, settings, factory.now)
    assert result.status_changes.validation_failed == (preset.id,)
    assert result.status_changes.hard_limited == ()
    assert result.plan is not None
    preset_plan = plan_of(result.plan, preset)
    assert preset_plan.actions == ()
    assert (preset_plan.create_blocked, preset_plan.creates_withheld) == (CreateBlock.VALIDATION_FAILED, 2)
    assert plan_of(result.plan, ordinary).actions == (CreateAction(count=1),)
    assert (await preset_row(factory.connection, preset))["prebuild_status"] == "validation_failed"

    # It stays that way on later passes...
    later = await pass_at(pool, settings, factory.now + minutes(90))
    assert later.plan is not None
    assert plan_of(later.plan, preset).create_blocked is CreateBlock.VALIDATION_FAILED
    assert len(await prebuild_workspaces(factory.connection, preset)) == 1
    # ...until a new template version brings new preset rows, which start afresh.
    fixed = await factory.preset(desired=2, template=preset.template)
    after_fix = await pass_at(pool, settings, factory.now + minutes(91))
    assert after_fix.plan is not None
    assert plan_of(after_fix.plan, fixed).actions == (CreateAction(count=2),)
    assert plan_of(after_fix.plan, preset).skipped


async def test_capacity_failures_back_off_but_do_not_count_toward_the_limit(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url, failure_hard_limit="1", backoff_interval="1m")
    preset = await factory.preset(desired=1)
    await factory.prebuild(preset, status="failed", error_code="INSUFFICIENT_QUOTA", ago=seconds(30))

    backing_off = await pass_at(pool, settings, factory.now)
    assert backing_off.plan is not None
    assert [action.type for action in plan_of(backing_off.plan, preset).actions] == ["backoff"]
    assert not plan_of(backing_off.plan, preset).hard_limited

    after = await pass_at(pool, settings, factory.now + minutes(1))
    assert after.plan is not None
    assert not plan_of(after.plan, preset).hard_limited
    assert plan_of(after.plan, preset).actions == (CreateAction(count=1),)
    assert (await preset_row(factory.connection, preset))["prebuild_status"] == "normal"


async def test_capacity_failures_neither_count_nor_break_a_streak(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    # BEHAVIOR.md says only that a quota failure "does not count toward the hard limit". We read it as
    # "it is not evidence either way": skipped, so that three template failures around a quota failure
    # still stop the preset (an operator would not want a full quota to hide a broken template).
    settings = settings_for(database_url, failure_hard_limit="3")
    quota_only = await factory.preset(desired=1)
    for age in (40, 39, 38, 37):
        await factory.prebuild(quota_only, status="failed", error_code="INSUFFICIENT_QUOTA", ago=minutes(age))
    mixed = await factory.preset(desired=1)
    await factory.prebuild(mixed, status="failed", ago=minutes(40))
    await factory.prebuild(mixed, status="failed", ago=minutes(39))
    await factory.prebuild(mixed, status="failed", error_code="INSUFFICIENT_QUOTA", ago=minutes(38))
    await factory.prebuild(mixed, status="failed", ago=minutes(37))

    result = await pass_at(pool, settings, factory.now)
    assert result.plan is not None
    assert not plan_of(result.plan, quota_only).hard_limited
    assert plan_of(result.plan, quota_only).actions == (CreateAction(count=1),)
    assert plan_of(result.plan, mixed).hard_limited
    assert result.status_changes.hard_limited == (mixed.id,)


async def test_a_paused_pass_writes_nothing_until_resumed(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url, failure_hard_limit="1")
    growing = await factory.preset(desired=2)
    shrinking = await factory.preset(desired=0)
    await factory.prebuild(shrinking, ago=minutes(10))
    limited = await factory.preset(desired=1)
    await factory.prebuild(limited, status="failed", ago=minutes(30))
    await factory.set_paused(True)

    await complete_memberships(factory.connection)

    before = await table_checksums(factory.connection)
    paused = await run_pass(pool, settings, factory.now)
    assert paused.outcome is PassOutcome.PAUSED
    assert paused.execution is None
    # Planned as usual (for the gauges), but shown with the statuses as read: none was written.
    assert paused.plan is not None
    assert plan_of(paused.plan, growing).actions == (CreateAction(count=2),)
    assert paused.plan.status_changes == ()
    assert plan_of(paused.plan, limited).prebuild_status is PrebuildStatus.NORMAL
    assert await table_checksums(factory.connection) == before

    await factory.set_paused(False)
    resumed = await pass_at(pool, settings, factory.now + minutes(1))
    assert resumed.execution is not None
    assert (resumed.execution.created, resumed.execution.deleted) == (2, 1)
    assert resumed.status_changes.hard_limited == (limited.id,)
    assert len(await prebuild_workspaces(factory.connection, growing)) == 2


async def test_while_paused_the_gauges_follow_the_database_and_nothing_is_written(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    """Issue 11.5: a paused daemon keeps reading and planning, so an expiry shows in the eligible gauge."""
    settings = settings_for(database_url)
    preset = await factory.preset(desired=2, ttl_seconds=600)
    await factory.prebuilds(preset, 2, ago=minutes(5))
    await factory.set_paused(True)
    daemon = Daemon(settings, registry=CollectorRegistry(), notifier=SystemdNotifier({}))
    labels = {
        "template_name": preset.template.name,
        "preset_name": preset.name,
        "organization_name": preset.organization.name,
    }
    value = daemon.metrics.registry.get_sample_value

    await complete_memberships(factory.connection)

    before = await table_checksums(factory.connection)
    first = await run_pass(pool, settings, factory.now)
    daemon.record_pass(first)
    assert first.outcome is PassOutcome.PAUSED
    assert value("coderd_prebuilt_workspaces_eligible", labels) == 2
    assert value("coderd_prebuilt_workspaces_desired", labels) == 2
    assert value("coderd_prebuilt_workspaces_reconciliation_paused") == 1
    first_updated = value("coderd_prebuilt_workspaces_metrics_last_updated")
    assert first_updated is not None
    assert first_updated > 0

    # Six minutes on, both prebuilds are past their time-to-live: a pass would delete and replace them.
    second = await run_pass(pool, settings, factory.now + minutes(6))
    daemon.record_pass(second)
    assert second.outcome is PassOutcome.PAUSED
    assert second.plan is not None
    assert {type(action) for action in plan_of(second.plan, preset).actions} == {DeleteAction, CreateAction}
    assert value("coderd_prebuilt_workspaces_eligible", labels) == 0
    assert value("coderd_prebuilt_workspaces_running", labels) == 2
    second_updated = value("coderd_prebuilt_workspaces_metrics_last_updated")
    assert second_updated is not None
    assert second_updated > first_updated
    assert second.execution is None
    assert await table_checksums(factory.connection) == before


async def test_a_pass_skips_while_another_holds_the_lock(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=2)
    await complete_memberships(factory.connection)
    before = await table_checksums(factory.connection)

    other_replica = await asyncpg.connect(database_url)
    try:
        async with other_replica.transaction():
            assert await other_replica.fetchval("select pg_try_advisory_xact_lock($1)", db.RECONCILIATION_LOCK_KEY)
            skipped = await run_pass(pool, settings, factory.now)
            assert skipped.outcome is PassOutcome.SKIPPED_LOCK
            assert skipped.plan is None
            assert await table_checksums(factory.connection) == before
    finally:
        await other_replica.close()

    # Once the other replica releases the lock (its transaction ends), the next pass runs.
    result = await pass_at(pool, settings, factory.now)
    assert result.execution is not None
    assert result.execution.created == 2
    assert len(await prebuild_workspaces(factory.connection, preset)) == 2


async def test_a_pass_in_progress_makes_a_concurrent_pass_skip(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=3)

    # Hold the preset's row so that the first pass stops inside its create, lock held, mid-execution.
    blocker = await asyncpg.connect(database_url)
    try:
        blocking = blocker.transaction()
        await blocking.start()
        await blocker.execute("select 1 from template_version_presets where id = $1 for update", preset.id)
        first = asyncio.create_task(run_pass(pool, settings, factory.now))
        for _ in range(200):
            waiting = await factory.connection.fetchval(
                "select count(*) from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock'"
            )
            if waiting:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the first pass never reached its create")
        async with open_pool(database_url) as second_pool:
            second = await run_pass(second_pool, settings, factory.now)
        assert second.outcome is PassOutcome.SKIPPED_LOCK
        await blocking.rollback()
        first_result = await asyncio.wait_for(first, timeout=30)
    finally:
        await blocker.close()
    assert first_result.outcome is PassOutcome.SUCCESS
    assert first_result.execution is not None
    assert first_result.execution.created == 3
    assert len(await prebuild_workspaces(factory.connection, preset)) == 3


async def test_racing_passes_never_create_more_than_the_target(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url)
    presets = [await factory.preset(desired=3) for _ in range(5)]
    async with open_pool(database_url) as second_pool, open_pool(database_url) as third_pool:
        results = await asyncio.gather(
            run_pass(pool, settings, factory.now),
            run_pass(second_pool, settings, factory.now),
            run_pass(third_pool, settings, factory.now),
        )
    outcomes = [result.outcome for result in results]
    assert set(outcomes) <= {PassOutcome.SUCCESS, PassOutcome.SKIPPED_LOCK}
    assert PassOutcome.SUCCESS in outcomes
    created = [result.execution.created for result in results if result.execution is not None]
    assert sum(created) == 15
    assert sum(1 for count in created if count) == 1, "only one pass acts"
    for preset in presets:
        assert len(await prebuild_workspaces(factory.connection, preset)) == 3


async def test_reset_gives_a_hard_limited_preset_fresh_attempts(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    from reconciler.store import writes

    settings = settings_for(database_url, failure_hard_limit="2")
    preset = await factory.preset(desired=1)
    await factory.prebuild(preset, status="failed", ago=minutes(50))
    await factory.prebuild(preset, status="failed", ago=minutes(40))
    await pass_at(pool, settings, factory.now)
    assert (await preset_row(factory.connection, preset))["prebuild_status"] == PrebuildStatus.HARD_LIMITED

    assert await writes.reset_preset(factory.connection, preset.id, factory.now) is PrebuildStatus.HARD_LIMITED
    result = await pass_at(pool, settings, factory.now + minutes(1))
    assert result.plan is not None
    assert plan_of(result.plan, preset).actions == (CreateAction(count=1),)
    assert result.status_changes.hard_limited == ()
    # The one new attempt fails: one failure after the reset is below the limit of two...
    await fail_pending_jobs(factory.connection, preset, factory.now + minutes(2))
    again = await pass_at(pool, settings, factory.now + minutes(40))
    assert again.status_changes.hard_limited == ()
    # ...the second one reaches it.
    await fail_pending_jobs(factory.connection, preset, factory.now + minutes(41))
    limited = await pass_at(pool, settings, factory.now + minutes(80))
    assert limited.status_changes.hard_limited == (preset.id,)
    assert (await preset_row(factory.connection, preset))["failure_episode"] == 2


async def test_a_snapshot_error_fails_the_pass_and_the_next_one_retries(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=1)
    await complete_memberships(factory.connection)
    # Another component's botched migration: a table the snapshot reads is missing.
    await factory.connection.execute(
        "alter table template_version_preset_prebuild_schedules rename to schedules_being_migrated"
    )
    before = await table_checksums(factory.connection, skip=PASS_BOOKKEEPING)
    failed = await run_pass(pool, settings, factory.now)
    assert failed.outcome is PassOutcome.FAILED
    assert failed.error is not None
    assert "template_version_preset_prebuild_schedules" in failed.error
    assert failed.execution is None
    assert await table_checksums(factory.connection, skip=PASS_BOOKKEEPING) == before

    await factory.connection.execute(
        "alter table schedules_being_migrated rename to template_version_preset_prebuild_schedules"
    )
    retried = await pass_at(pool, settings, factory.now + minutes(1))
    assert retried.execution is not None
    assert retried.execution.created == 1
    assert len(await prebuild_workspaces(factory.connection, preset)) == 1
