"""The real command line in a subprocess: help, bad usage, bad configuration, an unreachable database."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from reconciler.cli import _parser
from reconciler.demo.embedded_postgres import free_port

SECRET = "Tr0ub4dor-and-3"
NO_SECRET_DIRECTORIES = "/nonexistent/reconciler-test-secrets"
CONSOLE_SCRIPT = Path(sys.executable).with_name("reconciler")


def environment(**variables: str) -> dict[str, str]:
    """This process's environment without any setting of ours, plus `variables`."""
    clean = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RECONCILER_", "CODER_")) and key != "CREDENTIALS_DIRECTORY"
    }
    return {**clean, "RECONCILER_SECRETS_DIRECTORIES": NO_SECRET_DIRECTORIES, **variables}


def run(
    *arguments: str, variables: Mapping[str, str], executable: str | None = None
) -> subprocess.CompletedProcess[str]:
    command = [executable] if executable else [sys.executable, "-m", "reconciler"]
    return subprocess.run(
        [*command, *arguments],
        env=dict(variables),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).parent,
    )


def subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command path of the parser (`("presets", "reset")` included), walked from the parser itself."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*prefix, name)
                yield from subcommands(child, (*prefix, name))


ALL_COMMANDS = sorted(subcommands(_parser()))

# Every command that loads the settings, with the arguments that make it valid usage.
CONFIGURED_COMMANDS = [
    ("run",),
    ("migrate",),
    ("reconcile", "--once"),
    ("plan",),
    ("plan", "--json"),
    ("status",),
    ("pause",),
    ("resume",),
    ("presets", "reset", "6a2f3e0e-8b7c-4a0e-9a55-1d8f5b7f7c11"),
    ("notifications", "list"),
]
DATABASE_COMMANDS = [command for command in CONFIGURED_COMMANDS if command[0] != "run"]


# --- help -------------------------------------------------------------------------------------------


def test_every_command_is_known_to_this_test() -> None:
    assert {command[0] for command in ALL_COMMANDS} >= {"run", "migrate", "reconcile", "plan", "status", "pause"}
    assert ("presets", "reset") in ALL_COMMANDS


@pytest.mark.parametrize("executable", [None, str(CONSOLE_SCRIPT)], ids=["python -m", "console script"])
def test_top_level_help_lists_commands_variables_and_exit_codes(executable: str | None) -> None:
    # A broken configuration must not stand in the way of reading the help.
    result = run("--help", variables=environment(RECONCILER_FAILURE_HARD_LIMIT="lots"), executable=executable)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("usage: reconciler")
    assert "prebuilt workspaces" in result.stdout
    for command in {command[0] for command in ALL_COMMANDS}:
        assert f"\n    {command}" in result.stdout, command
    words = " ".join(result.stdout.split())
    for phrase in ("creates the prebuilds that are missing", "environment variables"):
        assert phrase in words
    for variable in ("RECONCILER_DATABASE_URL", "RECONCILER_RECONCILIATION_INTERVAL", "RECONCILER_HTTP_ADDRESS"):
        assert variable in result.stdout
    for code in ("0", "1", "2", "78"):
        assert f"\n  {code} " in result.stdout, code


PURPOSES = {
    ("run",): ["daemon", "SIGTERM", "/metrics"],
    ("migrate",): ["schema", "advisory lock", "newer"],
    ("reconcile",): ["one reconciliation pass", "--once"],
    ("plan",): ["Writes nothing", "--json", "actions"],
    ("status",): ["prebuild status", "backoff", "--json"],
    ("pause",): ["every replica"],
    ("resume",): ["every replica"],
    ("presets",): ["reset"],
    ("presets", "reset"): ["normal", "PRESET_ID", "hard limit"],
    ("presets", "check-expression"): ["EXPR", "Exit 0 when it is valid", "claim_rate_30m", "clamp"],
    ("presets", "describe"): ["PRESET", "--json", "notification", "next pass", "template/preset"],
    ("notifications",): ["outbox", "list"],
    ("notifications", "list"): ["--limit", "--json", "status"],
    ("healthcheck",): ["alive", "exit 0", "--timeout"],
}


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=" ".join)
def test_every_command_has_a_help_that_says_what_it_does(command: tuple[str, ...]) -> None:
    result = run(*command, "--help", variables=environment(RECONCILER_FAILURE_HARD_LIMIT="lots"))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(f"usage: reconciler {' '.join(command)}")
    # A description paragraph follows the usage: more than the one-line summary of the listing.
    paragraphs = result.stdout.split("\n\n")
    assert len(paragraphs) > 2
    assert not paragraphs[1].startswith(("options:", "positional arguments:")), "no description"
    assert len(paragraphs[1]) >= 40
    words = " ".join(result.stdout.split())
    for expected in PURPOSES.get(command, []):
        assert expected in words, expected


