"""Done-when of issue 3: a fleet of a few hundred presets, in mixed states, converges in one pass.

The fleet spans several organizations, templates and versions: active presets below, at and above their
targets, with expired, invalidated, failed, stopped, claimed and in-progress prebuilds, schedules, a
preset reaching its hard limit; outdated presets with running and pending prebuilds; deleted and
deprecated templates. One pass runs; then a simulated provisioner completes every job (starts succeed
with a ready agent, deletes complete and mark their workspace deleted); the next plan wants nothing more.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from reconciler.plan import CreateBlock
from tests.factories import Factory, Preset, Version, minutes
from tests.integration.reconcile_support import pass_at, plan_of, read_plan, settings_for

TEMPLATES = 10
ACTIVE_PRESETS_PER_TEMPLATE = 24
OUTDATED_PRESETS_PER_TEMPLATE = 9
RETIRED_PRESETS_PER_TEMPLATE = 6  # on the deleted template, and on the deprecated one


@dataclass
class Expected:
    """What the first pass must do, and each preset's target afterwards."""

    writes: Counter[str] = field(default_factory=Counter)
    targets: dict[Preset, int] = field(default_factory=dict)
    hard_limited: list[Preset] = field(default_factory=list)
    inactive: list[Preset] = field(default_factory=list)


async def active_preset(factory: Factory, version: Version, index: int, expected: Expected) -> None:
    """One active preset in one of twelve situations, chosen by `index`."""
    scenario = index % 12
    desired = 1 + index % 3
    now = factory.now
    if scenario == 0:  # empty
        preset = await factory.preset(version, desired=desired)
        expected.writes["created"] += desired
    elif scenario == 1:  # exactly at its target
        preset = await factory.preset(version, desired=desired)
        await factory.prebuilds(preset, desired, ago=minutes(30))
    elif scenario == 2:  # two too many
        preset = await factory.preset(version, desired=desired)
        await factory.prebuilds(preset, desired + 2, ago=minutes(30))
        expected.writes["deleted"] += 2
    elif scenario == 3:  # one running, one starting, one missing
        preset = await factory.preset(version, desired=3)
        await factory.prebuild(preset, ago=minutes(30))
        await factory.prebuild(preset, status="pending", ago=minutes(1))
        expected.writes["created"] += 1
    elif scenario == 4:  # one expired by its time to live
        preset = await factory.preset(version, desired=2, ttl_seconds=3600)
        await factory.prebuild(preset, ago=minutes(90))
        await factory.prebuild(preset, ago=minutes(30))
        expected.writes.update(deleted=1, created=1)
    elif scenario == 5:  # old failures (left alone) and one running
        preset = await factory.preset(version, desired=2)
        await factory.prebuilds(preset, 2, status="failed", ago=minutes(180))
        await factory.prebuild(preset, ago=minutes(170))
        expected.writes["created"] += 1
    elif scenario == 6:  # stopped and canceled prebuilds are evidence, replaced
        preset = await factory.preset(version, desired=1)
        stopped = await factory.prebuild(preset, ago=minutes(60))
        await factory.build(stopped, transition="stop", ago=minutes(50))
        await factory.prebuild(preset, status="canceled", ago=minutes(40))
        expected.writes["created"] += 1
    elif scenario == 7:  # a schedule that always applies
        preset = await factory.preset(version, desired=1, timezone="Europe/Berlin", schedules=[("* * * * *", 4)])
        await factory.prebuild(preset, ago=minutes(30))
        expected.writes["created"] += 3
        expected.targets[preset] = 4
        return
    elif scenario == 8:  # no longer wanted
        preset = await factory.preset(version, desired=0)
        await factory.prebuilds(preset, 2, ago=minutes(30))
        expected.writes["deleted"] += 2
        expected.targets[preset] = 0
        return
    elif scenario == 9:  # invalidated after its prebuilds were made
        preset = await factory.preset(version, desired=2, last_invalidated_at=now - minutes(10))
        await factory.prebuilds(preset, 2, ago=minutes(20))
        expected.writes.update(deleted=2, created=2)
        expected.targets[preset] = 2
        return
    elif scenario == 10:  # reaches its hard limit this pass: creates nothing, forever after
        preset = await factory.preset(version, desired=1)
        for age in (122, 121, 120):
            await factory.prebuild(preset, status="failed", ago=minutes(age))
        expected.hard_limited.append(preset)
        return
    else:  # a claimed prebuild is a user's workspace now
        preset = await factory.preset(version, desired=1)
        await factory.claim(await factory.prebuild(preset, ago=minutes(30)))
        expected.writes["created"] += 1
        desired = 1
    expected.targets[preset] = {3: 3, 4: 2, 5: 2, 6: 1}.get(scenario, desired)


