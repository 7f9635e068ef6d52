"""Demand-driven targets on a real database (issue 14; BEHAVIOR.md 2.1, docs/DEMAND.md).

Claim events are written as the platform's claim path writes them (`prebuild_events`), the snapshot a
pass reads counts them, and the planner computes the target with the preset's expression. Each test
names the rule it holds.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from uuid import UUID

import pytest
import structlog
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from reconciler import executor, reconcile
from reconciler.demand import DemandCounts
from reconciler.plan import CreateAction, DeleteAction, DeleteReason
from reconciler.problem_log import ProblemLog
from reconciler.reconcile import PassOutcome, run_pass
from reconciler.sdnotify import SystemdNotifier
from reconciler.service import Daemon
from reconciler.store import writes
from reconciler.target import TargetHold, TargetSource
from tests.factories import Factory, Preset, minutes
from tests.integration.notification_helpers import eventually
from tests.integration.reconcile_support import (
    open_pool,
    pass_at,
    plan_of,
    prebuild_workspaces,
    read_plan,
    read_snapshot,
    settings_for,
)
from tests.integration.test_commands import cli, parse_json
from tests.integration.test_describe import describe_json
from tests.integration.test_status import run


async def claims(factory: Factory, preset: Preset, count: int, *, ago: timedelta, missed: bool = False) -> None:
    for _ in range(count):
        await factory.event(preset, "claim_missed" if missed else "claim_succeeded", at=factory.now - ago)


async def published_long_ago(factory: Factory, preset: Preset) -> None:
    """Move the preset's version back, so that every event of a test is "since the version was published"."""
    await factory.connection.execute(
        "update template_versions set created_at = $1 where id = $2",
        factory.now - timedelta(days=30),
        preset.version.id,
    )


# Coder's four documented examples: (expression, events as (type, count, minutes ago), scheduled target,
# the target Coder computes).
CODER_EXAMPLES = [
    # 2 claims in the last 10 minutes (and 5 older ones that do not count): min(20, 20).
    ("min(claims_10m * 10, 20)", [("claim_succeeded", 2, 3), ("claim_succeeded", 5, 25)], 1, 20),
    ("min(claims_10m * 10, 20)", [("claim_succeeded", 1, 9), ("claim_missed", 4, 2)], 1, 10),
    # 12 claims in 30 minutes: 0.4 a minute, x 8 = 3.2, ceil 4 > scheduled 2.
    ("max(scheduled_target, ceil(claim_rate_30m * 8))", [("claim_succeeded", 12, 20)], 2, 4),
    ("max(scheduled_target, ceil(claim_rate_30m * 8))", [("claim_succeeded", 3, 20), ("claim_succeeded", 9, 45)], 2, 2),
    # (3 claims + 2 misses in the last hour) x 2 = 10; the 6 of 90 minutes ago are outside the hour.
    (
        "max(2, min((claims_60m + misses_60m) * 2, 30))",
        [("claim_succeeded", 3, 50), ("claim_missed", 2, 5), ("claim_succeeded", 6, 90)],
        1,
        10,
    ),
    ("max(2, min((claims_60m + misses_60m) * 2, 30))", [("claim_succeeded", 20, 30)], 1, 30),
    ("clamp(claims_10m * 5, 1, 15)", [("claim_succeeded", 4, 1)], 1, 15),
    ("clamp(claims_10m * 5, 1, 15)", [("claim_succeeded", 2, 11)], 1, 1),
]


@pytest.mark.parametrize(("expression", "events", "scheduled", "expected"), CODER_EXAMPLES)
async def test_coders_documented_examples_give_coders_targets_end_to_end(
    factory: Factory,
    database_url: str,
    expression: str,
    events: list[tuple[str, int, int]],
    scheduled: int,
    expected: int,
) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=scheduled, timezone="UTC", expression=expression)
    await published_long_ago(factory, preset)
    for event_type, count, ago in events:
        await claims(factory, preset, count, ago=minutes(ago), missed=event_type == "claim_missed")
    # Another preset's events and unknown event types are not this preset's demand.
    other = await factory.preset(desired=1, timezone="UTC", expression="claims_10m")
    await claims(factory, other, 7, ago=minutes(1))
    await factory.event(preset, "claim_cancelled", at=factory.now - minutes(1))

    preset_plan = plan_of(await read_plan(factory.connection, settings, factory.now), preset)
    assert preset_plan.target is not None
    assert (preset_plan.target.source, preset_plan.target.result) == (TargetSource.EXPRESSION, expected)
    assert preset_plan.state.desired == expected
    async with open_pool(database_url) as pool:
        await pass_at(pool, settings, factory.now)
    assert len(await prebuild_workspaces(factory.connection, preset)) == expected


