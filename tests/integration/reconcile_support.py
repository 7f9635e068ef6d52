"""Helpers shared by the rule tests: settings, a pool, read-only plans, real passes, and row checks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from uuid import UUID

import asyncpg

from reconciler import db, reconcile
from reconciler.config import Settings, load_settings
from reconciler.memberships import ensure_prebuilds_memberships
from reconciler.plan import Plan, PresetPlan
from reconciler.reconcile import PassOutcome, PassResult, run_pass, snapshot_parameters
from reconciler.snapshot import Snapshot
from reconciler.store import reads
from tests.factories import Preset, Workspace


def settings_for(database_url: str, **overrides: str) -> Settings:
    """Settings as the daemon would read them; `failure_hard_limit="0"` sets RECONCILER_FAILURE_HARD_LIMIT."""
    environ = {"RECONCILER_DATABASE_URL": database_url}
    environ.update({f"RECONCILER_{name.upper()}": value for name, value in overrides.items()})
    return load_settings(environ)


@asynccontextmanager
async def open_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(database_url, max_size=12)
    try:
        yield pool
    finally:
        await pool.close()


async def read_snapshot(connection: asyncpg.Connection, settings: Settings, now: datetime) -> Snapshot:
    """The snapshot a pass at `now` would read, in the same kind of transaction; writes nothing."""
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        return await reads.read_snapshot(connection, snapshot_parameters(settings, now))


async def read_plan(connection: asyncpg.Connection, settings: Settings, now: datetime) -> Plan:
    """What a pass at `now` would decide (status changes included, none written); writes nothing."""
    return await reconcile.read_plan(connection, settings, now)


def plan_of(plan: Plan, preset: Preset) -> PresetPlan:
    matches = [preset_plan for preset_plan in plan.presets if preset_plan.preset.id == preset.id]
    assert len(matches) == 1, f"preset {preset.name} appears {len(matches)} times in the plan"
    return matches[0]


async def pass_at(pool: asyncpg.Pool, settings: Settings, now: datetime) -> PassResult:
    """A real pass that must succeed, with no preset failing."""
    result = await run_pass(pool, settings, now)
    assert result.outcome is PassOutcome.SUCCESS, result.error
    assert result.execution is not None
    assert result.execution.presets_failed == 0
    return result


def ids(*workspaces: Workspace) -> tuple[UUID, ...]:
    return tuple(workspace.id for workspace in workspaces)


async def builds_of(connection: asyncpg.Connection, workspace_id: UUID) -> list[asyncpg.Record]:
    """Every build of a workspace with its job, oldest first."""
    return await connection.fetch(
        """
        select b.id, b.build_number, b.transition::text as transition, b.template_version_id,
               b.template_version_preset_id, b.initiator_id, b.reason::text as reason, b.created_at,
               j.id as job_id, j.job_status::text as job_status, j.type as job_type, j.initiator_id as job_initiator_id,
               j.organization_id as job_organization_id, j.input, j.worker_id, j.started_at, j.canceled_at,
               j.completed_at
        from workspace_builds b
        join provisioner_jobs j on j.id = b.job_id
        where b.workspace_id = $1
        order by b.build_number
        """,
        workspace_id,
    )


async def workspace_row(connection: asyncpg.Connection, workspace_id: UUID) -> asyncpg.Record:
    row = await connection.fetchrow("select * from workspaces where id = $1", workspace_id)
    assert row is not None
    return row


async def preset_row(connection: asyncpg.Connection, preset: Preset) -> asyncpg.Record:
    row = await connection.fetchrow(
        "select prebuild_status::text as prebuild_status, prebuild_status_changed_at, failure_episode, "
        "desired_instances from template_version_presets where id = $1",
        preset.id,
    )
    assert row is not None
    return row


async def prebuild_workspaces(connection: asyncpg.Connection, preset: Preset) -> list[asyncpg.Record]:
    """Workspaces whose first build names `preset`, oldest first."""
    return await connection.fetch(
        "select w.* from workspaces w join workspace_builds b on b.workspace_id = w.id and b.build_number = 1 "
        "where b.template_version_preset_id = $1 order by w.created_at, w.id",
        preset.id,
    )


# What every pass that holds the lock writes about itself (its settings, for the read-only commands), whatever
# its rules decide: a test that a rule writes nothing leaves it out.
PASS_BOOKKEEPING = ("reconciler_settings",)


async def complete_memberships(connection: asyncpg.Connection) -> None:
    """Add the prebuilds user's memberships now, as a pass would, so that a test of what a pass writes
    (nothing, in backoff or at the hard limit) sees only what the rule under test writes."""
    outcome = await ensure_prebuilds_memberships(connection)
    assert outcome.failures == ()


async def table_checksums(connection: asyncpg.Connection, skip: Sequence[str] = ()) -> dict[str, str]:
    """An md5 of every row of every table of the public schema, by table."""
    tables = await connection.fetch(
        "select tablename from pg_tables where schemaname = 'public' order by tablename",
    )
    checksums: dict[str, str] = {}
    for row in tables:
        name = row["tablename"]
        if name in skip:
            continue
        quoted = '"' + name.replace('"', '""') + '"'
        checksums[name] = await connection.fetchval(
            f"select md5(coalesce(string_agg(t::text, ',' order by t::text), '')) || ':' || count(*) from {quoted} t"
        )
    return checksums


async def live_prebuilds(connection: asyncpg.Connection) -> dict[UUID, int]:
    """Live (not deleted) prebuilds per preset, by their first build: what the fault tests count."""
    rows = await connection.fetch(
        "select b.template_version_preset_id as preset_id, count(*) as count from workspaces w "
        "join workspace_builds b on b.workspace_id = w.id and b.build_number = 1 "
        "where not w.deleted group by 1"
    )
    return {row["preset_id"]: row["count"] for row in rows}


async def wait_until_blocked_by(watcher: asyncpg.Connection, blocker_pid: int, task: asyncio.Task[object]) -> None:
    """Return once some backend waits for a lock that `blocker_pid` holds (e.g. `task`'s create, on the
    preset's row that the test's "platform" locked). Fails if `task` ends first or nothing waits in 60 s."""
    deadline = time.monotonic() + 60
    while not await watcher.fetchval(
        "select exists (select 1 from pg_stat_activity where $1 = any(pg_blocking_pids(pid)))", blocker_pid
    ):
        assert not task.done(), f"the task ended without waiting for the lock: {task.result()!r}"
        assert time.monotonic() < deadline, "nothing waited for the lock within 60 s"
        await asyncio.sleep(0.01)
