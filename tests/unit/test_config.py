"""Settings from the environment (CONTRACTS.md section 3, README's configuration table).

Every environment is given explicitly (never os.environ), with the secret directories pointed at a
folder that does not exist, so that a machine's /run/secrets cannot leak into a test.
"""

from __future__ import annotations

import os
import re
import warnings as warnings_module
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from reconciler.config import (
    CODER_ALIASES,
    TOOL_VARIABLES,
    ConfigError,
    Settings,
    configuration_warnings,
    database_url_for_display,
    known_secrets,
    known_variables,
    load_settings,
)
from reconciler.dsn import parse_dsn, redact_dsn
from reconciler.logs import Redactor, spellings

REPOSITORY = Path(__file__).resolve().parents[2]
NO_SECRET_DIRECTORIES = {"RECONCILER_SECRETS_DIRECTORIES": "/nonexistent/reconciler-test-secrets"}
DSN = "postgresql://reconciler@db.example:5432/platform"
BASE = {**NO_SECRET_DIRECTORIES, "RECONCILER_DATABASE_URL": DSN}


def load(environment: Mapping[str, str], *, base: Mapping[str, str] = BASE, require_database: bool = True) -> Settings:
    return load_settings({**base, **environment}, require_database=require_database)


def problems_of(environment: Mapping[str, str], *, base: Mapping[str, str] = BASE) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        load(environment, base=base)
    return raised.value.problems


def only_problem(environment: Mapping[str, str], *, base: Mapping[str, str] = BASE) -> str:
    problems = problems_of(environment, base=base)
    assert len(problems) == 1, problems
    return problems[0]


def named(problem: str) -> str:
    """The variable (or file) a problem line names: what comes before its first ': '."""
    return problem.partition(": ")[0]


# --- every variable -----------------------------------------------------------------------------------

# (variable, value as set, attribute, expected value): one row at least for every setting.
PARSED: list[tuple[str, str, str, Any]] = [
    ("RECONCILER_DATABASE_URL", "postgres://u@h/d", "database_url", "postgres://u@h/d"),
    ("RECONCILER_RECONCILIATION_INTERVAL", "90s", "reconciliation_interval", timedelta(seconds=90)),
    ("RECONCILER_RECONCILIATION_INTERVAL", "1m", "reconciliation_interval", timedelta(minutes=1)),
    ("RECONCILER_RECONCILIATION_INTERVAL", "1h30m", "reconciliation_interval", timedelta(minutes=90)),
    ("RECONCILER_RECONCILIATION_INTERVAL", "90", "reconciliation_interval", timedelta(seconds=90)),
    ("RECONCILER_RECONCILIATION_INTERVAL", "1.5", "reconciliation_interval", timedelta(seconds=1.5)),
    ("RECONCILER_BACKOFF_INTERVAL", "15s", "backoff_interval", timedelta(seconds=15)),
    ("RECONCILER_BACKOFF_LOOKBACK", "2h", "backoff_lookback", timedelta(hours=2)),
    ("RECONCILER_BACKOFF_LOOKBACK", "7d", "backoff_lookback", timedelta(days=7)),
    ("RECONCILER_FAILURE_HARD_LIMIT", "5", "failure_hard_limit", 5),
    ("RECONCILER_FAILURE_HARD_LIMIT", "0", "failure_hard_limit", 0),
    ("RECONCILER_FAILURE_HARD_LIMIT", " 4 ", "failure_hard_limit", 4),
    ("RECONCILER_HTTP_ADDRESS", "0.0.0.0:9100", "http_address", "0.0.0.0:9100"),
    ("RECONCILER_LOG_FORMAT", "json", "log_format", "json"),
    ("RECONCILER_LOG_FORMAT", "Console", "log_format", "console"),
    ("RECONCILER_LOG_LEVEL", "DEBUG", "log_level", "debug"),
    ("RECONCILER_LOG_LEVEL", "warning", "log_level", "warning"),
    ("RECONCILER_SHUTDOWN_GRACE", "5s", "shutdown_grace", timedelta(seconds=5)),
    ("RECONCILER_SHUTDOWN_GRACE", "0", "shutdown_grace", timedelta(0)),
    ("RECONCILER_MAX_DESIRED_INSTANCES", "20", "max_desired_instances", 20),
    ("RECONCILER_TARGET_STABILIZATION_WINDOW", "10m", "target_stabilization_window", timedelta(minutes=10)),
    ("RECONCILER_TARGET_STABILIZATION_WINDOW", "0", "target_stabilization_window", timedelta(0)),
    ("RECONCILER_PREBUILD_EVENTS_RETENTION", "14d", "prebuild_events_retention", timedelta(days=14)),
    ("RECONCILER_EXECUTOR_CONCURRENCY", "4", "executor_concurrency", 4),
    ("RECONCILER_MAX_IN_FLIGHT", "50", "max_in_flight", 50),
    ("RECONCILER_MAX_IN_FLIGHT", "0", "max_in_flight", 0),
    ("RECONCILER_MAX_IN_FLIGHT_PER_TEMPLATE", "5", "max_in_flight_per_template", 5),
    ("RECONCILER_BACKOFF_STRATEGY", "Exponential", "backoff_strategy", "exponential"),
    ("RECONCILER_BACKOFF_STRATEGY", "linear", "backoff_strategy", "linear"),
    ("RECONCILER_BACKOFF_MAX", "30m", "backoff_max", timedelta(minutes=30)),
    ("RECONCILER_BREAKER_ENABLED", "true", "breaker_enabled", True),
    ("RECONCILER_BREAKER_ENABLED", "0", "breaker_enabled", False),
    ("RECONCILER_BREAKER_FAILURE_THRESHOLD", "0.8", "breaker_failure_threshold", 0.8),
    ("RECONCILER_BREAKER_MIN_BUILDS", "20", "breaker_min_builds", 20),
    ("RECONCILER_BREAKER_MIN_PRESETS", "5", "breaker_min_presets", 5),
    ("RECONCILER_BREAKER_WINDOW", "15m", "breaker_window", timedelta(minutes=15)),
    ("RECONCILER_BREAKER_OPEN_DURATION", "2m", "breaker_open_duration", timedelta(minutes=2)),
    ("RECONCILER_BREAKER_OPEN_DURATION_MAX", "2h", "breaker_open_duration_max", timedelta(hours=2)),
    ("RECONCILER_BREAKER_PROBES", "5", "breaker_probes", 5),
    ("RECONCILER_SLOW_START", "50", "slow_start", 50),
    ("RECONCILER_SURGE", "2", "surge", 2),
    ("RECONCILER_TTL_JITTER", "0.1", "ttl_jitter", 0.1),
    ("RECONCILER_FAILED_PREBUILDS_KEEP", "5", "failed_prebuilds_keep", 5),
    ("RECONCILER_FAILED_PREBUILDS_KEEP_FOR", "7d", "failed_prebuilds_keep_for", timedelta(days=7)),
    ("RECONCILER_NON_RETRYABLE_ERROR_CODES", "A, B,,C ", "non_retryable_error_codes", frozenset({"A", "B", "C"})),
    ("RECONCILER_NON_RETRYABLE_ERROR_CODES", "", "non_retryable_error_codes", frozenset()),
    (
        "RECONCILER_CAPACITY_ERROR_CODES",
        "INSUFFICIENT_QUOTA,NO_CAPACITY",
        "capacity_error_codes",
        frozenset({"INSUFFICIENT_QUOTA", "NO_CAPACITY"}),
    ),
    ("RECONCILER_STATEMENT_TIMEOUT", "2m", "statement_timeout", timedelta(minutes=2)),
    ("RECONCILER_CONNECT_TIMEOUT", "3s", "connect_timeout", timedelta(seconds=3)),
    ("RECONCILER_PASS_TIMEOUT", "10m", "pass_timeout", timedelta(minutes=10)),
    ("RECONCILER_POOL_MAX_SIZE", "40", "pool_max_size", 40),
    ("RECONCILER_SMTP_HOST", "mail.example", "smtp_host", "mail.example"),
    ("RECONCILER_SMTP_PORT", "2525", "smtp_port", 2525),
    ("RECONCILER_SMTP_FROM", "prebuilds@example.com", "smtp_from", "prebuilds@example.com"),
    ("RECONCILER_SMTP_SECURITY", "TLS", "smtp_security", "tls"),
    ("RECONCILER_SMTP_USERNAME", "mailer", "smtp_username", "mailer"),
    ("RECONCILER_SMTP_TIMEOUT", "45s", "smtp_timeout", timedelta(seconds=45)),
    ("RECONCILER_NOTIFICATION_MAX_ATTEMPTS", "3", "notification_max_attempts", 3),
    ("RECONCILER_NOTIFICATION_POLL_INTERVAL", "250ms", "notification_poll_interval", timedelta(milliseconds=250)),
    ("RECONCILER_NOTIFICATION_RETRY_BASE", "10s", "notification_retry_base", timedelta(seconds=10)),
    ("RECONCILER_NOTIFICATION_RETRY_MAX", "2h", "notification_retry_max", timedelta(hours=2)),
    ("RECONCILER_NOTIFICATION_LEASE", "5m", "notification_lease", timedelta(minutes=5)),
    ("RECONCILER_NOTIFICATION_BATCH_SIZE", "50", "notification_batch_size", 50),
    ("RECONCILER_MIGRATION_LOCK_TIMEOUT", "30m", "migration_lock_timeout", timedelta(minutes=30)),
    ("RECONCILER_MIGRATION_LOCK_TIMEOUT", "0", "migration_lock_timeout", timedelta(0)),
    ("RECONCILER_MIGRATION_TIMEOUT", "3h", "migration_timeout", timedelta(hours=3)),
    ("RECONCILER_EVENTS_ENABLED", "false", "events_enabled", False),
    ("RECONCILER_EVENTS_ENABLED", "0", "events_enabled", False),
    ("RECONCILER_EVENTS_ENABLED", "true", "events_enabled", True),
    ("RECONCILER_EVENT_COALESCE", "250ms", "event_coalesce", timedelta(milliseconds=250)),
    ("RECONCILER_EVENT_COALESCE", "0", "event_coalesce", timedelta(0)),
]

