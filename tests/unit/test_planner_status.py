"""The planner decides every status change (BEHAVIOR.md section 5) with the actions, from the snapshot alone.

Hard limited, validation failed and recovered are decisions of the pure planner: the plan carries them
(with the failures behind them, for the notification), and the preset's actions already follow the status
the pass leaves it in. The executor writes them; nothing is decided after the plan.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from reconciler import planner
from reconciler.plan import CreateAction, CreateBlock, Plan, PresetPlan, StatusChange, StatusChangeKind
from reconciler.snapshot import PrebuildStatus, Preset, PresetFailures, Snapshot

NOW = datetime(2026, 1, 5, 12, tzinfo=UTC)
CONFIG = planner.PlannerConfig(backoff_interval=timedelta(minutes=1))


def make_preset(status: PrebuildStatus = PrebuildStatus.NORMAL, *, active: bool = True, name: str = "p") -> Preset:
    return Preset(
        id=uuid.uuid5(uuid.NAMESPACE_URL, name),
        name=name,
        template_id=uuid.UUID(int=1),
        template_name="go",
        template_version_id=uuid.UUID(int=2),
        template_version_name="v1",
        organization_id=uuid.UUID(int=3),
        organization_name="acme",
        desired_instances=2,
        invalidate_after_secs=None,
        scheduling_timezone="",
        prebuild_status=status,
        last_invalidated_at=None,
        is_active_version=active,
        template_deleted=False,
        template_deprecated=False,
    )


def failures_of(preset: Preset, *, hard_limited: bool, validation_failed: bool = False) -> PresetFailures:
    # No failed build inside the backoff window: only the verdicts decide here.
    return PresetFailures(
        preset_id=preset.id,
        hard_limited=hard_limited,
        validation_failed=validation_failed,
        failure_streak=3 if hard_limited else 1,
        last_error="terraform apply failed",
        last_error_code="REQUIRED_TEMPLATE_VARIABLES" if validation_failed else None,
        last_failed_at=NOW - timedelta(hours=2),
    )


def snapshot_of(preset: Preset, failures: PresetFailures | None) -> Snapshot:
    return Snapshot(
        presets=(preset,),
        hard_limited_preset_ids=frozenset({preset.id} if failures and failures.hard_limited else ()),
        validation_failed_preset_ids=frozenset({preset.id} if failures and failures.validation_failed else ()),
        failures=(failures,) if failures else (),
    )


def plan_one(preset: Preset, failures: PresetFailures | None = None) -> PresetPlan:
    snapshot = snapshot_of(preset, failures)
    plan = planner.plan(snapshot, CONFIG, NOW)
    assert isinstance(plan, Plan)
    assert plan.snapshot is snapshot
    (preset_plan,) = plan.presets
    # The plan lists the change for the executor, with what its notification says.
    expected = (StatusChange(preset_plan.status_change, preset, failures),) if preset_plan.status_change else ()
    assert plan.status_changes == expected
    return preset_plan


def test_a_normal_preset_at_the_limit_becomes_hard_limited_and_creates_nothing() -> None:
    preset = make_preset()
    failures = failures_of(preset, hard_limited=True)
    preset_plan = plan_one(preset, failures)
    assert preset_plan.status_change is StatusChangeKind.HARD_LIMITED
    assert preset_plan.prebuild_status is PrebuildStatus.HARD_LIMITED
    assert preset_plan.preset.prebuild_status is PrebuildStatus.NORMAL  # as read; the executor writes it
    assert (preset_plan.actions, preset_plan.create_blocked, preset_plan.creates_withheld) == (
        (),
        CreateBlock.HARD_LIMITED,
        2,
    )


def test_a_validation_failure_wins_over_the_hard_limit() -> None:
    preset = make_preset()
    failures = failures_of(preset, hard_limited=True, validation_failed=True)
    preset_plan = plan_one(preset, failures)
    assert preset_plan.status_change is StatusChangeKind.VALIDATION_FAILED
    assert preset_plan.prebuild_status is PrebuildStatus.VALIDATION_FAILED
    assert preset_plan.create_blocked is CreateBlock.VALIDATION_FAILED


def test_a_hard_limited_preset_whose_streak_is_broken_recovers_and_creates_in_the_same_pass() -> None:
    preset = make_preset(PrebuildStatus.HARD_LIMITED)
    failures = failures_of(preset, hard_limited=False)
    preset_plan = plan_one(preset, failures)
    assert preset_plan.status_change is StatusChangeKind.RECOVERED
    assert preset_plan.prebuild_status is PrebuildStatus.NORMAL
    assert (preset_plan.hard_limited, preset_plan.create_blocked) == (False, None)
    assert preset_plan.actions == (CreateAction(count=2),)


@pytest.mark.parametrize(
    ("status", "hard_limited"),
    [
        (PrebuildStatus.HARD_LIMITED, True),  # still at the limit: stays, no second episode
        (PrebuildStatus.VALIDATION_FAILED, False),  # leaves only by a reset or a new version
        (PrebuildStatus.NORMAL, False),
    ],
)
def test_no_change_when_the_status_already_says_it(status: PrebuildStatus, hard_limited: bool) -> None:
    preset = make_preset(status)
    preset_plan = plan_one(preset, failures_of(preset, hard_limited=hard_limited))
    assert preset_plan.status_change is None
    assert preset_plan.prebuild_status is status


@pytest.mark.parametrize(
    ("status", "hard_limited"), [(PrebuildStatus.NORMAL, True), (PrebuildStatus.HARD_LIMITED, False)]
)
def test_an_outdated_preset_keeps_its_status(status: PrebuildStatus, hard_limited: bool) -> None:
    preset = make_preset(status, active=False)
    preset_plan = plan_one(preset, failures_of(preset, hard_limited=hard_limited))
    assert preset_plan.status_change is None
    assert preset_plan.prebuild_status is status


def test_a_preset_the_planner_fails_on_still_gets_its_status_change() -> None:
    # Its actions are left out of the plan (preset.plan_failed); its status follows from its failures alone.
    broken = dataclasses.replace(make_preset(), desired_instances="2")  # type: ignore[arg-type]  # a bug's value
    failures = failures_of(broken, hard_limited=True)
    plan = planner.plan(snapshot_of(broken, failures), CONFIG, NOW)
    assert plan.presets == ()
    assert [problem.event for problem in plan.problems] == [planner.PLAN_FAILED]
    assert plan.status_changes == (StatusChange(StatusChangeKind.HARD_LIMITED, broken, failures),)
