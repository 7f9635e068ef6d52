"""Surge replacement and time-to-live jitter (issue 15 point 4), pure."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler import rotation

NOW = datetime(2025, 6, 2, 12, 0, tzinfo=UTC)
HOUR = 3600


@dataclass(frozen=True)
class Prebuild:
    workspace_id: uuid.UUID
    ready: bool = True


def expired(count: int, *, ready: bool = True, start: int = 0) -> list[Prebuild]:
    return [Prebuild(uuid.UUID(int=start + index + 1), ready) for index in range(count)]


def test_without_surge_it_is_coders_rule_delete_every_expired_and_create_what_is_missing() -> None:
    old = expired(3)
    result = rotation.rotate(desired=3, fresh=0, fresh_ready=0, starting=0, expired=old, surge=0)
    assert result.delete == tuple(prebuild.workspace_id for prebuild in old)
    assert result.kept == ()
    assert result.creates == 3
    assert result.creates_held == 0


def test_surge_keeps_the_ready_expired_ones_and_creates_at_most_surge_beyond_the_target() -> None:
    old = expired(3)
    result = rotation.rotate(desired=3, fresh=0, fresh_ready=0, starting=0, expired=old, surge=1)
    assert result.delete == ()
    assert set(result.kept) == {prebuild.workspace_id for prebuild in old}
    assert result.creates == 1
    assert result.creates_held == 2


def test_an_expired_one_goes_when_a_replacement_is_ready_oldest_first() -> None:
    old = expired(3)
    result = rotation.rotate(desired=3, fresh=1, fresh_ready=1, starting=0, expired=old, surge=1)
    assert result.delete == (old[0].workspace_id,)
    assert result.kept == (old[1].workspace_id, old[2].workspace_id)
    assert result.creates == 1


def test_a_replacement_that_is_running_but_not_ready_does_not_free_an_expired_one() -> None:
    old = expired(2)
    result = rotation.rotate(desired=2, fresh=1, fresh_ready=0, starting=0, expired=old, surge=1)
    assert result.delete == ()
    assert result.creates == 0


def test_expired_ones_that_are_not_ready_serve_nobody_and_go_at_once() -> None:
    ready = expired(1)
    broken = expired(2, ready=False, start=10)
    result = rotation.rotate(desired=3, fresh=0, fresh_ready=0, starting=0, expired=broken + ready, surge=1)
    assert set(result.delete) == {prebuild.workspace_id for prebuild in broken}
    assert result.kept == (ready[0].workspace_id,)
    # Target 3, surge 1: 4 at most, one of them the kept expired prebuild.
    assert result.creates == 3


def test_a_lowered_target_keeps_nothing_it_does_not_need() -> None:
    result = rotation.rotate(desired=0, fresh=0, fresh_ready=0, starting=0, expired=expired(2), surge=2)
    assert len(result.delete) == 2
    assert result.creates == 0


def simulate(desired: int, surge: int, build_passes: int) -> list[int]:
    """A whole pool expires at once; each pass applies the rotation, builds take `build_passes` passes.

    Returns the claimable (ready) count at the end of every pass.
    """
    kept = [Prebuild(uuid.UUID(int=index + 1)) for index in range(desired)]
    fresh_ready = 0
    building: list[int] = []  # passes left per build
    claimable = []
    for _ in range(40):
        done = sum(1 for left in building if left <= 0)
        fresh_ready += done
        building = [left for left in building if left > 0]
        result = rotation.rotate(
            desired=desired,
            fresh=fresh_ready,
            fresh_ready=fresh_ready,
            starting=len(building),
            expired=kept,
            surge=surge,
        )
        deleted = set(result.delete)
        kept = [prebuild for prebuild in kept if prebuild.workspace_id not in deleted]
        building = [left - 1 for left in building] + [build_passes - 1] * result.creates
        claimable.append(fresh_ready + len(kept))
    return claimable


@given(desired=st.integers(1, 12), surge=st.integers(1, 4), build_passes=st.integers(1, 5))
@settings(max_examples=200)
def test_with_surge_the_claimable_count_never_drops_during_a_rotation_and_it_completes(
    desired: int, surge: int, build_passes: int
) -> None:
    claimable = simulate(desired, surge, build_passes)
    assert min(claimable) == desired
    assert claimable[-1] == desired


def test_without_surge_the_claimable_count_drops_to_zero() -> None:
    assert min(simulate(4, 0, 3)) == 0


def test_ttl_jitter_shortens_the_life_by_at_most_the_fraction_and_is_deterministic() -> None:
    lives = [rotation.time_to_live(HOUR, 0.2, uuid.uuid4()) for _ in range(500)]
    assert all(timedelta(seconds=HOUR * 0.8) <= life <= timedelta(seconds=HOUR) for life in lives)
    # Spread over the last fifth of the hour, not piled up.
    assert max(lives) - min(lives) > timedelta(minutes=10)
    workspace = uuid.UUID("2f0c8a3e-44f7-4f0e-9b6b-8b8f1ad8c9d1")
    assert rotation.time_to_live(HOUR, 0.2, workspace) == rotation.time_to_live(HOUR, 0.2, workspace)


def test_no_jitter_is_the_plain_time_to_live_strictly() -> None:
    workspace = uuid.uuid4()
    created = NOW - timedelta(seconds=HOUR)
    assert not rotation.expired_by_ttl(created, workspace, HOUR, 0.0, NOW)
    assert rotation.expired_by_ttl(created - timedelta(microseconds=1), workspace, HOUR, 0.0, NOW)
    assert not rotation.expired_by_ttl(created - timedelta(days=9), workspace, None, 0.5, NOW)
    assert not rotation.expired_by_ttl(created - timedelta(days=9), workspace, 0, 0.5, NOW)


def test_prebuilds_built_together_expire_at_different_passes() -> None:
    created = NOW
    workspaces = [uuid.uuid4() for _ in range(100)]
    passes = []
    for workspace in workspaces:
        minute = 0
        while not rotation.expired_by_ttl(created, workspace, HOUR, 0.25, created + timedelta(minutes=minute)):
            minute += 1
        passes.append(minute)
    assert min(passes) >= 45
    assert max(passes) <= 61
    assert len(set(passes)) >= 10
