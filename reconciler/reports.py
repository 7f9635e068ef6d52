"""What `plan` and `status` print: the contract's JSON shape, and tables for people."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from reconciler.plan import (
    Action,
    BackoffAction,
    BudgetUse,
    CancelPendingAction,
    CreateAction,
    DeleteAction,
    Plan,
    PresetPlan,
)

STATE_FIELDS = ("desired", "actual", "eligible", "extraneous", "expired", "starting", "stopping", "deleting")


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def action_json(action: Action) -> dict[str, Any]:
    if isinstance(action, BackoffAction):
        return {"type": "backoff", "until": _iso(action.until), "num_failed": action.num_failed}
    if isinstance(action, CancelPendingAction):
        return {"type": "cancel_pending", "count": action.count}
    if isinstance(action, DeleteAction):
        return {
            "type": "delete",
            "workspace_ids": [str(workspace_id) for workspace_id in action.workspace_ids],
            "reason": action.reason.value,
        }
    assert isinstance(action, CreateAction)
    return {"type": "create", "count": action.count}


def preset_json(preset_plan: PresetPlan) -> dict[str, Any]:
    preset = preset_plan.preset
    return {
        "preset_id": str(preset.id),
        "preset_name": preset.name,
        "template_id": str(preset.template_id),
        "template_name": preset.template_name,
        "template_version_id": str(preset.template_version_id),
        "template_version_name": preset.template_version_name,
        "organization_name": preset.organization_name,
        "active": preset.active,
        "prebuild_status": preset.prebuild_status.value,
        "hard_limited": preset_plan.hard_limited,
        "state": {name: getattr(preset_plan.state, name) for name in STATE_FIELDS},
        "actions": [action_json(action) for action in preset_plan.actions],
        # Extensions beyond the contract (allowed: extend, never rename).
        "backoff_until": _iso(preset_plan.backoff_until) if preset_plan.backoff_until else None,
        "create_blocked": preset_plan.create_blocked.value if preset_plan.create_blocked else None,
        "creates_withheld": preset_plan.creates_withheld,
        "skipped": preset_plan.skipped,
        # The status change this pass would write (`prebuild_status` is the status as stored now).
        "status_change": preset_plan.status_change.value if preset_plan.status_change else None,
        **held_json(preset_plan),
    }


def held_json(preset_plan: PresetPlan) -> dict[str, Any]:
    """What the in-flight budget (or the breaker) held back from the preset's actions, and why."""
    return {
        "creates_held": preset_plan.creates_held,
        "creates_held_by": preset_plan.creates_held_by.value if preset_plan.creates_held_by else None,
        "deletes_held": preset_plan.deletes_held,
        "deletes_held_by": preset_plan.deletes_held_by.value if preset_plan.deletes_held_by else None,
    }


def budget_json(budget: BudgetUse | None) -> dict[str, Any] | None:
    """The in-flight budget and its use; None when no budget is set (unlimited)."""
    if budget is None:
        return None
    return {
        "max_in_flight": budget.max_in_flight,
        "max_in_flight_per_template": budget.max_in_flight_per_template,
        "in_flight": budget.in_flight,
        "admitted": budget.admitted,
        "creates_held": budget.creates_held,
        "deletes_held": budget.deletes_held,
    }


def budget_line(budget: BudgetUse | None) -> str:
    """One line for people: the budget, its use, and what it held back ('' when unlimited)."""
    if budget is None:
        return ""
    limits = []
    if budget.max_in_flight:
        limits.append(f"{budget.max_in_flight} in all")
    if budget.max_in_flight_per_template:
        limits.append(f"{budget.max_in_flight_per_template} per template")
    return (
        f"in-flight budget {', '.join(limits)}: {budget.in_flight} in flight, {budget.admitted} admitted, "
        f"held back {budget.creates_held} creates and {budget.deletes_held} deletes\n"
    )


