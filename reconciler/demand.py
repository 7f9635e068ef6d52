"""Demand variables of a target expression, and the rule that turns an expression's value into a target.

The variables are Coder's (docs/DEMAND.md), plus ours: last week's demand (`claims_next_60m_last_week`,
`misses_next_60m_last_week`) and `cold_start`. Pure: the counts come from the pass's snapshot and the
local time from the preset's time zone; nothing here reads a clock or a database.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from reconciler.expression import CompiledExpression, ErrorKind, ExpressionError, Value, ValueType

# The windows of Coder's claims_Xm / misses_Xm / claim_rate_Xm, in minutes.
WINDOWS_MINUTES = (5, 10, 30, 60, 120)
# Ours: claims and misses in the hour that started exactly 7 days ago (weekly seasonality).
LAST_WEEK_WINDOW_MINUTES = 60


COLD_START = "cold_start"


class Variable(NamedTuple):
    name: str
    type: ValueType
    description: str


def _variables() -> tuple[Variable, ...]:
    variables = [
        Variable("scheduled_target", ValueType.INT, "the static or scheduled target (desired_instances or a schedule)"),
        Variable("running", ValueType.INT, "running prebuilds that have not expired"),
        Variable("eligible", ValueType.INT, "running prebuilds that are ready to be claimed"),
        Variable("starting", ValueType.INT, "prebuilds being created"),
        Variable("stopping", ValueType.INT, "prebuilds being stopped"),
        Variable("deleting", ValueType.INT, "prebuilds being deleted"),
        Variable("expired", ValueType.INT, "running prebuilds past their time-to-live or invalidation"),
    ]
    for minutes in WINDOWS_MINUTES:
        variables.append(
            Variable(f"claims_{minutes}m", ValueType.INT, f"prebuilds claimed in the last {minutes} minutes")
        )
    for minutes in WINDOWS_MINUTES:
        variables.append(
            Variable(
                f"misses_{minutes}m", ValueType.INT, f"claims that found no prebuild in the last {minutes} minutes"
            )
        )
    for minutes in WINDOWS_MINUTES:
        variables.append(
            Variable(f"claim_rate_{minutes}m", ValueType.FLOAT, f"claims_{minutes}m / {minutes}, per minute")
        )
    variables += [
        Variable("hour", ValueType.INT, "hour of the day, 0-23, in the preset's scheduling time zone"),
        Variable("weekday", ValueType.INT, "day of the week, 0 = Sunday, in the preset's scheduling time zone"),
        Variable(
            "claims_next_60m_last_week",
            ValueType.INT,
            "prebuilds claimed in the hour that started exactly 7 days ago (ours)",
        ),
        Variable(
            "misses_next_60m_last_week",
            ValueType.INT,
            "claims that found no prebuild in the hour that started exactly 7 days ago (ours)",
        ),
        Variable(
            COLD_START,
            ValueType.BOOL,
            "true until the preset's first claim event (ours); reading it turns the cold-start rule off",
        ),
    ]
    return tuple(variables)


VARIABLES = _variables()
VARIABLE_TYPES = {variable.name: variable.type for variable in VARIABLES}
LAST_WEEK_VARIABLES = ("claims_next_60m_last_week", "misses_next_60m_last_week")


@dataclass(frozen=True, slots=True)
class PoolCounts:
    """The pool as the planner counts it (BEHAVIOR.md section 2); `running` excludes expired prebuilds."""

    running: int = 0
    eligible: int = 0
    starting: int = 0
    stopping: int = 0
    deleting: int = 0
    expired: int = 0


@dataclass(frozen=True, slots=True)
class DemandCounts:
    """A preset's claim events: per window of WINDOWS_MINUTES ending now, and last week's hour."""

    claims: tuple[int, ...] = (0,) * len(WINDOWS_MINUTES)
    misses: tuple[int, ...] = (0,) * len(WINDOWS_MINUTES)
    claims_next_60m_last_week: int = 0
    misses_next_60m_last_week: int = 0
    # Whether the preset has ever had a claim event (succeeded or missed) since its version was published.
    has_history: bool = False

    def __post_init__(self) -> None:
        if len(self.claims) != len(WINDOWS_MINUTES) or len(self.misses) != len(WINDOWS_MINUTES):
            raise ValueError(f"claims and misses need one count per window {WINDOWS_MINUTES}")


NO_DEMAND = DemandCounts()


class _Inputs(NamedTuple):
    scheduled_target: int
    pool: PoolCounts
    demand: DemandCounts
    local_time: datetime


def _window_getters() -> dict[str, Callable[[_Inputs], Value]]:
    getters: dict[str, Callable[[_Inputs], Value]] = {}
    for index, minutes in enumerate(WINDOWS_MINUTES):
        getters[f"claims_{minutes}m"] = functools.partial(_claims, index)
        getters[f"misses_{minutes}m"] = functools.partial(_misses, index)
        getters[f"claim_rate_{minutes}m"] = functools.partial(_claim_rate, index, minutes)
    return getters


def _claims(index: int, inputs: _Inputs) -> int:
    return inputs.demand.claims[index]


def _misses(index: int, inputs: _Inputs) -> int:
    return inputs.demand.misses[index]


def _claim_rate(index: int, minutes: int, inputs: _Inputs) -> float:
    return inputs.demand.claims[index] / minutes


# One getter per variable: a pass computes only the variables its expression reads (a fleet of 10,000
# presets pays for two or three values each, not for all of them).
_GETTERS: dict[str, Callable[[_Inputs], Value]] = {
    "scheduled_target": lambda inputs: inputs.scheduled_target,
    "running": lambda inputs: inputs.pool.running,
    "eligible": lambda inputs: inputs.pool.eligible,
    "starting": lambda inputs: inputs.pool.starting,
    "stopping": lambda inputs: inputs.pool.stopping,
    "deleting": lambda inputs: inputs.pool.deleting,
    "expired": lambda inputs: inputs.pool.expired,
    "hour": lambda inputs: inputs.local_time.hour,
    # Python counts Monday as 0; Coder (Go) counts Sunday as 0.
    "weekday": lambda inputs: (inputs.local_time.weekday() + 1) % 7,
    "claims_next_60m_last_week": lambda inputs: inputs.demand.claims_next_60m_last_week,
    "misses_next_60m_last_week": lambda inputs: inputs.demand.misses_next_60m_last_week,
    COLD_START: lambda inputs: not inputs.demand.has_history,
    **_window_getters(),
}
assert set(_GETTERS) == set(VARIABLE_TYPES), "every variable has a getter"


def target_variables(
    scheduled_target: int,
    pool: PoolCounts,
    demand: DemandCounts,
    local_time: datetime,
    names: Iterable[str] | None = None,
) -> dict[str, Value]:
    """The variables `names` (default: all of VARIABLES) for one preset, `local_time` in its time zone."""
    inputs = _Inputs(scheduled_target, pool, demand, local_time)
    return {name: _GETTERS[name](inputs) for name in (_GETTERS if names is None else names)}


def integral_target(value: Value) -> int | ExpressionError:
    """The integer rule: an int, or a finite float with no fractional part (3.0 is 3; 3.5 is an error)."""
    if isinstance(value, bool):
        return ExpressionError(ErrorKind.TYPE, "the expression must evaluate to a number of prebuilds, not a boolean")
    if isinstance(value, int):
        return value
    if not math.isfinite(value):
        return ExpressionError(ErrorKind.NOT_FINITE, f"the expression evaluated to {value}, not a finite number")
    if not value.is_integer():
        return ExpressionError(
            ErrorKind.NOT_INTEGRAL,
            f"the expression evaluated to {value}, not a whole number (use ceil, floor or round)",
        )
    return int(value)


def clamp_target(value: int, cap: int) -> int:
    """A target is never negative and never above the desired-instances cap."""
    return min(max(value, 0), cap)


def evaluate_target(compiled: CompiledExpression, variables: dict[str, Value], cap: int) -> int | ExpressionError:
    value = compiled.evaluate(variables)
    if isinstance(value, ExpressionError):
        return value
    target = integral_target(value)
    if isinstance(target, ExpressionError):
        return target
    return clamp_target(target, cap)
