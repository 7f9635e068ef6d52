"""The pure core: (snapshot, configuration, now) -> each preset's counts and ordered actions.

BEHAVIOR.md sections 2 and 3. No I/O and no clock: everything with time takes `now`. The snapshot's
rows are grouped by preset once (dictionaries), so a plan costs O(presets + rows), never
O(presets x rows): at tens of thousands of presets that difference is the whole pass.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from uuid import UUID

from reconciler import schedule
from reconciler.actions import (
    Action,
    BackoffAction,
    CancelPendingAction,
    CreateAction,
    CreateBlock,
    DeleteAction,
    DeleteReason,
    Plan,
    PlanProblem,
    PresetPlan,
    PresetState,
)
from reconciler.snapshot import Backoff, InProgress, PrebuildStatus, Preset, RunningPrebuild, Snapshot, Transition


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    backoff_interval: timedelta = timedelta(minutes=1)
    # Safety cap on any preset's target: a typo of 1000 instead of 10 must not start a thousand builds.
    max_desired_instances: int = 100


@dataclass(frozen=True, slots=True)
class PresetInputs:
    """What the snapshot says about one preset."""

    running: Sequence[RunningPrebuild] = ()
    in_progress: Sequence[InProgress] = ()
    pending_non_active: int = 0
    backoff: Backoff | None = None
    at_hard_limit: bool = False
    validation_failed: bool = False


@dataclass(slots=True)
class _Grouped:
    running: dict[UUID, list[RunningPrebuild]] = field(default_factory=lambda: defaultdict(list))
    in_progress: dict[UUID, list[InProgress]] = field(default_factory=lambda: defaultdict(list))
    pending: dict[UUID, int] = field(default_factory=lambda: defaultdict(int))
    backoffs: dict[UUID, Backoff] = field(default_factory=dict)


def _group(snapshot: Snapshot) -> _Grouped:
    grouped = _Grouped()
    for prebuild in snapshot.running:
        grouped.running[prebuild.preset_id].append(prebuild)
    for row in snapshot.in_progress:
        grouped.in_progress[row.preset_id].append(row)
    for pending in snapshot.pending_non_active:
        grouped.pending[pending.preset_id] += pending.count
    for backoff in snapshot.backoffs:
        grouped.backoffs[backoff.preset_id] = backoff
    return grouped


def is_expired(prebuild: RunningPrebuild, preset: Preset, now: datetime) -> bool:
    """Created before the preset's invalidation, or strictly older than its time-to-live."""
    if preset.last_invalidated_at is not None and prebuild.created_at < preset.last_invalidated_at:
        return True
    ttl = preset.invalidate_after_secs
    return ttl is not None and ttl > 0 and now - prebuild.created_at > timedelta(seconds=ttl)


def backoff_until(backoff: Backoff, interval: timedelta) -> datetime:
    try:
        return backoff.last_build_at + backoff.num_failed * interval
    except OverflowError:
        # A build stamped `infinity` (or near the end of time) by another component: backing off
        # "forever" is the rule's answer; raising would fail the pass for every preset.
        return datetime.max.replace(tzinfo=backoff.last_build_at.tzinfo)


def _in_progress_counts(rows: Iterable[InProgress]) -> Mapping[Transition, int]:
    counts = dict.fromkeys(Transition, 0)
    for row in rows:
        counts[row.transition] += row.count
    return counts


def _oldest_first(prebuilds: Iterable[RunningPrebuild]) -> list[RunningPrebuild]:
    # Ties broken by id so that a plan is the same every time it is computed.
    return sorted(prebuilds, key=lambda prebuild: (prebuild.created_at, str(prebuild.workspace_id)))


