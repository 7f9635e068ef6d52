import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from reconciler import db

CONTRACT_COLUMNS = {
    "organizations": {"id", "name", "created_at"},
    "users": {"id", "username", "email", "status", "rbac_roles", "deleted", "is_system", "created_at"},
    "organization_members": {"organization_id", "user_id", "roles"},
    "templates": {
        "id",
        "organization_id",
        "name",
        "active_version_id",
        "deleted",
        "deprecated",
        "created_at",
        "updated_at",
    },
    "template_versions": {"id", "template_id", "organization_id", "name", "created_at"},
    "template_version_presets": {
        "id",
        "template_version_id",
        "name",
        "desired_instances",
        "invalidate_after_secs",
        "scheduling_timezone",
        "prebuild_status",
        "last_invalidated_at",
        "created_at",
    },
    "template_version_preset_parameters": {"id", "template_version_preset_id", "name", "value"},
    "template_version_preset_prebuild_schedules": {"id", "preset_id", "cron_expression", "desired_instances"},
    "workspaces": {
        "id",
        "owner_id",
        "organization_id",
        "template_id",
        "name",
        "deleted",
        "created_at",
        "updated_at",
    },
    "workspace_builds": {
        "id",
        "workspace_id",
        "build_number",
        "transition",
        "template_version_id",
        "template_version_preset_id",
        "job_id",
        "initiator_id",
        "reason",
        "created_at",
    },
    "provisioner_jobs": {
        "id",
        "organization_id",
        "initiator_id",
        "type",
        "input",
        "worker_id",
        "created_at",
        "started_at",
        "canceled_at",
        "completed_at",
        "error",
        "error_code",
        "job_status",
    },
    "workspace_agents": {"id", "job_id", "name", "lifecycle_state", "parent_id", "deleted", "created_at"},
    "site_configs": {"key", "value"},
    "notification_templates": {"id", "name", "title_template", "body_template"},
    "notification_messages": {"id", "notification_template_id", "user_id", "payload", "status", "created_at"},
}

CONTRACT_ENUMS = {
    "provisioner_job_status": [
        "pending",
        "running",
        "succeeded",
        "canceling",
        "canceled",
        "failed",
        "unknown",
    ],
    "workspace_transition": ["start", "stop", "delete"],
    "build_reason": [
        "initiator",
        "autostart",
        "autostop",
        "dormancy",
        "failedstop",
        "autodelete",
        "dashboard",
        "cli",
    ],
    "prebuild_status": ["normal", "hard_limited", "validation_failed"],
    "workspace_agent_lifecycle_state": [
        "created",
        "starting",
        "start_timeout",
        "start_error",
        "ready",
        "shutting_down",
        "shutdown_timeout",
        "shutdown_error",
        "off",
    ],
}


async def test_fresh_apply_creates_every_contract_table_and_column(empty_database_url: str) -> None:
    connection = await db.connect(empty_database_url)
    try:
        applied = await db.migrate(connection)
        assert applied == [migration.version for migration in db.migrations()]
        for table, expected in CONTRACT_COLUMNS.items():
            rows = await connection.fetch(
                "select column_name from information_schema.columns where table_name = $1", table
            )
            assert expected <= {row["column_name"] for row in rows}, table
        for enum_name, labels in CONTRACT_ENUMS.items():
            found = await connection.fetchval(
                "select array_agg(enumlabel order by enumsortorder) from pg_enum "
                "join pg_type on pg_type.oid = enumtypid where typname = $1",
                enum_name,
            )
            assert found == labels
        system_user = await connection.fetchrow(
            "select username, is_system from users where id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'"
        )
        assert system_user is not None
        assert (system_user["username"], system_user["is_system"]) == ("prebuilds", True)
        template_name = await connection.fetchval(
            "select name from notification_templates where id = '414d9331-c1fc-4761-b40c-d1f4702279eb'"
        )
        assert template_name == "Prebuild Failure Limit Reached"
        assert await db.schema_is_current(connection) == (True, "")
    finally:
        await connection.close()


async def test_second_run_is_a_no_op(empty_database_url: str) -> None:
    connection = await db.connect(empty_database_url)
    try:
        await db.migrate(connection)
        before = await connection.fetch("select version, applied_at from reconciler_schema_migrations")
        assert await db.migrate(connection) == []
        after = await connection.fetch("select version, applied_at from reconciler_schema_migrations")
        assert before == after
    finally:
        await connection.close()


