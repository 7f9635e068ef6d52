"""Which plan problems to log: each distinct problem once when it appears, and once when it clears.

The planner reports a data problem (an ignored schedule, a capped target, an invalidation in the future, a
preset it failed on) in every plan for as long as the rows hold it: the plan is a pure function of the
rows. Logging it on every pass would bury everything else (one line per preset per minute, for days), so
the daemon remembers what it has reported and logs only the changes. A problem is its preset, its event
and its detail: a different detail (another cron, another target) is a new problem.

The memory is per process: after a restart every current problem is logged once again, and with several
replicas each one logs a problem once when it first sees it.

A log made with `remind_every` also says again, at most that often, that a problem still holds: for a
state an operator must not forget (creates withheld from a hard-limited preset), one line when it starts,
one when it ends, and a reminder every few minutes in between, instead of one line per preset per pass.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

from reconciler.plan import PlanProblem


@dataclass(frozen=True, slots=True)
class ProblemChanges:
    appeared: tuple[PlanProblem, ...] = ()
    cleared: tuple[PlanProblem, ...] = ()
    # Still holding, last logged at least `remind_every` ago (only with `remind_every` and a `now`).
    reminded: tuple[PlanProblem, ...] = ()


def changes(reported: Iterable[PlanProblem], current: Sequence[PlanProblem]) -> ProblemChanges:
    """The problems of `current` not yet `reported`, and those `reported` that `current` no longer has.

    Both in the order given (the plan's order), each distinct problem once.
    """
    reported_once = tuple(dict.fromkeys(reported))
    current_once = tuple(dict.fromkeys(current))
    reported_set, current_set = set(reported_once), set(current_once)
    return ProblemChanges(
        appeared=tuple(problem for problem in current_once if problem not in reported_set),
        cleared=tuple(problem for problem in reported_once if problem not in current_set),
    )


class ProblemLog:
    """The problems this process has logged and that still hold; one lives as long as the daemon."""

    def __init__(self, *, remind_every: timedelta | None = None) -> None:
        self._reported: tuple[PlanProblem, ...] = ()
        self._remind_every = remind_every
        # When each reported problem was last logged (appeared or reminded); kept with `remind_every` only.
        self._logged_at: dict[PlanProblem, datetime] = {}

    @property
    def reported(self) -> tuple[PlanProblem, ...]:
        return self._reported

    def update(
        self, current: Sequence[PlanProblem], *, scope: Collection[UUID] | None = None, now: datetime | None = None
    ) -> ProblemChanges:
        """What to log for the plan whose problems are `current`; from now on, those are the reported ones.

        With `scope` (a targeted pass's presets), only the problems of those presets are compared; the
        others' stay reported as they were. With `now` (and `remind_every`), the problems of `current`
        that were last logged `remind_every` or more before `now` are `reminded`.
        """
        if scope is None:
            found = changes(self._reported, current)
            self._reported = tuple(dict.fromkeys(current))
        else:
            inside = tuple(problem for problem in self._reported if problem.preset_id in scope)
            found = changes(inside, current)
            outside = tuple(problem for problem in self._reported if problem.preset_id not in scope)
            self._reported = tuple(dict.fromkeys((*outside, *current)))
        if self._remind_every is None or now is None:
            return found
        for problem in found.cleared:
            self._logged_at.pop(problem, None)
        appeared = set(found.appeared)
        reminded = []
        for problem in dict.fromkeys(current):
            if problem in appeared:
                self._logged_at[problem] = now
            elif now - self._logged_at.setdefault(problem, now) >= self._remind_every:
                self._logged_at[problem] = now
                reminded.append(problem)
        reminded_once = tuple(reminded)
        return ProblemChanges(appeared=found.appeared, cleared=found.cleared, reminded=reminded_once)
