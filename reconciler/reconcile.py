"""One reconciliation pass (BEHAVIOR.md section 1): lock, read a plan, execute it, report.

The pass only orchestrates. Its data goes one way: the snapshot (`store/reads.py`) is planned by the
pure planner (status changes included), and the executor writes the plan; `read_plan` is also what
`reconciler plan` and `reconciler status` show.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import gc
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID

import asyncpg
import structlog

from reconciler import db, executor, planner
from reconciler.admission import Budget
from reconciler.backoff import BackoffStrategy
from reconciler.breaker import BreakerSettings
from reconciler.config import Settings, behaviour_values
from reconciler.durations import format_duration
from reconciler.executor import StatusChanges
from reconciler.expression_compiler import target_expressions
from reconciler.failed_cleanup import CleanupPolicy
from reconciler.memberships import MembershipsOutcome, ensure_prebuilds_memberships_in
from reconciler.plan import (
    BackoffAction,
    CancelPendingAction,
    CreateAction,
    CreateBlock,
    DeleteAction,
    Plan,
    PlanProblem,
    PresetPlan,
)
from reconciler.prebuilds_settings import SettingsKeeper, SettingsRead
from reconciler.problem_log import ProblemLog
from reconciler.problem_log import changes as problem_changes
from reconciler.recorded_settings import instance_name
from reconciler.snapshot import PresetNames, Snapshot, preset_log_fields
from reconciler.store import reads, writes
from reconciler.target import TargetHold

logger = structlog.get_logger(__name__)


class LockLostError(Exception):
    """The connection holding the reconciliation lock broke during the pass."""


class PassDeadlineError(Exception):
    """The pass did not finish within its deadline (RECONCILER_PASS_TIMEOUT)."""


# A pass that fails for one of these is an outcome (one line, no traceback), not a bug.
class SettingsUnreadableError(Exception):
    """`prebuilds_settings` is malformed and this process never read it: there is nothing to go by."""


_EXPECTED_FAILURES: tuple[type[Exception], ...] = (
    *db.SURVIVABLE_ERRORS,
    LockLostError,
    PassDeadlineError,
    SettingsUnreadableError,
)

# A pass past its deadline, or cancelled (a shutdown past its grace), gets this long to end its
# transactions itself; then the connections it still holds are closed, which ends it whatever the
# database does (the server rolls back what they left open).
CLEANUP_SECONDS = 3.0
# While it holds the lock, the pass's lock connection is idle during the executor's writes; the server
# ends that session once it has been idle for the pass's deadline and this margin, so that a replica
# stopped mid-pass does not keep the lock forever. A running pass never reaches it: it ends by its deadline.
LOCK_IDLE_MARGIN = timedelta(seconds=30)

T = TypeVar("T")

# From this many presets, a full pass plans on a thread (see `read_plan`); below, the hop costs more than
# the loop would wait.
PLAN_ON_A_THREAD_FROM = 1000


async def _release_lock(
    connection: db.Connection, body_raised: bool, template_locks: reads.TemplateLocks | None = None
) -> None:
    """Release the session's pass lock (a targeted pass's: its template locks).

    When the connection broke meanwhile, the lock went with it (the server ends the session), so another
    replica may have started a pass: that is reported as a failed pass, unless the pass already failed
    for its own reason, which is then the one reported.
    """
    try:
        if template_locks is None:
            held = await reads.release_reconciliation_lock(connection)
        else:
            held = await reads.release_template_locks(connection, template_locks)
            await reads.limit_idle_session(connection, None)
    except db.SURVIVABLE_ERRORS as error:
        if not body_raised:
            reason = f"{type(error).__name__}: {error}"
            raise LockLostError(f"the connection holding the reconciliation lock was lost: {reason}") from error
        return
    if not held and not body_raised:
        raise LockLostError("the reconciliation lock was no longer held at the end of the pass")


async def _within_deadline(work: Coroutine[Any, Any, T], connections: db.Connections, deadline: timedelta) -> T:
    """Run `work` for at most `deadline`; then, or when the caller is cancelled, end it for sure.

    Ending it: cancel it, give it `CLEANUP_SECONDS` to end its transactions, then close the connections it
    still holds. Each step is bounded, so a pass ends by `deadline` plus twice `CLEANUP_SECONDS` whatever
    the database does.
    """
    task = asyncio.create_task(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=deadline.total_seconds())
    except asyncio.CancelledError:
        await _end(task, connections)
        raise
    if task not in done:
        await _end(task, connections)
        raise PassDeadlineError(f"the pass did not finish within {format_duration(deadline)} (RECONCILER_PASS_TIMEOUT)")
    return task.result()


async def _end(task: asyncio.Task[Any], connections: db.Connections) -> None:
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=CLEANUP_SECONDS)
    if not done:
        logger.warning("reconcile.connections_terminated", connections=connections.terminate())
        done, _ = await asyncio.wait({task}, timeout=CLEANUP_SECONDS)
    if not done:
        logger.error("reconcile.pass_abandoned", reason="still running after its connections were closed")
    elif not task.cancelled():
        # Retrieved, so that asyncio does not report it as never retrieved: the pass already failed.
        task.exception()


async def _while_lock_held(
    work: Coroutine[Any, Any, T], lock_connection: db.Connection, connections: db.Connections
) -> T:
    """Run `work` (the writes) while the lock connection lives; stop it as soon as that connection is lost.

    A lost lock connection (a terminated backend, a reset) means a lost lock, and another replica may
    start a pass at once: the writes stop (each in-flight action's transaction is rolled back) instead of
    going on beside it. The driver reports the loss the moment the server closes the connection; a
    connection that merely stops answering is left to the pass's deadline.
    """
    lost = asyncio.Event()

    def on_lost(_connection: object) -> None:
        lost.set()

    lock_connection.add_termination_listener(on_lost)
    task = asyncio.create_task(work)
    watcher = asyncio.create_task(lost.wait())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        await _end(task, connections)
        raise
    finally:
        watcher.cancel()
        # A lost connection has already dropped its listeners and left the pool.
        with contextlib.suppress(asyncpg.InterfaceError):
            lock_connection.remove_termination_listener(on_lost)
    if task.done():
        return task.result()
    await _end(task, connections)
    raise LockLostError("the connection holding the reconciliation lock was lost mid-pass; the writes were stopped")


class PassOutcome(enum.StrEnum):
    SUCCESS = "success"
    FAILED = "failed"
    SKIPPED_LOCK = "skipped_lock"
    PAUSED = "paused"


@dataclass(frozen=True)
class PassResult:
    run_id: str
    outcome: PassOutcome
    started_at: datetime
    duration_seconds: float
    plan: Plan | None = None
    execution: executor.ExecutionSummary | None = None
    error: str | None = None
    # The prebuilds user's memberships step (BEHAVIOR.md section 7); None when the pass did not get there.
    memberships: MembershipsOutcome | None = None
    # The pass was ended by its deadline (the database did not answer in time), not by its own end.
    deadline_exceeded: bool = False
    # Whether `prebuilds_settings` was malformed; None when the pass did not read it (a lock skip).
    settings_malformed: bool | None = None

    @property
    def snapshot(self) -> Snapshot | None:
        return self.plan.snapshot if self.plan is not None else None

    @property
    def status_changes(self) -> StatusChanges:
        return self.execution.status_changes if self.execution is not None else StatusChanges()


def planner_config(settings: Settings) -> planner.PlannerConfig:
    return planner.PlannerConfig(
        backoff_interval=settings.backoff_interval,
        max_desired_instances=settings.max_desired_instances,
        backoff_strategy=BackoffStrategy(settings.backoff_strategy),
        backoff_max=settings.backoff_max,
        budget=Budget(settings.max_in_flight, settings.max_in_flight_per_template),
        breaker=BreakerSettings(
            enabled=settings.breaker_enabled,
            failure_threshold=settings.breaker_failure_threshold,
            min_builds=settings.breaker_min_builds,
            min_presets=settings.breaker_min_presets,
            window=settings.breaker_window,
            open_duration=settings.breaker_open_duration,
            open_duration_max=settings.breaker_open_duration_max,
            probes=settings.breaker_probes,
        ),
        slow_start=settings.slow_start,
        stabilization_window=settings.target_stabilization_window,
        surge=settings.surge,
        ttl_jitter=settings.ttl_jitter,
        cleanup=CleanupPolicy(keep=settings.failed_prebuilds_keep, keep_for=settings.failed_prebuilds_keep_for),
    )


def snapshot_parameters(settings: Settings, now: datetime) -> reads.SnapshotParameters:
    return reads.SnapshotParameters(
        now=now,
        lookback_start=now - settings.backoff_lookback,
        failure_hard_limit=settings.failure_hard_limit,
        non_retryable_error_codes=settings.non_retryable_error_codes,
        capacity_error_codes=settings.capacity_error_codes,
        # Read whether or not the breaker is enabled: one disabled during an episode is closed, and told.
        breaker_window_start=now - settings.breaker_window,
        slow_start_window_start=now - settings.breaker_window if settings.slow_start else None,
    )


async def read_plan(
    connection: db.Connection,
    settings: Settings,
    now: datetime,
    *,
    bad_rows: list[reads.BadRowError] | None = None,
    template_ids: Sequence[UUID] | None = None,
    holds: Mapping[UUID, TargetHold] | None = None,
) -> Plan:
    """What a pass at `now` decides: the snapshot read on `connection`, planned. Writes nothing.

    With `template_ids`, only the presets of those templates are read and planned (a targeted pass).

    The daemon's pass, `reconciler plan`, `reconciler status` and the tests all read a plan here. The
    snapshot's statements must agree, so they run in the caller's REPEATABLE READ transaction (the pass's,
    under its lock), or in one of their own when the caller has none.

    `holds` is what the daemon's last plan remembered of stabilizing targets (`Plan.holds`); without it
    (the read-only commands), every pool is held at its current size.
    """
    parameters = snapshot_parameters(settings, now)
    if connection.is_in_transaction():
        snapshot = await reads.read_snapshot(connection, parameters, bad_rows=bad_rows, template_ids=template_ids)
    else:
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            snapshot = await reads.read_snapshot(connection, parameters, bad_rows=bad_rows, template_ids=template_ids)
    expressions = target_expressions(preset.desired_instances_expression for preset in snapshot.presets)
    config = planner_config(settings)
    if template_ids is not None or len(snapshot.presets) < PLAN_ON_A_THREAD_FROM:
        return planner.plan(snapshot, config, now, expressions=expressions, holds=holds)
    # A full pass's plan takes a few hundred milliseconds of CPU at fleet L, which would stop the event
    # loop (the change events, the targeted passes that run beside a full one, the scrapes) for as long.
    # The pure planner runs on a thread instead; the interpreter switches between it and the loop.
    return await asyncio.to_thread(planner.plan, snapshot, config, now, expressions=expressions, holds=holds)


def as_read(plan: Plan) -> Plan:
    """The plan without its status changes: what a paused pass shows, since it writes none of them.

    The actions stay (they are what a pass would do once resumed); the presets' statuses are those read.
    """
    if not plan.status_changes and all(preset.status_change is None for preset in plan.presets):
        return plan
    presets = tuple(dataclasses.replace(preset, status_change=None) for preset in plan.presets)
    return dataclasses.replace(plan, presets=presets, status_changes=())


async def _record_settings(pool: db.Acquirer, settings: Settings, now: datetime) -> None:
    """Record the behaviour settings this pass uses, for `plan`, `status` and the other read-only commands.

    Under the pass's lock (so replicas' records do not interleave), on a connection of its own, as the
    pass's other writes are. A role that may not write them (its script not re-run after the upgrade)
    is a warning: the record informs operators, and must not stop reconciliation.
    """
    try:
        async with pool.acquire() as connection:
            await writes.record_settings(connection, behaviour_values(settings), instance_name(), now)
    except asyncpg.InsufficientPrivilegeError as error:
        logger.warning("settings.record_failed", error=f"{type(error).__name__}: {error}")


def remember_holds(holds: dict[UUID, TargetHold], plan: Plan, *, targeted: bool) -> None:
    """Keep what the plan holds for its presets' stabilizing targets; a full pass also forgets the rest
    (presets gone), a targeted one leaves the other templates' holds alone."""
    if not targeted:
        holds.clear()
    for preset_plan in plan.presets:
        holds.pop(preset_plan.preset.id, None)
    holds.update(plan.holds)