async def test_three_concurrent_runs_apply_each_migration_once(empty_database_url: str) -> None:
    connections = [await db.connect(empty_database_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(db.migrate(connection) for connection in connections))
        applied = sorted(version for result in results for version in result)
        assert applied == [migration.version for migration in db.migrations()]
        count = await connections[0].fetchval("select count(*) from reconciler_schema_migrations")
        assert count == len(db.migrations())
    finally:
        for connection in connections:
            await connection.close()


async def test_refuses_a_database_newer_than_the_code(empty_database_url: str) -> None:
    connection = await db.connect(empty_database_url)
    try:
        await db.migrate(connection)
        newer = len(db.migrations()) + 1
        await connection.execute(
            "insert into reconciler_schema_migrations (version, name, checksum) values ($1, 'future', 'x')",
            newer,
        )
        with pytest.raises(db.SchemaError, match=f"schema version {newer}, newer than this reconciler"):
            await db.migrate(connection)
        current, reason = await db.schema_is_current(connection)
        assert not current
        assert "newer" in reason
    finally:
        await connection.close()


async def test_unmigrated_database_is_reported_not_current(empty_database_url: str) -> None:
    connection = await db.connect(empty_database_url)
    try:
        current, reason = await db.schema_is_current(connection)
        assert not current
        assert "reconciler migrate" in reason
    finally:
        await connection.close()


async def test_failed_migration_rolls_back_and_is_not_recorded(
    empty_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = [
        *db.migrations(),
        db.Migration(len(db.migrations()) + 1, "broken", "create table t(); select 1/0;"),
    ]
    monkeypatch.setattr(db, "migrations", lambda: broken)
    connection = await db.connect(empty_database_url)
    try:
        with pytest.raises(asyncpg.DivisionByZeroError):
            await db.migrate(connection)
        versions = await connection.fetch("select version from reconciler_schema_migrations")
        assert [row["version"] for row in versions] == [migration.version for migration in broken[:-1]]
        assert await connection.fetchval("select to_regclass('t')") is None
    finally:
        await connection.close()


def test_query_files_parse_into_named_statements() -> None:
    parsed = db.parse_queries("-- name: first_one\nselect 1;\n\n-- name: second\nselect 2;\n", "x.sql")
    assert parsed == {"first_one": "select 1;", "second": "select 2;"}
    with pytest.raises(ValueError, match="no '-- name:'"):
        db.parse_queries("select 1", "y.sql")


# --- `reconciler migrate`, the real command ---------------------------------------------------------------


def migrate_command(database_url: str, **settings: str) -> subprocess.Popen[str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("RECONCILER_", "CODER_"))}
    environment |= {
        "RECONCILER_DATABASE_URL": database_url,
        "RECONCILER_LOG_FORMAT": "json",
        "RECONCILER_SECRETS_DIRECTORIES": "/nonexistent/reconciler-test-secrets",
        **settings,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "reconciler", "migrate"],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, stdout, stderr


async def test_three_migrate_processes_at_once_all_succeed_and_apply_each_migration_once(
    empty_database_url: str,
) -> None:
    processes = [migrate_command(empty_database_url) for _ in range(3)]
    results = await asyncio.gather(*(asyncio.to_thread(finish, process) for process in processes))
    assert [code for code, _, _ in results] == [0, 0, 0], results
    outputs = sorted(stdout.strip() for _, stdout, _ in results)
    everything = [migration.version for migration in db.migrations()]
    # One process applied everything; the others waited on the lock and found nothing left to do.
    assert outputs == [f"applied migrations {everything}", "schema is up to date", "schema is up to date"]
    connection = await db.connect(empty_database_url)
    try:
        rows = await connection.fetch("select version from reconciler_schema_migrations order by version")
        assert [row["version"] for row in rows] == everything
        assert await db.schema_is_current(connection) == (True, "")
    finally:
        await connection.close()


async def test_migrate_refuses_a_newer_database_with_exit_1_and_one_line(empty_database_url: str) -> None:
    connection = await db.connect(empty_database_url)
    try:
        await db.migrate(connection)
        newer = len(db.migrations()) + 1
        await connection.execute(
            "insert into reconciler_schema_migrations (version, name, checksum) values ($1, 'future', 'x')", newer
        )
    finally:
        await connection.close()
    code, stdout, stderr = await asyncio.to_thread(finish, migrate_command(empty_database_url))
    assert code == 1
    assert stdout == ""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("reconciler:")]
    assert len(lines) == 1, stderr
    assert f"schema version {newer}, newer than this reconciler" in lines[0]
    assert "upgrade the reconciler" in lines[0]


