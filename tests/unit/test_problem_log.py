"""ProblemLog's reminders: a state that lasts is said again at most every `remind_every`."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from reconciler.plan import PlanProblem
from reconciler.problem_log import ProblemLog

START = datetime(2026, 1, 1, tzinfo=UTC)
LIMITED = PlanProblem(uuid.UUID(int=1), "preset.creates_skipped_hard_limited", "")
OTHER = PlanProblem(uuid.UUID(int=2), "preset.creates_skipped_hard_limited", "")


def test_appears_once_is_reminded_every_interval_and_clears_once() -> None:
    log = ProblemLog(remind_every=timedelta(minutes=5))
    seen = []
    for second in range(0, 11 * 60, 30):
        found = log.update([LIMITED], now=START + timedelta(seconds=second))
        seen.append((second, len(found.appeared), len(found.reminded), len(found.cleared)))
    assert [entry for entry in seen if entry[1:] != (0, 0, 0)] == [(0, 1, 0, 0), (300, 0, 1, 0), (600, 0, 1, 0)]
    found = log.update([], now=START + timedelta(minutes=11))
    assert found.cleared == (LIMITED,)
    # Back again: a new start, logged at once, then reminded 5 minutes after that.
    assert log.update([LIMITED], now=START + timedelta(minutes=12)).appeared == (LIMITED,)
    assert log.update([LIMITED], now=START + timedelta(minutes=16)).reminded == ()
    assert log.update([LIMITED], now=START + timedelta(minutes=17)).reminded == (LIMITED,)


def test_each_problem_has_its_own_reminder_clock() -> None:
    log = ProblemLog(remind_every=timedelta(minutes=5))
    log.update([LIMITED], now=START)
    log.update([LIMITED, OTHER], now=START + timedelta(minutes=3))
    assert log.update([LIMITED, OTHER], now=START + timedelta(minutes=5)).reminded == (LIMITED,)
    assert log.update([LIMITED, OTHER], now=START + timedelta(minutes=8)).reminded == (OTHER,)


def test_without_remind_every_or_now_there_are_no_reminders() -> None:
    plain = ProblemLog()
    plain.update([LIMITED], now=START)
    assert plain.update([LIMITED], now=START + timedelta(days=1)).reminded == ()
    reminding = ProblemLog(remind_every=timedelta(minutes=5))
    reminding.update([LIMITED])
    assert reminding.update([LIMITED]).reminded == ()
