"""Cleanup of failed prebuilds on a real database (issue 15.5): the newest KEEP and any younger than KEEP_FOR
stay, the rest are deleted (reason `failed_cleanup`), bounded per pass, and the verdicts the failures
support (backoff, hard limit, validation) read the same before and after."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from reconciler.plan import DeleteAction, DeleteReason
from tests.factories import Factory
from tests.integration.reconcile_support import open_pool, pass_at, plan_of, read_plan, read_snapshot, settings_for


def days(count: float) -> timedelta:
    return timedelta(days=count)


def cleanup_of(plan_actions: tuple[object, ...]) -> tuple[object, ...]:
    return tuple(
        workspace_id
        for action in plan_actions
        if isinstance(action, DeleteAction) and action.reason is DeleteReason.FAILED_CLEANUP
        for workspace_id in action.workspace_ids
    )


async def complete_deletes(connection: asyncpg.Connection) -> None:
    """The provisioner: every pending delete job completes and its workspace is gone."""
    await connection.execute(
        "update workspaces set deleted = true where id in (select b.workspace_id from workspace_builds b "
        "join provisioner_jobs j on j.id = b.job_id where j.started_at is null and b.transition = 'delete')"
    )
    await connection.execute(
        "update provisioner_jobs set started_at = now(), completed_at = now() where started_at is null"
    )


async def test_old_failed_prebuilds_go_and_the_verdicts_stay(factory: Factory, database_url: str) -> None:
    preset = await factory.preset(desired=1)
    old = [await factory.prebuild(preset, status="failed", ago=days(age)) for age in (5, 4, 3)]
    await factory.prebuild(preset, ago=days(2.5))
    newest = [await factory.prebuild(preset, status="failed", ago=days(age)) for age in (2, 1.9, 1.8)]
    young = await factory.prebuild(preset, status="failed", ago=timedelta(hours=2))
    settings = settings_for(database_url, failed_prebuilds_keep="3", failed_prebuilds_keep_for="1d")
    now = datetime.now(UTC)

    before = await read_snapshot(factory.connection, settings, now)
    plan = await read_plan(factory.connection, settings, now)
    # The newest three stay (the hard limit's evidence too): the young one and two of `newest`; the rest go,
    # oldest first, the successful prebuild between them untouched.
    assert cleanup_of(plan_of(plan, preset).actions) == (*(workspace.id for workspace in old), newest[0].id)

    async with open_pool(database_url) as pool:
        result = await pass_at(pool, settings, now)
    assert result.execution is not None
    assert result.execution.deleted == 4
    await complete_deletes(factory.connection)

    after = await read_snapshot(factory.connection, settings, now)

    def verdicts(failures: object) -> object:
        # Everything but the streak's length, which counts back to the last success among what remains.
        return [
            (f.preset_id, f.hard_limited, f.validation_failed, f.last_error, f.last_failed_at, f.failed_workspace_ids)
            for f in failures  # type: ignore[attr-defined]
        ]

    assert verdicts(after.failures) == verdicts(before.failures)
    assert after.backoffs == before.backoffs
    assert after.hard_limited_preset_ids == before.hard_limited_preset_ids == {preset.id}
    assert after.validation_failed_preset_ids == before.validation_failed_preset_ids
    remaining = {prebuild.workspace_id for failed in after.failed_prebuilds for prebuild in failed.prebuilds}
    assert remaining == {workspace.id for workspace in (*newest[1:], young)}
    # Nothing more to clean.
    assert cleanup_of(plan_of(await read_plan(factory.connection, settings, now), preset).actions) == ()


async def test_keeping_nothing_still_deletes_at_most_ten_per_preset_and_pass(
    factory: Factory, database_url: str
) -> None:
    preset = await factory.preset(desired=0)
    for age in range(15):
        await factory.prebuild(preset, status="failed", ago=days(3 + age))
    settings = settings_for(
        database_url, failed_prebuilds_keep="0", failed_prebuilds_keep_for="0", failure_hard_limit="0"
    )
    plan = await read_plan(factory.connection, settings, datetime.now(UTC))
    # The newest is the validation check's evidence and stays; of the others, ten this pass.
    assert len(cleanup_of(plan_of(plan, preset).actions)) == 10


async def test_the_defaults_keep_three_and_a_days_worth(factory: Factory, database_url: str) -> None:
    preset = await factory.preset(desired=0)
    # Distinct times: among prebuilds failed at the same instant, the cleanup's "newest" and the hard
    # limit's may break the tie differently, and then both are kept (more, never less).
    for age in range(5):
        await factory.prebuild(preset, status="failed", ago=days(3 + age))
    for hours in (3, 4):
        await factory.prebuild(preset, status="failed", ago=timedelta(hours=hours))
    plan = await read_plan(factory.connection, settings_for(database_url), datetime.now(UTC))
    # Seven failed: the newest three stay (the two young ones among them) and the young ones anyway.
    assert len(cleanup_of(plan_of(plan, preset).actions)) == 4
