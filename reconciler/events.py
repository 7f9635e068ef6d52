"""Change events (BEHAVIOR.md, "Change events"): what the platform's triggers say, gathered for a pass.

The triggers of migration 0006 NOTIFY `reconciler_events` with `KIND:ID,ID,...` (template ids) or `KIND:*`
(everything). `EventListener` keeps a dedicated connection LISTENing, and `PendingChanges` gathers what
arrives until the daemon takes it for a pass: the templates to target, or "everything" (a full pass).

A lost connection may have lost notifications, so after a reconnection everything is pending: the
daemon runs a full pass. A payload this code cannot read also means everything (never ignore a change).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from uuid import UUID

import asyncpg
import structlog

from reconciler import db
from reconciler.metrics import EVENT_KINDS

logger = structlog.get_logger(__name__)

CHANNEL = "reconciler_events"
# What a notification's kind may be (the metric's labels); anything else is counted as "other".
KINDS = EVENT_KINDS
# Reconnection waits 0.5, 1, 2 ... seconds, at most 30.
RECONNECT_SECONDS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
# A listening connection that stopped answering (a silent network) is found by a probe this often.
PROBE_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Change:
    kind: str
    # None: everything (a full pass).
    template_ids: frozenset[UUID] | None


def parse_payload(payload: str) -> Change:
    """`KIND:ID,ID` or `KIND:*`; anything unreadable is a change of everything."""
    kind, separator, rest = payload.partition(":")
    if not separator:
        return Change("other", None)
    kind = kind if kind in KINDS else "other"
    if rest == "*":
        return Change(kind, None)
    try:
        return Change(kind, frozenset(UUID(part) for part in rest.split(",")))
    except ValueError:
        return Change(kind, None)


@dataclass(frozen=True, slots=True)
class Batch:
    # None: everything (run a full pass).
    template_ids: frozenset[UUID] | None
    # When the oldest change of the batch arrived (time.monotonic()), for the reaction latency.
    first_received: float


class PendingChanges:
    """Changes received and not yet taken by a pass; `ready` is set while there are any."""

    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self._templates: set[UUID] = set()
        self._everything = False
        self._first_received: float | None = None

    def add(self, template_ids: frozenset[UUID] | None, received: float | None = None) -> None:
        received = time.monotonic() if received is None else received
        if template_ids is None:
            self._everything = True
            self._templates.clear()
        elif not self._everything:
            self._templates |= template_ids
        if self._first_received is None or received < self._first_received:
            self._first_received = received
        self.ready.set()

    def take(self) -> Batch | None:
        """Everything pending, as one batch; None when nothing is."""
        if self._first_received is None:
            return None
        batch = Batch(None if self._everything else frozenset(self._templates), self._first_received)
        self._templates = set()
        self._everything = False
        self._first_received = None
        self.ready.clear()
        return batch

    def put_back(self, batch: Batch) -> None:
        """A batch that could not be acted on (another replica held the lock) waits for the next try."""
        self.add(batch.template_ids, batch.first_received)


def _setter(event: asyncio.Event) -> Callable[[object], None]:
    return lambda _connection: event.set()


class EventListener:
    """Keeps one connection LISTENing on `reconciler_events`, reconnecting with backoff.

    Each notification goes into `pending`; after every (re)connection but the first, "everything" goes
    in, because notifications sent while nobody listened are lost.
    """

    def __init__(
        self,
        dsn: str,
        pending: PendingChanges,
        *,
        connect_timeout: timedelta,
        on_event: Callable[[str], None] = lambda kind: None,
        on_listening: Callable[[bool], None] = lambda listening: None,
    ) -> None:
        self._dsn = dsn
        self._pending = pending
        self._connect_timeout = connect_timeout
        self._on_event = on_event
        self._on_listening = on_listening
        self.connections = 0
        # Set while listening: tests wait on it.
        self.listening = asyncio.Event()

    def _notified(self, connection: object, pid: int, channel: str, payload: object) -> None:
        del connection, pid, channel
        change = parse_payload(str(payload))
        self._on_event(change.kind)
        self._pending.add(change.template_ids)

    async def run(self) -> None:
        failures = 0
        while True:
            connection: asyncpg.Connection | None = None
            try:
                connection = await db.connect(
                    self._dsn,
                    connect_timeout=self._connect_timeout,
                    statement_timeout=timedelta(seconds=PROBE_SECONDS),
                    application_name="reconciler-events",
                )
                lost = asyncio.Event()
                connection.add_termination_listener(_setter(lost))
                await connection.add_listener(CHANNEL, self._notified)
                self.connections += 1
                if self.connections > 1:
                    # What was sent while we did not listen is lost: a full pass catches up.
                    self._pending.add(None)
                logger.info("events.listening", channel=CHANNEL, reconnected=self.connections > 1)
                self.listening.set()
                self._on_listening(True)
                failures = 0
                while True:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), timeout=PROBE_SECONDS)
                    if lost.is_set() or connection.is_closed():
                        raise ConnectionResetError("the listening connection was closed")
                    await connection.execute("select 1", timeout=PROBE_SECONDS)
            except db.SURVIVABLE_ERRORS as error:
                self.listening.clear()
                self._on_listening(False)
                delay = RECONNECT_SECONDS[min(failures, len(RECONNECT_SECONDS) - 1)]
                failures += 1
                logger.warning("events.connection_lost", error=db.describe_error(error), retry_in_seconds=delay)
                await asyncio.sleep(delay)
            finally:
                if connection is not None and not connection.is_closed():
                    connection.terminate()