# What a variable needs beside it to be valid on its own.
COMPANIONS = {
    "RECONCILER_SMTP_HOST": {"RECONCILER_SMTP_FROM": "prebuilds@example.com"},
    "RECONCILER_SMTP_PASSWORD": {"RECONCILER_SMTP_USERNAME": "mailer"},
    "RECONCILER_POOL_MAX_SIZE": {"RECONCILER_EXECUTOR_CONCURRENCY": "8"},
}


def plain(value: Any) -> Any:
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


@pytest.mark.parametrize(("variable", "raw", "attribute", "expected"), PARSED)
def test_every_variable_is_parsed(variable: str, raw: str, attribute: str, expected: Any) -> None:
    loaded = load({**COMPANIONS.get(variable, {}), variable: raw})
    assert plain(getattr(loaded, attribute)) == expected


def test_every_setting_has_a_parsing_test() -> None:
    tested = {attribute for _, _, attribute, _ in PARSED} | {"smtp_password", "webhooks"}
    assert set(Settings.model_fields) == tested


def test_the_defaults_are_the_documented_ones() -> None:
    loaded = load({})
    assert loaded.reconciliation_interval == timedelta(minutes=1)
    assert loaded.backoff_interval == timedelta(minutes=1)
    assert loaded.backoff_lookback == timedelta(hours=1)
    assert loaded.failure_hard_limit == 3
    assert (loaded.http_host, loaded.http_port) == ("127.0.0.1", 2118)
    assert (loaded.log_format, loaded.log_level) == ("auto", "info")
    assert loaded.shutdown_grace == timedelta(seconds=30)
    assert loaded.max_desired_instances == 100
    assert loaded.target_stabilization_window == timedelta(minutes=5)
    assert loaded.prebuild_events_retention == timedelta(days=8)
    assert loaded.executor_concurrency == 8
    assert loaded.non_retryable_error_codes == frozenset({"REQUIRED_TEMPLATE_VARIABLES"})
    assert loaded.capacity_error_codes == frozenset({"INSUFFICIENT_QUOTA"})
    assert loaded.statement_timeout == timedelta(seconds=30)
    assert loaded.connect_timeout == timedelta(seconds=10)
    assert loaded.pass_timeout == timedelta(minutes=5)
    assert loaded.pool_max_size == 10
    assert loaded.webhooks == ()
    assert (loaded.smtp_host, loaded.smtp_from, loaded.smtp_username, loaded.smtp_password) == (None,) * 4
    assert (loaded.smtp_security, loaded.smtp_effective_port) == ("starttls", 587)
    assert loaded.notification_max_attempts == 8
    assert loaded.migration_lock_timeout == timedelta(minutes=10)
    assert loaded.migration_timeout == timedelta(hours=1)
    # Issue 15: no budget, and Coder's linear backoff, unless asked.
    assert (loaded.max_in_flight, loaded.max_in_flight_per_template) == (0, 0)
    assert (loaded.backoff_strategy, loaded.backoff_max) == ("linear", timedelta(hours=1))
    assert loaded.events_enabled is True
    assert loaded.event_coalesce == timedelta(milliseconds=100)
    assert loaded.breaker_enabled is False
    assert (loaded.breaker_failure_threshold, loaded.breaker_min_builds, loaded.breaker_min_presets) == (0.5, 10, 3)
    assert (loaded.breaker_window, loaded.breaker_open_duration, loaded.breaker_open_duration_max) == (
        timedelta(minutes=10),
        timedelta(minutes=5),
        timedelta(hours=1),
    )
    assert loaded.breaker_probes == 3
    assert (loaded.surge, loaded.ttl_jitter) == (0, 0.0)
    assert (loaded.failed_prebuilds_keep, loaded.failed_prebuilds_keep_for) == (3, timedelta(days=1))


def test_the_breakers_longest_open_duration_is_not_shorter_than_its_first() -> None:
    with pytest.raises(ConfigError) as raised:
        load({"RECONCILER_BREAKER_OPEN_DURATION": "10m", "RECONCILER_BREAKER_OPEN_DURATION_MAX": "5m"})
    assert any(problem.startswith("RECONCILER_BREAKER_OPEN_DURATION_MAX:") for problem in raised.value.problems)


def _documented_variables(text: str) -> set[str]:
    return set(re.findall(r"^\| `(RECONCILER_[A-Z0-9_<>]+)`", text, re.MULTILINE)) | set(
        re.findall(r"^\| `RECONCILER_[A-Z_]+` / `(RECONCILER_[A-Z_]+)`", text, re.MULTILINE)
    )


def _assert_has_effect(variable: str) -> None:
    """Setting the variable (to a valid value, with what it needs beside it) changes the settings."""
    samples = {
        "RECONCILER_DATABASE_URL": "postgresql://other@db.example/elsewhere",
        "RECONCILER_HTTP_ADDRESS": "127.0.0.1:0",
        "RECONCILER_LOG_FORMAT": "json",
        "RECONCILER_LOG_LEVEL": "debug",
        "RECONCILER_NON_RETRYABLE_ERROR_CODES": "X",
        "RECONCILER_CAPACITY_ERROR_CODES": "Y",
        "RECONCILER_WEBHOOK_<N>_URL": "https://hooks.example/x",
        "RECONCILER_WEBHOOK_<N>_SECRET": "k",
        "RECONCILER_WEBHOOK_<N>_TIMEOUT": "3s",
        "RECONCILER_SMTP_HOST": "mail.example",
        "RECONCILER_SMTP_FROM": "a@example.com",
        "RECONCILER_SMTP_SECURITY": "none",
        "RECONCILER_SMTP_USERNAME": "mailer",
        "RECONCILER_SMTP_PASSWORD": "pw",
    }
    for row_variable, raw, _, _ in PARSED:
        samples.setdefault(row_variable, raw)
    companions = dict(COMPANIONS.get(variable, {}))
    webhook = re.fullmatch(r"RECONCILER_WEBHOOK_(\d+|<N>)_([A-Z]+)", variable)
    if webhook is not None:
        index = "0" if webhook.group(1) == "<N>" else webhook.group(1)
        value = samples[f"RECONCILER_WEBHOOK_<N>_{webhook.group(2)}"]
        variable = f"RECONCILER_WEBHOOK_{index}_{webhook.group(2)}"
        if webhook.group(2) != "URL":
            companions[f"RECONCILER_WEBHOOK_{index}_URL"] = samples["RECONCILER_WEBHOOK_<N>_URL"]
    else:
        value = samples[variable]
    assert load({**companions, variable: value}) != load(companions), f"{variable} has no effect"