async def test_the_snapshot_counts_every_window_and_last_weeks_hour(factory: Factory, database_url: str) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=1, timezone="UTC", expression="claims_5m")
    await published_long_ago(factory, preset)
    for ago in (1, 7, 20, 45, 100, 130):
        await factory.event(preset, "claim_succeeded", at=factory.now - minutes(ago))
        await factory.event(preset, "claim_missed", at=factory.now - minutes(ago))
    week = timedelta(days=7)
    # Last week's hour is [now - 7 days, now - 7 days + 1 hour): its start is in, its end is out.
    for at in (factory.now - week, factory.now - week + minutes(59), factory.now - week + minutes(60)):
        await factory.event(preset, "claim_succeeded", at=at)
    await factory.event(preset, "claim_missed", at=factory.now - week - minutes(1))
    await factory.event(preset, "claim_missed", at=factory.now - week + minutes(30))
    without = await factory.preset(desired=1, timezone="UTC")
    await claims(factory, without, 3, ago=minutes(1))

    snapshot = await read_snapshot(factory.connection, settings, factory.now)
    demand = {row.preset_id: row.counts for row in snapshot.demand}
    assert demand == {
        preset.id: DemandCounts(
            claims=(1, 2, 3, 4, 5),
            misses=(1, 2, 3, 4, 5),
            claims_next_60m_last_week=2,
            misses_next_60m_last_week=1,
            has_history=True,
        )
    }, "presets without an expression are not read"


async def test_no_expression_or_a_blank_one_is_the_static_or_scheduled_target(
    factory: Factory, database_url: str
) -> None:
    settings = settings_for(database_url)
    static = await factory.preset(desired=2)
    blank = await factory.preset(desired=3, expression=" \t\n")
    scheduled = await factory.preset(desired=1, timezone="UTC", schedules=[("* * * * *", 4)])
    for preset in (static, blank, scheduled):
        await claims(factory, preset, 5, ago=minutes(1))

    plan = await read_plan(factory.connection, settings, factory.now)
    sources = {
        preset.name: (plan_of(plan, preset).target.source, plan_of(plan, preset).state.desired)  # type: ignore[union-attr]
        for preset in (static, blank, scheduled)
    }
    assert sources == {
        static.name: (TargetSource.STATIC, 2),
        blank.name: (TargetSource.STATIC, 3),
        scheduled.name: (TargetSource.SCHEDULE, 4),
    }
    assert plan.snapshot is not None
    assert plan.snapshot.demand == ()


async def test_the_expression_reads_the_scheduled_target_and_the_pool(factory: Factory, database_url: str) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(
        desired=1, timezone="UTC", schedules=[("* * * * *", 3)], expression="scheduled_target * 10 + running"
    )
    await factory.prebuild(preset, ago=minutes(30))
    await factory.prebuild(preset, ago=minutes(20))

    target = plan_of(await read_plan(factory.connection, settings, factory.now), preset).target
    assert target is not None
    assert (target.source, target.desired, target.scheduled_target) == (TargetSource.EXPRESSION, 32, 3)
    assert dict(target.inputs) == {"scheduled_target": 3, "running": 2}


async def test_an_inactive_presets_target_is_0_whatever_the_expression_says(
    factory: Factory, database_url: str
) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=2, timezone="UTC", expression="10", active=False)
    running = await factory.prebuild(preset, ago=minutes(30))

    preset_plan = plan_of(await read_plan(factory.connection, settings, factory.now), preset)
    assert preset_plan.target is not None
    assert (preset_plan.target.source, preset_plan.state.desired) == (TargetSource.INACTIVE, 0)
    assert preset_plan.actions == (DeleteAction((running.id,), DeleteReason.INACTIVE),)


