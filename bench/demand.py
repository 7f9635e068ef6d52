"""The demand simulation: static targets, Coder's expression and ours, driven through the real planner.

    python -m bench.demand                   # the table of bench/README.md (about a minute)
    python -m bench.demand --picture bench/demand.png     # and the picture (needs '.[bench]': matplotlib)

A synthetic fortnight of claims per preset (working hours, weekdays, random bursts, a quiet weekend),
the same claim stream for every strategy. Every simulated minute: the claims of that minute take an
eligible prebuild each (or miss), then a pass runs: each preset's demand is counted from the events
the claims wrote (`claim_succeeded`, `claim_missed`), the target is resolved and the pure planner plans,
in simulated time, exactly as the daemon does; creates become ready after a build of 4 to 8 minutes.
The first week gives the second its history (last week's demand); the figures are the second week's:

- **misses**: claims that found no eligible prebuild;
- **idle prebuild-hours**: prebuilds alive and unclaimed (building or running), summed over time: what
  the pool costs;
- **creates** and **deletes** (extraneous prebuilds deleted): churn.
"""

from __future__ import annotations

import argparse
import bisect
import math
import random
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from reconciler import planner
from reconciler.demand import WINDOWS_MINUTES, DemandCounts, PoolCounts
from reconciler.expression_compiler import target_expression
from reconciler.plan import CreateAction, DeleteAction, DeleteReason
from reconciler.snapshot import InProgress, PrebuildStatus, Preset, RunningPrebuild, Transition
from reconciler.target import Target, TargetHold, TargetSettings, resolve_target

# Monday 2 June 2025, 00:00 UTC: two weeks from here, the second one measured.
START = datetime(2025, 6, 2, tzinfo=UTC)
DAYS = 14
MEASURED_FROM = START + timedelta(days=7)
PASS = timedelta(minutes=1)
BUILD_MINUTES = (4, 8)

CODER_EXPRESSION = "max(scheduled_target, ceil(claim_rate_30m * 8))"
# Ours: at least one prebuild while there is demand around (in the last hour, or in the coming hour last
# week), else none; otherwise 7 minutes of cover of the larger of two rates: the last half hour's demand,
# misses included (Coder's example counts only successful claims, so a drained pool lowers its own
# target), and the demand of the coming hour as it was last week (the pool fills before the rush).
LAST_WEEK_EXPRESSION = (
    "max(claims_60m + misses_60m + claims_next_60m_last_week + misses_next_60m_last_week > 0 ? 1 : 0, "
    "ceil((claims_30m + misses_30m) * 7 / 30), "
    "ceil((claims_next_60m_last_week + misses_next_60m_last_week) * 7 / 60))"
)
STABILIZATION = timedelta(minutes=10)


@dataclass(frozen=True)
class Strategy:
    name: str
    expression: str | None
    baseline: int
    stabilization: timedelta = timedelta(0)


def strategies() -> list[Strategy]:
    return [
        Strategy("static 1", None, 1),
        Strategy("static 2", None, 2),
        Strategy("static 4", None, 4),
        Strategy("static 6", None, 6),
        Strategy(CODER, CODER_EXPRESSION, 1),
        Strategy("Coder's example + stabilization", CODER_EXPRESSION, 1, STABILIZATION),
        Strategy("ours: last week's demand", LAST_WEEK_EXPRESSION, 1),
        Strategy(BEST, LAST_WEEK_EXPRESSION, 1, STABILIZATION),
    ]


CODER = "Coder's example"
BEST = "ours: last week's demand + stabilization"


# --- the claim stream ------------------------------------------------------------------------------------

# Share of a preset's peak claim rate by hour of a working day (UTC); nights and weekends are quiet.
_WORKDAY_SHAPE = {7: 0.15, 8: 0.6, 9: 1.0, 10: 1.0, 11: 0.9, 12: 0.5, 13: 0.8, 14: 0.9, 15: 0.9, 16: 0.7, 17: 0.35}
_NIGHT = 0.01
_WEEKEND = 0.02


def _poisson(generator: random.Random, mean: float) -> int:
    # Knuth's method: the means here are small (claims per minute).
    limit, count, product = math.exp(-mean), 0, generator.random()
    while product > limit:
        count += 1
        product *= generator.random()
    return count


