"""Delivery of the outbox, beside the passes: lease due messages, render them, deliver to every sink.

One poll (`dispatch_once`) leases up to `notification_batch_size` due messages (FOR UPDATE SKIP LOCKED,
so replicas share the work) for `notification_lease`, and delivers them concurrently, each to every
configured sink concurrently. A sink's success is written at once to `notification_deliveries`, so a
retry only goes to the sinks that still lack the message. The message's outcome is then written by the
lease holder only:

- every sink done, at least one has it: `sent`;
- a sink failed: retried after `retry_delay` (exponential, capped, jittered), until
  `notification_max_attempts`, then `failed` (counted and logged);
- every sink refused for good (a 5xx recipient refusal): `failed`;
- no configured sink applies (no recipient and no webhook, no e-mail address...): `recorded`.

With no sink configured nothing is leased: messages stay `pending`, visible in
`reconciler notifications list`, and are delivered once a sink is configured.

Every delivery runs under a deadline inside the lease, so a hanging sink gives up before another replica
may take the message over. Cancellation (shutdown) leaves the message leased: its lease runs out and it
is retried then, and the successes already written are not repeated. The one window for a repeat is a
sink that accepted a message just before a crash, before its success was written; webhooks get the same
`Idempotency-Key` again and e-mails the same `Message-ID`, so receivers can drop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

import asyncpg
import structlog

from reconciler import db
from reconciler.clock import utc_now
from reconciler.config import NOTIFICATION_LEASE_MARGIN, Settings
from reconciler.notify.email import EmailSender
from reconciler.notify.message import DeliveryOutcome, DeliveryResult, OutgoingMessage, Sink, outgoing_message
from reconciler.notify.metrics import SINK_KINDS, NotificationMetrics
from reconciler.notify.webhook import WebhookSender
from reconciler.store import notifications

logger = structlog.get_logger(__name__)

MAX_LAST_ERROR_LENGTH = 1000


def retry_delay(attempt: int, base: timedelta, ceiling: timedelta, jitter: float) -> timedelta:
    """The wait after failed attempt number `attempt` (1 for the first).

    `base * 2^(attempt - 1)`, at most `ceiling`, then scaled into [half, all] of that by `jitter` (a
    number in [0, 1]), so that messages that failed together (a receiver was down) do not all come back
    in the same second.
    """
    exponent = min(max(attempt - 1, 0), 60)
    seconds = min(base.total_seconds() * 2.0**exponent, ceiling.total_seconds())
    return timedelta(seconds=seconds * (0.5 + 0.5 * min(max(jitter, 0.0), 1.0)))


def build_sinks(settings: Settings) -> list[Sink]:
    """The configured sinks: every webhook, in index order, then e-mail when an SMTP host is set."""
    sinks: list[Sink] = [WebhookSender(webhook) for webhook in settings.webhooks]
    if settings.smtp_host is not None:
        sinks.append(EmailSender(settings))
    return sinks


class Dispatcher:
    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        metrics: NotificationMetrics,
        *,
        sinks: Sequence[Sink] | None = None,
        jitter: Callable[[], float] = random.random,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._sinks: tuple[Sink, ...] = tuple(build_sinks(settings) if sinks is None else sinks)
        self._jitter = jitter
        self._clock = clock
        self._max_attempts = settings.notification_max_attempts
        self._retry_base = settings.notification_retry_base
        self._retry_max = settings.notification_retry_max
        self._lease = settings.notification_lease
        self._batch_size = settings.notification_batch_size
        self._poll_seconds = settings.notification_poll_interval.total_seconds()
        # A pool connection comes free within a statement's client-side deadline (every call has one):
        # waiting longer for one means the database stopped answering.
        self._acquire_timeout = (settings.statement_timeout + db.REPLY_MARGIN).total_seconds()
        for sink_kind in SINK_KINDS:
            metrics.sinks.labels(sink_kind).set(sum(sink.kind == sink_kind for sink in self._sinks))

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until `stop` is set (or the task is cancelled); a failed poll is logged and retried."""
        if self._sinks:
            logger.info("notification.dispatcher_started", sinks=[sink.description for sink in self._sinks])
        else:
            logger.warning(
                "notification.no_sinks",
                detail="no webhook or SMTP host configured: messages stay pending "
                "(see `reconciler notifications list`)",
            )
        # The reason of the current outage, so that an outage logs one line (and one when it ends), not
        # one per poll.
        failing: str | None = None
        try:
            while not stop.is_set():
                handled = 0
                try:
                    handled = await self.dispatch_once(self._clock())
                    if failing is not None:
                        logger.info("notification.poll_recovered")
                        failing = None
                except db.SURVIVABLE_ERRORS as error:
                    self._metrics.dispatch_errors.inc()
                    reason = f"{type(error).__name__}: {error}"
                    if reason != failing:
                        logger.warning("notification.poll_failed", error=reason)
                    failing = reason
                except Exception:
                    # A bug: keep the traceback, and keep delivering the other messages on the next poll.
                    self._metrics.dispatch_errors.inc()
                    logger.exception("notification.poll_crashed")
                if handled >= self._batch_size:
                    continue  # a full batch: more may be due right now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self._poll_seconds)
        finally:
            await self.close()

    async def close(self) -> None:
        for sink in self._sinks:
            await sink.close()

    async def dispatch_once(self, now: datetime) -> int:
        """Lease and deliver one batch of due messages as of `now`; return how many were leased."""
        leased: list[notifications.LeasedNotification] = []
        if self._sinks:
            lease_token = uuid.uuid4()
            async with self._pool.acquire(timeout=self._acquire_timeout) as connection:
                leased = await notifications.lease_notifications(
                    connection,
                    now=now,
                    leased_until=now + self._lease,
                    lease_token=lease_token,
                    limit=self._batch_size,
                )
            if leased:
                # On the loop's clock, not `now`: tests pass any `now`, the deadline is about real time.
                deadline = asyncio.get_running_loop().time() + (self._lease - NOTIFICATION_LEASE_MARGIN).total_seconds()
                outcomes = await asyncio.gather(
                    *(self._process(message, lease_token, now, deadline) for message in leased),
                    return_exceptions=True,
                )
                for message, outcome in zip(leased, outcomes, strict=True):
                    if isinstance(outcome, BaseException):
                        # The lease runs out and the message is retried; its recorded successes stay.
                        self._metrics.dispatch_errors.inc()
                        logger.error(
                            "notification.process_failed",
                            message_id=str(message.id),
                            error=f"{type(outcome).__name__}: {outcome}",
                        )
        await self._refresh_backlog(now)
        return len(leased)

    async def _refresh_backlog(self, now: datetime) -> None:
        async with self._pool.acquire(timeout=self._acquire_timeout) as connection:
            backlog = await notifications.read_notification_backlog(connection)
        self._metrics.pending.set(backlog.pending)
        oldest = backlog.oldest_created_at
        self._metrics.oldest_pending_age.set(max((now - oldest).total_seconds(), 0.0) if oldest else 0.0)
        self._metrics.last_poll.set(time.time())

    async def _process(
        self, leased: notifications.LeasedNotification, lease_token: uuid.UUID, now: datetime, deadline: float
    ) -> None:
        message = outgoing_message(leased)
        log = logger.bind(message_id=str(message.id), kind=message.kind, attempt=message.attempt)
        pending_sinks = [sink for sink in self._sinks if sink.name not in leased.delivered_sinks]
        results = await asyncio.gather(*(self._deliver(sink, message, now, deadline) for sink in pending_sinks))
        by_sink = dict(zip(pending_sinks, results, strict=True))

        retrying = [sink for sink, result in by_sink.items() if result.outcome is DeliveryOutcome.RETRY]
        delivered = bool(leased.delivered_sinks) or any(
            result.outcome is DeliveryOutcome.SUCCESS for result in by_sink.values()
        )
        problems = "; ".join(
            f"{sink.name}: {result.reason}"
            for sink, result in by_sink.items()
            if result.outcome is not DeliveryOutcome.SUCCESS
        )
        last_error = problems[:MAX_LAST_ERROR_LENGTH] or None
        next_attempt_at: datetime | None = None
        sent_at: datetime | None = None
        if retrying:
            if message.attempt >= self._max_attempts:
                status = "failed"
            else:
                status = "pending"
                next_attempt_at = now + retry_delay(message.attempt, self._retry_base, self._retry_max, self._jitter())
        elif delivered:
            status, sent_at = "sent", now
        elif any(result.outcome is DeliveryOutcome.REJECTED for result in by_sink.values()):
            status = "failed"
        else:
            status = "recorded"

        for sink, result in by_sink.items():
            self._metrics.deliveries.labels(sink.kind, _metric_outcome(result, status)).inc()

        try:
            async with self._pool.acquire(timeout=self._acquire_timeout) as connection:
                kept = await notifications.finish_notification_attempt(
                    connection,
                    message_id=message.id,
                    lease_token=lease_token,
                    status=status,
                    next_attempt_at=next_attempt_at,
                    last_error=last_error,
                    sent_at=sent_at,
                    now=now,
                )
        except db.SURVIVABLE_ERRORS as error:
            log.warning("notification.finish_failed", status=status, error=f"{type(error).__name__}: {error}")
            return
        if not kept:
            log.warning("notification.lease_lost", detail="another dispatcher took the message over")
            return
        if status != "pending":
            self._metrics.messages_finished.labels(message.kind, status).inc()
        if status == "failed":
            log.error(
                "notification.failed",
                preset_id=str(leased.preset_id) if leased.preset_id else None,
                attempts=message.attempt,
                last_error=last_error,
            )
        elif status == "pending":
            log.warning(
                "notification.retry_scheduled",
                next_attempt_at=next_attempt_at.isoformat() if next_attempt_at else None,
                failed_sinks=[sink.name for sink in retrying],
                last_error=last_error,
            )
        elif status == "recorded":
            log.info("notification.recorded", reason=last_error)
        else:
            log.info("notification.sent")

    async def _deliver(self, sink: Sink, message: OutgoingMessage, now: datetime, deadline: float) -> DeliveryResult:
        started = time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline):
                result = await sink.deliver(message)
        except TimeoutError:
            result = DeliveryResult.retry("gave up: the lease was about to run out")
        except Exception as error:
            # A bug in one sink must not keep the message from the others, nor kill the dispatcher.
            logger.exception("notification.sink_crashed", sink=sink.name, message_id=str(message.id))
            result = DeliveryResult.retry(f"internal error: {type(error).__name__}")
        self._metrics.delivery_duration.labels(sink.kind).observe(time.perf_counter() - started)
        fields = {"message_id": str(message.id), "kind": message.kind, "sink": sink.description}
        if result.outcome is DeliveryOutcome.SUCCESS:
            await self._record_delivery(message, sink, now)
            logger.info("notification.delivered", attempt=message.attempt, **fields)
        elif result.outcome is DeliveryOutcome.SKIPPED:
            logger.info("notification.skipped", reason=result.reason, **fields)
        else:
            logger.warning(
                "notification.delivery_failed",
                attempt=message.attempt,
                reason=result.reason,
                permanent=result.outcome is DeliveryOutcome.REJECTED,
                **fields,
            )
        return result

    async def _record_delivery(self, message: OutgoingMessage, sink: Sink, now: datetime) -> None:
        async def write() -> None:
            async with self._pool.acquire(timeout=self._acquire_timeout) as connection:
                await notifications.record_notification_delivery(connection, message.id, sink.name, now)

        # Shielded: once a sink has the message, a shutdown arriving now must not lose that fact (the
        # write finishes in the background; the pool's close waits for it).
        task = asyncio.ensure_future(write())
        task.add_done_callback(_retrieve_exception)
        try:
            await asyncio.shield(task)
        except db.SURVIVABLE_ERRORS as error:
            # Not fatal: the message's outcome is still written; at worst a retry repeats this sink.
            logger.warning(
                "notification.record_failed",
                message_id=str(message.id),
                sink=sink.name,
                error=f"{type(error).__name__}: {error}",
            )


def _metric_outcome(result: DeliveryResult, status: str) -> str:
    if result.outcome is DeliveryOutcome.RETRY:
        return "retry" if status == "pending" else "failed"
    if result.outcome is DeliveryOutcome.REJECTED:
        return "failed"
    return result.outcome.value


def _retrieve_exception(task: asyncio.Future[None]) -> None:
    # The awaiting side logs a failure; after a cancellation nobody awaits, so mark it retrieved here.
    if not task.cancelled():
        task.exception()