async def test_the_result_is_clamped_to_the_cap_and_to_0(factory: Factory, database_url: str) -> None:
    settings = settings_for(database_url, max_desired_instances="5")
    high = await factory.preset(desired=1, timezone="UTC", expression="1000")
    low = await factory.preset(desired=1, timezone="UTC", expression="claims_10m - 3")
    await published_long_ago(factory, low)
    await claims(factory, low, 1, ago=minutes(1))

    plan = await read_plan(factory.connection, settings, factory.now)
    assert plan_of(plan, high).state.desired == 5
    assert plan_of(plan, high).actions == (CreateAction(5),)
    assert plan_of(plan, low).state.desired == 0


@pytest.mark.parametrize(
    ("expression", "timezone", "kind"),
    [
        ("claims_10m / misses_10m", "UTC", "division_by_zero"),
        ("claims_10m / 2", "UTC", "not_integral"),
        ("claims_10m +", "UTC", "syntax"),
        ("queue_length * 2", "UTC", "unknown_name"),
        ("hour > 3", "UTC", "type"),
        ("claims_10m + 1", "Mars/Olympus_Mons", "time_zone"),
    ],
)
async def test_a_failing_expression_falls_back_to_the_scheduled_target(
    factory: Factory, database_url: str, expression: str, timezone: str, kind: str
) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=3, timezone=timezone, expression=expression)
    await claims(factory, preset, 1, ago=minutes(1))

    plan = await read_plan(factory.connection, settings, factory.now)
    preset_plan = plan_of(plan, preset)
    assert preset_plan.target is not None
    assert preset_plan.target.error is not None
    assert (preset_plan.target.source, preset_plan.state.desired) == (TargetSource.EXPRESSION_FALLBACK, 3)
    assert preset_plan.target.error.kind.value == kind
    assert [(problem.event, problem.detail.split(":")[0]) for problem in plan.problems] == [
        ("preset.expression_failed", kind)
    ]


async def test_a_failing_expression_is_logged_once_per_change(factory: Factory, database_url: str) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=1, timezone="UTC", expression="claims_10m / misses_10m")
    await claims(factory, preset, 1, ago=minutes(1))
    problem_log = ProblemLog()

    async def logged_passes(*offsets: int) -> list[tuple[str, str | None]]:
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as events:
            for offset in offsets:
                result = await run_pass(
                    pool, settings, factory.now + timedelta(seconds=offset), problem_log=problem_log
                )
                assert result.outcome is PassOutcome.SUCCESS, result.error
        return [
            (event["event"], event.get("detail"))
            for event in events
            if event["event"] in ("preset.expression_failed", "preset.problem_cleared")
        ]

    async with open_pool(database_url) as pool:
        first = await logged_passes(0, 1, 2)
        assert [event for event, _ in first] == ["preset.expression_failed"]
        assert first[0][1] is not None
        assert first[0][1].startswith("division_by_zero:")
        # Another error is a change: logged once more.
        await factory.connection.execute(
            "update template_version_presets set desired_instances_expression = 'claims_10m +' where id = $1", preset.id
        )
        second = await logged_passes(3, 4)
        assert [event for event, _ in second] == ["preset.expression_failed", "preset.problem_cleared"]
        # Fixed: cleared once, then quiet.
        await factory.connection.execute(
            "update template_version_presets set desired_instances_expression = 'claims_10m' where id = $1", preset.id
        )
        assert [event for event, _ in await logged_passes(5, 6)] == ["preset.problem_cleared"]


async def test_cold_start_keeps_the_scheduled_target_until_the_first_event(factory: Factory, database_url: str) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=2, timezone="UTC", expression="claims_60m")
    opted_out = await factory.preset(desired=2, timezone="UTC", expression="cold_start ? 0 : claims_60m")
    # An event from before the version was published is not this version's history.
    await factory.connection.execute(
        "update template_versions set created_at = $1 where id = $2", factory.now - minutes(65), preset.version.id
    )
    await claims(factory, preset, 1, ago=minutes(70))

    plan = await read_plan(factory.connection, settings, factory.now)
    cold = plan_of(plan, preset).target
    assert cold is not None
    assert cold.cold_start
    assert (cold.result, cold.desired, cold.source) == (0, 2, TargetSource.EXPRESSION)
    assert plan_of(plan, opted_out).state.desired == 0

    # The first event since publication ends the cold start, even once it has left every window.
    await claims(factory, preset, 1, ago=minutes(125))
    await factory.connection.execute(
        "update template_versions set created_at = $1 where id = $2", factory.now - minutes(130), preset.version.id
    )
    warm = plan_of(await read_plan(factory.connection, settings, factory.now), preset).target
    assert warm is not None
    assert not warm.cold_start
    assert warm.desired == 0