def claim_stream(presets: int, seed: int) -> list[list[datetime]]:
    """Per preset, the instants of its claims over the fortnight (sorted)."""
    generator = random.Random(seed)
    streams: list[list[datetime]] = []
    for _ in range(presets):
        peak = generator.uniform(0.05, 0.6)  # claims per minute at the busiest hour
        claims: list[datetime] = []
        for day in range(DAYS):
            midnight = START + timedelta(days=day)
            weekend = midnight.weekday() >= 5
            busy = generator.lognormvariate(0, 0.2)  # no two days alike
            for minute in range(24 * 60):
                hour = minute // 60
                share = _WEEKEND if weekend else _WORKDAY_SHAPE.get(hour, _NIGHT)
                for _ in range(_poisson(generator, peak * share * busy)):
                    claims.append(midnight + timedelta(minutes=minute, seconds=generator.uniform(0, 59.9)))
            if not weekend:
                # Bursts: a team starting together, a workshop: several claims within a few minutes.
                for _ in range(generator.randint(0, 2)):
                    at = midnight + timedelta(hours=generator.uniform(8, 17))
                    for _ in range(generator.randint(4, 10)):
                        claims.append(at + timedelta(seconds=generator.uniform(0, 180)))
        streams.append(sorted(claims))
    return streams


# --- the world -----------------------------------------------------------------------------------------


@dataclass
class _Prebuild:
    workspace_id: uuid.UUID
    created_at: datetime
    ready_at: datetime
    # As the snapshot would show it once running (ready: the simulated agent is ready when the build ends).
    row: RunningPrebuild

    @classmethod
    def create(cls, preset: Preset, now: datetime, ready_at: datetime) -> _Prebuild:
        workspace_id = uuid.uuid4()
        row = RunningPrebuild(workspace_id, preset.id, preset.template_version_id, True, now)
        return cls(workspace_id, now, ready_at, row)


@dataclass
class _Pool:
    preset: Preset
    claims: list[datetime]
    next_claim: int = 0
    prebuilds: list[_Prebuild] = field(default_factory=list)
    # Claim events, in minutes since START (sorted, as they happen).
    succeeded: list[float] = field(default_factory=list)
    missed: list[float] = field(default_factory=list)
    hold: TargetHold | None = None
    # Measured (second week only).
    misses: int = 0
    claimed: int = 0
    idle_minutes: float = 0.0
    creates: int = 0
    deletes: int = 0
    # For the picture: (time, target, eligible, retained) each pass of the measured week.
    trace: list[tuple[datetime, int, int, int]] = field(default_factory=list)
    _by_target: dict[int, Preset] = field(default_factory=dict)

    def with_target(self, desired: int) -> Preset:
        """The preset with `desired` as its static target (one object per value, not one per pass)."""
        preset = self._by_target.get(desired)
        if preset is None:
            preset = self._by_target[desired] = replace(self.preset, desired_instances=desired)
        return preset


def _minutes(moment: datetime) -> float:
    return (moment - START) / timedelta(minutes=1)


def _count(times: Sequence[float], since: float, until: float) -> int:
    """Events with since < time <= until (minutes since START)."""
    return bisect.bisect_right(times, until) - bisect.bisect_right(times, since)


def _demand(pool: _Pool, now: datetime) -> DemandCounts:
    minute = _minutes(now)
    week_ago = minute - 7 * 24 * 60
    succeeded, missed = pool.succeeded, pool.missed
    # The hour that started exactly 7 days ago: week_ago <= time < week_ago + 60.
    last_week = (week_ago - 1e-9, week_ago + 60 - 1e-9)
    return DemandCounts(
        claims=tuple(_count(succeeded, minute - window, minute) for window in WINDOWS_MINUTES),
        misses=tuple(_count(missed, minute - window, minute) for window in WINDOWS_MINUTES),
        claims_next_60m_last_week=_count(succeeded, *last_week),
        misses_next_60m_last_week=_count(missed, *last_week),
        has_history=bool(succeeded or missed),
    )


def _claim(pool: _Pool, until: datetime, measured: bool) -> None:
    """The claims up to `until`: each takes the oldest ready prebuild, or misses."""
    while pool.next_claim < len(pool.claims) and pool.claims[pool.next_claim] <= until:
        at = pool.claims[pool.next_claim]
        pool.next_claim += 1
        ready = [prebuild for prebuild in pool.prebuilds if prebuild.ready_at <= at]
        if ready:
            taken = min(ready, key=lambda prebuild: prebuild.created_at)
            pool.prebuilds.remove(taken)
            pool.succeeded.append(_minutes(at))
            pool.claimed += measured
        else:
            pool.missed.append(_minutes(at))
            pool.misses += measured


