"""Claim and miss counters per preset name, from the platform's claim events; never going down.

The platform's claim path writes a row in `prebuild_events` on every claim: `claim_succeeded` when a user
got a prebuild, `claim_missed` when none was claimable. The demand gauges count them over windows
(`reconciler.demand_metrics`); these counters count every one this process saw, by organization,
template and preset *name* across template versions, like the created/failed/claimed counters
(`reconciler.counters`), and by event type. Unknown event types are not counted.

The events are the platform's rows and the daemon purges them after a retention, so a count read from
the table can go down. The counters therefore only ever add what they newly see: one full count at
start-up, then the events created since the last refresh's time less `OVERLAP` (no column is assigned in
commit order: `created_at` is the writer's transaction start, or the writer's clock), de-duplicated by
event id. An event that commits more than `OVERLAP` after its `created_at` is missed; there is no hourly
full count, because a full count after a purge is lower and could hide new events in the difference.

Pure: the data comes from `reconciler.store.claim_events`; times are the database's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from reconciler.counters import OVERLAP, Labels

# The event types counted, in the order of the counts tuples.
EVENT_TYPES = ("claim_succeeded", "claim_missed")

Counts = tuple[int, int]


@dataclass(frozen=True, slots=True)
class ClaimEvent:
    id: UUID
    preset_id: UUID
    event_type: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class EventsFullRead:
    """Every event's count per preset, and the events created since `at - OVERLAP`, in one snapshot."""

    at: datetime
    counts: Mapping[UUID, Counts]
    recent: Sequence[ClaimEvent]


@dataclass(frozen=True, slots=True)
class EventsRead:
    """The events created since the last refresh's time less `OVERLAP`, read at `at`."""

    at: datetime
    recent: Sequence[ClaimEvent]


class ClaimEventCounters:
    def __init__(self) -> None:
        # Each preset's events counted by this process (including those counted at start-up).
        self._counts: dict[UUID, Counts] = {}
        # The events of the overlap window already counted, by id, with their time (to forget them).
        self._seen: dict[UUID, datetime] = {}
        self._watermark: datetime | None = None
        # The exported counters, and for each preset the labels and counts it was last added with.
        self._exported: dict[tuple[Labels, str], int] = {}
        self._published: dict[UUID, tuple[Labels, Counts]] = {}
        # Presets counted but not yet added to a series (no labels yet, or changed since the last publish).
        self._pending: set[UUID] = set()
        self._labels: Mapping[UUID, Labels] | None = None

    @property
    def started(self) -> bool:
        return self._watermark is not None

    @property
    def since(self) -> datetime:
        """The creation time from which the next refresh reads events."""
        assert self._watermark is not None, "count the events first"
        return self._watermark - OVERLAP

    @property
    def remembered_events(self) -> int:
        return len(self._seen)

    def start(self, read: EventsFullRead) -> None:
        """Take the start-up count (once: later refreshes only add)."""
        assert self._watermark is None, "the full count is taken once per process"
        for preset_id, counts in read.counts.items():
            self._add(preset_id, counts)
        self._watermark = read.at
        for event in read.recent:
            self._seen[event.id] = event.created_at
        self._forget_before(self.since)

    def apply(self, read: EventsRead) -> None:
        """Count the events not seen yet; forget the remembered ones that left the overlap window."""
        assert self._watermark is not None, "count the events first"
        for event in read.recent:
            if event.id in self._seen or event.event_type not in EVENT_TYPES:
                continue
            self._seen[event.id] = event.created_at
            self._add(event.preset_id, (1, 0) if event.event_type == EVENT_TYPES[0] else (0, 1))
        self._watermark = max(self._watermark, read.at)
        self._forget_before(self.since)

    def _add(self, preset_id: UUID, gained: Counts) -> None:
        succeeded, missed = self._counts.get(preset_id, (0, 0))
        self._counts[preset_id] = (succeeded + gained[0], missed + gained[1])
        self._pending.add(preset_id)

    def _forget_before(self, since: datetime) -> None:
        # An event is read again while its created_at is within the window; once before it, never again.
        for event_id in [event_id for event_id, created_at in self._seen.items() if created_at < since]:
            del self._seen[event_id]

    def publish(self, labels: Mapping[UUID, Labels]) -> None:
        """Add what each preset gained to the series of its current names (`labels`: every preset's)."""
        if labels is not self._labels:
            # New labels: a renamed preset's counts move to its new names (as a restart would count them).
            self._pending.update(self._published)
            self._labels = labels
        for preset_id in list(self._pending):
            preset_labels = labels.get(preset_id)
            if preset_labels is None:
                # Removed, or created after the labels were read: added once it has labels.
                continue
            self._pending.discard(preset_id)
            counts = self._counts.get(preset_id, (0, 0))
            published = self._published.get(preset_id)
            base = published[1] if published is not None and published[0] == preset_labels else (0, 0)
            for index, event_type in enumerate(EVENT_TYPES):
                key = (preset_labels, event_type)
                self._exported[key] = self._exported.get(key, 0) + max(0, counts[index] - base[index])
            self._published[preset_id] = (preset_labels, counts)

    def by_labels(self) -> dict[Labels, Counts]:
        exported: dict[Labels, Counts] = {}
        for (labels, event_type), value in self._exported.items():
            succeeded, missed = exported.get(labels, (0, 0))
            exported[labels] = (value, missed) if event_type == EVENT_TYPES[0] else (succeeded, value)
        return exported

    def preset_counts(self) -> dict[UUID, Counts]:
        """Each preset's events as counted (for tests)."""
        return dict(self._counts)