def test_every_variable_of_the_readme_table_is_a_setting() -> None:
    documented = _documented_variables((REPOSITORY / "README.md").read_text(encoding="utf-8"))
    assert len(documented) >= 20, documented
    for variable in sorted(documented):
        _assert_has_effect(variable)


def test_every_variable_of_the_contract_is_a_setting() -> None:
    contract = REPOSITORY / "docs" / "CONTRACTS.md"
    section = contract.read_text(encoding="utf-8").partition("## 3.")[2]
    documented = _documented_variables(section) | set(re.findall(r"`(RECONCILER_WEBHOOK_\d+_[A-Z]+)`", section))
    assert {"RECONCILER_DATABASE_URL", "RECONCILER_LOG_LEVEL", "RECONCILER_WEBHOOK_1_URL"} <= documented
    for variable in sorted(documented):
        _assert_has_effect(variable)


# --- Coder's aliases ------------------------------------------------------------------------------------

ALIAS_CASES = [
    ("CODER_WORKSPACE_PREBUILDS_RECONCILIATION_INTERVAL", "reconciliation_interval", "2m", timedelta(minutes=2)),
    ("CODER_WORKSPACE_PREBUILDS_RECONCILIATION_BACKOFF_INTERVAL", "backoff_interval", "30s", timedelta(seconds=30)),
    ("CODER_WORKSPACE_PREBUILDS_RECONCILIATION_BACKOFF_LOOKBACK_PERIOD", "backoff_lookback", "3h", timedelta(hours=3)),
    ("CODER_WORKSPACE_PREBUILDS_FAILURE_HARD_LIMIT", "failure_hard_limit", "7", 7),
]


def test_the_four_aliases_are_coders_names() -> None:
    assert {(field, alias) for alias, field, _, _ in ALIAS_CASES} == set(CODER_ALIASES.items())


@pytest.mark.parametrize(("alias", "attribute", "raw", "expected"), ALIAS_CASES)
def test_a_coder_alias_sets_the_setting(alias: str, attribute: str, raw: str, expected: Any) -> None:
    assert getattr(load({alias: raw}), attribute) == expected


@pytest.mark.parametrize(("alias", "attribute", "raw", "expected"), ALIAS_CASES)
def test_the_reconciler_name_wins_over_the_alias(alias: str, attribute: str, raw: str, expected: Any) -> None:
    own = "RECONCILER_" + attribute.upper()
    own_value = 300 if attribute == "failure_hard_limit" else timedelta(seconds=300)
    assert own_value != expected
    assert getattr(load({alias: raw, own: "300"}), attribute) == own_value
    # A bad alias value is not even looked at when the own name is set.
    assert getattr(load({alias: "garbage", own: "300"}), attribute) == own_value


@pytest.mark.parametrize(("alias", "attribute", "raw", "expected"), ALIAS_CASES)
def test_a_bad_alias_value_names_the_alias(alias: str, attribute: str, raw: str, expected: Any) -> None:
    problem = only_problem({alias: "soon"})
    assert named(problem) == alias
    assert "soon" in problem


# --- bounds ---------------------------------------------------------------------------------------------

# (variable, lowest accepted, just below, highest accepted, just above, companions)
BOUNDS: list[tuple[str, str, str, str, str, dict[str, str]]] = [
    ("RECONCILER_RECONCILIATION_INTERVAL", "1s", "999ms", "1d", "86401s", {}),
    ("RECONCILER_BACKOFF_INTERVAL", "1s", "0.5s", "24h", "24h1s", {}),
    ("RECONCILER_BACKOFF_LOOKBACK", "1m", "59s", "30d", "30d1s", {}),
    ("RECONCILER_FAILURE_HARD_LIMIT", "0", "-1", "1000", "1001", {}),
    ("RECONCILER_SHUTDOWN_GRACE", "0s", "-1s", "1h", "3601", {}),
    ("RECONCILER_MAX_DESIRED_INSTANCES", "1", "0", "100000", "100001", {}),
    ("RECONCILER_TARGET_STABILIZATION_WINDOW", "0s", "-1s", "1d", "1d1s", {}),
    ("RECONCILER_PREBUILD_EVENTS_RETENTION", "2h", "119m", "365d", "365d1s", {}),
    ("RECONCILER_EXECUTOR_CONCURRENCY", "1", "0", "256", "257", {"RECONCILER_POOL_MAX_SIZE": "258"}),
    ("RECONCILER_STATEMENT_TIMEOUT", "1s", "0", "1h", "61m", {"RECONCILER_PASS_TIMEOUT": "2h"}),
    ("RECONCILER_PASS_TIMEOUT", "2s", "1s", "1d", "1d1s", {"RECONCILER_STATEMENT_TIMEOUT": "1s"}),
    ("RECONCILER_CONNECT_TIMEOUT", "1s", "0s", "5m", "301s", {}),
    ("RECONCILER_POOL_MAX_SIZE", "3", "2", "500", "501", {"RECONCILER_EXECUTOR_CONCURRENCY": "1"}),
    ("RECONCILER_SMTP_PORT", "1", "0", "65535", "65536", {}),
    ("RECONCILER_SMTP_TIMEOUT", "1s", "0s", "5m", "5m1s", {}),
    ("RECONCILER_NOTIFICATION_MAX_ATTEMPTS", "1", "0", "100", "101", {}),
    ("RECONCILER_NOTIFICATION_POLL_INTERVAL", "100ms", "99ms", "10m", "601s", {}),
    ("RECONCILER_NOTIFICATION_RETRY_BASE", "1s", "0s", "1h", "3601s", {}),
    ("RECONCILER_NOTIFICATION_RETRY_MAX", "1s", "0.5s", "1d", "1d1s", {"RECONCILER_NOTIFICATION_RETRY_BASE": "1s"}),
    ("RECONCILER_NOTIFICATION_LEASE", "10s", "9s", "1h", "1h1s", {}),
    ("RECONCILER_NOTIFICATION_BATCH_SIZE", "1", "0", "1000", "1001", {}),
    ("RECONCILER_MIGRATION_LOCK_TIMEOUT", "0s", "-1s", "1d", "1d1s", {}),
    ("RECONCILER_MIGRATION_TIMEOUT", "1s", "0s", "1d", "1d1s", {}),
    ("RECONCILER_MAX_IN_FLIGHT", "0", "-1", "1000000", "1000001", {}),
    ("RECONCILER_MAX_IN_FLIGHT_PER_TEMPLATE", "0", "-1", "1000000", "1000001", {}),
    ("RECONCILER_BACKOFF_MAX", "1s", "0.5s", "30d", "30d1s", {}),
    ("RECONCILER_EVENT_COALESCE", "0s", "-1s", "10s", "10001ms", {}),
    ("RECONCILER_BREAKER_FAILURE_THRESHOLD", "0.01", "0", "1", "1.01", {}),
    ("RECONCILER_BREAKER_MIN_BUILDS", "1", "0", "1000000", "1000001", {}),
    ("RECONCILER_BREAKER_MIN_PRESETS", "1", "0", "1000000", "1000001", {}),
    ("RECONCILER_BREAKER_WINDOW", "1m", "59s", "1d", "1d1s", {}),
    ("RECONCILER_BREAKER_OPEN_DURATION", "1s", "0s", "1d", "1d1s", {"RECONCILER_BREAKER_OPEN_DURATION_MAX": "7d"}),
    ("RECONCILER_BREAKER_OPEN_DURATION_MAX", "1s", "0s", "7d", "7d1s", {"RECONCILER_BREAKER_OPEN_DURATION": "1s"}),
    ("RECONCILER_BREAKER_PROBES", "1", "0", "1000", "1001", {}),
    ("RECONCILER_SLOW_START", "0", "-1", "1000000", "1000001", {}),
    ("RECONCILER_SURGE", "0", "-1", "1000", "1001", {}),
    ("RECONCILER_TTL_JITTER", "0", "-0.1", "0.5", "0.51", {}),
    ("RECONCILER_FAILED_PREBUILDS_KEEP", "0", "-1", "100000", "100001", {}),
    ("RECONCILER_FAILED_PREBUILDS_KEEP_FOR", "0s", "-1s", "365d", "365d1s", {}),
    (
        "RECONCILER_WEBHOOK_0_TIMEOUT",
        "1s",
        "0.9s",
        "5m",
        "5m0.1s",
        # A delivery must end before its lease does.
        {"RECONCILER_WEBHOOK_0_URL": "https://h.example/", "RECONCILER_NOTIFICATION_LEASE": "10m"},
    ),
]