BAD_ROW = "snapshot.bad_row"
# A bad row that belongs to no preset (a row ignored) is logged under the nil id.
_NO_PRESET = UUID(int=0)
# How often a state that lasts (creates withheld from a hard-limited preset) is logged again.
STATE_REMINDER = timedelta(minutes=5)
CREATES_SKIPPED_EVENTS = ("preset.creates_skipped_hard_limited", "preset.creates_skipped_validation_failed")


def _bad_row_problem(bad_row: reads.BadRowError) -> PlanProblem:
    return PlanProblem(bad_row.preset_id or _NO_PRESET, BAD_ROW, bad_row.detail)


def _log_plan_problems(
    plan: Plan,
    problem_log: ProblemLog | None,
    *,
    targeted: bool = False,
    bad_rows: Sequence[reads.BadRowError] = (),
) -> None:
    """Each problem once when it appears and once when it clears (every one, without a `problem_log`).

    The snapshot's bad rows are problems too (`snapshot.bad_row`): the same row is bad on every pass. A
    targeted pass saw only some presets: the problems of the others are neither new nor cleared.
    """
    # From the snapshot: a preset the planner failed on is not in the plan; one with a bad row is not in
    # the snapshot either, so its names come with the bad row.
    presets = {preset.id: preset for preset in plan.snapshot.presets} if plan.snapshot is not None else {}
    bad_row_names = {_bad_row_problem(bad_row): bad_row for bad_row in bad_rows}
    current = (*plan.problems, *bad_row_names)
    if problem_log is None:
        found = problem_changes((), current)
    else:
        scope = {*presets, *(problem.preset_id for problem in bad_row_names)} if targeted else None
        found = problem_log.update(current, scope=scope)

    def names(problem: PlanProblem) -> dict[str, str | None]:
        bad_row = bad_row_names.get(problem)
        if bad_row is not None:
            return preset_log_fields(bad_row.names)
        return preset_log_fields(presets.get(problem.preset_id) or PresetNames(problem.preset_id))

    for problem in found.appeared:
        if problem.event == planner.PLAN_FAILED:
            # A bug met data nobody foresaw: an error, with where it happened.
            logger.error(problem.event, **names(problem), detail=problem.detail, traceback=problem.traceback)
        elif problem.event == BAD_ROW:
            bad_row = bad_row_names[problem]
            logger.warning(BAD_ROW, **names(problem), detail=problem.detail, consequence=bad_row.consequence)
        else:
            logger.warning(problem.event, **names(problem), detail=problem.detail)
    for problem in found.cleared:
        logger.info("preset.problem_cleared", **names(problem), problem=problem.event, detail=problem.detail)


