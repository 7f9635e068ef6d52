"""Backoff strategies (issue 15 point 3): Coder's linear formula, and exponential with a cap and jitter."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler import backoff
from reconciler.backoff import BackoffPolicy, BackoffStrategy

FAILED_AT = datetime(2025, 6, 2, 12, 0, 0, 123456, tzinfo=UTC)
PRESET = uuid.UUID("5b1c8c54-0a3f-4d8e-9f55-0e1f7f3b6a10")
MINUTE = timedelta(minutes=1)
LINEAR = BackoffPolicy(interval=MINUTE)
EXPONENTIAL = BackoffPolicy(interval=MINUTE, strategy=BackoffStrategy.EXPONENTIAL, maximum=timedelta(minutes=30))

preset_ids = st.uuids()
instants = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC))


def test_linear_is_coders_formula_one_interval_per_failure() -> None:
    for failures in (1, 2, 7, 60):
        assert backoff.backoff_until(LINEAR, failures, PRESET, FAILED_AT) == FAILED_AT + failures * MINUTE


def test_linear_has_no_cap_and_no_jitter() -> None:
    capped = BackoffPolicy(interval=MINUTE, maximum=timedelta(minutes=5))
    assert backoff.delay(capped, 100, PRESET, FAILED_AT) == 100 * MINUTE


@given(preset_ids, instants, st.integers(min_value=1, max_value=200))
@settings(max_examples=300)
def test_exponential_stays_within_twenty_percent_of_the_capped_delay_and_never_above_the_cap(
    preset_id: uuid.UUID, failed_at: datetime, failures: int
) -> None:
    nominal = min(MINUTE * 2 ** min(failures - 1, 40), EXPONENTIAL.maximum)
    delay = backoff.delay(EXPONENTIAL, failures, preset_id, failed_at)
    assert nominal * 0.8 - timedelta(microseconds=1) <= delay <= nominal * 1.2 + timedelta(microseconds=1)
    assert delay <= EXPONENTIAL.maximum


def test_exponential_doubles_per_failure_up_to_the_cap() -> None:
    no_jitter = [backoff.delay(EXPONENTIAL, n, PRESET, FAILED_AT) / (1 + 0.2 * _unit()) for n in (1, 2, 3, 4)]
    assert [round(delay / MINUTE, 6) for delay in no_jitter] == [1, 2, 4, 8]
    # 2^5 minutes is above the 30-minute cap: from there on the delay stays near the cap.
    assert backoff.delay(EXPONENTIAL, 6, PRESET, FAILED_AT) == backoff.delay(EXPONENTIAL, 60, PRESET, FAILED_AT)
    assert backoff.delay(EXPONENTIAL, 10**6, PRESET, FAILED_AT) <= EXPONENTIAL.maximum


def _unit() -> float:
    return backoff.jitter_unit(PRESET, FAILED_AT)


def test_jitter_is_the_same_for_the_same_preset_and_failure_and_differs_otherwise() -> None:
    first = backoff.backoff_until(EXPONENTIAL, 3, PRESET, FAILED_AT)
    assert backoff.backoff_until(EXPONENTIAL, 3, PRESET, FAILED_AT) == first
    later_failure = FAILED_AT + timedelta(microseconds=1)
    other_preset = uuid.UUID(int=PRESET.int + 1)
    assert backoff.backoff_until(EXPONENTIAL, 3, PRESET, later_failure) - later_failure != first - FAILED_AT
    assert backoff.backoff_until(EXPONENTIAL, 3, other_preset, FAILED_AT) != first


def test_presets_that_failed_together_come_back_spread_out() -> None:
    """A shared outage: 500 presets failing at the same instant do not retry at the same instant."""
    returns = {backoff.backoff_until(EXPONENTIAL, 4, uuid.uuid4(), FAILED_AT) for _ in range(500)}
    assert len(returns) == 500
    spread = max(returns) - min(returns)
    # 8 minutes +-20%: the returns cover most of the 3.2-minute range.
    assert spread > timedelta(minutes=3)


def test_capped_delays_are_spread_below_the_cap_not_piled_on_it() -> None:
    delays = [backoff.delay(EXPONENTIAL, 50, uuid.uuid4(), FAILED_AT) for _ in range(400)]
    at_cap = sum(delay == EXPONENTIAL.maximum for delay in delays)
    assert at_cap <= 2
    assert min(delays) >= EXPONENTIAL.maximum * 0.8 - timedelta(microseconds=1)


def test_the_same_on_two_replicas() -> None:
    """Another process (another hash seed, as another replica would have) computes the same instants."""
    presets = [uuid.UUID(int=index * 7919 + 17) for index in range(20)]
    here = [
        backoff.backoff_until(EXPONENTIAL, 1 + index % 6, preset, FAILED_AT).isoformat()
        for index, preset in enumerate(presets)
    ]
    script = (
        "import uuid, sys\n"
        "from datetime import UTC, datetime, timedelta\n"
        "from reconciler import backoff\n"
        "policy = backoff.BackoffPolicy(interval=timedelta(minutes=1), strategy=backoff.BackoffStrategy.EXPONENTIAL,"
        " maximum=timedelta(minutes=30))\n"
        f"at = datetime.fromisoformat({FAILED_AT.isoformat()!r})\n"
        "for index in range(20):\n"
        "    preset = uuid.UUID(int=index * 7919 + 17)\n"
        "    print(backoff.backoff_until(policy, 1 + index % 6, preset, at).isoformat())\n"
    )
    for seed in ("1", "4242"):
        environment = {**os.environ, "PYTHONHASHSEED": seed}
        output = subprocess.run(
            [sys.executable, "-c", script], check=True, capture_output=True, text=True, env=environment
        ).stdout.split()
        assert output == here


def test_no_failures_means_no_delay() -> None:
    assert backoff.delay(EXPONENTIAL, 0, PRESET, FAILED_AT) == timedelta(0)


@pytest.mark.parametrize("policy", [LINEAR, EXPONENTIAL])
def test_a_failure_stamped_at_the_end_of_time_backs_off_forever_instead_of_raising(policy: BackoffPolicy) -> None:
    end = datetime.max.replace(tzinfo=UTC) - timedelta(seconds=1)
    assert backoff.backoff_until(policy, 5, PRESET, end) == datetime.max.replace(tzinfo=UTC)