@pytest.mark.parametrize(("variable", "low", "below", "high", "above", "companions"), BOUNDS)
def test_every_number_is_bounded(
    variable: str, low: str, below: str, high: str, above: str, companions: dict[str, str]
) -> None:
    load({**companions, variable: low})
    load({**companions, variable: high})
    for bad in (below, above):
        problem = only_problem({**companions, variable: bad})
        assert named(problem) == variable
        if variable != "RECONCILER_POOL_MAX_SIZE" or bad == above:
            assert f"{bad!r}" in problem


def test_every_numeric_setting_has_a_bounds_test() -> None:
    numeric = {
        name
        for name, field in Settings.model_fields.items()
        if field.annotation in (int, timedelta, int | None) or "timedelta" in str(field.annotation)
    }
    bounded = {variable.removeprefix("RECONCILER_").lower() for variable, *_ in BOUNDS}
    assert numeric, "no numeric settings found: the introspection is broken"
    assert numeric <= bounded


def test_the_pass_deadline_must_hold_a_read_and_a_write_at_the_statement_timeout() -> None:
    problem = only_problem({"RECONCILER_STATEMENT_TIMEOUT": "1m", "RECONCILER_PASS_TIMEOUT": "119s"})
    assert named(problem) == "RECONCILER_PASS_TIMEOUT"
    assert "RECONCILER_STATEMENT_TIMEOUT" in problem
    assert "2m" in problem
    # The default deadline (5m) with a statement timeout above half of it: the pair is refused.
    assert named(only_problem({"RECONCILER_STATEMENT_TIMEOUT": "3m"})) == "RECONCILER_PASS_TIMEOUT"
    loaded = load({"RECONCILER_STATEMENT_TIMEOUT": "1m", "RECONCILER_PASS_TIMEOUT": "2m"})
    assert loaded.pass_timeout == timedelta(minutes=2)


def test_the_pool_must_hold_the_executor_and_two_more() -> None:
    problem = only_problem({"RECONCILER_EXECUTOR_CONCURRENCY": "20", "RECONCILER_POOL_MAX_SIZE": "21"})
    assert named(problem) == "RECONCILER_POOL_MAX_SIZE"
    assert "22" in problem
    assert load({"RECONCILER_EXECUTOR_CONCURRENCY": "20", "RECONCILER_POOL_MAX_SIZE": "22"}).pool_max_size == 22


# --- bad values -----------------------------------------------------------------------------------------

BAD_VALUES = [
    ("RECONCILER_RECONCILIATION_INTERVAL", "fast"),
    ("RECONCILER_RECONCILIATION_INTERVAL", ""),
    ("RECONCILER_RECONCILIATION_INTERVAL", "250ms"),
    ("RECONCILER_RECONCILIATION_INTERVAL", "99999999999999999999999"),
    ("RECONCILER_BACKOFF_INTERVAL", "1 minute"),
    ("RECONCILER_BACKOFF_LOOKBACK", "-1h"),
    ("RECONCILER_FAILURE_HARD_LIMIT", "three"),
    ("RECONCILER_FAILURE_HARD_LIMIT", "2.5"),
    ("RECONCILER_FAILURE_HARD_LIMIT", "1e3"),
    ("RECONCILER_HTTP_ADDRESS", "localhost"),
    ("RECONCILER_HTTP_ADDRESS", "localhost:"),
    ("RECONCILER_HTTP_ADDRESS", "localhost:http"),
    ("RECONCILER_HTTP_ADDRESS", "127.0.0.1:65536"),
    ("RECONCILER_HTTP_ADDRESS", "::1:2118"),
    ("RECONCILER_HTTP_ADDRESS", "127.0.0.1:99999999999999999999999"),
    ("RECONCILER_HTTP_ADDRESS", "999.1.1.1:80"),
    ("RECONCILER_HTTP_ADDRESS", "\U0001f600:80"),
    ("RECONCILER_HTTP_ADDRESS", "127.0.0.1:\u0668\u0660"),
    ("RECONCILER_HTTP_ADDRESS", "[db.example]:80"),
    ("RECONCILER_HTTP_ADDRESS", "-bad-.example:80"),
    ("RECONCILER_HTTP_ADDRESS", "a..b:80"),
    ("RECONCILER_LOG_FORMAT", "xml"),
    ("RECONCILER_LOG_LEVEL", "verbose"),
    ("RECONCILER_SHUTDOWN_GRACE", "later"),
    ("RECONCILER_MAX_DESIRED_INSTANCES", "many"),
    ("RECONCILER_EXECUTOR_CONCURRENCY", ""),
    ("RECONCILER_STATEMENT_TIMEOUT", "1x"),
    ("RECONCILER_CONNECT_TIMEOUT", "10 s"),
    ("RECONCILER_POOL_MAX_SIZE", "ten"),
    ("RECONCILER_SMTP_PORT", "smtp"),
    ("RECONCILER_SMTP_PORT", ""),
    ("RECONCILER_SMTP_SECURITY", "ssl"),
    ("RECONCILER_SMTP_TIMEOUT", "0"),
    ("RECONCILER_NOTIFICATION_MAX_ATTEMPTS", "-3"),
    ("RECONCILER_NOTIFICATION_POLL_INTERVAL", "1ns"),
    ("RECONCILER_DATABASE_URL", "mysql://db.example/platform"),
    ("RECONCILER_DATABASE_URL", "db.example:5432"),
    ("RECONCILER_DATABASE_URL", ""),
    ("RECONCILER_DATABASE_URL", "postgresql://db.example:port/platform"),
    ("RECONCILER_DATABASE_URL", "postgresql://db.example:70000/platform"),
    ("RECONCILER_DATABASE_URL", "postgresql://[db.example/platform"),
    ("RECONCILER_DATABASE_URL", "postgresql://u:p@ss:word@127.0.0.1:5432/d"),
    ("RECONCILER_DATABASE_URL", "postgresql://u:p@pw@127.0.0.1/d"),
    ("RECONCILER_DATABASE_URL", "postgresql://u:pw@/d?host=127.0.0.1&port=x"),
    ("RECONCILER_WEBHOOK_0_URL", "http://\u2488.example/hook"),
]


@pytest.mark.parametrize(("variable", "raw"), BAD_VALUES)
def test_a_bad_value_is_one_line_naming_the_variable(variable: str, raw: str) -> None:
    problem = only_problem({variable: raw})
    assert named(problem) == variable
    assert "\n" not in problem
    assert len(named(problem)) < len(problem) - 2, "the reason is missing"


