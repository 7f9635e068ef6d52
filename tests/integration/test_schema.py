"""The contract schema: derived job status, and the constraints that keep bad rows out."""

import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from tests.factories import Factory

T = datetime(2026, 1, 1, tzinfo=UTC)

# (started_at, canceled_at, completed_at, error) -> status, exactly as CONTRACTS.md defines it.
JOB_STATUS_CASES = [
    (None, None, None, None, "pending"),
    (T, None, None, None, "running"),
    (None, T, None, None, "canceling"),
    (T, T, None, None, "canceling"),
    (None, None, None, "boom", "failed"),
    (T, None, None, "boom", "failed"),
    (T, T, None, "boom", "failed"),
    (T, None, None, "", "running"),
    (T, None, T, None, "succeeded"),
    (None, None, T, None, "succeeded"),
    (T, None, T, "", "succeeded"),
    (T, T, T, None, "canceled"),
    (None, T, T, None, "canceled"),
    (T, None, T, "boom", "failed"),
    (T, T, T, "boom", "failed"),
]


@pytest.mark.parametrize(("started", "canceled", "completed", "error", "expected"), JOB_STATUS_CASES)
async def test_job_status_is_derived_by_the_database(
    factory: Factory,
    started: datetime | None,
    canceled: datetime | None,
    completed: datetime | None,
    error: str | None,
    expected: str,
) -> None:
    organization = await factory.organization()
    status = await factory.connection.fetchval(
        "insert into provisioner_jobs (organization_id, initiator_id, started_at, canceled_at, completed_at, error)"
        " values ($1, 'c42fdf75-3097-471c-8c33-fb52454d81c0', $2, $3, $4, $5) returning job_status::text",
        organization.id,
        started,
        canceled,
        completed,
        error,
    )
    assert status == expected


async def test_job_status_follows_updates(factory: Factory) -> None:
    organization = await factory.organization()
    job_id = await factory.connection.fetchval(
        "insert into provisioner_jobs (organization_id, initiator_id) "
        "values ($1, 'c42fdf75-3097-471c-8c33-fb52454d81c0') returning id",
        organization.id,
    )
    await factory.connection.execute("update provisioner_jobs set started_at = now() where id = $1", job_id)
    assert (
        await factory.connection.fetchval("select job_status::text from provisioner_jobs where id = $1", job_id)
        == "running"
    )
    with pytest.raises(asyncpg.GeneratedAlwaysError):
        await factory.connection.execute("update provisioner_jobs set job_status = 'failed' where id = $1", job_id)


async def test_negative_desired_instances_is_rejected(factory: Factory) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await factory.preset(desired=-1)


async def test_negative_ttl_and_schedule_counts_are_rejected(factory: Factory) -> None:
    with pytest.raises(asyncpg.CheckViolationError):
        await factory.preset(ttl_seconds=-5)
    with pytest.raises(asyncpg.CheckViolationError):
        await factory.preset(schedules=[("* 9-18 * * 1-5", -1)])


async def test_build_numbers_are_unique_per_workspace(factory: Factory) -> None:
    preset = await factory.preset()
    workspace = await factory.prebuild(preset)
    job_id = await factory.connection.fetchval(
        "insert into provisioner_jobs (organization_id, initiator_id) "
        "values ($1, 'c42fdf75-3097-471c-8c33-fb52454d81c0') returning id",
        preset.organization.id,
    )
    with pytest.raises(asyncpg.UniqueViolationError):
        await factory.connection.execute(
            "insert into workspace_builds (workspace_id, build_number, transition, template_version_id, job_id,"
            " initiator_id) values ($1, 1, 'stop', $2, $3, 'c42fdf75-3097-471c-8c33-fb52454d81c0')",
            workspace.id,
            preset.version.id,
            job_id,
        )


async def test_build_number_must_be_positive_and_job_must_exist(factory: Factory) -> None:
    preset = await factory.preset()
    workspace = await factory.workspace(preset)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await factory.connection.execute(
            "insert into workspace_builds (workspace_id, build_number, transition, template_version_id, job_id,"
            " initiator_id) values ($1, 1, 'start', $2, $3, 'c42fdf75-3097-471c-8c33-fb52454d81c0')",
            workspace.id,
            preset.version.id,
            uuid.uuid4(),
        )
    with pytest.raises(asyncpg.CheckViolationError):
        await factory.connection.execute(
            "insert into workspace_builds (workspace_id, build_number, transition, template_version_id, job_id,"
            " initiator_id) values ($1, 0, 'start', $2, $3, 'c42fdf75-3097-471c-8c33-fb52454d81c0')",
            workspace.id,
            preset.version.id,
            uuid.uuid4(),
        )


async def test_unknown_enum_values_and_user_status_are_rejected(factory: Factory) -> None:
    with pytest.raises(asyncpg.InvalidTextRepresentationError):
        await factory.preset(status="broken")
    with pytest.raises(asyncpg.CheckViolationError):
        await factory.user(status="zombie")


async def test_preset_names_are_unique_within_a_version(factory: Factory) -> None:
    preset = await factory.preset(name="small")
    with pytest.raises(asyncpg.UniqueViolationError):
        await factory.preset(preset.version, name="small")


async def test_live_template_names_are_unique_per_organization(factory: Factory) -> None:
    organization = await factory.organization()
    await factory.template(organization, name="Go")
    with pytest.raises(asyncpg.UniqueViolationError):
        await factory.template(organization, name="go")
    # A deleted template frees its name.
    await factory.template(organization, name="rust", deleted=True)
    await factory.template(organization, name="rust")


async def test_active_version_must_exist(factory: Factory) -> None:
    template = await factory.template()
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await factory.connection.execute(
            "update templates set active_version_id = $1 where id = $2", uuid.uuid4(), template.id
        )


async def test_notification_dedupe_key_is_unique(factory: Factory) -> None:
    insert = (
        "insert into notification_messages (notification_template_id, payload, dedupe_key) "
        "values ('414d9331-c1fc-4761-b40c-d1f4702279eb', '{}', 'preset-1:episode-1')"
    )
    await factory.connection.execute(insert)
    with pytest.raises(asyncpg.UniqueViolationError):
        await factory.connection.execute(insert)


async def test_factory_builds_a_chain_of_builds(factory: Factory) -> None:
    preset = await factory.preset(desired=2)
    workspace = await factory.prebuild(preset)
    await factory.build(workspace, transition="stop")
    await factory.build(workspace, transition="start", status="running")
    rows = await factory.connection.fetch(
        "select b.build_number, b.transition::text, j.job_status::text, b.template_version_preset_id "
        "from workspace_builds b join provisioner_jobs j on j.id = b.job_id where workspace_id = $1 "
        "order by build_number",
        workspace.id,
    )
    assert [(row[0], row[1], row[2]) for row in rows] == [
        (1, "start", "succeeded"),
        (2, "stop", "succeeded"),
        (3, "start", "running"),
    ]
    assert [row[3] for row in rows] == [preset.id, None, preset.id]
