"""Three `reconciler run` replicas against one database (issue 4): one pass at a time, and a take-over.

A fleet, the simulated provisioner completing jobs (10% fail), targets changed at random while the
replicas run, an invariant checker sampling the database; then the replica holding the lock is killed
with SIGKILL in the middle of a create, and another one must take over within a couple of intervals.
"""

from __future__ import annotations

import asyncio
import random
import time
from uuid import UUID

import asyncpg

from reconciler import db
from reconciler.demo.simulated_provisioner import ProvisionerOptions, SimulatedProvisioner
from tests.acceptance.daemon_process import DaemonProcess, wait_for
from tests.factories import Factory
from tests.soak.invariants import (
    FleetChecker,
    lock_holder_client_ports,
    overlapping_passes,
    pass_windows,
    process_owning_local_port,
)

INTERVAL_SECONDS = 1.0
# Creates of presets listed in `test_held_presets` wait inside their build insert while the test holds
# this advisory lock (shared, so creates never wait for each other otherwise). Every create of the
# system user also takes a little time, as on a loaded database, so that passes last long enough for
# the replicas' ticks to collide.
HOLD_KEY = 4242
SLOW_AND_HOLDABLE_CREATES = """
create table test_held_presets (preset_id uuid primary key);
create function test_slow_creates() returns trigger language plpgsql as $$
begin
    if new.initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' then
        perform pg_sleep(0.02);
    end if;
    if exists (select 1 from test_held_presets where preset_id = new.template_version_preset_id) then
        perform pg_advisory_xact_lock_shared(4242);
    end if;
    return new;
end $$;
create trigger test_slow_creates before insert on workspace_builds
    for each row execute function test_slow_creates();
"""
SET_DESIRED = "update template_version_presets set desired_instances = $2 where id = $1"


def metric(replica: DaemonProcess, name: str, **labels: str) -> float:
    return replica.metric(name, labels) or 0


def passes(replica: DaemonProcess, outcome: str) -> float:
    return metric(replica, "prebuilds_reconciler_passes_total", outcome=outcome)


async def churn(
    platform: asyncpg.Connection,
    checker: FleetChecker,
    preset_ids: list[UUID],
    chooser: random.Random,
    seconds: float,
) -> int:
    """Sample the invariants every 0.2 s, and change a random preset's target every second."""
    changes = 0
    deadline = time.monotonic() + seconds
    next_change = time.monotonic()
    while time.monotonic() < deadline:
        if time.monotonic() >= next_change:
            await checker.change_target(platform, chooser.choice(preset_ids), SET_DESIRED, chooser.randint(0, 4))
            changes += 1
            next_change += 1.0
        await checker.sample(platform)
        await asyncio.sleep(0.2)
    return changes


