"""A preset's target: static, scheduled, or computed from demand by its expression (BEHAVIOR.md 2.1).

Pure: (the preset's settings, its compiled expression, its pool, its demand, what the last pass
remembered, now) -> `Target`. A blank expression is no expression: the caller passes None for it
(`reconciler.expression_compiler.compile_target_expression` compiles the others, once per text).
The planner plans creates up to `Target.desired` and deletes extraneous prebuilds above
`Target.retained`, which the stabilization window keeps above `desired` for a while after a drop.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from reconciler import schedule
from reconciler.demand import COLD_START, DemandCounts, PoolCounts, clamp_target, evaluate_target, target_variables
from reconciler.expression import CompiledExpression, ErrorKind, ExpressionError, InvalidExpression, Value
from reconciler.snapshot import Schedule


class TargetSource(enum.StrEnum):
    """Where a preset's target came from in this pass."""

    STATIC = "static"  # desired_instances
    SCHEDULE = "schedule"  # a schedule whose time range contains now
    EXPRESSION = "expression"  # desired_instances_expression
    EXPRESSION_FALLBACK = "expression_fallback"  # the expression failed: the static or scheduled target
    INACTIVE = "inactive"  # not on its template's active version: 0, whatever the settings say


@dataclass(frozen=True, slots=True)
class TargetSettings:
    # Safety cap on any preset's target: a typo of 1000 instead of 10 must not start a thousand builds.
    max_desired_instances: int = 100
    # How long a lower computed target must hold before extraneous prebuilds are deleted; 0 = at once.
    stabilization_window: timedelta = timedelta(minutes=5)


@dataclass(frozen=True, slots=True)
class TargetHold:
    """What the stabilization window remembers of an expression preset from one pass to the next.

    `retained` is the pool size deletions keep. While the computed target stays below it, `lowered_since`
    says since when and `peak` is the highest target computed since then: once the window has passed,
    every target of the window was at most `peak`, so the pool may shrink to `peak`.
    """

    retained: int
    lowered_since: datetime | None = None
    peak: int = 0


def stabilize(previous: TargetHold | None, target: int, window: timedelta, now: datetime) -> TargetHold:
    """Increases act at once; a drop is accepted once the lower target has held for `window`."""
    if window <= timedelta(0) or previous is None or target >= previous.retained:
        return TargetHold(retained=target, peak=target)
    if previous.lowered_since is None:
        return TargetHold(retained=previous.retained, lowered_since=now, peak=target)
    peak = max(previous.peak, target)
    if now - previous.lowered_since < window:
        return TargetHold(retained=previous.retained, lowered_since=previous.lowered_since, peak=peak)
    if target < peak:
        # Down to the highest target of the window; a new window starts for the rest of the drop.
        return TargetHold(retained=peak, lowered_since=now, peak=target)
    return TargetHold(retained=target, peak=target)


@dataclass(frozen=True, slots=True)
class Target:
    source: TargetSource
    # The target the pool is filled to.
    desired: int
    # Extraneous prebuilds are those above this many (at least `desired`; more while a drop stabilizes).
    retained: int
    # The static or scheduled target (capped): the expression's `scheduled_target`, and its fallback.
    scheduled_target: int
    expression: str | None = None
    # The variables the expression read, by name, with the values it saw.
    inputs: tuple[tuple[str, Value], ...] = ()
    # The expression's value as a target (whole, clamped to [0, cap]); None when it failed or did not run.
    result: int | None = None
    error: ExpressionError | None = None
    # The expression gave 0 before any demand was ever seen: the pool keeps `scheduled_target`.
    cold_start: bool = False
    # What the next pass must remember (expression presets only).
    hold: TargetHold | None = None
    # (log event, message) for what the pass should report: a schedule ignored, a target capped.
    problems: tuple[tuple[str, str], ...] = field(default=())


def _a_schedule_applies(schedules: Sequence[Schedule], timezone: str, now: datetime) -> bool:
    """Whether a schedule's range contains now (only asked once `schedule.target` found them usable)."""
    local = now.astimezone(schedule.zone(timezone))
    return any(schedule.parse_time_range(row.cron_expression).contains(local) for row in schedules)


def scheduled_target(
    desired_instances: int,
    schedules: Sequence[Schedule],
    timezone: str,
    cap: int,
    now: datetime,
) -> tuple[TargetSource, int, list[tuple[str, str]]]:
    problems: list[tuple[str, str]] = []
    source = TargetSource.STATIC
    desired = desired_instances
    if schedules:
        scheduled = schedule.target(desired_instances, schedules, timezone, now)
        if scheduled.problem is not None:
            problems.append(("preset.schedule_ignored", scheduled.problem))
        elif _a_schedule_applies(schedules, timezone, now):
            source = TargetSource.SCHEDULE
        desired = scheduled.instances
    if desired > cap:
        problems.append(
            ("preset.desired_capped", f"target {desired} is above RECONCILER_MAX_DESIRED_INSTANCES; using {cap}")
        )
        desired = cap
    elif desired < 0:
        # The schema refuses it, but a component that relaxed the constraint may write it: no pool.
        problems.append(("preset.desired_capped", f"target {desired} is below 0; using 0"))
        desired = 0
    return source, desired, problems


def resolve_target(
    *,
    active: bool,
    desired_instances: int,
    schedules: Sequence[Schedule],
    timezone: str,
    expression: CompiledExpression | InvalidExpression | None,
    pool: PoolCounts,
    demand: DemandCounts,
    previous_hold: TargetHold | None,
    settings: TargetSettings,
    now: datetime,
) -> Target:
    """The rules of BEHAVIOR.md 2.1, in order: inactive, static or scheduled, expression, cold start, hold."""
    if not active:
        return Target(TargetSource.INACTIVE, desired=0, retained=0, scheduled_target=0)
    cap = settings.max_desired_instances
    source, baseline, problems = scheduled_target(desired_instances, schedules, timezone, cap, now)
    if expression is None:
        return Target(source, baseline, baseline, baseline, problems=tuple(problems))
    text = expression.text

    def fallback(error: ExpressionError, inputs: tuple[tuple[str, Value], ...] = ()) -> Target:
        hold = stabilize(previous_hold, baseline, settings.stabilization_window, now)
        return Target(
            TargetSource.EXPRESSION_FALLBACK,
            desired=baseline,
            retained=max(baseline, hold.retained),
            scheduled_target=baseline,
            expression=text,
            inputs=inputs,
            error=error,
            hold=hold,
            problems=tuple(problems),
        )

    if isinstance(expression, InvalidExpression):
        return fallback(expression.error)
    compiled = expression
    try:
        local_time = now.astimezone(schedule.zone(timezone.strip()))
    except schedule.ScheduleError as error:
        return fallback(ExpressionError(ErrorKind.TIME_ZONE, f"{error}: hour and weekday need a valid time zone"))
    variables = target_variables(baseline, pool, demand, local_time, compiled.names)
    inputs = tuple(sorted(variables.items()))
    result = evaluate_target(compiled, variables, cap)
    if isinstance(result, ExpressionError):
        return fallback(result, inputs)
    desired = result
    cold_start = desired == 0 and not demand.has_history and COLD_START not in compiled.names and baseline > 0
    if cold_start:
        desired = baseline
    hold = stabilize(previous_hold, desired, settings.stabilization_window, now)
    return Target(
        TargetSource.EXPRESSION,
        desired=desired,
        retained=max(desired, clamp_target(hold.retained, cap)),
        scheduled_target=baseline,
        expression=text,
        inputs=inputs,
        result=result,
        cold_start=cold_start,
        hold=hold,
        problems=tuple(problems),
    )
