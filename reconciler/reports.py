"""What `plan` and `status` print: the contract's JSON shape, and tables for people.

Every table goes through `table`, which shows control and bidirectional characters of the data as
visible escapes (`reconciler.terminal`); JSON documents carry the raw text (JSON escapes it itself).
Times in tables are UTC and say so; JSON times are ISO 8601 with `Z`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from reconciler.admission import HoldReason
from reconciler.breaker import BreakerDecision, BreakerState
from reconciler.durations import format_duration
from reconciler.plan import (
    Action,
    BackoffAction,
    BudgetUse,
    CancelPendingAction,
    CreateAction,
    CreateBlock,
    DeleteAction,
    Plan,
    PresetPlan,
)
from reconciler.planner import PLAN_FAILED
from reconciler.snapshot import PrebuildStatus, PresetNames, preset_log_fields
from reconciler.target import Target
from reconciler.terminal import printable

# The default `status` table fits a terminal this wide (names and the reason are shortened, with "…");
# `status --wide` shows everything, whatever its width.
STATUS_WIDTH = 120
# A short preset id: enough of the uuid to tell presets apart in practice, and accepted wherever a
# command takes a preset (as a unique prefix).
SHORT_ID_LENGTH = 8

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
        "target": target_json(preset_plan.target),
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
        # RECONCILER_SLOW_START when it holds this pass (else 0), and the prebuild creates in flight.
        "slow_start": budget.slow_start,
        "creates_in_flight": budget.creates_in_flight,
    }


def breaker_json(breaker: BreakerDecision | None) -> dict[str, Any] | None:
    """The global breaker after this plan (issue 15.2); None when it is disabled and closed."""
    if breaker is None:
        return None
    record = breaker.record
    return {
        "state": record.state.value,
        "episode": record.episode,
        "changed_at": _iso(record.changed_at) if record.changed_at else None,
        "open_until": _iso(record.open_until) if record.open_until else None,
        "event": breaker.event.value if breaker.event else None,
        # Creates allowed this pass across the deployment: null = no limit from the breaker.
        "creates_allowed": breaker.creates_allowed,
        "reason": breaker.reason,
    }


def breaker_line(breaker: BreakerDecision | None) -> str:
    """One line for people while the breaker is open or half-open ('' otherwise)."""
    if breaker is None or breaker.record.state is BreakerState.CLOSED:
        return ""
    record = breaker.record
    until = f" until {_iso(record.open_until)}" if record.open_until else ""
    return f"breaker {record.state.value}{until} (episode {record.episode}): {breaker.reason}\n"


def budget_line(budget: BudgetUse | None) -> str:
    """One line for people: the budget, its use, and what it held back ('' when unlimited)."""
    if budget is None:
        return ""
    limits = []
    if budget.max_in_flight:
        limits.append(f"{budget.max_in_flight} in all")
    if budget.max_in_flight_per_template:
        limits.append(f"{budget.max_in_flight_per_template} per template")
    slow_start = (
        f"slow start (no prebuild create succeeded lately): at most {budget.slow_start} creates in flight, "
        f"{budget.creates_in_flight} now"
        if budget.slow_start
        else ""
    )
    if not limits:
        return f"{slow_start}; {budget.admitted} admitted, held back {budget.creates_held} creates\n"
    return (
        f"in-flight budget {', '.join(limits)}: {budget.in_flight} in flight, {budget.admitted} admitted, "
        f"held back {budget.creates_held} creates and {budget.deletes_held} deletes\n"
        + (f"{slow_start}\n" if slow_start else "")
    )


def target_json(target: Target | None) -> dict[str, Any] | None:
    """Where the target came from, and for an expression what it read and gave (docs/DEMAND.md)."""
    if target is None:
        return None
    return {
        "source": target.source.value,
        "desired": target.desired,
        # Extraneous prebuilds are those above this (more than `desired` while a drop stabilizes).
        "retained": target.retained,
        "scheduled_target": target.scheduled_target,
        "expression": target.expression,
        "inputs": dict(target.inputs),
        "result": target.result,
        "error": {"kind": target.error.kind.value, "message": target.error.message} if target.error else None,
        "cold_start": target.cold_start,
    }


def target_label(target: Target | None) -> str:
    """The source for a table: `expression`, `expression_fallback (division_by_zero)`, `static`..."""
    if target is None:
        return "-"
    label = target.source.value
    if target.error is not None:
        label += f" ({target.error.kind.value})"
    elif target.cold_start:
        label += " (cold start)"
    if target.retained > target.desired:
        label += f", holding {target.retained}"
    return label


def plan_json(plan: Plan, *, paused: bool) -> dict[str, Any]:
    return {
        "generated_at": _iso(plan.generated_at),
        "paused": paused,
        "presets": [preset_json(preset_plan) for preset_plan in plan.presets],
        "in_flight_budget": budget_json(plan.budget),
        "breaker": breaker_json(plan.breaker),
        "problems": [
            {"preset_id": str(problem.preset_id), "event": problem.event, "detail": problem.detail}
            for problem in plan.problems
        ],
    }


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    width: int | None = None,
    shrink: Sequence[Mapping[int, int]] = (),
) -> str:
    """A plain aligned text table (no dependency, copy-paste friendly), its cells made safe to print.

    With `width`, columns are shortened with "…" until the table fits: `shrink` is a list of stages, each
    a mapping of column index to the narrowest that stage may make it; within a stage the widest column
    gives a character first, and a stage is used up before the next one starts.
    """
    cells = [[printable(header) for header in headers], *[[printable(value) for value in row] for row in rows]]
    widths = [max(len(row[index]) for row in cells) for index in range(len(headers))]
    if width is not None:
        total = sum(widths) + 2 * (len(widths) - 1)
        for stage in shrink:
            while total > width:
                candidates = [
                    index for index, floor in stage.items() if widths[index] > max(floor, len(cells[0][index]))
                ]
                if not candidates:
                    break
                widest = max(candidates, key=lambda index: widths[index])
                widths[widest] -= 1
                total -= 1
        cells = [[_shorten(value, size) for value, size in zip(row, widths, strict=True)] for row in cells]
    lines = ["  ".join(value.ljust(size) for value, size in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * size for size in widths))
    return "\n".join(lines)


def format_time(moment: datetime, now: datetime) -> str:
    """A time for a table, in UTC and saying so: the time of day alone when it is today's."""
    if moment.replace(tzinfo=None) >= datetime.max - timedelta(days=1):
        return "the end of time"
    utc = moment.astimezone(now.tzinfo) if now.tzinfo is not None and moment.tzinfo is not None else moment
    if utc.date() == now.date():
        return f"{utc:%H:%M:%S} UTC"
    return f"{utc:%Y-%m-%d %H:%M:%S} UTC"