def plan_preset(
    preset: Preset, inputs: PresetInputs, config: PlannerConfig, now: datetime
) -> tuple[PresetPlan, list[PlanProblem]]:
    """One preset's state and actions (BEHAVIOR.md sections 2 and 3), with any data problem found."""
    problems: list[PlanProblem] = []
    active = preset.active
    running = inputs.running
    expired = [prebuild for prebuild in running if is_expired(prebuild, preset, now)]
    expired_ids = {prebuild.workspace_id for prebuild in expired}
    fresh = [prebuild for prebuild in running if prebuild.workspace_id not in expired_ids]
    in_progress = _in_progress_counts(inputs.in_progress)

    desired = 0
    if active:
        target = schedule.target(preset.desired_instances, preset.schedules, preset.scheduling_timezone, now)
        if target.problem is not None:
            problems.append(PlanProblem(preset.id, "preset.schedule_ignored", target.problem))
        desired = target.instances
        if desired > config.max_desired_instances:
            problems.append(
                PlanProblem(
                    preset.id,
                    "preset.desired_capped",
                    f"target {desired} is above RECONCILER_MAX_DESIRED_INSTANCES; using {config.max_desired_instances}",
                )
            )
            desired = config.max_desired_instances
    state = PresetState(
        desired=desired,
        actual=len(running),
        eligible=sum(1 for prebuild in fresh if prebuild.ready) if active else 0,
        extraneous=max(len(fresh) - desired, 0) if active else 0,
        expired=len(expired),
        starting=in_progress[Transition.START],
        stopping=in_progress[Transition.STOP],
        deleting=in_progress[Transition.DELETE],
    )
    hard_limited = inputs.at_hard_limit or preset.prebuild_status is PrebuildStatus.HARD_LIMITED
    validation_failed = inputs.validation_failed or preset.prebuild_status is PrebuildStatus.VALIDATION_FAILED

    def result(actions: list[Action], **extra: object) -> tuple[PresetPlan, list[PlanProblem]]:
        preset_plan = PresetPlan(preset=preset, state=state, actions=tuple(actions), hard_limited=hard_limited, **extra)  # type: ignore[arg-type]
        return preset_plan, problems

    # 1. Backoff comes first, active or not; at exactly `until` the preset is still backing off.
    if inputs.backoff is not None:
        until = backoff_until(inputs.backoff, config.backoff_interval)
        if now <= until:
            return result([BackoffAction(until=until, num_failed=inputs.backoff.num_failed)], backoff_until=until)

    actions: list[Action] = []
    if not active and not running and inputs.pending_non_active == 0:
        return result(actions, skipped=True)
    if not active:
        # 2. Never creates; cancels what no provisioner picked up, deletes everything running (ours:
        # expired ones too, which Coder leaves behind).
        if inputs.pending_non_active > 0:
            actions.append(CancelPendingAction(count=inputs.pending_non_active))
        if running:
            ids = tuple(prebuild.workspace_id for prebuild in _oldest_first(running))
            actions.append(DeleteAction(workspace_ids=ids, reason=DeleteReason.INACTIVE))
        return result(actions)

    # 3. Active: expired first, then the oldest extraneous ones, then create what is missing.
    if expired:
        ids = tuple(prebuild.workspace_id for prebuild in _oldest_first(expired))
        actions.append(DeleteAction(workspace_ids=ids, reason=DeleteReason.EXPIRED))
    if state.extraneous:
        ids = tuple(prebuild.workspace_id for prebuild in _oldest_first(fresh)[: state.extraneous])
        actions.append(DeleteAction(workspace_ids=ids, reason=DeleteReason.EXTRANEOUS))
    missing = max(desired - len(fresh) - state.starting, 0)
    if missing:
        if validation_failed:
            return result(actions, create_blocked=CreateBlock.VALIDATION_FAILED, creates_withheld=missing)
        if hard_limited:
            return result(actions, create_blocked=CreateBlock.HARD_LIMITED, creates_withheld=missing)
        actions.append(CreateAction(count=missing))
    return result(actions)


def plan(snapshot: Snapshot, config: PlannerConfig, now: datetime) -> Plan:
    """Every preset of the snapshot, in snapshot order, skipped ones included (with no actions)."""
    grouped = _group(snapshot)
    presets: list[PresetPlan] = []
    problems: list[PlanProblem] = []
    for preset in snapshot.presets:
        inputs = PresetInputs(
            running=grouped.running.get(preset.id, ()),
            in_progress=grouped.in_progress.get(preset.id, ()),
            pending_non_active=grouped.pending.get(preset.id, 0),
            backoff=grouped.backoffs.get(preset.id),
            at_hard_limit=preset.id in snapshot.hard_limited_preset_ids,
            validation_failed=preset.id in snapshot.validation_failed_preset_ids,
        )
        preset_plan, preset_problems = plan_preset(preset, inputs, config, now)
        presets.append(preset_plan)
        problems.extend(preset_problems)
    return Plan(generated_at=now, presets=tuple(presets), problems=tuple(problems))
