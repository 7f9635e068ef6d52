"""One reconciliation pass (BEHAVIOR.md section 1): lock, pause, snapshot, status, plan, execute, summary."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import gc
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg
import structlog
from asyncpg.transaction import Transaction

from reconciler import db, executor, planner
from reconciler.config import Settings
from reconciler.notify.outbox import NoticeKind, StatusNotice, enqueue_notices
from reconciler.plan import CreateBlock, Plan, PlanProblem
from reconciler.problem_log import ProblemLog
from reconciler.problem_log import changes as problem_changes
from reconciler.snapshot import PrebuildStatus, Preset, PresetFailures, Snapshot
from reconciler.store import reads, writes

logger = structlog.get_logger(__name__)


class LockLostError(Exception):
    """The connection holding the reconciliation lock broke during the pass."""


# A pass that fails for one of these is an outcome (one line, no traceback), not a bug.
_EXPECTED_FAILURES: tuple[type[Exception], ...] = (*db.SURVIVABLE_ERRORS, LockLostError)


async def _end_lock_transaction(transaction: Transaction, body_raised: bool) -> None:
    """Roll back the lock's transaction, which releases the lock.

    When the connection broke meanwhile, the lock went with it (the server ends the session), so another
    replica may have started a pass: that is reported as a failed pass, unless the pass already failed
    for its own reason, which is then the one reported.
    """
    try:
        await transaction.rollback()
    except db.SURVIVABLE_ERRORS as error:
        if not body_raised:
            reason = f"{type(error).__name__}: {error}"
            raise LockLostError(f"the connection holding the reconciliation lock was lost: {reason}") from error


class PassOutcome(enum.StrEnum):
    SUCCESS = "success"
    FAILED = "failed"
    SKIPPED_LOCK = "skipped_lock"
    PAUSED = "paused"


@dataclass(frozen=True, slots=True)
class StatusChanges:
    hard_limited: tuple[UUID, ...] = ()
    validation_failed: tuple[UUID, ...] = ()
    recovered: tuple[UUID, ...] = ()
    notifications_enqueued: int = 0


@dataclass(frozen=True)
class PassResult:
    run_id: str
    outcome: PassOutcome
    started_at: datetime
    duration_seconds: float
    snapshot: Snapshot | None = None
    plan: Plan | None = None
    execution: executor.ExecutionSummary | None = None
    status_changes: StatusChanges = StatusChanges()
    error: str | None = None


def planner_config(settings: Settings) -> planner.PlannerConfig:
    return planner.PlannerConfig(
        backoff_interval=settings.backoff_interval, max_desired_instances=settings.max_desired_instances
    )


def snapshot_parameters(settings: Settings, now: datetime) -> reads.SnapshotParameters:
    return reads.SnapshotParameters(
        lookback_start=now - settings.backoff_lookback,
        failure_hard_limit=settings.failure_hard_limit,
        non_retryable_error_codes=settings.non_retryable_error_codes,
        capacity_error_codes=settings.capacity_error_codes,
    )


@dataclass(frozen=True, slots=True)
class _Transitions:
    hard_limited: list[Preset]
    validation_failed: list[Preset]
    recovered: list[Preset]


def find_status_transitions(snapshot: Snapshot) -> _Transitions:
    """Which presets change status this pass (section 5): newly limited, newly invalid, recovered.

    Only active presets move: the failure queries look at the active version alone, so an outdated
    preset's status is left as it was rather than "recovering" because nobody looks any more.
    """
    hard_limited: list[Preset] = []
    validation_failed: list[Preset] = []
    recovered: list[Preset] = []
    for preset in snapshot.presets:
        if not preset.active:
            continue
        if preset.prebuild_status is PrebuildStatus.NORMAL:
            if preset.id in snapshot.validation_failed_preset_ids:
                validation_failed.append(preset)
            elif preset.id in snapshot.hard_limited_preset_ids:
                hard_limited.append(preset)
        elif (
            preset.prebuild_status is PrebuildStatus.HARD_LIMITED and preset.id not in snapshot.hard_limited_preset_ids
        ):
            recovered.append(preset)
    return _Transitions(hard_limited, validation_failed, recovered)


async def apply_status_transitions(
    pool: asyncpg.Pool, snapshot: Snapshot, now: datetime
) -> tuple[Snapshot, StatusChanges]:
    """Write the status changes and their notifications in one transaction; return the updated snapshot.

    The database decides who moves (only presets still in the expected status), so two replicas or a
    crash between steps never open an episode twice; the outbox's unique key does the same for messages.
    """
    transitions = find_status_transitions(snapshot)
    if not (transitions.hard_limited or transitions.validation_failed or transitions.recovered):
        return snapshot, StatusChanges()
    failures = {failure.preset_id: failure for failure in snapshot.failures}
    presets = {preset.id: preset for preset in snapshot.presets}
    new_status: dict[UUID, PrebuildStatus] = {}
    notices: list[StatusNotice] = []

    def notice(kind: NoticeKind, change: writes.MarkedPreset) -> StatusNotice:
        return StatusNotice(
            kind=kind,
            preset=presets[change.preset_id],
            failure_episode=change.failure_episode,
            failures=failures.get(change.preset_id),
            at=now,
        )

    async with pool.acquire() as connection, connection.transaction():
        for status, group, kind in (
            (PrebuildStatus.VALIDATION_FAILED, transitions.validation_failed, NoticeKind.VALIDATION_FAILED),
            (PrebuildStatus.HARD_LIMITED, transitions.hard_limited, NoticeKind.HARD_LIMITED),
        ):
            if group:
                for change in await writes.mark_presets_status(connection, [p.id for p in group], status, now):
                    new_status[change.preset_id] = status
                    notices.append(notice(kind, change))
        if transitions.recovered:
            for change in await writes.mark_presets_recovered(connection, [p.id for p in transitions.recovered], now):
                new_status[change.preset_id] = PrebuildStatus.NORMAL
                notices.append(notice(NoticeKind.RECOVERED, change))
        enqueued = await enqueue_notices(connection, notices) if notices else 0

    updated = dataclasses.replace(
        snapshot,
        presets=tuple(
            dataclasses.replace(preset, prebuild_status=new_status[preset.id]) if preset.id in new_status else preset
            for preset in snapshot.presets
        ),
    )
    changes = StatusChanges(
        hard_limited=_moved(new_status, PrebuildStatus.HARD_LIMITED),
        validation_failed=_moved(new_status, PrebuildStatus.VALIDATION_FAILED),
        recovered=_moved(new_status, PrebuildStatus.NORMAL),
        notifications_enqueued=enqueued,
    )
    for preset_id in changes.hard_limited:
        _log_preset(logger.warning, "preset.hard_limited", presets[preset_id], failures.get(preset_id))
    for preset_id in changes.validation_failed:
        _log_preset(logger.warning, "preset.validation_failed", presets[preset_id], failures.get(preset_id))
    for preset_id in changes.recovered:
        _log_preset(logger.info, "preset.recovered", presets[preset_id], None)
    return updated, changes


def _moved(new_status: dict[UUID, PrebuildStatus], status: PrebuildStatus) -> tuple[UUID, ...]:
    return tuple(preset_id for preset_id, moved_to in new_status.items() if moved_to is status)


def _log_preset(
    log: structlog.typing.BindableLogger, event: str, preset: Preset, failure: PresetFailures | None, **extra: object
) -> None:
    fields: dict[str, object] = {
        "preset_id": str(preset.id),
        "preset_name": preset.name,
        "template_name": preset.template_name,
        "template_version_name": preset.template_version_name,
        "organization_name": preset.organization_name,
        **extra,
    }
    if failure is not None:
        fields.update(failure_streak=failure.failure_streak, last_error_code=failure.last_error_code)
    log(event, **fields)  # type: ignore[operator]


def _log_plan_problems(plan: Plan, snapshot: Snapshot, problem_log: ProblemLog | None) -> None:
    """Each problem once when it appears and once when it clears (every one, without a `problem_log`)."""
    found = problem_log.update(plan.problems) if problem_log is not None else problem_changes((), plan.problems)
    # From the snapshot: a preset the planner failed on is not in the plan.
    presets = {preset.id: preset for preset in snapshot.presets}

    def names(problem: PlanProblem) -> dict[str, object]:
        preset = presets.get(problem.preset_id)
        return {
            "preset_id": str(problem.preset_id),
            "preset_name": preset.name if preset else None,
            "template_name": preset.template_name if preset else None,
        }

    for problem in found.appeared:
        if problem.event == planner.PLAN_FAILED:
            # A bug met data nobody foresaw: an error, with where it happened.
            logger.error(problem.event, **names(problem), detail=problem.detail, traceback=problem.traceback)
        else:
            logger.warning(problem.event, **names(problem), detail=problem.detail)
    for problem in found.cleared:
        logger.info("preset.problem_cleared", **names(problem), problem=problem.event, detail=problem.detail)


def _log_plan_details(plan: Plan) -> None:
    for preset_plan in plan.presets:
        # Every pass, for every active preset at the limit, whether or not it wanted a create this time.
        if preset_plan.create_blocked is CreateBlock.HARD_LIMITED or (
            preset_plan.hard_limited and preset_plan.preset.active and preset_plan.create_blocked is None
        ):
            _log_preset(
                logger.warning,
                "preset.creates_skipped_hard_limited",
                preset_plan.preset,
                None,
                creates_withheld=preset_plan.creates_withheld,
            )
        elif preset_plan.create_blocked is CreateBlock.VALIDATION_FAILED:
            _log_preset(
                logger.warning,
                "preset.creates_skipped_validation_failed",
                preset_plan.preset,
                None,
                creates_withheld=preset_plan.creates_withheld,
            )


def summarize(plan: Plan) -> dict[str, int]:
    counts = {
        "presets": len(plan.presets),
        "presets_with_actions": 0,
        "backoff": 0,
        "hard_limited": 0,
        "to_create": 0,
        "to_delete": 0,
        "to_cancel": 0,
        "presets_unplanned": sum(problem.event == planner.PLAN_FAILED for problem in plan.problems),
    }
    for preset_plan in plan.presets:
        counts["presets_with_actions"] += bool(preset_plan.actions)
        counts["hard_limited"] += preset_plan.hard_limited
        for action in preset_plan.actions:
            if action.type == "backoff":
                counts["backoff"] += 1
            elif action.type == "create":
                counts["to_create"] += action.count  # type: ignore[union-attr]
            elif action.type == "delete":
                counts["to_delete"] += len(action.workspace_ids)  # type: ignore[union-attr]
            elif action.type == "cancel_pending":
                counts["to_cancel"] += action.count  # type: ignore[union-attr]
    return counts


async def run_pass(
    pool: asyncpg.Pool,
    settings: Settings,
    now: datetime,
    *,
    run_id: str | None = None,
    observe_action: executor.ActionObserver | None = None,
    problem_log: ProblemLog | None = None,
) -> PassResult:
    """Run one pass. Never raises for database trouble: a failed pass is an outcome, retried next time.

    Every event logged during the pass, by any module (the executor's included), carries its `run_id`.
    With a `problem_log` (the daemon keeps one), the plan's problems are logged when they appear and when
    they clear; without, every one is logged.
    """
    run_id = run_id or uuid.uuid4().hex[:12]
    with structlog.contextvars.bound_contextvars(run_id=run_id), _cyclic_gc_paused():
        return await _run_pass(pool, settings, now, run_id, observe_action, problem_log)


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a pass runs; reference counting still frees as usual.

    A pass at tens of thousands of presets allocates a few hundred thousand objects (the snapshot and the
    plan), which set off collections that walk every live object of the process, again and again. At
    fleet L (12,000 presets) that was ~150 ms of a ~0.9 s pass, measured. The pass is bounded and
    short, so the collector simply resumes after it (and catches up on whatever cycles it left).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


async def _run_pass(
    pool: asyncpg.Pool,
    settings: Settings,
    now: datetime,
    run_id: str,
    observe_action: executor.ActionObserver | None,
    problem_log: ProblemLog | None,
) -> PassResult:
    started = time.perf_counter()
    log = logger.bind(run_id=run_id)

    def result(
        outcome: PassOutcome,
        *,
        snapshot: Snapshot | None = None,
        plan: Plan | None = None,
        execution: executor.ExecutionSummary | None = None,
        status_changes: StatusChanges = StatusChanges(),
        error: str | None = None,
    ) -> PassResult:
        pass_result = PassResult(
            run_id=run_id,
            outcome=outcome,
            started_at=now,
            duration_seconds=time.perf_counter() - started,
            snapshot=snapshot,
            plan=plan,
            execution=execution,
            status_changes=status_changes,
            error=error,
        )
        if outcome is not PassOutcome.SUCCESS:
            # The canonical event of a pass that did not reconcile; a lock skip is routine, hence debug.
            level = {PassOutcome.FAILED: log.error, PassOutcome.PAUSED: log.info}.get(outcome, log.debug)
            level(
                "reconcile.pass",
                outcome=outcome.value,
                error=pass_result.error,
                duration_seconds=round(pass_result.duration_seconds, 4),
            )
        return pass_result

    bad_rows: list[reads.BadRowError] = []
    # When this pass held the reconciliation lock, in wall-clock seconds: read after the lock was granted
    # and before the transaction that holds it ends, so the interval lies within the real one. Logged,
    # so that replicas' passes can be shown never to overlap (a pass's duration also covers waiting for
    # a connection, and its event is written after the lock is released).
    lock_held_from = lock_held_until = 0.0
    try:
        async with pool.acquire() as connection:
            # The lock lives as long as this transaction: it is released when the pass ends, and by the
            # server if this process dies, so another replica can take over on its next tick.
            transaction = connection.transaction(isolation="repeatable_read", readonly=True)
            await transaction.start()
            body_raised = True
            try:
                if not await reads.try_reconciliation_lock(connection):
                    body_raised = False
                    return result(PassOutcome.SKIPPED_LOCK)
                lock_held_from = time.time()
                if await reads.read_paused(connection):
                    body_raised = False
                    return result(PassOutcome.PAUSED)
                snapshot = await reads.read_snapshot(connection, snapshot_parameters(settings, now), bad_rows=bad_rows)
                snapshot, changes = await apply_status_transitions(pool, snapshot, now)
                plan = planner.plan(snapshot, planner_config(settings), now)
                _log_plan_problems(plan, snapshot, problem_log)
                _log_plan_details(plan)
                summary = await executor.execute(
                    pool, plan, now, concurrency=settings.executor_concurrency, observe=observe_action
                )
                body_raised = False
            finally:
                lock_held_until = time.time()
                await _end_lock_transaction(transaction, body_raised)
    except _EXPECTED_FAILURES as error:
        # The database is gone or refused: expected in an outage, so no traceback, one line per pass.
        return result(PassOutcome.FAILED, error=f"{type(error).__name__}: {error}")
    except Exception as error:
        # A bug, not an outage: keep the traceback, fail this pass only.
        log.exception("reconcile.pass_crashed")
        return result(PassOutcome.FAILED, error=f"{type(error).__name__}: {error}")
    outcome = PassOutcome.SUCCESS
    pass_result = result(outcome, snapshot=snapshot, plan=plan, execution=summary, status_changes=changes)
    log.info(
        "reconcile.pass",
        outcome=outcome.value,
        duration_seconds=round(pass_result.duration_seconds, 4),
        lock_held_from=round(lock_held_from, 6),
        lock_held_until=round(lock_held_until, 6),
        **summarize(plan),
        created=summary.created,
        deleted=summary.deleted,
        canceled=summary.canceled,
        creates_clamped=summary.creates_clamped,
        deletes_skipped=summary.deletes_skipped,
        presets_failed=summary.presets_failed,
        newly_hard_limited=len(changes.hard_limited),
        newly_validation_failed=len(changes.validation_failed),
        recovered=len(changes.recovered),
        notifications_enqueued=changes.notifications_enqueued,
        problems=len(plan.problems),
        bad_rows=len(bad_rows),
    )
    return pass_result
