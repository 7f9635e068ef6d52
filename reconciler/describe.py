"""`reconciler presets describe`: everything about one preset in one place, as `kubectl describe` does.

Also how an operator names a preset (`resolve`), for `describe` and `reset`: a full id, a unique prefix
of one (the short id `status` shows), `template/preset` or `template/version/preset`. A name means the
preset of the template's active version when there is exactly one such; otherwise, and for a prefix
that several ids share, the command refuses and lists the candidates.

The plan part (target, counts, backoff, reasons, next actions) is the plan a pass would compute now,
with the settings `plan` and `status` use; the rest is read from the preset's rows, its recent prebuilds
and its notification messages (`store/describe.py`). Pure: the caller reads, this module shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from reconciler.plan import BackoffAction, PlanProblem, PresetPlan
from reconciler.reports import (
    SHORT_ID_LENGTH,
    STATE_FIELDS,
    action_json,
    describe_action,
    format_age,
    format_time,
    held_json,
    reasons,
    table,
    target_json,
)
from reconciler.store.describe import (
    PresetCandidate,
    PresetNotification,
    PresetReference,
    PresetSettings,
    RecentPrebuild,
)
from reconciler.target import Target
from reconciler.terminal import printable

RECENT_PREBUILDS = 10
RECENT_NOTIFICATIONS = 20
FORMS = "a preset id, a unique id prefix, template/preset or template/version/preset"


class NoSuchPresetError(Exception):
    """Nothing matches what the operator typed."""


class AmbiguousPresetError(Exception):
    """Several presets match; the message lists them."""

    def __init__(self, text: str, candidates: Sequence[PresetCandidate]) -> None:
        self.candidates = tuple(candidates)
        listed = "\n".join(f"  {printable(candidate.label)}" for candidate in candidates)
        more = "\n  (and maybe more: at most 50 are listed)" if len(candidates) >= 50 else ""
        super().__init__(
            f"{printable(text)!s} matches {len(candidates)} presets; name one by its id (or a longer prefix), "
            f"or as template/version/preset:\n{listed}{more}"
        )


def resolve(reference: PresetReference, candidates: Sequence[PresetCandidate]) -> PresetCandidate:
    """The one preset `reference` names among the `candidates` the store found for it."""
    if reference.full_id is not None:
        exact = [candidate for candidate in candidates if candidate.id == reference.full_id]
        if not exact:
            raise NoSuchPresetError(f"no preset with id {reference.full_id}")
        return exact[0]
    if not candidates:
        raise NoSuchPresetError(f"no preset matches {printable(reference.text)!r} ({FORMS})")
    if len(candidates) == 1:
        return candidates[0]
    if reference.preset_name is not None and reference.version_name is None:
        # template/preset: the active version's preset, when the name picks out exactly one.
        active = [candidate for candidate in candidates if candidate.is_active_version]
        if len(active) == 1 and not reference.id_prefix:
            return active[0]
    raise AmbiguousPresetError(reference.text, candidates)


@dataclass(frozen=True, slots=True)
class Description:
    candidate: PresetCandidate
    settings: PresetSettings
    # None when the preset has no prebuilds (`desired_instances` is null): no pass plans it.
    preset_plan: PresetPlan | None
    problems: tuple[PlanProblem, ...]
    prebuilds: Sequence[RecentPrebuild]
    notifications: Sequence[PresetNotification]
    # The behaviour settings the plan was computed with (`recorded_settings.ResolvedSettings.as_json`).
    settings_used: dict[str, Any]
    paused: bool
    now: datetime


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment is not None else None


def _episodes(notifications: Sequence[PresetNotification]) -> list[dict[str, Any]]:
    """The notices of the preset, one per status change (episode and kind), oldest first, each with its
    messages (one per recipient) and their deliveries."""
    grouped: dict[tuple[int, str], list[PresetNotification]] = {}
    for message in sorted(notifications, key=lambda message: (message.created_at, str(message.id))):
        grouped.setdefault((message.episode, message.kind), []).append(message)
    return [
        {
            "episode": episode,
            "kind": kind,
            "at": _iso(min(message.created_at for message in messages)),
            "messages": [
                {
                    "id": str(message.id),
                    "recipient": message.recipient,
                    "recipient_email": message.recipient_email,
                    "status": message.status,
                    "created_at": _iso(message.created_at),
                    "sent_at": _iso(message.sent_at),
                    "attempts": message.attempts,
                    "last_error": message.last_error,
                    "deliveries": [{"sink": sink, "delivered_at": at} for sink, at in message.deliveries],
                }
                for message in messages
            ],
        }
        for (episode, kind), messages in grouped.items()
    ]


def as_json(description: Description) -> dict[str, Any]:
    candidate, stored, preset_plan = description.candidate, description.settings, description.preset_plan
    now = description.now
    document: dict[str, Any] = {
        "generated_at": _iso(now),
        "paused": description.paused,
        "preset": {
            "preset_id": str(candidate.id),
            "short_id": str(candidate.id)[:SHORT_ID_LENGTH],
            "preset_name": candidate.name,
            "organization_name": candidate.organization_name,
            "template_name": candidate.template_name,
            "template_version_name": candidate.template_version_name,
            "active_version": candidate.is_active_version,
            "template_deleted": stored.template_deleted,
            "template_deprecated": stored.template_deprecation or None,
        },
        "settings": description.settings_used,
        "target": {
            "desired_instances": stored.desired_instances,
            "desired": preset_plan.state.desired if preset_plan else None,
            "source": preset_plan.target_source.value if preset_plan else None,
            "uncapped_target": preset_plan.uncapped_target if preset_plan else None,
            "max_desired_instances": description.settings_used.get("values", {}).get(
                "RECONCILER_MAX_DESIRED_INSTANCES"
            ),
            "schedule_problem": preset_plan.schedule_problem if preset_plan else None,
            "scheduling_timezone": stored.scheduling_timezone,
            "schedules": [
                {"cron_expression": cron, "desired_instances": instances} for cron, instances in stored.schedules
            ],
            "invalidate_after_secs": stored.invalidate_after_secs,
            "last_invalidated_at": _iso(stored.last_invalidated_at),
            # The expression's inputs, result or error, cold start and hold (issue 14; null without a plan).
            "computed": target_json(preset_plan.target) if preset_plan else None,
        },
        "state": {name: getattr(preset_plan.state, name) for name in STATE_FIELDS} if preset_plan else None,
        "backoff": None,
        "status": {
            "prebuild_status": stored.prebuild_status,
            "since": _iso(stored.status_changed_at),
            "failure_episode": stored.failure_episode,
            "failure_reset_at": _iso(stored.failure_reset_at),
            "status_change": preset_plan.status_change.value if preset_plan and preset_plan.status_change else None,
        },
        "failures": None,
        "reasons": reasons(preset_plan, now, paused=description.paused) if preset_plan else [],
        "history": _episodes(description.notifications),
        "recent_prebuilds": [
            {
                "workspace_id": str(prebuild.workspace_id),
                "workspace_name": prebuild.workspace_name,
                "created_at": _iso(prebuild.created_at),
                "job_status": prebuild.job_status,
                "completed_at": _iso(prebuild.completed_at),
                "claimed": prebuild.claimed,
                "deleted": prebuild.deleted,
                "error_code": prebuild.error_code,
                "error": prebuild.error,
            }
            for prebuild in description.prebuilds
        ],
        "oldest_pending_job": None,
        "next_pass": None,
        "problems": [{"event": problem.event, "detail": problem.detail} for problem in description.problems],
    }
    if preset_plan is None:
        return document
    if preset_plan.backoff_until is not None:
        failed = next((action.num_failed for action in preset_plan.actions if isinstance(action, BackoffAction)), None)
        document["backoff"] = {"until": _iso(preset_plan.backoff_until), "num_failed": failed}
    failures = preset_plan.failures
    if failures is not None:
        document["failures"] = {
            "failure_streak": failures.failure_streak,
            "hard_limited": failures.hard_limited,
            "validation_failed": failures.validation_failed,
            "last_failed_at": _iso(failures.last_failed_at),
            "last_error_code": failures.last_error_code,
            "last_error": failures.last_error,
            "failed_workspace_ids": [str(workspace_id) for workspace_id in failures.failed_workspace_ids],
        }
    if preset_plan.oldest_pending_at is not None:
        document["oldest_pending_job"] = {
            "created_at": _iso(preset_plan.oldest_pending_at),
            "age_seconds": max((now - preset_plan.oldest_pending_at).total_seconds(), 0.0),
        }
    document["next_pass"] = {
        "actions": [action_json(action) for action in preset_plan.actions],
        "status_change": preset_plan.status_change.value if preset_plan.status_change else None,
        "create_blocked": preset_plan.create_blocked.value if preset_plan.create_blocked else None,
        "creates_withheld": preset_plan.creates_withheld,
        "skipped": preset_plan.skipped,
        **held_json(preset_plan),
    }
    return document


def _field(label: str, value: object) -> str:
    return f"{label + ':':<20}{printable(value)}"


def _when(moment: datetime | None, now: datetime, never: str = "-") -> str:
    return format_time(moment, now) if moment is not None else never


def _settings_lines(settings_used: dict[str, Any], now: datetime) -> list[str]:
    source = settings_used.get("source")
    recorded_by = settings_used.get("recorded_by")
    last_pass = settings_used.get("last_pass_at")
    last_pass_text = format_time(datetime.fromisoformat(last_pass), now) if last_pass else "-"
    origin = (
        f"the daemon's, recorded by {recorded_by} (last pass {last_pass_text})"
        if source == "recorded"
        else "your environment's"
    )
    lines = [_field("Settings used", origin)]
    lines.extend(f"  {name}={value}" for name, value in settings_used.get("values", {}).items())
    return lines


def _target_lines(description: Description) -> list[str]:
    stored, preset_plan, now = description.settings, description.preset_plan, description.now
    lines = []
    if preset_plan is None:
        lines.append(_field("Target", "none: the preset has no prebuilds (desired_instances is not set)"))
        return lines
    source = preset_plan.target_source.value
    if preset_plan.uncapped_target is not None:
        source += f", capped from {preset_plan.uncapped_target} by RECONCILER_MAX_DESIRED_INSTANCES"
    lines.append(_field("Target", f"{preset_plan.state.desired} ({source})"))
    lines.append(_field("  Static", f"desired_instances {stored.desired_instances}"))
    lines.extend(_expression_lines(preset_plan.target))
    if stored.schedules:
        zone = stored.scheduling_timezone or "UTC"
        lines.append(_field("  Schedules", f"in time zone {zone}"))
        lines.extend(f"    {printable(cron)}  ->  {instances}" for cron, instances in stored.schedules)
        if preset_plan.schedule_problem is not None:
            lines.append(_field("  Schedule ignored", preset_plan.schedule_problem))
    ttl = f"{stored.invalidate_after_secs} s" if stored.invalidate_after_secs else "none"
    lines.append(_field("  Time to live", ttl))
    lines.append(_field("  Invalidated", _when(stored.last_invalidated_at, now, "never")))
    return lines


def _expression_lines(target: Target | None) -> list[str]:
    """What the preset's expression read and gave (docs/DEMAND.md); nothing without one."""
    if target is None or target.expression is None:
        return []
    lines = [_field("  Expression", printable(target.expression))]
    inputs = ", ".join(f"{name}={value}" for name, value in target.inputs)
    lines.append(_field("    Inputs", inputs or "-"))
    if target.error is not None:
        outcome = f"failed ({target.error.kind.value}: {printable(target.error.message)}): scheduled_target used"
    else:
        outcome = f"{target.result}" + (
            " -> scheduled_target (cold start: no claim event yet)" if target.cold_start else ""
        )
    lines.append(_field("    Result", outcome))
    if target.retained > target.desired:
        lines.append(_field("    Held at", f"{target.retained} while the lower target stabilizes"))
    return lines