def plan_json(plan: Plan, *, paused: bool) -> dict[str, Any]:
    return {
        "generated_at": _iso(plan.generated_at),
        "paused": paused,
        "presets": [preset_json(preset_plan) for preset_plan in plan.presets],
        "in_flight_budget": budget_json(plan.budget),
        "problems": [
            {"preset_id": str(problem.preset_id), "event": problem.event, "detail": problem.detail}
            for problem in plan.problems
        ],
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table (no dependency, copy-paste friendly)."""
    cells = [[str(header) for header in headers], *[[str(value) for value in row] for row in rows]]
    widths = [max(len(row[index]) for row in cells) for index in range(len(headers))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _describe_action(action: Action) -> str:
    if isinstance(action, BackoffAction):
        return f"backoff until {action.until:%H:%M:%S} ({action.num_failed} failed)"
    if isinstance(action, CancelPendingAction):
        return f"cancel {action.count} pending"
    if isinstance(action, DeleteAction):
        return f"delete {len(action.workspace_ids)} {action.reason.value}"
    assert isinstance(action, CreateAction)
    return f"create {action.count}"


def _describe_held(preset_plan: PresetPlan) -> list[str]:
    held = []
    if preset_plan.deletes_held and preset_plan.deletes_held_by:
        held.append(f"{preset_plan.deletes_held} deletes held ({preset_plan.deletes_held_by.value})")
    if preset_plan.creates_held and preset_plan.creates_held_by:
        held.append(f"{preset_plan.creates_held} creates held ({preset_plan.creates_held_by.value})")
    return held


def plan_table(plan: Plan, *, paused: bool) -> str:
    rows = [
        (
            preset_plan.preset.template_name,
            preset_plan.preset.template_version_name,
            preset_plan.preset.name,
            "yes" if preset_plan.preset.active else "no",
            preset_plan.state.desired,
            preset_plan.state.actual,
            preset_plan.state.starting,
            preset_plan.preset.prebuild_status.value,
            "; ".join([*(_describe_action(action) for action in preset_plan.actions), *_describe_held(preset_plan)])
            or "-",
        )
        for preset_plan in plan.presets
    ]
    header = f"plan at {_iso(plan.generated_at)}" + (
        "  (reconciliation is PAUSED: nothing would run)" if paused else ""
    )
    header = budget_line(plan.budget) + header
    body = table(
        ("TEMPLATE", "VERSION", "PRESET", "ACTIVE", "DESIRED", "RUNNING", "STARTING", "STATUS", "ACTIONS"), rows
    )
    return f"{header}\n{body}" if rows else f"{header}\nno presets with prebuilds"


def status_json(plan: Plan, *, paused: bool) -> dict[str, Any]:
    return {
        "generated_at": _iso(plan.generated_at),
        "paused": paused,
        "presets": [
            {
                "preset_id": str(preset_plan.preset.id),
                "organization_name": preset_plan.preset.organization_name,
                "template_name": preset_plan.preset.template_name,
                "template_version_name": preset_plan.preset.template_version_name,
                "preset_name": preset_plan.preset.name,
                "active": preset_plan.preset.active,
                "prebuild_status": preset_plan.preset.prebuild_status.value,
                "hard_limited": preset_plan.hard_limited,
                "backoff_until": _iso(preset_plan.backoff_until) if preset_plan.backoff_until else None,
                **{name: getattr(preset_plan.state, name) for name in STATE_FIELDS},
                **held_json(preset_plan),
            }
            for preset_plan in plan.presets
        ],
        "in_flight_budget": budget_json(plan.budget),
    }


def status_table(plan: Plan, *, paused: bool) -> str:
    rows = [
        (
            preset_plan.preset.template_name,
            preset_plan.preset.template_version_name,
            preset_plan.preset.name,
            "yes" if preset_plan.preset.active else "no",
            *(getattr(preset_plan.state, name) for name in STATE_FIELDS),
            preset_plan.preset.prebuild_status.value,
            f"{preset_plan.backoff_until:%Y-%m-%d %H:%M:%S}" if preset_plan.backoff_until else "-",
        )
        for preset_plan in plan.presets
    ]
    headers = (
        "TEMPLATE",
        "VERSION",
        "PRESET",
        "ACTIVE",
        *(name.upper() for name in STATE_FIELDS),
        "STATUS",
        "BACKOFF UNTIL",
    )
    paused_line = "reconciliation is PAUSED (reconciler resume)\n" if paused else ""
    return paused_line + budget_line(plan.budget) + (table(headers, rows) if rows else "no presets with prebuilds")
