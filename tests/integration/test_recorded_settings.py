"""The daemon records the behaviour settings its passes use (issue 11 point 3), on a real database."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg

from reconciler.config import behaviour_values
from reconciler.reconcile import PassOutcome, run_pass
from reconciler.recorded_settings import instance_name
from reconciler.store import reads, writes
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