def _history_lines(description: Description) -> list[str]:
    now = description.now
    rows = []
    for notice in _episodes(description.notifications):
        for message in notice["messages"]:
            delivered = ", ".join(
                f"{delivery['sink']} {format_time(datetime.fromisoformat(delivery['delivered_at']), now)}"
                for delivery in message["deliveries"]
            )
            rows.append(
                (
                    notice["episode"],
                    notice["kind"],
                    format_time(datetime.fromisoformat(message["created_at"]), now),
                    message["recipient"] or "(nobody)",
                    message["status"],
                    message["attempts"],
                    delivered or "-",
                    message["last_error"] or "-",
                )
            )
    if not rows:
        return ["History:           no status change has been notified"]
    headers = ("EPISODE", "CHANGE", "AT", "RECIPIENT", "STATUS", "ATTEMPTS", "DELIVERED", "LAST ERROR")
    return ["History (notifications, oldest first):", *("  " + line for line in table(headers, rows).splitlines())]


def _prebuild_lines(description: Description) -> list[str]:
    now = description.now
    rows = [
        (
            prebuild.workspace_id,
            format_time(prebuild.created_at, now),
            prebuild.outcome,
            prebuild.error_code or "-",
            (prebuild.error or "-")[:200],
        )
        for prebuild in description.prebuilds
    ]
    if not rows:
        return ["Recent prebuilds:  none"]
    headers = ("WORKSPACE", "CREATED", "OUTCOME", "ERROR CODE", "ERROR")
    return ["Recent prebuilds (newest first):", *("  " + line for line in table(headers, rows).splitlines())]


