"""Compare expression libraries for target expressions: Coder's syntax, and the cost at 10,000 presets.

    pip install -e '.[bench]'        # the candidates and matplotlib (bench only; never the daemon's)
    python -m bench.expression_libraries

For each candidate: how many of Coder's syntax cases it reads with Coder's result, the time to compile one
expression, and the time to evaluate one expression for 10,000 presets (each with its own variables, the
expression compiled once). Candidates that are not installed are reported as such. The figures and the
choice are in docs/DEMAND.md.
"""

from __future__ import annotations

import importlib.util
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reconciler.demand import VARIABLE_TYPES
from reconciler.expression import CompiledExpression, ExpressionError
from reconciler.expression_compiler import compile_expression

PRESETS = 10_000
TIMED = "max(scheduled_target, ceil(claim_rate_30m * 8))"

# Coder's syntax (Expr), with the values Coder gives at VARIABLES below.
CASES: tuple[tuple[str, float], ...] = (
    ("min(claims_10m * 10, 20)", 20),
    ("max(scheduled_target, ceil(claim_rate_30m * 8))", 4),
    ("max(2, min((claims_60m + misses_60m) * 2, 30))", 12),
    ("clamp(claims_10m * 5, 1, 15)", 15),
    ("floor(claim_rate_60m * 3) + abs(misses_5m - 1)", 1),
    ("claims_10m / 2", 1.5),
    ("hour >= 9 && hour < 18 ? 10 : 2", 10),
    ("weekday == 0 || weekday == 6 ? 1 : scheduled_target", 3),
    ("!(hour < 9) ? 3 : 1", 3),
)
VARIABLES: dict[str, Any] = {
    "scheduled_target": 3,
    "claims_10m": 3,
    "claims_60m": 4,
    "misses_60m": 2,
    "misses_5m": 0,
    "claim_rate_30m": 0.5,
    "claim_rate_60m": 0.25,
    "hour": 10,
    "weekday": 1,
}


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(value, high))


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "min": min,
    "max": max,
    "ceil": math.ceil,
    "floor": math.floor,
    "abs": abs,
    "clamp": _clamp,
}


@dataclass
class Candidate:
    name: str
    # text -> something evaluate() takes; raises on a syntax it does not read
    compile: Callable[[str], Any]
    evaluate: Callable[[Any, dict[str, Any]], Any]


def _ours() -> Candidate:
    def compile_(text: str) -> CompiledExpression:
        # Not the cached compile_target_expression: the compilation itself is timed.
        compiled = compile_expression(text, VARIABLE_TYPES)
        if isinstance(compiled, ExpressionError):
            raise ValueError(compiled.message)
        return compiled

    def evaluate(compiled: CompiledExpression, variables: dict[str, Any]) -> Any:
        return compiled.evaluate(variables)

    return Candidate("ours (Lark grammar + closures)", compile_, evaluate)


def _simpleeval() -> Candidate:
    import simpleeval

    evaluator = simpleeval.SimpleEval(functions=FUNCTIONS)

    def evaluate(parsed: Any, variables: dict[str, Any]) -> Any:
        evaluator.names = variables
        return evaluator.eval("", previously_parsed=parsed)

    return Candidate("simpleeval", evaluator.parse, evaluate)


def _asteval() -> Candidate:
    import asteval

    interpreter = asteval.Interpreter(minimal=True, use_numpy=False)
    interpreter.symtable.update(FUNCTIONS)

    def compile_(text: str) -> Any:
        interpreter.error = []
        node = interpreter.parse(text)
        if node is None or interpreter.error:
            raise SyntaxError(text)
        return node

    def evaluate(node: Any, variables: dict[str, Any]) -> Any:
        interpreter.symtable.update(variables)
        return interpreter.run(node)

    return Candidate("asteval", compile_, evaluate)


def _cel() -> Candidate:
    import celpy
    from celpy import celtypes

    environment = celpy.Environment()
    functions: dict[str, Any] = {
        "ceil": lambda value: celtypes.IntType(math.ceil(value)),
        "floor": lambda value: celtypes.IntType(math.floor(value)),
        "min": min,
        "max": max,
        "abs": abs,
        "clamp": _clamp,
    }

    def compile_(text: str) -> Any:
        return environment.program(environment.compile(text), functions=functions)

    def evaluate(program: Any, variables: dict[str, Any]) -> Any:
        # CEL needs its own typed values: converting the activation is part of every evaluation.
        activation = {
            name: celtypes.DoubleType(value) if isinstance(value, float) else celtypes.IntType(value)
            for name, value in variables.items()
        }
        return program.evaluate(activation)

    return Candidate("cel-python", compile_, evaluate)


