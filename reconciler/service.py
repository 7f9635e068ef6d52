"""The daemon: scheduler, passes, HTTP, health, systemd notifications, and an ordered shutdown.

Start order: HTTP (so health answers while we wait), heartbeat, database (retried until it answers and
the schema is current), scheduler (first pass at once), background tasks, then READY=1. Stop order: no
new passes, the pass in flight and the notification poll in flight get `shutdown_grace` to finish (then
they are cancelled: every write is one transaction, so nothing is left half done), background tasks,
pool, HTTP.

Every background task is supervised: one that ends while the daemon is not stopping is logged with its
traceback and, by its policy, either restarted with backoff or turned into a stop of the whole daemon
with exit code 1 (see `TaskPolicy` and the README's "Operations").
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import os
import random
import signal
import time
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import structlog
from aiohttp import web
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client import CollectorRegistry

from reconciler import db
from reconciler.claim_event_counters import ClaimEventCounters
from reconciler.clock import utc_now
from reconciler.config import Settings
from reconciler.counters import PrebuildCounters
from reconciler.events import Batch, EventListener, PendingChanges
from reconciler.http import HealthState, HttpBindError, Readiness, bound_port, build_application, start_http
from reconciler.metrics import Metrics, PreparedPresets
from reconciler.notify.dispatcher import Dispatcher
from reconciler.prebuilds_settings import SettingsKeeper
from reconciler.problem_log import ProblemLog
from reconciler.reconcile import STATE_REMINDER, PassOutcome, PassResult, run_pass
from reconciler.sdnotify import SystemdNotifier
from reconciler.store import claim_events, reads, totals, writes
from reconciler.target import TargetHold

logger = structlog.get_logger(__name__)

HEARTBEAT_SECONDS = 1.0
READINESS_PROBE_SECONDS = 5.0
DATABASE_RETRY_SECONDS = (1.0, 2.0, 5.0, 10.0)
TOTALS_REFRESH_SECONDS = 60.0
# How often old claim events are purged (RECONCILER_PREBUILD_EVENTS_RETENTION): the retention is days,
# so minutes of delay cost nothing, and each round deletes whatever accumulated meanwhile.
EVENTS_PURGE_SECONDS = 300.0
# A restarted task waits 1, 2, 4 ... seconds, at most a minute; a task that ran this long before it
# ended starts the count afresh.
TASK_RESTART_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0)
TASK_HEALTHY_SECONDS = 300.0
# /healthz says the loop is stuck when no pass has ended by itself (succeeded, skipped, paused, or failed
# with the database's answer) for the interval, the pass deadline and this: a pass waiting past its
# deadline and its cleanup, a scheduler that stopped, or passes that are all cut by their deadline.
STUCK_MARGIN_SECONDS = 10.0
# A stop ends within the shutdown grace plus at most the sum of these, whatever the database does: the
# work in flight, cancelled after the grace, ends its transactions (the pass closes its connections
# after 3 s); the background tasks end; the pool closes, or is terminated; the HTTP server stops.
STOP_CANCEL_SECONDS = 4.0
STOP_TASKS_SECONDS = 2.0
STOP_POOL_SECONDS = 2.0
# A targeted pass that found the pass lock taken (another replica's pass) tries again after 0.05 s, then
# twice as long each time, at most a second apart.
EVENT_LOCK_RETRY_SECONDS = 0.05

PassListener = Callable[[PassResult], None]
TaskFactory = Callable[[], Coroutine[Any, Any, None]]


class TaskPolicy(enum.Enum):
    """What the daemon does when a background task ends while it is not stopping."""

    # Restart it after a backoff: its state lives in the database or is rebuilt on its next round, so a
    # fresh copy is what a restarted process would run, without losing the passes meanwhile.
    RESTART = "restart"
    # Stop the daemon, exit 1: the task *is* a liveness signal to the outside (heartbeat, systemd
    # watchdog). It cannot fail by anything but a bug, and a process that kept running without it would
    # report itself dead (a stale /healthz) or be killed by systemd without a word: better to say why
    # and exit, and let systemd or the orchestrator start a fresh process.
    FATAL = "fatal"


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        notifier: SystemdNotifier | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics(registry)
        self.metrics.interval.set(settings.reconciliation_interval.total_seconds())
        self.notifier = notifier or SystemdNotifier()
        self.clock = clock
        self.readiness = Readiness()
        # The plan's data problems this process has logged: each is logged once, not on every pass.
        self.problem_log = ProblemLog()
        # Creates withheld from limited presets: logged when that starts and ends, reminded every few minutes.
        self.state_log = ProblemLog(remind_every=STATE_REMINDER)
        # The last `prebuilds_settings` read successfully, for the passes to fall back on.
        self.settings_keeper = SettingsKeeper()
        # The created/failed/claimed counters, kept across refreshes (they never go down in a process).
        self.counters = PrebuildCounters()
        # The claim/miss counters from the platform's claim events, refreshed with them.
        self.claim_event_counters = ClaimEventCounters()
        # One refresh at a time: the loop's and a caller's (a test's) would read the same window twice.
        self._totals_lock = asyncio.Lock()
        # Stabilizing targets, from one pass to the next (BEHAVIOR.md 2.1); lost on restart, which holds
        # every pool at its size for one window.
        self.target_holds: dict[UUID, TargetHold] = {}
        self.last_pass: PassResult | None = None
        self.pass_listeners: list[PassListener] = []
        self._heartbeat = time.time()
        # When a pass last ended by itself (monotonic): see STUCK_MARGIN_SECONDS. None before the passes start.
        self._last_progress: float | None = None
        self._pool: asyncpg.Pool | None = None
        self._connecting_pool: asyncpg.Pool | None = None
        self._scheduler: AsyncIOScheduler | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._task_failures: dict[str, int] = {}
        self._pass_task: asyncio.Task[Any] | None = None
        self._stopping = False
        self._stopped = asyncio.Event()
        # Set when the daemon begins to stop: the dispatcher finishes its poll and returns.
        self._stop_requested = asyncio.Event()
        # Set when a FATAL task ended: `serve` stops the daemon and exits with `exit_code`.
        self.failed = asyncio.Event()
        self.exit_code = 0
        self.dispatcher: Dispatcher | None = None
        self._stop_started = False
        # Full passes of this process one at a time, and targeted ones one at a time; a targeted pass runs
        # beside a full one, kept off the presets it acts on by the template locks (docs/DECISIONS.md,
        # "Targeted passes beside full passes"). The database's locks keep replicas apart the same way.
        self._pass_lock = asyncio.Lock()
        self._targeted_lock = asyncio.Lock()
        # When a targeted pass last took each template's lock (a count, not a time): a full pass whose
        # snapshot is older leaves those templates' presets to the next pass.
        self._template_taken: dict[UUID, int] = {}
        self._takes = itertools.count(1)
        # Change events (BEHAVIOR.md, "Change events"): gathered here, run as targeted passes.
        self.pending_changes = PendingChanges()
        self.event_listener: EventListener | None = None
        self._listening = False
        # Told of every targeted pass (a partial plan: not for the per-preset series or `last_pass`).
        self.targeted_pass_listeners: list[PassListener] = []
        self.last_targeted_pass: PassResult | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        assert self._runner is not None, "the daemon is not started"
        host = self.settings.http_host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{bound_port(self._runner)}"

    async def start(self) -> None:
        """Start everything; waits (retrying) for the database. Raises HttpBindError if the port is taken."""
        health = HealthState(readiness=self.readiness, heartbeat=lambda: self._heartbeat, stuck=self.stuck_reason)
        self._runner = await start_http(
            build_application(self.metrics, health), self.settings.http_host, self.settings.http_port
        )
        self._spawn("heartbeat", self._heartbeat_loop, TaskPolicy.FATAL)
        watchdog_interval = self.notifier.watchdog_interval_seconds
        if watchdog_interval:
            self._spawn("watchdog", lambda: self._watchdog_loop(watchdog_interval), TaskPolicy.FATAL)
        self.notifier.status("waiting for the database")
        await self._connect_database()
        self._start_scheduler()
        self._start_notifications()
        if self.settings.events_enabled:
            self._start_events()
        self._spawn("readiness", self._readiness_loop, TaskPolicy.RESTART)
        self._spawn("totals", self._totals_loop, TaskPolicy.RESTART)
        self._spawn("events_purge", self._events_purge_loop, TaskPolicy.RESTART)
        logger.info(
            "daemon.started",
            http=self.http_url,
            interval_seconds=self.settings.reconciliation_interval.total_seconds(),
            events=self.settings.events_enabled,
            pid=os.getpid(),
        )
        self.notifier.ready(status="reconciling")

    async def stop(self) -> None:
        """Ordered, bounded and idempotent: a second call waits for the first."""
        if self._stop_started:
            await self._stopped.wait()
            return
        self._stop_started = True
        self._stopping = True
        self._stop_requested.set()
        self.notifier.stopping()
        logger.info("daemon.stopping")
        try:
            if self._scheduler is not None and self._scheduler.running:
                # No new passes from here on; the one in flight may finish.
                self._scheduler.pause()
            await self._finish_work_in_flight()
            if self._scheduler is not None and self._scheduler.running:
                self._scheduler.shutdown(wait=False)
            for task in self._tasks.values():
                task.cancel()
            tasks = [task for task in self._tasks.values() if not task.done()]
            if tasks:
                # A task cancelled amid a database call ends it politely (a cancel request, the pool's
                # reset), which waits on a database that stopped answering: the pool's end cuts that.
                _, pending = await asyncio.wait(tasks, timeout=STOP_TASKS_SECONDS)
                if pending:
                    logger.warning("daemon.tasks_not_stopped", tasks=sorted(task.get_name() for task in pending))
            if self._pool is not None:
                try:
                    await asyncio.wait_for(self._pool.close(), timeout=STOP_POOL_SECONDS)
                except db.SURVIVABLE_ERRORS:  # TimeoutError among them
                    # Closed without a word to the server, which rolls back what was left open.
                    self._pool.terminate()
            if self._runner is not None:
                await self._runner.cleanup()
        finally:
            self.notifier.close()
            self._stopped.set()
            logger.info("daemon.stopped")

    async def cancel_start(self, starting: asyncio.Task[None]) -> None:
        """Cancel a `start()` still under way, within a bound whatever the database does.

        A start cut in its schema check against a database that stopped answering would wait on the
        query's cancel request and the pool's reset: after `STOP_TASKS_SECONDS` the pool being tried is
        terminated, which ends those waits.
        """
        starting.cancel()
        done, _ = await asyncio.wait({starting}, timeout=STOP_TASKS_SECONDS)
        if not done:
            for pool in (self._connecting_pool, self._pool):
                if pool is not None:
                    pool.terminate()
            done, _ = await asyncio.wait({starting}, timeout=STOP_TASKS_SECONDS)
        if not done:
            logger.warning("daemon.tasks_not_stopped", tasks=[starting.get_name()])
            return
        error = None if starting.cancelled() else starting.exception()
        if error is not None:
            logger.warning("daemon.start_failed", error=db.describe_error(error))

    async def _finish_work_in_flight(self) -> None:
        """The pass in flight and the dispatcher (whose stop event is set) share one grace period."""
        grace = self.settings.shutdown_grace.total_seconds()
        pass_task = self._pass_task if self._pass_task is not None and not self._pass_task.done() else None
        dispatcher_task = self._tasks.get("notifications")
        # The events task returns once its pass in flight (if any) is done.
        events_task = self._tasks.get("events")
        waiting = {task for task in (pass_task, dispatcher_task, events_task) if task is not None and not task.done()}
        if not waiting:
            return
        if pass_task is not None:
            logger.info("daemon.waiting_for_pass", grace_seconds=grace)
        _, pending = await asyncio.wait(waiting, timeout=grace)
        if pass_task in pending:
            logger.warning("daemon.pass_cancelled", reason="shutdown grace period elapsed")
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=STOP_CANCEL_SECONDS)

    # --- supervision ----------------------------------------------------------------------------

    def _spawn(self, name: str, factory: TaskFactory, policy: TaskPolicy, *, delay: float = 0.0) -> None:
        """Run `factory()` as the task `name`, watched: see `_on_task_done`."""

        async def run() -> None:
            if delay:
                await asyncio.sleep(delay)
            await factory()

        started = asyncio.get_running_loop().time() + delay
        task = asyncio.create_task(run(), name=f"reconciler-{name}")
        self._tasks[name] = task
        task.add_done_callback(lambda finished: self._on_task_done(name, factory, policy, started, finished))

    def _on_task_done(
        self, name: str, factory: TaskFactory, policy: TaskPolicy, started: float, task: asyncio.Task[None]
    ) -> None:
        if self._stopping:
            return  # stopping: every end is expected
        error = None if task.cancelled() else task.exception()
        if task.cancelled():
            how = "cancelled"
        elif error is None:
            how = "returned"
        else:
            how = "raised"
        self.metrics.task_failures.labels(name).inc()
        if policy is TaskPolicy.FATAL:
            logger.critical(
                "daemon.task_failed", task=name, ended=how, action="stop", exc_info=error if error else False
            )
            self.exit_code = 1
            self.failed.set()
            return
        if asyncio.get_running_loop().time() - started >= TASK_HEALTHY_SECONDS:
            self._task_failures[name] = 0
        failures = self._task_failures.get(name, 0)
        self._task_failures[name] = failures + 1
        delay = TASK_RESTART_SECONDS[min(failures, len(TASK_RESTART_SECONDS) - 1)]
        logger.error(
            "daemon.task_failed",
            task=name,
            ended=how,
            action="restart",
            restart_in_seconds=delay,
            exc_info=error if error else False,
        )
        if name == "readiness":
            # Readiness is this task's answer: while it is down, /readyz must not keep its last one.
            self._set_not_ready(f"the readiness probe failed and restarts in {delay:g}s")
        self._spawn(name, factory, policy, delay=delay)

    # --- database -------------------------------------------------------------------------------

    async def _connect_database(self) -> None:
        attempt = 0
        while True:
            pool: asyncpg.Pool | None = None
            try:
                pool = await db.create_pool(
                    self.settings.database_url.get_secret_value() if self.settings.database_url else "",
                    max_size=self.settings.pool_max_size,
                    statement_timeout=self.settings.statement_timeout,
                    connect_timeout=self.settings.connect_timeout,
                )
                # Not the daemon's yet, but a stop during start-up must be able to cut it: `cancel_start`.
                self._connecting_pool = pool
                async with pool.acquire(timeout=self.settings.connect_timeout.total_seconds()) as connection:
                    current, reason = await db.schema_is_current(connection)
                if current:
                    self._pool = pool
                    self.readiness.ready, self.readiness.reason = True, ""
                    self.metrics.ready.set(1)
                    if attempt:
                        logger.info("database.available", attempts=attempt + 1)
                    return
                self._set_not_ready(f"schema not ready: {reason}")
            except db.SURVIVABLE_ERRORS as error:
                self.metrics.database_errors.inc()
                self._set_not_ready(f"database unreachable: {db.describe_error(error)}")
            finally:
                self._connecting_pool = None
                if pool is not None and pool is not self._pool:
                    # Not kept (and not left behind, as a failed attempt's pool was): closed without a
                    # word, since a polite close would wait on a database that may not answer.
                    pool.terminate()
            delay = DATABASE_RETRY_SECONDS[min(attempt, len(DATABASE_RETRY_SECONDS) - 1)]
            attempt += 1
            await asyncio.sleep(delay)

    def _set_not_ready(self, reason: str) -> None:
        # Log transitions, not every probe: an outage gives one line, not a flood.
        if self.readiness.ready or self.readiness.reason != reason:
            logger.error("daemon.not_ready", reason=reason)
        self.readiness.ready, self.readiness.reason = False, reason
        self.metrics.ready.set(0)

    def _set_ready(self) -> None:
        if not self.readiness.ready:
            logger.info("daemon.ready")
        self.readiness.ready, self.readiness.reason = True, ""
        self.metrics.ready.set(1)

    async def _probe_database(self) -> None:
        assert self._pool is not None
        try:
            async with self._pool.acquire(timeout=READINESS_PROBE_SECONDS) as connection:
                current, reason = await asyncio.wait_for(
                    db.schema_is_current(connection), timeout=READINESS_PROBE_SECONDS
                )
        except db.SURVIVABLE_ERRORS as error:
            self.metrics.database_errors.inc()
            self._set_not_ready(f"database unreachable: {db.describe_error(error)}")
            return
        if current:
            self._set_ready()
        else:
            self._set_not_ready(f"schema not ready: {reason}")

    def stuck_reason(self, now: float | None = None) -> str | None:
        """Why /healthz should say the reconciliation loop is stuck at `now` (monotonic), or None (see
        STUCK_MARGIN_SECONDS)."""
        if self._last_progress is None or self._stopping:
            return None
        limit = (
            self.settings.reconciliation_interval.total_seconds()
            + self.settings.pass_timeout.total_seconds()
            + STUCK_MARGIN_SECONDS
        )
        since = (time.monotonic() if now is None else now) - self._last_progress
        if since <= limit:
            return None
        return f"no pass has ended by itself for {since:.0f}s (limit {limit:.0f}s)"

    # --- background loops -----------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            self._heartbeat = time.time()
            self.metrics.heartbeat.set(self._heartbeat)
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def _watchdog_loop(self, interval: float) -> None:
        # Pinged from the event loop itself: if the loop stalls, systemd stops hearing from us.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _readiness_loop(self) -> None:
        while True:
            await asyncio.sleep(READINESS_PROBE_SECONDS)
            await self._probe_database()

    async def _totals_loop(self) -> None:
        """Refresh the lifetime counters beside the passes (`reconciler.counters`): the whole history once,
        then what changed since the last refresh, once a minute."""
        while True:
            if self._pool is None:
                await asyncio.sleep(1.0)
                continue
            try:
                await self.refresh_totals()
            except db.SURVIVABLE_ERRORS as error:
                self.metrics.database_errors.inc()
                logger.warning("metrics.totals_failed", error=db.describe_error(error))
            await asyncio.sleep(TOTALS_REFRESH_SECONDS)

    async def refresh_totals(self) -> bool:
        """One refresh of the lifetime counters (the loop's; tests call it). True when it read everything."""
        assert self._pool is not None
        started = time.perf_counter()
        # A connection comes free within a statement's client-side deadline (every call has one): waiting
        # longer means the database stopped answering.
        acquire_timeout = (self.settings.statement_timeout + db.REPLY_MARGIN).total_seconds()
        async with self._totals_lock, self._pool.acquire(timeout=acquire_timeout) as connection:
            full = await totals.refresh(connection, self.counters)
            await claim_events.refresh(connection, self.claim_event_counters)
        self.claim_event_counters.publish(self.counters.labels)
        self.metrics.presets.update_totals(self.counters.by_labels(), render=False)
        self.metrics.presets.update_claim_events(self.claim_event_counters.by_labels())
        logger.debug(
            "metrics.totals_refreshed",
            full=full,
            duration_seconds=round(time.perf_counter() - started, 4),
            tracked_builds=self.counters.tracked_builds,
            remembered_claim_events=self.claim_event_counters.remembered_events,
        )
        return full

    async def _events_purge_loop(self) -> None:
        while True:
            await self.purge_events_now()
            await asyncio.sleep(EVENTS_PURGE_SECONDS)

    async def purge_events_now(self) -> int:
        """Purge claim events older than the retention (the loop's job; tests call it directly)."""
        if self._pool is None:
            return 0
        older_than = self.clock() - self.settings.prebuild_events_retention
        try:
            async with self._pool.acquire() as connection:
                purged = await writes.purge_prebuild_events(connection, older_than)
        except db.SURVIVABLE_ERRORS as error:
            self.metrics.database_errors.inc()
            logger.warning("events.purge_failed", error=db.describe_error(error))
            return 0
        if purged:
            logger.info("events.purged", purged=purged, older_than=older_than.isoformat())
        return purged

    def _start_notifications(self) -> None:
        """Deliver the outbox beside the passes. `stop()` sets the stop event: the poll in flight finishes
        within the shutdown grace, or is cancelled then (a message in flight keeps its lease and is retried
        once the lease runs out, so nothing is lost)."""
        assert self._pool is not None
        dispatcher = Dispatcher(self._pool, self.settings, self.metrics.notifications, clock=self.clock)
        self.dispatcher = dispatcher
        enqueued = self.metrics.notifications.enqueued
        self.pass_listeners.append(lambda result: enqueued.inc(result.status_changes.notifications_enqueued))
        self.targeted_pass_listeners.append(lambda result: enqueued.inc(result.status_changes.notifications_enqueued))
        self._spawn("notifications", lambda: dispatcher.run(self._stop_requested), TaskPolicy.RESTART)

    # --- passes ---------------------------------------------------------------------------------

    def _start_scheduler(self) -> None:
        interval = self.settings.reconciliation_interval.total_seconds()
        scheduler = AsyncIOScheduler(timezone=UTC)
        scheduler.add_job(
            self._pass_job,
            IntervalTrigger(seconds=interval, timezone=UTC),
            id="reconcile",
            name="reconciliation pass",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, int(interval)),
            # The first pass runs at start-up, not one interval later.
            next_run_time=datetime.now(UTC),
        )
        scheduler.add_listener(self._on_scheduler_event, EVENT_JOB_MISSED | EVENT_JOB_ERROR | EVENT_JOB_MAX_INSTANCES)
        scheduler.start()
        self._scheduler = scheduler
        self._last_progress = time.monotonic()

    def _on_scheduler_event(self, event: JobExecutionEvent) -> None:
        name = {EVENT_JOB_MISSED: "missed", EVENT_JOB_ERROR: "error", EVENT_JOB_MAX_INSTANCES: "max_instances"}.get(
            event.code, "other"
        )
        self.metrics.scheduler_events.labels(name).inc()
        if name == "error" and not isinstance(event.exception, asyncio.CancelledError):
            logger.error("scheduler.job_failed", error=repr(event.exception))
        else:
            # Not `event=`: structlog's first argument is the event.
            logger.info("scheduler.event", scheduler_event=name)

    async def _pass_job(self) -> None:
        if self._stopping or self._pool is None:
            return
        self._pass_task = asyncio.current_task()
        try:
            result = await self.run_pass_now()
            if result.outcome is PassOutcome.SKIPPED_LOCK:
                self._shift_ticks()
            await self.refresh_pending_jobs()
        finally:
            self._pass_task = None
        del result

    def _shift_ticks(self) -> None:
        """Move this replica's ticks to a random moment of the interval after a tick lost the pass lock.

        Replicas started together tick together: the one that comes a few milliseconds later finds the
        other's pass holding the lock on every tick, for as long as a pass lasts longer than that offset,
        and never plans (its per-preset series stay withdrawn). A new random phase after each lost tick
        ends that lockstep within a few ticks; the fleet is reconciled either way."""
        if self._scheduler is None or not self._scheduler.running:
            return
        interval = self.settings.reconciliation_interval.total_seconds()
        next_tick = datetime.now(UTC) + timedelta(seconds=random.uniform(0.0, interval))
        self._scheduler.modify_job("reconcile", next_run_time=next_tick)
        logger.debug("scheduler.ticks_shifted", next_tick=next_tick.isoformat())

    async def refresh_pending_jobs(self) -> None:
        """The oldest unstarted prebuild job per organization, read after every pass (beside it, not in it:
        it says what the provisioners do, not what the pass decides) with a deadline of its own."""
        assert self._pool is not None
        try:
            async with asyncio.timeout(self.settings.statement_timeout.total_seconds()):
                async with self._pool.acquire() as connection:
                    ages = await reads.read_oldest_pending_prebuild_jobs(connection, self.clock())
        except db.SURVIVABLE_ERRORS as error:
            self.metrics.database_errors.inc()
            logger.warning("metrics.pending_jobs_failed", error=db.describe_error(error))
            return
        self.metrics.set_oldest_pending_jobs(ages)

    async def _run_pass(self, template_ids: list[uuid.UUID] | None) -> PassResult:
        """A full pass (no template ids) or a targeted one, with the state the daemon keeps between passes.

        Full passes run one at a time, and so do targeted ones; a targeted pass does not wait for a full
        one. A full pass defers the templates a targeted pass took after it began (its snapshot is older
        than what that targeted pass read and wrote)."""
        assert self._pool is not None
        if template_ids is not None:
            async with self._targeted_lock:
                return await self._run_pass_with(template_ids, None, self._took_templates)
        async with self._pass_lock:
            # Counted once the pass may start, before it reads anything: a template a targeted pass takes
            # later may have been acted on after this pass's snapshot.
            began = next(self._takes)

            def superseded(template_id: UUID) -> bool:
                return self._template_taken.get(template_id, 0) > began

            try:
                return await self._run_pass_with(None, superseded, None)
            finally:
                # The next full pass counts after this one: no take so far can concern it.
                self._template_taken.clear()

    def _took_templates(self, templates: frozenset[UUID]) -> None:
        take = next(self._takes)
        for template_id in templates:
            self._template_taken[template_id] = take

    async def _run_pass_with(
        self,
        template_ids: list[uuid.UUID] | None,
        superseded: Callable[[UUID], bool] | None,
        on_templates_locked: Callable[[frozenset[UUID]], None] | None,
    ) -> PassResult:
        assert self._pool is not None
        return await run_pass(
            self._pool,
            self.settings,
            self.clock(),
            observe_action=self.metrics.observe_action,
            problem_log=self.problem_log,
            template_ids=template_ids,
            settings_keeper=self.settings_keeper,
            holds=self.target_holds,
            state_log=self.state_log,
            superseded=superseded,
            on_templates_locked=on_templates_locked,
        )

    async def run_pass_now(self) -> PassResult:
        """One pass with its metrics and listeners (the scheduler's job; tests call it directly)."""
        result = await self._run_pass(None)
        # The per-preset metrics text (megabytes at fleet L) is rendered on a thread, before the pass's
        # results are published: a scrape meanwhile is served the previous pass at once.
        prepared = await asyncio.to_thread(self.metrics.presets.prepare, result.plan) if result.plan else None
        self.record_pass(result, prepared)
        return result

    async def run_targeted_pass_now(self, template_ids: frozenset[uuid.UUID]) -> PassResult:
        """A pass for the presets of these templates only, under the same locks as a full pass."""
        result = await self._run_pass(sorted(template_ids))
        events = self.metrics.events
        events.targeted_passes.labels(result.outcome.value).inc()
        if result.outcome is PassOutcome.SUCCESS:
            events.targeted_duration.observe(result.duration_seconds)
        if result.outcome is PassOutcome.FAILED:
            self.metrics.database_errors.inc()
        elif result.execution is not None and result.execution.presets_failed:
            self.metrics.database_errors.inc(result.execution.presets_failed)
        for listener in self.targeted_pass_listeners:
            listener(result)
        self.last_targeted_pass = result
        return result

    # --- change events --------------------------------------------------------------------------

    def _start_events(self) -> None:
        events = self.metrics.events
        self.event_listener = EventListener(
            self.settings.database_url.get_secret_value() if self.settings.database_url else "",
            self.pending_changes,
            connect_timeout=self.settings.connect_timeout,
            on_event=lambda kind: events.received.labels(kind).inc(),
            on_listening=self._on_listening,
        )
        self._spawn("events-listener", self.event_listener.run, TaskPolicy.RESTART)
        self._spawn("events", self._events_loop, TaskPolicy.RESTART)

    def _on_listening(self, listening: bool) -> None:
        events = self.metrics.events
        if self._listening and not listening:
            events.reconnects.inc()
        self._listening = listening
        events.listening.set(1 if listening else 0)

    async def _events_loop(self) -> None:
        """Run what the notifications asked for, gathered `event_coalesce` long; returns when stopping."""
        coalesce = self.settings.event_coalesce.total_seconds()
        retries = 0
        while not self._stop_requested.is_set():
            ready = asyncio.create_task(self.pending_changes.ready.wait())
            stopping = asyncio.create_task(self._stop_requested.wait())
            try:
                await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ready.cancel()
                stopping.cancel()
            if self._stop_requested.is_set():
                return
            await asyncio.sleep(coalesce)
            batch = self.pending_changes.take()
            if batch is None or self._stop_requested.is_set() or self._pool is None:
                continue
            outcome = await self._run_batch(batch)
            if outcome is PassOutcome.SKIPPED_LOCK:
                # Another replica's pass holds the lock; it may have read before the change: try again.
                self.pending_changes.put_back(batch)
                retries += 1
                await asyncio.sleep(min(EVENT_LOCK_RETRY_SECONDS * 2 ** min(retries - 1, 4), 1.0))
            else:
                retries = 0

    async def _run_batch(self, batch: Batch) -> PassOutcome:
        if batch.template_ids is None:
            result = await self.run_pass_now()
        else:
            result = await self.run_targeted_pass_now(batch.template_ids)
        if result.outcome is not PassOutcome.SKIPPED_LOCK:
            # A failed or paused pass is an answer too: the periodic pass is the retry.
            self.metrics.events.reaction.observe(time.monotonic() - batch.first_received)
        return result.outcome

    def record_pass(self, result: PassResult, prepared: PreparedPresets | None = None) -> None:
        paused = {PassOutcome.PAUSED: True, PassOutcome.SUCCESS: False}.get(result.outcome)
        self.metrics.observe_pass(result.outcome.value, result.duration_seconds, result.plan, paused, prepared)
        if result.settings_malformed is not None:
            self.metrics.settings_malformed.set(1 if result.settings_malformed else 0)
        if result.outcome is PassOutcome.FAILED and not result.settings_malformed:
            self.metrics.database_errors.inc()
        elif result.execution is not None and result.execution.presets_failed:
            self.metrics.database_errors.inc(result.execution.presets_failed)
        if result.memberships is not None:
            self.metrics.observe_memberships(
                (kind.value for organization in result.memberships.added for kind in organization.added),
                len(result.memberships.failures),
            )
        self.last_pass = result
        if not result.deadline_exceeded:
            self._last_progress = time.monotonic()
        for listener in self.pass_listeners:
            listener(result)