def as_text(description: Description) -> str:
    candidate, stored, preset_plan, now = (
        description.candidate,
        description.settings,
        description.preset_plan,
        description.now,
    )
    version = candidate.template_version_name + (" (active)" if candidate.is_active_version else " (not active)")
    template_state = []
    if stored.template_deleted:
        template_state.append("deleted")
    if stored.template_deprecation:
        template_state.append(f"deprecated: {stored.template_deprecation}")
    lines = [
        _field("Preset", f"{candidate.name} ({candidate.id})"),
        _field("Organization", candidate.organization_name),
        _field("Template", candidate.template_name + (f" ({'; '.join(template_state)})" if template_state else "")),
        _field("Version", version),
        _field("Described at", format_time(now, now) + ("  reconciliation is PAUSED" if description.paused else "")),
        "",
        *_settings_lines(description.settings_used, now),
        "",
        *_target_lines(description),
    ]
    if preset_plan is not None:
        state = preset_plan.state
        lines.append(_field("Counts", ", ".join(f"{name} {getattr(state, name)}" for name in STATE_FIELDS)))
        backoff = next((action for action in preset_plan.actions if isinstance(action, BackoffAction)), None)
        lines.append(_field("Backoff", describe_action(backoff, now) if backoff is not None else "none"))
    lines.append("")
    since = f" since {format_time(stored.status_changed_at, now)}" if stored.status_changed_at else ""
    lines.append(
        _field("Status", f"{stored.prebuild_status}{since} (failure episodes so far: {stored.failure_episode})")
    )
    if stored.failure_reset_at is not None:
        lines.append(_field("  Last reset", format_time(stored.failure_reset_at, now)))
    failures = preset_plan.failures if preset_plan is not None else None
    if failures is not None:
        lines.append(
            _field(
                "  Failures",
                f"{failures.failure_streak} in a row, the last at {_when(failures.last_failed_at, now)}",
            )
        )
        lines.append(_field("  Last error", f"{failures.last_error_code or '(no code)'}: {failures.last_error or '-'}"))
    found = reasons(preset_plan, now, paused=description.paused) if preset_plan is not None else []
    lines.append(_field("Reasons", "; ".join(found) if found else "none: nothing stands in the pool's way"))
    lines.append("")
    lines.extend(_history_lines(description))
    lines.append("")
    lines.extend(_prebuild_lines(description))
    lines.append("")
    if preset_plan is not None:
        pending_at = preset_plan.oldest_pending_at
        lines.append(
            _field(
                "Oldest pending job",
                f"created {format_time(pending_at, now)}, waiting for {format_age(pending_at, now)}"
                if pending_at is not None
                else "none",
            )
        )
        lines.append("Next pass:")
        if preset_plan.status_change is not None:
            lines.append(f"  - mark it {preset_plan.status_change.value} and notify the template's administrators")
        lines.extend(f"  - {describe_action(action, now)}" for action in preset_plan.actions)
        if preset_plan.creates_withheld and preset_plan.create_blocked is not None:
            creates = "1 create" if preset_plan.creates_withheld == 1 else f"{preset_plan.creates_withheld} creates"
            lines.append(f"  - withhold {creates} ({preset_plan.create_blocked.value})")
        if not preset_plan.actions and preset_plan.status_change is None and not preset_plan.creates_withheld:
            lines.append("  - nothing")
        if description.paused:
            lines.append("  (reconciliation is paused: none of it runs until `reconciler resume`)")
    for problem in description.problems:
        lines.append(_field("Problem", f"{problem.event}: {problem.detail}"))
    return "\n".join(line.rstrip() for line in lines)


def preset_plan_of(presets: Sequence[PresetPlan], preset_id: UUID) -> PresetPlan | None:
    return next((preset_plan for preset_plan in presets if preset_plan.preset.id == preset_id), None)
