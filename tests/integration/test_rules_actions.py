"""BEHAVIOR.md sections 3 and 4 on a real database: the actions of real passes and the rows they write.

Every pass runs at an explicit `now` (the factory's, unless the test moves the clock).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from reconciler import executor
from reconciler.plan import BackoffAction, CancelPendingAction, CreateAction, DeleteAction, DeleteReason
from reconciler.reconcile import PassOutcome, run_pass
from reconciler.snapshot import PREBUILDS_SYSTEM_USER_ID
from tests.factories import Factory, minutes, seconds
from tests.integration.reconcile_support import (
    PASS_BOOKKEEPING,
    builds_of,
    complete_memberships,
    ids,
    pass_at,
    plan_of,
    prebuild_workspaces,
    read_plan,
    settings_for,
    table_checksums,
    workspace_row,
)

PREBUILD_NAME = re.compile(r"^prebuild-[a-z2-7]+$")


async def test_create_writes_a_workspace_a_first_build_and_a_pending_job(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=2)

    result = await pass_at(pool, settings, factory.now)
    assert result.execution is not None
    assert result.execution.created == 2

    workspaces = await prebuild_workspaces(factory.connection, preset)
    assert len(workspaces) == 2
    assert len({workspace["name"] for workspace in workspaces}) == 2
    for workspace in workspaces:
        assert PREBUILD_NAME.match(workspace["name"]), workspace["name"]
        assert workspace["owner_id"] == PREBUILDS_SYSTEM_USER_ID
        assert workspace["organization_id"] == preset.organization.id
        assert workspace["template_id"] == preset.template.id
        assert workspace["created_at"] == factory.now
        assert not workspace["deleted"]
        (build,) = await builds_of(factory.connection, workspace["id"])
        assert build["build_number"] == 1
        assert build["transition"] == "start"
        assert build["template_version_id"] == preset.version.id
        assert build["template_version_preset_id"] == preset.id
        assert build["initiator_id"] == PREBUILDS_SYSTEM_USER_ID
        assert build["reason"] == "initiator"
        assert build["created_at"] == factory.now
        assert build["job_status"] == "pending"
        assert build["job_type"] == "workspace_build"
        assert build["job_initiator_id"] == PREBUILDS_SYSTEM_USER_ID
        assert build["job_organization_id"] == preset.organization.id
        assert build["input"] == {"workspace_build_id": str(build["id"])}
        assert build["worker_id"] is None

    # The next pass sees them as starting, and creates nothing more.
    again = await pass_at(pool, settings, factory.now + minutes(1))
    assert again.plan is not None
    assert plan_of(again.plan, preset).state.starting == 2
    assert plan_of(again.plan, preset).actions == ()
    assert len(await prebuild_workspaces(factory.connection, preset)) == 2


async def test_delete_appends_a_delete_build_on_the_last_build_version(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=1)
    # The oldest prebuild was later rebuilt on another version by builds that name no preset: its delete
    # build must use the last build's version, not the preset's.
    other_version = await factory.version(preset.template, active=False)
    oldest = await factory.prebuild(preset, ago=minutes(60))
    await factory.build(oldest, transition="stop", ago=minutes(50))
    await factory.build(oldest, preset=False, version=other_version, ago=minutes(40))
    newest = await factory.prebuild(preset, ago=minutes(10))

    result = await pass_at(pool, settings, factory.now)
    assert result.plan is not None
    assert plan_of(result.plan, preset).actions == (DeleteAction(ids(oldest), DeleteReason.EXTRANEOUS),)
    assert result.execution is not None
    assert result.execution.deleted == 1

    builds = await builds_of(factory.connection, oldest.id)
    assert [build["build_number"] for build in builds] == [1, 2, 3, 4]
    delete = builds[-1]
    assert delete["transition"] == "delete"
    assert delete["template_version_id"] == other_version.id
    assert delete["template_version_preset_id"] is None
    assert delete["initiator_id"] == PREBUILDS_SYSTEM_USER_ID
    assert delete["reason"] == "initiator"
    assert delete["created_at"] == factory.now
    assert delete["job_status"] == "pending"
    assert delete["job_type"] == "workspace_build"
    assert delete["job_initiator_id"] == PREBUILDS_SYSTEM_USER_ID
    assert delete["input"] == {"workspace_build_id": str(delete["id"])}
    # The workspace is marked deleted by whoever completes the job, not by us.
    assert not (await workspace_row(factory.connection, oldest.id))["deleted"]
    assert len(await builds_of(factory.connection, newest.id)) == 1

    # The next pass does not delete it again: it is no longer running. (Nor is it `deleting`: that counts
    # builds on the active version only, and this delete build is on the version it was last built with.)
    again = await pass_at(pool, settings, factory.now + minutes(1))
    assert again.plan is not None
    assert plan_of(again.plan, preset).state.deleting == 0
    assert plan_of(again.plan, preset).state.actual == 1
    assert plan_of(again.plan, preset).actions == ()
    assert len(await builds_of(factory.connection, oldest.id)) == 4


async def test_extraneous_prebuilds_are_deleted_oldest_first(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=2)
    # Created out of order on purpose: the order is by created_at, not by insertion.
    middle = await factory.prebuild(preset, ago=minutes(20))
    newest = await factory.prebuild(preset, ago=minutes(5))
    oldest = await factory.prebuild(preset, ago=minutes(40))
    newer = await factory.prebuild(preset, ago=minutes(10))

    result = await pass_at(pool, settings, factory.now)
    assert result.plan is not None
    assert plan_of(result.plan, preset).actions == (DeleteAction(ids(oldest, middle), DeleteReason.EXTRANEOUS),)
    for workspace, builds in ((oldest, 2), (middle, 2), (newer, 1), (newest, 1)):
        assert len(await builds_of(factory.connection, workspace.id)) == builds


async def test_expired_prebuilds_go_first_then_extraneous_ones(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=2, ttl_seconds=3600)
    expired = await factory.prebuild(preset, ago=minutes(120))
    oldest_fresh = await factory.prebuild(preset, ago=minutes(50))
    await factory.prebuild(preset, ago=minutes(40))
    await factory.prebuild(preset, ago=minutes(30))

    result = await pass_at(pool, settings, factory.now)
    assert result.plan is not None
    assert plan_of(result.plan, preset).actions == (
        DeleteAction(ids(expired), DeleteReason.EXPIRED),
        DeleteAction(ids(oldest_fresh), DeleteReason.EXTRANEOUS),
    )
    assert result.execution is not None
    assert result.execution.deleted == 2
    assert result.execution.created == 0


async def test_expired_prebuilds_are_replaced(factory: Factory, pool: asyncpg.Pool, database_url: str) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=2, ttl_seconds=600)
    expired = await factory.prebuilds(preset, 2, ago=minutes(11))

    result = await pass_at(pool, settings, factory.now)
    assert result.plan is not None
    delete, create = plan_of(result.plan, preset).actions
    assert isinstance(delete, DeleteAction)
    assert (set(delete.workspace_ids), delete.reason) == (set(ids(*expired)), DeleteReason.EXPIRED)
    assert create == CreateAction(count=2)
    assert result.execution is not None
    assert (result.execution.deleted, result.execution.created) == (2, 2)


async def test_starting_counts_toward_the_target_but_stopping_and_deleting_do_not(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=4)
    await factory.prebuild(preset, ago=minutes(30))
    await factory.prebuild(preset, status="running", ago=minutes(1))
    stopping = await factory.prebuild(preset, ago=minutes(20))
    await factory.build(stopping, transition="stop", status="running")
    deleting = await factory.prebuild(preset, ago=minutes(20))
    await factory.build(deleting, transition="delete", status="running")

    result = await pass_at(pool, settings, factory.now)
    assert result.plan is not None
    assert plan_of(result.plan, preset).actions == (CreateAction(count=4 - 1 - 1),)
    assert result.execution is not None
    assert result.execution.created == 2


async def test_in_progress_deletes_do_not_reduce_extraneous(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=1)
    older = await factory.prebuild(preset, ago=minutes(30))
    await factory.prebuild(preset, ago=minutes(20))
    being_deleted = await factory.prebuild(preset, ago=minutes(40))
    await factory.build(being_deleted, transition="delete", status="running")

    result = await pass_at(pool, settings, factory.now)
    assert result.plan is not None
    assert plan_of(result.plan, preset).state.deleting == 1
    assert plan_of(result.plan, preset).actions == (DeleteAction(ids(older), DeleteReason.EXTRANEOUS),)


async def test_outdated_version_deletes_running_and_cancels_pending_first_builds(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url)
    old_version = await factory.version()
    old = await factory.preset(old_version, desired=3)
    running_older = await factory.prebuild(old, ago=minutes(60))
    running_newer = await factory.prebuild(old, ago=minutes(30))
    waiting = await factory.prebuild(old, status="pending", ago=minutes(2))
    picked_up_meanwhile = await factory.prebuild(old, status="pending", ago=minutes(2))
    # Assigned to a provisioner before the snapshot (worker set, not started yet): not pending for us.
    assigned = await factory.workspace(old, created_at=factory.now - minutes(2))
    await factory.build(assigned, status="pending", worker_id=PREBUILDS_SYSTEM_USER_ID, ago=minutes(2))
    building = await factory.prebuild(old, status="running", ago=minutes(2))
    new_version = await factory.version(old.template)
    new = await factory.preset(new_version, desired=1)

    plan = await read_plan(factory.connection, settings, factory.now)
    assert plan_of(plan, old).actions == (
        CancelPendingAction(count=2),
        DeleteAction(ids(running_older, running_newer), DeleteReason.INACTIVE),
    )
    assert plan_of(plan, new).actions == (CreateAction(count=1),)

    # A provisioner picks one of the two pending jobs up between the plan and its execution.
    picked_job = picked_up_meanwhile.builds[0].job_id
    await factory.connection.execute(
        "update provisioner_jobs set worker_id = gen_random_uuid(), started_at = $2 where id = $1",
        picked_job,
        factory.now,
    )
    summary = await executor.execute(pool, plan, factory.now)
    assert (summary.canceled, summary.deleted, summary.created, summary.presets_failed) == (1, 2, 1, 0)

    # The waiting job is canceled and completed now; its workspace gets a delete build completed at once.
    canceled_build, delete_build = await builds_of(factory.connection, waiting.id)
    assert canceled_build["job_status"] == "canceled"
    assert canceled_build["canceled_at"] == factory.now
    assert canceled_build["completed_at"] == factory.now
    assert delete_build["build_number"] == 2
    assert delete_build["transition"] == "delete"
    assert delete_build["template_version_id"] == old_version.id
    assert delete_build["template_version_preset_id"] is None
    assert delete_build["initiator_id"] == PREBUILDS_SYSTEM_USER_ID
    assert delete_build["job_status"] == "succeeded"
    assert delete_build["completed_at"] == factory.now
    assert (await workspace_row(factory.connection, waiting.id))["deleted"]

    # The jobs provisioners hold are left alone.
    for workspace, status in ((picked_up_meanwhile, "running"), (assigned, "pending"), (building, "running")):
        (only_build,) = await builds_of(factory.connection, workspace.id)
        assert only_build["job_status"] == status
        assert not (await workspace_row(factory.connection, workspace.id))["deleted"]

    # Running prebuilds of the old version get an ordinary delete build.
    for workspace in (running_older, running_newer):
        delete = (await builds_of(factory.connection, workspace.id))[-1]
        assert (delete["transition"], delete["job_status"], delete["template_version_id"]) == (
            "delete",
            "pending",
            old_version.id,
        )

    # The next pass leaves the old preset alone: nothing running, nothing pending without a worker.
    again = await pass_at(pool, settings, factory.now + minutes(1))
    assert again.plan is not None
    assert plan_of(again.plan, old).skipped
    assert plan_of(again.plan, new).actions == ()


async def test_cancel_pending_skips_a_job_locked_by_a_provisioner(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url)
    old = await factory.preset(desired=2)
    free = await factory.prebuild(old, status="pending")
    being_picked = await factory.prebuild(old, status="pending")
    await factory.version(old.template)  # a new active version: `old` is outdated

    plan = await read_plan(factory.connection, settings, factory.now)
    assert plan_of(plan, old).actions == (CancelPendingAction(count=2),)
    # A provisioner is claiming this job right now (it holds the row lock in its transaction).
    provisioner = await asyncpg.connect(database_url)
    try:
        transaction = provisioner.transaction()
        await transaction.start()
        await provisioner.execute(
            "select 1 from provisioner_jobs where id = $1 for update", being_picked.builds[0].job_id
        )
        summary = await executor.execute(pool, plan, factory.now)
        await transaction.rollback()
    finally:
        await provisioner.close()
    assert summary.canceled == 1
    assert (await workspace_row(factory.connection, free.id))["deleted"]
    assert not (await workspace_row(factory.connection, being_picked.id))["deleted"]
    assert [build["job_status"] for build in await builds_of(factory.connection, being_picked.id)] == ["pending"]


async def test_a_prebuild_claimed_between_plan_and_execute_is_not_deleted(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=1)
    older = await factory.prebuild(preset, ago=minutes(30))
    newer = await factory.prebuild(preset, ago=minutes(10))

    plan = await read_plan(factory.connection, settings, factory.now)
    assert plan_of(plan, preset).actions == (DeleteAction(ids(older), DeleteReason.EXTRANEOUS),)
    user = await factory.claim(older)
    summary = await executor.execute(pool, plan, factory.now)

    assert (summary.deleted, summary.deletes_skipped, summary.presets_failed) == (0, 1, 0)
    assert len(await builds_of(factory.connection, older.id)) == 1
    assert (await workspace_row(factory.connection, older.id))["owner_id"] == user.id
    assert len(await builds_of(factory.connection, newer.id)) == 1


async def test_a_prebuild_already_being_deleted_is_not_deleted_twice(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=0)
    first = await factory.prebuild(preset, ago=minutes(20))
    second = await factory.prebuild(preset, ago=minutes(10))

    plan = await read_plan(factory.connection, settings, factory.now)
    assert plan_of(plan, preset).actions == (DeleteAction(ids(first, second), DeleteReason.EXTRANEOUS),)
    # Another replica (or an operator) deleted the first one meanwhile.
    await factory.build(first, transition="delete", status="pending")
    summary = await executor.execute(pool, plan, factory.now)

    assert (summary.deleted, summary.deletes_skipped) == (1, 1)
    assert [build["transition"] for build in await builds_of(factory.connection, first.id)] == ["start", "delete"]
    assert [build["transition"] for build in await builds_of(factory.connection, second.id)] == ["start", "delete"]


async def test_creates_are_clamped_to_a_lowered_target(factory: Factory, pool: asyncpg.Pool, database_url: str) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=3)
    plan = await read_plan(factory.connection, settings, factory.now)
    assert plan_of(plan, preset).actions == (CreateAction(count=3),)

    await factory.connection.execute(
        "update template_version_presets set desired_instances = 1 where id = $1", preset.id
    )
    summary = await executor.execute(pool, plan, factory.now)
    assert (summary.created, summary.creates_clamped) == (1, 2)
    assert len(await prebuild_workspaces(factory.connection, preset)) == 1


async def test_creates_are_clamped_by_prebuilds_created_meanwhile(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=3)
    plan = await read_plan(factory.connection, settings, factory.now)
    assert plan_of(plan, preset).actions == (CreateAction(count=3),)

    # Another replica created two between this plan and its execution.
    await factory.prebuilds(preset, 2, status="pending")
    summary = await executor.execute(pool, plan, factory.now)
    assert (summary.created, summary.creates_clamped) == (1, 2)
    assert len(await prebuild_workspaces(factory.connection, preset)) == 3


async def test_a_raised_target_does_not_raise_the_planned_creates(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=2)
    plan = await read_plan(factory.connection, settings, factory.now)
    await factory.connection.execute(
        "update template_version_presets set desired_instances = 5 where id = $1", preset.id
    )
    summary = await executor.execute(pool, plan, factory.now)
    assert summary.created == 2
    assert len(await prebuild_workspaces(factory.connection, preset)) == 2


@pytest.mark.parametrize("change", ["new_version", "deleted", "deprecated", "hard_limited", "no_prebuilds"])
async def test_no_creates_for_a_preset_that_changed_since_the_plan(
    factory: Factory, pool: asyncpg.Pool, database_url: str, change: str
) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=2)
    plan = await read_plan(factory.connection, settings, factory.now)
    assert plan_of(plan, preset).actions == (CreateAction(count=2),)

    statements = {
        "new_version": None,
        "deleted": "update templates set deleted = true where id = $1",
        "deprecated": "update templates set deprecated = 'gone' where id = $1",
        "hard_limited": "update template_version_presets set prebuild_status = 'hard_limited' "
        "where template_version_id = (select active_version_id from templates where id = $1)",
        "no_prebuilds": "update template_version_presets set desired_instances = null "
        "where template_version_id = (select active_version_id from templates where id = $1)",
    }
    statement = statements[change]
    if statement is None:
        await factory.version(preset.template)
    else:
        await factory.connection.execute(statement, preset.template.id)
    summary = await executor.execute(pool, plan, factory.now)
    assert (summary.created, summary.creates_clamped, summary.presets_failed) == (0, 2, 0)
    assert await prebuild_workspaces(factory.connection, preset) == []


# --- backoff (BEHAVIOR.md 3.1) ----------------------------------------------------------------------------


async def test_backoff_lasts_through_its_boundary_instant(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url, backoff_interval="1m", failure_hard_limit="0")
    preset = await factory.preset(desired=2)
    newest_failure = factory.now - minutes(10)
    await factory.prebuild(preset, status="failed", created_at=newest_failure - seconds(30))
    await factory.prebuild(preset, status="failed", created_at=newest_failure)
    until = newest_failure + 2 * minutes(1)  # last_build_at + num_failed x interval

    await complete_memberships(factory.connection)

    before = await table_checksums(factory.connection, skip=PASS_BOOKKEEPING)
    for now in (newest_failure + seconds(1), until - seconds(1), until):
        result = await pass_at(pool, settings, now)
        assert result.plan is not None
        preset_plan = plan_of(result.plan, preset)
        assert preset_plan.actions == (BackoffAction(until=until, num_failed=2),), now
        assert preset_plan.backoff_until == until
    # Backing off writes nothing.
    assert await table_checksums(factory.connection, skip=PASS_BOOKKEEPING) == before

    after = await pass_at(pool, settings, until + seconds(1))
    assert after.plan is not None
    assert plan_of(after.plan, preset).actions == (CreateAction(count=2),)
    assert after.execution is not None
    assert after.execution.created == 2


async def test_backoff_applies_to_inactive_presets_too(factory: Factory, pool: asyncpg.Pool, database_url: str) -> None:
    # A deprecated template's preset is not active, yet its failures are on the template's active version:
    # backoff is checked first, active or not, so even its deletions wait.
    settings = settings_for(database_url, failure_hard_limit="0")
    template = await factory.template(deprecated="retired")
    preset = await factory.preset(desired=1, template=template)
    running = await factory.prebuild(preset, ago=minutes(30))
    await factory.prebuild(preset, status="failed", ago=seconds(10))

    result = await pass_at(pool, settings, factory.now)
    assert result.plan is not None
    assert [action.type for action in plan_of(result.plan, preset).actions] == ["backoff"]
    after = await pass_at(pool, settings, factory.now + minutes(2))
    assert after.plan is not None
    assert plan_of(after.plan, preset).actions == (DeleteAction(ids(running), DeleteReason.INACTIVE),)


async def test_failures_outside_the_lookback_window_do_not_back_off(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    # A long interval, so that only the window decides: either failure would still back off otherwise.
    settings = settings_for(database_url, backoff_interval="2h", backoff_lookback="1h", failure_hard_limit="0")
    outside = await factory.preset(desired=1)
    await factory.prebuild(outside, status="failed", ago=minutes(61))
    at_edge = await factory.preset(desired=1)
    await factory.prebuild(at_edge, status="failed", ago=minutes(60))
    inside = await factory.preset(desired=1)
    await factory.prebuild(inside, status="failed", ago=minutes(59))

    result = await pass_at(pool, settings, factory.now)
    assert result.plan is not None
    assert plan_of(result.plan, outside).actions == (CreateAction(count=1),)
    # The window includes its start instant.
    assert plan_of(result.plan, at_edge).actions == (
        BackoffAction(until=factory.now - minutes(60) + timedelta(hours=2), num_failed=1),
    )
    assert plan_of(result.plan, inside).actions == (
        BackoffAction(until=factory.now - minutes(59) + timedelta(hours=2), num_failed=1),
    )
    assert len(await prebuild_workspaces(factory.connection, outside)) == 2
    assert len(await prebuild_workspaces(factory.connection, inside)) == 1


async def test_num_failed_counts_failures_beyond_the_newest_n(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url, backoff_interval="1m", failure_hard_limit="0")
    preset = await factory.preset(desired=1)
    for age in (4, 3, 2):
        await factory.prebuild(preset, status="failed", ago=minutes(age))
    # Outside the window: not counted.
    await factory.prebuild(preset, status="failed", ago=minutes(90))

    result = await pass_at(pool, settings, factory.now)
    assert result.plan is not None
    # Only the newest prebuild (N = 1) decides that the preset backs off, and it gives last_build_at;
    # all three failures in the window make the delay.
    assert plan_of(result.plan, preset).actions == (
        BackoffAction(until=factory.now - minutes(2) + 3 * minutes(1), num_failed=3),
    )


async def test_no_backoff_when_the_newest_n_prebuilds_did_not_fail(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url, failure_hard_limit="0")
    preset = await factory.preset(desired=2)
    await factory.prebuild(preset, status="failed", ago=minutes(3))
    await factory.prebuild(preset, ago=minutes(2))
    await factory.prebuild(preset, status="pending", ago=minutes(1))
    # A claimed prebuild's failure is no longer the preset's, nor is a failed prebuild that was deleted.
    claimed = await factory.prebuild(preset, status="failed", ago=seconds(30))
    await factory.claim(claimed)
    removed = await factory.prebuild(preset, status="failed", ago=seconds(20))
    await factory.connection.execute("update workspaces set deleted = true where id = $1", removed.id)

    result = await pass_at(pool, settings, factory.now)
    assert result.plan is not None
    preset_plan = plan_of(result.plan, preset)
    assert preset_plan.backoff_until is None
    assert preset_plan.state.actual == 1
    assert preset_plan.state.starting == 1
    assert preset_plan.actions == ()


async def test_failures_on_a_deleted_template_do_not_back_off(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url, failure_hard_limit="0")
    preset = await factory.preset(desired=1, template=await factory.template(deleted=True))
    running = await factory.prebuild(preset, ago=minutes(30))
    await factory.prebuild(preset, status="failed", ago=seconds(10))

    result = await pass_at(pool, settings, factory.now)
    assert result.plan is not None
    assert plan_of(result.plan, preset).actions == (DeleteAction(ids(running), DeleteReason.INACTIVE),)


async def test_creates_are_clamped_to_a_lowered_target_when_no_schedule_applies(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    # The preset has a schedule, but it does not cover `now` (a Sunday-only schedule, on a Monday): the
    # target is `desired_instances`, and lowering it between plan and execution must clamp the creates.
    settings = settings_for(database_url)
    preset = await factory.preset(desired=3, timezone="UTC", schedules=[("* * * * 0", 6)])
    monday = datetime(2026, 1, 5, 12, tzinfo=UTC)
    plan = await read_plan(factory.connection, settings, monday)
    assert plan_of(plan, preset).actions == (CreateAction(count=3),)

    await factory.connection.execute(
        "update template_version_presets set desired_instances = 1 where id = $1", preset.id
    )
    summary = await executor.execute(pool, plan, monday)
    assert (summary.created, summary.creates_clamped) == (1, 2)
    assert len(await prebuild_workspaces(factory.connection, preset)) == 1


async def test_a_schedule_target_is_kept_when_desired_instances_changes(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    # While a schedule applies, it alone gives the target: lowering `desired_instances` changes nothing.
    settings = settings_for(database_url)
    preset = await factory.preset(desired=1, timezone="UTC", schedules=[("* * * * 1", 3)])
    monday = datetime(2026, 1, 5, 12, tzinfo=UTC)
    plan = await read_plan(factory.connection, settings, monday)
    assert plan_of(plan, preset).actions == (CreateAction(count=3),)

    await factory.connection.execute(
        "update template_version_presets set desired_instances = 0 where id = $1", preset.id
    )
    summary = await executor.execute(pool, plan, monday)
    assert summary.created == 3


async def test_an_error_on_one_preset_does_not_stop_the_others(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url)
    # The broken preset deletes an expired prebuild, then fails to create its replacement.
    broken = await factory.preset(desired=2, ttl_seconds=3600)
    expired = await factory.prebuild(broken, ago=minutes(90))
    await factory.prebuild(broken, ago=minutes(30))
    healthy = [await factory.preset(desired=1) for _ in range(3)]
    # A real database error on the broken preset's template only: every insert of a workspace fails.
    await factory.connection.execute(
        f"""
        create function refuse_workspaces() returns trigger language plpgsql as $$
        begin
            if new.template_id = '{broken.template.id}' then
                raise exception 'out of disk space';
            end if;
            return new;
        end $$;
        create trigger refuse_workspaces before insert on workspaces
            for each row execute function refuse_workspaces();
        """
    )

    result = await run_pass(pool, settings, factory.now)
    assert result.outcome is PassOutcome.SUCCESS
    assert result.execution is not None
    assert result.execution.presets_failed == 1
    assert result.execution.failed_preset_ids == [broken.id]
    assert (result.execution.created, result.execution.deleted) == (3, 1)
    for preset in healthy:
        assert len(await prebuild_workspaces(factory.connection, preset)) == 1
    # The delete before the failing create stays done; the create left nothing half-written.
    assert [build["transition"] for build in await builds_of(factory.connection, expired.id)] == ["start", "delete"]
    assert len(await prebuild_workspaces(factory.connection, broken)) == 2
    orphans = await factory.connection.fetchval(
        "select count(*) from provisioner_jobs j "
        "where not exists (select 1 from workspace_builds b where b.job_id = j.id)"
    )
    assert orphans == 0
