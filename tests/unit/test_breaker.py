"""The breaker's state machine (issue 15 point 2), pure: every transition, and none that should not happen."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler import breaker
from reconciler.breaker import (
    BreakerEvent,
    BreakerObservation,
    BreakerRecord,
    BreakerSettings,
    BreakerState,
)

NOW = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)
SETTINGS = BreakerSettings(
    enabled=True,
    failure_threshold=0.5,
    min_builds=10,
    min_presets=3,
    window=timedelta(minutes=10),
    open_duration=timedelta(minutes=5),
    open_duration_max=timedelta(minutes=40),
    probes=3,
)
OUTAGE = BreakerObservation(completed=20, failed=18, failed_presets=9)
CLOSED = BreakerRecord()
NOTHING = BreakerObservation()


def decide(
    record: BreakerRecord,
    observation: BreakerObservation = NOTHING,
    now: datetime = NOW,
    *,
    creates_wanted: bool = True,
    settings: BreakerSettings = SETTINGS,
) -> breaker.BreakerDecision:
    return breaker.decide(settings, record, observation, now, creates_wanted=creates_wanted)


def opened() -> BreakerRecord:
    return decide(CLOSED, OUTAGE).record


def test_closed_stays_closed_and_allows_every_create_when_builds_succeed() -> None:
    decision = decide(CLOSED, BreakerObservation(completed=50, failed=3, failed_presets=3))
    assert decision.record == CLOSED
    assert decision.event is None
    assert decision.creates_allowed is None


def test_a_shared_outage_opens_it_a_new_episode_with_no_creates() -> None:
    decision = decide(BreakerRecord(episode=4, changed_at=NOW - timedelta(hours=2)), OUTAGE)
    assert decision.event is BreakerEvent.OPENED
    assert decision.event.notifies
    assert decision.creates_allowed == 0
    record = decision.record
    assert record.state is BreakerState.OPEN
    assert record.episode == 5
    assert record.opened_at == NOW
    assert record.open_until == NOW + SETTINGS.open_duration
    # The failures that opened it are the outage's: from the start of the window.
    assert record.failures_since == NOW - SETTINGS.window
    assert "18 of 20" in decision.reason


@pytest.mark.parametrize(
    ("observation", "why"),
    [
        (BreakerObservation(completed=9, failed=9, failed_presets=9), "fewer builds than min_builds"),
        (BreakerObservation(completed=40, failed=40, failed_presets=2), "fewer presets than min_presets"),
        (BreakerObservation(completed=40, failed=19, failed_presets=10), "below the threshold"),
        (BreakerObservation(), "nothing completed"),
    ],
)
def test_it_does_not_open_without_every_condition(observation: BreakerObservation, why: str) -> None:
    assert decide(CLOSED, observation).record.state is BreakerState.CLOSED, why


def test_exactly_at_the_threshold_it_opens() -> None:
    assert decide(CLOSED, BreakerObservation(completed=40, failed=20, failed_presets=3)).event is BreakerEvent.OPENED


def test_open_holds_creates_until_its_time_is_up_then_turns_half_open_with_probes() -> None:
    record = opened()
    still = decide(record, OUTAGE, NOW + SETTINGS.open_duration - timedelta(microseconds=1))
    assert still.record == record
    assert still.event is None
    assert still.creates_allowed == 0
    half = decide(record, OUTAGE, NOW + SETTINGS.open_duration)
    assert half.event is BreakerEvent.HALF_OPENED
    assert not half.event.notifies
    assert half.record.state is BreakerState.HALF_OPEN
    assert half.record.episode == record.episode
    assert half.record.changed_at == NOW + SETTINGS.open_duration
    assert half.creates_allowed == SETTINGS.probes
    assert half.probing


def half_open() -> BreakerRecord:
    return decide(opened(), now=NOW + SETTINGS.open_duration).record


def test_half_open_waits_for_its_probes_without_launching_more() -> None:
    decision = decide(half_open(), BreakerObservation(probes_in_flight=3), NOW + timedelta(minutes=6))
    assert decision.event is None
    assert decision.creates_allowed == 0
    partly = decide(half_open(), BreakerObservation(probes_in_flight=1), NOW + timedelta(minutes=6))
    assert partly.creates_allowed == 2


def test_a_probe_that_succeeds_closes_it_and_tells_so_once() -> None:
    record = half_open()
    decision = decide(record, BreakerObservation(probes_succeeded=1, probes_failed=1, probes_in_flight=1))
    assert decision.event is BreakerEvent.CLOSED
    assert decision.event.notifies
    assert decision.creates_allowed is None
    assert decision.record.state is BreakerState.CLOSED
    assert decision.record.episode == record.episode


def test_probes_that_all_failed_open_it_again_for_twice_as_long_up_to_the_maximum() -> None:
    record = half_open()
    durations = []
    at = NOW + timedelta(minutes=10)
    for _ in range(5):
        decision = decide(record, BreakerObservation(probes_failed=3), at)
        assert decision.event is BreakerEvent.REOPENED
        assert not decision.event.notifies
        assert decision.record.episode == record.episode
        duration = decision.record.open_duration
        assert duration is not None
        durations.append(duration)
        assert decision.record.open_until == at + duration
        at = at + duration
        record = decide(decision.record, now=at).record
        assert record.state is BreakerState.HALF_OPEN
    assert durations == [timedelta(minutes=minutes) for minutes in (10, 20, 40, 40, 40)]


def test_a_failed_probe_with_others_still_running_waits_for_them() -> None:
    decision = decide(half_open(), BreakerObservation(probes_failed=2, probes_in_flight=1))
    assert decision.event is None
    assert decision.record.state is BreakerState.HALF_OPEN


def test_half_open_with_nothing_to_probe_closes() -> None:
    assert decide(half_open(), creates_wanted=False).event is BreakerEvent.CLOSED
    assert decide(half_open(), creates_wanted=True).event is None


def test_the_window_never_reaches_back_before_the_last_change() -> None:
    closed_at = NOW - timedelta(minutes=2)
    record = BreakerRecord(state=BreakerState.CLOSED, episode=1, changed_at=closed_at)
    assert breaker.window_start(SETTINGS, record, NOW) == closed_at
    assert breaker.window_start(SETTINGS, CLOSED, NOW) == NOW - SETTINGS.window
    old = BreakerRecord(changed_at=NOW - timedelta(days=1))
    assert breaker.window_start(SETTINGS, old, NOW) == NOW - SETTINGS.window


def test_disabled_it_never_opens_and_an_episode_in_course_is_closed() -> None:
    off = BreakerSettings(enabled=False)
    assert decide(CLOSED, OUTAGE, settings=off).record == CLOSED
    assert decide(CLOSED, OUTAGE, settings=off).creates_allowed is None
    decision = decide(opened(), OUTAGE, settings=off)
    assert decision.event is BreakerEvent.CLOSED
    assert decision.creates_allowed is None


states = st.sampled_from(BreakerState)
observations = st.builds(
    BreakerObservation,
    completed=st.integers(0, 50),
    failed=st.integers(0, 50),
    failed_presets=st.integers(0, 10),
    probes_succeeded=st.integers(0, 3),
    probes_failed=st.integers(0, 3),
    probes_in_flight=st.integers(0, 3),
)


@given(
    state=states,
    episode=st.integers(0, 100),
    observation=observations,
    open_for=st.integers(-600, 600),
    creates_wanted=st.booleans(),
)
@settings(max_examples=500)
def test_invariants_of_every_transition(
    state: BreakerState, episode: int, observation: BreakerObservation, open_for: int, creates_wanted: bool
) -> None:
    record = BreakerRecord(
        state=state,
        episode=episode,
        changed_at=NOW - timedelta(minutes=1),
        open_until=NOW + timedelta(seconds=open_for) if state is BreakerState.OPEN else None,
        open_duration=SETTINGS.open_duration,
    )
    decision = decide(record, observation, creates_wanted=creates_wanted)
    after = decision.record
    # Episodes only grow, by one, and only when it opens from closed.
    assert after.episode == episode + (decision.event is BreakerEvent.OPENED)
    # Open allows no create; half-open only probes; closed everything.
    if after.state is BreakerState.OPEN:
        assert decision.creates_allowed == 0
        assert after.open_until is not None
        assert after.open_until > NOW
    elif after.state is BreakerState.HALF_OPEN:
        assert decision.creates_allowed is not None
        assert 0 <= decision.creates_allowed <= SETTINGS.probes
        assert decision.probing
    else:
        assert decision.creates_allowed is None
    # A change is stamped with now; no change leaves the record as it was.
    if decision.event is None:
        assert after == record
    else:
        assert after.changed_at == NOW
    # Closed never goes straight to half-open, and open never straight to closed.
    assert (state, after.state) not in {
        (BreakerState.CLOSED, BreakerState.HALF_OPEN),
        (BreakerState.OPEN, BreakerState.CLOSED),
    }
