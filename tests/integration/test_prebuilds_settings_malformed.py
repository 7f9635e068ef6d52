"""A malformed `prebuilds_settings` is neither obeyed as "not paused" nor silent (issue 12.6)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from reconciler.reconcile import PassOutcome, run_pass
from reconciler.sdnotify import SystemdNotifier
from reconciler.service import Daemon
from tests.acceptance.daemon_process import cli_environment, run_cli
from tests.factories import Factory
from tests.integration.reconcile_support import settings_for

MALFORMED = "prebuilds_reconciler_settings_malformed"


async def store(connection: asyncpg.Connection, value: str) -> None:
    await connection.execute(
        "insert into site_configs (key, value) values ('prebuilds_settings', $1) "
        "on conflict (key) do update set value = excluded.value",
        value,
    )


async def live_prebuilds(connection: asyncpg.Connection) -> int:
    return int(await connection.fetchval("select count(*) from workspaces where not deleted"))


@asynccontextmanager
async def started_daemon(database_url: str) -> AsyncIterator[Daemon]:
    """A daemon whose scheduled passes come once an hour: after its start-up pass, the test runs them (and
    only the test: change events, which a write of the setting would start a pass for, are off)."""
    settings = settings_for(
        database_url, http_address="127.0.0.1:0", reconciliation_interval="1h", events_enabled="false"
    )
    daemon = Daemon(settings, registry=CollectorRegistry(), notifier=SystemdNotifier({}))
    first_pass = asyncio.Event()
    daemon.pass_listeners.append(lambda _result: first_pass.set())
    await daemon.start()
    try:
        await asyncio.wait_for(first_pass.wait(), timeout=60)
        yield daemon
    finally:
        await daemon.stop()


@pytest.mark.parametrize("value", ['{"reconciliation_paused": "true"}', '{"reconciliation_paused": "Yes"}'])
async def test_an_obvious_spelling_of_true_pauses(
    factory: Factory, pool: asyncpg.Pool, database_url: str, value: str
) -> None:
    """Before: `"true"` (a string) was read as not paused, and the pass created prebuilds."""
    await factory.preset(desired=2)
    await store(factory.connection, value)

    result = await run_pass(pool, settings_for(database_url), datetime.now(UTC))

    assert result.outcome is PassOutcome.PAUSED, result.error
    assert await live_prebuilds(factory.connection) == 0


async def test_malformed_at_start_up_nothing_is_reconciled_until_it_is_readable(
    factory: Factory, database_url: str
) -> None:
    await factory.preset(desired=2)
    await store(factory.connection, '{"reconciliation_paused": tru')
    with capture_logs() as events:
        async with started_daemon(database_url) as daemon:
            assert daemon.last_pass is not None
            assert daemon.last_pass.outcome is PassOutcome.FAILED
            assert "prebuilds_settings is malformed" in (daemon.last_pass.error or "")
            assert daemon.metrics.registry.get_sample_value(MALFORMED) == 1
            assert (await daemon.run_pass_now()).outcome is PassOutcome.FAILED
            assert await live_prebuilds(factory.connection) == 0

            await store(factory.connection, '{"reconciliation_paused": false}')
            assert (await daemon.run_pass_now()).outcome is PassOutcome.SUCCESS
            assert daemon.metrics.registry.get_sample_value(MALFORMED) == 0
            assert await live_prebuilds(factory.connection) == 2
            # A malformed setting is not a database error.
            assert daemon.metrics.registry.get_sample_value("prebuilds_reconciler_database_errors_total") == 0

    malformed = [event for event in events if event["event"] == "prebuilds_settings.malformed"]
    assert len(malformed) == 2  # every pass while it lasts
    assert {event["log_level"] for event in malformed} == {"error"}
    assert malformed[0]["detail"].startswith("not JSON")
    assert malformed[0]["acting_on"] == "nothing read yet: not reconciling until it is readable"


async def test_malformed_later_the_last_value_read_stands(factory: Factory, database_url: str) -> None:
    """Paused, then an operator writes `"perhaps"`: the daemon stays paused, says so every pass."""
    await factory.preset(desired=2)
    await store(factory.connection, '{"reconciliation_paused": true}')
    with capture_logs() as events:
        async with started_daemon(database_url) as daemon:
            assert daemon.last_pass is not None
            assert daemon.last_pass.outcome is PassOutcome.PAUSED
            await store(factory.connection, '{"reconciliation_paused": "perhaps"}')
            for _ in range(2):
                assert (await daemon.run_pass_now()).outcome is PassOutcome.PAUSED
            assert daemon.metrics.registry.get_sample_value(MALFORMED) == 1
            assert await live_prebuilds(factory.connection) == 0

    malformed = [event for event in events if event["event"] == "prebuilds_settings.malformed"]
    assert len(malformed) == 2
    assert malformed[0]["detail"] == 'reconciliation_paused is "perhaps": expected true or false'
    assert malformed[0]["acting_on"] == "the last value read successfully: paused"


async def test_the_read_only_commands_say_so_and_go_on(factory: Factory, database_url: str) -> None:
    preset = await factory.preset(desired=1)
    await store(factory.connection, '{"reconciliation_paused": "maybe"}')
    environment = cli_environment(database_url)
    for command in (("status",), ("plan", "--json"), ("presets", "describe", str(preset.id))):
        completed = await asyncio.to_thread(run_cli, *command, environment=environment)
        assert completed.returncode == 0, (command, completed.stderr)
        assert 'prebuilds_settings is malformed: reconciliation_paused is "maybe"' in completed.stderr, command
        assert "Traceback" not in completed.stderr