def format_age(since: datetime, now: datetime) -> str:
    """How long ago, to the second (`4m12s`)."""
    try:
        seconds = max(int((now - since).total_seconds()), 0)
    except OverflowError:
        return "ever"
    return format_duration(timedelta(seconds=seconds))


def describe_action(action: Action, now: datetime) -> str:
    if isinstance(action, BackoffAction):
        return f"backoff until {format_time(action.until, now)} ({action.num_failed} failed)"
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
            "; ".join(
                [
                    *(describe_action(action, plan.generated_at) for action in preset_plan.actions),
                    *_describe_held(preset_plan),
                ]
            )
            or "-",
        )
        for preset_plan in plan.presets
    ]
    header = f"plan at {_iso(plan.generated_at)}" + (
        "  (reconciliation is PAUSED: nothing would run)" if paused else ""
    )
    header = budget_line(plan.budget) + breaker_line(plan.breaker) + header
    body = table(
        ("TEMPLATE", "VERSION", "PRESET", "ACTIVE", "DESIRED", "RUNNING", "STARTING", "STATUS", "ACTIONS"), rows
    )
    return f"{header}\n{body}" if rows else f"{header}\nno presets with prebuilds"


def _withheld_because(block: CreateBlock) -> str:
    return "the preset is hard limited" if block is CreateBlock.HARD_LIMITED else "its template failed validation"


