"""Writes a plan: its status changes with their notifications, then its actions, preset by preset.

The status changes go first, all in one transaction with their outbox rows, so that a preset marked
hard limited this pass is already marked when its creates re-check it. Then the presets' actions:
presets are independent, they run concurrently up to a bound (so a pass cannot exhaust the pool), and
an error on one preset is logged and counted while the others go on. Each action is one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from uuid import UUID

import asyncpg
import structlog

from reconciler import db, schedule
from reconciler.breaker import BreakerEvent, BreakerRecord
from reconciler.notify.outbox import StatusNotice, enqueue_breaker_notice, enqueue_notices
from reconciler.plan import (
    Action,
    BackoffAction,
    BudgetUse,
    CancelPendingAction,
    CreateAction,
    DeleteAction,
    DeleteReason,
    Plan,
    PresetPlan,
    StatusChange,
    StatusChangeKind,
)
from reconciler.snapshot import PrebuildStatus, preset_log_fields
from reconciler.store import reads, writes

logger = structlog.get_logger(__name__)


class ActionOutcome(enum.StrEnum):
    SUCCESS = "success"
    ERROR = "error"
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class StatusChanges:
    """The status changes a pass wrote: the presets that moved, and the notification rows enqueued."""

    hard_limited: tuple[UUID, ...] = ()
    validation_failed: tuple[UUID, ...] = ()
    recovered: tuple[UUID, ...] = ()
    notifications_enqueued: int = 0
    # Status changes a full pass left to the next one: their template was a targeted pass's (see `execute`).
    deferred: int = 0


@dataclass
class ExecutionSummary:
    created: int = 0
    deleted: int = 0
    canceled: int = 0
    # Creates withheld at write time by the fresh clamp, and deletes refused (claimed meanwhile).
    creates_clamped: int = 0
    deletes_skipped: int = 0
    # The breaker's change this pass, as written (None: none, or another writer moved it first), and the
    # notification rows it enqueued.
    breaker_event: BreakerEvent | None = None
    breaker_notifications: int = 0
    # Creates and deletes the in-flight budget held back at write time (other replicas or passes spent
    # the room since the snapshot); creates among them are also in `creates_clamped`.
    budget_held: int = 0
    presets_failed: int = 0
    # Presets whose writes this full pass left to the next one (see `execute`): a targeted pass was acting
    # on their template, or had acted on it since this pass's snapshot.
    presets_deferred: int = 0
    # (kind, outcome) -> number of actions, for the actions metric.
    actions: Counter[tuple[str, ActionOutcome]] = field(default_factory=Counter)
    failed_preset_ids: list[UUID] = field(default_factory=list)
    status_changes: StatusChanges = field(default_factory=StatusChanges)


# Observes each action as it completes, once per outcome it had: (kind, outcome, number of prebuilds,
# reason). A create of 3 that the clamp cut to 2 is (create, success, 2, "") and (create, skipped, 1, "");
# a delete's reason is its `DeleteReason` (empty for the other kinds). The daemon counts metrics with it.
ActionObserver = Callable[[str, ActionOutcome, int, str], None]


async def _budget_room(
    connection: db.Connection, budget: BudgetUse | None, template_id: UUID, *, create: bool = False
) -> int | None:
    """Jobs the in-flight budget still admits now, across the deployment and for the template, and for a
    `create` while the plan's slow start holds, the creates it still admits; None without either. Takes
    the budget's lock first (held to the end of the caller's transaction), then counts."""
    limited = budget is not None and bool(budget.max_in_flight or budget.max_in_flight_per_template)
    slow_start = budget.slow_start if budget is not None and create else 0
    if budget is None or not (limited or slow_start):
        return None
    await writes.lock_in_flight_budget(connection)
    rooms = []
    if limited:
        total, for_template = await writes.count_in_flight(connection, template_id)
        if budget.max_in_flight:
            rooms.append(budget.max_in_flight - total)
        if budget.max_in_flight_per_template:
            rooms.append(budget.max_in_flight_per_template - for_template)
    if slow_start:
        # The slow start held when the plan was made: what other writers started since counts. (A success
        # meanwhile would have lifted it; the next pass sees it.)
        rooms.append(slow_start - await reads.count_prebuild_creates_in_flight(connection))
    return max(min(rooms), 0)


def _fresh_target(preset_plan: PresetPlan, check: writes.CreateCheck, now: datetime) -> int:
    """The target a create may fill to, from what the preset says under its lock.

    A target computed by the preset's expression (or its fallback) stands while the expression is the one
    the plan evaluated: it needs the pass's demand, which only the snapshot has. Otherwise the static or
    scheduled target computed now, never above the plan's.
    """
    planned = preset_plan.target
    expression = (check.desired_instances_expression or "").strip()
    if planned is not None and planned.expression is not None and expression == planned.expression.strip():
        return preset_plan.state.desired
    fresh = schedule.target(check.desired_instances or 0, check.schedules, check.scheduling_timezone, now)
    return min(preset_plan.state.desired, fresh.instances)


def _may_create(check: writes.CreateCheck | None) -> bool:
    return (
        check is not None
        and check.desired_instances is not None
        and check.active
        and check.prebuild_status is PrebuildStatus.NORMAL
    )


def _clamped(
    preset_plan: PresetPlan, action: CreateAction, check: writes.CreateCheck, existing: int, now: datetime
) -> int:
    """The prebuilds a create may still make, read under the preset's lock.

    Clamp to a target computed now from the preset's current desired count and schedules (a schedule
    that covers `now` still decides), never above the plan's: a lowered desired count, or schedules
    replaced after the snapshot, clamp the creates decided from the snapshot. The expired prebuilds the
    surge keeps are still live prebuilds of the preset, counted in `existing`.
    """
    target = _fresh_target(preset_plan, check, now) + preset_plan.surge_kept
    return max(min(action.count, target - existing), 0)


async def _create(
    connection: db.Connection,
    preset_plan: PresetPlan,
    action: CreateAction,
    now: datetime,
    budget: BudgetUse | None = None,
    summary: ExecutionSummary | None = None,
) -> tuple[int, int]:
    """Create up to `action.count` prebuilds atomically; returns (created, clamped away)."""
    preset = preset_plan.preset
    async with connection.transaction():
        # The budget's lock before the preset's: every budgeted writer takes it first, so no two of ours
        # ever wait on each other in opposite orders.
        room = await _budget_room(connection, budget, preset.template_id, create=True)
        check = await writes.lock_preset_for_create(connection, preset.id)
        if not _may_create(check):
            return 0, action.count
        assert check is not None
        existing = await writes.count_preset_prebuilds(connection, preset.id, check.template_id)
        count = _clamped(preset_plan, action, check, existing, now)
        if room is not None and count > room:
            # Admission re-checked at write time: what other writers started since the snapshot counts.
            if summary is not None:
                summary.budget_held += count - room
            count = room
        if count == 0:
            return 0, action.count
        created = await writes.create_prebuilds(
            connection,
            preset_id=preset.id,
            template_version_id=preset.template_version_id,
            template_id=check.template_id,
            organization_id=check.organization_id,
            count=count,
            now=now,
        )
        return len(created), action.count - len(created)


async def _delete(
    connection: db.Connection,
    preset_plan: PresetPlan,
    action: DeleteAction,
    now: datetime,
    budget: BudgetUse | None = None,
    summary: ExecutionSummary | None = None,
    counted: Sequence[UUID] = (),
) -> int:
    """Delete the action's prebuilds, re-checked at write time. An extraneous delete also re-counts
    `counted`, the preset's other prebuilds its plan saw running: each one claimed or deleted since the
    snapshot is one delete fewer (the newest planned kept), so that a plan older than a claim never
    shrinks the pool below its target."""
    async with connection.transaction():
        workspace_ids = action.workspace_ids
        if action.reason is DeleteReason.EXTRANEOUS and counted:
            lost = len(counted) - await writes.count_prebuilds_still_live(connection, counted)
            if lost:
                workspace_ids = workspace_ids[: max(len(workspace_ids) - lost, 0)]
        room = await _budget_room(connection, budget, preset_plan.preset.template_id)
        if room is not None and len(workspace_ids) > room:
            # The oldest first, as planned; the rest wait for the next pass.
            if summary is not None:
                summary.budget_held += len(workspace_ids) - room
            workspace_ids = workspace_ids[:room]
        if not workspace_ids:
            return 0
        deleted = await writes.delete_prebuilds(connection, workspace_ids, now)
    return len(deleted)


async def _cancel(connection: db.Connection, preset_plan: PresetPlan, now: datetime) -> int:
    async with connection.transaction():
        canceled = await writes.cancel_pending_prebuilds(connection, preset_plan.preset.id, now)
    return len(canceled)


async def execute_preset(
    connection: db.Connection,
    preset_plan: PresetPlan,
    now: datetime,
    summary: ExecutionSummary,
    observe: ActionObserver | None = None,
    *,
    budget: BudgetUse | None = None,
    counted: Sequence[UUID] = (),
) -> None:
    """Run one preset's actions in order. Raises on the first failing action; earlier ones stay done.

    With a `budget` (the plan's), each create and delete is re-admitted under the budget's lock. An
    extraneous delete re-counts `counted`, the preset's other prebuilds the plan saw (`_delete`)."""

    def record(
        kind: str, outcome: ActionOutcome, rows: int, *, planned: int, reason: str = "", **details: object
    ) -> None:
        _record(summary, observe, preset_plan, kind, outcome, rows, planned=planned, reason=reason, **details)

    for action in preset_plan.actions:
        try:
            if isinstance(action, BackoffAction):
                continue
            if isinstance(action, CancelPendingAction):
                canceled = await _cancel(connection, preset_plan, now)
                summary.canceled += canceled
                record("cancel_pending", ActionOutcome.SUCCESS, canceled, planned=action.count)
            elif isinstance(action, DeleteAction):
                deleted = await _delete(connection, preset_plan, action, now, budget, summary, counted)
                summary.deleted += deleted
                summary.deletes_skipped += len(action.workspace_ids) - deleted
                record(
                    "delete",
                    ActionOutcome.SUCCESS if deleted else ActionOutcome.SKIPPED,
                    deleted,
                    planned=len(action.workspace_ids),
                    reason=action.reason.value,
                )
            elif isinstance(action, CreateAction):
                created, clamped = await _create(connection, preset_plan, action, now, budget, summary)
                summary.created += created
                summary.creates_clamped += clamped
                record(
                    "create",
                    ActionOutcome.SUCCESS if created else ActionOutcome.SKIPPED,
                    created,
                    planned=action.count,
                    clamped=clamped,
                )
        except Exception:
            record(action.type, ActionOutcome.ERROR, 0, planned=_planned(action), reason=_reason(action))
            raise


def _record(
    summary: ExecutionSummary,
    observe: ActionObserver | None,
    preset_plan: PresetPlan,
    kind: str,
    outcome: ActionOutcome,
    rows: int,
    *,
    planned: int,
    reason: str = "",
    **details: object,
) -> None:
    summary.actions[(kind, outcome)] += 1
    if observe is not None:
        # Prebuilds, not actions: what was done, and the rest of what was planned as skipped.
        if outcome is ActionOutcome.ERROR:
            observe(kind, outcome, planned, reason)
        else:
            if rows:
                observe(kind, ActionOutcome.SUCCESS, rows, reason)
            if planned > rows:
                observe(kind, ActionOutcome.SKIPPED, planned - rows, reason)
    if reason:
        details["reason"] = reason
    if outcome is not ActionOutcome.ERROR:
        # One line per preset and action: what was written, and what was planned but not done.
        logger.info(
            f"prebuilds.{kind}",
            outcome=outcome.value,
            rows=rows,
            planned=planned,
            **preset_log_fields(preset_plan.preset),
            **details,
        )


def _planned(action: Action) -> int:
    if isinstance(action, DeleteAction):
        return len(action.workspace_ids)
    return action.count if isinstance(action, CancelPendingAction | CreateAction) else 0


def _reason(action: Action) -> str:
    return action.reason.value if isinstance(action, DeleteAction) else ""


# Presets whose only writes are creates are written this many to a transaction, each in a savepoint.
CREATE_BATCH_SIZE = 64


async def execute(
    pool: db.Acquirer,
    plan: Plan,
    now: datetime,
    *,
    concurrency: int = 8,
    observe: ActionObserver | None = None,
    create_batch_size: int | None = None,
    template_locks: bool = False,
    superseded: Callable[[UUID], bool] | None = None,
    write_breaker_change: bool = True,
) -> ExecutionSummary:
    """Write the plan: its status changes first (a database error there fails the whole execution), then
    every preset's actions (an error there fails that preset only).

    Presets that only create are written in batches (`_create_batch`): one commit, and on a durable server
    one flush to disk, for many presets instead of one each, with every guarantee of a preset written
    alone. The others (deletes, cancels) go one preset at a time.

    A full pass's plan (`template_locks`) writes each preset under its template's lock, tried without
    waiting (docs/DECISIONS.md, "Targeted passes beside full passes"): a preset whose template a targeted
    pass holds is deferred to the next pass, and so is one whose template `superseded` names (a targeted
    pass took it since this plan's snapshot: its plan is the fresher). Once deferred, a template stays so
    for the rest of the execution. A targeted pass's plan (`write_breaker_change` false) leaves the breaker
    to the full passes: when its plan would move the breaker, it writes no create."""
    deferred_templates: set[UUID] = set()

    def is_superseded(template_id: UUID) -> bool:
        if template_id in deferred_templates:
            return True
        if superseded is not None and superseded(template_id):
            deferred_templates.add(template_id)
            return True
        return False

    if write_breaker_change:
        breaker_written, breaker_notifications = await write_breaker(pool, plan, now)
    else:
        breaker_written, breaker_notifications = plan.breaker is None or plan.breaker.event is None, 0
    summary = ExecutionSummary(
        status_changes=await write_status_changes(
            pool, plan, now, template_locks=template_locks, deferred_templates=deferred_templates, superseded=superseded
        )
    )
    summary.breaker_event = plan.breaker.event if plan.breaker is not None and breaker_written else None
    summary.breaker_notifications = breaker_notifications
    semaphore = asyncio.Semaphore(concurrency)
    if not breaker_written:
        # Another writer moved the breaker since this plan's snapshot: its creates were admitted under a
        # state that no longer holds, so none is written; the next pass plans them again.
        plan = replace(
            plan,
            presets=tuple(
                replace(preset_plan, actions=tuple(a for a in preset_plan.actions if not isinstance(a, CreateAction)))
                for preset_plan in plan.presets
            ),
        )

    def failed(preset_plan: PresetPlan, error: BaseException) -> None:
        preset = preset_plan.preset
        summary.presets_failed += 1
        summary.failed_preset_ids.append(preset.id)
        logger.error("reconcile.preset_failed", **preset_log_fields(preset), error=f"{type(error).__name__}: {error}")

    # The prebuilds each preset with an extraneous delete was counted with (`_delete`), indexed once.
    trimming = {preset_plan.preset.id for preset_plan in plan.presets if _deletes_extraneous(preset_plan)}
    running: dict[UUID, list[UUID]] = {preset_id: [] for preset_id in trimming}
    if trimming and plan.snapshot is not None:
        for prebuild in plan.snapshot.running:
            if prebuild.preset_id in running:
                running[prebuild.preset_id].append(prebuild.workspace_id)

    def counted(preset_plan: PresetPlan) -> tuple[UUID, ...]:
        if preset_plan.preset.id not in running:
            return ()
        deleting = {
            workspace_id
            for action in preset_plan.actions
            if isinstance(action, DeleteAction)
            for workspace_id in action.workspace_ids
        }
        return tuple(workspace_id for workspace_id in running[preset_plan.preset.id] if workspace_id not in deleting)

    def defer(preset_plan: PresetPlan) -> None:
        deferred_templates.add(preset_plan.preset.template_id)
        summary.presets_deferred += 1
        logger.debug("reconcile.preset_deferred", **preset_log_fields(preset_plan.preset))

    async def run(preset_plan: PresetPlan) -> None:
        try:
            async with pool.acquire() as connection:
                if not template_locks:
                    await execute_preset(
                        connection, preset_plan, now, summary, observe, budget=plan.budget, counted=counted(preset_plan)
                    )
                    return
                async with _templates_locked(connection, [preset_plan], is_superseded) as (granted, _):
                    if not granted:
                        defer(preset_plan)
                        return
                    await execute_preset(
                        connection, preset_plan, now, summary, observe, budget=plan.budget, counted=counted(preset_plan)
                    )
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as error:
            failed(preset_plan, error)

    async def run_alone(preset_plan: PresetPlan) -> None:
        async with semaphore:
            await run(preset_plan)

    async def write_batch(connection: db.Connection, batch: list[PresetPlan]) -> list[_CreateOutcome]:
        outcomes = None
        if _budget_unset(plan.budget):
            try:
                outcomes = await _create_batch_set(connection, batch, now)
            except asyncpg.PostgresError as error:
                # Some preset of the batch cannot be written: find which, a savepoint each.
                logger.info("prebuilds.create_batch_split", presets=len(batch), error=db.describe_error(error))
        if outcomes is None:
            outcomes = await _create_batch(connection, batch, now, plan.budget)
        return outcomes

    async def run_batch(batch: list[PresetPlan]) -> None:
        async with semaphore:
            try:
                async with pool.acquire() as connection:
                    if not template_locks:
                        outcomes = await write_batch(connection, batch)
                    else:
                        async with _templates_locked(connection, batch, is_superseded) as (granted, refused):
                            for preset_plan in refused:
                                defer(preset_plan)
                            # What is written (and, should the batch fail, written again alone).
                            batch = granted
                            outcomes = await write_batch(connection, batch) if batch else []
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as error:
                # The batch's transaction did not commit (a lost connection, a failed commit): nothing of
                # it was written. Each preset is written again alone, as if batches did not exist.
                logger.warning("prebuilds.create_batch_failed", presets=len(batch), error=db.describe_error(error))
                for preset_plan in batch:
                    await run(preset_plan)
                return
        for outcome in outcomes:
            outcome.apply(summary, observe)
            if outcome.error is not None:
                failed(outcome.preset_plan, outcome.error)

    work = [preset_plan for preset_plan in plan.presets if _has_writes(preset_plan)]
    creating = [preset_plan for preset_plan in work if _creates_only(preset_plan)]
    alone = [preset_plan for preset_plan in work if not _creates_only(preset_plan)]
    # Each batch locks its presets' rows in id order: two writers of overlapping batches never wait on each
    # other in opposite orders.
    creating.sort(key=lambda preset_plan: preset_plan.preset.id)
    size = max(create_batch_size or CREATE_BATCH_SIZE, 1)
    batches = [creating[start : start + size] for start in range(0, len(creating), size)]
    await asyncio.gather(*(run_alone(preset_plan) for preset_plan in alone), *(run_batch(batch) for batch in batches))
    return summary


async def write_breaker(pool: db.Acquirer, plan: Plan, now: datetime) -> tuple[bool, int]:
    """Write the breaker's change, with its episode row and, when an episode opens or closes, its one
    notification, in one transaction. Returns (whether the plan's breaker holds, notification rows).

    Only from the state the snapshot read: when another replica or pass moved the breaker first, nothing
    is written and the plan's breaker no longer holds.
    """
    decision = plan.breaker
    if decision is None or decision.event is None:
        return True, 0
    read = plan.snapshot.breaker if plan.snapshot is not None else BreakerRecord()
    new = decision.record
    event = decision.event
    notifications = 0
    async with pool.acquire() as connection, connection.transaction():
        if not await writes.write_breaker(connection, read, new):
            logger.info("breaker.changed_elsewhere", state=read.state.value, episode=read.episode)
            return False, 0
        opened_at = read.opened_at
        if event is BreakerEvent.OPENED:
            opened_at = new.opened_at or now
            failures_since = new.failures_since or now
            await writes.open_breaker_episode(connection, new.episode, opened_at, failures_since, decision.reason)
        elif event is BreakerEvent.CLOSED:
            opened_at = await writes.close_breaker_episode(connection, new.episode, now) or opened_at
        if event.notifies and new.episode > 0:
            notifications = await enqueue_breaker_notice(
                connection,
                opened=event is BreakerEvent.OPENED,
                episode=new.episode,
                reason=decision.reason,
                at=now,
                opened_at=opened_at,
                open_until=new.open_until,
            )
    log = logger.warning if event in (BreakerEvent.OPENED, BreakerEvent.REOPENED) else logger.info
    log(
        f"breaker.{event.value}",
        episode=new.episode,
        state=new.state.value,
        reason=decision.reason,
        open_until=new.open_until.isoformat() if new.open_until else None,
        notifications_enqueued=notifications,
    )
    return True, notifications


@dataclass
class _CreateOutcome:
    """One preset's creates in a batch, applied to the summary once the batch has committed."""

    preset_plan: PresetPlan
    # (action, created, clamped) per create action done.
    done: list[tuple[CreateAction, int, int]] = field(default_factory=list)
    budget_held: int = 0
    # The action that failed and the error (its savepoint rolled back, the others' work stands).
    failed_action: CreateAction | None = None
    error: Exception | None = None

    def apply(self, summary: ExecutionSummary, observe: ActionObserver | None) -> None:
        summary.budget_held += self.budget_held
        for action, created, clamped in self.done:
            summary.created += created
            summary.creates_clamped += clamped
            _record(
                summary,
                observe,
                self.preset_plan,
                "create",
                ActionOutcome.SUCCESS if created else ActionOutcome.SKIPPED,
                created,
                planned=action.count,
                clamped=clamped,
            )
        if self.failed_action is not None:
            _record(
                summary, observe, self.preset_plan, "create", ActionOutcome.ERROR, 0, planned=self.failed_action.count
            )


async def _create_batch(
    connection: db.Connection, batch: list[PresetPlan], now: datetime, budget: BudgetUse | None
) -> list[_CreateOutcome]:
    """The creates of several presets in one transaction, each preset's in a savepoint of its own.

    Every preset is checked as when it is written alone (`_create`: the budget's lock and a fresh count,
    the preset's row lock, then its target and prebuilds re-read), in the same transaction, so the counts
    see the batch's earlier creates. A database error on one preset rolls back its savepoint only: that
    preset fails, the others go on. Any other error (the connection lost) leaves the whole transaction
    to roll back, and raises: the caller writes the batch one preset at a time.
    """
    outcomes = []
    async with connection.transaction():
        for preset_plan in batch:
            outcome = _CreateOutcome(preset_plan)
            outcomes.append(outcome)
            staged = ExecutionSummary()
            for action in preset_plan.actions:
                if not isinstance(action, CreateAction):
                    continue
                try:
                    # A savepoint: `_create`'s transaction nests in the batch's.
                    created, clamped = await _create(connection, preset_plan, action, now, budget, staged)
                except asyncpg.PostgresError as error:
                    outcome.failed_action, outcome.error = action, error
                    break
                outcome.done.append((action, created, clamped))
            outcome.budget_held = staged.budget_held
    return outcomes


async def _create_batch_set(connection: db.Connection, batch: list[PresetPlan], now: datetime) -> list[_CreateOutcome]:
    """A batch's creates in four statements (lock, read, count, insert) in one transaction, for when no
    in-flight budget is set: the same checks and clamp as `_create`, for all the batch's presets at once.
    Raises on any error, the transaction rolled back: the caller then writes the batch with a savepoint
    per preset (`_create_batch`), which confines an error to its preset."""
    outcomes = [_CreateOutcome(preset_plan) for preset_plan in batch]
    async with connection.transaction():
        checks = await writes.lock_presets_for_create(connection, [p.preset.id for p in batch])
        allowed = {preset_id: check for preset_id, check in checks.items() if _may_create(check)}
        existing = await writes.count_presets_prebuilds(
            connection, {preset_id: check.template_id for preset_id, check in allowed.items()}
        )
        planned: list[list[tuple[CreateAction, int]]] = []
        creates = []
        for preset_plan in batch:
            preset = preset_plan.preset
            check = allowed.get(preset.id)
            counts = []
            total = 0
            for action in preset_plan.actions:
                if not isinstance(action, CreateAction):
                    continue
                # A preset's later create counts its earlier ones, as each `_create` would.
                count = 0 if check is None else _clamped(preset_plan, action, check, existing[preset.id] + total, now)
                counts.append((action, count))
                total += count
            planned.append(counts)
            if check is not None and total:
                creates.append(
                    writes.PrebuildsToCreate(
                        preset.id, preset.template_version_id, check.template_id, check.organization_id, total
                    )
                )
        created = await writes.create_prebuilds_batch(connection, creates, now)
    for outcome, counts in zip(outcomes, planned, strict=True):
        made = created.get(outcome.preset_plan.preset.id, 0)
        for action, count in counts:
            done = min(count, made)
            made -= done
            outcome.done.append((action, done, action.count - done))
    return outcomes


def _deletes_extraneous(preset_plan: PresetPlan) -> bool:
    return any(
        isinstance(action, DeleteAction) and action.reason is DeleteReason.EXTRANEOUS for action in preset_plan.actions
    )


def _budget_unset(budget: BudgetUse | None) -> bool:
    return budget is None or not (budget.max_in_flight or budget.max_in_flight_per_template or budget.slow_start)


def _creates_only(preset_plan: PresetPlan) -> bool:
    return all(isinstance(action, CreateAction | BackoffAction) for action in preset_plan.actions)


def _has_writes(preset_plan: PresetPlan) -> bool:
    return any(not isinstance(action, BackoffAction) for action in preset_plan.actions)


# The order in which status changes are written (and their notices enqueued).
_STATUS_CHANGE_ORDER = (StatusChangeKind.VALIDATION_FAILED, StatusChangeKind.HARD_LIMITED, StatusChangeKind.RECOVERED)


async def write_status_changes(
    pool: db.Acquirer,
    plan: Plan,
    now: datetime,
    *,
    template_locks: bool = False,
    deferred_templates: set[UUID] | None = None,
    superseded: Callable[[UUID], bool] | None = None,
) -> StatusChanges:
    """Write the plan's status changes and their notifications, in one transaction.

    The database decides who moves (only presets still in the status the snapshot saw), so two writers or
    a crash between steps never open an episode twice; the outbox's unique key does the same for
    messages. What moved is returned and logged; a preset that did not move is left to the next pass.

    With `template_locks` (a full pass, see `execute`), the transaction first tries its presets' template
    locks: the changes of a template a targeted pass holds, or has taken since the snapshot (`superseded`),
    are left to the next pass, and their templates added to `deferred_templates`.
    """
    if not plan.status_changes:
        return StatusChanges()
    deferred = 0
    moved: dict[StatusChangeKind, list[StatusChange]] = {kind: [] for kind in _STATUS_CHANGE_ORDER}
    notices: list[StatusNotice] = []
    async with pool.acquire() as connection, connection.transaction():
        status_changes = list(plan.status_changes)
        if template_locks:
            granted = await reads.try_template_locks_in_transaction(
                connection, {change.preset.template_id for change in status_changes}
            )
            held = {
                template_id
                for template_id in granted
                if not (superseded is not None and superseded(template_id))
                and template_id not in (deferred_templates or ())
            }
            kept = [change for change in status_changes if change.preset.template_id in held]
            deferred = len(status_changes) - len(kept)
            if deferred_templates is not None:
                deferred_templates.update(change.preset.template_id for change in status_changes)
                deferred_templates.difference_update(held)
            status_changes = kept
        changing: dict[StatusChangeKind, list[StatusChange]] = {kind: [] for kind in _STATUS_CHANGE_ORDER}
        for change in status_changes:
            changing[change.kind].append(change)
        for kind, group in changing.items():
            if not group:
                continue
            by_id = {change.preset.id: change for change in group}
            if kind is StatusChangeKind.RECOVERED:
                marked = await writes.mark_presets_recovered(connection, list(by_id), now)
            else:
                marked = await writes.mark_presets_status(connection, list(by_id), kind.new_status, now)
            for row in marked:
                change = by_id[row.preset_id]
                moved[kind].append(change)
                notices.append(StatusNotice(kind, change.preset, row.failure_episode, change.failures, at=now))
        enqueued = await enqueue_notices(connection, notices) if notices else 0
    for kind, level in (
        (StatusChangeKind.HARD_LIMITED, logger.warning),
        (StatusChangeKind.VALIDATION_FAILED, logger.warning),
        (StatusChangeKind.RECOVERED, logger.info),
    ):
        for change in moved[kind]:
            fields: dict[str, object] = {**preset_log_fields(change.preset)}
            if change.failures is not None and kind is not StatusChangeKind.RECOVERED:
                fields.update(
                    failure_streak=change.failures.failure_streak, last_error_code=change.failures.last_error_code
                )
            level(f"preset.{kind.value}", **fields)
    return StatusChanges(
        hard_limited=tuple(change.preset.id for change in moved[StatusChangeKind.HARD_LIMITED]),
        validation_failed=tuple(change.preset.id for change in moved[StatusChangeKind.VALIDATION_FAILED]),
        recovered=tuple(change.preset.id for change in moved[StatusChangeKind.RECOVERED]),
        notifications_enqueued=enqueued,
        deferred=deferred,
    )


@contextlib.asynccontextmanager
async def _templates_locked(
    connection: db.Connection, presets: list[PresetPlan], superseded: Callable[[UUID], bool]
) -> AsyncIterator[tuple[list[PresetPlan], list[PresetPlan]]]:
    """Hold the template locks of `presets` on this session, shared, while the caller writes them: yields
    the presets it may write (their template's lock granted, and no targeted pass has taken it since the
    plan's snapshot) and those it must defer. Shared, so that the pass's own writers of one template never
    exclude each other, while a targeted pass's exclusive lock excludes them all; tried without waiting,
    so a full pass never waits on a targeted one. Released on the way out."""
    templates = {preset_plan.preset.template_id for preset_plan in presets}
    locks = await reads.try_template_locks(connection, templates, shared=True)
    try:
        # Read under the lock: a targeted pass that took the template before us has marked it by now.
        granted = [p for p in presets if p.preset.template_id in locks.granted and not superseded(p.preset.template_id)]
        refused = [p for p in presets if p.preset.template_id not in locks.granted or superseded(p.preset.template_id)]
        yield granted, refused
    finally:
        # A lost connection took its locks with it; the pool's reset would release them too.
        with contextlib.suppress(*db.SURVIVABLE_ERRORS):
            await reads.release_template_locks(connection, locks)
