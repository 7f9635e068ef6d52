"""The plan's types: what the planner decides for each preset (its counts, its status change, its ordered
actions), and what the executor then writes."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from reconciler.admission import HoldReason
from reconciler.breaker import BreakerDecision
from reconciler.snapshot import PrebuildStatus, Preset, PresetFailures, Snapshot
from reconciler.target import Target, TargetHold, TargetSource


class DeleteReason(enum.StrEnum):
    EXPIRED = "expired"
    EXTRANEOUS = "extraneous"
    INACTIVE = "inactive"
    # Within its time to live, but created before the preset's `last_invalidated_at`.
    INVALIDATED = "invalidated"
    # A failed prebuild beyond what RECONCILER_FAILED_PREBUILDS_KEEP(_FOR) keeps as evidence (issue 15.5).
    FAILED_CLEANUP = "failed_cleanup"


@dataclass(frozen=True, slots=True)
class BackoffAction:
    until: datetime
    num_failed: int
    type: str = "backoff"


@dataclass(frozen=True, slots=True)
class CancelPendingAction:
    count: int
    type: str = "cancel_pending"


@dataclass(frozen=True, slots=True)
class DeleteAction:
    workspace_ids: tuple[UUID, ...]
    reason: DeleteReason
    type: str = "delete"


@dataclass(frozen=True, slots=True)
class CreateAction:
    count: int
    type: str = "create"


Action = BackoffAction | CancelPendingAction | DeleteAction | CreateAction


@dataclass(frozen=True, slots=True)
class PresetState:
    """The eight counts of BEHAVIOR.md section 2."""

    desired: int = 0
    actual: int = 0
    eligible: int = 0
    extraneous: int = 0
    expired: int = 0
    starting: int = 0
    stopping: int = 0
    deleting: int = 0


class CreateBlock(enum.StrEnum):
    """Why creates were withheld from a preset that wanted them."""

    HARD_LIMITED = "hard_limited"
    VALIDATION_FAILED = "validation_failed"


class StatusChangeKind(enum.StrEnum):
    """A change of a preset's prebuild status (BEHAVIOR.md section 5); each is told to the template's admins."""

    HARD_LIMITED = "hard_limited"
    VALIDATION_FAILED = "validation_failed"
    RECOVERED = "recovered"

    @property
    def new_status(self) -> PrebuildStatus:
        if self is StatusChangeKind.RECOVERED:
            return PrebuildStatus.NORMAL
        return PrebuildStatus(self.value)


@dataclass(frozen=True, slots=True)
class StatusChange:
    """A preset's status change, for the executor to write with its notification."""

    kind: StatusChangeKind
    preset: Preset
    # The failures behind the change, for its log line and its notification (None when there are none).
    failures: PresetFailures | None = None


@dataclass(frozen=True, slots=True)
class PresetPlan:
    preset: Preset
    state: PresetState
    actions: tuple[Action, ...]
    hard_limited: bool
    # Set when the preset would have created prebuilds but may not.
    create_blocked: CreateBlock | None = None
    # How many creates were withheld because of `create_blocked`.
    creates_withheld: int = 0
    backoff_until: datetime | None = None
    # BEHAVIOR.md 3.4: inactive, with nothing running, pending or backing off; nothing to look at.
    skipped: bool = False
    # The status change this pass makes (written, with its notification, before the actions).
    status_change: StatusChangeKind | None = None
    # What the in-flight budget (or the breaker) held back from the actions, and why (issue 15.1): the
    # actions are what was admitted.
    # Ready expired prebuilds kept (claimable) until their replacements are ready (RECONCILER_SURGE):
    # the create clamp lets the pool hold this many beyond its target.
    surge_kept: int = 0
    creates_held: int = 0
    creates_held_by: HoldReason | None = None
    deletes_held: int = 0
    deletes_held_by: HoldReason | None = None
    # What `status` and `presets describe` explain (the actions above do not depend on them):
    # where `state.desired` came from, and the target before RECONCILER_MAX_DESIRED_INSTANCES cut it
    # (None: not capped);
    target_source: TargetSource = TargetSource.STATIC
    uncapped_target: int | None = None
    # why the preset's schedules were not used (None: they were, or it has none);
    schedule_problem: str | None = None
    # the failures behind backoff, hard limit and validation verdicts (streak, last error and code);
    failures: PresetFailures | None = None
    # when the oldest of its builds that no provisioner has picked up yet was created.
    oldest_pending_at: datetime | None = None
    # The target and where it came from (static, schedule, expression, ...): `state.desired` is its
    # `desired`. None only in plans built by hand.
    target: Target | None = None

    @property
    def prebuild_status(self) -> PrebuildStatus:
        """The preset's status once this pass has written its change; as read when it has none."""
        return self.status_change.new_status if self.status_change else self.preset.prebuild_status


@dataclass(frozen=True, slots=True)
class PlanProblem:
    """Something odd in the data that the planner worked around; the pass logs it."""

    preset_id: UUID
    event: str
    detail: str
    # For a preset the planner failed on: where (the formatted stack, without local variables). Not part
    # of the problem's identity: the same failure on the next pass is the same problem.
    traceback: str | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class BudgetUse:
    """The in-flight budget as this plan used it (issue 15.1); 0 = unlimited."""

    max_in_flight: int
    max_in_flight_per_template: int
    # Prebuild build jobs pending or running when the snapshot was read, across the deployment.
    in_flight: int
    # Jobs the plan's actions start (creates and deletes admitted).
    admitted: int = 0
    creates_held: int = 0
    deletes_held: int = 0
    # RECONCILER_SLOW_START when the slow start holds this pass (no prebuild create succeeded within the
    # breaker's window), else 0; and the prebuild creates in flight it counted.
    slow_start: int = 0
    creates_in_flight: int = 0


@dataclass(frozen=True, slots=True)
class Plan:
    generated_at: datetime
    presets: tuple[PresetPlan, ...]
    problems: tuple[PlanProblem, ...] = ()
    # Every status change of the pass, in snapshot order; also those of a preset the planner failed on,
    # which is not in `presets`: its status follows from its failures alone.
    status_changes: tuple[StatusChange, ...] = ()
    # The in-flight budget, when one is set or the slow start holds (None: unlimited, nothing was admitted
    # or held).
    budget: BudgetUse | None = None
    # The global breaker's decision this pass (None: disabled and closed). The executor writes its
    # record when it changed, with one notification per episode.
    breaker: BreakerDecision | None = None
    # The snapshot the plan was computed from (not part of the plan's value: two plans of different
    # snapshots can be equal).
    snapshot: Snapshot | None = field(default=None, repr=False, compare=False)

    @property
    def holds(self) -> dict[UUID, TargetHold]:
        """What the next pass must remember of each expression preset's stabilization."""
        return {
            preset_plan.preset.id: preset_plan.target.hold
            for preset_plan in self.presets
            if preset_plan.target is not None and preset_plan.target.hold is not None
        }
