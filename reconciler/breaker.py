"""The global circuit breaker for shared outages: closed -> open -> half-open -> closed (or open again).

When prebuild builds fail across many presets at once (an expired cloud credential, a registry outage),
one open circuit replaces N backoffs, N hard limits and N notifications. This module is the state
machine alone, pure: (settings, the state recorded in the database, what the last builds did, now) ->
the next state, what it allows and what to tell. The pass reads the inputs in its snapshot and the
executor writes the result, so every replica and every restart sees the same breaker.

- closed: creates as usual. It opens when, among the prebuild create builds that completed in the
  window (and since it last closed), at least `min_builds` completed, at least `min_presets` distinct
  presets had a failure, and the failed share reached `failure_threshold`.
- open: no creates anywhere (deletes go on) until `open_until`; then half-open.
- half-open: up to `probes` creates, one per template; the first probe that succeeds closes the
  breaker; when every probe launched has failed, it opens again for twice as long (at most
  `open_duration_max`). When no preset wants a create, there is nothing to probe and it closes.

An episode runs from opening to closing (re-opening from half-open is the same episode): one
notification when it opens, one when it closes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from datetime import datetime, timedelta


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerEvent(enum.StrEnum):
    OPENED = "opened"
    HALF_OPENED = "half_opened"
    REOPENED = "reopened"
    CLOSED = "closed"

    @property
    def notifies(self) -> bool:
        """One notification when an episode starts, one when it ends; nothing in between."""
        return self in (BreakerEvent.OPENED, BreakerEvent.CLOSED)


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    enabled: bool = False
    # Share of the completed builds in the window that failed, from which the breaker opens.
    failure_threshold: float = 0.5
    min_builds: int = 10
    min_presets: int = 3
    window: timedelta = timedelta(minutes=10)
    open_duration: timedelta = timedelta(minutes=5)
    open_duration_max: timedelta = timedelta(hours=1)
    probes: int = 3


@dataclass(frozen=True, slots=True)
class BreakerRecord:
    """The breaker as the database holds it (one row)."""

    state: BreakerState = BreakerState.CLOSED
    # Episodes so far; the current one while open or half-open.
    episode: int = 0
    # When the state last changed (None: never).
    changed_at: datetime | None = None
    # Open: when it turns half-open.
    open_until: datetime | None = None
    # How long it stayed open the last time it opened in this episode (re-opening doubles it).
    open_duration: timedelta | None = None
    # When the current episode began, and from when its failures are the outage's (the window that
    # opened it): failures of builds created since then count for neither backoff nor the hard limit.
    opened_at: datetime | None = None
    failures_since: datetime | None = None


@dataclass(frozen=True, slots=True)
class BreakerObservation:
    """What the prebuild create builds did, as the snapshot counts them.

    `completed`, `failed` and `failed_presets`: builds completed inside `window_start(...)`.
    `probes_*`: builds created since the breaker turned half-open (zero in any other state).
    """

    completed: int = 0
    failed: int = 0
    failed_presets: int = 0
    probes_succeeded: int = 0
    probes_failed: int = 0
    probes_in_flight: int = 0

    @property
    def probes_launched(self) -> int:
        return self.probes_succeeded + self.probes_failed + self.probes_in_flight


@dataclass(frozen=True, slots=True)
class BreakerDecision:
    record: BreakerRecord
    # What changed this pass (None: nothing).
    event: BreakerEvent | None
    # Creates allowed this pass across the deployment: None without a limit, 0 none, N probes.
    creates_allowed: int | None
    # Probes go one per template.
    probing: bool
    reason: str

    @property
    def changed(self) -> bool:
        return self.event is not None


def window_start(settings: BreakerSettings, record: BreakerRecord, now: datetime) -> datetime:
    """Builds that completed from this instant on are the evidence for opening.

    Never before the breaker last changed state: the failures that opened it must not open it again the
    moment it closes.
    """
    start = now - settings.window
    if record.changed_at is not None and record.changed_at > start:
        return record.changed_at
    return start


def tripped(settings: BreakerSettings, observation: BreakerObservation) -> bool:
    return (
        observation.completed > 0
        and observation.completed >= settings.min_builds
        and observation.failed_presets >= settings.min_presets
        and observation.failed >= settings.failure_threshold * observation.completed
    )


def decide(
    settings: BreakerSettings,
    record: BreakerRecord,
    observation: BreakerObservation,
    now: datetime,
    *,
    creates_wanted: bool,
) -> BreakerDecision:
    """The breaker's next state, and what it allows this pass."""
    if not settings.enabled:
        if record.state is BreakerState.CLOSED:
            return BreakerDecision(record, None, None, probing=False, reason="disabled")
        # Turned off during an episode: the episode ends here, and is told so.
        return _close(record, now, "the breaker was disabled")

    if record.state is BreakerState.CLOSED:
        if not tripped(settings, observation):
            return BreakerDecision(record, None, None, probing=False, reason="closed")
        opened = BreakerRecord(
            state=BreakerState.OPEN,
            episode=record.episode + 1,
            changed_at=now,
            open_until=now + settings.open_duration,
            open_duration=settings.open_duration,
            opened_at=now,
            failures_since=window_start(settings, record, now),
        )
        reason = (
            f"{observation.failed} of {observation.completed} prebuild builds failed across "
            f"{observation.failed_presets} presets"
        )
        return BreakerDecision(opened, BreakerEvent.OPENED, 0, probing=False, reason=reason)

    if record.state is BreakerState.OPEN:
        if record.open_until is not None and now < record.open_until:
            return BreakerDecision(record, None, 0, probing=False, reason="open")
        half_open = replace(record, state=BreakerState.HALF_OPEN, changed_at=now, open_until=None)
        return BreakerDecision(
            half_open, BreakerEvent.HALF_OPENED, settings.probes, probing=True, reason="open period over"
        )

    # Half-open: the probes decide.
    if observation.probes_succeeded > 0:
        return _close(record, now, "a probe build succeeded")
    if observation.probes_failed > 0 and observation.probes_in_flight == 0:
        duration = min((record.open_duration or settings.open_duration) * 2, settings.open_duration_max)
        duration = max(duration, settings.open_duration)
        reopened = replace(
            record, state=BreakerState.OPEN, changed_at=now, open_until=now + duration, open_duration=duration
        )
        return BreakerDecision(reopened, BreakerEvent.REOPENED, 0, probing=False, reason="every probe build failed")
    if observation.probes_launched == 0 and not creates_wanted:
        return _close(record, now, "no preset needs a create: nothing to probe")
    allowed = max(settings.probes - observation.probes_launched, 0)
    return BreakerDecision(record, None, allowed, probing=True, reason="waiting for probe builds")


def _close(record: BreakerRecord, now: datetime, reason: str) -> BreakerDecision:
    closed = BreakerRecord(state=BreakerState.CLOSED, episode=record.episode, changed_at=now)
    return BreakerDecision(closed, BreakerEvent.CLOSED, None, probing=False, reason=reason)
