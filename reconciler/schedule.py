"""Prebuild schedules: a cron expression read as a *time range* (BEHAVIOR.md section 2, "target").

`* 9-18 * * 1-5` covers 09:00:00 to 18:59:59, Monday to Friday, in the preset's time zone. The minute
field must be `*`: a schedule says which hours need a bigger pool, not when to fire. Weekday 0 is
Sunday; 7 is refused (some crons accept it as Sunday too, which makes `0,7` ambiguous to read).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from reconciler.snapshot import Schedule


class ScheduleError(ValueError):
    """A schedule that cannot be used; the message says why."""


# (name, lowest, highest) of the five fields.
_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 6))

# Every string here comes from another component's rows, so nothing in this module may raise anything but
# ScheduleError for any text: one preset's schedule must never fail the pass of every other preset.
#
# Longer expressions are refused before any work: a sensible one, even listing every value of every field,
# is under 200 characters, and parsed expressions are cached (so a huge one would stay in memory).
MAX_EXPRESSION_LENGTH = 1000
# Numbers: ASCII digits only (`str.isdigit()` also accepts `²` and `٣`, which `int()` refuses or reads
# as digits no cron means), and short, because no field goes above 59 and `int()` has a length limit.
_NUMBER = re.compile(r"[0-9]{1,9}")
# A time zone name: the IANA database's names are ASCII letters, digits, `_`, `-` and `+`, in components
# separated by `/`. Checked before any file is opened, so that no name reaches the file system as a
# relative path (`..`), an absolute one, or thousands of characters long.
_ZONE_NAME = re.compile(r"[A-Za-z0-9_+\-]+(?:/[A-Za-z0-9_+\-]+)*")
MAX_ZONE_NAME_LENGTH = 255


def shown(text: str, limit: int = 40) -> str:
    """`text` quoted for a message, cut short: a hostile row may hold megabytes."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def _number(text: str, field: str) -> int:
    if _NUMBER.fullmatch(text) is None:
        raise ScheduleError(f"{field}: not a number: {shown(text)}")
    return int(text)


def _parse_field(text: str, field: str, low: int, high: int) -> frozenset[int] | None:
    """The values a field allows; None for `*` (everything, and "unrestricted" for the day rule)."""
    if text == "*":
        return None
    values: set[int] = set()
    for part in text.split(","):
        # Once its numbers are read, a part holds only ASCII digits, `-`, `/` and `*`: safe to show as is.
        range_text, slash, step_text = part.partition("/")
        step = _number(step_text, field) if slash else 1
        if step < 1:
            raise ScheduleError(f"{field}: step must be at least 1: {part}")
        if range_text == "*":
            start, end = low, high
        elif "-" in range_text:
            start_text, _, end_text = range_text.partition("-")
            start, end = _number(start_text, field), _number(end_text, field)
        else:
            start = _number(range_text, field)
            end = high if slash else start
        if start < low:
            raise ScheduleError(f"beginning of range ({start}) below minimum ({low}): {part}")
        if end > high:
            raise ScheduleError(f"end of range ({end}) above maximum ({high}): {part}")
        if start > end:
            raise ScheduleError(f"beginning of range ({start}) beyond end of range ({end}): {part}")
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True, slots=True)
class TimeRange:
    hours: frozenset[int] | None
    days_of_month: frozenset[int] | None
    months: frozenset[int] | None
    days_of_week: frozenset[int] | None

    def contains(self, moment: datetime) -> bool:
        """Whether `moment` (already in the schedule's time zone) falls inside the range."""
        if self.hours is not None and moment.hour not in self.hours:
            return False
        if self.months is not None and moment.month not in self.months:
            return False
        day_of_month_ok = self.days_of_month is None or moment.day in self.days_of_month
        # Python counts Monday as 0; cron counts Sunday as 0.
        day_of_week_ok = self.days_of_week is None or (moment.weekday() + 1) % 7 in self.days_of_week
        if self.days_of_month is not None and self.days_of_week is not None:
            # Classic cron: when both day fields are restricted, either one may match.
            return day_of_month_ok or day_of_week_ok
        return day_of_month_ok and day_of_week_ok


@functools.lru_cache(maxsize=4096)
def parse_time_range(expression: str) -> TimeRange:
    """Parse a five-field cron expression as a time range; raises ScheduleError with a reason."""
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise ScheduleError(f"expression too long ({len(expression)} characters, at most {MAX_EXPRESSION_LENGTH})")
    fields = expression.split()
    if len(fields) != 5:
        raise ScheduleError(f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}")
    if fields[0] != "*":
        raise ScheduleError(f"the minute field must be '*' (a schedule is a range of hours), got {shown(fields[0])}")
    parsed = [_parse_field(text, name, low, high) for text, (name, low, high) in zip(fields, _FIELDS, strict=True)]
    return TimeRange(hours=parsed[1], days_of_month=parsed[2], months=parsed[3], days_of_week=parsed[4])


@functools.lru_cache(maxsize=1024)
def zone(name: str) -> ZoneInfo:
    if not name:
        raise ScheduleError("no scheduling time zone set")
    if len(name) > MAX_ZONE_NAME_LENGTH or _ZONE_NAME.fullmatch(name) is None:
        raise ScheduleError(f"not a time zone name: {shown(name)}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as error:
        # ValueError: a file of the database that is not a zone (`zone.tab`); OSError: a directory of it
        # (`Europe`: IsADirectoryError), or one the process may not read.
        raise ScheduleError(f"unknown time zone {shown(name)}") from error


@dataclass(frozen=True, slots=True)
class Target:
    """The target of a preset at one instant, and why when a schedule could not be used."""

    instances: int
    problem: str | None = None


def target(desired_instances: int, schedules: Sequence[Schedule], timezone: str, now: datetime) -> Target:
    """The schedule whose range contains `now` gives the target; otherwise `desired_instances`.

    A schedule that cannot be read, an unusable time zone, or two schedules both containing `now`
    fall back to `desired_instances` with the reason, so that the pass can log it.
    """
    if not schedules:
        return Target(desired_instances)
    try:
        local = now.astimezone(zone(timezone))
        matching = [
            index
            for index, schedule in enumerate(schedules)
            if parse_time_range(schedule.cron_expression).contains(local)
        ]
    except ScheduleError as error:
        return Target(desired_instances, problem=str(error))
    if len(matching) > 1:
        crons = ", ".join(shown(schedules[index].cron_expression, limit=100) for index in matching)
        return Target(desired_instances, problem=f"overlapping schedules at this time: {crons}")
    if matching:
        return Target(schedules[matching[0]].desired_instances)
    return Target(desired_instances)
