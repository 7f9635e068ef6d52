"""The pure core: (snapshot, configuration, now) -> each preset's status change, counts and ordered actions.

BEHAVIOR.md sections 2, 3 and 5. No I/O and no clock: everything with time takes `now`. The snapshot's
rows are grouped by preset once (dictionaries), so a plan costs O(presets + rows), never
O(presets x rows): at tens of thousands of presets that difference is the whole pass.
"""

from __future__ import annotations

import traceback
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from uuid import UUID

from reconciler import backoff as backoff_policy
from reconciler import failed_cleanup, rotation
from reconciler.admission import Admission, Budget, Wants, admit
from reconciler.breaker import BreakerSettings, BreakerState, decide
from reconciler.demand import NO_DEMAND, DemandCounts, PoolCounts
from reconciler.expression import CompiledExpression, InvalidExpression
from reconciler.failed_cleanup import CleanupPolicy, FailedPrebuild
from reconciler.plan import (
    Action,
    BackoffAction,
    BudgetUse,
    CancelPendingAction,
    CreateAction,
    CreateBlock,
    DeleteAction,
    DeleteReason,
    Plan,
    PlanProblem,
    PresetPlan,
    PresetState,
    StatusChange,
    StatusChangeKind,
)
from reconciler.snapshot import (
    Backoff,
    InProgress,
    PrebuildStatus,
    Preset,
    PresetFailures,
    RunningPrebuild,
    Snapshot,
    Transition,
)
from reconciler.target import Target, TargetHold, TargetSettings, TargetSource, resolve_target, scheduled_target

# Each distinct expression text of the snapshot, compiled (`expression_compiler.target_expressions`): the
# planner does no parsing, and a fleet that shares a few expressions compiles each once.
Expressions = Mapping[str, CompiledExpression | InvalidExpression]

EXPRESSION_FAILED = "preset.expression_failed"


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    backoff_interval: timedelta = timedelta(minutes=1)
    # Safety cap on any preset's target: a typo of 1000 instead of 10 must not start a thousand builds.
    max_desired_instances: int = 100
    # RECONCILER_BACKOFF_STRATEGY and RECONCILER_BACKOFF_MAX (issue 15.3); linear is Coder's formula.
    backoff_strategy: backoff_policy.BackoffStrategy = backoff_policy.BackoffStrategy.LINEAR
    backoff_max: timedelta = timedelta(hours=1)
    # RECONCILER_MAX_IN_FLIGHT and RECONCILER_MAX_IN_FLIGHT_PER_TEMPLATE (issue 15.1); unlimited by default.
    budget: Budget = field(default_factory=Budget)
    # The global breaker (issue 15.2); disabled by default.
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    # RECONCILER_SLOW_START; 0 = off.
    slow_start: int = 0
    # RECONCILER_SURGE and RECONCILER_TTL_JITTER (issue 15.4); 0 = Coder's rotation.
    surge: int = 0
    ttl_jitter: float = 0.0
    # RECONCILER_FAILED_PREBUILDS_KEEP and _KEEP_FOR (issue 15.5).
    cleanup: CleanupPolicy = field(default_factory=CleanupPolicy)

    @property
    def backoff(self) -> backoff_policy.BackoffPolicy:
        return backoff_policy.BackoffPolicy(self.backoff_interval, self.backoff_strategy, self.backoff_max)

    # How long a lower computed target holds off deletes (expression presets only; 0 = Coder's at once).
    stabilization_window: timedelta = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class PresetInputs:
    """What the snapshot says about one preset."""

    running: Sequence[RunningPrebuild] = ()
    in_progress: Sequence[InProgress] = ()
    pending_non_active: int = 0
    backoff: Backoff | None = None
    at_hard_limit: bool = False
    validation_failed: bool = False
    failures: PresetFailures | None = None
    # The preset's compiled expression (None: none, or blank), its demand, and what the last pass held.
    expression: CompiledExpression | InvalidExpression | None = None
    demand: DemandCounts = NO_DEMAND
    hold: TargetHold | None = None
    # Its failed prebuilds, for their cleanup (issue 15.5).
    failed: Sequence[FailedPrebuild] = ()


