"""The simulated provisioner and the demo's platform writes, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from reconciler.demo import platform
from reconciler.demo.simulated_provisioner import ProvisionerOptions, SimulatedProvisioner, decide_outcome
from reconciler.snapshot import PREBUILDS_SYSTEM_USER_ID
from reconciler.store import writes
from tests.factories import Factory

INSTANT = ProvisionerOptions(min_seconds=0, max_seconds=0)


async def test_success_makes_a_ready_agent_and_the_prebuild_running(
    factory: Factory, connection: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    preset = await factory.preset(desired=2)
    workspace_ids = await factory.created_prebuilds(preset, 2)
    provisioner = SimulatedProvisioner(pool, INSTANT)

    results = await provisioner.run_once()

    assert len(results) == 2
    assert all(result.succeeded and result.error is None for result in results)
    assert await factory.job_statuses() == {"succeeded": 2}
    agents = await connection.fetch(
        "select a.lifecycle_state::text as state, b.workspace_id, j.worker_id from workspace_agents a "
        "join workspace_builds b on b.job_id = a.job_id join provisioner_jobs j on j.id = a.job_id"
    )
    assert sorted(agent["workspace_id"] for agent in agents) == sorted(workspace_ids)
    assert {agent["state"] for agent in agents} == {"ready"}
    assert {agent["worker_id"] for agent in agents} == {provisioner.worker_id}
    assert provisioner.stats.succeeded == 2
    # Nothing is left to take.
    assert await provisioner.run_once() == []


async def test_always_failing_preset_fails_with_a_message_and_its_code(
    factory: Factory, connection: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    broken = await factory.preset(desired=1)
    await platform.add_preset_parameter(connection, broken.id, "simulated_failure", "always")
    await platform.add_preset_parameter(connection, broken.id, "simulated_error_code", "REQUIRED_TEMPLATE_VARIABLES")
    await factory.created_prebuilds(broken, 1)

    [result] = await SimulatedProvisioner(pool, INSTANT).run_once()

    assert not result.succeeded
    assert result.error is not None
    assert "broken" in result.error
    job = await connection.fetchrow("select job_status::text, error, error_code from provisioner_jobs")
    assert job is not None
    assert job["job_status"] == "failed"
    assert job["error"] == result.error
    assert job["error_code"] == "REQUIRED_TEMPLATE_VARIABLES"
    assert await connection.fetchval("select count(*) from workspace_agents") == 0


async def test_failure_rate_one_fails_every_start(
    factory: Factory, connection: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    preset = await factory.preset(desired=3)
    await factory.created_prebuilds(preset, 3)
    options = ProvisionerOptions(failure_rate=1.0, min_seconds=0, max_seconds=0)

    results = await SimulatedProvisioner(pool, options).run_once()

    assert [result.succeeded for result in results] == [False, False, False]
    assert await factory.job_statuses() == {"failed": 3}


async def test_delete_build_marks_the_workspace_deleted(
    factory: Factory, connection: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    preset = await factory.preset(desired=1)
    [workspace_id] = await factory.created_prebuilds(preset, 1)
    provisioner = SimulatedProvisioner(pool, INSTANT)
    await provisioner.run_once()
    assert await writes.delete_prebuilds(connection, [workspace_id], datetime.now(UTC)) == [workspace_id]

    # Deletes succeed even at a failure rate of 1: a failed delete would strand the workspace.
    provisioner.options = ProvisionerOptions(failure_rate=1.0, min_seconds=0, max_seconds=0)
    [result] = await provisioner.run_once()

    assert result.succeeded
    assert result.job.transition == "delete"
    assert await connection.fetchval("select deleted from workspaces where id = $1", workspace_id) is True


async def test_two_provisioners_never_take_the_same_job(
    factory: Factory, connection: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    preset = await factory.preset(desired=40)
    await factory.created_prebuilds(preset, 40)
    first = SimulatedProvisioner(pool, INSTANT)
    second = SimulatedProvisioner(pool, INSTANT)

    async def take(provisioner: SimulatedProvisioner) -> list[platform.AcquiredJob]:
        taken: list[platform.AcquiredJob] = []
        async with pool.acquire() as own:
            for _ in range(10):
                taken += await platform.acquire_provisioner_jobs(own, provisioner.worker_id, datetime.now(UTC), 3)
        return taken

    first_jobs, second_jobs = await asyncio.gather(take(first), take(second))

    first_ids = {job.job_id for job in first_jobs}
    second_ids = {job.job_id for job in second_jobs}
    assert not first_ids & second_ids
    assert len(first_ids) + len(second_ids) == 40 == len(first_jobs) + len(second_jobs)
    workers = await connection.fetch("select worker_id, count(*) from provisioner_jobs group by 1")
    assert {row["worker_id"]: row["count"] for row in workers} == {
        first.worker_id: len(first_ids),
        second.worker_id: len(second_ids),
    }


async def test_a_job_locked_by_another_is_skipped_not_waited_for(
    factory: Factory, connection: asyncpg.Connection, pool: asyncpg.Pool, database_url: str
) -> None:
    preset = await factory.preset(desired=2)
    await factory.created_prebuilds(preset, 2)
    holder = await asyncpg.connect(database_url)
    try:
        transaction = holder.transaction()
        await transaction.start()
        locked = await holder.fetchval("select id from provisioner_jobs order by created_at, id limit 1 for update")
        async with pool.acquire() as own:
            taken = await asyncio.wait_for(
                platform.acquire_provisioner_jobs(own, uuid.uuid4(), datetime.now(UTC), 10), timeout=5
            )
        await transaction.rollback()
    finally:
        await holder.close()
    assert len(taken) == 1
    assert taken[0].job_id != locked


async def test_stop_puts_unfinished_jobs_back_in_the_queue(
    factory: Factory, connection: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    preset = await factory.preset(desired=3)
    await factory.created_prebuilds(preset, 3)
    provisioner = SimulatedProvisioner(
        pool, ProvisionerOptions(min_seconds=60, max_seconds=60, poll_seconds=0.05, concurrency=2)
    )
    provisioner.start()
    for _ in range(100):
        if (await factory.job_statuses()).get("running") == 2:
            break
        await asyncio.sleep(0.05)
    assert await factory.job_statuses() == {"running": 2, "pending": 1}

    await provisioner.stop()
    await provisioner.stop()  # idempotent

    assert await factory.job_statuses() == {"pending": 3}
    assert provisioner.stats.released == 2
    assert await connection.fetchval("select count(*) from provisioner_jobs where worker_id is not null") == 0


async def test_the_loop_runs_jobs_to_completion(
    factory: Factory, connection: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    preset = await factory.preset(desired=5)
    await factory.created_prebuilds(preset, 5)
    provisioner = SimulatedProvisioner(
        pool, ProvisionerOptions(min_seconds=0.05, max_seconds=0.2, poll_seconds=0.05, concurrency=2)
    )
    completed: list[bool] = []
    provisioner.listeners.append(lambda result: completed.append(result.succeeded))
    provisioner.start()
    try:
        for _ in range(200):
            if len(completed) == 5:
                break
            await asyncio.sleep(0.05)
    finally:
        await provisioner.stop()
    assert completed == [True] * 5
    assert await factory.job_statuses() == {"succeeded": 5}


async def test_a_completion_the_database_refuses_is_retried(
    factory: Factory, connection: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    """A busy or failing server refuses one completion: the job is completed on a retry, not left running
    (found by the short soak, when the shared server ran out of connections: its preset never converged)."""
    preset = await factory.preset(desired=1)
    await factory.created_prebuilds(preset, 1)
    # The first completion of a job fails as a full disk would; a sequence, because it is not rolled back.
    await connection.execute(
        """
        create sequence test_completions;
        create function test_refuse_first_completion() returns trigger language plpgsql as $$
        begin
            if nextval('test_completions') = 1 then
                raise exception 'could not extend file: No space left on device' using errcode = '53100';
            end if;
            return new;
        end $$;
        create trigger test_refuse_first_completion before update on provisioner_jobs for each row
            when (old.completed_at is null and new.completed_at is not null)
            execute function test_refuse_first_completion();
        """
    )
    provisioner = SimulatedProvisioner(
        pool, ProvisionerOptions(min_seconds=0, max_seconds=0, poll_seconds=0.05, concurrency=1)
    )
    completed = asyncio.Event()
    provisioner.listeners.append(lambda result: completed.set())
    provisioner.start()
    try:
        await asyncio.wait_for(completed.wait(), timeout=30)
    finally:
        await provisioner.stop()
    assert await connection.fetchval("select last_value from test_completions") == 2
    assert await factory.job_statuses() == {"succeeded": 1}
    assert provisioner.stats.succeeded == 1


async def test_canceled_jobs_end_canceled(factory: Factory, connection: asyncpg.Connection, pool: asyncpg.Pool) -> None:
    preset = await factory.preset(desired=2)
    await factory.created_prebuilds(preset, 2)
    provisioner = SimulatedProvisioner(pool, INSTANT)
    async with pool.acquire() as own:
        [taken] = await platform.acquire_provisioner_jobs(own, provisioner.worker_id, datetime.now(UTC), 1)
    # The platform cancels both: the one nobody took and the one our worker is running.
    await connection.execute("update provisioner_jobs set canceled_at = now()")

    async with pool.acquire() as own:
        [untaken] = await platform.complete_canceling_jobs(own, datetime.now(UTC))
        completed = await platform.complete_provisioner_job(
            own, job_id=taken.job_id, worker_id=provisioner.worker_id, now=datetime.now(UTC), error="x", error_code=None
        )

    assert untaken != taken.job_id
    assert completed is not None
    assert completed.canceled
    assert not completed.succeeded
    assert await factory.job_statuses() == {"canceled": 2}
    assert await connection.fetchval("select count(*) from workspace_agents") == 0


async def test_another_workers_job_is_not_completed(
    factory: Factory, connection: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    preset = await factory.preset(desired=1)
    await factory.created_prebuilds(preset, 1)
    async with pool.acquire() as own:
        [taken] = await platform.acquire_provisioner_jobs(own, uuid.uuid4(), datetime.now(UTC), 1)
        completed = await platform.complete_provisioner_job(
            own, job_id=taken.job_id, worker_id=uuid.uuid4(), now=datetime.now(UTC), error=None, error_code=None
        )
    assert completed is None
    assert await factory.job_statuses() == {"running": 1}


async def test_seeding_and_publishing_a_version_copies_presets(connection: asyncpg.Connection) -> None:
    now = datetime.now(UTC)
    organization = await platform.create_organization(connection, "acme", now)
    admin = await platform.create_user(connection, "alice", "alice@example.test", ["template-admin"], now)
    await platform.add_organization_member(connection, organization, admin, ["organization-template-admin"], now)
    template = await platform.create_template(connection, organization, "go-backend", now)
    version = await platform.create_template_version(connection, template, "v1", now)
    preset = await platform.create_preset(
        connection,
        template_version_id=version,
        name="standard",
        desired_instances=2,
        invalidate_after_secs=600,
        scheduling_timezone="Europe/Berlin",
        now=now,
    )
    await platform.add_preset_parameter(connection, preset, "region", "eu-west")
    await platform.add_preset_schedule(connection, preset, "* 8-17 * * 1-5", 4)
    assert await connection.fetchval("select active_version_id from templates where id = $1", template) == version

    published = await platform.publish_template_version(connection, template, "v2", now)

    assert published is not None
    assert published != version
    assert await connection.fetchval("select active_version_id from templates where id = $1", template) == published
    copied = await connection.fetchrow(
        "select p.id, p.name, p.desired_instances, p.invalidate_after_secs, p.scheduling_timezone, "
        "pp.name as parameter, pp.value, s.cron_expression, s.desired_instances as scheduled "
        "from template_version_presets p "
        "join template_version_preset_parameters pp on pp.template_version_preset_id = p.id "
        "join template_version_preset_prebuild_schedules s on s.preset_id = p.id "
        "where p.template_version_id = $1",
        published,
    )
    assert copied is not None
    assert copied["id"] != preset
    assert (copied["name"], copied["desired_instances"], copied["invalidate_after_secs"]) == ("standard", 2, 600)
    assert copied["scheduling_timezone"] == "Europe/Berlin"
    assert (copied["parameter"], copied["value"]) == ("region", "eu-west")
    assert (copied["cron_expression"], copied["scheduled"]) == ("* 8-17 * * 1-5", 4)
    # The old version keeps its preset (now outdated).
    assert await connection.fetchval("select count(*) from template_version_presets") == 2


async def test_publishing_a_template_without_version_does_nothing(connection: asyncpg.Connection) -> None:
    now = datetime.now(UTC)
    organization = await platform.create_organization(connection, "acme", now)
    template = await platform.create_template(connection, organization, "empty", now)
    assert await platform.publish_template_version(connection, template, "v2", now) is None
    assert await connection.fetchval("select count(*) from template_versions") == 0


def test_outcomes_follow_parameters_and_rate() -> None:
    def job(transition: str = "start", failure: str = "") -> platform.AcquiredJob:
        return platform.AcquiredJob(
            job_id=uuid.uuid4(),
            build_id=uuid.uuid4(),
            workspace_id=uuid.uuid4(),
            build_number=1,
            transition=transition,
            template_version_id=uuid.uuid4(),
            preset_id=None,
            workspace_name="prebuild-x",
            template_name="t",
            preset_name=None,
            simulated_failure=failure,
            simulated_error_code="",
        )

    chooser = random.Random(7)
    never = ProvisionerOptions(failure_rate=0.0, min_seconds=1, max_seconds=3)
    always = ProvisionerOptions(failure_rate=1.0, min_seconds=1, max_seconds=3)
    assert all(decide_outcome(job(), never, chooser).error is None for _ in range(50))
    assert all(decide_outcome(job(), always, chooser).error for _ in range(50))
    assert all(decide_outcome(job("delete"), always, chooser).error is None for _ in range(50))
    broken = decide_outcome(job(failure="always"), never, chooser)
    assert broken.error
    assert broken.error_code is None
    assert broken.duration_seconds == 1
    assert all(1 <= decide_outcome(job(), never, chooser).duration_seconds <= 3 for _ in range(50))
    half = [decide_outcome(job(), ProvisionerOptions(failure_rate=0.5), chooser).error for _ in range(400)]
    assert 120 < sum(error is not None for error in half) < 280
    with pytest.raises(ValueError, match="failure rate"):
        ProvisionerOptions(failure_rate=1.5)
    with pytest.raises(ValueError, match="duration"):
        ProvisionerOptions(min_seconds=5, max_seconds=1)


async def test_prebuild_owner_is_untouched(
    factory: Factory, connection: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    """The provisioner completes jobs; it never changes who owns a workspace."""
    preset = await factory.preset(desired=1)
    [workspace_id] = await factory.created_prebuilds(preset, 1)
    await SimulatedProvisioner(pool, INSTANT).run_once()
    owner = await connection.fetchval("select owner_id from workspaces where id = $1", workspace_id)
    assert owner == PREBUILDS_SYSTEM_USER_ID


async def test_demo_seed_is_reused_and_abandoned_jobs_requeued(connection: asyncpg.Connection) -> None:
    from reconciler.demo.scenario import BROKEN_PRESET, HEALTHY_PRESETS, DemoOptions, seed_platform

    options = DemoOptions(presets=2)
    first = await seed_platform(connection, options, datetime.now(UTC))
    assert not first.reused
    assert first.publish_template_name == HEALTHY_PRESETS[0].template
    presets = await connection.fetch(
        "select t.name as template, p.name, p.desired_instances from template_version_presets p "
        "join template_versions v on v.id = p.template_version_id join templates t on t.id = v.template_id "
        "where t.active_version_id = v.id order by 1"
    )
    assert [(row["template"], row["name"]) for row in presets] == sorted(
        (seed.template, seed.preset) for seed in (*HEALTHY_PRESETS[:2], BROKEN_PRESET)
    )
    # A killed demo leaves a job running under a worker that no longer exists.
    preset_id = await connection.fetchval(
        "select p.id from template_version_presets p join template_versions v on v.id = p.template_version_id "
        "join templates t on t.id = v.template_id where t.name = $1",
        HEALTHY_PRESETS[0].template,
    )
    row = await connection.fetchrow(
        "select v.id as version, t.id as template, t.organization_id from templates t "
        "join template_versions v on v.id = t.active_version_id where t.name = $1",
        HEALTHY_PRESETS[0].template,
    )
    assert row is not None
    await writes.create_prebuilds(
        connection,
        preset_id=preset_id,
        template_version_id=row["version"],
        template_id=row["template"],
        organization_id=row["organization_id"],
        count=1,
        now=datetime.now(UTC),
    )
    await platform.acquire_provisioner_jobs(connection, uuid.uuid4(), datetime.now(UTC), 10)
    assert await Factory(connection).job_statuses() == {"running": 1}

    second = await seed_platform(connection, options, datetime.now(UTC))

    assert second.reused
    assert second.organization_id == first.organization_id
    assert second.publish_template_id == first.publish_template_id
    assert await Factory(connection).job_statuses() == {"pending": 1}
    assert await connection.fetchval("select count(*) from organizations") == 1
