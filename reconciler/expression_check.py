"""`reconciler presets check-expression`: what an operator needs to know about an expression before
publishing it (valid or not and why, the variables it reads, what is ours rather than Coder's)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from reconciler.demand import COLD_START, LAST_WEEK_VARIABLES, DemandCounts, PoolCounts
from reconciler.expression import ExpressionError, InvalidExpression
from reconciler.expression_compiler import compile_target_expression
from reconciler.plan import PresetPlan
from reconciler.target import Target, TargetSettings, resolve_target

# Names Coder's language does not have: an expression using them works here only.
OUR_VARIABLES = frozenset({COLD_START, *LAST_WEEK_VARIABLES})


@dataclass(frozen=True, slots=True)
class CheckReport:
    expression: str
    error: ExpressionError | None
    reads: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        return self.error is None

    @property
    def ours_only(self) -> tuple[str, ...]:
        return tuple(name for name in self.reads if name in OUR_VARIABLES)

    def as_json(self) -> dict[str, Any]:
        return {
            "expression": self.expression,
            "valid": self.valid,
            "error": None if self.error is None else {"kind": str(self.error.kind), "message": self.error.message},
            "reads": list(self.reads),
            "not_in_coder": list(self.ours_only),
        }

    def as_text(self) -> str:
        if self.error is not None:
            return f"invalid: {self.error.message}\n  expression: {self.expression}"
        lines = [f"valid: {self.expression}", f"  reads: {', '.join(self.reads) or 'no variable'}"]
        if self.ours_only:
            lines.append(
                f"  note: {', '.join(self.ours_only)} {'is' if len(self.ours_only) == 1 else 'are'} ours: "
                "Coder's reconciler would reject this expression"
            )
        return "\n".join(lines)


def check(text: str) -> CheckReport:
    compiled = compile_target_expression(text)
    if isinstance(compiled, InvalidExpression):
        return CheckReport(compiled.text, compiled.error)
    return CheckReport(compiled.text, None, tuple(sorted(compiled.names)))


def evaluate_on(preset_plan: PresetPlan, text: str, demand: DemandCounts, cap: int, now: datetime) -> Target:
    """What `text` would make of the preset's target now: its pool and schedule as the plan found them, its
    demand, the cap. Without stabilization (a hold is the daemon's memory, not the expression's value)."""
    preset, state = preset_plan.preset, preset_plan.state
    return resolve_target(
        active=preset.active,
        desired_instances=preset.desired_instances,
        schedules=preset.schedules,
        timezone=preset.scheduling_timezone,
        expression=compile_target_expression(text),
        pool=PoolCounts(
            running=state.actual - state.expired,
            eligible=state.eligible,
            starting=state.starting,
            stopping=state.stopping,
            deleting=state.deleting,
            expired=state.expired,
        ),
        demand=demand,
        previous_hold=None,
        settings=TargetSettings(max_desired_instances=cap, stabilization_window=timedelta(0)),
        now=now,
    )


def evaluation_text(preset_plan: PresetPlan, target: Target) -> str:
    preset = preset_plan.preset
    lines = [f"on {preset.template_name}/{preset.name} now ({preset.id}):"]
    inputs = ", ".join(f"{name}={value}" for name, value in target.inputs)
    lines.append(f"  inputs: {inputs or '-'}")
    if target.error is not None:
        lines.append(
            f"  fails: {target.error.kind.value}: {target.error.message}; the target would be scheduled_target "
            f"({target.scheduled_target})"
        )
    else:
        lines.append(f"  target: {target.desired} ({target.source.value})")
        if target.cold_start:
            lines.append("  (the expression gives 0 before any claim event: the cold start keeps scheduled_target)")
    if preset.desired_instances_expression and preset.desired_instances_expression.strip():
        lines.append(
            f"  its expression now: {preset.desired_instances_expression.strip()} -> {preset_plan.state.desired}"
        )
    return "\n".join(lines)
