"""The daemon: scheduler, passes, HTTP, health, systemd notifications, and an ordered shutdown.

Start order: HTTP (so health answers while we wait), heartbeat, database (retried until it answers and
the schema is current), scheduler (first pass at once), background tasks, then READY=1. Stop order: no
new passes, the pass in flight gets `shutdown_grace` to finish (then it is cancelled: every write is
one transaction, so nothing is left half done), background tasks, pool, HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog
from aiohttp import web
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client import CollectorRegistry

from reconciler import db, store
from reconciler.config import Settings
from reconciler.http import HealthState, HttpBindError, Readiness, bound_port, build_application, start_http
from reconciler.metrics import Metrics
from reconciler.notify.dispatcher import Dispatcher
from reconciler.reconcile import PassOutcome, PassResult, run_pass
from reconciler.sdnotify import SystemdNotifier

logger = structlog.get_logger(__name__)

HEARTBEAT_SECONDS = 1.0
READINESS_PROBE_SECONDS = 5.0
DATABASE_RETRY_SECONDS = (1.0, 2.0, 5.0, 10.0)
TOTALS_REFRESH_SECONDS = 60.0

PassListener = Callable[[PassResult], None]


def utc_now() -> datetime:
    return datetime.now(UTC)


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
        self.last_pass: PassResult | None = None
        self.pass_listeners: list[PassListener] = []
        self._heartbeat = time.time()
        self._pool: asyncpg.Pool | None = None
        self._scheduler: AsyncIOScheduler | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pass_task: asyncio.Task[Any] | None = None
        self._stopping = False
        self._stopped = asyncio.Event()
        self.dispatcher: Dispatcher | None = None
        self._stop_started = False
        self._database_failing = False

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def http_url(self) -> str:
        assert self._runner is not None, "the daemon is not started"
        host = self.settings.http_host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{bound_port(self._runner)}"

    @property
    def pool(self) -> asyncpg.Pool | None:
        return self._pool

    async def start(self) -> None:
        """Start everything; waits (retrying) for the database. Raises HttpBindError if the port is taken."""
        health = HealthState(readiness=self.readiness, heartbeat=lambda: self._heartbeat)
        self._runner = await start_http(
            build_application(self.metrics, health), self.settings.http_host, self.settings.http_port
        )
        self._spawn(self._heartbeat_loop(), "heartbeat")
        if self.notifier.watchdog_interval_seconds:
            self._spawn(self._watchdog_loop(self.notifier.watchdog_interval_seconds), "watchdog")
        self.notifier.status("waiting for the database")
        await self._connect_database()
        self._start_scheduler()
        self._start_notifications()
        self._spawn(self._readiness_loop(), "readiness")
        self._spawn(self._totals_loop(), "totals")
        logger.info(
            "daemon.started",
            http=self.http_url,
            interval_seconds=self.settings.reconciliation_interval.total_seconds(),
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
        self.notifier.stopping()
        logger.info("daemon.stopping")
        try:
            if self._scheduler is not None and self._scheduler.running:
                # No new passes from here on; the one in flight may finish.
                self._scheduler.pause()
            await self._finish_pass_in_flight()
            if self._scheduler is not None and self._scheduler.running:
                self._scheduler.shutdown(wait=False)
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._pool is not None:
                try:
                    await asyncio.wait_for(self._pool.close(), timeout=10)
                except TimeoutError:
                    self._pool.terminate()
            if self._runner is not None:
                await self._runner.cleanup()
        finally:
            self.notifier.close()
            self._stopped.set()
            logger.info("daemon.stopped")

    async def _finish_pass_in_flight(self) -> None:
        task = self._pass_task
        if task is None or task.done():
            return
        grace = self.settings.shutdown_grace.total_seconds()
        logger.info("daemon.waiting_for_pass", grace_seconds=grace)
        done, _ = await asyncio.wait({task}, timeout=grace)
        if not done:
            logger.warning("daemon.pass_cancelled", reason="shutdown grace period elapsed")
            task.cancel()
            await asyncio.wait({task}, timeout=10)

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.create_task(coroutine, name=f"reconciler-{name}"))

    # --- database -------------------------------------------------------------------------------

    async def _connect_database(self) -> None:
        attempt = 0
        while True:
            try:
                pool = await db.create_pool(
                    self.settings.database_url.get_secret_value() if self.settings.database_url else "",
                    max_size=self.settings.pool_max_size,
                    statement_timeout=self.settings.statement_timeout,
                    connect_timeout=self.settings.connect_timeout,
                )
                async with pool.acquire() as connection:
                    current, reason = await db.schema_is_current(connection)
                if current:
                    self._pool = pool
                    self.readiness.ready, self.readiness.reason = True, ""
                    self.metrics.ready.set(1)
                    if attempt:
                        logger.info("database.available", attempts=attempt + 1)
                    return
                await pool.close()
                self._set_not_ready(f"schema not ready: {reason}")
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
                self.metrics.database_errors.inc()
                self._set_not_ready(f"database unreachable: {type(error).__name__}: {error}")
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
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
            self.metrics.database_errors.inc()
            self._set_not_ready(f"database unreachable: {type(error).__name__}: {error}")
            return
        if current:
            self._set_ready()
        else:
            self._set_not_ready(f"schema not ready: {reason}")

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
        """Refresh the lifetime counters beside the passes: they scan history, so not every pass."""
        while True:
            preset_ids = self.metrics.presets.qualifying_preset_ids()
            if self._pool is not None and preset_ids:
                try:
                    async with self._pool.acquire() as connection:
                        totals = await store.read_prebuild_totals(connection, preset_ids)
                    self.metrics.presets.update_totals(totals)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
                    self.metrics.database_errors.inc()
                    logger.warning("metrics.totals_failed", error=f"{type(error).__name__}: {error}")
                await asyncio.sleep(TOTALS_REFRESH_SECONDS)
            else:
                await asyncio.sleep(1.0)

    def _start_notifications(self) -> None:
        """Deliver the outbox beside the passes. Stopped by cancellation in `stop()`: a message in flight
        keeps its lease and is retried once the lease runs out, so nothing is lost."""
        assert self._pool is not None
        self.dispatcher = Dispatcher(self._pool, self.settings, self.metrics.notifications, clock=self.clock)
        enqueued = self.metrics.notifications.enqueued
        self.pass_listeners.append(lambda result: enqueued.inc(result.status_changes.notifications_enqueued))
        self._spawn(self.dispatcher.run(asyncio.Event()), "notifications")

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

    def _on_scheduler_event(self, event: JobExecutionEvent) -> None:
        name = {EVENT_JOB_MISSED: "missed", EVENT_JOB_ERROR: "error", EVENT_JOB_MAX_INSTANCES: "max_instances"}.get(
            event.code, "other"
        )
        self.metrics.scheduler_events.labels(name).inc()
        if name == "error" and not isinstance(event.exception, asyncio.CancelledError):
            logger.error("scheduler.job_failed", error=repr(event.exception))
        else:
            logger.info("scheduler.event", event=name)

    async def _pass_job(self) -> None:
        if self._stopping or self._pool is None:
            return
        self._pass_task = asyncio.current_task()
        try:
            result = await self.run_pass_now()
        finally:
            self._pass_task = None
        del result

    async def run_pass_now(self) -> PassResult:
        """One pass with its metrics and listeners (the scheduler's job; tests call it directly)."""
        assert self._pool is not None
        result = await run_pass(self._pool, self.settings, self.clock(), observe_action=self.metrics.observe_action)
        self.record_pass(result)
        return result

    def record_pass(self, result: PassResult) -> None:
        paused = {PassOutcome.PAUSED: True, PassOutcome.SUCCESS: False}.get(result.outcome)
        self.metrics.observe_pass(result.outcome.value, result.duration_seconds, result.plan, paused)
        if result.outcome is PassOutcome.FAILED:
            self.metrics.database_errors.inc()
        elif result.execution is not None and result.execution.presets_failed:
            self.metrics.database_errors.inc(result.execution.presets_failed)
        self.last_pass = result
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
    try:
        await asyncio.wait({starting, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done() and starting.exception() is not None:
            error = starting.exception()
            if isinstance(error, HttpBindError):
                logger.error("daemon.start_failed", error=str(error))
                return 1
            assert error is not None
            raise error
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        await stop.wait()
        return 0
    finally:
        stop_waiter.cancel()
        await daemon.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def run_service(settings: Settings) -> int:
    return asyncio.run(serve(settings))
