"""The created/failed/claimed counters, kept by organization, template and preset name, never going down.

Coder counts prebuilds by organization, template and preset *name*, across template versions: when a new
version is published, its presets' creates, failures and claims add to the same series as the old
version's. The counts come from the database (a prebuild is counted by its first build: created when it
exists, failed when its job failed, claimed when its workspace has another owner), but the exported
counters are this process's: each preset's counts are followed as they grow, and only what a preset
gained is added to the series of its current names. So a series never goes down, whatever happens to
rows: a preset removed (its builds then name no preset) or renamed leaves its old series where it was,
and that series simply ends when no preset on an active version carries the name any more. A renamed
preset's history goes to the series of its new name, as a restarted process, reading the database
afresh, would count it too.

Reading every first build of the history on each refresh grew with the history (0.4 s at 1M builds, 1.9 s
at 4M, every minute), so after one full read at start-up the counts are kept up to date from what can
have changed since the last refresh (see `reconciler/store/totals.py` and docs/DECISIONS.md): first
builds whose job completed since the last refresh (less an overlap window, for writes that commit late
or come from a skewed clock) or is unfinished, and the live prebuilds that are no longer live (claimed or
deleted: found by comparing the ids of the live workspaces with the ones followed). The builds seen in
the overlap window are remembered by id, so none is counted twice. A full read every `FULL_READ_EVERY`
repairs anything the window missed, still without any counter going down.

Pure: the data comes from `reconciler.store.totals`; times are the database's.
"""

from __future__ import annotations

from collections.abc import KeysView, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple
from uuid import UUID

from reconciler.snapshot import PrebuildTotals

# The counters' labels, in the metrics' order: (template_name, preset_name, organization_name).
Labels = tuple[str, str, str]

# A write that commits this long after its job's completed_at (or whose writer's clock is this far
# behind the database's) is still seen by the next refresh.
OVERLAP = timedelta(minutes=10)
# How often the whole history is read again: it repairs what the overlap window missed.
FULL_READ_EVERY = timedelta(hours=1)

UNFINISHED_JOB_STATUSES = frozenset({"pending", "running", "canceling"})


@dataclass(frozen=True, slots=True)
class FirstBuild:
    """The first build of a prebuild, as the counters see it."""

    id: UUID
    workspace_id: UUID
    # None once the preset was removed (its builds keep no preset): then it counts for no series.
    preset_id: UUID | None
    job_status: str
    claimed: bool
    deleted: bool

    @property
    def failed(self) -> bool:
        return self.job_status == "failed"

    @property
    def open(self) -> bool:
        """Its counts may still change: the job may still fail, or the workspace still be claimed."""
        return self.job_status in UNFINISHED_JOB_STATUSES or not (self.claimed or self.deleted)


@dataclass(frozen=True, slots=True)
class FullRead:
    """The whole history, read in one snapshot at `at`."""

    at: datetime
    totals: Mapping[UUID, PrebuildTotals]
    # The first builds whose counts may still change, and those completed within `OVERLAP` before `at`.
    open: list[FirstBuild]
    recent: list[FirstBuild]
    labels: Mapping[UUID, Labels]
    labels_digest: str = ""


@dataclass(frozen=True, slots=True)
class ChangesRead:
    """What may have changed since the last refresh, read in one snapshot at `at`."""

    at: datetime
    # Completed since the last refresh's time less `OVERLAP`.
    recent: list[FirstBuild]
    # Unfinished jobs.
    open: list[FirstBuild]
    # The first builds of the workspaces in `looked_up_workspaces`: followed as live and no longer live
    # (claimed, deleted), or live and not followed yet. A workspace that is gone has no row.
    departed: list[FirstBuild]
    # None when they did not change since the last read (same digest).
    labels: Mapping[UUID, Labels] | None
    looked_up_workspaces: frozenset[UUID] = frozenset()
    labels_digest: str = ""


class _Counted(NamedTuple):
    """A first build followed, with what was counted of it."""

    preset_id: UUID
    workspace_id: UUID
    failed: bool
    claimed: bool
    deleted: bool
    unfinished: bool

    @property
    def live(self) -> bool:
        return not (self.claimed or self.deleted)

    @property
    def open(self) -> bool:
        return self.unfinished or self.live


Counts = tuple[int, int, int]


def _counted(build: FirstBuild, failed: bool, claimed: bool) -> _Counted:
    assert build.preset_id is not None
    return _Counted(
        build.preset_id,
        build.workspace_id,
        failed,
        claimed,
        build.deleted,
        build.job_status in UNFINISHED_JOB_STATUSES,
    )