@dataclass(slots=True)
class _Grouped:
    running: dict[UUID, list[RunningPrebuild]] = field(default_factory=lambda: defaultdict(list))
    in_progress: dict[UUID, list[InProgress]] = field(default_factory=lambda: defaultdict(list))
    pending: dict[UUID, int] = field(default_factory=lambda: defaultdict(int))
    backoffs: dict[UUID, Backoff] = field(default_factory=dict)
    failures: dict[UUID, PresetFailures] = field(default_factory=dict)
    demand: dict[UUID, DemandCounts] = field(default_factory=dict)
    failed: dict[UUID, tuple[FailedPrebuild, ...]] = field(default_factory=dict)


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
    for failures in snapshot.failures:
        grouped.failures[failures.preset_id] = failures
    for demand in snapshot.demand:
        grouped.demand[demand.preset_id] = demand.counts
    for failed in snapshot.failed_prebuilds:
        grouped.failed[failed.preset_id] = failed.prebuilds
    return grouped


# How far in the future `last_invalidated_at` may be and still count (BEHAVIOR.md section 2, "expired").
# Another component stamps it with its own clock and this process compares it with its own, so a little
# skew is normal and must not delay an operator's invalidation. Beyond it, the time is a bad row: it would
# expire every new prebuild the moment it exists, for as long as the time lies ahead (for ever, with
# `infinity`). Within it, an invalidation ahead of our clock re-creates what is built until that time
# (Coder's behaviour), so the tolerance is also the longest such churn can last; beyond it, the
# invalidation is only deferred, as it counts again once it is this close. Two minutes covers the skew of
# any synchronized clock many times over and is twice the shared vectors' +60 s; a constant, not a
# setting, because no value changes what an invalidation does, only how long a broken clock churns.
INVALIDATION_CLOCK_SKEW = timedelta(minutes=2)
INVALIDATION_IGNORED = "preset.invalidation_ignored"


_NO_CAP = 2**63


def usable_invalidation(preset: Preset, now: datetime) -> datetime | None:
    """The preset's `last_invalidated_at`, unless it lies more than INVALIDATION_CLOCK_SKEW after `now`."""
    invalidated = preset.last_invalidated_at
    if invalidated is None or invalidated - now > INVALIDATION_CLOCK_SKEW:
        return None
    return invalidated


def _invalidation_ignored(preset: Preset) -> PlanProblem:
    # The detail names the stored time, never `now`: the same row gives the same problem every pass, so
    # that it is logged once (reconciler.problem_log).
    invalidated = preset.last_invalidated_at
    assert invalidated is not None
    shown = "infinity" if invalidated.replace(tzinfo=None) == datetime.max else invalidated.isoformat()
    return PlanProblem(
        preset.id,
        INVALIDATION_IGNORED,
        f"last_invalidated_at {shown} is more than {INVALIDATION_CLOCK_SKEW.total_seconds():.0f} s in the future:"
        " ignored until it is not (it would expire every new prebuild)",
    )


def status_change(preset: Preset, inputs: PresetInputs) -> StatusChangeKind | None:
    """Whether this pass changes the preset's status (BEHAVIOR.md section 5), and to what.

    Only active presets move: the failure evidence covers the active version alone, so an outdated
    preset's status is left as it was rather than "recovering" because nobody looks any more. A
    validation failure wins over the hard limit; a `validation_failed` preset leaves it only by a reset.
    """
    if not preset.active:
        return None
    if preset.prebuild_status is PrebuildStatus.NORMAL:
        if inputs.validation_failed:
            return StatusChangeKind.VALIDATION_FAILED
        if inputs.at_hard_limit:
            return StatusChangeKind.HARD_LIMITED
    elif preset.prebuild_status is PrebuildStatus.HARD_LIMITED and not inputs.at_hard_limit:
        return StatusChangeKind.RECOVERED
    return None


