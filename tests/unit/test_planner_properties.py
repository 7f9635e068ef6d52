"""Properties of the pure planner over generated snapshots (hypothesis)."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler import planner
from reconciler.plan import BackoffAction, CancelPendingAction, CreateAction, DeleteAction, DeleteReason, Plan
from reconciler.snapshot import (
    Backoff,
    InProgress,
    PendingNonActive,
    PrebuildStatus,
    Preset,
    RunningPrebuild,
    Snapshot,
    Transition,
)

NOW = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)
CONFIG = planner.PlannerConfig(backoff_interval=timedelta(minutes=1), max_desired_instances=20)
TEMPLATE_ID = uuid.UUID(int=1)
ORGANIZATION_ID = uuid.UUID(int=2)


@st.composite
def presets(draw: st.DrawFn) -> Preset:
    index = draw(st.integers(min_value=0, max_value=10**9))
    invalidated = draw(st.none() | st.integers(min_value=-7200, max_value=60))
    return Preset(
        id=uuid.UUID(int=10**12 + index),
        name=f"preset-{index}",
        template_id=TEMPLATE_ID,
        template_name="template",
        template_version_id=uuid.UUID(int=3),
        template_version_name="v1",
        organization_id=ORGANIZATION_ID,
        organization_name="org",
        desired_instances=draw(st.integers(min_value=0, max_value=30)),
        invalidate_after_secs=draw(st.none() | st.integers(min_value=0, max_value=7200)),
        scheduling_timezone="",
        prebuild_status=draw(st.sampled_from(PrebuildStatus)),
        last_invalidated_at=None if invalidated is None else NOW + timedelta(seconds=invalidated),
        is_active_version=draw(st.booleans()),
        template_deleted=draw(st.booleans()),
        template_deprecated=draw(st.booleans()),
    )


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    preset_list = draw(st.lists(presets(), min_size=1, max_size=4, unique_by=lambda preset: preset.id))
    preset_ids = [preset.id for preset in preset_list]
    running = [
        RunningPrebuild(
            workspace_id=uuid.UUID(int=10**15 + number),
            preset_id=draw(st.sampled_from(preset_ids)),
            template_version_id=uuid.UUID(int=3),
            ready=draw(st.booleans()),
            created_at=NOW - timedelta(seconds=draw(st.integers(min_value=0, max_value=10_000))),
        )
        for number in range(draw(st.integers(min_value=0, max_value=25)))
    ]
    in_progress = [
        InProgress(draw(st.sampled_from(preset_ids)), uuid.UUID(int=3), transition, count)
        for transition in Transition
        if (count := draw(st.integers(min_value=0, max_value=4)))
    ]
    pending = [PendingNonActive(preset_id, draw(st.integers(min_value=1, max_value=3))) for preset_id in preset_ids[:1]]
    backoffs = [
        Backoff(
            preset_id, draw(st.integers(min_value=1, max_value=5)), NOW - timedelta(seconds=draw(st.integers(0, 600)))
        )
        for preset_id in draw(st.lists(st.sampled_from(preset_ids), max_size=2, unique=True))
    ]
    return Snapshot(
        presets=tuple(preset_list),
        running=tuple(running),
        in_progress=tuple(in_progress),
        pending_non_active=tuple(pending) if draw(st.booleans()) else (),
        backoffs=tuple(backoffs),
        hard_limited_preset_ids=frozenset(draw(st.lists(st.sampled_from(preset_ids), max_size=2))),
    )


def is_expired(prebuild: RunningPrebuild, preset: Preset, now: datetime) -> bool:
    cutoff = planner.expiry_cutoff(preset, now)
    return cutoff is not None and prebuild.created_at < cutoff


def creates(plan: Plan) -> dict[uuid.UUID, int]:
    return {
        preset_plan.preset.id: sum(action.count for action in preset_plan.actions if isinstance(action, CreateAction))
        for preset_plan in plan.presets
    }


@settings(max_examples=300, deadline=None)
@given(snapshots())
def test_inactive_presets_never_create(snapshot: Snapshot) -> None:
    plan = planner.plan(snapshot, CONFIG, NOW)
    for preset_plan in plan.presets:
        if not preset_plan.preset.active:
            assert creates(plan)[preset_plan.preset.id] == 0


@settings(max_examples=300, deadline=None)
@given(snapshots())
def test_creates_never_exceed_the_target_minus_running_and_starting(snapshot: Snapshot) -> None:
    plan = planner.plan(snapshot, CONFIG, NOW)
    for preset_plan in plan.presets:
        state = preset_plan.state
        room = state.desired - (state.actual - state.expired) - state.starting
        assert creates(plan)[preset_plan.preset.id] <= max(room, 0)
        assert state.desired <= CONFIG.max_desired_instances


@settings(max_examples=300, deadline=None)
@given(snapshots())
def test_only_running_prebuilds_of_the_preset_are_deleted_and_never_twice(snapshot: Snapshot) -> None:
    plan = planner.plan(snapshot, CONFIG, NOW)
    all_deleted: list[uuid.UUID] = []
    for preset_plan in plan.presets:
        own = {prebuild.workspace_id for prebuild in snapshot.running if prebuild.preset_id == preset_plan.preset.id}
        for action in preset_plan.actions:
            if isinstance(action, DeleteAction):
                assert set(action.workspace_ids) <= own
                all_deleted.extend(action.workspace_ids)
    assert len(all_deleted) == len(set(all_deleted))


@settings(max_examples=300, deadline=None)
@given(snapshots())
def test_expired_prebuilds_are_deleted_before_extraneous_ones(snapshot: Snapshot) -> None:
    plan = planner.plan(snapshot, CONFIG, NOW)
    for preset_plan in plan.presets:
        reasons = [action.reason for action in preset_plan.actions if isinstance(action, DeleteAction)]
        if DeleteReason.EXTRANEOUS in reasons and DeleteReason.EXPIRED in reasons:
            assert reasons.index(DeleteReason.EXPIRED) < reasons.index(DeleteReason.EXTRANEOUS)
        expired = {
            prebuild.workspace_id
            for prebuild in snapshot.running
            if prebuild.preset_id == preset_plan.preset.id and is_expired(prebuild, preset_plan.preset, NOW)
        }
        for action in preset_plan.actions:
            if isinstance(action, DeleteAction) and action.reason is DeleteReason.EXTRANEOUS:
                assert not expired & set(action.workspace_ids)


@settings(max_examples=300, deadline=None)
@given(snapshots())
def test_in_backoff_nothing_else_happens(snapshot: Snapshot) -> None:
    plan = planner.plan(snapshot, CONFIG, NOW)
    for preset_plan in plan.presets:
        if any(isinstance(action, BackoffAction) for action in preset_plan.actions):
            assert len(preset_plan.actions) == 1
            assert preset_plan.backoff_until is not None
            assert preset_plan.backoff_until >= NOW


def apply(snapshot: Snapshot, plan: Plan) -> Snapshot:
    """The world right after the plan's writes, provisioning aside: deleted prebuilds are gone, created
    ones are starting, canceled pending builds are gone; builds already in flight are still in flight."""
    deleted = {
        workspace_id
        for preset_plan in plan.presets
        for action in preset_plan.actions
        if isinstance(action, DeleteAction)
        for workspace_id in action.workspace_ids
    }
    canceled = {
        preset_plan.preset.id
        for preset_plan in plan.presets
        if any(isinstance(action, CancelPendingAction) for action in preset_plan.actions)
    }
    started = [
        InProgress(preset_id, uuid.UUID(int=3), Transition.START, count)
        for preset_id, count in creates(plan).items()
        if count
    ]
    return dataclasses.replace(
        snapshot,
        running=tuple(prebuild for prebuild in snapshot.running if prebuild.workspace_id not in deleted),
        in_progress=(*snapshot.in_progress, *started),
        pending_non_active=tuple(row for row in snapshot.pending_non_active if row.preset_id not in canceled),
    )


@settings(max_examples=300, deadline=None)
@given(snapshots())
def test_a_plan_on_its_own_outcome_wants_no_further_change(snapshot: Snapshot) -> None:
    first = planner.plan(snapshot, CONFIG, NOW)
    second = planner.plan(apply(snapshot, first), CONFIG, NOW)
    for preset_plan in second.presets:
        changes = [
            action
            for action in preset_plan.actions
            if isinstance(action, CreateAction | DeleteAction | CancelPendingAction)
        ]
        assert changes == [], (preset_plan.preset, preset_plan.state)
