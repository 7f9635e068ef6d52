"""The create clamp (DECISIONS.md, "Creates are clamped at write time") where the soak found it wrong.

A platform change committed while the create waits for the preset's lock. Issue 11.2: the short soak
saw a preset receive creates after its target dropped. The interleaving, made explicit step by step:

1. a pass plans creates for the preset from its snapshot (target 3);
2. the platform locks the preset's row and lowers its target (replaces the schedule, publishes a new
   version, or lowers `desired_instances`), without committing yet;
3. the pass's create asks for the same row lock and waits;
4. the platform commits; the create gets the lock.

The create must then clamp against what the platform committed. PostgreSQL's `SELECT ... FOR UPDATE`
under READ COMMITTED re-reads only the locked row itself once the lock is granted (and only if that row
was updated); everything else the statement read, such as the preset's schedules or its template's
active version, comes from the snapshot taken when the statement started, before the platform
committed. So the lock and the reads it protects must be separate statements.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
import pytest

from reconciler import executor
from reconciler.demo.platform import publish_template_version
from reconciler.plan import CreateAction
from tests.factories import Factory, Preset
from tests.integration.reconcile_support import open_pool, plan_of, read_plan, settings_for, wait_until_blocked_by

ALWAYS = "* * * * *"
NEVER = "* * 31 2 *"

# What a platform change does to the preset, inside the transaction that holds the preset's row lock.
Change = Callable[[asyncpg.Connection, Preset], Awaitable[None]]


async def replace_schedule(connection: asyncpg.Connection, preset: Preset) -> None:
    # The schedule that gave 3 no longer applies: `desired_instances` (0) decides.
    await connection.execute(
        "update template_version_preset_prebuild_schedules set cron_expression = $2 where preset_id = $1",
        preset.id,
        NEVER,
    )


async def publish_version(connection: asyncpg.Connection, preset: Preset) -> None:
    # The preset's version is no longer active: its target is 0.
    assert await publish_template_version(connection, preset.template.id, "v2", datetime.now(UTC))


async def lower_desired(connection: asyncpg.Connection, preset: Preset) -> None:
    await connection.execute("update template_version_presets set desired_instances = 0 where id = $1", preset.id)


CHANGES: dict[str, tuple[int, tuple[tuple[str, int], ...], Change]] = {
    # name: (desired_instances, schedules, change lowering the target from 3 to 0)
    "schedule replaced": (0, ((ALWAYS, 3),), replace_schedule),
    "new version published": (3, (), publish_version),
    "desired lowered": (3, (), lower_desired),
}


@pytest.fixture
async def platform(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url, server_settings={"application_name": "platform"})
    try:
        yield connection
    finally:
        await connection.close()


@pytest.mark.parametrize("change_name", list(CHANGES))
async def test_a_target_lowered_while_the_create_waits_for_the_lock_clamps_it(
    factory: Factory, database_url: str, platform: asyncpg.Connection, change_name: str
) -> None:
    desired, schedules, change = CHANGES[change_name]
    preset = await factory.preset(desired=desired, timezone="UTC", schedules=schedules)
    settings = settings_for(database_url)
    now = datetime.now(UTC)
    plan = await read_plan(factory.connection, settings, now)
    assert plan_of(plan, preset).actions == (CreateAction(count=3),)

    async with open_pool(database_url) as pool:
        transaction = platform.transaction()
        await transaction.start()
        try:
            await platform.execute("select 1 from template_version_presets where id = $1 for update", preset.id)
            await change(platform, preset)
            creating = asyncio.create_task(executor.execute(pool, plan, now))
            await wait_until_blocked_by(factory.connection, platform.get_server_pid(), creating)
        except BaseException:
            await transaction.rollback()
            raise
        await transaction.commit()
        summary = await creating

    assert (summary.created, summary.creates_clamped, summary.presets_failed) == (0, 3, 0)
    live = await factory.connection.fetchval(
        "select count(*) from workspace_builds where template_version_preset_id = $1", preset.id
    )
    assert live == 0


async def test_the_clamp_counts_a_prebuild_restarted_by_a_build_naming_no_preset(
    factory: Factory, database_url: str
) -> None:
    """The clamp counts live prebuilds by their current preset, as the plan does (BEHAVIOR.md section 2).

    A prebuild stopped and started again by a build that names no preset is still its preset's: counted
    by the latest build's preset instead, it was missed, and the create went one above the target.
    """
    preset = await factory.preset(desired=2)
    await factory.prebuild(preset)
    restarted = await factory.prebuild(preset)
    await factory.build(restarted, transition="stop")
    settings = settings_for(database_url)
    now = datetime.now(UTC)
    plan = await read_plan(factory.connection, settings, now)
    assert plan_of(plan, preset).actions == (CreateAction(count=1),)
    # The platform starts it again before the pass writes.
    await factory.build(restarted, transition="start", preset=False, status="pending")

    async with open_pool(database_url) as pool:
        summary = await executor.execute(pool, plan, now)

    assert (summary.created, summary.creates_clamped) == (0, 1)
    assert (
        await factory.connection.fetchval(
            "select count(*) from workspace_builds where template_version_preset_id = $1 and build_number = 1",
            preset.id,
        )
        == 2
    )