def expiry_cutoff(preset: Preset, now: datetime) -> datetime | None:
    """Prebuilds created strictly before this instant are expired; None when nothing expires.

    Created before the preset's invalidation (when usable: not too far in the future), or strictly older
    than its time-to-live (now - created_at > ttl, i.e. created_at < now - ttl): both are one comparison
    with the later bound.
    """
    cutoffs = []
    invalidated = usable_invalidation(preset, now)
    if invalidated is not None:
        cutoffs.append(invalidated)
    ttl = preset.invalidate_after_secs
    if ttl is not None and ttl > 0:
        cutoffs.append(now - timedelta(seconds=ttl))
    return max(cutoffs) if cutoffs else None


def _past_ttl(prebuild: RunningPrebuild, ttl: int | None, config: PlannerConfig, now: datetime) -> bool:
    """Older than its time-to-live, shortened by the TTL jitter when one is set (issue 15.4)."""
    if ttl is None or ttl <= 0:
        return False
    if config.ttl_jitter > 0:
        return rotation.expired_by_ttl(prebuild.created_at, prebuild.workspace_id, ttl, config.ttl_jitter, now)
    return prebuild.created_at < now - timedelta(seconds=ttl)


def backoff_until(backoff: Backoff, interval: timedelta) -> datetime:
    try:
        return backoff.last_build_at + backoff.num_failed * interval
    except OverflowError:
        # A build stamped `infinity` (or near the end of time) by another component: backing off
        # "forever" is the rule's answer; raising would fail the pass for every preset.
        return datetime.max.replace(tzinfo=backoff.last_build_at.tzinfo)


def _oldest_first(prebuilds: Iterable[RunningPrebuild]) -> list[RunningPrebuild]:
    # Ties broken by id so that a plan is the same every time it is computed.
    return sorted(prebuilds, key=lambda prebuild: (prebuild.created_at, str(prebuild.workspace_id)))