class PrebuildCounters:
    def __init__(self) -> None:
        # Each preset's counts as followed in the database.
        self._counts: dict[UUID, Counts] = {}
        # The first builds that may still change or may be seen again (the overlap window), with what
        # was counted of them; the live ones also by workspace (its id as text, as the live set is read),
        # the others in a set. A refresh touches only what it read: its cost follows the changes.
        self._tracked: dict[UUID, _Counted] = {}
        self._live: dict[str, UUID] = {}
        self._not_live: set[UUID] = set()
        self._watermark: datetime | None = None
        self._last_full_read: datetime | None = None
        self._labels: Mapping[UUID, Labels] = {}
        self._labels_digest: str | None = None
        # The exported counters, and for each preset the labels and counts it was last added with.
        self._exported: dict[Labels, Counts] = {}
        self._published: dict[UUID, tuple[Labels, Counts]] = {}

    # --- what to read next ------------------------------------------------------------------------

    @property
    def full_read_due(self) -> bool:
        if self._watermark is None or self._last_full_read is None:
            return True
        return self._watermark - self._last_full_read >= FULL_READ_EVERY

    @property
    def since(self) -> datetime:
        """The completion time from which the next refresh reads first builds."""
        assert self._watermark is not None, "read the whole history first"
        return self._watermark - OVERLAP

    @property
    def labels_digest(self) -> str | None:
        return self._labels_digest

    @property
    def labels(self) -> Mapping[UUID, Labels]:
        """Every preset's labels as last read (a new mapping whenever they are read again)."""
        return self._labels

    def live_workspace_ids(self) -> KeysView[str]:
        """The workspaces (ids as text) of the first builds followed as live prebuilds."""
        return self._live.keys()

    # --- updates ----------------------------------------------------------------------------------

    def _follow(self, build_id: UUID, counted: _Counted | None) -> None:
        before = self._tracked.pop(build_id, None)
        if before is not None:
            if before.live:
                self._live.pop(str(before.workspace_id), None)
            else:
                self._not_live.discard(build_id)
        if counted is not None:
            self._tracked[build_id] = counted
            if counted.live:
                self._live[str(counted.workspace_id)] = build_id
            else:
                self._not_live.add(build_id)

    def reset(self, read: FullRead) -> None:
        """Take the whole history's counts (the exported counters only grow by what presets gained)."""
        self._counts = {
            preset_id: (total.created, total.failed, total.claimed) for preset_id, total in read.totals.items()
        }
        self._tracked, self._live, self._not_live = {}, {}, set()
        for build in [*read.recent, *read.open]:
            if build.preset_id is not None:
                self._follow(build.id, _counted(build, build.failed, build.claimed))
        self._watermark = self._last_full_read = read.at
        self._labels, self._labels_digest = read.labels, read.labels_digest
        self._publish(set(self._counts), labels_changed=True)

    def apply(self, read: ChangesRead) -> None:
        """Count what changed since the last refresh: new first builds, new failures, new claims."""
        assert self._watermark is not None, "read the whole history first"
        rows: dict[UUID, tuple[FirstBuild, bool]] = {}
        # Recent builds are kept (followed) even when settled: the next refresh's window still covers them.
        for build in read.recent:
            rows.setdefault(build.id, (build, True))
        for build in [*read.open, *read.departed]:
            rows.setdefault(build.id, (build, False))
        # Settled builds out of the window, unfinished ones of deleted workspaces that this read did not
        # return, and live ones whose workspace is gone: forgotten.
        for build_id in [build_id for build_id in self._not_live if build_id not in rows]:
            self._follow(build_id, None)
        for workspace_id in read.looked_up_workspaces:
            gone = self._live.get(str(workspace_id))
            if gone is not None and gone not in rows:
                self._follow(gone, None)
        changed: set[UUID] = set()
        for build, keep in rows.values():
            if build.preset_id is None:
                self._follow(build.id, None)
                continue
            before = self._tracked.get(build.id)
            if before is None:
                gained = (1, int(build.failed), int(build.claimed))
                failed, claimed = build.failed, build.claimed
            else:
                gained = (0, int(build.failed and not before.failed), int(build.claimed and not before.claimed))
                failed, claimed = build.failed or before.failed, build.claimed or before.claimed
            if gained != (0, 0, 0):
                created, failures, claims = self._counts.get(build.preset_id, (0, 0, 0))
                self._counts[build.preset_id] = (created + gained[0], failures + gained[1], claims + gained[2])
                changed.add(build.preset_id)
            self._follow(build.id, _counted(build, failed, claimed) if keep or build.open else None)
        self._watermark = read.at
        if read.labels is not None:
            self._labels, self._labels_digest = read.labels, read.labels_digest
        self._publish(changed, labels_changed=read.labels is not None)

    def _publish(self, changed: set[UUID], *, labels_changed: bool) -> None:
        labels = self._labels
        renamed = (
            {
                preset_id
                for preset_id, (published_labels, _) in self._published.items()
                if preset_id in labels and labels[preset_id] != published_labels
            }
            if labels_changed
            else set()
        )
        for preset_id in changed | renamed:
            preset_labels = labels.get(preset_id)
            if preset_labels is None:
                # The preset is gone (or appeared after the labels were read): counted once it has labels.
                continue
            counts = self._counts.get(preset_id, (0, 0, 0))
            published = self._published.get(preset_id)
            # A preset new to this process, or renamed, adds all of its counts to the series of its names.
            base = published[1] if published is not None and published[0] == preset_labels else (0, 0, 0)
            exported = self._exported.get(preset_labels, (0, 0, 0))
            self._exported[preset_labels] = (
                exported[0] + max(0, counts[0] - base[0]),
                exported[1] + max(0, counts[1] - base[1]),
                exported[2] + max(0, counts[2] - base[2]),
            )
            self._published[preset_id] = (preset_labels, counts)

    # --- results ----------------------------------------------------------------------------------

    def by_labels(self) -> dict[Labels, PrebuildTotals]:
        return {labels: PrebuildTotals(*counts) for labels, counts in self._exported.items()}

    def preset_counts(self) -> dict[UUID, PrebuildTotals]:
        """Each preset's counts as followed (for tests and the benchmark: they equal a full read's)."""
        return {preset_id: PrebuildTotals(*counts) for preset_id, counts in self._counts.items()}

    @property
    def tracked_builds(self) -> int:
        return len(self._tracked)
