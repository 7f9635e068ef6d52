"""Target resolution (BEHAVIOR.md 2.1): Coder's documented examples, the integer rule, the cap, fallbacks,
cold start and the stabilization window."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from reconciler.demand import VARIABLE_TYPES, WINDOWS_MINUTES, DemandCounts, PoolCounts, target_variables
from reconciler.expression import CompiledExpression, ErrorKind, InvalidExpression
from reconciler.expression_compiler import compile_target_expression, target_expression
from reconciler.snapshot import Schedule
from reconciler.target import Target, TargetHold, TargetSettings, TargetSource, resolve_target, stabilize

# A Wednesday, 10:30 in Berlin (08:30 UTC in summer time).
NOW = datetime(2025, 6, 11, 8, 30, tzinfo=UTC)
SETTINGS = TargetSettings(max_desired_instances=100, stabilization_window=timedelta(0))


def demand(**counts: int) -> DemandCounts:
    """claims_10m=3 style keywords; any event at all gives the preset a demand history."""
    claims = tuple(counts.get(f"claims_{minutes}m", 0) for minutes in WINDOWS_MINUTES)
    misses = tuple(counts.get(f"misses_{minutes}m", 0) for minutes in WINDOWS_MINUTES)
    return DemandCounts(
        claims=claims,
        misses=misses,
        claims_next_60m_last_week=counts.get("claims_next_60m_last_week", 0),
        misses_next_60m_last_week=counts.get("misses_next_60m_last_week", 0),
        has_history=bool(counts.get("history", 1)),
    )


def resolve(
    expression: str | None,
    *,
    desired_instances: int = 3,
    counts: DemandCounts | None = None,
    timezone: str = "Europe/Berlin",
    active: bool = True,
    schedules: tuple[Schedule, ...] = (),
    previous: TargetHold | None = None,
    settings: TargetSettings = SETTINGS,
    now: datetime = NOW,
    pool: PoolCounts | None = None,
) -> Target:
    return resolve_target(
        active=active,
        desired_instances=desired_instances,
        schedules=schedules,
        timezone=timezone,
        expression=target_expression(expression),
        pool=pool or PoolCounts(),
        demand=counts or demand(),
        previous_hold=previous,
        settings=settings,
        now=now,
    )


# Coder's documented examples (docs/admin/templates/extending-templates/prebuilt-workspaces autoscaling),
# with the values Coder's evaluator gives for them, worked out by hand from Expr's rules.
@pytest.mark.parametrize(
    ("expression", "counts", "expected"),
    [
        ("min(claims_10m * 10, 20)", {"claims_10m": 0}, 0),
        ("min(claims_10m * 10, 20)", {"claims_10m": 1}, 10),
        ("min(claims_10m * 10, 20)", {"claims_10m": 3}, 20),
        ("max(scheduled_target, ceil(claim_rate_30m * 8))", {"claims_30m": 0}, 3),
        ("max(scheduled_target, ceil(claim_rate_30m * 8))", {"claims_30m": 7}, 3),  # ceil(1.87) = 2 < 3
        ("max(scheduled_target, ceil(claim_rate_30m * 8))", {"claims_30m": 15}, 4),  # 0.5 * 8 = 4
        ("max(scheduled_target, ceil(claim_rate_30m * 8))", {"claims_30m": 31}, 9),  # ceil(8.27)
        ("max(2, min((claims_60m + misses_60m) * 2, 30))", {}, 2),
        ("max(2, min((claims_60m + misses_60m) * 2, 30))", {"claims_60m": 4, "misses_60m": 2}, 12),
        ("max(2, min((claims_60m + misses_60m) * 2, 30))", {"claims_60m": 10, "misses_60m": 10}, 30),
        ("clamp(claims_10m * 5, 1, 15)", {"claims_10m": 0}, 1),
        ("clamp(claims_10m * 5, 1, 15)", {"claims_10m": 2}, 10),
        ("clamp(claims_10m * 5, 1, 15)", {"claims_10m": 4}, 15),
        # Coder's own evaluator tests.
        ("max(scheduled_target, 5)", {}, 5),
        ("claims_5m + misses_5m", {"claims_5m": 2, "misses_5m": 1}, 3),
        ("scheduled_target - 10", {}, 0),  # negative: clamped to 0
        ("claims_120m * 1000", {"claims_120m": 2}, 100),  # above the cap: clamped to it
        ("clamp(claims_10m * 20, 0, 50)", {"claims_10m": 3}, 50),
        ("ceil(claim_rate_5m * 2)", {"claims_5m": 4}, 2),  # 0.8 * 2 = 1.6 -> 2
        ("claims_10m / 2", {"claims_10m": 4}, 2),  # a float that is whole is a target
        ("hour >= 9 && hour < 18 ? 10 : 2", {}, 10),  # 10:30 in Berlin
        ("weekday == 3 ? 7 : 1", {}, 7),  # Wednesday; 0 is Sunday
    ],
)
def test_coder_examples_give_coder_results(expression: str, counts: dict[str, int], expected: int) -> None:
    target = resolve(expression, counts=demand(**counts))
    assert target.error is None
    assert target.source is TargetSource.EXPRESSION
    assert target.desired == expected
    assert target.result == expected
    assert target.scheduled_target == 3


def test_hour_and_weekday_are_in_the_presets_time_zone() -> None:
    # 23:30 UTC on Saturday is 01:30 on Sunday in Berlin.
    late = datetime(2025, 6, 14, 23, 30, tzinfo=UTC)
    assert resolve("hour", now=late).desired == 1
    assert resolve("weekday", now=late).desired == 0
    assert resolve("hour", now=late, timezone="UTC").desired == 23
    assert resolve("weekday", now=late, timezone="UTC").desired == 6


def test_claim_rates_are_per_minute_floats() -> None:
    variables = target_variables(3, PoolCounts(), demand(claims_30m=15, claims_120m=30), NOW)
    assert variables["claim_rate_30m"] == 0.5
    assert variables["claim_rate_120m"] == 0.25
    assert {name: type(value) for name, value in variables.items()} == {
        name: {"int": int, "float": float, "bool": bool}[value_type] for name, value_type in VARIABLE_TYPES.items()
    }


def test_the_pool_is_visible_to_the_expression() -> None:
    pool = PoolCounts(running=5, eligible=4, starting=2, stopping=1, deleting=1, expired=3)
    target = resolve("running + eligible + starting + stopping + deleting + expired", pool=pool)
    assert target.desired == 16
    assert dict(target.inputs) == {
        "running": 5,
        "eligible": 4,
        "starting": 2,
        "stopping": 1,
        "deleting": 1,
        "expired": 3,
    }


def test_inputs_are_the_variables_the_expression_read() -> None:
    target = resolve("max(scheduled_target, ceil(claim_rate_30m * 8))", counts=demand(claims_30m=15))
    assert target.inputs == (("claim_rate_30m", 0.5), ("scheduled_target", 3))


@pytest.mark.parametrize(
    ("expression", "kind", "fragment"),
    [
        ("claims_10m +", ErrorKind.SYNTAX, "syntax error"),
        ("unknown_metric + 1", ErrorKind.UNKNOWN_NAME, "unknown name unknown_metric"),
        ("claims_10m > 0", ErrorKind.TYPE, "not a boolean"),
        ("claims_10m / misses_10m", ErrorKind.DIVISION_BY_ZERO, "division by zero"),
        ("claim_rate_10m * 5", ErrorKind.NOT_INTEGRAL, "3.5"),  # 7 claims / 10 * 5
        ("clamp(5, 10, 0)", ErrorKind.ARGUMENT, "lower bound"),
        ("10.0 ** 400", ErrorKind.NOT_FINITE, "too large"),
    ],
)
def test_failures_fall_back_to_the_scheduled_target(expression: str, kind: ErrorKind, fragment: str) -> None:
    target = resolve(expression, counts=demand(claims_10m=7))
    assert target.source is TargetSource.EXPRESSION_FALLBACK
    assert target.desired == 3
    assert target.retained == 3
    assert target.result is None
    assert target.error is not None
    assert target.error.kind is kind
    assert fragment in target.error.message
    assert target.expression == expression


@pytest.mark.parametrize("timezone", ["", "  ", "Mars/Olympus_Mons"])
def test_no_valid_time_zone_falls_back(timezone: str) -> None:
    target = resolve("claims_10m + 1", timezone=timezone)
    assert target.source is TargetSource.EXPRESSION_FALLBACK
    assert target.desired == 3
    assert target.error is not None
    assert target.error.kind is ErrorKind.TIME_ZONE


def test_the_expression_wins_over_static_and_schedule_targets() -> None:
    schedules = (Schedule("* * * * *", 8),)
    assert resolve(None, schedules=schedules).source is TargetSource.SCHEDULE
    assert resolve(None, schedules=schedules).desired == 8
    assert resolve(None).source is TargetSource.STATIC
    target = resolve("scheduled_target + 1", schedules=schedules)
    assert target.source is TargetSource.EXPRESSION
    assert (target.scheduled_target, target.desired) == (8, 9)


@pytest.mark.parametrize("blank", ["", "   ", "\n\t"])
def test_a_blank_expression_is_no_expression(blank: str) -> None:
    target = resolve(blank)
    assert target.source is TargetSource.STATIC
    assert target.expression is None
    assert target.hold is None


def test_an_inactive_preset_targets_zero_whatever_the_expression() -> None:
    target = resolve("50", active=False)
    assert (target.source, target.desired, target.retained) == (TargetSource.INACTIVE, 0, 0)


def test_the_cap_applies_to_the_scheduled_target_and_the_result() -> None:
    capped = TargetSettings(max_desired_instances=10, stabilization_window=timedelta(0))
    target = resolve("scheduled_target * 2", desired_instances=30, settings=capped)
    assert target.scheduled_target == 10
    assert target.desired == 10
    assert [event for event, _ in target.problems] == ["preset.desired_capped"]


def test_compiled_once_per_distinct_text() -> None:
    first = compile_target_expression("claims_5m + misses_5m + 0")
    assert isinstance(first, CompiledExpression)
    assert compile_target_expression("claims_5m + misses_5m + 0") is first


# Cold start: the expression gives 0 and the preset has never seen a claim event.
def test_cold_start_keeps_the_scheduled_target_until_the_first_event() -> None:
    cold = resolve("min(claims_10m * 10, 20)", counts=demand(history=0))
    assert cold.cold_start is True
    assert cold.source is TargetSource.EXPRESSION
    assert (cold.result, cold.desired) == (0, 3)
    warm = resolve("min(claims_10m * 10, 20)", counts=demand(history=1))
    assert warm.cold_start is False
    assert warm.desired == 0


def test_cold_start_does_not_hold_a_nonzero_result() -> None:
    target = resolve("1", counts=demand(history=0))
    assert (target.cold_start, target.desired) == (False, 1)


def test_an_expression_that_reads_cold_start_decides_itself() -> None:
    target = resolve("cold_start ? 0 : claims_10m", counts=demand(history=0))
    assert (target.cold_start, target.desired) == (False, 0)
    target = resolve("cold_start ? 5 : claims_10m", counts=demand(history=0))
    assert target.desired == 5


# Stabilization.
WINDOW = timedelta(minutes=5)


def test_increases_act_at_once_and_drops_wait_for_the_window() -> None:
    hold = stabilize(None, 10, WINDOW, NOW)
    assert hold == TargetHold(retained=10, peak=10)
    hold = stabilize(hold, 4, WINDOW, NOW + timedelta(minutes=1))
    assert (hold.retained, hold.lowered_since) == (10, NOW + timedelta(minutes=1))
    hold = stabilize(hold, 12, WINDOW, NOW + timedelta(minutes=2))
    assert hold == TargetHold(retained=12, peak=12)
    hold = stabilize(hold, 4, WINDOW, NOW + timedelta(minutes=3))
    hold = stabilize(hold, 6, WINDOW, NOW + timedelta(minutes=5))
    hold = stabilize(hold, 4, WINDOW, NOW + timedelta(minutes=7))
    assert hold.retained == 12  # 4 minutes below: not yet
    hold = stabilize(hold, 4, WINDOW, NOW + timedelta(minutes=8))
    # The window held: down to the highest target seen in it (6), and a new window for the rest.
    assert hold == TargetHold(retained=6, lowered_since=NOW + timedelta(minutes=8), peak=4)
    hold = stabilize(hold, 4, WINDOW, NOW + timedelta(minutes=13))
    assert hold == TargetHold(retained=4, peak=4)


def test_a_zero_window_is_coders_immediate_behaviour() -> None:
    hold = stabilize(TargetHold(retained=10, peak=10), 2, timedelta(0), NOW)
    assert hold == TargetHold(retained=2, peak=2)


def test_a_drop_keeps_prebuilds_but_creates_only_to_the_new_target() -> None:
    settings = TargetSettings(stabilization_window=WINDOW)
    first = resolve("claims_10m", counts=demand(claims_10m=10), settings=settings)
    assert (first.desired, first.retained) == (10, 10)
    second = resolve(
        "claims_10m",
        counts=demand(claims_10m=2),
        previous=first.hold,
        settings=settings,
        now=NOW + timedelta(minutes=1),
    )
    assert (second.desired, second.retained) == (2, 10)
    later = resolve(
        "claims_10m",
        counts=demand(claims_10m=2),
        previous=second.hold,
        settings=settings,
        now=NOW + timedelta(minutes=6),
    )
    assert (later.desired, later.retained) == (2, 2)


def test_a_fallback_is_stabilized_too() -> None:
    settings = TargetSettings(stabilization_window=WINDOW)
    first = resolve("claims_10m", counts=demand(claims_10m=10), settings=settings)
    broken = resolve("claims_10m / 0", previous=first.hold, settings=settings, now=NOW + timedelta(minutes=1))
    assert broken.source is TargetSource.EXPRESSION_FALLBACK
    assert (broken.desired, broken.retained) == (3, 10)


def test_every_variable_compiles_and_a_boolean_alone_is_refused() -> None:
    # Every variable compiles on its own; a boolean alone is refused as a target.
    for name, value_type in VARIABLE_TYPES.items():
        compiled = compile_target_expression(name)
        assert isinstance(compiled, InvalidExpression) == (value_type == "bool"), name