def plan_preset(
    preset: Preset, inputs: PresetInputs, config: PlannerConfig, now: datetime
) -> tuple[PresetPlan, list[PlanProblem]]:
    """One preset's status change, state and actions (BEHAVIOR.md sections 2, 3 and 5), with any data
    problem found."""
    problems: list[PlanProblem] = []
    if preset.last_invalidated_at is not None and usable_invalidation(preset, now) is None:
        problems.append(_invalidation_ignored(preset))
    active = preset.active
    running = inputs.running
    # One walk over the prebuilds: this runs for every preset of a fleet, every pass.
    cutoff = expiry_cutoff(preset, now)
    ttl = preset.invalidate_after_secs
    # With TTL jitter (issue 15.4), each prebuild's own time-to-live (rotation.time_to_live) decides, and
    # the invalidation by its own time; without, one comparison with the later bound, as before.
    jittered = config.ttl_jitter > 0 and ttl is not None and ttl > 0
    invalidated = usable_invalidation(preset, now) if jittered else None
    expired: list[RunningPrebuild] = []
    fresh: list[RunningPrebuild] = []
    ready = 0
    for prebuild in running:
        if jittered:
            is_expired = (invalidated is not None and prebuild.created_at < invalidated) or _past_ttl(
                prebuild, ttl, config, now
            )
        else:
            is_expired = cutoff is not None and prebuild.created_at < cutoff
        if is_expired:
            expired.append(prebuild)
        else:
            fresh.append(prebuild)
            ready += prebuild.ready
    starting = stopping = deleting = 0
    oldest_pending_at: datetime | None = None
    for row in inputs.in_progress:
        if row.oldest_pending_at is not None and (
            oldest_pending_at is None or row.oldest_pending_at < oldest_pending_at
        ):
            oldest_pending_at = row.oldest_pending_at
        if row.transition is Transition.START:
            starting += row.count
        elif row.transition is Transition.STOP:
            stopping += row.count
        else:
            deleting += row.count

    # A preset new to the process (a restart, a failover, a new expression) is held at its pool's size:
    # a drop deletes only after a full window, never earlier than a process that had watched it.
    hold = inputs.hold if inputs.hold is not None else TargetHold(retained=len(fresh))
    target = resolve_target(
        active=active,
        desired_instances=preset.desired_instances,
        schedules=preset.schedules,
        timezone=preset.scheduling_timezone,
        expression=inputs.expression,
        pool=PoolCounts(
            running=len(fresh),
            eligible=ready,
            starting=starting,
            stopping=stopping,
            deleting=deleting,
            expired=len(expired),
        ),
        demand=inputs.demand,
        previous_hold=hold,
        settings=TargetSettings(config.max_desired_instances, config.stabilization_window),
        now=now,
    )
    problems.extend(PlanProblem(preset.id, event, detail) for event, detail in target.problems)
    if target.error is not None:
        # The detail is the error alone (never `now`), so the same failure is logged once (problem_log).
        problems.append(PlanProblem(preset.id, EXPRESSION_FAILED, f"{target.error.kind.value}: {target.error}"))
    desired = target.desired
    target_source = target.source
    uncapped_target: int | None = None
    schedule_problem: str | None = None
    for event, detail in target.problems:
        if event == "preset.schedule_ignored":
            schedule_problem = detail
        elif event == "preset.desired_capped" and "above" in detail:
            # Rare (a typo'd target): computed again without the cap, for `status` to show.
            _, uncapped_target, _ = scheduled_target(
                preset.desired_instances, preset.schedules, preset.scheduling_timezone, _NO_CAP, now
            )
    # Surge (issue 15.4): replacements first; ready expired prebuilds stay claimable until then.
    rotated = None
    if active and expired and config.surge > 0:
        rotated = rotation.rotate(
            desired=desired,
            fresh=len(fresh),
            fresh_ready=ready,
            starting=starting,
            expired=_oldest_first(expired),
            surge=config.surge,
        )
        # The kept ones can be claimed: they are eligible until their replacements are.
        ready += len(rotated.kept)
    state = PresetState(
        desired=desired,
        actual=len(running),
        eligible=ready if active else 0,
        # Above `retained`, which a stabilizing drop keeps above `desired` for a while.
        extraneous=max(len(fresh) - target.retained, 0) if active else 0,
        expired=len(expired),
        starting=starting,
        stopping=stopping,
        deleting=deleting,
    )
    # The actions follow the status this pass leaves the preset in, its change included.
    change = status_change(preset, inputs)
    status = change.new_status if change is not None else preset.prebuild_status
    hard_limited = inputs.at_hard_limit or status is PrebuildStatus.HARD_LIMITED
    validation_failed = inputs.validation_failed or status is PrebuildStatus.VALIDATION_FAILED

    # Expired prebuilds the surge keeps this pass (set below; read by `result` when it is called).
    surge_kept = 0

    def result(actions: list[Action], **extra: object) -> tuple[PresetPlan, list[PlanProblem]]:
        preset_plan = PresetPlan(
            preset=preset,
            state=state,
            actions=tuple(actions),
            hard_limited=hard_limited,
            status_change=change,
            target_source=target_source,
            uncapped_target=uncapped_target,
            schedule_problem=schedule_problem,
            failures=inputs.failures,
            oldest_pending_at=oldest_pending_at,
            target=target,
            surge_kept=surge_kept,
            **extra,  # type: ignore[arg-type]
        )
        return preset_plan, problems

    # 1. Backoff comes first, active or not; at exactly `until` the preset is still backing off.
    if inputs.backoff is not None:
        if config.backoff_strategy is backoff_policy.BackoffStrategy.LINEAR:
            until = backoff_until(inputs.backoff, config.backoff_interval)
        else:
            until = backoff_policy.backoff_until(
                config.backoff, inputs.backoff.num_failed, preset.id, inputs.backoff.last_build_at
            )
        if now <= until:
            return result([BackoffAction(until=until, num_failed=inputs.backoff.num_failed)], backoff_until=until)

    actions: list[Action] = []
    # Ours (issue 15.5): the failed prebuilds beyond what is kept as evidence, oldest first.
    cleanup = failed_cleanup.select(inputs.failed, config.cleanup, now) if inputs.failed else ()
    cleanup_action = DeleteAction(workspace_ids=cleanup, reason=DeleteReason.FAILED_CLEANUP) if cleanup else None
    if not active and not running and inputs.pending_non_active == 0 and cleanup_action is None:
        return result(actions, skipped=True)
    if not active:
        # 2. Never creates; cancels what no provisioner picked up, deletes everything running (ours:
        # expired ones too, which Coder leaves behind).
        if inputs.pending_non_active > 0:
            actions.append(CancelPendingAction(count=inputs.pending_non_active))
        if running:
            ids = tuple(prebuild.workspace_id for prebuild in _oldest_first(running))
            actions.append(DeleteAction(workspace_ids=ids, reason=DeleteReason.INACTIVE))
        if cleanup_action is not None:
            actions.append(cleanup_action)
        return result(actions)

    # 3. Active: expired first, then the oldest extraneous ones, then create what is missing. The expired
    # are told apart only for their delete's reason (the metrics' label): past their time to live, or
    # within it but created before the operator's invalidation.
    if expired:
        by_reason: dict[DeleteReason, list[RunningPrebuild]] = {DeleteReason.EXPIRED: [], DeleteReason.INVALIDATED: []}
        to_delete = set(rotated.delete) if rotated is not None else None
        for prebuild in expired:
            if to_delete is not None and prebuild.workspace_id not in to_delete:
                continue
            past_ttl = _past_ttl(prebuild, ttl, config, now)
            by_reason[DeleteReason.EXPIRED if past_ttl else DeleteReason.INVALIDATED].append(prebuild)
        for reason, prebuilds in by_reason.items():
            if prebuilds:
                ids = tuple(prebuild.workspace_id for prebuild in _oldest_first(prebuilds))
                actions.append(DeleteAction(workspace_ids=ids, reason=reason))
    if state.extraneous:
        ids = tuple(prebuild.workspace_id for prebuild in _oldest_first(fresh)[: state.extraneous])
        actions.append(DeleteAction(workspace_ids=ids, reason=DeleteReason.EXTRANEOUS))
    if cleanup_action is not None:
        actions.append(cleanup_action)
    missing = max(desired - len(fresh) - state.starting, 0)
    if rotated is not None:
        # The kept expired prebuilds are beyond the target: with the creates, at most `surge` beyond it.
        surge_kept = len(rotated.kept)
        missing = min(missing, max(desired + config.surge - len(fresh) - state.starting - surge_kept, 0))
    if missing:
        if validation_failed:
            return result(actions, create_blocked=CreateBlock.VALIDATION_FAILED, creates_withheld=missing)
        if hard_limited:
            return result(actions, create_blocked=CreateBlock.HARD_LIMITED, creates_withheld=missing)
        actions.append(CreateAction(count=missing))
    return result(actions)


