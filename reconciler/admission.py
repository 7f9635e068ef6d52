"""The in-flight budget: which of the deletes and creates a plan wants may start this pass.

Pure. The provisioners can run only so many jobs at once; asking for everything at once queues the jobs
behind each other and lets one big template starve the rest. Given the budget (across the deployment,
and per template; 0 = unlimited), the prebuild jobs already in flight (whoever started them), and what
each preset wants:

1. Deletes first: they free capacity. They go by class (the order of `DELETE_CLASSES`: prebuilds of
   outdated versions, expired, extraneous, then the cleanup of failed ones), and within a class one
   preset at a time in turn, so that no preset's long list holds back another's.
2. Creates next, shared by relative deficit (creates wanted / target): first one create for every
   preset that wants any, the emptiest pools first; then each further create goes to the preset whose
   pool is, relatively, the emptiest still. No preset gets a second create while another that wants
   one has none, unless that one's template has no budget left.
3. A create limit from the breaker: none (open), or a few probes, one per template (half-open).
4. A create limit from the slow start (`RECONCILER_SLOW_START`): while no prebuild create has succeeded
   in the breaker's window, at most N prebuild creates in flight; the room left is shared as above.

Everything held back is counted with the reason that held it.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from uuid import UUID

# Classes of deletes, in the order they are admitted.
DELETE_CLASSES = ("inactive", "expired", "extraneous", "failed_cleanup")


class HoldReason(enum.StrEnum):
    MAX_IN_FLIGHT = "max_in_flight"
    MAX_IN_FLIGHT_PER_TEMPLATE = "max_in_flight_per_template"
    BREAKER_OPEN = "breaker_open"
    BREAKER_PROBING = "breaker_probing"
    SLOW_START = "slow_start"


@dataclass(frozen=True, slots=True)
class Budget:
    """`RECONCILER_MAX_IN_FLIGHT` and `RECONCILER_MAX_IN_FLIGHT_PER_TEMPLATE`; 0 = unlimited."""

    max_in_flight: int = 0
    max_in_flight_per_template: int = 0

    @property
    def unlimited(self) -> bool:
        return self.max_in_flight == 0 and self.max_in_flight_per_template == 0


@dataclass(frozen=True, slots=True)
class Wants:
    """What one preset's plan wants to start: deletes by class (see DELETE_CLASSES), and creates."""

    preset_id: UUID
    template_id: UUID
    # The preset's target; the base of its relative deficit.
    desired: int
    creates: int = 0
    deletes: Mapping[str, int] = field(default_factory=dict)

    @property
    def delete_total(self) -> int:
        return sum(self.deletes.values())


@dataclass(frozen=True, slots=True)
class Admitted:
    """What one preset may start, and what was held back and why."""

    creates: int = 0
    deletes: Mapping[str, int] = field(default_factory=dict)
    creates_held: int = 0
    deletes_held: int = 0
    creates_held_by: HoldReason | None = None
    deletes_held_by: HoldReason | None = None

    @property
    def delete_total(self) -> int:
        return sum(self.deletes.values())


@dataclass(frozen=True, slots=True)
class Admission:
    budget: Budget
    in_flight: int
    in_flight_by_template: Mapping[UUID, int]
    presets: Mapping[UUID, Admitted]

    @property
    def admitted(self) -> int:
        return sum(admitted.creates + admitted.delete_total for admitted in self.presets.values())

    @property
    def creates_held(self) -> int:
        return sum(admitted.creates_held for admitted in self.presets.values())

    @property
    def deletes_held(self) -> int:
        return sum(admitted.deletes_held for admitted in self.presets.values())


_UNLIMITED = 1 << 62


class _Room:
    """What is left of the budget: across the deployment and per template."""

    def __init__(self, budget: Budget, in_flight: int, in_flight_by_template: Mapping[UUID, int]) -> None:
        self.overall = max(budget.max_in_flight - in_flight, 0) if budget.max_in_flight else _UNLIMITED
        self.per_template_limit = budget.max_in_flight_per_template
        self.in_flight_by_template = in_flight_by_template
        self.templates: dict[UUID, int] = {}

    def template(self, template_id: UUID) -> int:
        if not self.per_template_limit:
            return _UNLIMITED
        if template_id not in self.templates:
            used = self.in_flight_by_template.get(template_id, 0)
            self.templates[template_id] = max(self.per_template_limit - used, 0)
        return self.templates[template_id]

    def fits(self, template_id: UUID) -> bool:
        return self.overall > 0 and self.template(template_id) > 0

    def take(self, template_id: UUID, count: int = 1) -> None:
        self.overall -= count
        if self.per_template_limit:
            self.templates[template_id] = self.template(template_id) - count

    def why_not(self, template_id: UUID) -> HoldReason:
        return HoldReason.MAX_IN_FLIGHT_PER_TEMPLATE if self.template(template_id) <= 0 else HoldReason.MAX_IN_FLIGHT


