"""Which plan problems to log: each distinct problem once when it appears, and once when it clears.

The planner reports a data problem (an ignored schedule, a capped target, an invalidation in the future, a
preset it failed on) in every plan for as long as the rows hold it: the plan is a pure function of the
rows. Logging it on every pass would bury everything else (one line per preset per minute, for days), so
the daemon remembers what it has reported and logs only the changes. A problem is its preset, its event
and its detail: a different detail (another cron, another target) is a new problem.

The memory is per process: after a restart every current problem is logged once again, and with several
replicas each one logs a problem once when it first sees it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from uuid import UUID

from reconciler.plan import PlanProblem


@dataclass(frozen=True, slots=True)
class ProblemChanges:
    appeared: tuple[PlanProblem, ...] = ()
    cleared: tuple[PlanProblem, ...] = ()


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

    def __init__(self) -> None:
        self._reported: tuple[PlanProblem, ...] = ()

    @property
    def reported(self) -> tuple[PlanProblem, ...]:
        return self._reported

    def update(self, current: Sequence[PlanProblem], *, scope: Collection[UUID] | None = None) -> ProblemChanges:
        """What to log for the plan whose problems are `current`; from now on, those are the reported ones.

        With `scope` (a targeted pass's presets), only the problems of those presets are compared; the
        others' stay reported as they were.
        """
        if scope is None:
            found = changes(self._reported, current)
            self._reported = tuple(dict.fromkeys(current))
            return found
        inside = tuple(problem for problem in self._reported if problem.preset_id in scope)
        found = changes(inside, current)
        outside = tuple(problem for problem in self._reported if problem.preset_id not in scope)
        self._reported = tuple(dict.fromkeys((*outside, *current)))
        return found
