"""Soak tests (issue 8). The short one runs with the suite (about a minute); the long one on demand:

    RECONCILER_SOAK_SECONDS=600 .venv/bin/python -m pytest -n 0 -m soak tests/soak -s

`RECONCILER_SOAK_PRESETS` (default 200) and `RECONCILER_SOAK_SEED` (default: random, printed) apply to
both; `-s` shows the summary.
"""

from __future__ import annotations

import os
import random

import pytest

from tests.factories import Factory
from tests.soak.soak import Soak, SoakConfig


def seed() -> int:
    return int(os.environ.get("RECONCILER_SOAK_SEED") or random.SystemRandom().randrange(1_000_000))


def presets() -> int:
    return int(os.environ.get("RECONCILER_SOAK_PRESETS") or 200)


async def run_soak(factory: Factory, database_url: str, config: SoakConfig) -> None:
    soak = Soak(factory, database_url, config)
    summary = await soak.run()
    soak.check_passes()
    print("\n" + summary.render())
    assert summary.violations == [], summary.render()
    # The run did what it says: passes, churn, claims, faults, and checks.
    assert summary.passes >= config.chaos_seconds
    assert (summary.creates > 0, summary.deletes > 0, summary.claims > 0) == (True, True, True)
    assert summary.failed_builds > 0
    assert (summary.kills >= 1, summary.terminations >= 1) == (True, True)
    assert summary.hard_limit_episodes >= 1
    assert summary.invariant_checks >= config.chaos_seconds * 5


@pytest.mark.soak_short
@pytest.mark.timeout(240)
async def test_soak_short(factory: Factory, database_url: str) -> None:
    await run_soak(factory, database_url, SoakConfig(chaos_seconds=40, presets=presets(), seed=seed()))


@pytest.mark.soak
@pytest.mark.timeout(int(os.environ.get("RECONCILER_SOAK_SECONDS") or 600) + 600)
async def test_soak_long(factory: Factory, database_url: str) -> None:
    seconds = float(os.environ.get("RECONCILER_SOAK_SECONDS") or 600)
    await run_soak(factory, database_url, SoakConfig(chaos_seconds=seconds, presets=presets(), seed=seed()))
