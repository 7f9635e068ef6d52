"""The wall clock, read in one place: the long-running loops read it here, everything else takes `now`."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    return datetime.now(UTC)
