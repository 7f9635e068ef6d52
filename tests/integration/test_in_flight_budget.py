"""The in-flight budget on a real database (issue 15.1): jobs in flight counted whoever started them, deletes
before creates, a fair share of creates, and a budget that concurrent writers never exceed."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg

from reconciler import executor
from reconciler.admission import HoldReason
from reconciler.plan import CreateAction, DeleteAction, DeleteReason
from reconciler.reports import plan_json
from tests.factories import Factory, minutes
from tests.integration.reconcile_support import open_pool, pass_at, plan_of, read_plan, settings_for


async def in_flight_jobs(connection: asyncpg.Connection) -> int:
    """Jobs pending or running of builds of the prebuilds user's workspaces, counted independently."""
    return int(
        await connection.fetchval(
            "select count(*) from provisioner_jobs j join workspace_builds b on b.job_id = j.id "
            "join workspaces w on w.id = b.workspace_id "
            "where j.completed_at is null and j.canceled_at is null "
            "and w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'"
        )
    )


async def test_jobs_in_flight_count_whoever_started_them(factory: Factory, database_url: str) -> None:
    preset = await factory.preset(desired=3)
    other = await factory.preset(desired=0)
    # A create the reconciler started, still pending; a delete an administrator started, running.
    await factory.prebuild(preset, status="pending", agents=[])
    deleted = await factory.prebuild(other)
    admin = await factory.user(site_roles=["template-admin"])
    await factory.build(deleted, transition="delete", status="running", initiator_id=admin.id)
    # Finished jobs and a user's own workspace do not count.
    await factory.prebuild(preset)
    user = await factory.user()
    own = await factory.workspace(None, template=preset.template, owner_id=user.id)
    await factory.build(own, preset=False, version=preset.version, status="running", initiator_id=user.id)

    plan = await read_plan(factory.connection, settings_for(database_url, max_in_flight="10"), datetime.now(UTC))
    assert plan.snapshot is not None
    assert {row.template_id: row.jobs for row in plan.snapshot.in_flight} == {
        preset.template.id: 1,
        other.template.id: 1,
    }
    assert plan.budget is not None
    assert plan.budget.in_flight == 2


async def test_without_a_budget_nothing_is_held(factory: Factory, database_url: str) -> None:
    preset = await factory.preset(desired=30)
    plan = await read_plan(factory.connection, settings_for(database_url), datetime.now(UTC))
    assert plan_of(plan, preset).actions == (CreateAction(count=30),)
    assert plan.budget is None
    assert plan_json(plan, paused=False)["in_flight_budget"] is None


async def test_deletes_are_admitted_before_creates(factory: Factory, database_url: str) -> None:
    shrinking = await factory.preset(desired=0)
    oldest = await factory.prebuild(shrinking, ago=minutes(30))
    middle = await factory.prebuild(shrinking, ago=minutes(20))
    await factory.prebuild(shrinking, ago=minutes(10))
    growing = await factory.preset(desired=3)
    settings = settings_for(database_url, max_in_flight="2")
    now = datetime.now(UTC)

    plan = await read_plan(factory.connection, settings, now)
    shrinking_plan, growing_plan = plan_of(plan, shrinking), plan_of(plan, growing)
    # The two oldest go first; the third delete and every create wait, with the reason said.
    assert shrinking_plan.actions == (DeleteAction((oldest.id, middle.id), DeleteReason.EXTRANEOUS),)
    assert (shrinking_plan.deletes_held, shrinking_plan.deletes_held_by) == (1, HoldReason.MAX_IN_FLIGHT)
    assert growing_plan.actions == ()
    assert (growing_plan.creates_held, growing_plan.creates_held_by) == (3, HoldReason.MAX_IN_FLIGHT)
    shown = plan_json(plan, paused=False)
    assert shown["in_flight_budget"] == {
        "max_in_flight": 2,
        "max_in_flight_per_template": 0,
        "in_flight": 0,
        "admitted": 2,
        "creates_held": 3,
        "deletes_held": 1,
        "slow_start": 0,
        "creates_in_flight": 0,
    }
    growing_json = next(entry for entry in shown["presets"] if entry["preset_id"] == str(growing.id))
    assert (growing_json["creates_held"], growing_json["creates_held_by"]) == (3, "max_in_flight")

    async with open_pool(database_url) as pool:
        result = await pass_at(pool, settings, now)
    assert result.execution is not None
    assert (result.execution.deleted, result.execution.created) == (2, 0)
    assert await in_flight_jobs(factory.connection) == 2


