"""The language of target expressions: Coder's syntax (Expr) for what a target needs, parsed by Lark.

    numbers 3, 2.5, 1_000, 1e3; variables; ( )
    unary - + ! not;  ** ^ (power);  * / %;  + -;  == != < <= > >=;  && and;  || or;  cond ? a : b
    functions min(a, ...), max(a, ...), ceil(x), floor(x), abs(x), round(x), clamp(value, low, high)

An expression is parsed by Lark (LALR: linear time, no recursion), type-checked against a table of
variables (int, float, bool) and compiled into a tree of Python closures (`CompiledExpression`). Nothing
reaches `eval`, attributes, subscripts, strings, loops or any name outside the table and the functions
above; an expression's cost is linear in its size, which is bounded (length and nesting). docs/DEMAND.md
lists where we differ from Coder's language, and why this parser rather than a library's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping

import lark

from reconciler.demand import VARIABLE_TYPES
from reconciler.expression import (
    MAX_DEPTH,
    MAX_LENGTH,
    CompiledExpression,
    ErrorKind,
    EvaluationError,
    Evaluator,
    ExpressionError,
    InvalidExpression,
    Value,
    ValueType,
    Variables,
)


class _CompileError(Exception):
    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


_GRAMMAR = r"""
?start: conditional

?conditional: disjunction
    | disjunction "?" conditional ":" conditional -> conditional

?disjunction: conjunction
    | disjunction ("||" | "or") conjunction -> or_

?conjunction: comparison
    | conjunction ("&&" | "and") comparison -> and_

?comparison: sum
    | comparison COMPARISON sum -> compare

?sum: product
    | sum "+" product -> add
    | sum "-" product -> subtract

?product: unary
    | product "*" unary -> multiply
    | product "/" unary -> divide
    | product "%" unary -> modulo

?unary: power
    | "-" unary -> negate
    | "+" unary -> plus
    | ("!" | "not") unary -> not_

?power: atom
    | atom ("**" | "^") unary -> power

?atom: INT -> integer
    | FLOAT -> float
    | NAME -> name
    | NAME "(" [conditional ("," conditional)*] ")" -> call
    | "(" conditional ")"

COMPARISON: "==" | "!=" | "<=" | ">=" | "<" | ">"
FLOAT: /(\d+(_\d+)*)?\.\d+(_\d+)*([eE][+-]?\d+)?/ | /\d+(_\d+)*[eE][+-]?\d+/
INT: /\d+(_\d+)*/
NAME: /[A-Za-z_][A-Za-z0-9_]*/

