"""The planner's steady fast path (`planner._SteadyPath`) gives exactly the general path's plan.

Generated snapshots are biased towards the steady preset it handles (active, static target, nothing
expired, in flight, backing off or failed; or inactive with nothing), each perturbed by one of the things
that send a preset to the general path instead, so that both sides of every condition are compared.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler import planner
from reconciler.expression_compiler import target_expressions
from reconciler.failed_cleanup import CleanupPolicy, FailedPrebuild
from reconciler.plan import Plan, PresetPlan
from reconciler.snapshot import (
    Backoff,
    FailedPrebuilds,
    InProgress,
    PendingNonActive,
    PrebuildStatus,
    Preset,
    PresetFailures,
    RunningPrebuild,
    Schedule,
    Snapshot,
    Transition,
)

NOW = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)
VERSION = uuid.UUID(int=3)
PERTURBATIONS = (
    "inactive",
    "deleted",
    "deprecated",
    "status",
    "desired_above_cap",
    "desired_below_zero",
    "invalidated",
    "invalidated_ahead",
    "invalidated_far_ahead",
    "ttl",
    "ttl_zero",
    "old_prebuild",
    "schedule",
    "expression",
    "blank_expression",
    "in_progress",
    "backoff",
    "pending",
    "failed",
    "hard_limited",
    "validation_failed",
    "failures",
    "extraneous",
    "missing",
)


def snapshot_of(rng: random.Random, count: int) -> Snapshot:
    presets: list[Preset] = []
    running: list[RunningPrebuild] = []
    in_progress: list[InProgress] = []
    pending: list[PendingNonActive] = []
    backoffs: list[Backoff] = []
    failures: list[PresetFailures] = []
    failed: list[FailedPrebuilds] = []
    hard_limited: set[uuid.UUID] = set()
    validation_failed: set[uuid.UUID] = set()
    serial = 0
    for index in range(count):
        preset_id = uuid.UUID(int=10**12 + index)
        # Most presets are steady; each of the others gets one or two perturbations.
        changes = set(rng.sample(PERTURBATIONS, rng.choice((1, 1, 2)))) if rng.random() < 0.6 else set()
        desired = rng.randint(0, 8)
        if "desired_above_cap" in changes:
            desired = rng.randint(21, 30)
        elif "desired_below_zero" in changes:
            desired = -1
        size = desired
        if "extraneous" in changes:
            size = desired + rng.randint(1, 3)
        elif "missing" in changes:
            size = max(desired - rng.randint(1, 3), 0)
        size = max(size, 0)
        ttl = rng.choice((None, 3600, 86_400)) if "ttl" in changes or rng.random() < 0.5 else None
        if "ttl_zero" in changes:
            ttl = 0
        invalidated: datetime | None = None
        if "invalidated" in changes:
            invalidated = NOW - timedelta(seconds=rng.randint(0, 7200))
        elif "invalidated_ahead" in changes:
            invalidated = NOW + timedelta(seconds=rng.randint(1, 120))
        elif "invalidated_far_ahead" in changes:
            invalidated = NOW + timedelta(minutes=rng.randint(3, 600))
        elif rng.random() < 0.2:
            invalidated = NOW - timedelta(days=2)
        expression: str | None = None
        if "expression" in changes:
            expression = rng.choice(("claims_60m + 1", "scheduled_target", "1 +"))
        elif "blank_expression" in changes:
            expression = rng.choice(("", "  "))
        status = PrebuildStatus.NORMAL
        if "status" in changes:
            status = rng.choice((PrebuildStatus.HARD_LIMITED, PrebuildStatus.VALIDATION_FAILED))
        presets.append(
            Preset(
                id=preset_id,
                name=f"preset-{index}",
                template_id=uuid.UUID(int=1),
                template_name="template",
                template_version_id=VERSION,
                template_version_name="v1",
                organization_id=uuid.UUID(int=2),
                organization_name="org",
                desired_instances=desired,
                invalidate_after_secs=ttl,
                scheduling_timezone="",
                prebuild_status=status,
                last_invalidated_at=invalidated,
                is_active_version="inactive" not in changes,
                template_deleted="deleted" in changes,
                template_deprecated="deprecated" in changes,
                schedules=(Schedule("* 9-17 * * 1-5", desired + 1),) if "schedule" in changes else (),
                desired_instances_expression=expression,
            )
        )
        for number in range(size):
            serial += 1
            age = timedelta(seconds=rng.randint(0, 3000))
            if "old_prebuild" in changes and number == 0:
                age = timedelta(days=3)
            running.append(
                RunningPrebuild(uuid.UUID(int=10**15 + serial), preset_id, VERSION, rng.random() < 0.8, NOW - age)
            )
        if "in_progress" in changes:
            transition = rng.choice(list(Transition))
            in_progress.append(
                InProgress(preset_id, VERSION, transition, rng.randint(1, 3), NOW - timedelta(minutes=1))
            )
        if "backoff" in changes:
            backoffs.append(Backoff(preset_id, rng.randint(1, 3), NOW - timedelta(seconds=rng.randint(0, 400))))
        if "pending" in changes:
            pending.append(PendingNonActive(preset_id, rng.randint(1, 2)))
        if "failed" in changes:
            serial += 1
            failed.append(
                FailedPrebuilds(
                    preset_id,
                    (FailedPrebuild(uuid.UUID(int=10**15 + serial), NOW - timedelta(days=rng.randint(0, 9))),),
                )
            )
        if "hard_limited" in changes:
            hard_limited.add(preset_id)
        if "validation_failed" in changes:
            validation_failed.add(preset_id)
        if "failures" in changes or preset_id in hard_limited or preset_id in validation_failed:
            failures.append(
                PresetFailures(
                    preset_id,
                    hard_limited=preset_id in hard_limited,
                    validation_failed=preset_id in validation_failed,
                    failure_streak=rng.randint(1, 3),
                    last_error="boom",
                    last_error_code=None,
                    last_failed_at=NOW - timedelta(minutes=5),
                )
            )
    rng.shuffle(running)
    return Snapshot(
        presets=tuple(presets),
        running=tuple(running),
        in_progress=tuple(in_progress),
        pending_non_active=tuple(pending),
        backoffs=tuple(backoffs),
        hard_limited_preset_ids=frozenset(hard_limited),
        validation_failed_preset_ids=frozenset(validation_failed),
        failures=tuple(failures),
        failed_prebuilds=tuple(failed),
    )


CONFIGS = (
    planner.PlannerConfig(max_desired_instances=20),
    planner.PlannerConfig(max_desired_instances=20, ttl_jitter=0.2, surge=1),
    planner.PlannerConfig(max_desired_instances=20, cleanup=CleanupPolicy(keep=0, keep_for=timedelta(0))),
)


def both_paths(snapshot: Snapshot, config: planner.PlannerConfig) -> tuple[Plan, Plan]:
    expressions = target_expressions(preset.desired_instances_expression for preset in snapshot.presets)
    fast = planner.plan(snapshot, config, NOW, expressions=expressions)
    general = planner.plan(snapshot, config, NOW, expressions=expressions, steady_fast_path=False)
    return fast, general


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32), config=st.sampled_from(CONFIGS))
def test_the_steady_fast_path_plans_exactly_what_the_general_path_plans(
    seed: int, config: planner.PlannerConfig
) -> None:
    fast, general = both_paths(snapshot_of(random.Random(seed), 40), config)
    assert fast == general
    # Field by field too, so that a difference names the preset and the field.
    for fast_plan, general_plan in zip(fast.presets, general.presets, strict=True):
        assert fast_plan == general_plan, fast_plan.preset.name


def test_the_fast_path_takes_most_steady_presets_and_gives_them_their_general_plan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Not vacuous: most presets of a large generated snapshot do take the fast path (active and inactive,
    # with creates and extraneous deletes among them), and the plan is still the general path's.
    taken: list[PresetPlan] = []
    steady_plan = planner._SteadyPath.plan

    def counted(self: planner._SteadyPath, *arguments: Any) -> PresetPlan | None:
        preset_plan = steady_plan(self, *arguments)
        if preset_plan is not None:
            taken.append(preset_plan)
        return preset_plan

    monkeypatch.setattr(planner._SteadyPath, "plan", counted)
    snapshot = snapshot_of(random.Random(16), 3000)
    fast, general = both_paths(snapshot, CONFIGS[0])
    assert fast == general
    assert len(taken) > len(snapshot.presets) // 2
    assert any(plan.skipped for plan in taken)
    assert any(plan.actions and plan.state.extraneous for plan in taken)
    assert any(plan.actions and not plan.state.extraneous for plan in taken)
    assert any(not plan.actions and not plan.skipped for plan in taken)
