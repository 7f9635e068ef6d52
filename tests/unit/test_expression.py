"""The expression language of target expressions: Coder's syntax, its types, errors as values, bounded cost."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.expression import (
    MAX_DEPTH,
    MAX_LENGTH,
    CompiledExpression,
    ErrorKind,
    ExpressionError,
    Value,
    ValueType,
)
from reconciler.expression_compiler import compile_expression

TABLE = {"a": ValueType.INT, "b": ValueType.INT, "rate": ValueType.FLOAT, "hour": ValueType.INT, "flag": ValueType.BOOL}
VALUES: dict[str, Value] = {"a": 3, "b": 4, "rate": 0.5, "hour": 10, "flag": True}


def compiled(text: str) -> CompiledExpression:
    result = compile_expression(text, TABLE)
    assert isinstance(result, CompiledExpression), result
    return result


def evaluate(text: str, values: dict[str, Value] | None = None) -> Value | ExpressionError:
    return compiled(text).evaluate(VALUES if values is None else values)


def compile_error(text: str) -> ExpressionError:
    result = compile_expression(text, TABLE)
    assert isinstance(result, ExpressionError), f"{text!r} compiled"
    return result


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a + b * 2", 11),
        ("(a + b) * 2", 14),
        ("a - b - 1", -2),
        ("7 / 2", 3.5),  # '/' divides exactly, as in Expr
        ("-7 % 3", -1),  # Go's remainder truncates toward zero
        ("7 % -3", 1),
        ("2 ** 10", 1024.0),
        ("2 ^ 3", 8.0),
        ("-2 ** 2", -4.0),  # power binds tighter than unary minus
        ("2 ** -1", 0.5),
        ("1_000 + .5", 1000.5),
        ("1e3", 1000.0),
        ("min(a, b)", 3),
        ("max(a, b, 10)", 10),
        ("ceil(rate * 3)", 2.0),
        ("floor(rate * 3)", 1.0),
        ("abs(a - b)", 1),
        ("round(2.5)", 3.0),  # half away from zero, as Go's math.Round
        ("round(-2.5)", -3.0),
        ("clamp(a * 10, 1, 15)", 15),
        ("clamp(a, 5, 15)", 5),
        ("hour >= 9 && hour < 18 ? 10 : 2", 10),
        ("hour >= 9 and hour < 18 ? 10 : 2", 10),
        ("hour < 9 || hour >= 18 ? 10 : 2", 2),
        ("hour < 9 or hour >= 18 ? 10 : 2", 2),
        ("!(hour < 9) ? 1 : 0", 1),
        ("not flag ? 1 : 0", 0),
        ("a == 3 ? 1 : a == 4 ? 2 : 3", 1),  # nested conditionals associate to the right
        ("a != 3 ? 1 : b == 4 ? 2 : 3", 2),
        ("flag == true ? 1 : 0", 1),
        ("true ? a : b", 3),
        ("a == 3.0 ? 1 : 0", 1),
    ],
)
def test_evaluates_coder_syntax(text: str, expected: Value) -> None:
    assert evaluate(text) == expected


def test_result_types_are_known_before_evaluation() -> None:
    assert compiled("a + b").result_type is ValueType.INT
    assert compiled("a + rate").result_type is ValueType.FLOAT
    assert compiled("a / b").result_type is ValueType.FLOAT
    assert compiled("ceil(rate)").result_type is ValueType.FLOAT
    assert compiled("a > b").result_type is ValueType.BOOL
    assert compiled("flag ? a : b").result_type is ValueType.INT


def test_names_are_the_variables_read() -> None:
    assert compiled("max(a, ceil(rate * 8)) + 1").names == frozenset({"a", "rate"})
    assert compiled("1 + 2").names == frozenset()


def test_conditional_and_logic_short_circuit() -> None:
    # The branch not taken is not evaluated: its division by zero does not matter.
    assert evaluate("a > 0 ? a : 1 / 0") == 3
    assert evaluate("a > 0 || 1 / 0 > 1 ? 1 : 0") == 1
    assert evaluate("a < 0 && 1 / 0 > 1 ? 1 : 0") == 0


@pytest.mark.parametrize(
    ("text", "kind", "fragment"),
    [
        ("", ErrorKind.SYNTAX, "empty"),
        ("   ", ErrorKind.SYNTAX, "empty"),
        ("a +", ErrorKind.SYNTAX, "ends too early"),
        ("(a", ErrorKind.SYNTAX, "ends too early"),
        ("a ) b", ErrorKind.SYNTAX, "column 3"),
        ("a = 1", ErrorKind.SYNTAX, "column 3"),
        ('"text"', ErrorKind.SYNTAX, "column 1"),
        ("a.real", ErrorKind.SYNTAX, "column 2"),  # no attribute access
        ("a[0]", ErrorKind.SYNTAX, "column 2"),  # no subscripts
        ("__import__('os')", ErrorKind.SYNTAX, "column 12"),
        ("unknown + 1", ErrorKind.UNKNOWN_NAME, "unknown name unknown"),
        ("min + 1", ErrorKind.UNKNOWN_NAME, "a function"),
        ("pow(a, 2)", ErrorKind.UNKNOWN_NAME, "unknown function pow"),
        ("a(1)", ErrorKind.UNKNOWN_NAME, "unknown function a"),
        ("min()", ErrorKind.TYPE, "at least 1 argument"),
        ("clamp(a, 1)", ErrorKind.TYPE, "clamp takes 3 arguments"),
        ("ceil(a, b)", ErrorKind.TYPE, "ceil takes 1 argument"),
        ("a ? 1 : 2", ErrorKind.TYPE, "condition"),
        ("flag ? 1 : flag", ErrorKind.TYPE, "branches"),
        ("a && b", ErrorKind.TYPE, "booleans"),
        ("a || flag", ErrorKind.TYPE, "booleans"),
        ("!a", ErrorKind.TYPE, "boolean"),
        ("flag + 1", ErrorKind.TYPE, "numbers"),
        ("-flag", ErrorKind.TYPE, "number"),
        ("a == flag", ErrorKind.TYPE, "compares a number with a boolean"),
        ("a < b < 3", ErrorKind.TYPE, "compares a number with a boolean"),
        ("flag < flag", ErrorKind.TYPE, "numbers"),
        ("rate % 2", ErrorKind.TYPE, "whole numbers"),
        ("max(a, flag)", ErrorKind.TYPE, "argument 2"),
    ],
)
def test_compile_errors_say_what_is_wrong(text: str, kind: ErrorKind, fragment: str) -> None:
    error = compile_error(text)
    assert error.kind is kind
    assert fragment in error.message


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("a / (b - 4)", ErrorKind.DIVISION_BY_ZERO),
        ("a % (b - 4)", ErrorKind.DIVISION_BY_ZERO),
        ("clamp(a, 10, 0)", ErrorKind.ARGUMENT),
        ("ceil(1e999)", ErrorKind.NOT_FINITE),
        ("(0 - 8) ** 0.5", ErrorKind.NOT_FINITE),
        ("10.0 ** 400", ErrorKind.NOT_FINITE),
    ],
)
def test_evaluation_errors_are_values(text: str, kind: ErrorKind) -> None:
    result = evaluate(text)
    assert isinstance(result, ExpressionError)
    assert result.kind is kind


def test_length_and_depth_are_bounded() -> None:
    assert compile_error("1" + " + 1" * MAX_LENGTH).kind is ErrorKind.TOO_COMPLEX
    deep = "(" * (MAX_DEPTH + 1) + "a + 1" + ")" * (MAX_DEPTH + 1)
    assert isinstance(compile_expression(deep, TABLE), CompiledExpression)  # parentheses alone do not nest
    chain = " + ".join(["a"] * (MAX_DEPTH + 2))
    assert compile_error(chain).kind is ErrorKind.TOO_COMPLEX
    assert isinstance(compile_expression(" + ".join(["a"] * (MAX_DEPTH - 1)), TABLE), CompiledExpression)


def test_huge_input_is_refused_without_parsing() -> None:
    # A million characters of nesting must not reach the parser (nor the stack).
    error = compile_error("(" * 1_000_000)
    assert error.kind is ErrorKind.TOO_COMPLEX


# A reference implementation for the property below: integer trees rendered with full parentheses.
_LEAVES = st.one_of(st.integers(min_value=-50, max_value=50), st.sampled_from(["a", "b"]))


def _trees(children: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.tuples(st.sampled_from(["+", "-", "*", "min", "max", "abs"]), children, children)


@settings(max_examples=300, deadline=None)
@given(st.recursive(_LEAVES, _trees, max_leaves=12))
def test_integer_arithmetic_matches_a_reference(tree: object) -> None:
    def render(node: object) -> str:
        if isinstance(node, tuple):
            operator, left, right = node
            if operator in ("min", "max"):
                return f"{operator}({render(left)}, {render(right)})"
            if operator == "abs":
                return f"abs({render(left)})"
            return f"({render(left)} {operator} {render(right)})"
        return f"({node})" if isinstance(node, int) and node < 0 else str(node)

    def reference(node: object) -> int:
        if isinstance(node, tuple):
            operator, left, right = node
            if operator == "abs":
                return abs(reference(left))
            x, y = reference(left), reference(right)
            results = {"+": x + y, "-": x - y, "*": x * y, "min": min(x, y), "max": max(x, y)}
            return results[str(operator)]
        if isinstance(node, int):
            return node
        return int(VALUES[str(node)])

    assert evaluate(render(tree)) == reference(tree)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "a",
                "rate",
                "1",
                "2.5",
                "+",
                "-",
                "*",
                "/",
                "%",
                "(",
                ")",
                "?",
                ":",
                "&&",
                "||",
                "!",
                ",",
                "<",
                "==",
                "min",
                "clamp",
                "ceil",
                "flag",
                "true",
                "**",
                ".",
                "'",
                "x",
            ]
        ),
        max_size=25,
    )
)
def test_any_input_gives_a_value_or_an_error_never_an_exception(tokens: list[str]) -> None:
    result = compile_expression(" ".join(tokens), TABLE)
    if isinstance(result, CompiledExpression):
        assert isinstance(result.evaluate(VALUES), ExpressionError | int | float | bool)
