"""Schedules are read from rows another component writes: no text may make them raise (issue 12.3).

Before, a zone naming a directory of the time zone database, a zone too long for the file system, or a
cron with `²` raised out of `schedule.target` and failed the pass of every preset. Whatever the text, a
schedule is either used or refused with a ScheduleError whose message is short.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from reconciler import schedule
from reconciler.snapshot import Schedule

NOW = datetime(2025, 6, 2, 10, 30, tzinfo=UTC)

# Pieces a hostile or clumsy cron is made of, so that generated text often gets as far as the numbers.
_CRON_PIECES = st.sampled_from(["*", "-", "/", ",", " ", "0", "9", "23", "²", "٣", "١٢", "\x00", "\udc80", "७"])
crons = st.text() | st.lists(_CRON_PIECES | st.text(max_size=3), max_size=30).map("".join)
zones = st.text() | st.sampled_from(
    [
        "Europe",
        "Europe/",
        "America",
        "Etc",
        "/etc/localtime",
        "../../etc/passwd",
        "zone.tab",
        "tzdata.zi",
        "__init__.py",
        "__pycache__",
        "Europe/__pycache__",
        ".",
        "..",
        "UTC\x00",
        "x" * 300,
        "Europe/" + "x" * 300,
    ]
)


@pytest.mark.parametrize(
    ("zone", "reason"),
    [
        ("Europe", "unknown time zone 'Europe'"),
        ("Europe/__pycache__", "unknown time zone"),
        # A file of the database that is not a zone (or, where it is missing, no file at all).
        ("leapseconds", "unknown time zone"),
        ("zone.tab", "not a time zone name"),
        ("Europe/" + "x" * 300, "not a time zone name: 'Europe/xxx"),
        ("../../etc/passwd", "not a time zone name"),
        ("/etc/localtime", "not a time zone name"),
        ("UTC\x00", "not a time zone name"),
    ],
)
def test_zones_that_are_not_zones_are_refused_with_a_reason(zone: str, reason: str) -> None:
    target = schedule.target(2, (Schedule("* * * * *", 5),), zone, NOW)
    assert target.instances == 2
    assert target.problem is not None
    assert reason in target.problem


@pytest.mark.parametrize(
    ("cron", "reason"),
    [
        ("* ² * * *", "hour: not a number: '²'"),
        ("* * ٣ * *", "day of month: not a number: '٣'"),
        ("* 1-٣ * * *", "hour: not a number: '٣'"),
        ("* */७ * * *", "hour: not a number: '७'"),
        ("* " + "1" * 10 + " * * *", "hour: not a number: '1111111111'"),
        ("* " + "1" * 5000 + " * * *", "expression too long (5008 characters, at most 1000)"),
    ],
)
def test_numbers_are_ascii_digits_only(cron: str, reason: str) -> None:
    with pytest.raises(schedule.ScheduleError) as raised:
        schedule.parse_time_range(cron)
    assert reason in str(raised.value)


def test_a_long_number_with_nine_digits_is_still_a_number() -> None:
    # Leading zeros are harmless; the bound is on length, not on the value.
    assert schedule.parse_time_range("* 000000009 * * *").hours == frozenset({9})


def test_a_hostile_string_is_shown_cut_short() -> None:
    assert schedule.shown("abc") == "'abc'"
    shown = schedule.shown("é" * 10_000)
    assert shown.startswith("'éééé")
    assert shown.endswith("... (10000 characters)")
    assert len(shown) < 80


@settings(max_examples=400, deadline=None)
@given(cron=crons)
@example(cron="* ² * * *")
@example(cron="* " + "9" * 5000 + " * * *")
def test_any_cron_text_parses_or_is_refused_with_a_schedule_error(cron: str) -> None:
    message = ""
    try:
        schedule.parse_time_range(cron)
    except schedule.ScheduleError as error:
        message = str(error)
    assert len(message) < 200


@settings(max_examples=400, deadline=None)
@given(
    zone=zones,
    cron_list=st.lists(crons, max_size=3),
    desired=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    moment=st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)),
)
@example(zone="Europe", cron_list=["* * * * *"], desired=1, moment=NOW)
@example(zone="x" * 300, cron_list=["* * * * *"], desired=1, moment=NOW)
def test_the_target_never_raises_whatever_the_text(
    zone: str, cron_list: list[str], desired: int, moment: datetime
) -> None:
    schedules = tuple(Schedule(cron, 3) for cron in cron_list)
    target = schedule.target(desired, schedules, zone, moment)
    if target.problem is not None:
        assert target.instances == desired
        assert len(target.problem) < 400
