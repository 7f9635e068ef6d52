"""`reconciler simulate-provisioner` as people run it against a database of theirs."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import asyncpg

from tests.acceptance.daemon_process import cli_environment, run_cli
from tests.factories import Factory


async def test_completes_pending_jobs_and_stops_after_its_duration(
    factory: Factory, connection: asyncpg.Connection, database_url: str
) -> None:
    await factory.created_prebuilds(await factory.preset(desired=3), 3)
    arguments = ("--duration", "3", "--min-seconds", "0", "--max-seconds", "0.2", "--failure-rate", "0")

    result = await asyncio.to_thread(
        run_cli, "simulate-provisioner", *arguments, environment=cli_environment(database_url), timeout=30
    )

    assert result.returncode == 0, result.stderr
    assert await factory.job_statuses() == {"succeeded": 3}
    assert await connection.fetchval("select count(*) from workspace_agents where lifecycle_state = 'ready'") == 3
    # It says what it is, in its log: a test tool.
    assert "never use it in production" in result.stderr


async def test_sigterm_puts_jobs_in_flight_back(
    factory: Factory, connection: asyncpg.Connection, database_url: str
) -> None:
    await factory.created_prebuilds(await factory.preset(desired=2), 2)
    process = subprocess.Popen(  # noqa: ASYNC220 - Popen returns at once; waiting happens off the loop
        [sys.executable, "-m", "reconciler", "simulate-provisioner", "--min-seconds", "60", "--max-seconds", "60"],
        env=cli_environment(database_url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(150):
            if (await factory.job_statuses()).get("running") == 2:
                break
            await asyncio.sleep(0.1)
        assert await factory.job_statuses() == {"running": 2}
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert await factory.job_statuses() == {"pending": 2}


async def test_a_database_without_schema_is_refused(empty_database_url: str) -> None:
    result = await asyncio.to_thread(
        run_cli, "simulate-provisioner", "--duration", "1", environment=cli_environment(empty_database_url)
    )
    assert result.returncode == 1
    assert "reconciler migrate" in result.stderr


async def test_bad_options_are_usage_errors(database_url: str) -> None:
    result = await asyncio.to_thread(
        run_cli,
        "simulate-provisioner",
        "--min-seconds",
        "5",
        "--max-seconds",
        "1",
        environment=cli_environment(database_url),
    )
    assert result.returncode == 2
    assert "min seconds" in result.stderr