def _count(count: int, noun: str) -> str:
    return f"1 {noun}" if count == 1 else f"{count} {noun}s"


def _failures(count: int) -> str:
    return _count(count, "failure")


_HELD_BECAUSE = {
    HoldReason.MAX_IN_FLIGHT: "the in-flight budget (RECONCILER_MAX_IN_FLIGHT)",
    HoldReason.MAX_IN_FLIGHT_PER_TEMPLATE: "the template's in-flight budget",
    HoldReason.BREAKER_OPEN: "the open circuit breaker",
    HoldReason.BREAKER_PROBING: "the circuit breaker's probe",
    HoldReason.SLOW_START: "the slow start (RECONCILER_SLOW_START: no prebuild create succeeded lately)",
}


def reasons(preset_plan: PresetPlan, now: datetime, *, paused: bool) -> list[str]:
    """Why the preset's pool is not (or may not be) at its target, most decisive first; [] when nothing
    stands in its way. Derived from the plan alone, so `status` says what the pass decides."""
    found: list[str] = []
    preset = preset_plan.preset
    failures = preset_plan.failures
    wants_work = any(
        isinstance(action, CreateAction | DeleteAction | CancelPendingAction) for action in preset_plan.actions
    )
    if paused and wants_work:
        found.append("creates withheld because reconciliation is paused")
    backoff = next((action for action in preset_plan.actions if isinstance(action, BackoffAction)), None)
    if backoff is not None:
        found.append(f"backoff until {format_time(backoff.until, now)} after {_failures(backoff.num_failed)}")
    status = preset_plan.prebuild_status
    since = preset.status_changed_at if preset_plan.status_change is None else None
    since_text = f" since {format_time(since, now)}" if since is not None else ""
    if status is PrebuildStatus.VALIDATION_FAILED:
        code = failures.last_error_code if failures is not None and failures.last_error_code else "unknown"
        # Its time is in SINCE (`--wide`): the error code is what the operator acts on, and long.
        found.append(f"validation failed with error code {code}")
    elif status is PrebuildStatus.HARD_LIMITED:
        streak = f" after {_failures(failures.failure_streak)} in a row" if failures is not None else ""
        if preset_plan.status_change is not None:
            found.append(f"hard limit reached now{streak}")
        else:
            found.append(f"hard limited{since_text or ' (since unknown)'}{streak}")
    if preset_plan.create_blocked is not None and preset_plan.creates_withheld:
        creates = _count(preset_plan.creates_withheld, "create")
        found.append(f"{creates} withheld because {_withheld_because(preset_plan.create_blocked)}")
    for count, held_by, kind in (
        (preset_plan.creates_held, preset_plan.creates_held_by, "create"),
        (preset_plan.deletes_held, preset_plan.deletes_held_by, "delete"),
    ):
        if count and held_by is not None:
            found.append(f"{_count(count, kind)} withheld because of {_HELD_BECAUSE[held_by]}")
    if preset_plan.schedule_problem is not None:
        found.append(f"schedule ignored because {preset_plan.schedule_problem}")
    if preset_plan.uncapped_target is not None:
        found.append(f"target capped at {preset_plan.state.desired} (asked {preset_plan.uncapped_target})")
    if preset_plan.oldest_pending_at is not None:
        found.append(f"oldest pending job waiting for {format_age(preset_plan.oldest_pending_at, now)}")
    if not preset.active and not found and (preset_plan.state.actual or preset_plan.actions):
        found.append("not the active version: its prebuilds are being removed")
    return found


def _target_source(preset_plan: PresetPlan) -> str:
    # With the expression's outcome when there is one: `expression_fallback (division_by_zero)`.
    label = target_label(preset_plan.target) if preset_plan.target is not None else preset_plan.target_source.value
    if preset_plan.uncapped_target is not None:
        return f"{label}, capped"
    return label


