"""Which failed prebuilds are cleaned up (issue 15 point 5), pure."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler import failed_cleanup
from reconciler.failed_cleanup import CleanupPolicy, FailedPrebuild

NOW = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def failed(days_ago: float, index: int, *, protected: bool = False) -> FailedPrebuild:
    return FailedPrebuild(uuid.UUID(int=index), NOW - days_ago * DAY, protected)


def test_keeps_the_newest_and_the_young_deletes_the_rest_oldest_first() -> None:
    prebuilds = [failed(days, index) for index, days in enumerate([0.1, 0.5, 2, 3, 4, 5, 9], start=1)]
    chosen = failed_cleanup.select(prebuilds, CleanupPolicy(keep=3, keep_for=DAY), NOW)
    # The three newest (0.1, 0.5 and 2 days) stay; 3, 4, 5 and 9 days go, the oldest first.
    assert chosen == (uuid.UUID(int=7), uuid.UUID(int=6), uuid.UUID(int=5), uuid.UUID(int=4))


def test_young_ones_beyond_keep_stay() -> None:
    prebuilds = [failed(hours / 24, hours) for hours in range(1, 11)]
    assert failed_cleanup.select(prebuilds, CleanupPolicy(keep=1, keep_for=DAY), NOW) == ()


def test_exactly_keep_for_old_is_no_longer_younger_than_keep_for() -> None:
    prebuilds = [failed(0, 1), failed(1, 2)]
    assert failed_cleanup.select(prebuilds, CleanupPolicy(keep=1, keep_for=DAY), NOW) == (uuid.UUID(int=2),)


def test_protected_evidence_is_never_deleted_even_with_keep_zero() -> None:
    prebuilds = [failed(10, 1, protected=True), failed(11, 2), failed(12, 3, protected=True)]
    chosen = failed_cleanup.select(prebuilds, CleanupPolicy(keep=0, keep_for=timedelta(0)), NOW)
    assert chosen == (uuid.UUID(int=2),)


def test_keep_zero_and_keep_for_zero_is_bounded_per_pass() -> None:
    prebuilds = [failed(index, index) for index in range(1, 101)]
    chosen = failed_cleanup.select(prebuilds, CleanupPolicy(keep=0, keep_for=timedelta(0), per_pass=10), NOW)
    assert chosen == tuple(uuid.UUID(int=index) for index in range(100, 90, -1))


@given(
    ages=st.lists(st.integers(0, 100), max_size=30),
    protected=st.lists(st.booleans(), min_size=30, max_size=30),
    keep=st.integers(0, 5),
    keep_for_days=st.integers(0, 50),
    per_pass=st.integers(0, 8),
)
@settings(max_examples=400)
def test_what_is_chosen_is_never_protected_young_or_among_the_newest(
    ages: list[int], protected: list[bool], keep: int, keep_for_days: int, per_pass: int
) -> None:
    prebuilds = [failed(age, index, protected=protected[index]) for index, age in enumerate(ages)]
    policy = CleanupPolicy(keep=keep, keep_for=timedelta(days=keep_for_days), per_pass=per_pass)
    chosen = failed_cleanup.select(prebuilds, policy, NOW)
    by_id = {prebuild.workspace_id: prebuild for prebuild in prebuilds}
    newest = sorted(prebuilds, key=lambda prebuild: (prebuild.failed_at, str(prebuild.workspace_id)), reverse=True)
    newest_ids = {prebuild.workspace_id for prebuild in newest[:keep]}
    assert len(chosen) <= per_pass
    assert len(set(chosen)) == len(chosen)
    for workspace_id in chosen:
        prebuild = by_id[workspace_id]
        assert not prebuild.protected
        assert NOW - prebuild.failed_at >= policy.keep_for
        assert workspace_id not in newest_ids
    # Oldest first.
    assert [by_id[workspace_id].failed_at for workspace_id in chosen] == sorted(
        by_id[workspace_id].failed_at for workspace_id in chosen
    )
