"""`reconciler presets check-expression`: what an operator needs to know about an expression before
publishing it (valid or not and why, the variables it reads, what is ours rather than Coder's)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reconciler.demand import COLD_START, LAST_WEEK_VARIABLES
from reconciler.expression import ExpressionError, InvalidExpression
from reconciler.expression_compiler import compile_target_expression

# Names Coder's language does not have: an expression using them works here only.
OUR_VARIABLES = frozenset({COLD_START, *LAST_WEEK_VARIABLES})


@dataclass(frozen=True, slots=True)
class CheckReport:
    expression: str
    error: ExpressionError | None
    reads: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        return self.error is None

    @property
    def ours_only(self) -> tuple[str, ...]:
        return tuple(name for name in self.reads if name in OUR_VARIABLES)

    def as_json(self) -> dict[str, Any]:
        return {
            "expression": self.expression,
            "valid": self.valid,
            "error": None if self.error is None else {"kind": str(self.error.kind), "message": self.error.message},
            "reads": list(self.reads),
            "not_in_coder": list(self.ours_only),
        }

    def as_text(self) -> str:
        if self.error is not None:
            return f"invalid: {self.error.message}\n  expression: {self.expression}"
        lines = [f"valid: {self.expression}", f"  reads: {', '.join(self.reads) or 'no variable'}"]
        if self.ours_only:
            lines.append(
                f"  note: {', '.join(self.ours_only)} {'is' if len(self.ours_only) == 1 else 'are'} ours: "
                "Coder's reconciler would reject this expression"
            )
        return "\n".join(lines)


def check(text: str) -> CheckReport:
    compiled = compile_target_expression(text)
    if isinstance(compiled, InvalidExpression):
        return CheckReport(compiled.text, compiled.error)
    return CheckReport(compiled.text, None, tuple(sorted(compiled.names)))