WS: /[ \t\f\r\n]+/
%ignore WS
"""


@functools.cache
def _parser() -> lark.Lark:
    # LALR: linear time and no recursion, whatever the input; built once per process.
    return lark.Lark(_GRAMMAR, parser="lalr", maybe_placeholders=False)


def compile_expression(text: str, variables: Mapping[str, ValueType]) -> CompiledExpression | ExpressionError:
    """Parse, type-check and compile; an ExpressionError says what is wrong and where."""
    stripped = text.strip()
    if not stripped:
        return ExpressionError(ErrorKind.SYNTAX, "the expression is empty")
    if len(stripped) > MAX_LENGTH:
        return ExpressionError(
            ErrorKind.TOO_COMPLEX, f"the expression is {len(stripped)} characters long; at most {MAX_LENGTH}"
        )
    try:
        tree = _parser().parse(stripped)
    except lark.exceptions.UnexpectedEOF:
        return ExpressionError(ErrorKind.SYNTAX, "syntax error: the expression ends too early")
    except lark.exceptions.UnexpectedInput as error:
        return ExpressionError(ErrorKind.SYNTAX, _syntax_message(stripped, error))
    if _depth(tree) > MAX_DEPTH:
        return ExpressionError(ErrorKind.TOO_COMPLEX, f"the expression nests more than {MAX_DEPTH} levels deep")
    compiler = _Compiler(variables)
    try:
        result_type, evaluator = compiler.compile(tree)
    except _CompileError as error:
        return ExpressionError(error.kind, str(error))
    return CompiledExpression(stripped, result_type, frozenset(compiler.names), evaluator)


def _syntax_message(text: str, error: lark.exceptions.UnexpectedInput) -> str:
    column = getattr(error, "column", None)
    if isinstance(error, lark.exceptions.UnexpectedToken) and error.token.type == "$END":
        return "syntax error: the expression ends too early"
    if isinstance(column, int) and 1 <= column <= len(text):
        found = text[column - 1 :].split(maxsplit=1)[0][:20]
        return f"syntax error at column {column}: unexpected {found!r}"
    return "syntax error"


def _depth(tree: lark.Tree[lark.Token]) -> int:
    """How deeply the tree nests, counted without recursion (a deep input must not exhaust the stack)."""
    deepest = 0
    pending: list[tuple[lark.Tree[lark.Token], int]] = [(tree, 1)]
    while pending:
        node, depth = pending.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        pending.extend((child, depth + 1) for child in node.children if isinstance(child, lark.Tree))
    return deepest


def _numeric_result(*types: ValueType) -> ValueType:
    return ValueType.FLOAT if ValueType.FLOAT in types else ValueType.INT


def _go_remainder(left: int, right: int) -> int:
    # Expr (Go) truncates toward zero: -7 % 3 is -1 there, 2 in Python.
    if right == 0:
        raise ZeroDivisionError
    remainder = abs(left) % abs(right)
    return -remainder if left < 0 else remainder


def _round_half_away(value: float) -> float:
    # Expr's round is Go's math.Round (half away from zero); Python's round goes to the even neighbour.
    return float(math.floor(value + 0.5)) if value >= 0 else -float(math.floor(-value + 0.5))


def _clamp(value: float, low: float, high: float) -> float:
    if low > high:
        raise EvaluationError(ErrorKind.ARGUMENT, f"clamp: the lower bound {low} is above the upper bound {high}")
    return low if value < low else high if value > high else value


# name: (least arguments, most arguments or None, function, result type from the argument types)
_FUNCTIONS: dict[str, tuple[int, int | None, Callable[..., Value], Callable[[list[ValueType]], ValueType]]] = {
    "min": (1, None, min, lambda types: _numeric_result(*types)),
    "max": (1, None, max, lambda types: _numeric_result(*types)),
    "ceil": (1, 1, lambda value: float(math.ceil(value)), lambda types: ValueType.FLOAT),
    "floor": (1, 1, lambda value: float(math.floor(value)), lambda types: ValueType.FLOAT),
    "round": (1, 1, _round_half_away, lambda types: ValueType.FLOAT),
    "abs": (1, 1, abs, lambda types: types[0]),
    "clamp": (3, 3, _clamp, lambda types: _numeric_result(*types)),
}
FUNCTION_NAMES = tuple(sorted(_FUNCTIONS))

_COMPARISONS: dict[str, Callable[[Value, Value], bool]] = {
    "==": lambda left, right: left == right,
    "!=": lambda left, right: left != right,
    "<": lambda left, right: left < right,
    "<=": lambda left, right: left <= right,
    ">": lambda left, right: left > right,
    ">=": lambda left, right: left >= right,
}

_ARITHMETIC_SYMBOLS = {
    "add": "+",
    "subtract": "-",
    "multiply": "*",
    "divide": "/",
    "modulo": "%",
    "power": "**",
}


class _Compiler:
    """Turns a parse tree into (static type, closure), checking types as Expr's compiler does."""

    def __init__(self, variables: Mapping[str, ValueType]) -> None:
        self.variables = variables
        self.names: set[str] = set()

    def compile(self, node: lark.Tree[lark.Token] | lark.Token) -> tuple[ValueType, Evaluator]:
        if isinstance(node, lark.Token):  # pragma: no cover - every token is wrapped in an aliased rule
            raise _CompileError(ErrorKind.SYNTAX, f"unexpected {node!s}")
        rule = str(node.data)
        method = getattr(self, f"_{rule}", None)
        if method is None:
            return self._arithmetic(rule, node)
        result: tuple[ValueType, Evaluator] = method(node)
        return result

    def _operands(self, node: lark.Tree[lark.Token]) -> list[tuple[ValueType, Evaluator]]:
        return [self.compile(child) for child in node.children if isinstance(child, lark.Tree)]

    def _integer(self, node: lark.Tree[lark.Token]) -> tuple[ValueType, Evaluator]:
        value = int(str(node.children[0]).replace("_", ""))
        return ValueType.INT, lambda variables: value

    def _float(self, node: lark.Tree[lark.Token]) -> tuple[ValueType, Evaluator]:
        value = float(str(node.children[0]).replace("_", ""))
        return ValueType.FLOAT, lambda variables: value

    def _name(self, node: lark.Tree[lark.Token]) -> tuple[ValueType, Evaluator]:
        name = str(node.children[0])
        if name in ("true", "false"):
            constant = name == "true"
            return ValueType.BOOL, lambda variables: constant
        value_type = self.variables.get(name)
        if value_type is None:
            hint = " (a function: call it with parentheses)" if name in _FUNCTIONS else ""
            raise _CompileError(ErrorKind.UNKNOWN_NAME, f"unknown name {name}{hint}")
        self.names.add(name)

        def read(variables: Variables) -> Value:
            return variables[name]

        return value_type, read

    def _call(self, node: lark.Tree[lark.Token]) -> tuple[ValueType, Evaluator]:
        name = str(node.children[0])
        specification = _FUNCTIONS.get(name)
        if specification is None:
            known = ", ".join(FUNCTION_NAMES)
            raise _CompileError(ErrorKind.UNKNOWN_NAME, f"unknown function {name} (known: {known})")
        least, most, function, result_type = specification
        arguments = self._operands(node)
        if len(arguments) < least or (most is not None and len(arguments) > most):
            expected = f"{least}" if least == most else f"at least {least}"
            noun = "argument" if least == 1 else "arguments"
            raise _CompileError(ErrorKind.TYPE, f"{name} takes {expected} {noun}, got {len(arguments)}")
        types = [argument_type for argument_type, _ in arguments]
        for position, argument_type in enumerate(types, start=1):
            if not argument_type.numeric:
                raise _CompileError(ErrorKind.TYPE, f"{name}: argument {position} must be a number, not a boolean")
        evaluators = [evaluator for _, evaluator in arguments]
        if len(evaluators) == 1:
            (only,) = evaluators
            return result_type(types), lambda variables: function(only(variables))
        return result_type(types), lambda variables: function(*[evaluator(variables) for evaluator in evaluators])

    def _arithmetic(self, rule: str, node: lark.Tree[lark.Token]) -> tuple[ValueType, Evaluator]:
        symbol = _ARITHMETIC_SYMBOLS.get(rule)
        if symbol is None:  # pragma: no cover - the grammar has no other rule
            raise _CompileError(ErrorKind.SYNTAX, f"unsupported construct {rule}")
        (left_type, left), (right_type, right) = self._operands(node)
        if not (left_type.numeric and right_type.numeric):
            raise _CompileError(ErrorKind.TYPE, f"'{symbol}' needs numbers on both sides, not a boolean")
        if rule == "add":
            return _numeric_result(left_type, right_type), lambda variables: left(variables) + right(variables)
        if rule == "subtract":
            return _numeric_result(left_type, right_type), lambda variables: left(variables) - right(variables)
        if rule == "multiply":
            return _numeric_result(left_type, right_type), lambda variables: left(variables) * right(variables)
        if rule == "divide":
            # As in Expr, '/' always divides exactly (3 / 2 is 1.5); dividing by zero is an error here.
            return ValueType.FLOAT, lambda variables: left(variables) / right(variables)
        if rule == "modulo":
            if left_type is not ValueType.INT or right_type is not ValueType.INT:
                raise _CompileError(ErrorKind.TYPE, "'%' needs whole numbers on both sides")
            return ValueType.INT, lambda variables: _go_remainder(int(left(variables)), int(right(variables)))
        # math.pow raises instead of returning a complex number or an infinity.
        return ValueType.FLOAT, lambda variables: math.pow(left(variables), right(variables))

    def _negate(self, node: lark.Tree[lark.Token]) -> tuple[ValueType, Evaluator]:
        ((operand_type, operand),) = self._operands(node)
        if not operand_type.numeric:
            raise _CompileError(ErrorKind.TYPE, "'-' needs a number, not a boolean")
        return operand_type, lambda variables: -operand(variables)

    def _plus(self, node: lark.Tree[lark.Token]) -> tuple[ValueType, Evaluator]:
        ((operand_type, operand),) = self._operands(node)
        if not operand_type.numeric:
            raise _CompileError(ErrorKind.TYPE, "'+' needs a number, not a boolean")
        return operand_type, operand

    def _not_(self, node: lark.Tree[lark.Token]) -> tuple[ValueType, Evaluator]:
        ((operand_type, operand),) = self._operands(node)
        if operand_type is not ValueType.BOOL:
            raise _CompileError(ErrorKind.TYPE, "'!' needs a boolean (a comparison), not a number")
        return ValueType.BOOL, lambda variables: not operand(variables)

    def _logical(self, node: lark.Tree[lark.Token], symbol: str) -> tuple[Evaluator, Evaluator]:
        (left_type, left), (right_type, right) = self._operands(node)
        if left_type is not ValueType.BOOL or right_type is not ValueType.BOOL:
            raise _CompileError(ErrorKind.TYPE, f"'{symbol}' needs booleans (comparisons) on both sides")
        return left, right

    def _and_(self, node: lark.Tree[lark.Token]) -> tuple[ValueType, Evaluator]:
        left, right = self._logical(node, "&&")
        return ValueType.BOOL, lambda variables: bool(left(variables)) and bool(right(variables))

    def _or_(self, node: lark.Tree[lark.Token]) -> tuple[ValueType, Evaluator]:
        left, right = self._logical(node, "||")
        return ValueType.BOOL, lambda variables: bool(left(variables)) or bool(right(variables))

    def _compare(self, node: lark.Tree[lark.Token]) -> tuple[ValueType, Evaluator]:
        symbol = str(node.children[1])
        (left_type, left), (right_type, right) = self._operands(node)
        if left_type.numeric != right_type.numeric:
            raise _CompileError(ErrorKind.TYPE, f"'{symbol}' compares a number with a boolean")
        if not left_type.numeric and symbol not in ("==", "!="):
            raise _CompileError(ErrorKind.TYPE, f"'{symbol}' needs numbers on both sides")
        comparison = _COMPARISONS[symbol]
        return ValueType.BOOL, lambda variables: comparison(left(variables), right(variables))

    def _conditional(self, node: lark.Tree[lark.Token]) -> tuple[ValueType, Evaluator]:
        (condition_type, condition), (then_type, then), (otherwise_type, otherwise) = self._operands(node)
        if condition_type is not ValueType.BOOL:
            raise _CompileError(ErrorKind.TYPE, "the condition before '?' must be a boolean (a comparison)")
        if then_type.numeric != otherwise_type.numeric:
            raise _CompileError(ErrorKind.TYPE, "the two branches of '? :' must both be numbers or both booleans")
        result_type = _numeric_result(then_type, otherwise_type) if then_type.numeric else ValueType.BOOL
        return result_type, lambda variables: then(variables) if condition(variables) else otherwise(variables)