class _SteadyPath:
    """The plan of a preset in the steady state, without the general path's machinery (`plan_preset`).

    At fleet size nearly every preset is one of two kinds: active, with a static target and a pool with
    nothing expired, in flight, backing off or failed (a pool at its target, or missing a few); or
    inactive with nothing at all (skipped). For those, the general path spends most of its time on what
    does not apply (targets, schedules, expressions, holds, backoff, status changes, closures). This gives
    the very same `PresetPlan` (tests/unit/test_planner_steady.py compares both over generated snapshots);
    `plan` returns None for anything else, which then takes the general path. The targets and states,
    immutable, are shared between the presets that have equal ones: fewer objects for the collector.
    The caller has checked what the grouped snapshot says: no expression, schedules, in-progress builds,
    backoff, failed prebuilds, pending builds or hard limit.
    """

    __slots__ = ("cap", "jitter", "now", "states", "targets")

    INACTIVE = Target(TargetSource.INACTIVE, desired=0, retained=0, scheduled_target=0)
    INACTIVE_STATE = PresetState()

    def __init__(self, config: PlannerConfig, now: datetime) -> None:
        self.cap = config.max_desired_instances
        self.jitter = config.ttl_jitter > 0
        self.now = now
        self.targets: dict[int, Target] = {}
        self.states: dict[tuple[int, int, int], PresetState] = {}

    def plan(
        self,
        preset: Preset,
        running: Sequence[RunningPrebuild],
        failures: PresetFailures | None,
        validation_failed: bool,
    ) -> PresetPlan | None:
        now = self.now
        invalidated = preset.last_invalidated_at
        if invalidated is not None and invalidated - now > INVALIDATION_CLOCK_SKEW:
            return None  # the general path reports it (preset.invalidation_ignored)
        if not (preset.is_active_version and not preset.template_deleted and not preset.template_deprecated):
            if running:
                return None
            return PresetPlan(
                preset=preset,
                state=self.INACTIVE_STATE,
                actions=(),
                hard_limited=preset.prebuild_status is PrebuildStatus.HARD_LIMITED,
                target_source=TargetSource.INACTIVE,
                failures=failures,
                target=self.INACTIVE,
                skipped=True,
            )
        if validation_failed or preset.prebuild_status is not PrebuildStatus.NORMAL:
            return None  # a status change, or creates withheld
        desired = preset.desired_instances
        if not 0 <= desired <= self.cap:
            return None  # capped, with its problem
        cutoff = invalidated
        ttl = preset.invalidate_after_secs
        if ttl is not None and ttl > 0:
            if self.jitter:
                return None
            by_ttl = now - timedelta(seconds=ttl)
            if cutoff is None or by_ttl > cutoff:
                cutoff = by_ttl
        ready = 0
        for prebuild in running:
            if cutoff is not None and prebuild.created_at < cutoff:
                return None  # expired: deletes by reason, the surge
            ready += prebuild.ready
        count = len(running)
        target = self.targets.get(desired)
        if target is None:
            target = self.targets[desired] = Target(TargetSource.STATIC, desired, desired, desired, problems=())
        extraneous = max(count - desired, 0)
        key = (desired, count, ready)
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = PresetState(desired=desired, actual=count, eligible=ready, extraneous=extraneous)
        actions: tuple[Action, ...] = ()
        if extraneous:
            ids = tuple(prebuild.workspace_id for prebuild in _oldest_first(running)[:extraneous])
            actions = (DeleteAction(workspace_ids=ids, reason=DeleteReason.EXTRANEOUS),)
        elif desired > count:
            actions = (CreateAction(count=desired - count),)
        return PresetPlan(
            preset=preset,
            state=state,
            actions=actions,
            hard_limited=False,
            target_source=TargetSource.STATIC,
            failures=failures,
            target=target,
        )


