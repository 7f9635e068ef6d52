"""The slow start on a real database (RECONCILER_SLOW_START): while no prebuild create has succeeded within the
breaker's window, at most N prebuild creates in flight, shared fairly; the first success lifts it; the plan
says what it held back and why; concurrent writers never exceed it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg

from reconciler import executor
from reconciler.admission import HoldReason
from reconciler.plan import CreateAction
from reconciler.reports import plan_json, reasons, status_json
from tests.factories import Factory, Preset, minutes
from tests.integration.reconcile_support import open_pool, pass_at, plan_of, read_plan, settings_for


async def creates_in_flight(connection: asyncpg.Connection) -> int:
    """First builds of prebuilds whose job is pending or running, counted independently."""
    return int(
        await connection.fetchval(
            "select count(*) from provisioner_jobs j join workspace_builds b on b.job_id = j.id "
            "where j.completed_at is null and j.canceled_at is null and b.build_number = 1 "
            "and b.transition = 'start' and j.initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'"
        )
    )


def creates(plan_presets: Sequence[object]) -> int:
    return sum(
        action.count
        for preset_plan in plan_presets
        for action in getattr(preset_plan, "actions", ())
        if isinstance(action, CreateAction)
    )


async def cold(factory: Factory) -> list[Preset]:
    """Four empty pools of three, on four templates: twelve creates wanted, nothing ever built."""
    return [await factory.preset(desired=3) for _ in range(4)]


async def test_without_the_slow_start_a_cold_start_asks_for_everything(factory: Factory, database_url: str) -> None:
    """The control: Coder's behaviour."""
    presets = await cold(factory)
    plan = await read_plan(factory.connection, settings_for(database_url), datetime.now(UTC))
    assert creates([plan_of(plan, preset) for preset in presets]) == 12
    assert plan.budget is None


async def test_a_cold_start_admits_n_creates_until_one_succeeds(factory: Factory, database_url: str) -> None:
    presets = await cold(factory)
    settings = settings_for(database_url, slow_start="5")
    now = datetime.now(UTC)

    plan = await read_plan(factory.connection, settings, now)
    plans = [plan_of(plan, preset) for preset in presets]
    # Five creates, shared fairly: every pool gets one before any gets a second.
    assert creates(plans) == 5
    assert sorted(creates([preset_plan]) for preset_plan in plans) == [1, 1, 1, 2]
    assert sum(preset_plan.creates_held for preset_plan in plans) == 7
    assert {preset_plan.creates_held_by for preset_plan in plans} == {HoldReason.SLOW_START}
    # Said in plan --json, status --json and status's reasons.
    shown = plan_json(plan, paused=False)["in_flight_budget"]
    assert (shown["slow_start"], shown["creates_in_flight"], shown["creates_held"]) == (5, 0, 7)
    entries = status_json(plan, paused=False)["presets"]
    assert {entry["creates_held_by"] for entry in entries} == {"slow_start"}
    assert any("slow start" in reason for reason in reasons(plans[0], now, paused=False))

    async with open_pool(database_url) as pool:
        await pass_at(pool, settings, now)
    assert await creates_in_flight(factory.connection) == 5
    # Still no success: the five in flight fill the slow start; nothing more starts.
    again = await read_plan(factory.connection, settings, now)
    assert creates([plan_of(again, preset) for preset in presets]) == 0
    assert again.budget is not None
    assert again.budget.creates_in_flight == 5

    # One create succeeds: the slow start is lifted, and every create wanted is admitted at once.
    await factory.connection.execute(
        "update provisioner_jobs set started_at = $1, completed_at = $1 where id = "
        "(select id from provisioner_jobs where completed_at is null order by id limit 1)",
        now,
    )
    lifted = await read_plan(factory.connection, settings, now)
    assert creates([plan_of(lifted, preset) for preset in presets]) == 12 - 5
    assert lifted.budget is None


async def test_only_a_success_within_the_window_lifts_it(factory: Factory, database_url: str) -> None:
    presets = await cold(factory)
    # A success long ago (outside the 10-minute window), and recent failures: no evidence that creates work.
    await factory.prebuild(presets[0], ago=minutes(30))
    await factory.prebuild(presets[1], status="failed", ago=minutes(2))
    settings = settings_for(database_url, slow_start="2", breaker_window="10m")
    now = datetime.now(UTC)
    plan = await read_plan(factory.connection, settings, now)
    assert creates([plan_of(plan, preset) for preset in presets]) == 2

    await factory.prebuild(presets[2], ago=minutes(5))
    plan = await read_plan(factory.connection, settings, now)
    assert plan.budget is None
    assert creates([plan_of(plan, preset) for preset in presets]) == 2 + 3 + 3 + 2


async def test_two_replicas_racing_never_exceed_the_slow_start(factory: Factory, database_url: str) -> None:
    """Two replicas plan from the same snapshot (each admits the whole slow start) and write at once: the
    write-time check, under the budget's lock, lets exactly N creates through."""
    await cold(factory)
    settings = settings_for(database_url, slow_start="5")
    now = datetime.now(UTC)
    first = await read_plan(factory.connection, settings, now)
    second = await read_plan(factory.connection, settings, now)
    assert first.budget is not None
    assert second.budget is not None
    assert first.budget.admitted == second.budget.admitted == 5

    async with open_pool(database_url) as one, open_pool(database_url) as two:
        summaries = await asyncio.gather(
            executor.execute(one, first, now, concurrency=4), executor.execute(two, second, now, concurrency=4)
        )

    assert await creates_in_flight(factory.connection) == 5
    assert sum(summary.created for summary in summaries) == 5
    # Without the write-time check the second replica would have created four more (one per preset: each
    # pool's own clamp leaves room); the slow start held them.
    assert sum(summary.budget_held for summary in summaries) >= 1
    assert all(summary.presets_failed == 0 for summary in summaries)


async def test_deletes_are_not_held_by_the_slow_start(factory: Factory, database_url: str) -> None:
    shrinking = await factory.preset(desired=0)
    await factory.prebuilds(shrinking, 3, ago=minutes(30))
    growing = await cold(factory)
    settings = settings_for(database_url, slow_start="1")
    plan = await read_plan(factory.connection, settings, datetime.now(UTC))
    assert plan_of(plan, shrinking).deletes_held == 0
    assert sum(len(getattr(a, "workspace_ids", ())) for a in plan_of(plan, shrinking).actions) == 3
    assert creates([plan_of(plan, preset) for preset in growing]) == 1
