"""`reconciler presets check-expression EXPR` in a subprocess: valid, invalid, JSON, usage; no database."""

from __future__ import annotations

import json

import pytest

from tests.acceptance.test_cli_config import environment, run

# No RECONCILER_DATABASE_URL, and a setting that would stop any command that loads the configuration.
NO_DATABASE = environment(RECONCILER_FAILURE_HARD_LIMIT="lots")


@pytest.mark.parametrize(
    ("expression", "reads"),
    [
        ("min(claims_10m * 10, 20)", "claims_10m"),
        ("max(scheduled_target, ceil(claim_rate_30m * 8))", "claim_rate_30m, scheduled_target"),
        ("max(2, min((claims_60m + misses_60m) * 2, 30))", "claims_60m, misses_60m"),
        ("clamp(claims_10m * 5, 1, 15)", "claims_10m"),
        ("hour >= 9 && hour < 18 ? 10 : 2", "hour"),
    ],
)
def test_coders_examples_are_valid_without_a_database(expression: str, reads: str) -> None:
    result = run("presets", "check-expression", expression, variables=NO_DATABASE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"valid: {expression}", f"  reads: {reads}"]
    assert result.stderr == ""


def test_our_variables_are_flagged_as_not_coders() -> None:
    result = run("presets", "check-expression", "max(2, claims_next_60m_last_week)", variables=NO_DATABASE)
    assert result.returncode == 0, result.stderr
    assert "claims_next_60m_last_week is ours: Coder's reconciler would reject this expression" in result.stdout


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("claims_10m +", "invalid: syntax error: the expression ends too early"),
        ("claims_10m ) 2", "invalid: syntax error at column 12: unexpected ')'"),
        ("unknown_metric + 1", "invalid: unknown name unknown_metric"),
        ("claims_10m > 0", "invalid: the expression must evaluate to a number of prebuilds, not a boolean"),
        ("  ", "invalid: the expression is empty"),
    ],
)
def test_an_invalid_expression_fails_the_check_with_the_reason(expression: str, message: str) -> None:
    result = run("presets", "check-expression", expression, variables=NO_DATABASE)
    assert result.returncode == 1
    assert result.stdout.startswith(message)
    assert "Traceback" not in result.stdout + result.stderr


def test_json_output() -> None:
    valid = run("presets", "check-expression", "--json", "claims_5m + misses_5m", variables=NO_DATABASE)
    assert valid.returncode == 0
    assert json.loads(valid.stdout) == {
        "expression": "claims_5m + misses_5m",
        "valid": True,
        "error": None,
        "reads": ["claims_5m", "misses_5m"],
        "not_in_coder": [],
    }
    invalid = run("presets", "check-expression", "--json", "1 / ", variables=NO_DATABASE)
    assert invalid.returncode == 1
    assert json.loads(invalid.stdout)["error"] == {
        "kind": "syntax",
        "message": "syntax error: the expression ends too early",
    }


def test_missing_expression_is_bad_usage() -> None:
    result = run("presets", "check-expression", variables=NO_DATABASE)
    assert result.returncode == 2
    assert "EXPR" in result.stderr
