"""The planner with issue 15's settings: the in-flight budget applied to the plan, the backoff strategy,
and their metrics. The admission's own rules are in test_admission.py; here, that the plan obeys them."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

from prometheus_client import CollectorRegistry

from reconciler import backoff, planner
from reconciler.admission import Budget, HoldReason
from reconciler.metrics import Metrics
from reconciler.plan import BackoffAction, CreateAction, DeleteAction, DeleteReason
from reconciler.reports import budget_line
from reconciler.snapshot import Backoff, InFlight, PrebuildStatus, Preset, RunningPrebuild, Snapshot

NOW = datetime(2026, 1, 5, 12, tzinfo=UTC)
TEMPLATE = uuid.UUID(int=1)


def make_preset(name: str, desired: int, *, template_id: uuid.UUID = TEMPLATE) -> Preset:
    return Preset(
        id=uuid.uuid5(uuid.NAMESPACE_URL, name),
        name=name,
        template_id=template_id,
        template_name="go",
        template_version_id=uuid.UUID(int=2),
        template_version_name="v1",
        organization_id=uuid.UUID(int=3),
        organization_name="acme",
        desired_instances=desired,
        invalidate_after_secs=None,
        scheduling_timezone="",
        prebuild_status=PrebuildStatus.NORMAL,
        last_invalidated_at=None,
        is_active_version=True,
        template_deleted=False,
        template_deprecated=False,
    )


def running(preset: Preset, count: int) -> tuple[RunningPrebuild, ...]:
    return tuple(
        RunningPrebuild(
            uuid.UUID(int=1000 + index), preset.id, preset.template_version_id, True, NOW - timedelta(hours=index + 1)
        )
        for index in range(count)
    )


def test_an_unlimited_budget_leaves_the_plan_as_coders() -> None:
    preset = make_preset("a", 50)
    plan = planner.plan(Snapshot(presets=(preset,)), planner.PlannerConfig(), NOW)
    assert plan.presets[0].actions == (CreateAction(count=50),)
    assert plan.budget is None


def test_the_budget_cuts_actions_deletes_first_oldest_first() -> None:
    shrinking, growing = make_preset("shrinking", 0), make_preset("growing", 4)
    prebuilds = running(shrinking, 3)
    snapshot = Snapshot(presets=(shrinking, growing), running=prebuilds, in_flight=(InFlight(TEMPLATE, 1),))
    config = planner.PlannerConfig(budget=Budget(max_in_flight=3))
    plan = planner.plan(snapshot, config, NOW)

    shrinking_plan, growing_plan = plan.presets
    oldest_first = sorted(prebuilds, key=lambda prebuild: prebuild.created_at)
    assert shrinking_plan.actions == (
        DeleteAction(tuple(prebuild.workspace_id for prebuild in oldest_first[:2]), DeleteReason.EXTRANEOUS),
    )
    assert (shrinking_plan.deletes_held, shrinking_plan.deletes_held_by) == (1, HoldReason.MAX_IN_FLIGHT)
    assert growing_plan.actions == ()
    assert (growing_plan.creates_held, growing_plan.creates_held_by) == (4, HoldReason.MAX_IN_FLIGHT)
    assert plan.budget is not None
    assert (plan.budget.in_flight, plan.budget.admitted, plan.budget.creates_held, plan.budget.deletes_held) == (
        1,
        2,
        4,
        1,
    )


def test_a_preset_the_budget_does_not_touch_keeps_its_plan() -> None:
    preset = make_preset("a", 2)
    plan = planner.plan(Snapshot(presets=(preset,)), planner.PlannerConfig(budget=Budget(max_in_flight=10)), NOW)
    assert plan.presets[0].actions == (CreateAction(count=2),)
    assert plan.presets[0].creates_held_by is None
    assert plan.budget is not None
    assert plan.budget.admitted == 2


def test_the_exponential_strategy_is_the_backoff_modules_and_the_same_on_every_replica() -> None:
    preset = make_preset("a", 2)
    failed_at = NOW - timedelta(minutes=3)
    snapshot = Snapshot(presets=(preset,), backoffs=(Backoff(preset.id, 4, failed_at),))
    config = planner.PlannerConfig(
        backoff_interval=timedelta(minutes=1),
        backoff_strategy=backoff.BackoffStrategy.EXPONENTIAL,
        backoff_max=timedelta(hours=1),
    )
    expected = backoff.backoff_until(config.backoff, 4, preset.id, failed_at)
    # 2^3 minutes, moved by at most 20%: still backing off three minutes after the failure.
    assert failed_at + timedelta(minutes=6.4) <= expected <= failed_at + timedelta(minutes=9.6)
    first, second = planner.plan(snapshot, config, NOW), planner.plan(snapshot, config, NOW)
    assert first.presets[0].actions == (BackoffAction(until=expected, num_failed=4),)
    assert first == second
    # Linear (Coder's): 4 x 1 minute after the failure.
    linear = planner.plan(snapshot, planner.PlannerConfig(backoff_interval=timedelta(minutes=1)), NOW)
    assert linear.presets[0].backoff_until == failed_at + timedelta(minutes=4)


def test_the_budget_metrics_follow_the_plan() -> None:
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    shrinking, growing = make_preset("shrinking", 0), make_preset("growing", 4)
    snapshot = Snapshot(presets=(shrinking, growing), running=running(shrinking, 3), in_flight=(InFlight(TEMPLATE, 1),))
    plan = planner.plan(snapshot, planner.PlannerConfig(budget=Budget(3, 2)), NOW)
    metrics.observe_pass("success", 0.1, plan, paused=False)
    value = metrics.registry.get_sample_value
    assert value("prebuilds_reconciler_in_flight_budget", {"scope": "total"}) == 3
    assert value("prebuilds_reconciler_in_flight_budget", {"scope": "per_template"}) == 2
    assert value("prebuilds_reconciler_in_flight_jobs") == 1
    # Per template 2, one in flight: one delete admitted, two deletes and four creates held.
    assert value("prebuilds_reconciler_in_flight_withheld", {"kind": "delete"}) == 2
    assert value("prebuilds_reconciler_in_flight_withheld", {"kind": "create"}) == 4

    unlimited = planner.plan(snapshot, planner.PlannerConfig(), NOW)
    metrics.observe_pass("success", 0.1, unlimited, paused=False)
    assert value("prebuilds_reconciler_in_flight_budget", {"scope": "total"}) == 0
    assert value("prebuilds_reconciler_in_flight_withheld", {"kind": "create"}) == 0


def test_the_slow_start_holds_until_a_create_succeeds_and_its_metric_says_so() -> None:
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    presets = tuple(make_preset(name, 3) for name in ("a", "b", "c"))
    config = planner.PlannerConfig(slow_start=4)
    cold = Snapshot(presets=presets, creates_in_flight=1, create_succeeded_recently=False)
    plan = planner.plan(cold, config, NOW)
    # Four allowed in flight, one already: three creates, one per pool; six held, with the reason.
    assert [preset_plan.actions for preset_plan in plan.presets] == [(CreateAction(count=1),)] * 3
    assert {preset_plan.creates_held_by for preset_plan in plan.presets} == {HoldReason.SLOW_START}
    assert plan.budget is not None
    assert (plan.budget.slow_start, plan.budget.creates_in_flight, plan.budget.creates_held) == (4, 1, 6)
    # The line above status's and plan's tables.
    assert budget_line(plan.budget) == (
        "slow start (no prebuild create succeeded lately): at most 4 creates in flight, 1 now; "
        "3 admitted, held back 6 creates\n"
    )
    metrics.observe_pass("success", 0.1, plan, paused=False)
    value = metrics.registry.get_sample_value
    assert value("prebuilds_reconciler_in_flight_budget", {"scope": "slow_start"}) == 4
    assert value("prebuilds_reconciler_in_flight_withheld", {"kind": "create"}) == 6

    warm = dataclasses.replace(cold, create_succeeded_recently=True)
    lifted = planner.plan(warm, config, NOW)
    assert [preset_plan.actions for preset_plan in lifted.presets] == [(CreateAction(count=3),)] * 3
    assert lifted.budget is None
    metrics.observe_pass("success", 0.1, lifted, paused=False)
    assert value("prebuilds_reconciler_in_flight_budget", {"scope": "slow_start"}) == 0


def test_invalidated_prebuilds_are_admitted_as_expired_ones() -> None:
    """An invalidation's deletes are the admission's class `expired`: under a budget they still go first."""
    preset = dataclasses.replace(make_preset("a", 2), last_invalidated_at=NOW - timedelta(minutes=1))
    growing = make_preset("growing", 3)
    snapshot = Snapshot(presets=(preset, growing), running=running(preset, 2))
    plan = planner.plan(snapshot, planner.PlannerConfig(budget=Budget(max_in_flight=1)), NOW)
    invalidated_plan = plan.presets[0]
    assert [
        (action.reason, len(action.workspace_ids))
        for action in invalidated_plan.actions
        if isinstance(action, DeleteAction)
    ] == [(DeleteReason.INVALIDATED, 1)]
    assert invalidated_plan.deletes_held == 1
    assert plan.presets[1].actions == ()


def test_surge_keeps_ready_expired_prebuilds_until_replacements_are_ready() -> None:
    preset = dataclasses.replace(make_preset("a", 2), invalidate_after_secs=600)
    snapshot = Snapshot(presets=(preset,), running=running(preset, 2))
    coder = planner.plan(snapshot, planner.PlannerConfig(), NOW).presets[0]
    assert coder.state.eligible == 0
    assert [type(action) for action in coder.actions] == [DeleteAction, CreateAction]

    surged = planner.plan(snapshot, planner.PlannerConfig(surge=1), NOW).presets[0]
    # Both kept (claimable, eligible); one replacement, the surge's; nothing deleted yet.
    assert surged.state.eligible == 2
    assert surged.surge_kept == 2
    assert surged.actions == (CreateAction(count=1),)