def _plan(pool: _Pool, strategy: Strategy, now: datetime, generator: random.Random) -> Target:
    running = [prebuild for prebuild in pool.prebuilds if prebuild.ready_at <= now]
    starting = len(pool.prebuilds) - len(running)
    counts = PoolCounts(running=len(running), eligible=len(running), starting=starting)
    target = resolve_target(
        active=True,
        desired_instances=strategy.baseline,
        schedules=(),
        timezone="UTC",
        expression=target_expression(strategy.expression),
        pool=counts,
        demand=_demand(pool, now),
        previous_hold=pool.hold,
        settings=TargetSettings(max_desired_instances=100, stabilization_window=strategy.stabilization),
        now=now,
    )
    pool.hold = target.hold
    inputs = planner.PresetInputs(
        running=[prebuild.row for prebuild in running],
        in_progress=[InProgress(pool.preset.id, pool.preset.template_version_id, Transition.START, starting)]
        if starting
        else [],
    )
    # The pool is planned for `desired`; extraneous prebuilds are those above `retained`.
    create_plan, _ = planner.plan_preset(pool.with_target(target.desired), inputs, _CONFIG, now)
    delete_plan = create_plan
    if target.retained != target.desired:
        delete_plan, _ = planner.plan_preset(pool.with_target(target.retained), inputs, _CONFIG, now)
    for action in delete_plan.actions:
        if isinstance(action, DeleteAction) and action.reason is DeleteReason.EXTRANEOUS:
            doomed = set(action.workspace_ids)
            pool.prebuilds = [prebuild for prebuild in pool.prebuilds if prebuild.workspace_id not in doomed]
            pool.deletes += len(doomed) * (now >= MEASURED_FROM)
    for action in create_plan.actions:
        if isinstance(action, CreateAction):
            for _ in range(action.count):
                build = timedelta(minutes=generator.uniform(*BUILD_MINUTES))
                pool.prebuilds.append(_Prebuild.create(pool.preset, now, now + build))
            pool.creates += action.count * (now >= MEASURED_FROM)
    return target


_CONFIG = planner.PlannerConfig(max_desired_instances=100)


def _preset(index: int) -> Preset:
    return Preset(
        id=uuid.UUID(int=index + 1),
        name=f"preset-{index}",
        template_id=uuid.UUID(int=10_000 + index),
        template_name=f"template-{index}",
        template_version_id=uuid.UUID(int=20_000 + index),
        template_version_name="v1",
        organization_id=uuid.UUID(int=1),
        organization_name="acme",
        desired_instances=0,
        invalidate_after_secs=None,
        scheduling_timezone="UTC",
        prebuild_status=PrebuildStatus.NORMAL,
        last_invalidated_at=None,
        is_active_version=True,
        template_deleted=False,
        template_deprecated=False,
    )


@dataclass(frozen=True)
class Result:
    strategy: Strategy
    claims: int
    misses: int
    idle_hours: float
    creates: int
    deletes: int
    traces: tuple[list[tuple[datetime, int, int, int]], ...]
    # Per preset, the claims of the measured week that missed.
    missed: tuple[list[datetime], ...]


def simulate(strategy: Strategy, streams: list[list[datetime]], seed: int) -> Result:
    generator = random.Random(seed)
    pools = [_Pool(_preset(index), claims) for index, claims in enumerate(streams)]
    now = START
    end = START + timedelta(days=DAYS)
    while now < end:
        measured = now >= MEASURED_FROM
        for pool in pools:
            _claim(pool, now, measured)
            target = _plan(pool, strategy, now, generator)
            if measured:
                pool.idle_minutes += len(pool.prebuilds)
                eligible = sum(prebuild.ready_at <= now for prebuild in pool.prebuilds)
                pool.trace.append((now, target.desired, eligible, target.retained))
        now += PASS
    return Result(
        strategy,
        claims=sum(pool.claimed + pool.misses for pool in pools),
        misses=sum(pool.misses for pool in pools),
        idle_hours=sum(pool.idle_minutes for pool in pools) / 60,
        creates=sum(pool.creates for pool in pools),
        deletes=sum(pool.deletes for pool in pools),
        traces=tuple(pool.trace for pool in pools),
        missed=tuple(
            [START + timedelta(minutes=at) for at in pool.missed if at >= _minutes(MEASURED_FROM)] for pool in pools
        ),
    )