async def outdated_preset(factory: Factory, version: Version, index: int, expected: Expected) -> None:
    preset = await factory.preset(version, desired=2)
    scenario = index % 3
    if scenario == 0:
        await factory.prebuilds(preset, 2, ago=minutes(40))
        expected.writes["deleted"] += 2
    elif scenario == 1:
        await factory.prebuild(preset, ago=minutes(40))
        await factory.prebuild(preset, status="pending", ago=minutes(2))
        expected.writes.update(deleted=1, canceled=1)
    # scenario 2: nothing at all (skipped)
    expected.inactive.append(preset)


async def build_fleet(factory: Factory) -> Expected:
    expected = Expected()
    organizations = [await factory.organization() for _ in range(3)]
    for template_index in range(TEMPLATES):
        template = await factory.template(organizations[template_index % len(organizations)])
        old_version = await factory.version(template)
        for index in range(OUTDATED_PRESETS_PER_TEMPLATE):
            await outdated_preset(factory, old_version, index + template_index, expected)
        active_version = await factory.version(template)
        for index in range(ACTIVE_PRESETS_PER_TEMPLATE):
            await active_preset(factory, active_version, index + template_index, expected)
    for retired in (await factory.template(deleted=True), await factory.template(deprecated="moved to v2")):
        version = await factory.version(retired)
        for _ in range(RETIRED_PRESETS_PER_TEMPLATE):
            preset = await factory.preset(version, desired=2)
            await factory.prebuild(preset, ago=minutes(45))
            expected.writes["deleted"] += 1
            expected.inactive.append(preset)
    return expected


async def complete_every_job(connection: asyncpg.Connection, at: datetime) -> None:
    """A provisioner runs every waiting job: starts succeed with a ready agent, deletes remove the workspace."""
    async with connection.transaction():
        await connection.execute(
            """
            with started as (
                update provisioner_jobs j set started_at = $1, completed_at = $1
                from workspace_builds b
                where b.job_id = j.id and b.transition = 'start' and j.job_status in ('pending', 'running')
                returning j.id
            )
            insert into workspace_agents (job_id, name, lifecycle_state)
            select id, 'main', 'ready' from started
            """,
            at,
        )
        await connection.execute(
            """
            with deleted as (
                update provisioner_jobs j set started_at = $1, completed_at = $1
                from workspace_builds b
                where b.job_id = j.id and b.transition = 'delete' and j.job_status in ('pending', 'running')
                returning b.workspace_id
            )
            update workspaces set deleted = true where id in (select workspace_id from deleted)
            """,
            at,
        )


async def test_a_fleet_of_hundreds_of_presets_converges_in_one_pass(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    settings = settings_for(database_url)
    expected = await build_fleet(factory)
    presets = len(expected.targets) + len(expected.hard_limited) + len(expected.inactive)
    assert presets >= 300

    result = await pass_at(pool, settings, factory.now)
    assert result.plan is not None
    assert result.execution is not None
    assert len(result.plan.presets) == presets
    assert set(result.status_changes.hard_limited) == {preset.id for preset in expected.hard_limited}
    writes = {
        "created": result.execution.created,
        "deleted": result.execution.deleted,
        "canceled": result.execution.canceled,
    }
    assert writes == dict(expected.writes)
    assert (result.execution.creates_clamped, result.execution.deletes_skipped) == (0, 0)

    await complete_every_job(factory.connection, factory.now + minutes(5))
    later = factory.now + minutes(10)
    plan = await read_plan(factory.connection, settings, later)
    unsettled = [
        f"{preset_plan.preset.name}: {[action.type for action in preset_plan.actions]}"
        for preset_plan in plan.presets
        if preset_plan.actions
    ]
    assert not unsettled, "\n".join(unsettled)
    for preset, target in expected.targets.items():
        state = plan_of(plan, preset).state
        assert (state.desired, state.actual, state.eligible, state.starting) == (target, target, target, 0), preset.name
    for preset in expected.inactive:
        preset_plan = plan_of(plan, preset)
        assert preset_plan.skipped, preset.name
        assert preset_plan.state.actual == 0, preset.name
    for preset in expected.hard_limited:
        preset_plan = plan_of(plan, preset)
        assert preset_plan.create_blocked is CreateBlock.HARD_LIMITED, preset.name
        assert preset_plan.state.actual == 0, preset.name

    # And a second real pass agrees: nothing to write.
    second = await pass_at(pool, settings, later)
    assert second.execution is not None
    assert (second.execution.created, second.execution.deleted, second.execution.canceled) == (0, 0, 0)