def test_several_bad_values_give_one_line_each() -> None:
    bad = {
        "RECONCILER_RECONCILIATION_INTERVAL": "soon",
        "RECONCILER_FAILURE_HARD_LIMIT": "lots",
        "RECONCILER_LOG_LEVEL": "loud",
        "RECONCILER_SMTP_SECURITY": "maybe",
        "RECONCILER_WEBHOOK_3_TIMEOUT": "forever",
        "CODER_WORKSPACE_PREBUILDS_RECONCILIATION_BACKOFF_LOOKBACK_PERIOD": "week",
    }
    problems = problems_of({**bad, "RECONCILER_WEBHOOK_3_URL": "https://hooks.example/"})
    assert sorted(named(problem) for problem in problems) == sorted(bad)


def test_several_problems_between_settings_are_all_reported() -> None:
    problems = problems_of(
        {
            "RECONCILER_HTTP_ADDRESS": "nowhere",
            "RECONCILER_SMTP_HOST": "mail.example",
            "RECONCILER_SMTP_PASSWORD": "hunter2-is-secret",
            "RECONCILER_EXECUTOR_CONCURRENCY": "30",
        }
    )
    assert sorted(named(problem) for problem in problems) == [
        "RECONCILER_HTTP_ADDRESS",
        "RECONCILER_POOL_MAX_SIZE",
        "RECONCILER_SMTP_FROM",
        "RECONCILER_SMTP_USERNAME",
    ]
    assert "hunter2" not in "\n".join(problems)


def test_a_missing_database_url_is_required_and_named() -> None:
    problem = only_problem({}, base=NO_SECRET_DIRECTORIES)
    assert named(problem) == "RECONCILER_DATABASE_URL"
    assert "required" in problem
    assert load({}, base=NO_SECRET_DIRECTORIES, require_database=False).database_url is None


def test_a_value_too_long_to_show_is_shortened() -> None:
    problem = only_problem({"RECONCILER_LOG_LEVEL": "x" * 500})
    assert len(problem) < 200


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [
        ("127.0.0.1:2118", "127.0.0.1", 2118),
        (":9000", "0.0.0.0", 9000),  # noqa: S104 - an empty host means every address
        ("[::1]:2118", "::1", 2118),
        ("h:0", "h", 0),
        ("localhost:80", "localhost", 80),
        ("reconciler-0.internal.example:9100", "reconciler-0.internal.example", 9100),
        ("10.0.0.7:2118", "10.0.0.7", 2118),
    ],
)
def test_http_address_forms(address: str, host: str, port: int) -> None:
    loaded = load({"RECONCILER_HTTP_ADDRESS": address})
    assert (loaded.http_host, loaded.http_port) == (host, port)


def test_settings_are_frozen() -> None:
    loaded = load({})
    with pytest.raises(ValidationError):
        loaded.failure_hard_limit = 9  # type: ignore[misc]


def test_smtp_ports_by_security_and_required_companions() -> None:
    mail = {"RECONCILER_SMTP_HOST": "mail.example", "RECONCILER_SMTP_FROM": "a@example.com"}
    assert load({**mail, "RECONCILER_SMTP_SECURITY": "tls"}).smtp_effective_port == 465
    assert load({**mail, "RECONCILER_SMTP_SECURITY": "none"}).smtp_effective_port == 25
    assert (
        load({**mail, "RECONCILER_SMTP_SECURITY": "none", "RECONCILER_SMTP_PORT": "2525"}).smtp_effective_port == 2525
    )
    assert named(only_problem({"RECONCILER_SMTP_HOST": "mail.example"})) == "RECONCILER_SMTP_FROM"
    assert named(only_problem({"RECONCILER_SMTP_PASSWORD": "pw-secret"})) == "RECONCILER_SMTP_USERNAME"


# --- webhooks -------------------------------------------------------------------------------------------


def test_indexed_webhooks_in_index_order() -> None:
    loaded = load(
        {
            "RECONCILER_WEBHOOK_2_URL": "https://two.example/hook",
            "RECONCILER_WEBHOOK_0_URL": "http://zero.example:8080/hook?token=abc",
            "RECONCILER_WEBHOOK_0_SECRET": "zero-key",
            "RECONCILER_WEBHOOK_0_TIMEOUT": "2s",
        }
    )
    assert [webhook.index for webhook in loaded.webhooks] == [0, 2]
    zero, two = loaded.webhooks
    assert zero.url.get_secret_value() == "http://zero.example:8080/hook?token=abc"
    assert zero.secret is not None
    assert zero.secret.get_secret_value() == "zero-key"
    assert (zero.timeout, two.timeout, two.secret) == (timedelta(seconds=2), timedelta(seconds=10), None)
    assert zero.display_url == "http://zero.example:8080/…"
    assert "abc" not in repr(loaded)


@pytest.mark.parametrize(
    ("environment", "variable"),
    [
        ({"RECONCILER_WEBHOOK_1_SECRET": "k"}, "RECONCILER_WEBHOOK_1_URL"),
        ({"RECONCILER_WEBHOOK_1_TIMEOUT": "5s"}, "RECONCILER_WEBHOOK_1_URL"),
        ({"RECONCILER_WEBHOOK_1_URL": "ftp://files.example/"}, "RECONCILER_WEBHOOK_1_URL"),
        ({"RECONCILER_WEBHOOK_1_URL": "hooks.example/x"}, "RECONCILER_WEBHOOK_1_URL"),
        ({"RECONCILER_WEBHOOK_1_URL": "https://"}, "RECONCILER_WEBHOOK_1_URL"),
        (
            {"RECONCILER_WEBHOOK_1_URL": "https://h.example/", "RECONCILER_WEBHOOK_1_TIMEOUT": "x"},
            "RECONCILER_WEBHOOK_1_TIMEOUT",
        ),
        ({"RECONCILER_WEBHOOK_1_URL_FILE": "/etc/hostname"}, "RECONCILER_WEBHOOK_1_URL_FILE"),
        ({"RECONCILER_WEBHOOK_01_URL": "ftp://files.example/"}, "RECONCILER_WEBHOOK_01_URL"),
    ],
)
def test_a_bad_webhook_names_its_variable(environment: dict[str, str], variable: str) -> None:
    assert named(only_problem(environment)) == variable


