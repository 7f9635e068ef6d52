"""What one pass reads: a consistent picture of every preset that has prebuilds.

These types are filled by `store/reads.py` from one REPEATABLE READ transaction and consumed by the pure
planner. They carry only what the rules of BEHAVIOR.md need; every timestamp is timezone-aware UTC.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple, Protocol
from uuid import UUID

from reconciler.breaker import BreakerObservation, BreakerRecord
from reconciler.demand import DemandCounts
from reconciler.failed_cleanup import FailedPrebuild

# The prebuilds system user: owner of every prebuilt workspace until it is claimed.
PREBUILDS_SYSTEM_USER_ID = UUID("c42fdf75-3097-471c-8c33-fb52454d81c0")


class PrebuildStatus(enum.StrEnum):
    NORMAL = "normal"
    HARD_LIMITED = "hard_limited"
    VALIDATION_FAILED = "validation_failed"


class Transition(enum.StrEnum):
    START = "start"
    STOP = "stop"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Schedule:
    """A schedule row: while `cron_expression` (a time range) contains now, the target is `desired_instances`."""

    cron_expression: str
    desired_instances: int


@dataclass(frozen=True, slots=True)
class Preset:
    """A preset that has prebuilds (`desired_instances IS NOT NULL`), on any template version."""

    id: UUID
    name: str
    template_id: UUID
    template_name: str
    template_version_id: UUID
    template_version_name: str
    organization_id: UUID
    organization_name: str
    desired_instances: int
    invalidate_after_secs: int | None
    scheduling_timezone: str
    prebuild_status: PrebuildStatus
    last_invalidated_at: datetime | None
    # The preset's version is its template's active version.
    is_active_version: bool
    template_deleted: bool
    template_deprecated: bool
    schedules: tuple[Schedule, ...] = ()
    # Ours: how many failure episodes (hard limit, validation failure) the preset has had.
    failure_episode: int = 0
    # Ours: when `prebuild_status` last changed (None: never, or by a component that does not say).
    status_changed_at: datetime | None = None
    # A target computed from demand every pass (docs/DEMAND.md); None or blank: the static or scheduled one.
    desired_instances_expression: str | None = None

    @property
    def active(self) -> bool:
        """Active: on the active version of a template that is neither deleted nor deprecated."""
        return self.is_active_version and not self.template_deleted and not self.template_deprecated


class NamedPreset(Protocol):
    """What names a preset in a log line: a `Preset`, or `PresetNames` (what could be read of a bad row)."""

    @property
    def id(self) -> UUID | None: ...
    @property
    def name(self) -> str | None: ...
    @property
    def template_name(self) -> str | None: ...
    @property
    def template_version_name(self) -> str | None: ...
    @property
    def organization_name(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class PresetNames:
    id: UUID | None
    name: str | None = None
    template_name: str | None = None
    template_version_name: str | None = None
    organization_name: str | None = None


def preset_log_fields(preset: NamedPreset) -> dict[str, str | None]:
    """The fields by which every log line names a preset, the same everywhere, for searching the logs."""
    return {
        "preset_id": str(preset.id) if preset.id is not None else None,
        "preset_name": preset.name,
        "template_name": preset.template_name,
        "template_version_name": preset.template_version_name,
        "organization_name": preset.organization_name,
    }


class RunningPrebuild(NamedTuple):
    """A prebuild whose latest build is a succeeded `start`, counted for its current preset.

    A named tuple rather than a frozen dataclass: a fleet has tens of thousands of these per pass, and a
    tuple is built in a third of the time (immutable all the same).
    """

    workspace_id: UUID
    preset_id: UUID
    template_version_id: UUID
    ready: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class InProgress:
    """System-initiated builds still pending or running, on the template's active version."""

    preset_id: UUID
    template_version_id: UUID
    transition: Transition
    count: int
    # When the oldest of these builds that no provisioner has picked up yet was created (None: none is).
    oldest_pending_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class PendingNonActive:
    """First builds still waiting for a provisioner, on a version that is no longer active."""

    preset_id: UUID
    count: int


@dataclass(frozen=True, slots=True)
class Backoff:
    """Recent failures of a preset's prebuilds, as the backoff query computes them."""

    preset_id: UUID
    num_failed: int
    last_build_at: datetime


@dataclass(frozen=True, slots=True)
class PresetFailures:
    """A preset's recent failures (active version, since the last reset), for marking and notifying."""

    preset_id: UUID
    hard_limited: bool
    validation_failed: bool
    failure_streak: int
    last_error: str | None
    last_error_code: str | None
    last_failed_at: datetime | None
    # The failed prebuilds behind the verdict, newest first (at most `failure_hard_limit` of them).
    failed_workspace_ids: tuple[UUID, ...] = ()


@dataclass(frozen=True, slots=True)
class FailedPrebuilds:
    """A preset's failed prebuilds (latest build a failed start), oldest first, for their cleanup."""

    preset_id: UUID
    prebuilds: tuple[FailedPrebuild, ...]


@dataclass(frozen=True, slots=True)
class InFlight:
    """Prebuild build jobs pending or running for one template (creates and deletes, whoever started them)."""

    template_id: UUID
    jobs: int


@dataclass(frozen=True, slots=True)
class PresetDemand:
    """A preset's claim events (`prebuild_events`), read only for presets that have an expression."""

    preset_id: UUID
    counts: DemandCounts


@dataclass(frozen=True, slots=True)
class Snapshot:
    presets: tuple[Preset, ...] = ()
    running: tuple[RunningPrebuild, ...] = ()
    in_progress: tuple[InProgress, ...] = ()
    pending_non_active: tuple[PendingNonActive, ...] = ()
    backoffs: tuple[Backoff, ...] = ()
    # Presets whose most recent `failure_hard_limit` prebuilds all failed (the hard-limit query).
    hard_limited_preset_ids: frozenset[UUID] = field(default_factory=frozenset)
    # Presets whose latest failed prebuild carries a non-retryable error code.
    validation_failed_preset_ids: frozenset[UUID] = field(default_factory=frozenset)
    failures: tuple[PresetFailures, ...] = ()
    # The in-flight budget's use, per template (templates with none are absent).
    in_flight: tuple[InFlight, ...] = ()
    # The global breaker as the database holds it, and its evidence (issue 15.2).
    breaker: BreakerRecord = field(default_factory=BreakerRecord)
    breaker_observation: BreakerObservation = field(default_factory=BreakerObservation)
    # The slow start's evidence (RECONCILER_SLOW_START; read only when it is set): prebuild creates pending
    # or running, and whether a prebuild create completed successfully within the breaker's window.
    creates_in_flight: int = 0
    create_succeeded_recently: bool = True
    # Failed prebuilds per preset, for their cleanup (issue 15.5).
    failed_prebuilds: tuple[FailedPrebuilds, ...] = ()

    @property
    def in_flight_total(self) -> int:
        return sum(row.jobs for row in self.in_flight)

    demand: tuple[PresetDemand, ...] = ()


@dataclass(frozen=True, slots=True)
class PrebuildTotals:
    """A preset's lifetime counts of prebuilds, for the created/failed/claimed counters (read beside passes)."""

    created: int
    failed: int
    claimed: int