def preset_expression(preset: Preset, expressions: Expressions) -> CompiledExpression | InvalidExpression | None:
    """The preset's compiled expression; None when it has none or a blank one (the expression does not apply)."""
    text = preset.desired_instances_expression
    if text is None or not text.strip():
        return None
    return expressions[text]


def plan(
    snapshot: Snapshot,
    config: PlannerConfig,
    now: datetime,
    *,
    expressions: Expressions | None = None,
    holds: Mapping[UUID, TargetHold] | None = None,
    steady_fast_path: bool = True,
) -> Plan:
    """Every preset of the snapshot, in snapshot order, skipped ones included (with no actions), each with the
    status change this pass makes, if any.

    `expressions` has every non-blank expression text of the snapshot compiled; `holds` is what the last
    pass's plan remembered of each preset's stabilization (`Plan.holds`; none: every pool held at its size).
    `steady_fast_path=False` plans every preset by the general path (the tests compare both).
    """
    expressions = expressions or {}
    holds = holds or {}
    grouped = _group(snapshot)
    presets: list[PresetPlan] = []
    problems: list[PlanProblem] = []
    status_changes: list[StatusChange] = []
    steady = _SteadyPath(config, now) if steady_fast_path else None
    hard_limited_ids = snapshot.hard_limited_preset_ids
    validation_failed_ids = snapshot.validation_failed_preset_ids
    for preset in snapshot.presets:
        preset_id = preset.id
        if (
            steady is not None
            and preset.desired_instances_expression is None
            and not preset.schedules
            and preset_id not in grouped.in_progress
            and preset_id not in grouped.backoffs
            and preset_id not in grouped.failed
            and preset_id not in grouped.pending
            and preset_id not in hard_limited_ids
        ):
            # The overwhelmingly common preset of a steady fleet: `_SteadyPath` gives exactly what the
            # general path below gives, or None when the preset is not one it handles.
            try:
                preset_plan = steady.plan(
                    preset,
                    grouped.running.get(preset_id, ()),
                    grouped.failures.get(preset_id),
                    preset_id in validation_failed_ids,
                )
            except Exception:
                # Whatever it is, the general path meets it too, and reports it as it always has.
                preset_plan = None
            if preset_plan is not None:
                presets.append(preset_plan)
                continue
        inputs = PresetInputs(
            running=grouped.running.get(preset.id, ()),
            in_progress=grouped.in_progress.get(preset.id, ()),
            pending_non_active=grouped.pending.get(preset.id, 0),
            backoff=grouped.backoffs.get(preset.id),
            at_hard_limit=preset.id in snapshot.hard_limited_preset_ids,
            validation_failed=preset.id in snapshot.validation_failed_preset_ids,
            failures=grouped.failures.get(preset.id),
            demand=grouped.demand.get(preset.id, NO_DEMAND),
            hold=holds.get(preset.id),
            failed=grouped.failed.get(preset.id, ()),
        )
        try:
            if preset.desired_instances_expression is not None:
                # Inside the try: a text missing from `expressions` is a bug that fails this preset only.
                inputs = replace(inputs, expression=preset_expression(preset, expressions))
            change = status_change(preset, inputs)
            if change is not None:
                # Kept when planning the actions fails below: the status follows from the failures alone.
                status_changes.append(StatusChange(change, preset, inputs.failures))
            preset_plan, preset_problems = plan_preset(preset, inputs, config, now)
        except Exception as error:
            # Rows come from other components: whatever one preset holds that this code did not foresee
            # (a bug, by definition), only that preset is left out of the plan, and the pass goes on.
            problems.append(_plan_failed(preset, error))
            continue
        presets.append(preset_plan)
        problems.extend(preset_problems)
    breaker = None
    if config.breaker.enabled or snapshot.breaker.state is not BreakerState.CLOSED:
        creates_wanted = any(
            isinstance(action, CreateAction) for preset_plan in presets for action in preset_plan.actions
        )
        breaker = decide(
            config.breaker, snapshot.breaker, snapshot.breaker_observation, now, creates_wanted=creates_wanted
        )
        if breaker.record.state is not BreakerState.CLOSED:
            presets, status_changes = _without_outage_hard_limits(presets, status_changes)
    budget = None
    creates_allowed = breaker.creates_allowed if breaker is not None else None
    slow_start = slow_start_holds(config.slow_start, snapshot)
    if not config.budget.unlimited or creates_allowed is not None or slow_start:
        presets, use = apply_admission(
            presets,
            snapshot,
            config.budget,
            creates_allowed=creates_allowed,
            probing=breaker is not None and breaker.probing,
            slow_start=config.slow_start if slow_start else 0,
        )
        budget = None if config.budget.unlimited and not slow_start else use
    return Plan(
        generated_at=now,
        presets=tuple(presets),
        problems=tuple(problems),
        status_changes=tuple(status_changes),
        snapshot=snapshot,
        budget=budget,
        breaker=breaker,
    )


