"""Durations as people write them: Go-style strings (`90s`, `1m`, `1h30m`, `250ms`) or plain seconds.

Arithmetic is exact (decimal, to the microsecond that `timedelta` holds), so that formatting a duration
and parsing the text gives back the same duration, however large.
"""

from __future__ import annotations

import re
from datetime import timedelta
from decimal import ROUND_HALF_EVEN, Decimal

# Microseconds per unit.
_UNIT_MICROSECONDS = {
    "ns": Decimal("0.001"),
    "us": Decimal(1),
    "µs": Decimal(1),
    "ms": Decimal(1_000),
    "s": Decimal(1_000_000),
    "m": Decimal(60_000_000),
    "h": Decimal(3_600_000_000),
    # Not Go, but what an operator types for a lookback window.
    "d": Decimal(86_400_000_000),
}
# ASCII digits only: `\d` would also take digits of other scripts.
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_PART = re.compile(rf"({_NUMBER})(ns|us|µs|ms|s|m|h|d)")
_PLAIN_SECONDS = re.compile(_NUMBER)
_LARGEST_MICROSECONDS = timedelta.max // timedelta(microseconds=1)
# A whole part longer than this cannot be a duration that fits (in any unit); refusing it early keeps
# the decimal arithmetic within its 28 significant digits.
_MAX_WHOLE_DIGITS = 20


def _microseconds(number: str, unit: str) -> Decimal:
    if len(number.partition(".")[0].lstrip("0")) > _MAX_WHOLE_DIGITS:
        raise ValueError("duration too large")
    return Decimal(number) * _UNIT_MICROSECONDS[unit]


def parse_duration(text: str) -> timedelta:
    """Parse `1h30m`, `90s`, `0.5s` or `90` (seconds). Raises ValueError with a reason on anything else."""
    value = text.strip()
    if not value:
        raise ValueError("empty duration")
    total = Decimal(0)
    if _PLAIN_SECONDS.fullmatch(value):
        total = _microseconds(value, "s")
    else:
        position = 0
        for match in _PART.finditer(value):
            if match.start() != position:
                break
            total += _microseconds(match.group(1), match.group(2))
            position = match.end()
        if position != len(value) or position == 0:
            raise ValueError("not a duration (use e.g. 90s, 1m, 1h30m or plain seconds)")
    microseconds = int(total.to_integral_value(rounding=ROUND_HALF_EVEN))
    if microseconds > _LARGEST_MICROSECONDS:
        raise ValueError("duration too large")
    return timedelta(microseconds=microseconds)


def _decimal(amount: int, scale: int) -> str:
    """`amount / scale` written exactly, without trailing zeros (scale is a power of ten)."""
    whole, fraction = divmod(amount, scale)
    if not fraction:
        return str(whole)
    digits = len(str(scale)) - 1
    return f"{whole}.{fraction:0{digits}d}".rstrip("0")


def format_duration(duration: timedelta) -> str:
    """The shortest Go-style spelling (`1h30m`, `90s` -> `1m30s`, `250ms`, `1m0.5s`); parses back exactly."""
    microseconds = duration // timedelta(microseconds=1)
    if microseconds < 0:
        return "-" + format_duration(-duration)
    if microseconds == 0:
        return "0s"
    if microseconds < 1_000:
        return f"{microseconds}us"
    if microseconds < 1_000_000:
        return f"{_decimal(microseconds, 1_000)}ms"
    seconds, fraction = divmod(microseconds, 1_000_000)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        amount, seconds = divmod(seconds, size)
        if amount:
            parts.append(f"{amount}{unit}")
    if seconds or fraction:
        parts.append(f"{_decimal(seconds * 1_000_000 + fraction, 1_000_000)}s")
    return "".join(parts)
