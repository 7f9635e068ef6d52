"""The daemon records the behaviour settings its passes use (issue 11 point 3), on a real database."""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from reconciler.config import behaviour_values
from reconciler.reconcile import PassOutcome, run_pass
from reconciler.recorded_settings import instance_name
from reconciler.store import reads, writes
from tests.acceptance.daemon_process import cli_environment, run_cli
from tests.factories import Factory, Preset, minutes, seconds
from tests.integration.reconcile_support import pass_at, settings_for

NOW = datetime(2026, 12, 1, 4, 0, tzinfo=UTC)


async def test_each_pass_records_its_settings_with_since_when_and_by_whom(
    connection: asyncpg.Connection, pool: asyncpg.Pool, database_url: str
) -> None:
    assert await reads.read_recorded_settings(connection) is None
    settings = settings_for(database_url, backoff_interval="10s", failure_hard_limit="5")

    await pass_at(pool, settings, NOW)
    recorded = await reads.read_recorded_settings(connection)
    assert recorded is not None
    assert dict(recorded.values) == behaviour_values(settings)
    assert recorded.values["RECONCILER_BACKOFF_INTERVAL"] == "10s"
    assert recorded.values["RECONCILER_FAILURE_HARD_LIMIT"] == "5"
    assert (recorded.instance, recorded.recorded_at, recorded.last_pass_at) == (instance_name(), NOW, NOW)

    # The same settings again: they hold since the first pass; the latest pass moves.
    await pass_at(pool, settings, NOW + timedelta(minutes=1))
    recorded = await reads.read_recorded_settings(connection)
    assert recorded is not None
    assert (recorded.recorded_at, recorded.last_pass_at) == (NOW, NOW + timedelta(minutes=1))

    # Changed settings hold from the pass that used them first.
    changed = settings_for(database_url, backoff_interval="20s", failure_hard_limit="5")
    await pass_at(pool, changed, NOW + timedelta(minutes=2))
    recorded = await reads.read_recorded_settings(connection)
    assert recorded is not None
    assert recorded.values["RECONCILER_BACKOFF_INTERVAL"] == "20s"
    assert (recorded.recorded_at, recorded.last_pass_at) == (NOW + timedelta(minutes=2), NOW + timedelta(minutes=2))
    assert await connection.fetchval("select count(*) from reconciler_settings") == 1


async def test_another_instance_takes_the_record_over(connection: asyncpg.Connection, database_url: str) -> None:
    values = behaviour_values(settings_for(database_url))
    await writes.record_settings(connection, values, "replica-a:1", NOW)
    await writes.record_settings(connection, values, "replica-b:2", NOW + timedelta(minutes=1))
    recorded = await reads.read_recorded_settings(connection)
    assert recorded is not None
    assert (recorded.instance, recorded.recorded_at) == ("replica-b:2", NOW + timedelta(minutes=1))
    assert json.loads(await connection.fetchval("select settings::text from reconciler_settings")) == values


async def test_a_paused_pass_records_nothing(
    connection: asyncpg.Connection, pool: asyncpg.Pool, database_url: str
) -> None:
    """Paused, the daemon writes nothing (issue 11.5), this record included: the last one stays."""
    await pass_at(pool, settings_for(database_url, backoff_interval="10s"), NOW)
    await writes.write_paused(connection, True)
    result = await run_pass(pool, settings_for(database_url, backoff_interval="20s"), NOW + timedelta(minutes=1))
    assert result.outcome is PassOutcome.PAUSED
    recorded = await reads.read_recorded_settings(connection)
    assert recorded is not None
    assert recorded.values["RECONCILER_BACKOFF_INTERVAL"] == "10s"
    assert recorded.last_pass_at == NOW


async def read_only_command(database_url: str, *arguments: str, **environment: str) -> subprocess.CompletedProcess[str]:
    """A read-only command as people run it: the console entry point, in a subprocess, with `environment`."""
    process = await asyncio.to_thread(run_cli, *arguments, environment=cli_environment(database_url, **environment))
    assert process.returncode == 0, process.stderr
    return process