def slow_start_holds(limit: int, snapshot: Snapshot) -> bool:
    """Whether the slow start limits this pass's creates: it is set, and no prebuild create has completed
    successfully within the breaker's window (a cold start, or an outage nobody has seen succeed since).
    The first success lifts it, so on healthy provisioners it costs one build time."""
    return limit > 0 and not snapshot.create_succeeded_recently


def _without_outage_hard_limits(
    presets: Sequence[PresetPlan], status_changes: Sequence[StatusChange]
) -> tuple[list[PresetPlan], list[StatusChange]]:
    """While the breaker is open or half-open, no preset becomes hard limited (issue 15.2): a shared
    outage is nobody's template's fault, and one breaker notification replaces N preset ones. The
    episode's failures stop counting in the snapshot once its row exists; this covers the pass that
    opens it, whose snapshot was read before."""
    kept = [change for change in status_changes if change.kind is not StatusChangeKind.HARD_LIMITED]
    adjusted = [
        replace(preset_plan, status_change=None, hard_limited=False, create_blocked=None, creates_withheld=0)
        if preset_plan.status_change is StatusChangeKind.HARD_LIMITED
        else preset_plan
        for preset_plan in presets
    ]
    return adjusted, kept


def _delete_class(reason: DeleteReason) -> str:
    """The admission's class of a delete (reconciler.admission.DELETE_CLASSES): an invalidated prebuild is
    replaced as an expired one is."""
    return "expired" if reason is DeleteReason.INVALIDATED else reason.value


