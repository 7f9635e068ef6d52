"""Data access for the platform's side, played by the demo and the tests: `sql/queries/platform.sql`.

A simulated provisioner's jobs (take, complete, release) and the writes with which the demo stands in
for the platform's API server (organizations, users, templates, versions, presets). The daemon never
runs these: they stand in for the components outside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from reconciler import db


def _query(name: str) -> str:
    return db.queries_in("platform.sql")[name]


def _returned_id(value: Any) -> UUID:
    # asyncpg returns its own UUID subclass; anything else means the statement changed shape.
    if not isinstance(value, UUID):
        raise TypeError(f"expected a uuid from the database, got {type(value).__name__}")
    return value


@dataclass(frozen=True, slots=True)
class AcquiredJob:
    """A workspace-build job taken by a (simulated) provisioner, with what deciding its outcome needs."""

    job_id: UUID
    build_id: UUID
    workspace_id: UUID
    build_number: int
    transition: str
    template_version_id: UUID
    preset_id: UUID | None
    workspace_name: str
    template_name: str
    preset_name: str | None
    simulated_failure: str
    simulated_error_code: str


async def acquire_provisioner_jobs(
    connection: db.Connection, worker_id: UUID, now: datetime, limit: int
) -> list[AcquiredJob]:
    rows = await connection.fetch(_query("acquire_provisioner_jobs"), worker_id, now, limit)
    return [AcquiredJob(**dict(row)) for row in rows]


@dataclass(frozen=True, slots=True)
class CompletedJob:
    job_id: UUID
    succeeded: bool
    canceled: bool
    transition: str
    workspace_id: UUID


async def complete_provisioner_job(
    connection: db.Connection,
    *,
    job_id: UUID,
    worker_id: UUID,
    now: datetime,
    error: str | None,
    error_code: str | None,
) -> CompletedJob | None:
    """Finish a job this worker holds; None when it is not (or no longer) this worker's."""
    row = await connection.fetchrow(_query("complete_provisioner_job"), job_id, worker_id, now, error, error_code)
    return None if row is None else CompletedJob(**dict(row))


async def release_provisioner_jobs(connection: db.Connection, worker_id: UUID, now: datetime) -> list[UUID]:
    rows = await connection.fetch(_query("release_provisioner_jobs"), worker_id, now)
    return [row["id"] for row in rows]


async def complete_canceling_jobs(connection: db.Connection, now: datetime) -> list[UUID]:
    rows = await connection.fetch(_query("complete_canceling_jobs"), now)
    return [row["id"] for row in rows]


async def create_organization(connection: db.Connection, name: str, now: datetime) -> UUID:
    return _returned_id(await connection.fetchval(_query("create_organization"), name, now))


async def create_user(
    connection: db.Connection, username: str, email: str, site_roles: Sequence[str], now: datetime
) -> UUID:
    return _returned_id(await connection.fetchval(_query("create_user"), username, email, list(site_roles), now))


async def add_organization_member(
    connection: db.Connection, organization_id: UUID, user_id: UUID, roles: Sequence[str], now: datetime
) -> None:
    await connection.execute(_query("add_organization_member"), organization_id, user_id, list(roles), now)


async def create_template(connection: db.Connection, organization_id: UUID, name: str, now: datetime) -> UUID:
    return _returned_id(await connection.fetchval(_query("create_template"), organization_id, name, now))


async def create_template_version(connection: db.Connection, template_id: UUID, name: str, now: datetime) -> UUID:
    """A new version of the template, made its active version."""
    return _returned_id(await connection.fetchval(_query("create_template_version"), template_id, name, now))


async def create_preset(
    connection: db.Connection,
    *,
    template_version_id: UUID,
    name: str,
    desired_instances: int | None,
    invalidate_after_secs: int | None,
    scheduling_timezone: str,
    now: datetime,
) -> UUID:
    value = await connection.fetchval(
        _query("create_preset"),
        template_version_id,
        name,
        desired_instances,
        invalidate_after_secs,
        scheduling_timezone,
        now,
    )
    return _returned_id(value)


async def add_preset_parameter(connection: db.Connection, preset_id: UUID, name: str, value: str) -> None:
    await connection.execute(_query("add_preset_parameter"), preset_id, name, value)


async def add_preset_schedule(
    connection: db.Connection, preset_id: UUID, cron_expression: str, desired_instances: int
) -> None:
    await connection.execute(_query("add_preset_schedule"), preset_id, cron_expression, desired_instances)


async def publish_template_version(
    connection: db.Connection, template_id: UUID, name: str, now: datetime
) -> UUID | None:
    """A new active version copying the active one's presets; None when the template has no active version."""
    value = await connection.fetchval(_query("publish_template_version"), template_id, name, now)
    return None if value is None else _returned_id(value)


async def find_organization(connection: db.Connection, name: str) -> UUID | None:
    value = await connection.fetchval(_query("find_organization"), name)
    return None if value is None else _returned_id(value)


async def find_template(connection: db.Connection, organization_id: UUID, name: str) -> UUID | None:
    value = await connection.fetchval(_query("find_template"), organization_id, name)
    return None if value is None else _returned_id(value)


async def release_all_provisioner_jobs(connection: db.Connection, now: datetime) -> list[UUID]:
    """Requeue every unfinished job, whoever held it: for a database no real provisioner uses (the demo's)."""
    rows = await connection.fetch(_query("release_all_provisioner_jobs"), now)
    return [row["id"] for row in rows]