# --- `migrate` behind another one -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def migration_in_progress(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """Hold the migration lock, as a `reconciler migrate` running elsewhere does, until the block ends."""
    holder = await asyncpg.connect(database_url)
    try:
        await holder.execute("select pg_advisory_lock($1)", db.MIGRATIONS_LOCK_KEY)
        yield holder
    finally:
        await holder.close()


async def waiting_for_the_lock(connection: asyncpg.Connection, count: int, within: float = 60) -> None:
    """Until `count` sessions wait on the migration lock (each prints its notice before it waits)."""
    async with asyncio.timeout(within):
        # Polling is the point: the condition is about other processes' sessions.
        while (  # noqa: ASYNC110
            await connection.fetchval(
                "select count(*) from pg_locks where locktype = 'advisory' and not granted and objid = $1",
                db.MIGRATIONS_LOCK_KEY,
            )
            < count
        ):
            await asyncio.sleep(0.1)


async def test_migrate_behind_another_says_so_and_waits_past_the_lock_and_statement_timeouts(
    empty_database_url: str,
) -> None:
    # Held for 11 s: longer than the 10 s lock timeout of the daemon's connections, and than the
    # statement timeout set here, both of which used to cut the wait.
    async with migration_in_progress(empty_database_url) as holder:
        processes = [migrate_command(empty_database_url, RECONCILER_STATEMENT_TIMEOUT="2s") for _ in range(2)]
        await waiting_for_the_lock(holder, 2)
        await asyncio.sleep(11)
        assert [process.poll() for process in processes] == [None, None]
    results = await asyncio.gather(*(asyncio.to_thread(finish, process) for process in processes))
    assert [code for code, _, _ in results] == [0, 0], results
    everything = [migration.version for migration in db.migrations()]
    assert sorted(stdout.strip() for _, stdout, _ in results) == [
        f"applied migrations {everything}",
        "schema is up to date",
    ]
    for _, _, stderr in results:
        notices = [line for line in stderr.splitlines() if line.startswith("reconciler:")]
        assert len(notices) == 1, stderr
        assert "waiting for another migration to finish" in notices[0]
        assert "RECONCILER_MIGRATION_LOCK_TIMEOUT" in notices[0]
        assert "Traceback" not in stderr


async def test_migrate_gives_up_after_the_lock_timeout_with_one_line(empty_database_url: str) -> None:
    async with migration_in_progress(empty_database_url):
        started = time.monotonic()
        code, stdout, stderr = await asyncio.to_thread(
            finish, migrate_command(empty_database_url, RECONCILER_MIGRATION_LOCK_TIMEOUT="2s")
        )
        elapsed = time.monotonic() - started
    assert code == 1
    assert stdout == ""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("reconciler:")]
    assert len(lines) == 2, stderr
    assert "waiting for another migration to finish" in lines[0]
    assert "still running after 2s" in lines[1]
    assert "RECONCILER_MIGRATION_LOCK_TIMEOUT" in lines[1]
    assert elapsed >= 2
    connection = await asyncpg.connect(empty_database_url)
    try:
        assert await db.applied_versions(connection) == {}
    finally:
        await connection.close()


async def test_a_migration_is_not_cut_by_the_statement_timeout_of_passes(empty_database_url: str) -> None:
    connection = await db.connect(empty_database_url)
    try:
        assert await db.migrate(connection, up_to=1) == [1]
    finally:
        await connection.close()
    # Migration 2 alters notification_messages; a long reader of that table (4 s) makes it wait, longer
    # than the statement timeout of 1 s meant for passes.
    reader = await asyncpg.connect(empty_database_url)
    try:
        async with reader.transaction():
            await reader.execute("lock table notification_messages in access share mode")
            process = migrate_command(empty_database_url, RECONCILER_STATEMENT_TIMEOUT="1s")
            async with asyncio.timeout(60):
                while not await reader.fetchval(  # noqa: ASYNC110 - the waiter is another process
                    "select count(*) from pg_locks where relation = 'notification_messages'::regclass and not granted"
                ):
                    await asyncio.sleep(0.1)
            await asyncio.sleep(4)
    finally:
        await reader.close()
    code, stdout, stderr = await asyncio.to_thread(finish, process)
    assert code == 0, stderr
    assert stdout.strip() == f"applied migrations {[migration.version for migration in db.migrations()][1:]}"
