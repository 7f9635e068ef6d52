"""`reconciler run` under faults (issue 8): kill -9 of the active replica mid-pass, killed connections."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from tests.acceptance.daemon_process import DaemonProcess, wait_for
from tests.factories import Factory
from tests.integration.reconcile_support import live_prebuilds

# Only creates of the presets in this table wait for the test's advisory lock, inside the build insert:
# the create has written its workspace and job rows and is stopped before the statement (and its
# transaction) can finish. A shared lock, so that creates never wait for one another.
HOLD_CREATES = """
create table test_held_presets (preset_id uuid primary key);
create function test_hold_creates() returns trigger language plpgsql as $$
begin
    if exists (select 1 from test_held_presets where preset_id = new.template_version_preset_id) then
        perform pg_advisory_xact_lock_shared(4242);
    end if;
    return new;
end $$;
create trigger test_hold_creates before insert on workspace_builds
    for each row execute function test_hold_creates();
"""
HOLD_KEY = 4242


async def wait_for_blocked_create(connection: asyncpg.Connection, within: float = 30) -> None:
    """Until a daemon's backend waits for the test's advisory lock (see HOLD_CREATES)."""
    deadline = time.monotonic() + within
    while not await connection.fetchval(
        "select count(*) > 0 from pg_stat_activity where datname = current_database() "
        "and application_name = 'reconciler' and wait_event_type = 'Lock' and wait_event = 'advisory'"
    ):
        assert time.monotonic() < deadline, "the active replica's create never blocked"
        await asyncio.sleep(0.05)


async def assert_every_prebuild_whole(connection: asyncpg.Connection) -> None:
    counts = await connection.fetchrow(
        "select "
        "(select count(*) from workspaces w where not exists "
        "  (select 1 from workspace_builds b where b.workspace_id = w.id)) as without_build, "
        "(select count(*) from workspace_builds b where not exists "
        "  (select 1 from provisioner_jobs j where j.id = b.job_id)) as without_job, "
        "(select count(*) from provisioner_jobs j where not exists "
        "  (select 1 from workspace_builds b where b.job_id = j.id)) as job_without_build, "
        "(select count(*) from (select workspace_id from workspace_builds group by workspace_id "
        "  having count(*) <> 1) extra) as workspaces_with_other_than_one_build"
    )
    assert counts is not None
    assert dict(counts) == {
        "without_build": 0,
        "without_job": 0,
        "job_without_build": 0,
        "workspaces_with_other_than_one_build": 0,
    }


def passes(daemon: DaemonProcess, outcome: str) -> float:
    return daemon.metric("prebuilds_reconciler_passes_total", {"outcome": outcome}) or 0


async def test_kill_9_of_the_active_replica_mid_pass(
    factory: Factory, database_url: str, platform: asyncpg.Connection
) -> None:
    held = await factory.preset(desired=2)
    others = [await factory.preset(desired=1) for _ in range(3)]
    await platform.execute(HOLD_CREATES)
    await platform.execute("insert into test_held_presets values ($1)", held.id)
    await platform.execute("select pg_advisory_lock($1)", HOLD_KEY)
    active = DaemonProcess(database_url)
    standby = DaemonProcess(database_url)
    try:
        active.start().wait_ready()
        # The active replica is mid-pass: its create of the held preset waits inside the build insert.
        await wait_for_blocked_create(platform)
        standby.start().wait_ready()
        wait_for(lambda: passes(standby, "skipped_lock") >= 2, 30, "the standby to skip passes (the lock is held)")
        assert passes(standby, "success") == 0
        # The held preset's workspace and job rows are written, uncommitted: the worst moment to die.
        assert active.process is not None
        active.process.kill()
        assert active.wait(timeout=10) == -9
        killed_at = time.monotonic()
        # Let the dead replica's blocked statement finish: its server backend must then roll back.
        await platform.execute("select pg_advisory_unlock($1)", HOLD_KEY)

        wait_for(lambda: passes(standby, "success") >= 1, 30, "the standby to take over")
        took_over_after = time.monotonic() - killed_at
        print(f"the standby took over {took_over_after:.1f} s after kill -9")
        # Interval 1 s: a couple of intervals, plus the time the server takes to notice the dead client.
        assert took_over_after < 10, took_over_after

        async def converged() -> bool:
            return await live_prebuilds(platform) == {held.id: 2, **{preset.id: 1 for preset in others}}

        deadline = time.monotonic() + 30
        while not await converged():
            assert time.monotonic() < deadline, await live_prebuilds(platform)
            await asyncio.sleep(0.2)
        # A few more passes: nothing is created twice.
        wait_for(lambda: passes(standby, "success") >= 4, 30, "more passes")
        assert await converged()
        await assert_every_prebuild_whole(platform)
        created_by_standby = sum(
            event.get("created", 0)
            for event in standby.events()
            if event.get("event") == "reconcile.pass" and event.get("outcome") == "success"
        )
        created_by_active = sum(
            event.get("created", 0)
            for event in active.events()
            if event.get("event") == "reconcile.pass" and event.get("outcome") == "success"
        )
        # The dead replica never finished a pass; everything live was created by one of the two.
        assert created_by_active == 0
        assert created_by_standby >= 2
    finally:
        active.stop()
        standby.stop()


async def test_daemon_survives_its_connections_being_terminated(
    factory: Factory, database_url: str, platform: asyncpg.Connection
) -> None:
    preset = await factory.preset(desired=1)
    daemon = DaemonProcess(database_url)
    try:
        daemon.start().wait_ready()
        wait_for(lambda: passes(daemon, "success") >= 1, 30, "a first pass")
        for _ in range(3):
            await platform.fetchval(
                "select count(*) filter (where pg_terminate_backend(pid)) from pg_stat_activity "
                "where datname = current_database() and application_name = 'reconciler' "
                "and pid <> $1",
                factory.connection.get_server_pid(),
            )
            await asyncio.sleep(0.5)
        await platform.execute("update template_version_presets set desired_instances = 3 where id = $1", preset.id)
        successes = passes(daemon, "success")
        wait_for(lambda: passes(daemon, "success") >= successes + 2, 30, "passes to succeed again")
        assert daemon.process is not None
        assert daemon.process.poll() is None
        wait_for(daemon.is_ready, 30, "/readyz to answer 200")

        async def created() -> bool:
            return await live_prebuilds(platform) == {preset.id: 3}

        deadline = time.monotonic() + 30
        while not await created():
            assert time.monotonic() < deadline, await live_prebuilds(platform)
            await asyncio.sleep(0.2)
        await assert_every_prebuild_whole(platform)
        assert not [event for event in daemon.events() if "Traceback" in str(event)]
    finally:
        daemon.stop()