async def test_last_weeks_demand_fills_the_pool_before_the_rush(factory: Factory, database_url: str) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=0, timezone="UTC", expression="max(claims_60m, claims_next_60m_last_week)")
    await published_long_ago(factory, preset)
    # Last Monday's rush began 20 minutes into the hour that starts exactly a week before now.
    for _ in range(6):
        await factory.event(preset, at=factory.now - timedelta(days=7) + minutes(20))

    preset_plan = plan_of(await read_plan(factory.connection, settings, factory.now), preset)
    assert preset_plan.state.desired == 6
    assert preset_plan.actions == (CreateAction(6),)


async def stabilizing_pool(factory: Factory) -> tuple[Preset, list[UUID]]:
    """4 running prebuilds of a preset whose expression now says 1 (one claim in the last 10 minutes)."""
    preset = await factory.preset(desired=0, timezone="UTC", expression="claims_10m")
    await published_long_ago(factory, preset)
    await claims(factory, preset, 1, ago=minutes(2))
    prebuilds = [await factory.prebuild(preset, ago=minutes(60 - index)) for index in range(4)]
    return preset, [prebuild.id for prebuild in prebuilds]


async def test_a_drop_deletes_only_once_it_has_held_for_the_window(factory: Factory, database_url: str) -> None:
    settings = settings_for(database_url, target_stabilization_window="5m")
    preset, prebuilds = await stabilizing_pool(factory)
    holds: dict[UUID, TargetHold] = {}

    async def extraneous(at: timedelta) -> tuple[int, tuple[object, ...]]:
        plan = await reconcile.read_plan(factory.connection, settings, factory.now + at, holds=holds)
        holds.clear()
        holds.update(plan.holds)
        preset_plan = plan_of(plan, preset)
        return preset_plan.state.desired, preset_plan.actions

    # The pool is held at its size (4) from the first pass that sees the lower target.
    assert await extraneous(timedelta(0)) == (1, ())
    assert await extraneous(minutes(4)) == (1, ())
    # 5 minutes later the target 1 has held for the window: the 3 oldest go.
    assert await extraneous(minutes(5)) == (1, (DeleteAction(tuple(prebuilds[:3]), DeleteReason.EXTRANEOUS),))


async def test_an_increase_acts_at_once_and_window_0_is_coders_immediate_drop(
    factory: Factory, database_url: str
) -> None:
    immediate = settings_for(database_url, target_stabilization_window="0")
    preset, prebuilds = await stabilizing_pool(factory)
    plan = await reconcile.read_plan(factory.connection, immediate, factory.now)
    assert plan_of(plan, preset).actions == (DeleteAction(tuple(prebuilds[:3]), DeleteReason.EXTRANEOUS),)

    held = settings_for(database_url, target_stabilization_window="1h")
    await claims(factory, preset, 5, ago=minutes(1))
    plan = await reconcile.read_plan(factory.connection, held, factory.now)
    assert plan_of(plan, preset).actions == (CreateAction(2),)


async def test_the_daemons_passes_remember_the_hold(factory: Factory, database_url: str) -> None:
    settings = settings_for(database_url, target_stabilization_window="5m")
    preset, prebuilds = await stabilizing_pool(factory)
    holds: dict[UUID, TargetHold] = {}
    async with open_pool(database_url) as pool:
        for offset in (0, 2, 4):
            result = await run_pass(pool, settings, factory.now + minutes(offset), holds=holds)
            assert result.execution is not None
            assert result.execution.deleted == 0
        assert holds[preset.id].retained == 4
        result = await pass_at(pool, settings, factory.now + minutes(5) + timedelta(seconds=1))
        # A pass without the daemon's memory holds the pool at its size: nothing deleted.
        assert result.execution is not None
        assert result.execution.deleted == 0
        result = await run_pass(pool, settings, factory.now + minutes(6), holds=holds)
        assert result.execution is not None
        assert result.execution.deleted == 3
    deleting = await factory.connection.fetch(
        "select workspace_id from workspace_builds where transition = 'delete' order by workspace_id"
    )
    assert [row["workspace_id"] for row in deleting] == sorted(prebuilds[:3])


