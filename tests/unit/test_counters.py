"""The counters' bookkeeping (`reconciler.counters`), on reads written by hand."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from uuid import UUID

from reconciler.counters import FULL_READ_EVERY, ChangesRead, FirstBuild, FullRead, Labels, PrebuildCounters
from reconciler.snapshot import PrebuildTotals

T0 = datetime(2026, 1, 5, 12, tzinfo=UTC)
OLD = uuid.uuid4()
NEW = uuid.uuid4()
LABELS: dict[UUID, Labels] = {OLD: ("go", "small", "acme"), NEW: ("go", "small", "acme")}


def build(
    preset: UUID | None, status: str = "succeeded", *, claimed: bool = False, deleted: bool = False
) -> FirstBuild:
    return FirstBuild(uuid.uuid4(), uuid.uuid4(), preset, status, claimed, deleted)


def texts(*workspace_ids: UUID) -> set[str]:
    return {str(workspace_id) for workspace_id in workspace_ids}


def started(totals: Mapping[UUID, PrebuildTotals], open_builds: list[FirstBuild]) -> PrebuildCounters:
    counters = PrebuildCounters()
    counters.reset(FullRead(at=T0, totals=totals, open=open_builds, recent=[], labels=LABELS))
    return counters


def changes(
    minutes: int,
    *,
    recent: list[FirstBuild] | None = None,
    open_builds: list[FirstBuild] | None = None,
    departed: list[FirstBuild] | None = None,
    labels: Mapping[UUID, Labels] = LABELS,
) -> ChangesRead:
    return ChangesRead(
        at=T0.replace(minute=minutes),
        recent=recent or [],
        open=open_builds or [],
        departed=departed or [],
        labels=labels,
        looked_up_workspaces=frozenset(build.workspace_id for build in departed or []),
    )


def test_presets_of_the_same_names_add_up_across_versions() -> None:
    counters = started({OLD: PrebuildTotals(20, 5, 3), NEW: PrebuildTotals(3, 8, 15)}, [])
    assert counters.by_labels() == {("go", "small", "acme"): PrebuildTotals(23, 13, 18)}


def test_new_builds_failures_and_claims_are_counted_once() -> None:
    live = build(OLD)
    other = build(OLD)
    pending = build(OLD, "pending")
    counters = started({OLD: PrebuildTotals(3, 0, 0)}, [live, other, pending])
    assert set(counters.live_workspace_ids()) == texts(live.workspace_id, other.workspace_id, pending.workspace_id)

    new = build(NEW, "failed")
    failed = FirstBuild(pending.id, pending.workspace_id, OLD, "failed", False, False)
    claimed = FirstBuild(live.id, live.workspace_id, OLD, "succeeded", True, False)
    # The failure completed in the window; the claim left the live prebuilds; a new build failed.
    counters.apply(changes(1, recent=[failed, new], departed=[claimed]))
    assert counters.by_labels() == {("go", "small", "acme"): PrebuildTotals(4, 2, 1)}
    assert set(counters.live_workspace_ids()) == texts(other.workspace_id, pending.workspace_id, new.workspace_id)
    # The same rows again (the overlap window): nothing more.
    counters.apply(changes(2, recent=[failed, new]))
    assert counters.by_labels() == {("go", "small", "acme"): PrebuildTotals(4, 2, 1)}
    assert counters.preset_counts() == {OLD: PrebuildTotals(3, 1, 1), NEW: PrebuildTotals(1, 1, 0)}
    # A live prebuild with no news stays followed; once out of the window, the settled claim is not.
    counters.apply(changes(3))
    assert set(counters.live_workspace_ids()) == texts(other.workspace_id, pending.workspace_id, new.workspace_id)


def test_a_settled_build_leaves_the_tracked_set_once_out_of_the_window() -> None:
    counters = started({}, [])
    done = build(OLD, deleted=True)
    counters.apply(changes(1, recent=[done]))
    assert counters.tracked_builds == 1
    counters.apply(changes(2))
    assert counters.tracked_builds == 0


def test_a_removed_or_renamed_preset_lowers_no_series() -> None:
    counters = started({OLD: PrebuildTotals(4, 1, 1), NEW: PrebuildTotals(2, 0, 1)}, [])
    renamed = {NEW: ("go", "large", "acme")}
    counters.apply(changes(1, labels=renamed))
    assert counters.by_labels() == {
        ("go", "small", "acme"): PrebuildTotals(6, 1, 2),
        ("go", "large", "acme"): PrebuildTotals(2, 0, 1),
    }
    # A full read of a history that lost rows (the old preset's builds name no preset any more).
    counters.reset(
        FullRead(at=T0.replace(minute=2), totals={NEW: PrebuildTotals(1, 0, 1)}, open=[], recent=[], labels=renamed)
    )
    assert counters.by_labels()[("go", "small", "acme")] == PrebuildTotals(6, 1, 2)
    assert counters.by_labels()[("go", "large", "acme")] == PrebuildTotals(2, 0, 1)
    # What the preset gains after that is counted again from its new, lower count.
    counters.apply(changes(3, recent=[build(NEW)], labels=renamed))
    assert counters.by_labels()[("go", "large", "acme")] == PrebuildTotals(3, 0, 1)


def test_a_build_whose_preset_was_removed_counts_for_no_series() -> None:
    counters = started({}, [])
    counters.apply(changes(1, recent=[build(None, "failed")]))
    assert counters.by_labels() == {}


def test_the_whole_history_is_read_again_every_hour() -> None:
    counters = PrebuildCounters()
    assert counters.full_read_due
    counters.reset(FullRead(at=T0, totals={}, open=[], recent=[], labels={}))
    assert not counters.full_read_due
    counters.apply(ChangesRead(at=T0 + FULL_READ_EVERY, recent=[], open=[], departed=[], labels={}))
    assert counters.full_read_due