def _log_plan_details(plan: Plan, state_log: ProblemLog | None, now: datetime, *, targeted: bool = False) -> None:
    """Creates withheld from hard-limited and validation-failed presets: with a `state_log` (the daemon
    keeps one), once when it starts, a reminder every STATE_REMINDER, and once when it ends; without,
    every pass."""
    states: list[PlanProblem] = []
    withheld: dict[UUID, PresetPlan] = {}
    for preset_plan in plan.presets:
        # For every active preset at the limit, whether or not it wanted a create this time.
        if preset_plan.create_blocked is CreateBlock.HARD_LIMITED or (
            preset_plan.hard_limited and preset_plan.preset.active and preset_plan.create_blocked is None
        ):
            event = CREATES_SKIPPED_EVENTS[0]
        elif preset_plan.create_blocked is CreateBlock.VALIDATION_FAILED:
            event = CREATES_SKIPPED_EVENTS[1]
        else:
            continue
        # No detail: how many creates are withheld changes from pass to pass; the state does not.
        states.append(PlanProblem(preset_plan.preset.id, event, ""))
        withheld[preset_plan.preset.id] = preset_plan
    if state_log is None:
        found = problem_changes((), states)
    else:
        scope = {preset_plan.preset.id for preset_plan in plan.presets} if targeted else None
        found = state_log.update(states, scope=scope, now=now)
    for state in found.appeared:
        preset_plan = withheld[state.preset_id]
        logger.warning(
            state.event, **preset_log_fields(preset_plan.preset), creates_withheld=preset_plan.creates_withheld
        )
    for state in found.reminded:
        preset_plan = withheld[state.preset_id]
        logger.warning(
            state.event,
            **preset_log_fields(preset_plan.preset),
            creates_withheld=preset_plan.creates_withheld,
            reminder=True,
        )
    presets = {preset.id: preset for preset in plan.snapshot.presets} if plan.snapshot is not None else {}
    for state in found.cleared:
        preset = presets.get(state.preset_id) or PresetNames(state.preset_id)
        logger.info("preset.creates_resumed", **preset_log_fields(preset), state=state.event)