async def test_three_replicas_reconcile_one_pass_at_a_time_and_take_over_from_a_killed_one(
    factory: Factory, database_url: str, platform: asyncpg.Connection
) -> None:
    chooser = random.Random(4)
    targets = [chooser.randint(1, 3) for _ in range(8)]
    presets = [await factory.preset(desired=target) for target in targets]
    preset_ids = [preset.id for preset in presets]
    await platform.execute(SLOW_AND_HOLDABLE_CREATES)
    checker = FleetChecker()
    for preset in presets:
        await checker.change_target(platform, preset.id, "select $1::uuid")

    # Full passes only: this is about the pass lock between replicas (one full pass at a time, a take-over
    # from a replica killed while it holds it). Targeted passes run beside full ones by design, under
    # template locks, and would as often be the one caught in the held create
    # (tests/integration/test_pass_interleaving.py covers them).
    environment = {
        "RECONCILER_BACKOFF_INTERVAL": "1s",
        "RECONCILER_FAILURE_HARD_LIMIT": "0",
        "RECONCILER_EVENTS_ENABLED": "false",
    }
    replicas = {
        name: DaemonProcess(database_url, interval=f"{INTERVAL_SECONDS:g}s", extra_environment=environment)
        for name in ("a", "b", "c")
    }
    provisioner_pool = await db.create_pool(database_url, max_size=4, application_name="simulated-provisioner")
    provisioner = SimulatedProvisioner(
        provisioner_pool,
        ProvisionerOptions(failure_rate=0.1, min_seconds=0.2, max_seconds=1.5, poll_seconds=0.2),
        chooser=random.Random(5),
    )
    try:
        for replica in replicas.values():
            replica.start()
        for replica in replicas.values():
            replica.wait_ready()
        provisioner.start()

        # 1. Many passes under changing targets.
        changes = await churn(platform, checker, preset_ids, chooser, seconds=15)

        # 2. Freeze the replica that creates for a held preset, inside its create, and kill it.
        held = presets[0]
        await platform.execute("select pg_advisory_lock($1)", HOLD_KEY)
        await platform.execute("insert into test_held_presets values ($1)", held.id)
        current = checker.targets[held.id]
        await checker.change_target(platform, held.id, SET_DESIRED, current + 2)
        deadline = time.monotonic() + 30
        while not (ports := await lock_holder_client_ports(platform)) or not await platform.fetchval(
            "select count(*) > 0 from pg_stat_activity where datname = current_database() "
            "and application_name = 'reconciler' and wait_event_type = 'Lock' and wait_event = 'advisory'"
        ):
            assert time.monotonic() < deadline, "no replica ever blocked in the held preset's create"
            await checker.sample(platform)
            await asyncio.sleep(0.1)
        (port,) = ports
        pids = {replica.process.pid: name for name, replica in replicas.items() if replica.process is not None}
        holder_pid = process_owning_local_port(pids, port)
        assert holder_pid is not None, f"no replica owns the lock holder's client port {port}"
        active = replicas[pids[holder_pid]]
        survivors = [replica for replica in replicas.values() if replica is not active]
        # The others skip while the frozen replica holds the lock.
        skipped = [passes(replica, "skipped_lock") for replica in survivors]
        wait_for(
            lambda: all(
                passes(replica, "skipped_lock") > before for replica, before in zip(survivors, skipped, strict=True)
            ),
            10,
            "the other replicas to skip a pass",
        )
        successes_before = sum(passes(replica, "success") for replica in survivors)
        assert active.process is not None
        active.process.kill()
        assert active.wait(timeout=10) == -9
        killed_at = time.monotonic()
        await platform.execute("select pg_advisory_unlock($1)", HOLD_KEY)
        await platform.execute("delete from test_held_presets")
        wait_for(
            lambda: sum(passes(replica, "success") for replica in survivors) > successes_before,
            15,
            "another replica to take over",
        )
        take_over_seconds = time.monotonic() - killed_at
        print(f"take-over {take_over_seconds:.2f} s after kill -9 of replica {pids[holder_pid]}")
        assert take_over_seconds < 3 * INTERVAL_SECONDS + 2

        # 3. More passes with two replicas.
        changes += await churn(platform, checker, preset_ids, chooser, seconds=8)

        # 4. Calm: every preset reaches its target, and stays there.
        provisioner.options = ProvisionerOptions(failure_rate=0.0, min_seconds=0.2, max_seconds=1.0, poll_seconds=0.2)
        deadline = time.monotonic() + 40
        while (running := await checker.running(platform)) != {
            preset_id: checker.targets[preset_id] for preset_id in preset_ids
        }:
            assert time.monotonic() < deadline, (running, checker.targets)
            await checker.sample(platform)
            await asyncio.sleep(0.2)
        await checker.check_whole(platform)

        survivor_skips = sum(passes(replica, "skipped_lock") for replica in survivors)
        windows = [window for name, replica in replicas.items() for window in pass_windows(name, replica.events())]
    finally:
        await provisioner.stop()
        await provisioner_pool.close()
        for replica in replicas.values():
            replica.stop()

    assert checker.violations == []
    assert checker.checks >= 60
    assert changes >= 20
    # Every pass has its own run id, and no two replicas' passes overlap in time.
    assert len({window.run_id for window in windows}) == len(windows)
    assert overlapping_passes(windows) == []
    per_replica = {name: sum(1 for window in windows if window.replica == name) for name in replicas}
    assert all(count >= 3 for count in per_replica.values()), per_replica
    assert survivor_skips >= 2
    assert sum(window.created for window in windows) > 0
    print(
        f"passes per replica {per_replica}, lock skips of the survivors {survivor_skips:g}, "
        f"target changes {changes}, invariant checks {checker.checks}, peak surplus {checker.peak_surplus}"
    )