def test_a_webhook_secret_file_without_a_url_is_reported(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("file-key\n")
    problem = only_problem({"RECONCILER_WEBHOOK_4_SECRET_FILE": str(secret)})
    assert named(problem) == "RECONCILER_WEBHOOK_4_URL"


def test_one_webhook_spelled_two_ways_is_reported() -> None:
    problem = only_problem(
        {"RECONCILER_WEBHOOK_1_URL": "https://a.example/", "RECONCILER_WEBHOOK_01_URL": "https://b.example/"}
    )
    assert named(problem) in {"RECONCILER_WEBHOOK_1_URL", "RECONCILER_WEBHOOK_01_URL"}
    assert "RECONCILER_WEBHOOK_1_URL" in problem
    assert "RECONCILER_WEBHOOK_01_URL" in problem


# URLs that pass a URL parser but that can never be delivered to: host names no resolver takes, port 0.
UNUSABLE_WEBHOOK_URLS = [
    "http://\u2488.example/hook?token=TOKENXYZ0",  # NFKC makes it "1..example": an empty label
    "http://a..example/hook",
    "https://" + "a" * 64 + ".example/hook",  # a label longer than 63 characters
    "http://h\x00ost.example/hook",
    "http://h ost.example/hook",
    "http://hooks.example:0/hook",
]


@pytest.mark.parametrize("url", UNUSABLE_WEBHOOK_URLS)
def test_a_webhook_url_that_cannot_be_used_is_refused_at_start_up(url: str) -> None:
    problem = only_problem({"RECONCILER_WEBHOOK_0_URL": url})
    assert named(problem) == "RECONCILER_WEBHOOK_0_URL"
    assert "TOKENXYZ0" not in problem
    assert "example" not in problem


async def test_webhook_urls_aiohttp_refuses() -> None:
    """The first three are refused for the reason of the issue: aiohttp raises (not a ClientError, which
    the webhook sender would report as a failed delivery) before any request, on every attempt."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        for url in UNUSABLE_WEBHOOK_URLS[:3]:
            with pytest.raises(UnicodeError):
                async with session.post(url, timeout=aiohttp.ClientTimeout(total=5)):
                    pass


def test_the_known_secrets_are_every_secret_the_settings_hold() -> None:
    loaded = load(
        {
            "RECONCILER_DATABASE_URL": "postgresql://admin:pa%40ss-word@db.example/platform?sslpassword=ssl-key",
            "RECONCILER_SMTP_USERNAME": "mailer",
            "RECONCILER_SMTP_PASSWORD": "smtp-password",
            "RECONCILER_WEBHOOK_0_URL": "https://user:url-pass@hooks.example/services/T0KEN123/x?sig=abc&page=2",
            "RECONCILER_WEBHOOK_0_SECRET": "hook-secret",
        }
    )
    secrets = known_secrets(loaded)
    expected = {"pa%40ss-word", "pa@ss-word", "ssl-key", "smtp-password", "hook-secret", "url-pass", "T0KEN123", "abc"}
    assert expected <= secrets
    assert "https://user:url-pass@hooks.example/services/T0KEN123/x?sig=abc&page=2" in secrets
    assert "/services/T0KEN123/x?sig=abc&page=2" in secrets
    # Words and small values of a URL are not secrets: redacting them would blank out ordinary log text.
    assert not {"services", "x", "2", "hooks.example", "admin", "mailer"} & secrets


@pytest.mark.parametrize(
    "variable", ["RECONCILER_WEBHOOK_\u0663_URL", "RECONCILER_WEBHOOK_x_URL", "RECONCILER_WEBHOOK_+1_URL"]
)
def test_a_webhook_number_is_written_with_the_digits_0_to_9(variable: str) -> None:
    # `\d` and int() take the Arabic-Indic digit three for webhook 3.
    problem = only_problem({variable: "https://hooks.example/"})
    assert named(problem) == variable
    assert "0-9" in problem


def test_an_empty_webhook_secret_is_refused() -> None:
    problem = only_problem({"RECONCILER_WEBHOOK_0_URL": "https://hooks.example/", "RECONCILER_WEBHOOK_0_SECRET": ""})
    assert named(problem) == "RECONCILER_WEBHOOK_0_SECRET"
    assert "empty" in problem


# --- secrets never printed ------------------------------------------------------------------------------

SECRET = "Sup3rS3cretValue"

LEAKY = [
    {"RECONCILER_DATABASE_URL": f"mysql://admin:{SECRET}@db.example/platform"},
    {"RECONCILER_DATABASE_URL": f"postgresql://admin:{SECRET}@db.example:port/platform"},
    {"RECONCILER_DATABASE_URL": f"postgresql://admin:{SECRET}@db.example:123456/platform"},
    {"RECONCILER_DATABASE_URL": f"postgresql://admin:{SECRET}@[db.example/platform"},
    {"RECONCILER_DATABASE_URL": f"postgresql://admin:{SECRET}\u2100@db.example/platform"},
    {"RECONCILER_DATABASE_URL": SECRET},
    {"RECONCILER_SMTP_PASSWORD": SECRET},
    {"RECONCILER_SMTP_HOST": "mail.example", "RECONCILER_SMTP_PASSWORD": SECRET},
    {"RECONCILER_WEBHOOK_0_SECRET": SECRET, "RECONCILER_WEBHOOK_0_TIMEOUT": "never"},
    {"RECONCILER_WEBHOOK_0_SECRET": SECRET},
    {"RECONCILER_WEBHOOK_0_URL": f"ftp://hooks.example/services/{SECRET}"},
    {"RECONCILER_WEBHOOK_0_URL": f"https://hooks.example:99999/services/{SECRET}"},
    {"RECONCILER_WEBHOOK_0_URL": f"https://user:{SECRET}\u2100@hooks.example/"},
    {"RECONCILER_WEBHOOK_0_URL": f"https://[hooks.example/?token={SECRET}"},
    {"RECONCILER_WEBHOOK_0_URL": f"{SECRET}"},
    {"RECONCILER_DATABASE_URL": f"postgresql://u:p@ss{SECRET}:word{SECRET}@127.0.0.1:5432/d"},
    {"RECONCILER_DATABASE_URL": f"postgresql://u:p@{SECRET}@127.0.0.1/d"},
    {"RECONCILER_DATABASE_URL": f"postgresql://u:{SECRET}@/d?host=127.0.0.1&port=x{SECRET}"},
    {"RECONCILER_DATABASE_URL": f"postgresql://u:pw@h/d?{SECRET}"},
    {"RECONCILER_WEBHOOK_0_URL": f"http://\u2488.example/hook?token={SECRET}"},
    {"RECONCILER_WEBHOOK_0_URL": f"https://{SECRET}..example/hook"},
]


@pytest.mark.parametrize("environment", LEAKY)
def test_a_secret_is_never_in_a_problem(environment: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as raised:
        load(environment)
    text = "\n".join([str(raised.value), repr(raised.value), *raised.value.problems])
    assert SECRET.lower() not in text.lower()
    for problem in raised.value.problems:
        assert named(problem) in KNOWN_VARIABLES | webhook_variables(environment) | set(environment), problem


def test_a_valid_secret_is_hidden_in_the_settings_repr() -> None:
    loaded = load(
        {
            "RECONCILER_DATABASE_URL": f"postgresql://admin:{SECRET}@db.example/platform",
            "RECONCILER_SMTP_USERNAME": "mailer",
            "RECONCILER_SMTP_PASSWORD": SECRET + "2",
            "RECONCILER_WEBHOOK_0_URL": f"https://hooks.example/{SECRET}3",
            "RECONCILER_WEBHOOK_0_SECRET": SECRET + "4",
        }
    )
    for text in (repr(loaded), str(loaded), database_url_for_display(loaded), loaded.webhooks[0].display_url):
        assert SECRET not in text
    assert database_url_for_display(loaded) == "postgresql://admin:***@db.example/platform"


# The variables a problem may name: every setting's, the aliases', and those of the webhooks set.
KNOWN_VARIABLES = (
    {"RECONCILER_" + field.upper() for field in Settings.model_fields}
    | set(CODER_ALIASES.values())
    | {"RECONCILER_DATABASE_URL_FILE", "RECONCILER_SMTP_PASSWORD_FILE"}
)


def webhook_variables(environment: Mapping[str, str]) -> set[str]:
    """The variables of every webhook that the environment mentions."""
    return {
        f"RECONCILER_WEBHOOK_{index}_{part}"
        for index in re.findall(r"^RECONCILER_WEBHOOK_(\d+)_", "\n".join(environment), re.MULTILINE)
        for part in ("URL", "SECRET", "TIMEOUT")
    }


token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=6, max_size=12)
# What an environment can hold: any text but NUL (and lone surrogates, which os.environ never gives).
junk = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=30)
durations = st.one_of(
    junk,
    st.integers(min_value=-5, max_value=10**7).map(str),
    st.builds(
        lambda amount, unit: f"{amount}{unit}", st.integers(0, 10**6), st.sampled_from(["ms", "s", "m", "h", "d"])
    ),
)
numbers = st.one_of(junk, st.integers(min_value=-10, max_value=10**6).map(str))
hosts = st.one_of(
    st.sampled_from(["db.example", "[::1]", "h:5432", "h:port", "\u2488.example", "a..b", "h@127.0.0.1"]), junk
)


@st.composite
def environments(draw: st.DrawFn) -> tuple[dict[str, str], list[str]]:
    """An environment of random (mostly bad) values, and the secrets it carries."""
    secrets = [f"Zq{draw(token)}Xk" for _ in range(4)]
    database_password, smtp_password, webhook_secret, webhook_token = secrets
    environment: dict[str, str] = dict(NO_SECRET_DIRECTORIES)
    if draw(st.booleans()):
        scheme = draw(st.sampled_from(["postgresql", "postgres", "mysql", "", "postgresql:"]))
        environment["RECONCILER_DATABASE_URL"] = (
            f"{scheme}://{draw(st.sampled_from(['u', '', 'u:']))}:{database_password}{draw(junk)}@"
            f"{draw(hosts)}/{draw(junk)}"
        )
    if draw(st.booleans()):
        environment["RECONCILER_SMTP_PASSWORD"] = smtp_password
        if draw(st.booleans()):
            environment["RECONCILER_SMTP_USERNAME"] = draw(junk)
    for index in draw(st.lists(st.integers(0, 3), max_size=2, unique=True)):
        if draw(st.booleans()):
            url_scheme = draw(st.sampled_from(["https", "http", "ftp", ""]))
            environment[f"RECONCILER_WEBHOOK_{index}_URL"] = (
                f"{url_scheme}://{draw(st.sampled_from(['', 'user:' + webhook_token + '@']))}{draw(hosts)}"
                f"/hook/{webhook_token}{draw(junk)}?token={webhook_token}"
            )
        if draw(st.booleans()):
            environment[f"RECONCILER_WEBHOOK_{index}_SECRET"] = webhook_secret
        if draw(st.booleans()):
            environment[f"RECONCILER_WEBHOOK_{index}_TIMEOUT"] = draw(durations)
    if draw(st.booleans()):
        # A misspelt variable holding a secret: warned about by name, never by value.
        misspelt = draw(st.sampled_from(["RECONCILER_DATABASE_URI", "RECONCILER_SMTP_PASWORD", "RECONCILER_X"]))
        environment[misspelt] = draw(st.sampled_from(secrets))
    for variable in draw(st.lists(st.sampled_from(sorted(OTHER_VARIABLES)), max_size=6, unique=True)):
        kind = OTHER_VARIABLES[variable]
        environment[variable] = draw(durations if kind == "duration" else numbers if kind == "number" else junk)
    return environment, secrets


OTHER_VARIABLES = {
    "RECONCILER_RECONCILIATION_INTERVAL": "duration",
    "CODER_WORKSPACE_PREBUILDS_RECONCILIATION_INTERVAL": "duration",
    "RECONCILER_BACKOFF_INTERVAL": "duration",
    "CODER_WORKSPACE_PREBUILDS_RECONCILIATION_BACKOFF_INTERVAL": "duration",
    "RECONCILER_BACKOFF_LOOKBACK": "duration",
    "CODER_WORKSPACE_PREBUILDS_RECONCILIATION_BACKOFF_LOOKBACK_PERIOD": "duration",
    "RECONCILER_FAILURE_HARD_LIMIT": "number",
    "CODER_WORKSPACE_PREBUILDS_FAILURE_HARD_LIMIT": "number",
    "RECONCILER_HTTP_ADDRESS": "text",
    "RECONCILER_LOG_FORMAT": "text",
    "RECONCILER_LOG_LEVEL": "text",
    "RECONCILER_SHUTDOWN_GRACE": "duration",
    "RECONCILER_MAX_DESIRED_INSTANCES": "number",
    "RECONCILER_EXECUTOR_CONCURRENCY": "number",
    "RECONCILER_NON_RETRYABLE_ERROR_CODES": "text",
    "RECONCILER_CAPACITY_ERROR_CODES": "text",
    "RECONCILER_STATEMENT_TIMEOUT": "duration",
    "RECONCILER_CONNECT_TIMEOUT": "duration",
    "RECONCILER_POOL_MAX_SIZE": "number",
    "RECONCILER_SMTP_HOST": "text",
    "RECONCILER_SMTP_PORT": "number",
    "RECONCILER_SMTP_FROM": "text",
    "RECONCILER_SMTP_SECURITY": "text",
    "RECONCILER_SMTP_TIMEOUT": "duration",
    "RECONCILER_NOTIFICATION_MAX_ATTEMPTS": "number",
    "RECONCILER_NOTIFICATION_POLL_INTERVAL": "duration",
}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(environments(), st.booleans())
def test_random_environments_give_settings_or_named_problems_without_secrets(
    drawn: tuple[dict[str, str], list[str]], require_database: bool
) -> None:
    environment, secrets = drawn
    loaded: Settings | None = None
    failure: ConfigError | None = None
    try:
        loaded = load_settings(environment, require_database=require_database)
    except ConfigError as error:
        failure = error
    if failure is not None:
        assert failure.problems
        for problem in failure.problems:
            assert named(problem) in KNOWN_VARIABLES | webhook_variables(environment) | set(environment), problem
            assert "\n" not in problem
        shown = "\n".join([str(failure), repr(failure), *failure.problems]).lower()
    else:
        assert loaded is not None
        shown = "\n".join([repr(loaded), str(loaded), database_url_for_display(loaded)]).lower()
        shown += "".join(webhook.display_url for webhook in loaded.webhooks).lower()
        shown += repr(configuration_warnings(environment, loaded)).lower()
        assert_every_held_secret_is_redacted(loaded)
    for secret in secrets:
        assert secret.lower() not in shown


def assert_every_held_secret_is_redacted(loaded: Settings) -> None:
    """A log line quoting a secret the daemon holds (as the driver or the sender use it) loses it."""
    held = []
    if loaded.database_url is not None:
        held.append(parse_dsn(loaded.database_url.get_secret_value()).password)
    if loaded.smtp_password is not None:
        held.append(loaded.smtp_password.get_secret_value())
    for webhook in loaded.webhooks:
        held.append(webhook.url.get_secret_value())
        if webhook.secret is not None:
            held.append(webhook.secret.get_secret_value())
    redact = Redactor(known_secrets(loaded))
    for secret in held:
        if secret is None or len(secret) < 4:
            continue
        line = redact(f"event {secret!r} {secret} {[secret]}")
        for spelling in spellings(secret):
            assert spelling not in line


# --- secrets from files ---------------------------------------------------------------------------------


def test_database_url_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "dsn"
    path.write_text(f"postgresql://admin:{SECRET}@db.example/platform\n")
    loaded = load({"RECONCILER_DATABASE_URL_FILE": str(path)}, base=NO_SECRET_DIRECTORIES)
    assert loaded.database_url is not None
    assert loaded.database_url.get_secret_value() == f"postgresql://admin:{SECRET}@db.example/platform"


def test_the_variable_wins_over_its_file_which_wins_over_the_directories(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "database_url").write_text("postgresql://from-credentials/db")
    path = tmp_path / "dsn"
    path.write_text("postgresql://from-file/db")
    base = {"CREDENTIALS_DIRECTORY": str(credentials), **NO_SECRET_DIRECTORIES}

    def dsn(environment: dict[str, str]) -> str:
        loaded = load(environment, base=base)
        assert loaded.database_url is not None
        return loaded.database_url.get_secret_value()

    assert dsn({}) == "postgresql://from-credentials/db"
    assert dsn({"RECONCILER_DATABASE_URL_FILE": str(path)}) == "postgresql://from-file/db"
    assert dsn({"RECONCILER_DATABASE_URL_FILE": str(path), "RECONCILER_DATABASE_URL": DSN}) == DSN


def test_credentials_directory_comes_before_the_secrets_directories(tmp_path: Path) -> None:
    first, second, credentials = tmp_path / "first", tmp_path / "second", tmp_path / "credentials"
    for directory in (first, second, credentials):
        directory.mkdir()
    (second / "smtp_password").write_text("from-second")
    (second / "webhook_0_secret").write_text("hook-from-second\n")
    base = {"RECONCILER_DATABASE_URL": DSN, "RECONCILER_SECRETS_DIRECTORIES": f"{first}:{second}"}
    mail = {"RECONCILER_SMTP_USERNAME": "mailer", "RECONCILER_WEBHOOK_0_URL": "https://h.example/"}
    loaded = load(mail, base=base)
    assert loaded.smtp_password is not None
    assert loaded.smtp_password.get_secret_value() == "from-second"
    assert loaded.webhooks[0].secret is not None
    assert loaded.webhooks[0].secret.get_secret_value() == "hook-from-second"
    (first / "smtp_password").write_text("from-first")
    (credentials / "smtp_password").write_text("from-credentials")
    loaded = load({**mail, "CREDENTIALS_DIRECTORY": str(credentials)}, base=base)
    assert loaded.smtp_password is not None
    assert loaded.smtp_password.get_secret_value() == "from-credentials"
    assert plain(load(mail, base=base).smtp_password) == "from-first"


def test_webhook_secret_from_its_file(tmp_path: Path) -> None:
    path = tmp_path / "hook"
    path.write_text("file-key\r\n")
    loaded = load({"RECONCILER_WEBHOOK_0_URL": "https://h.example/", "RECONCILER_WEBHOOK_0_SECRET_FILE": str(path)})
    assert loaded.webhooks[0].secret is not None
    assert loaded.webhooks[0].secret.get_secret_value() == "file-key"


def test_an_invalid_secret_from_a_file_names_the_file_variable(tmp_path: Path) -> None:
    path = tmp_path / "dsn"
    path.write_text(f"mysql://admin:{SECRET}@db/x")
    problem = only_problem({"RECONCILER_DATABASE_URL_FILE": str(path)}, base=NO_SECRET_DIRECTORIES)
    assert named(problem) == "RECONCILER_DATABASE_URL_FILE"
    assert SECRET not in problem


def test_an_invalid_secret_from_a_credentials_directory_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "database_url").write_text(f"mysql://admin:{SECRET}@db/x")
    problem = only_problem({"CREDENTIALS_DIRECTORY": str(tmp_path)}, base=NO_SECRET_DIRECTORIES)
    assert named(problem) == str(tmp_path / "database_url")
    assert SECRET not in problem


@pytest.mark.parametrize("kind", ["missing", "directory", "binary"])
def test_an_unreadable_secret_file_is_a_problem_naming_its_variable(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "secret"
    if kind == "directory":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(b"\xff\xfe" + SECRET.encode() + b"\xd0")
    for variable in ("RECONCILER_DATABASE_URL", "RECONCILER_SMTP_PASSWORD", "RECONCILER_WEBHOOK_0_SECRET"):
        environment = {variable + "_FILE": str(path), "RECONCILER_SMTP_USERNAME": "mailer"}
        environment["RECONCILER_WEBHOOK_0_URL"] = "https://h.example/"
        # The variable would win over its file: leave the database URL unset when its file is under test.
        problem = only_problem(
            environment, base=NO_SECRET_DIRECTORIES if variable == "RECONCILER_DATABASE_URL" else BASE
        )
        assert named(problem) == variable + "_FILE"
        assert str(path) in problem
        assert SECRET not in problem


def test_an_unreadable_file_in_a_secrets_directory_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "smtp_password").mkdir()
    loaded = load({"RECONCILER_SECRETS_DIRECTORIES": str(tmp_path)})
    assert loaded.smtp_password is None


# --- warnings -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "closest"),
    [
        ("RECONCILER_RECONCILIATON_INTERVAL", "RECONCILER_RECONCILIATION_INTERVAL"),
        ("RECONCILER_LOGLEVEL", "RECONCILER_LOG_LEVEL"),
        ("RECONCILER_DATABASE_URL_FIL", "RECONCILER_DATABASE_URL_FILE"),
        ("RECONCILER_WEBHOOK_2_URLS", "RECONCILER_WEBHOOK_2_URL"),
        ("RECONCILER_WEBHOOK_1_SECRETFILE", "RECONCILER_WEBHOOK_1_SECRET_FILE"),
        ("RECONCILER_WEBHOOKS", "RECONCILER_WEBHOOK_<N>_URL"),
        ("RECONCILER_SMTP_PASWORD", "RECONCILER_SMTP_PASSWORD"),
        ("RECONCILER_SOMETHING_ELSE_ENTIRELY", "(none)"),
    ],
)
def test_an_unknown_variable_is_warned_about_naming_the_closest_known_one(variable: str, closest: str) -> None:
    environment = {**BASE, variable: f"value-{SECRET}"}
    warnings = configuration_warnings(environment, load(environment, base={}))
    assert warnings == [("config.unknown_variable", {"variable": variable, "closest": closest})]


def test_no_warning_for_the_variables_the_daemon_or_its_tools_read() -> None:
    environment = {variable.replace("<N>", "3"): "" for variable in known_variables()}
    environment.update(dict.fromkeys(TOOL_VARIABLES, "x"))
    environment.update({"CODER_ANYTHING": "x", "RECONCILER_WEBHOOK_3_URL": "https://hooks.example/"})
    # Settings that load: only the names matter here.
    assert configuration_warnings(environment, load({})) == []
    assert {"RECONCILER_DATABASE_URL", "RECONCILER_WEBHOOK_<N>_SECRET_FILE", "RECONCILER_SECRETS_DIRECTORIES"} <= (
        known_variables()
    )


def test_a_secret_too_short_to_be_redacted_is_warned_about() -> None:
    loaded = load(
        {
            "RECONCILER_DATABASE_URL": "postgresql://u:pw@db.example/platform",
            "RECONCILER_SMTP_USERNAME": "mailer",
            "RECONCILER_SMTP_PASSWORD": "long-enough",
            "RECONCILER_WEBHOOK_1_URL": "https://hooks.example/",
            "RECONCILER_WEBHOOK_1_SECRET": "abc",
        }
    )
    warned = [fields["variable"] for event, fields in configuration_warnings({}, loaded)]
    assert warned == ["RECONCILER_DATABASE_URL", "RECONCILER_WEBHOOK_1_SECRET"]
    assert all(event == "config.secret_not_redacted" for event, _ in configuration_warnings({}, loaded))


# --- the library's sources ------------------------------------------------------------------------------


def test_settings_read_the_process_environment_as_load_settings_does(monkeypatch: pytest.MonkeyPatch) -> None:
    environment = {**BASE, "CODER_WORKSPACE_PREBUILDS_FAILURE_HARD_LIMIT": "7", "RECONCILER_LOG_LEVEL": "DEBUG"}
    for name in list(os.environ):
        if name.startswith(("RECONCILER_", "CODER_")) or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert Settings() == load_settings() == load(environment)
    assert (Settings().failure_hard_limit, Settings().log_level) == (7, "debug")


def test_reading_writes_no_warning_of_the_library(tmp_path: Path) -> None:
    """A secrets directory that does not exist, one that is a file, an entry that is a directory: skipped
    silently, as before (the library would warn on stderr, or fail)."""
    (tmp_path / "smtp_password").mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    directories = os.pathsep.join(["/nonexistent/secrets", str(a_file), str(tmp_path)])
    with warnings_module.catch_warnings(record=True) as caught:
        warnings_module.simplefilter("always")
        loaded = load({"RECONCILER_SECRETS_DIRECTORIES": directories})
    assert loaded.smtp_password is None
    assert caught == []


def test_a_binary_file_in_a_secrets_directory_is_a_problem_naming_it(tmp_path: Path) -> None:
    (tmp_path / "smtp_password").write_bytes(b"\xff\xfe" + SECRET.encode() + b"\xd0")
    problem = only_problem({"RECONCILER_SECRETS_DIRECTORIES": str(tmp_path), "RECONCILER_SMTP_USERNAME": "mailer"})
    assert named(problem) == str(tmp_path / "smtp_password")
    assert SECRET not in problem


# --- redact_dsn -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        (f"postgresql://admin:{SECRET}@db.example:5432/platform", "postgresql://admin:***@db.example:5432/platform"),
        ("postgresql://admin@db.example/platform", "postgresql://admin@db.example/platform"),
        (
            f"postgresql://admin:{SECRET}@[::1]:5432/platform?sslmode=require",
            "postgresql://admin:***@[::1]:5432/platform",
        ),
        (f"postgresql://admin:{SECRET}@db.example:port/platform", "(an unparseable DSN)"),
        (f"postgresql:///platform?host=/run/pg&password={SECRET}", "postgresql:///platform"),
    ],
)
def test_redact_dsn(dsn: str, expected: str) -> None:
    assert redact_dsn(dsn) == expected


@given(token, junk, junk)
def test_redact_dsn_never_returns_the_password(password: str, before: str, after: str) -> None:
    secret = f"Zq{password}Xk"
    assert secret not in redact_dsn(f"postgresql://{before}:{secret}@{after}/db")
    assert secret not in redact_dsn(f"postgresql://u:{secret}{after}@h/{before}")