def _log_malformed_settings(log: structlog.typing.FilteringBoundLogger, settings_read: SettingsRead) -> None:
    """Every pass while it lasts, at error level: the operator wrote something and it is not obeyed."""
    if settings_read.settings is None:
        acting_on = "nothing read yet: not reconciling until it is readable"
    else:
        state = "paused" if settings_read.settings.reconciliation_paused else "not paused"
        acting_on = f"the last value read successfully: {state}"
    log.error("prebuilds_settings.malformed", detail=settings_read.malformed, acting_on=acting_on)


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
        # Held back by the in-flight budget (or the breaker) when the plan was made.
        "creates_held": 0,
        "deletes_held": 0,
    }
    for preset_plan in plan.presets:
        counts["presets_with_actions"] += bool(preset_plan.actions)
        counts["hard_limited"] += preset_plan.hard_limited
        counts["creates_held"] += preset_plan.creates_held
        counts["deletes_held"] += preset_plan.deletes_held
        for action in preset_plan.actions:
            match action:
                case BackoffAction():
                    counts["backoff"] += 1
                case CreateAction(count=count):
                    counts["to_create"] += count
                case DeleteAction(workspace_ids=workspace_ids):
                    counts["to_delete"] += len(workspace_ids)
                case CancelPendingAction(count=count):
                    counts["to_cancel"] += count
    return counts


