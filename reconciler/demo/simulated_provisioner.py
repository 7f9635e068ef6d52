"""A simulated provisioner: a test tool that plays the platform's provisioners against a database.

It takes pending workspace-build jobs, "runs" each for a few seconds, and completes it: successes give
a start build a ready agent and mark a deleted workspace deleted, failures carry an error message, as a
real provisioner's would. It is what `reconciler demo` runs beside the daemon, and what
`reconciler simulate-provisioner` runs alone, so that people can watch the daemon against a staging
database. **Never point it at production**: it completes real jobs without provisioning anything.

Jobs are taken with `FOR UPDATE SKIP LOCKED`, so several simulated provisioners (or a real one beside
it) share the queue without taking a job twice. On stop, unfinished jobs are put back in the queue.

How a build ends is decided by the preset's parameters, so a demo template can be broken on purpose:
`simulated_failure = always` fails every start build (`simulated_error_code` sets its error code), and
otherwise start builds fail at the configured rate. Stop and delete builds always succeed: a failed
delete leaves a workspace that nothing in a simulation would ever clean up.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import asyncpg
import structlog

from reconciler import db
from reconciler.clock import utc_now
from reconciler.config import Settings
from reconciler.demo import platform

logger = structlog.get_logger(__name__)

DEFAULT_POLL_SECONDS = 0.5
DEFAULT_CONCURRENCY = 16
# Waits before retrying a completion the database refused, the last one repeated.
COMPLETE_RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)
ALWAYS_FAIL = "always"
# Errors as a provisioner reports them, so that the demo's notifications read like real ones.
_RANDOM_ERRORS = (
    "terraform apply: timeout while waiting for the instance to become healthy",
    "terraform apply: the cloud provider returned 503 Service Unavailable",
    "agent did not connect within the startup timeout",
)


@dataclass(frozen=True, slots=True)
class ProvisionerOptions:
    failure_rate: float = 0.0
    min_seconds: float = 2.0
    max_seconds: float = 5.0
    concurrency: int = DEFAULT_CONCURRENCY
    poll_seconds: float = DEFAULT_POLL_SECONDS

    def __post_init__(self) -> None:
        if not 0.0 <= self.failure_rate <= 1.0:
            raise ValueError("the failure rate must be between 0 and 1")
        if not 0.0 <= self.min_seconds <= self.max_seconds:
            raise ValueError("the build duration needs 0 <= min seconds <= max seconds")
        if self.concurrency < 1:
            raise ValueError("the concurrency must be at least 1")
        if self.poll_seconds <= 0:
            raise ValueError("the poll interval must be positive")


@dataclass(frozen=True, slots=True)
class Outcome:
    """How the simulation ends one job: no error is a success."""

    duration_seconds: float
    error: str | None = None
    error_code: str | None = None


@dataclass(frozen=True, slots=True)
class JobResult:
    job: platform.AcquiredJob
    succeeded: bool
    canceled: bool
    error: str | None


@dataclass(slots=True)
class ProvisionerStats:
    acquired: int = 0
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0
    released: int = 0


def decide_outcome(job: platform.AcquiredJob, options: ProvisionerOptions, chooser: random.Random) -> Outcome:
    """The outcome and duration of one job (pure, given the random source)."""
    duration = chooser.uniform(options.min_seconds, options.max_seconds)
    if job.transition != "start":
        return Outcome(duration)
    if job.simulated_failure == ALWAYS_FAIL:
        # A broken template fails fast, as a plan error does: before anything is provisioned.
        return Outcome(
            options.min_seconds,
            error=f"terraform plan: template {job.template_name!r} is broken "
            f"(preset parameter simulated_failure={ALWAYS_FAIL})",
            error_code=job.simulated_error_code or None,
        )
    if chooser.random() < options.failure_rate:
        return Outcome(duration, error=chooser.choice(_RANDOM_ERRORS), error_code=job.simulated_error_code or None)
    return Outcome(duration)


JobListener = Callable[[JobResult], None]


@dataclass
class SimulatedProvisioner:
    """Polls for jobs and runs up to `options.concurrency` of them at once, until `stop()`."""

    pool: asyncpg.Pool
    options: ProvisionerOptions = field(default_factory=ProvisionerOptions)
    worker_id: uuid.UUID = field(default_factory=uuid.uuid4)
    chooser: random.Random = field(default_factory=random.Random)
    clock: Callable[[], datetime] = utc_now
    stats: ProvisionerStats = field(default_factory=ProvisionerStats)
    listeners: list[JobListener] = field(default_factory=list)
    _jobs: set[asyncio.Task[JobResult | None]] = field(default_factory=set, init=False, repr=False)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    _loop_task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._poll_loop(), name="simulated-provisioner")

    async def stop(self) -> None:
        """Stop taking jobs, abandon the ones in flight, and put them back in the queue. Idempotent."""
        self._stopping.set()
        tasks = [task for task in (self._loop_task, *self._jobs) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop_task = None
        try:
            async with self.pool.acquire(timeout=5) as connection:
                released = await platform.release_provisioner_jobs(connection, self.worker_id, self.clock())
        except db.SURVIVABLE_ERRORS as error:
            # The database may be going away with us (the demo); the jobs stay "running" then.
            logger.warning("provisioner.release_failed", error=f"{type(error).__name__}: {error}")
            return
        self.stats.released += len(released)
        if released:
            logger.info("provisioner.jobs_released", count=len(released))

    async def run_once(self) -> list[JobResult]:
        """Take what is pending and run it to completion (tests; no concurrency limit, no waiting loop)."""
        async with self.pool.acquire() as connection:
            await platform.complete_canceling_jobs(connection, self.clock())
            jobs = await platform.acquire_provisioner_jobs(connection, self.worker_id, self.clock(), 1000)
        self.stats.acquired += len(jobs)
        results = await asyncio.gather(*(self._run_job(job) for job in jobs))
        return [result for result in results if result is not None]

    async def _poll_loop(self) -> None:
        while not self._stopping.is_set():
            free = self.options.concurrency - len(self._jobs)
            if free > 0:
                try:
                    async with self.pool.acquire() as connection:
                        await platform.complete_canceling_jobs(connection, self.clock())
                        jobs = await platform.acquire_provisioner_jobs(connection, self.worker_id, self.clock(), free)
                except db.SURVIVABLE_ERRORS as error:
                    logger.warning("provisioner.poll_failed", error=f"{type(error).__name__}: {error}")
                    jobs = []
                self.stats.acquired += len(jobs)
                for job in jobs:
                    task = asyncio.create_task(self._run_job(job), name=f"simulated-job-{job.job_id}")
                    self._jobs.add(task)
                    task.add_done_callback(self._jobs.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.options.poll_seconds)

    async def _run_job(self, job: platform.AcquiredJob) -> JobResult | None:
        outcome = decide_outcome(job, self.options, self.chooser)
        await asyncio.sleep(outcome.duration_seconds)
        attempt = 0
        while True:
            try:
                async with self.pool.acquire() as connection:
                    completed = await platform.complete_provisioner_job(
                        connection,
                        job_id=job.job_id,
                        worker_id=self.worker_id,
                        now=self.clock(),
                        error=outcome.error,
                        error_code=outcome.error_code,
                    )
                break
            except db.SURVIVABLE_ERRORS as error:
                # Retried, as a real provisioner retries reporting its job: a job left running after one
                # refused statement (a busy server, a dropped connection) would hold its preset's pool short
                # until the provisioner stops. `stop()` cancels the wait and puts the job back in the queue.
                attempt += 1
                logger.warning(
                    "provisioner.complete_failed",
                    job_id=str(job.job_id),
                    attempt=attempt,
                    error=f"{type(error).__name__}: {error}",
                )
                await asyncio.sleep(COMPLETE_RETRY_SECONDS[min(attempt, len(COMPLETE_RETRY_SECONDS)) - 1])
        if completed is None:
            logger.info("provisioner.job_lost", job_id=str(job.job_id))
            return None
        result = JobResult(job, completed.succeeded, completed.canceled, None if completed.canceled else outcome.error)
        if result.canceled:
            self.stats.canceled += 1
        elif result.succeeded:
            self.stats.succeeded += 1
        else:
            self.stats.failed += 1
        logger.info(
            "provisioner.job_completed",
            job_id=str(job.job_id),
            workspace=job.workspace_name,
            transition=job.transition,
            template_name=job.template_name,
            preset_name=job.preset_name,
            outcome="canceled" if result.canceled else "succeeded" if result.succeeded else "failed",
            error=result.error,
        )
        for listener in self.listeners:
            listener(result)
        return result


async def serve(settings: Settings, options: ProvisionerOptions, duration: timedelta | None) -> int:
    """`reconciler simulate-provisioner`: run until SIGTERM, SIGINT or the end of `duration`."""
    assert settings.database_url is not None
    pool = await db.create_pool(
        settings.database_url.get_secret_value(),
        max_size=4,
        statement_timeout=settings.statement_timeout,
        connect_timeout=settings.connect_timeout,
        application_name="reconciler-simulated-provisioner",
    )
    async with pool.acquire() as connection:
        current, reason = await db.schema_is_current(connection)
    if not current:
        await pool.close()
        raise db.SchemaError(f"the database schema is not ready: {reason}")
    provisioner = SimulatedProvisioner(pool, options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    logger.warning(
        "provisioner.started",
        worker_id=str(provisioner.worker_id),
        note="a test tool: it completes jobs without provisioning anything; never use it in production",
        failure_rate=options.failure_rate,
    )
    provisioner.start()
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=duration.total_seconds() if duration else None)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await provisioner.stop()
        await pool.close()
        stats = provisioner.stats
        logger.info(
            "provisioner.stopped",
            acquired=stats.acquired,
            succeeded=stats.succeeded,
            failed=stats.failed,
            canceled=stats.canceled,
            released=stats.released,
        )
    return 0
