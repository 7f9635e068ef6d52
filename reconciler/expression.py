"""Target expressions once compiled: their values, types and errors, and their evaluation.

The language (Coder's syntax for what a target needs) is read by `reconciler/expression_compiler.py`,
which turns an expression into a `CompiledExpression`: a tree of Python closures, type-checked, with
nothing that could reach `eval`, attributes or I/O. This module is what the planner needs to evaluate
one; it uses the standard library only. Errors are values (`ExpressionError`), never exceptions, so that
one preset's bad expression cannot fail a pass.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# Bounded cost: a pass may evaluate tens of thousands of expressions, written by template authors.
MAX_LENGTH = 2000
MAX_DEPTH = 64

Value = int | float | bool
Variables = Mapping[str, Value]
Evaluator = Callable[[Variables], Value]


class ValueType(enum.StrEnum):
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"

    @property
    def numeric(self) -> bool:
        return self is not ValueType.BOOL


class ErrorKind(enum.StrEnum):
    """What went wrong; the first four are found when compiling, the others when evaluating."""

    SYNTAX = "syntax"
    UNKNOWN_NAME = "unknown_name"
    TYPE = "type"
    TOO_COMPLEX = "too_complex"
    DIVISION_BY_ZERO = "division_by_zero"
    ARGUMENT = "argument"
    NOT_FINITE = "not_finite"
    NOT_INTEGRAL = "not_integral"
    # Not the expression's fault: the preset's time zone, which `hour` and `weekday` need.
    TIME_ZONE = "time_zone"


@dataclass(frozen=True, slots=True)
class ExpressionError:
    kind: ErrorKind
    message: str

    def __str__(self) -> str:
        return self.message


class EvaluationError(Exception):
    """Raised inside the closures; turned into an ExpressionError by `CompiledExpression.evaluate`."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class CompiledExpression:
    """An expression ready to evaluate against any values of its variable table."""

    text: str
    result_type: ValueType
    # The variables the expression reads, so that callers can show its inputs (and know what it uses).
    names: frozenset[str]
    _evaluate: Evaluator

    def evaluate(self, variables: Variables) -> Value | ExpressionError:
        try:
            return self._evaluate(variables)
        except EvaluationError as error:
            return ExpressionError(error.kind, str(error))
        except ZeroDivisionError:
            return ExpressionError(ErrorKind.DIVISION_BY_ZERO, "division by zero")
        except OverflowError:
            return ExpressionError(ErrorKind.NOT_FINITE, "a number is too large")
        except ValueError as error:
            # math.pow of a negative number to a fractional power, ceil of NaN: not a real, finite number.
            return ExpressionError(ErrorKind.NOT_FINITE, f"not a finite number ({error})")


@dataclass(frozen=True, slots=True)
class InvalidExpression:
    """An expression that does not compile: its text and why."""

    text: str
    error: ExpressionError