async def run_pass(
    pool: asyncpg.Pool,
    settings: Settings,
    now: datetime,
    *,
    run_id: str | None = None,
    observe_action: executor.ActionObserver | None = None,
    problem_log: ProblemLog | None = None,
    template_ids: Sequence[UUID] | None = None,
    settings_keeper: SettingsKeeper | None = None,
    holds: dict[UUID, TargetHold] | None = None,
    state_log: ProblemLog | None = None,
    superseded: Callable[[UUID], bool] | None = None,
    on_templates_locked: Callable[[frozenset[UUID]], None] | None = None,
) -> PassResult:
    """Run one pass. Never raises for database trouble: a failed pass is an outcome, retried next time.

    With `template_ids` it is a targeted pass (BEHAVIOR.md, "Change events"): the same statements and
    rules as a full pass, for the presets of those templates only. It holds those templates' locks, not
    the pass lock, so it runs beside a full pass, which writes each preset under its template's lock and
    defers what a targeted pass holds (docs/DECISIONS.md, "Targeted passes beside full passes"); it
    calls `on_templates_locked` once it holds them. A full pass also defers the templates `superseded`
    names when it comes to write them (the daemon's: those a targeted pass took since its snapshot).

    Every event logged during the pass, by any module (the executor's included), carries its `run_id`.
    With a `problem_log` (the daemon keeps one), the plan's problems are logged when they appear and when
    they clear; without, every one is logged. With a `settings_keeper` (the daemon keeps one), a malformed
    `prebuilds_settings` falls back to the last value it read; without, the pass fails (nothing to go by).
    With `holds` (the daemon keeps them too), stabilizing targets are remembered from one pass to the
    next: the plan reads them and the pass keeps the plan's.
    With a `state_log` (the daemon keeps one), creates withheld from a limited preset are logged when that
    starts and ends, with a reminder every STATE_REMINDER; without, on every pass.
    """
    run_id = run_id or uuid.uuid4().hex[:12]
    with structlog.contextvars.bound_contextvars(run_id=run_id), _cyclic_gc_paused():
        return await _run_pass(
            pool,
            settings,
            now,
            run_id,
            observe_action,
            problem_log,
            template_ids,
            settings_keeper,
            holds,
            state_log,
            superseded,
            on_templates_locked,
        )


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
    template_ids: Sequence[UUID] | None,
    settings_keeper: SettingsKeeper | None,
    holds: dict[UUID, TargetHold] | None,
    state_log: ProblemLog | None,
    superseded: Callable[[UUID], bool] | None,
    on_templates_locked: Callable[[frozenset[UUID]], None] | None,
) -> PassResult:
    started = time.perf_counter()
    targeted = template_ids is not None
    scope: dict[str, object] = {"scope": "full"}
    if template_ids is not None:
        scope = {"scope": "targeted", "templates": len(template_ids), "template_ids": sorted(map(str, template_ids))}
    log = logger.bind(run_id=run_id)

    def result(
        outcome: PassOutcome,
        *,
        plan: Plan | None = None,
        execution: executor.ExecutionSummary | None = None,
        error: str | None = None,
        deadline_exceeded: bool = False,
    ) -> PassResult:
        pass_result = PassResult(
            run_id=run_id,
            outcome=outcome,
            started_at=now,
            duration_seconds=time.perf_counter() - started,
            plan=plan,
            execution=execution,
            error=error,
            memberships=memberships,
            deadline_exceeded=deadline_exceeded,
            settings_malformed=settings_malformed,
        )
        if outcome is not PassOutcome.SUCCESS:
            # The canonical event of a pass that did not reconcile; a lock skip is routine, hence debug.
            level = {PassOutcome.FAILED: log.error, PassOutcome.PAUSED: log.info}.get(outcome, log.debug)
            level(
                "reconcile.pass",
                **scope,
                outcome=outcome.value,
                error=pass_result.error,
                duration_seconds=round(pass_result.duration_seconds, 4),
            )
        return pass_result

    bad_rows: list[reads.BadRowError] = []
    memberships: MembershipsOutcome | None = None
    settings_malformed: bool | None = None
    # When this pass held the reconciliation lock, in wall-clock seconds: read after the lock was granted
    # and before it is released, so the interval lies within the real one. Logged, so that replicas'
    # passes can be shown never to overlap (a pass's duration also covers waiting for a connection, and
    # its event is written after the lock is released).
    lock_held_from = lock_held_until = 0.0
    # Every connection of the pass, the executor's included, is borrowed through these, with a deadline
    # on the wait for a free one, and can be closed at once when the pass must end.
    connections = db.Connections(pool, acquire_timeout=settings.pass_timeout)

    async def locked_pass() -> tuple[PassOutcome, Plan | None, executor.ExecutionSummary | None]:
        nonlocal lock_held_from, lock_held_until, memberships, settings_malformed
        async with connections.acquire() as connection:
            # A session lock on this connection, outside any transaction: it holds however long the
            # executor writes on other connections (a transaction's lock would sit idle in its
            # transaction meanwhile, and be ended by idle_in_transaction_session_timeout). It is released
            # at the end of the pass, by the pool's reset if that release is skipped, and by the server
            # when this process dies or the connection is closed, so another replica can take over.
            template_locks: reads.TemplateLocks | None = None
            if template_ids is None:
                if not await reads.try_reconciliation_lock(connection, settings.pass_timeout + LOCK_IDLE_MARGIN):
                    return PassOutcome.SKIPPED_LOCK, None, None
            else:
                # A targeted pass: its templates' locks, all or none, held the same way (a session's,
                # idle-limited). Held by a full pass's write or another replica's targeted pass: skipped,
                # and the caller tries again shortly.
                template_locks = await reads.try_template_locks(connection, template_ids)
                if template_locks.granted != frozenset(template_ids):
                    await reads.release_template_locks(connection, template_locks)
                    return PassOutcome.SKIPPED_LOCK, None, None
                await reads.limit_idle_session(connection, settings.pass_timeout + LOCK_IDLE_MARGIN)
                if on_templates_locked is not None:
                    on_templates_locked(template_locks.granted)
            lock_held_from = time.time()
            body_raised = True
            try:
                settings_read = (settings_keeper or SettingsKeeper()).read(
                    await reads.read_prebuilds_settings(connection)
                )
                settings_malformed = settings_read.malformed is not None
                if settings_read.malformed is not None:
                    _log_malformed_settings(log, settings_read)
                if settings_read.settings is None:
                    body_raised = False
                    raise SettingsUnreadableError(
                        f"prebuilds_settings is malformed ({settings_read.malformed}) and no earlier value "
                        "was read: not reconciling until it is readable"
                    )
                paused = settings_read.settings.reconciliation_paused
                if not paused:
                    # Paused, the daemon writes nothing: not even this record (issue 11.5). A targeted pass
                    # leaves it to the full ones: it uses the same settings.
                    if not targeted:
                        await _record_settings(connections, settings, now)
                    # Before the snapshot, as Coder does, so that the prebuilds this pass creates in a new
                    # organization have an owner who belongs there. Confined: it never fails the pass.
                    memberships = await ensure_prebuilds_memberships_in(connections, template_ids)
                async with connection.transaction(isolation="repeatable_read", readonly=True):
                    plan = await read_plan(
                        connection, settings, now, bad_rows=bad_rows, template_ids=template_ids, holds=holds
                    )
                if holds is not None:
                    remember_holds(holds, plan, targeted=targeted)
                _log_plan_problems(plan, problem_log, targeted=targeted, bad_rows=bad_rows)
                if paused:
                    # Paused: read and plan as usual, so the gauges stay current, but write nothing.
                    body_raised = False
                    return PassOutcome.PAUSED, as_read(plan), None
                _log_plan_details(plan, state_log, now, targeted=targeted)
                summary = await _while_lock_held(
                    executor.execute(
                        connections,
                        plan,
                        now,
                        concurrency=settings.executor_concurrency,
                        observe=observe_action,
                        template_locks=not targeted,
                        superseded=superseded,
                        write_breaker_change=not targeted,
                    ),
                    connection,
                    connections,
                )
                body_raised = False
            finally:
                lock_held_until = time.time()
                await _release_lock(connection, body_raised, template_locks)
        return PassOutcome.SUCCESS, plan, summary

    try:
        outcome, plan_read, execution = await _within_deadline(locked_pass(), connections, settings.pass_timeout)
    except _EXPECTED_FAILURES as error:
        # The database is gone, refused or did not answer: expected in an outage, so no traceback, one
        # line per pass.
        return result(
            PassOutcome.FAILED,
            error=f"{type(error).__name__}: {error}",
            deadline_exceeded=isinstance(error, PassDeadlineError),
        )
    except Exception as error:
        # A bug, not an outage: keep the traceback, fail this pass only.
        log.exception("reconcile.pass_crashed")
        return result(PassOutcome.FAILED, error=f"{type(error).__name__}: {error}")
    if outcome is not PassOutcome.SUCCESS or plan_read is None or execution is None:
        return result(outcome, plan=plan_read)
    plan, summary = plan_read, execution
    outcome = PassOutcome.SUCCESS
    if not targeted:
        # The collection this pass deferred (`_cyclic_gc_paused`), now and counted in its duration, rather
        # than set off by the first allocations after it: a full collection at fleet L holds the
        # interpreter for ~140 ms, and those allocations were the metrics' render and the first scrape
        # after the pass, which waited for it. A targeted pass is too small to leave much behind.
        gc.collect()
    pass_result = result(outcome, plan=plan, execution=summary)
    changes = summary.status_changes
    log.info(
        "reconcile.pass",
        **scope,
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
        budget_held=summary.budget_held,
        breaker_state=plan.breaker.record.state.value if plan.breaker is not None else "closed",
        presets_failed=summary.presets_failed,
        presets_deferred=summary.presets_deferred,
        status_changes_deferred=changes.deferred,
        newly_hard_limited=len(changes.hard_limited),
        newly_validation_failed=len(changes.validation_failed),
        recovered=len(changes.recovered),
        notifications_enqueued=changes.notifications_enqueued,
        problems=len(plan.problems),
        bad_rows=len(bad_rows),
        memberships_added=sum(len(each.added) for each in memberships.added) if memberships else 0,
        membership_failures=len(memberships.failures) if memberships else 0,
    )
    return pass_result