def test_every_command_has_its_expected_help_words() -> None:
    # New commands get an entry above, so that their help is checked for substance too.
    assert set(PURPOSES) <= set(ALL_COMMANDS)


@pytest.mark.parametrize(
    "arguments",
    [
        (),
        ("frobnicate",),
        ("reconcile",),
        ("plan", "--yaml"),
        ("presets",),
        ("presets", "reset"),
        ("notifications", "list", "--limit", "many"),
        ("healthcheck", "--timeout", "soon"),
        ("migrate", "extra"),
        # Numbers argparse's float() reads but that are no duration, rate or count (issue 12, point 6).
        ("healthcheck", "--timeout", "-1"),
        ("healthcheck", "--timeout", "nan"),
        ("simulate-provisioner", "--duration", "nan"),
        ("simulate-provisioner", "--failure-rate", "nan"),
        ("simulate-provisioner", "--failure-rate", "1.5"),
        ("simulate-provisioner", "--min-seconds", "inf"),
        ("simulate-provisioner", "--max-seconds", "-2"),
        ("demo", "--interval", "nan"),
        ("demo", "--duration", "1e999"),
        ("notifications", "list", "--limit", "-3"),
    ],
    ids=lambda arguments: " ".join(arguments) or "nothing",
)
def test_bad_usage_exits_2_with_usage_and_no_traceback(arguments: tuple[str, ...]) -> None:
    result = run(*arguments, variables=environment(RECONCILER_DATABASE_URL="postgresql://u@127.0.0.1:1/d"))
    assert result.returncode == 2, result
    assert "usage: reconciler" in result.stderr
    assert "error:" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


# --- bad configuration ------------------------------------------------------------------------------

BAD = {
    "RECONCILER_DATABASE_URL": f"mysql://admin:{SECRET}@db.example/platform",
    "RECONCILER_RECONCILIATION_INTERVAL": "often",
    "CODER_WORKSPACE_PREBUILDS_FAILURE_HARD_LIMIT": "-1",
    "RECONCILER_SMTP_PASSWORD_FILE": "/nonexistent/smtp-password",
    "RECONCILER_WEBHOOK_0_URL": f"ftp://hooks.example/services/{SECRET}",
    "RECONCILER_WEBHOOK_0_SECRET": SECRET,
    "RECONCILER_LOG_LEVEL": "chatty",
}


def problem_lines(stderr: str) -> list[str]:
    lines = stderr.splitlines()
    assert lines[0] == "reconciler: bad configuration:", stderr
    assert all(line.startswith("  ") for line in lines[1:]), stderr
    return [line.strip() for line in lines[1:]]


@pytest.mark.parametrize("command", CONFIGURED_COMMANDS, ids=" ".join)
def test_bad_settings_exit_78_with_one_line_per_problem_and_no_secret(command: tuple[str, ...]) -> None:
    result = run(*command, variables=environment(**BAD))
    assert result.returncode == 78, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert SECRET not in result.stderr
    problems = problem_lines(result.stderr)
    assert sorted(problem.partition(": ")[0] for problem in problems) == sorted(
        [
            "RECONCILER_DATABASE_URL",
            "RECONCILER_RECONCILIATION_INTERVAL",
            "CODER_WORKSPACE_PREBUILDS_FAILURE_HARD_LIMIT",
            "RECONCILER_SMTP_PASSWORD_FILE",
            "RECONCILER_WEBHOOK_0_URL",
            "RECONCILER_LOG_LEVEL",
        ]
    )


@pytest.mark.parametrize("address", ["nowhere", "999.1.1.1:80", "\U0001f600:80"])
def test_healthcheck_also_refuses_bad_settings(address: str) -> None:
    result = run("healthcheck", variables=environment(RECONCILER_HTTP_ADDRESS=address))
    assert result.returncode == 78, result
    assert [problem.partition(": ")[0] for problem in problem_lines(result.stderr)] == ["RECONCILER_HTTP_ADDRESS"]