def wants_of(preset_plan: PresetPlan) -> Wants:
    """What one preset's actions would start: its deletes by reason (the admission's classes), its creates."""
    deletes: Counter[str] = Counter()
    creates = 0
    for action in preset_plan.actions:
        if isinstance(action, DeleteAction):
            deletes[_delete_class(action.reason)] += len(action.workspace_ids)
        elif isinstance(action, CreateAction):
            creates += action.count
    preset = preset_plan.preset
    return Wants(preset.id, preset.template_id, preset_plan.state.desired, creates, dict(deletes))


def apply_admission(
    presets: Sequence[PresetPlan],
    snapshot: Snapshot,
    budget: Budget,
    *,
    creates_allowed: int | None = None,
    probing: bool = False,
    slow_start: int = 0,
) -> tuple[list[PresetPlan], BudgetUse]:
    """The presets' actions cut to what the in-flight budget admits (reconciler.admission), with what was
    held back and why on each preset; deletes keep their oldest-first order, so the oldest go first.
    `slow_start`: the slow start's limit when it holds this pass (0: it does not)."""
    in_flight_by_template = {row.template_id: row.jobs for row in snapshot.in_flight}
    wants = [wants_of(preset_plan) for preset_plan in presets]
    admission: Admission = admit(
        wants,
        budget,
        snapshot.in_flight_total,
        in_flight_by_template,
        creates_allowed=creates_allowed,
        probing=probing,
        slow_start=slow_start - snapshot.creates_in_flight if slow_start else None,
    )
    admitted_presets: list[PresetPlan] = []
    for preset_plan in presets:
        admitted = admission.presets.get(preset_plan.preset.id)
        if admitted is None or not (admitted.creates_held or admitted.deletes_held):
            admitted_presets.append(preset_plan)
            continue
        actions: list[Action] = []
        # Admitted deletes by class, spent by the preset's delete actions in order (expired before
        # invalidated, both of the class `expired`).
        left = dict(admitted.deletes)
        for action in preset_plan.actions:
            if isinstance(action, DeleteAction):
                delete_class = _delete_class(action.reason)
                count = min(left.get(delete_class, 0), len(action.workspace_ids))
                left[delete_class] = left.get(delete_class, 0) - count
                if count:
                    actions.append(replace(action, workspace_ids=action.workspace_ids[:count]))
            elif isinstance(action, CreateAction):
                if admitted.creates:
                    actions.append(replace(action, count=admitted.creates))
            else:
                actions.append(action)
        admitted_presets.append(
            replace(
                preset_plan,
                actions=tuple(actions),
                creates_held=admitted.creates_held,
                creates_held_by=admitted.creates_held_by,
                deletes_held=admitted.deletes_held,
                deletes_held_by=admitted.deletes_held_by,
            )
        )
    use = BudgetUse(
        max_in_flight=budget.max_in_flight,
        max_in_flight_per_template=budget.max_in_flight_per_template,
        in_flight=snapshot.in_flight_total,
        admitted=admission.admitted,
        creates_held=admission.creates_held,
        deletes_held=admission.deletes_held,
        slow_start=slow_start,
        creates_in_flight=snapshot.creates_in_flight if slow_start else 0,
    )
    return admitted_presets, use


PLAN_FAILED = "preset.plan_failed"


def _plan_failed(preset: Preset, error: Exception) -> PlanProblem:
    # The message may quote a hostile value at any length: cut short. The stack is kept as "file:line in
    # function" lines: not the exception, whose frames would keep this pass's snapshot alive, and not the
    # source lines, which would be read from files (the planner does no I/O).
    message = str(error)
    if len(message) > 200:
        message = f"{message[:200]}... ({len(message)} characters)"
    frames = traceback.walk_tb(error.__traceback__)
    return PlanProblem(
        preset.id,
        PLAN_FAILED,
        f"{type(error).__name__}: {message}; preset left out of this plan",
        traceback="\n".join(f"{frame.f_code.co_filename}:{line} in {frame.f_code.co_name}" for frame, line in frames),
    )
