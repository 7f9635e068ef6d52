"""Durations as people write them: Go-style strings (`90s`, `1m`, `1h30m`, `250ms`) or plain seconds."""

from __future__ import annotations

import re
from datetime import timedelta

_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    # Not Go, but what an operator types for a lookback window.
    "d": 86400.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d)")
_PLAIN_SECONDS = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def parse_duration(text: str) -> timedelta:
    """Parse `1h30m`, `90s`, `0.5s` or `90` (seconds). Raises ValueError with a reason on anything else."""
    value = text.strip()
    if not value:
        raise ValueError("empty duration")
    if _PLAIN_SECONDS.fullmatch(value):
        return timedelta(seconds=float(value))
    position = 0
    total = 0.0
    for match in _PART.finditer(value):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position != len(value) or position == 0:
        raise ValueError("not a duration (use e.g. 90s, 1m, 1h30m or plain seconds)")
    return timedelta(seconds=total)


def format_duration(duration: timedelta) -> str:
    """The shortest Go-style spelling of a whole-second duration (`1h30m`, `90s` -> `1m30s`)."""
    seconds = int(duration.total_seconds())
    if seconds != duration.total_seconds():
        return f"{duration.total_seconds():g}s"
    if seconds == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        amount, seconds = divmod(seconds, size)
        if amount:
            parts.append(f"{amount}{unit}")
    return "".join(parts)
