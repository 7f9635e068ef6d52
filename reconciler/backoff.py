"""How long a preset backs off after failed prebuilds (BEHAVIOR.md 3.1): linear, or exponential with a cap.

Pure: the time a backoff ends is a function of the preset, its failures and the policy, nothing else.
The jitter of the exponential strategy is derived from the preset's id and the time of its last failure,
never from a random generator, so that `plan` is reproducible and two replicas (or a daemon and an
operator's `status`) compute the same instant.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

# The jitter moves a delay by at most this share of it, either way.
JITTER_FRACTION = 0.2
# 2^62 microseconds is over 146,000 years: any larger exponent only matters through the cap.
_LARGEST_EXPONENT = 62
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class BackoffStrategy(enum.StrEnum):
    # Coder's formula: the delay grows by one interval per failure.
    LINEAR = "linear"
    # interval x 2^(failures - 1), capped, with deterministic jitter.
    EXPONENTIAL = "exponential"


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    interval: timedelta = timedelta(minutes=1)
    strategy: BackoffStrategy = BackoffStrategy.LINEAR
    # The longest exponential delay (jitter included). Linear backoff is Coder's and has no cap.
    maximum: timedelta = timedelta(hours=1)


def jitter_unit(preset_id: UUID, last_failure_at: datetime) -> float:
    """A number in [-1, 1) that depends only on the preset and the instant of its last failure.

    A new failure gives the preset a new draw; two presets that failed at the same instant get different
    ones, which is the point: a shared outage must not bring every preset back at the same moment.
    """
    microseconds = (last_failure_at - _EPOCH) // _MICROSECOND
    digest = hashlib.blake2b(
        preset_id.bytes + microseconds.to_bytes(16, "big", signed=True), digest_size=8, person=b"backoff"
    ).digest()
    return int.from_bytes(digest, "big") / 2**63 - 1.0


def exponential_delay(policy: BackoffPolicy, num_failed: int, preset_id: UUID, last_failure_at: datetime) -> timedelta:
    """interval x 2^(num_failed - 1), at most `policy.maximum`, moved by up to +-20% (never above the maximum).

    Jitter that would carry a delay above the maximum moves it down by the same amount instead: a plain
    clamp would bring half of the capped presets back at exactly the same instant, which is what jitter
    is for avoiding.
    """
    if num_failed <= 0:
        return timedelta(0)
    maximum_us = max(policy.maximum // _MICROSECOND, 0)
    interval_us = max(policy.interval // _MICROSECOND, 0)
    nominal_us = min(interval_us << min(num_failed - 1, _LARGEST_EXPONENT), maximum_us)
    offset = JITTER_FRACTION * jitter_unit(preset_id, last_failure_at)
    jittered_us = round(nominal_us * (1 + offset))
    if jittered_us > maximum_us:
        jittered_us = round(nominal_us * (1 - offset))
    return timedelta(microseconds=jittered_us)


def delay(policy: BackoffPolicy, num_failed: int, preset_id: UUID, last_failure_at: datetime) -> timedelta:
    """How long after its last failure a preset backs off."""
    if policy.strategy is BackoffStrategy.EXPONENTIAL:
        return exponential_delay(policy, num_failed, preset_id, last_failure_at)
    return num_failed * policy.interval


def backoff_until(policy: BackoffPolicy, num_failed: int, preset_id: UUID, last_failure_at: datetime) -> datetime:
    """The instant the backoff ends (at exactly that instant the preset is still backing off)."""
    try:
        return last_failure_at + delay(policy, num_failed, preset_id, last_failure_at)
    except OverflowError:
        # A build stamped `infinity` (or near the end of time) by another component: backing off
        # "forever" is the rule's answer; raising would fail the pass for every preset.
        return datetime.max.replace(tzinfo=last_failure_at.tzinfo)