@pytest.mark.parametrize("command", CONFIGURED_COMMANDS, ids=" ".join)
def test_a_missing_database_url_exits_78_naming_it(command: tuple[str, ...]) -> None:
    result = run(*command, variables=environment())
    assert result.returncode == 78, result
    assert "Traceback" not in result.stderr
    problems = problem_lines(result.stderr)
    assert len(problems) == 1
    assert problems[0].startswith("RECONCILER_DATABASE_URL: required")


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgresql://admin:{SECRET}@127.0.0.1:port/platform",
        f"postgresql://admin:{SECRET}@127.0.0.1:99999/platform",
        f"postgresql://admin:{SECRET}@[127.0.0.1/platform",
        f"postgresql://admin:{SECRET}/x@127.0.0.1/platform",
        # An unencoded '@' in the password: asyncpg splits at the first one (issue 12, point 2).
        f"postgresql://u:p@ss{SECRET}:word{SECRET}@127.0.0.1:5432/d",
        f"postgresql://u:p@{SECRET}@127.0.0.1/d",
        f"postgresql://u:{SECRET}@/d?host=127.0.0.1&port=x",
    ],
)
@pytest.mark.parametrize("command", ["migrate", "plan"])
def test_a_malformed_dsn_exits_78_not_a_traceback(dsn: str, command: str) -> None:
    result = run(command, variables=environment(RECONCILER_DATABASE_URL=dsn))
    assert result.returncode == 78, result
    assert "Traceback" not in result.stderr
    assert SECRET not in result.stderr
    assert [problem.partition(": ")[0] for problem in problem_lines(result.stderr)] == ["RECONCILER_DATABASE_URL"]


def test_a_webhook_url_that_cannot_be_used_exits_78_at_start_up() -> None:
    url = f"http://\u2488.example/hook?token={SECRET}"
    variables = environment(RECONCILER_DATABASE_URL="postgresql://u@127.0.0.1:1/d", RECONCILER_WEBHOOK_0_URL=url)
    result = run("run", variables=variables)
    assert result.returncode == 78, result
    assert "Traceback" not in result.stderr
    assert SECRET not in result.stderr
    assert [problem.partition(": ")[0] for problem in problem_lines(result.stderr)] == ["RECONCILER_WEBHOOK_0_URL"]


def test_an_unknown_variable_is_warned_about_at_start_naming_the_closest_known_one() -> None:
    port = free_port()
    variables = environment(
        RECONCILER_DATABASE_URL=f"postgresql://u@127.0.0.1:{port}/d",
        RECONCILER_LOG_FORMAT="json",
        RECONCILER_RECONCILIATON_INTERVAL=f"10s-{SECRET}",
    )
    result = run("migrate", variables=variables)
    assert result.returncode == 1, result  # nothing listens: the warning is the point, not the command
    warnings = [json.loads(line) for line in result.stderr.splitlines() if "config.unknown_variable" in line]
    assert len(warnings) == 1, result.stderr
    assert warnings[0]["variable"] == "RECONCILER_RECONCILIATON_INTERVAL"
    assert warnings[0]["closest"] == "RECONCILER_RECONCILIATION_INTERVAL"
    assert warnings[0]["level"] == "warning"
    assert SECRET not in result.stderr


def test_an_unreadable_database_url_file_exits_78_naming_the_file_variable(tmp_path: Path) -> None:
    result = run("migrate", variables=environment(RECONCILER_DATABASE_URL_FILE=str(tmp_path / "missing")))
    assert result.returncode == 78, result
    problems = problem_lines(result.stderr)
    assert len(problems) == 1
    assert problems[0].startswith(f"RECONCILER_DATABASE_URL_FILE: cannot read {tmp_path / 'missing'}")


# --- an unreachable database ------------------------------------------------------------------------


@pytest.mark.parametrize("command", DATABASE_COMMANDS, ids=" ".join)
def test_an_unreachable_database_exits_1_with_one_clear_line(command: tuple[str, ...]) -> None:
    port = free_port()  # nothing listens there: the connection is refused at once
    dsn = f"postgresql://admin:{SECRET}@127.0.0.1:{port}/platform"
    result = run(*command, variables=environment(RECONCILER_DATABASE_URL=dsn, RECONCILER_CONNECT_TIMEOUT="5s"))
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert SECRET not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("reconciler:")]
    assert len(lines) == 1, result.stderr
    assert f"cannot connect to the database at postgresql://admin:***@127.0.0.1:{port}/platform" in lines[0]


def test_a_database_url_from_a_file_is_used_and_not_printed(tmp_path: Path) -> None:
    port = free_port()
    secret_file = tmp_path / "database_url"
    secret_file.write_text(f"postgresql://admin:{SECRET}@127.0.0.1:{port}/platform\n")
    result = run("migrate", variables=environment(CREDENTIALS_DIRECTORY=str(tmp_path)))
    assert result.returncode == 1, result
    assert f"127.0.0.1:{port}" in result.stderr
    assert SECRET not in result.stderr