def table(results: list[Result]) -> str:
    coder = next(result for result in results if result.strategy.name == CODER)
    lines = [
        "| strategy | expression | misses | vs Coder | idle prebuild-hours | vs Coder | creates | deletes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        expression = "`" + result.strategy.expression + "`" if result.strategy.expression else "—"
        if result.strategy.expression == LAST_WEEK_EXPRESSION:
            expression = "below"
        window = f", window {result.strategy.stabilization.seconds // 60} min" if result.strategy.stabilization else ""
        lines.append(
            f"| {result.strategy.name}{window} | {expression} | {result.misses} | "
            f"{(result.misses / coder.misses - 1) * 100:+.0f}% | {result.idle_hours:,.0f} | "
            f"{(result.idle_hours / coder.idle_hours - 1) * 100:+.0f}% | {result.creates} | {result.deletes} |"
        )
    return "\n".join(lines)


def _hourly(values: list[tuple[datetime, float]], hours: int) -> list[float]:
    """Hourly means of (time, value) samples taken every pass of the measured week."""
    sums, counts = [0.0] * hours, [0] * hours
    for at, value in values:
        hour = int((at - MEASURED_FROM) / timedelta(hours=1))
        sums[hour] += value
        counts[hour] += 1
    return [total / count if count else 0.0 for total, count in zip(sums, counts, strict=True)]


def picture(results: list[Result], streams: list[list[datetime]], path: Path) -> None:
    """The fleet over the measured week, hour by hour: demand, then target, eligible pool and misses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    shown = [result for result in results if result.strategy.name in (CODER, BEST)]
    hours = 7 * 24
    starts = [MEASURED_FROM + timedelta(hours=hour) for hour in range(hours)]
    figure, axes = pyplot.subplots(len(shown) + 1, 1, figsize=(14, 9), sharex=True)
    claims = [0] * hours
    for stream in streams:
        for at in stream:
            if at >= MEASURED_FROM:
                claims[int((at - MEASURED_FROM) / timedelta(hours=1))] += 1
    axes[0].bar(starts, claims, width=1 / 24, align="edge", color="tab:gray")
    axes[0].set_ylabel("claims per hour")
    axes[0].set_title(f"Demand: claims of the {len(streams)} presets, measured week (Monday to Sunday, UTC)")
    for axis, result in zip(axes[1:], shown, strict=True):
        # Fleet totals each pass, then hourly means.
        totals: dict[datetime, list[float]] = {}
        for trace in result.traces:
            for at, target, eligible, _retained in trace:
                point = totals.setdefault(at, [0.0, 0.0])
                point[0] += target
                point[1] += eligible
        target_line = _hourly([(at, point[0]) for at, point in totals.items()], hours)
        eligible_line = _hourly([(at, point[1]) for at, point in totals.items()], hours)
        misses = [0] * hours
        for missed in result.missed:
            for at in missed:
                misses[int((at - MEASURED_FROM) / timedelta(hours=1))] += 1
        axis.bar(starts, misses, width=1 / 24, align="edge", color="tab:red", alpha=0.6, label="misses per hour")
        axis.step(starts, target_line, where="post", color="tab:blue", linewidth=1.2, label="target (sum)")
        axis.step(starts, eligible_line, where="post", color="tab:green", linewidth=1.2, label="eligible pool (sum)")
        axis.set_ylabel("prebuilds / misses")
        axis.set_ylim(0, max(claims) * 0.6)
        axis.set_title(
            f"{result.strategy.name}: {result.misses:,} misses, {result.idle_hours:,.0f} idle prebuild-hours",
            fontsize=10,
        )
        axis.legend(loc="upper right", fontsize=8)
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", type=int, default=20)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--picture", type=Path, help="write the PNG picture here (needs matplotlib)")
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2: this machine's cores)")
    arguments = parser.parse_args()
    streams = claim_stream(arguments.presets, arguments.seed)
    started = time.perf_counter()
    # One process per core: the strategies are independent (same claims, same seed for build times).
    with ProcessPoolExecutor(max_workers=arguments.workers) as executor:
        futures = [executor.submit(simulate, strategy, streams, arguments.seed) for strategy in strategies()]
        results = [future.result() for future in futures]
    elapsed = time.perf_counter() - started
    print(
        f"{len(results)} strategies x {DAYS} simulated days simulated in {elapsed:.0f} s ({arguments.workers} workers)"
    )
    print(f"{arguments.presets} presets, seed {arguments.seed}, {results[0].claims} claims in the measured week")
    print(table(results))
    if arguments.picture:
        picture(results, streams, arguments.picture)
        print(f"picture: {arguments.picture}")


if __name__ == "__main__":
    main()
