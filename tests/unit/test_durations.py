"""Durations as operators write them (Go-style strings or plain seconds), and back."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.durations import format_duration, parse_duration

# The largest duration that `timedelta` holds, in whole microseconds.
LARGEST = timedelta.max // timedelta(microseconds=1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("1m", timedelta(minutes=1)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1h30m15s", timedelta(hours=1, minutes=30, seconds=15)),
        ("250ms", timedelta(milliseconds=250)),
        ("1.5h", timedelta(minutes=90)),
        ("0.5s", timedelta(milliseconds=500)),
        (".5s", timedelta(milliseconds=500)),
        ("2d", timedelta(days=2)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("1500us", timedelta(microseconds=1500)),
        ("1500µs", timedelta(microseconds=1500)),
        ("3000ns", timedelta(microseconds=3)),
        ("1m1m", timedelta(minutes=2)),
        ("90", timedelta(seconds=90)),
        ("1.5", timedelta(seconds=1.5)),
        ("0", timedelta(0)),
        ("0s", timedelta(0)),
        ("  45s\n", timedelta(seconds=45)),
        ("007s", timedelta(seconds=7)),
        ("0.000001", timedelta(microseconds=1)),
        ("0.0000005", timedelta(0)),  # half a microsecond rounds to even
        ("0.0000015", timedelta(microseconds=2)),
        ("0" * 50 + "1s", timedelta(seconds=1)),
    ],
)
def test_parses_go_style_strings_and_plain_seconds(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "s",
        "-5s",
        "+5s",
        "1 m",
        "1m 30s",
        "5x",
        "1.2.3s",
        "1e3",
        "1e3s",
        "inf",
        "nan",
        "m5",
        "1hour",
        "1M",
        "1H",
        "5s5",
        "٣s",  # a non-ASCII digit
        "1_000s",
    ],
)
def test_rejects_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["9" * 30, "9" * 20 + "h", "999999999999d", "1" + "0" * 400 + "s"])
def test_a_duration_too_large_to_hold_is_a_value_error_not_an_overflow(text: str) -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_duration(text)


def test_the_largest_duration_parses() -> None:
    assert parse_duration(format_duration(timedelta.max)) == timedelta.max


@pytest.mark.parametrize(
    ("duration", "expected"),
    [
        (timedelta(0), "0s"),
        (timedelta(seconds=90), "1m30s"),
        (timedelta(hours=1, minutes=30), "1h30m"),
        (timedelta(hours=1), "1h"),
        (timedelta(days=30), "30d"),
        (timedelta(days=1, seconds=1), "1d1s"),
        (timedelta(milliseconds=250), "250ms"),
        (timedelta(microseconds=1500), "1.5ms"),
        (timedelta(microseconds=7), "7us"),
        (timedelta(seconds=1.5), "1.5s"),
        (timedelta(minutes=1, milliseconds=500), "1m0.5s"),
        (timedelta(seconds=12345, microseconds=678901), "3h25m45.678901s"),
        (timedelta(seconds=-90), "-1m30s"),
    ],
)
def test_formats_the_shortest_go_style_spelling(duration: timedelta, expected: str) -> None:
    assert format_duration(duration) == expected


@given(st.integers(min_value=0, max_value=LARGEST))
def test_format_then_parse_gives_back_the_same_duration(microseconds: int) -> None:
    duration = timedelta(microseconds=microseconds)
    assert parse_duration(format_duration(duration)) == duration


@given(st.integers(min_value=0, max_value=LARGEST))
def test_formatting_is_canonical(microseconds: int) -> None:
    text = format_duration(timedelta(microseconds=microseconds))
    assert format_duration(parse_duration(text)) == text
    # Shortest: no unit appears with a zero amount, except the lone "0s".
    assert text == "0s" or not any(text.startswith(f"0{unit}") for unit in ("d", "h", "m"))


UNITS = {"h": 3_600_000_000, "m": 60_000_000, "s": 1_000_000, "ms": 1_000, "us": 1}


@given(st.lists(st.tuples(st.integers(min_value=0, max_value=10**6), st.sampled_from(sorted(UNITS))), min_size=1))
def test_parts_add_up(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{amount}{unit}" for amount, unit in parts)
    expected = sum(amount * UNITS[unit] for amount, unit in parts)
    assert parse_duration(text) == timedelta(microseconds=expected)


@given(st.integers(min_value=0, max_value=10**12), st.integers(min_value=0, max_value=999_999))
def test_plain_seconds_with_a_fraction_are_exact_to_the_microsecond(whole: int, fraction: int) -> None:
    text = f"{whole}.{fraction:06d}"
    assert parse_duration(text) == timedelta(seconds=whole, microseconds=fraction)


@given(st.text(max_size=12))
def test_any_text_parses_or_raises_value_error(text: str) -> None:
    try:
        duration = parse_duration(text)
    except ValueError:
        return
    assert duration >= timedelta(0)