def admit(
    wants: Sequence[Wants],
    budget: Budget,
    in_flight: int,
    in_flight_by_template: Mapping[UUID, int],
    *,
    creates_allowed: int | None = None,
    probing: bool = False,
    slow_start: int | None = None,
) -> Admission:
    """Admit what fits. `creates_allowed` caps creates across the deployment (the breaker: 0 when open, the
    number of probes when half-open); `probing` admits at most one create per template; `slow_start`, when
    the slow start holds, is the room it leaves for creates (its limit less the creates in flight)."""
    wanting = [want for want in wants if want.creates or want.delete_total]
    room = _Room(budget, in_flight, in_flight_by_template)
    deletes = _admit_deletes(wanting, room)
    create_room = room.overall
    for limit in (creates_allowed, slow_start):
        if limit is not None:
            create_room = min(create_room, max(limit, 0))
    creates = _admit_creates(wanting, room, create_room, probing=probing)

    presets: dict[UUID, Admitted] = {}
    for want in wanting:
        admitted_deletes = deletes.get(want.preset_id, {})
        admitted_creates = creates.get(want.preset_id, 0)
        deletes_held = want.delete_total - sum(admitted_deletes.values())
        creates_held = want.creates - admitted_creates
        presets[want.preset_id] = Admitted(
            creates=admitted_creates,
            deletes=admitted_deletes,
            creates_held=creates_held,
            deletes_held=deletes_held,
            creates_held_by=(
                _create_hold_reason(want, room, creates_allowed, probing, slow_start) if creates_held else None
            ),
            deletes_held_by=room.why_not(want.template_id) if deletes_held else None,
        )
    return Admission(budget, in_flight, dict(in_flight_by_template), presets)


def _create_hold_reason(
    want: Wants, room: _Room, creates_allowed: int | None, probing: bool, slow_start: int | None
) -> HoldReason:
    if creates_allowed == 0 and not probing:
        return HoldReason.BREAKER_OPEN
    if room.template(want.template_id) <= 0:
        return HoldReason.MAX_IN_FLIGHT_PER_TEMPLATE
    if room.overall <= 0:
        return HoldReason.MAX_IN_FLIGHT
    if probing:
        # Half-open: the probes are spent, or this template already has its probe.
        return HoldReason.BREAKER_PROBING
    if slow_start is not None:
        return HoldReason.SLOW_START
    return HoldReason.BREAKER_PROBING


def _admit_deletes(wanting: Sequence[Wants], room: _Room) -> dict[UUID, dict[str, int]]:
    admitted: dict[UUID, dict[str, int]] = {}
    for delete_class in DELETE_CLASSES:
        queue = [(want, want.deletes.get(delete_class, 0)) for want in wanting if want.deletes.get(delete_class, 0)]
        if not queue:
            continue
        # Everything of this class fits (the common case): no turns to take.
        if _all_fit(room, [(want.template_id, count) for want, count in queue]):
            for want, count in queue:
                admitted.setdefault(want.preset_id, {})[delete_class] = count
                room.take(want.template_id, count)
            continue
        # One per preset in turn, until the class is admitted or no preset of it fits any more.
        remaining = {want.preset_id: count for want, count in queue}
        while room.overall > 0:
            progressed = False
            for want, _ in queue:
                if remaining[want.preset_id] and room.fits(want.template_id):
                    remaining[want.preset_id] -= 1
                    counts = admitted.setdefault(want.preset_id, {})
                    counts[delete_class] = counts.get(delete_class, 0) + 1
                    room.take(want.template_id)
                    progressed = True
                    if room.overall <= 0:
                        break
            if not progressed:
                break
    return admitted


def _all_fit(room: _Room, counts: Sequence[tuple[UUID, int]]) -> bool:
    """Whether every (template, count) fits in what is left, together."""
    if room.overall < sum(count for _, count in counts):
        return False
    if not room.per_template_limit:
        return True
    by_template: dict[UUID, int] = {}
    for template_id, count in counts:
        by_template[template_id] = by_template.get(template_id, 0) + count
    return all(room.template(template_id) >= count for template_id, count in by_template.items())


def _relative_deficit(wanted: int, desired: int) -> Fraction:
    return Fraction(wanted, max(desired, 1))


def _admit_creates(wanting: Sequence[Wants], room: _Room, allowed: int, *, probing: bool) -> dict[UUID, int]:
    candidates = [want for want in wanting if want.creates > 0]
    if not candidates or allowed <= 0:
        return {}
    total = sum(want.creates for want in candidates)
    if not probing and total <= allowed and _all_fit(room, [(want.template_id, want.creates) for want in candidates]):
        for want in candidates:
            room.take(want.template_id, want.creates)
        return {want.preset_id: want.creates for want in candidates}

    given: dict[UUID, int] = {}
    budget_left = allowed

    def give(want: Wants) -> None:
        nonlocal budget_left
        given[want.preset_id] = given.get(want.preset_id, 0) + 1
        room.take(want.template_id)
        budget_left -= 1

    # Round one: a create for every preset that wants one, the relatively emptiest first (ties by id, so
    # that a plan is the same every time it is computed).
    first_round = sorted(
        candidates, key=lambda want: (-_relative_deficit(want.creates, want.desired), str(want.preset_id))
    )
    probed_templates: set[UUID] = set()
    for want in first_round:
        if budget_left <= 0:
            break
        if probing and want.template_id in probed_templates:
            continue
        if room.fits(want.template_id):
            give(want)
            probed_templates.add(want.template_id)
    if probing:
        return given

    # Then one at a time to the preset with the largest relative deficit left.
    heap = [
        (-_relative_deficit(want.creates - given.get(want.preset_id, 0), want.desired), str(want.preset_id), index)
        for index, want in enumerate(candidates)
        if want.creates > given.get(want.preset_id, 0)
    ]
    heapq.heapify(heap)
    while heap and budget_left > 0:
        _, _, index = heapq.heappop(heap)
        want = candidates[index]
        if not room.fits(want.template_id):
            # Its template is full: nothing more for this preset this pass.
            continue
        give(want)
        left = want.creates - given[want.preset_id]
        if left:
            heapq.heappush(heap, (-_relative_deficit(left, want.desired), str(want.preset_id), index))
    return given
