"""What target expressions add to a pass's planning at 10,000 presets (pure: no database).

    python -m bench.targets [--presets N]

Times `resolve_target` for every preset of a fleet, three ways: static targets only (the floor), every
preset with one of Coder's four documented expressions (compiled once each, as in a running daemon),
and every preset with an expression of its own (each compiled in that pass: the first pass after
10,000 distinct expressions were published). The database side of a pass (the windowed counts) is
measured by `python -m bench.run`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from datetime import UTC, datetime, timedelta

from reconciler.demand import WINDOWS_MINUTES, DemandCounts, PoolCounts
from reconciler.expression_compiler import compile_target_expression, target_expression
from reconciler.target import TargetSettings, resolve_target

CODER_EXAMPLES = (
    "min(claims_10m * 10, 20)",
    "max(scheduled_target, ceil(claim_rate_30m * 8))",
    "max(2, min((claims_60m + misses_60m) * 2, 30))",
    "clamp(claims_10m * 5, 1, 15)",
)
NOW = datetime(2025, 6, 11, 8, 30, tzinfo=UTC)


def _fleet(count: int, seed: int = 14) -> list[tuple[PoolCounts, DemandCounts]]:
    generator = random.Random(seed)
    fleet = []
    for _ in range(count):
        claims = sorted(generator.randint(0, 30) for _ in WINDOWS_MINUTES)
        misses = sorted(generator.randint(0, 5) for _ in WINDOWS_MINUTES)
        pool = PoolCounts(running=generator.randint(0, 10), eligible=generator.randint(0, 10))
        fleet.append((pool, DemandCounts(claims=tuple(claims), misses=tuple(misses), has_history=True)))
    return fleet


def _time(fleet: list[tuple[PoolCounts, DemandCounts]], expressions: list[str | None]) -> float:
    settings = TargetSettings(stabilization_window=timedelta(minutes=5))
    started = time.perf_counter()
    for (pool, demand), expression in zip(fleet, expressions, strict=True):
        resolve_target(
            active=True,
            desired_instances=3,
            schedules=(),
            timezone="Europe/Berlin",
            expression=target_expression(expression),
            pool=pool,
            demand=demand,
            previous_hold=None,
            settings=settings,
            now=NOW,
        )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    arguments = parser.parse_args()
    fleet = _fleet(arguments.presets)
    static: list[str | None] = [None] * len(fleet)
    shared: list[str | None] = [CODER_EXAMPLES[index % len(CODER_EXAMPLES)] for index in range(len(fleet))]
    _time(fleet, shared)  # compiles the four once, as the daemon's first pass does
    rows = [("static targets only", statistics.median(_time(fleet, static) for _ in range(arguments.repeat)))]
    rows.append(
        ("Coder's 4 examples, compiled", statistics.median(_time(fleet, shared) for _ in range(arguments.repeat)))
    )
    distinct_runs = []
    for run in range(arguments.repeat):
        # A different constant per preset and run: every text is new, so every one is compiled.
        distinct: list[str | None] = [
            f"max(scheduled_target, ceil(claim_rate_30m * {run}{index}))" for index in range(len(fleet))
        ]
        compile_target_expression.cache_clear()
        distinct_runs.append(_time(fleet, distinct))
    rows.append(("all distinct, compiled in the pass", statistics.median(distinct_runs)))
    print(f"{len(fleet)} presets, median of {arguments.repeat} runs")
    print(f"{'targets':38} {'ms':>8} {'added ms':>9} {'µs per preset':>14}")
    floor = rows[0][1]
    for name, seconds in rows:
        added = (seconds - floor) * 1000
        print(f"{name:38} {seconds * 1000:8.1f} {added:9.1f} {seconds / len(fleet) * 1e6:14.1f}")


if __name__ == "__main__":
    main()