def preset_entry(document: dict[str, Any], preset: Preset) -> dict[str, Any]:
    entries: list[dict[str, Any]] = [entry for entry in document["presets"] if entry["preset_id"] == str(preset.id)]
    assert len(entries) == 1
    return entries[0]


async def test_plan_and_status_use_the_daemons_settings_and_warn_about_the_callers(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    """The demo's case (issue 11.3): a daemon with a 10 s backoff, a caller whose environment says 1 h."""
    preset = await factory.preset(desired=1)
    failed_at = factory.now - minutes(5)
    await factory.prebuild(preset, status="failed", created_at=failed_at)
    # The daemon's pass, within its 10 s backoff: it creates nothing, and records its settings.
    daemon = settings_for(database_url, backoff_interval="10s")
    result = await pass_at(pool, daemon, failed_at + seconds(5))
    assert result.execution is not None
    assert result.execution.created == 0
    caller = {"RECONCILER_BACKOFF_INTERVAL": "1h"}
    warning = (
        "reconciler: warning: your environment sets RECONCILER_BACKOFF_INTERVAL=1h, but the daemon uses 10s; "
        "shown with the daemon's (--settings=environment to use yours)"
    )

    # By default, the daemon's 10 s: its backoff ended long ago, and a pass would create.
    status = await read_only_command(database_url, "status", "--json", **caller)
    document = json.loads(status.stdout)
    assert preset_entry(document, preset)["backoff_until"] is None
    assert document["settings"]["source"] == "recorded"
    assert document["settings"]["values"]["RECONCILER_BACKOFF_INTERVAL"] == "10s"
    assert document["settings"]["recorded_by"] == instance_name()
    assert datetime.fromisoformat(document["settings"]["last_pass_at"]) == failed_at + seconds(5)
    # That pass was 5 minutes ago, with a 1 minute interval: said, since the daemon may have moved on.
    assert document["settings"]["stale"] is True
    assert "reconciler: warning: the daemon's latest recorded pass was at" in status.stderr
    assert f"reconciler: settings: the daemon's, recorded by {instance_name()}" in status.stderr
    assert warning in status.stderr.splitlines()
    plan = await read_only_command(database_url, "plan", "--json", **caller)
    assert preset_entry(json.loads(plan.stdout), preset)["actions"] == [{"type": "create", "count": 1}]
    assert warning in plan.stderr.splitlines()
    table = await read_only_command(database_url, "status", **caller)
    assert warning in table.stderr.splitlines()
    assert "settings:" not in table.stdout

    # Asked, the caller's 1 h: the preset is still backing off.
    mine = await read_only_command(database_url, "status", "--json", "--settings=environment", **caller)
    document = json.loads(mine.stdout)
    assert datetime.fromisoformat(preset_entry(document, preset)["backoff_until"]) == failed_at + timedelta(hours=1)
    assert document["settings"]["source"] == "environment"
    assert document["settings"]["differences"] == [
        {
            "variable": "RECONCILER_BACKOFF_INTERVAL",
            "recorded": "10s",
            "environment": "1h",
            "set_in_environment": True,
        }
    ]
    assert "reconciler: settings: your environment's (--settings=environment)" in mine.stderr
    assert "uses RECONCILER_BACKOFF_INTERVAL=10s, not your 1h" in mine.stderr


async def test_with_nothing_recorded_the_callers_settings_are_used_and_it_says_so(
    factory: Factory, database_url: str
) -> None:
    preset = await factory.preset(desired=1)
    failed_at = factory.now - minutes(5)
    await factory.prebuild(preset, status="failed", created_at=failed_at)
    status = await read_only_command(database_url, "status", "--json", RECONCILER_BACKOFF_INTERVAL="1h")
    document = json.loads(status.stdout)
    assert datetime.fromisoformat(preset_entry(document, preset)["backoff_until"]) == failed_at + timedelta(hours=1)
    assert document["settings"]["source"] == "environment"
    assert document["settings"]["recorded_by"] is None
    assert "no daemon has recorded settings in this database yet" in status.stderr