def _py_expression_eval() -> Candidate:
    from py_expression_eval import Parser

    parser = Parser()
    parser.functions.update({"min": min, "max": max, "clamp": _clamp})

    def evaluate(expression: Any, variables: dict[str, Any]) -> Any:
        return expression.evaluate(variables)

    return Candidate("py_expression_eval", parser.parse, evaluate)


def _numexpr() -> Candidate:
    import numexpr

    def compile_(text: str) -> Any:
        # NumExpr has no scalar min/max/clamp and no && || ?: ; it validates and compiles on first use.
        numexpr.validate(text, local_dict=dict(VARIABLES))
        return text

    def evaluate(text: str, variables: dict[str, Any]) -> Any:
        return numexpr.evaluate(text, local_dict=variables).item()

    return Candidate("numexpr", compile_, evaluate)


def _population(count: int) -> list[dict[str, Any]]:
    generator = random.Random(14)
    population = []
    for _ in range(count):
        variables: dict[str, Any] = {name: 0 for name, value_type in VARIABLE_TYPES.items() if value_type == "int"}
        variables.update(
            scheduled_target=generator.randint(0, 10),
            claims_30m=generator.randint(0, 40),
            hour=generator.randint(0, 23),
            weekday=generator.randint(0, 6),
        )
        for minutes in (5, 10, 30, 60, 120):
            variables[f"claim_rate_{minutes}m"] = variables.get(f"claims_{minutes}m", 0) / minutes
        population.append(variables)
    return population


def _syntax(candidate: Candidate) -> tuple[int, list[str]]:
    passed, failed = 0, []
    for text, expected in CASES:
        try:
            value = candidate.evaluate(candidate.compile(text), dict(VARIABLES))
            ok = value == expected
        except Exception:
            ok = False
        passed += ok
        if not ok:
            failed.append(text)
    return passed, failed


def _timed_text(candidate: Candidate) -> str:
    if candidate.name == "numexpr":
        # The closest numexpr reads (no scalar max): where(a > b, a, b).
        return "where(scheduled_target > ceil(claim_rate_30m * 8), scheduled_target, ceil(claim_rate_30m * 8))"
    return TIMED


def _speed(candidate: Candidate, population: list[dict[str, Any]]) -> tuple[float, float] | None:
    text = _timed_text(candidate)
    try:
        program = candidate.compile(text)
        candidate.evaluate(program, population[0])
    except Exception:
        return None
    compile_times = []
    for _ in range(50):
        started = time.perf_counter()
        candidate.compile(text)
        compile_times.append(time.perf_counter() - started)
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        for variables in population:
            value = candidate.evaluate(program, variables)
        runs.append(time.perf_counter() - started)
    del value
    return statistics.median(compile_times), min(runs)


def main() -> None:
    population = _population(PRESETS)
    factories = [
        ("lark", _ours),
        ("simpleeval", _simpleeval),
        ("asteval", _asteval),
        ("celpy", _cel),
        ("py_expression_eval", _py_expression_eval),
        ("numexpr", _numexpr),
    ]
    print(f"{'library':32} {'Coder syntax':>12} {'compile (ms)':>13} {'10,000 evaluations (ms)':>24}")
    for module, factory in factories:
        if importlib.util.find_spec(module) is None:
            print(f"{module:32} not installed (pip install -e '.[bench]')")
            continue
        candidate = factory()
        passed, failed = _syntax(candidate)
        speed = _speed(candidate, population)
        compile_ms = f"{speed[0] * 1000:.3f}" if speed else "-"
        evaluate_ms = f"{speed[1] * 1000:.0f}" if speed else "-"
        print(f"{candidate.name:32} {passed:>5}/{len(CASES):<6} {compile_ms:>13} {evaluate_ms:>24}")
        for text in failed:
            print(f"{'':34}misses: {text}")


if __name__ == "__main__":
    main()
