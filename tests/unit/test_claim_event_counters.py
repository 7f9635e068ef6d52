"""The claim/miss counters only add what they newly see: no double count, nothing lowered, by name."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

from reconciler.claim_event_counters import ClaimEvent, ClaimEventCounters, EventsFullRead, EventsRead
from reconciler.counters import OVERLAP, Labels

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
OLD, NEW = uuid4(), uuid4()
SMALL: Labels = ("tpl", "small", "org")


def event(preset_id: UUID, event_type: str, at: datetime) -> ClaimEvent:
    return ClaimEvent(uuid4(), preset_id, event_type, at)


def test_the_start_up_count_then_only_unseen_events_of_known_types() -> None:
    counters = ClaimEventCounters()
    recent = event(OLD, "claim_succeeded", T0 - timedelta(minutes=1))
    counters.start(EventsFullRead(at=T0, counts={OLD: (4, 2)}, recent=[recent]))
    labels = {OLD: SMALL}
    counters.publish(labels)
    assert counters.by_labels() == {SMALL: (4, 2)}
    # The overlap window returns the start-up's recent event again, with a new miss and an unknown type.
    later = T0 + timedelta(minutes=1)
    missed = event(OLD, "claim_missed", later)
    counters.apply(EventsRead(at=later, recent=[recent, missed, event(OLD, "claim_cancelled", later)]))
    counters.publish(labels)
    assert counters.by_labels() == {SMALL: (4, 3)}
    counters.apply(EventsRead(at=later + timedelta(minutes=1), recent=[recent, missed]))
    counters.publish(labels)
    assert counters.by_labels() == {SMALL: (4, 3)}


def test_remembered_events_are_forgotten_once_out_of_the_window() -> None:
    counters = ClaimEventCounters()
    counters.start(EventsFullRead(at=T0, counts={}, recent=[event(OLD, "claim_succeeded", T0)]))
    assert counters.remembered_events == 1
    counters.apply(EventsRead(at=T0 + OVERLAP + timedelta(seconds=1), recent=[]))
    assert counters.remembered_events == 0
    assert counters.since == T0 + timedelta(seconds=1)


def test_two_versions_add_to_one_series_and_a_rename_leaves_the_old_series() -> None:
    counters = ClaimEventCounters()
    counters.start(EventsFullRead(at=T0, counts={OLD: (2, 1), NEW: (3, 0)}, recent=[]))
    counters.publish({OLD: SMALL, NEW: SMALL})
    assert counters.by_labels() == {SMALL: (5, 1)}
    renamed: Labels = ("tpl", "large", "org")
    counters.publish({OLD: SMALL, NEW: renamed})
    assert counters.by_labels() == {SMALL: (5, 1), renamed: (3, 0)}


def test_a_preset_without_labels_yet_is_added_once_it_has_them() -> None:
    counters = ClaimEventCounters()
    counters.start(EventsFullRead(at=T0, counts={NEW: (1, 1)}, recent=[]))
    counters.publish({})
    assert counters.by_labels() == {}
    counters.publish({NEW: SMALL})
    assert counters.by_labels() == {SMALL: (1, 1)}