def status_json(plan: Plan, *, paused: bool) -> dict[str, Any]:
    now = plan.generated_at

    def entry(preset_plan: PresetPlan) -> dict[str, Any]:
        preset = preset_plan.preset
        failures = preset_plan.failures
        found = reasons(preset_plan, now, paused=paused)
        pending_at = preset_plan.oldest_pending_at
        return {
            "preset_id": str(preset.id),
            "organization_name": preset.organization_name,
            "template_name": preset.template_name,
            "template_version_name": preset.template_version_name,
            "preset_name": preset.name,
            "active": preset.active,
            "prebuild_status": preset.prebuild_status.value,
            "hard_limited": preset_plan.hard_limited,
            "backoff_until": _iso(preset_plan.backoff_until) if preset_plan.backoff_until else None,
            **{name: getattr(preset_plan.state, name) for name in STATE_FIELDS},
            # Extensions (issue 11.6): why the pool is not filling, and the facts behind it.
            "short_id": str(preset.id)[:SHORT_ID_LENGTH],
            "reason": found[0] if found else None,
            "reasons": found,
            "status_changed_at": _iso(preset.status_changed_at) if preset.status_changed_at else None,
            "status_change": preset_plan.status_change.value if preset_plan.status_change else None,
            "failure_streak": failures.failure_streak if failures else 0,
            "last_error": failures.last_error if failures else None,
            "last_error_code": failures.last_error_code if failures else None,
            "last_failed_at": _iso(failures.last_failed_at) if failures and failures.last_failed_at else None,
            "create_blocked": preset_plan.create_blocked.value if preset_plan.create_blocked else None,
            "creates_withheld": preset_plan.creates_withheld,
            "target_source": preset_plan.target_source.value,
            "uncapped_target": preset_plan.uncapped_target,
            "schedule_problem": preset_plan.schedule_problem,
            "target": target_json(preset_plan.target),
            "oldest_pending_job_created_at": _iso(pending_at) if pending_at else None,
            "oldest_pending_job_age_seconds": max((now - pending_at).total_seconds(), 0.0) if pending_at else None,
            **held_json(preset_plan),
        }

    return {
        "generated_at": _iso(now),
        "paused": paused,
        "presets": [entry(preset_plan) for preset_plan in plan.presets],
        # Presets the planner failed on: in no entry above, and not filling.
        "unplanned": [{**preset_log_fields(names), "reason": reason} for names, reason in unplanned(plan)],
        "in_flight_budget": budget_json(plan.budget),
        "breaker": breaker_json(plan.breaker),
    }


def unplanned(plan: Plan) -> list[tuple[PresetNames, str]]:
    """Presets the planner failed on (left out of `plan.presets`: a pool that cannot fill), each named as
    far as the snapshot knows it, with why."""
    planned = {preset_plan.preset.id for preset_plan in plan.presets}
    known = {preset.id: preset for preset in plan.snapshot.presets} if plan.snapshot is not None else {}
    found: list[tuple[PresetNames, str]] = []
    for problem in plan.problems:
        if problem.event != PLAN_FAILED or problem.preset_id in planned:
            continue
        preset = known.get(problem.preset_id)
        names = (
            PresetNames(
                preset.id, preset.name, preset.template_name, preset.template_version_name, preset.organization_name
            )
            if preset is not None
            else PresetNames(problem.preset_id)
        )
        found.append((names, f"not planned: {problem.detail}"))
    return found


def _version(preset_plan: PresetPlan) -> str:
    return preset_plan.preset.template_version_name + ("" if preset_plan.preset.active else " (old)")