async def test_a_create_fills_to_the_expressions_target_unless_the_expression_changed(
    factory: Factory, database_url: str
) -> None:
    """The executor's fresh clamp under the preset's lock: the plan's computed target stands while the
    expression is the one the plan evaluated; a changed one clamps to the static or scheduled target."""
    settings = settings_for(database_url)
    kept = await factory.preset(desired=1, timezone="UTC", expression="claims_10m + 3")
    changed = await factory.preset(desired=1, timezone="UTC", expression="claims_10m + 3")
    async with open_pool(database_url) as pool:
        plan = await reconcile.read_plan(factory.connection, settings, factory.now)
        assert plan_of(plan, changed).actions == (CreateAction(3),)
        await factory.connection.execute(
            "update template_version_presets set desired_instances_expression = null where id = $1", changed.id
        )
        summary = await executor.execute(pool, plan, factory.now, concurrency=2)
    assert summary.created == 3 + 1
    assert summary.creates_clamped == 2
    assert len(await prebuild_workspaces(factory.connection, kept)) == 3
    assert len(await prebuild_workspaces(factory.connection, changed)) == 1


async def test_events_older_than_the_retention_are_purged_in_bounded_batches(factory: Factory) -> None:
    preset = await factory.preset(desired=1, timezone="UTC", expression="claims_10m")
    for days in (9, 9, 9, 8.5, 8.1):
        await factory.event(preset, at=factory.now - timedelta(days=days))
    kept = [factory.now - timedelta(days=7, minutes=30), factory.now - minutes(1)]
    for at in kept:
        await factory.event(preset, "claim_missed", at=at)
    cutoff = factory.now - timedelta(days=8)

    # Two batches of 2 at most: 4 of the 5 old events, oldest first; the rest on the next call.
    assert await writes.purge_prebuild_events(factory.connection, cutoff, batch_size=2, max_batches=2) == 4
    remaining = await factory.connection.fetch("select created_at from prebuild_events order by created_at")
    assert [row["created_at"] for row in remaining] == [factory.now - timedelta(days=8.1), *kept]
    assert await writes.purge_prebuild_events(factory.connection, cutoff, batch_size=2) == 1
    assert await writes.purge_prebuild_events(factory.connection, cutoff, batch_size=2) == 0
    remaining = await factory.connection.fetch("select created_at from prebuild_events order by created_at")
    assert [row["created_at"] for row in remaining] == kept


async def test_plan_json_and_status_show_the_target_its_source_inputs_and_error(
    factory: Factory, database_url: str
) -> None:
    computed = await factory.preset(desired=2, timezone="UTC", expression="max(scheduled_target, claims_10m * 3)")
    await published_long_ago(factory, computed)
    await claims(factory, computed, 1, ago=minutes(1))
    failing = await factory.preset(desired=2, timezone="UTC", expression="claims_10m / misses_10m")
    static = await factory.preset(desired=1)

    document = parse_json(await cli(database_url, "plan", "--json"))
    targets = {preset["preset_id"]: preset["target"] for preset in document["presets"]}
    assert targets[str(computed.id)] == {
        "source": "expression",
        "desired": 3,
        "retained": 3,
        "scheduled_target": 2,
        "expression": "max(scheduled_target, claims_10m * 3)",
        "inputs": {"claims_10m": 1, "scheduled_target": 2},
        "result": 3,
        "error": None,
        "cold_start": False,
    }
    assert targets[str(failing.id)]["source"] == "expression_fallback"
    assert targets[str(failing.id)]["desired"] == 2
    assert targets[str(failing.id)]["error"]["kind"] == "division_by_zero"
    assert targets[str(static.id)]["source"] == "static"

    status = parse_json(await cli(database_url, "status", "--json"))
    sources = {preset["preset_id"]: preset["target_source"] for preset in status["presets"]}
    assert sources == {str(computed.id): "expression", str(failing.id): "expression_fallback", str(static.id): "static"}
    table = (await cli(database_url, "status", "--wide")).stdout
    assert "expression_fallback (division_by_zero)" in table