@functools.lru_cache(maxsize=65536)
def compile_target_expression(text: str) -> CompiledExpression | InvalidExpression:
    """A target expression, compiled once per distinct text (a fleet shares a few; every pass reuses them)."""
    compiled = compile_expression(text, VARIABLE_TYPES)
    if isinstance(compiled, ExpressionError):
        return InvalidExpression(text.strip(), compiled)
    if compiled.result_type is ValueType.BOOL:
        message = "the expression must evaluate to a number of prebuilds, not a boolean (true/false)"
        return InvalidExpression(compiled.text, ExpressionError(ErrorKind.TYPE, message))
    return compiled


def target_expression(text: str | None) -> CompiledExpression | InvalidExpression | None:
    """A preset's `desired_instances_expression`: None when unset or blank (the expression does not apply)."""
    if text is None or not text.strip():
        return None
    return compile_target_expression(text)


def target_expressions(texts: Iterable[str | None]) -> dict[str, CompiledExpression | InvalidExpression]:
    """Each distinct non-blank text, compiled (cached across passes): what the planner looks expressions up in."""
    compiled: dict[str, CompiledExpression | InvalidExpression] = {}
    for text in texts:
        if text is not None and text not in compiled and text.strip():
            compiled[text] = compile_target_expression(text)
    return compiled