def _status_header(plan: Plan, paused: bool) -> str:
    line = f"status at {format_time(plan.generated_at, plan.generated_at)}"
    line += "  reconciliation is PAUSED (reconciler resume)" if paused else ""
    # The in-flight budget's line, when one is set, ends with its own newline.
    line += ("\n" + budget_line(plan.budget).rstrip("\n")) if plan.budget is not None else ""
    # The outage breaker's line while it is open or half-open.
    breaker = breaker_line(plan.breaker)
    return line + ("\n" + breaker.rstrip("\n") if breaker else "")


def status_table(plan: Plan, *, paused: bool, width: int = STATUS_WIDTH) -> str:
    """One line per preset, at most `width` columns: READY is eligible/desired (`+N`: N starting), REASON
    the most decisive reason the pool is not filling; the rest is in `status --wide`, `status --json` and
    `presets describe`."""
    now = plan.generated_at
    rows = []
    for preset_plan in plan.presets:
        found = reasons(preset_plan, now, paused=paused)
        state = preset_plan.state
        starting = f" +{state.starting}" if state.starting else ""
        rows.append(
            (
                str(preset_plan.preset.id)[:SHORT_ID_LENGTH],
                preset_plan.preset.organization_name,
                preset_plan.preset.template_name,
                _version(preset_plan),
                preset_plan.preset.name,
                f"{state.eligible}/{state.desired}{starting}",
                # The status is in the reason when it is not `normal` ("hard limited since ...").
                found[0] if found else "-",
            )
        )
    for names, reason in unplanned(plan):
        rows.append(
            (
                str(names.id)[:SHORT_ID_LENGTH],
                names.organization_name or "?",
                names.template_name or "?",
                names.template_version_name or "?",
                names.name or "?",
                "?",
                reason,
            )
        )
    headers = ("ID", "ORG", "TEMPLATE", "VERSION", "PRESET", "READY", "REASON")
    if not rows:
        return f"{_status_header(plan, paused)}\nno presets with prebuilds"
    # Names give way first (to 12 characters), then the reason (to 40), then both to their floor.
    name_columns = (1, 2, 3, 4)
    shrink = (
        dict.fromkeys(name_columns, 12),
        {6: 40},
        {**dict.fromkeys(name_columns, 6), 6: 24},
    )
    body = table(headers, rows, width=width, shrink=shrink)
    return f"{_status_header(plan, paused)}\n{body}"


def status_wide_table(plan: Plan, *, paused: bool) -> str:
    """Everything `status` knows, one line per preset, as wide as it takes."""
    now = plan.generated_at
    rows = []
    for preset_plan in plan.presets:
        preset = preset_plan.preset
        failures = preset_plan.failures
        rows.append(
            (
                preset.id,
                preset.organization_name,
                preset.template_name,
                _version(preset_plan),
                preset.name,
                *(getattr(preset_plan.state, name) for name in STATE_FIELDS),
                _target_source(preset_plan),
                preset_plan.prebuild_status.value,
                format_time(preset.status_changed_at, now) if preset.status_changed_at else "-",
                format_time(preset_plan.backoff_until, now) if preset_plan.backoff_until else "-",
                failures.failure_streak if failures else 0,
                (failures.last_error_code or "-") if failures else "-",
                "; ".join(reasons(preset_plan, now, paused=paused)) or "-",
            )
        )
    headers = (
        "ID",
        "ORG",
        "TEMPLATE",
        "VERSION",
        "PRESET",
        *(name.upper() for name in STATE_FIELDS),
        "TARGET",
        "STATUS",
        "SINCE",
        "BACKOFF UNTIL",
        "STREAK",
        "LAST ERROR CODE",
        "REASONS",
    )
    for names, reason in unplanned(plan):
        unknown = ("?",) * len(STATE_FIELDS)
        rows.append(
            (
                names.id,
                names.organization_name or "?",
                names.template_name or "?",
                names.template_version_name or "?",
                names.name or "?",
                *unknown,
                "?",
                "?",
                "-",
                "-",
                "?",
                "-",
                reason,
            )
        )
    if not rows:
        return f"{_status_header(plan, paused)}\nno presets with prebuilds"
    return f"{_status_header(plan, paused)}\n{table(headers, rows)}"