async def test_presets_describe_shows_the_expression_its_inputs_and_result_or_error(
    factory: Factory, database_url: str
) -> None:
    computed = await factory.preset(desired=2, timezone="UTC", expression="max(scheduled_target, claims_10m * 3)")
    await published_long_ago(factory, computed)
    await claims(factory, computed, 2, ago=minutes(1))
    failing = await factory.preset(desired=2, timezone="UTC", expression="claims_10m / misses_10m")

    document = await describe_json(database_url, str(computed.id))
    assert document["target"]["source"] == "expression"
    assert document["target"]["computed"]["inputs"] == {"claims_10m": 2, "scheduled_target": 2}
    assert document["target"]["computed"]["result"] == 6
    code, text, err = await run(database_url, "presets", "describe", str(failing.id))
    assert code == 0, err
    assert "Expression" in text
    assert "claims_10m / misses_10m" in text
    assert "failed (division_by_zero" in text


async def test_check_expression_on_a_preset_evaluates_it_now(factory: Factory, database_url: str) -> None:
    """`presets check-expression EXPR PRESET`: the expression's value for that preset now, whether or not
    it has an expression (the demand is read for it alone); an invalid one exits 1 without a database."""
    preset = await factory.preset(desired=2, timezone="UTC")
    await published_long_ago(factory, preset)
    await claims(factory, preset, 3, ago=minutes(2))
    await claims(factory, preset, 1, ago=minutes(3), missed=True)

    code, out, err = await run(
        database_url, "presets", "check-expression", "claims_10m + misses_10m * 10", str(preset.id), "--json"
    )
    assert code == 0, err
    document = json.loads(out)
    assert document["valid"] is True
    assert document["target"]["result"] == 13
    assert document["target"]["inputs"] == {"claims_10m": 3, "misses_10m": 1}
    code, text, err = await run(database_url, "presets", "check-expression", "claims_10m / 0", str(preset.id))
    assert code == 0, err
    assert "fails: division_by_zero" in text
    assert "scheduled_target (2)" in text
    code, text, _ = await run(database_url, "presets", "check-expression", "claims_10m +", str(preset.id))
    assert code == 1
    assert text.startswith("invalid:")


async def test_the_daemon_purges_old_events_remembers_holds_and_exports_the_target(
    factory: Factory, database_url: str
) -> None:
    """The daemon as it runs: its purge loop deletes what is older than RECONCILER_PREBUILD_EVENTS_RETENTION
    (the recent events stay), its passes keep the stabilization holds, and the target's series are served."""
    preset, _ = await stabilizing_pool(factory)
    now = datetime.now(UTC)
    for days in (3, 4):
        await factory.event(preset, "claim_missed", at=now - timedelta(days=days))
    settings = settings_for(
        database_url,
        http_address="127.0.0.1:0",
        reconciliation_interval="1h",
        events_enabled="false",
        prebuild_events_retention="2d",
    )
    daemon = Daemon(settings, registry=CollectorRegistry(), notifier=SystemdNotifier({}))
    await daemon.start()
    try:

        async def purged() -> bool:
            remaining: int = await factory.connection.fetchval("select count(*) from prebuild_events")
            return remaining == 1

        await eventually(purged, "the start-up purge")
        await eventually(lambda: _true(daemon.last_pass is not None), "the start-up pass")
        result = await daemon.run_pass_now()
        assert result.execution is not None
        assert result.execution.deleted == 0
    finally:
        await daemon.stop()
    # The pool of 4 is held while the target 1 stabilizes, and the series say so.
    assert daemon.target_holds[preset.id].retained == 4
    value = daemon.metrics.registry.get_sample_value
    labels = {
        "template_name": preset.template.name,
        "preset_name": preset.name,
        "organization_name": preset.template.organization.name,
    }
    assert value("prebuilds_reconciler_preset_target", {**labels, "source": "expression"}) == 1
    assert value("prebuilds_reconciler_preset_target_retained", labels) == 4


async def _true(value: bool) -> bool:
    return value