async def serve(settings: Settings, *, daemon: Daemon | None = None) -> int:
    """Run until SIGTERM or SIGINT; a second signal exits at once."""
    daemon = daemon or Daemon(settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen: list[int] = []

    def on_signal(signum: int) -> None:
        signals_seen.append(signum)
        if len(signals_seen) > 1:
            logger.warning("daemon.forced_exit", signal=signal.Signals(signum).name)
            os._exit(128 + signum)
        logger.info("daemon.signal", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    starting = asyncio.create_task(daemon.start())
    stop_waiter = asyncio.create_task(stop.wait())
    failure_waiter = asyncio.create_task(daemon.failed.wait())
    try:
        await asyncio.wait({starting, stop_waiter, failure_waiter}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done() and starting.exception() is not None:
            error = starting.exception()
            if isinstance(error, HttpBindError):
                logger.error("daemon.start_failed", error=str(error))
                return 1
            assert error is not None
            raise error
        if not starting.done():
            await daemon.cancel_start(starting)
        await asyncio.wait({stop_waiter, failure_waiter}, return_when=asyncio.FIRST_COMPLETED)
        return daemon.exit_code
    finally:
        stop_waiter.cancel()
        failure_waiter.cancel()
        await daemon.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def run_service(settings: Settings) -> int:
    return asyncio.run(serve(settings))