async def test_every_starved_preset_gets_one_create_before_any_gets_two(factory: Factory, database_url: str) -> None:
    big = await factory.preset(desired=20)
    small = [await factory.preset(desired=2) for _ in range(3)]
    settings = settings_for(database_url, max_in_flight="5")
    plan = await read_plan(factory.connection, settings, datetime.now(UTC))

    creates = {preset.id: plan_of(plan, preset).actions for preset in (big, *small)}
    # Four presets, five creates: one each, and the fifth to the relatively emptiest (all are empty; the
    # deficits are 20/20 and 2/2 after none, then 19/20 against 1/2: the big one).
    assert all(actions for actions in creates.values())
    counts = {
        preset_id: sum(a.count for a in actions if isinstance(a, CreateAction))
        for preset_id, actions in creates.items()
    }
    assert sorted(counts.values()) == [1, 1, 1, 2]
    assert counts[big.id] == 2
    assert sum(plan_of(plan, preset).creates_held for preset in (big, *small)) == 20 + 6 - 5


async def test_the_per_template_budget_counts_jobs_already_in_flight(factory: Factory, database_url: str) -> None:
    busy = await factory.preset(desired=4)
    await factory.prebuild(busy, status="pending", agents=[])
    sibling = await factory.preset(busy.version, desired=2)
    elsewhere = await factory.preset(desired=2)
    settings = settings_for(database_url, max_in_flight_per_template="2")
    plan = await read_plan(factory.connection, settings, datetime.now(UTC))

    # One job of the busy template is in flight: one create left for its two presets, the emptiest first.
    template_creates = sum(
        action.count
        for preset in (busy, sibling)
        for action in plan_of(plan, preset).actions
        if isinstance(action, CreateAction)
    )
    assert template_creates == 1
    assert plan_of(plan, sibling).actions == (CreateAction(count=1),)
    assert plan_of(plan, busy).creates_held_by is HoldReason.MAX_IN_FLIGHT_PER_TEMPLATE
    assert plan_of(plan, elsewhere).actions == (CreateAction(count=2),)


async def test_two_replicas_racing_never_exceed_the_budget(factory: Factory, database_url: str) -> None:
    """Two replicas plan from the same snapshot (each admits the whole budget) and write at once: the
    write-time admission, under the budget's lock, lets exactly the budget through."""
    presets = [await factory.preset(desired=4) for _ in range(4)]
    shrinking = await factory.preset(desired=0)
    await factory.prebuilds(shrinking, 3, ago=minutes(5))
    settings = settings_for(database_url, max_in_flight="6")
    now = datetime.now(UTC)
    first = await read_plan(factory.connection, settings, now)
    second = await read_plan(factory.connection, settings, now)
    assert first.budget is not None
    assert first.budget.admitted == 6

    async with open_pool(database_url) as one, open_pool(database_url) as two:
        summaries = await asyncio.gather(
            executor.execute(one, first, now, concurrency=4), executor.execute(two, second, now, concurrency=4)
        )

    assert await in_flight_jobs(factory.connection) == 6
    assert sum(summary.created + summary.deleted for summary in summaries) == 6
    # Every planned action was done or withheld; the creates past the budget were held by it. (Whether the
    # second replica's deletes are held too, or find the first's already done, depends on how the replicas'
    # transactions interleave: creates go in batches.)
    assert sum(summary.created + summary.creates_clamped for summary in summaries) == 6
    assert sum(summary.deleted + summary.deletes_skipped for summary in summaries) == 6
    assert sum(summary.budget_held for summary in summaries) >= 3
    assert all(summary.presets_failed == 0 for summary in summaries)
    # The next plan sees the budget spent: nothing more is admitted until jobs finish.
    again = await read_plan(factory.connection, settings, now)
    assert again.budget is not None
    assert (again.budget.in_flight, again.budget.admitted) == (6, 0)
    assert all(not plan_of(again, preset).actions for preset in presets)
