"""Build database states in a few lines.

    factory = Factory(connection)
    preset = await factory.preset(desired=2)                   # org, template, active version, preset
    await factory.prebuild(preset)                             # a running, ready prebuild
    await factory.prebuild(preset, status="failed", ago=minutes(5))
    old = await factory.preset(desired=1, active=False, template=preset.template)

Everything is real rows through real SQL; times are relative to `factory.now` unless given.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from reconciler.snapshot import PREBUILDS_SYSTEM_USER_ID

_sequence = itertools.count(1)


def minutes(count: float) -> timedelta:
    return timedelta(minutes=count)


def seconds(count: float) -> timedelta:
    return timedelta(seconds=count)


def unique_name(prefix: str) -> str:
    return f"{prefix}-{next(_sequence)}"


def job_columns(status: str, at: datetime, error: str | None = None) -> dict[str, Any]:
    """The timestamps and error that make the database derive `status` (see CONTRACTS.md)."""
    if status == "pending":
        return {}
    if status == "running":
        return {"started_at": at}
    if status == "succeeded":
        return {"started_at": at, "completed_at": at}
    if status == "failed":
        return {"started_at": at, "completed_at": at, "error": error or "provisioning failed"}
    if status == "canceling":
        return {"canceled_at": at}
    if status == "canceled":
        return {"canceled_at": at, "completed_at": at}
    raise ValueError(f"unknown job status {status!r}")


@dataclass(frozen=True)
class Organization:
    id: uuid.UUID
    name: str


@dataclass(frozen=True)
class User:
    id: uuid.UUID
    username: str
    email: str


@dataclass(frozen=True)
class Template:
    id: uuid.UUID
    name: str
    organization: Organization


@dataclass(frozen=True)
class Version:
    id: uuid.UUID
    name: str
    template: Template


@dataclass(frozen=True)
class Preset:
    id: uuid.UUID
    name: str
    version: Version

    @property
    def template(self) -> Template:
        return self.version.template

    @property
    def organization(self) -> Organization:
        return self.version.template.organization


@dataclass(frozen=True)
class Build:
    id: uuid.UUID
    job_id: uuid.UUID
    build_number: int


@dataclass
class Workspace:
    id: uuid.UUID
    name: str
    preset: Preset | None
    builds: list[Build] = field(default_factory=list)


@dataclass
class Factory:
    connection: asyncpg.Connection
    now: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))

    async def _insert(self, table: str, values: dict[str, Any]) -> Any:
        columns = list(values)
        placeholders = ", ".join(f"${index}" for index in range(1, len(columns) + 1))
        sql = f"insert into {table} ({', '.join(columns)}) values ({placeholders}) returning id"
        return await self.connection.fetchval(sql, *values.values())

    # --- organizations, users -------------------------------------------------------------------

    async def organization(self, name: str | None = None) -> Organization:
        name = name or unique_name("org")
        return Organization(await self._insert("organizations", {"name": name}), name)

    async def user(
        self,
        *,
        username: str | None = None,
        email: str | None = None,
        site_roles: Sequence[str] = (),
        organization: Organization | None = None,
        organization_roles: Sequence[str] = (),
        status: str = "active",
        deleted: bool = False,
    ) -> User:
        username = username or unique_name("user")
        email = email if email is not None else f"{username}@example.test"
        user_id = await self._insert(
            "users",
            {
                "username": username,
                "email": email,
                "rbac_roles": list(site_roles),
                "status": status,
                "deleted": deleted,
            },
        )
        if organization is not None:
            await self._insert_member(organization, user_id, organization_roles)
        return User(user_id, username, email)

    async def _insert_member(self, organization: Organization, user_id: uuid.UUID, roles: Sequence[str]) -> None:
        await self.connection.execute(
            "insert into organization_members (organization_id, user_id, roles) values ($1, $2, $3)",
            organization.id,
            user_id,
            list(roles),
        )

    # --- templates, versions, presets -----------------------------------------------------------

    async def template(
        self,
        organization: Organization | None = None,
        *,
        name: str | None = None,
        deleted: bool = False,
        deprecated: str = "",
    ) -> Template:
        organization = organization or await self.organization()
        name = name or unique_name("template")
        template_id = await self._insert(
            "templates",
            {"organization_id": organization.id, "name": name, "deleted": deleted, "deprecated": deprecated},
        )
        return Template(template_id, name, organization)

    async def version(
        self, template: Template | None = None, *, active: bool = True, name: str | None = None
    ) -> Version:
        template = template or await self.template()
        name = name or unique_name("v")
        version_id = await self._insert(
            "template_versions",
            {"template_id": template.id, "organization_id": template.organization.id, "name": name},
        )
        if active:
            await self.activate(Version(version_id, name, template))
        return Version(version_id, name, template)

    async def activate(self, version: Version) -> None:
        await self.connection.execute(
            "update templates set active_version_id = $1, updated_at = now() where id = $2",
            version.id,
            version.template.id,
        )

    async def preset(
        self,
        version: Version | None = None,
        *,
        desired: int | None = 1,
        name: str | None = None,
        template: Template | None = None,
        active: bool = True,
        ttl_seconds: int | None = None,
        timezone: str = "",
        schedules: Sequence[tuple[str, int]] = (),
        status: str = "normal",
        last_invalidated_at: datetime | None = None,
        expression: str | None = None,
    ) -> Preset:
        """A preset; without `version`, on a new version of `template` (or of a new template)."""
        version = version or await self.version(template, active=active)
        name = name or unique_name("preset")
        preset_id = await self._insert(
            "template_version_presets",
            {
                "template_version_id": version.id,
                "name": name,
                "desired_instances": desired,
                "invalidate_after_secs": ttl_seconds,
                "scheduling_timezone": timezone,
                "prebuild_status": status,
                "last_invalidated_at": last_invalidated_at,
                "desired_instances_expression": expression,
            },
        )
        for cron, instances in schedules:
            await self._insert(
                "template_version_preset_prebuild_schedules",
                {"preset_id": preset_id, "cron_expression": cron, "desired_instances": instances},
            )
        return Preset(preset_id, name, version)

    async def event(self, preset: Preset, event_type: str = "claim_succeeded", *, at: datetime) -> None:
        """A claim event, as the platform's claim path writes it (`claim_succeeded` or `claim_missed`)."""
        await self._insert("prebuild_events", {"preset_id": preset.id, "event_type": event_type, "created_at": at})

    # --- workspaces and builds ------------------------------------------------------------------

    async def workspace(
        self,
        preset: Preset | None,
        *,
        template: Template | None = None,
        owner_id: uuid.UUID | None = None,
        created_at: datetime | None = None,
        deleted: bool = False,
        name: str | None = None,
    ) -> Workspace:
        template = template or (preset.template if preset else None)
        assert template is not None, "a workspace needs a preset or a template"
        name = name or unique_name("prebuild")
        workspace_id = await self._insert(
            "workspaces",
            {
                "owner_id": owner_id or PREBUILDS_SYSTEM_USER_ID,
                "organization_id": template.organization.id,
                "template_id": template.id,
                "name": name,
                "deleted": deleted,
                "created_at": created_at or self.now,
            },
        )
        return Workspace(workspace_id, name, preset)

    async def build(
        self,
        workspace: Workspace,
        *,
        transition: str = "start",
        status: str = "succeeded",
        preset: Preset | bool | None = True,
        version: Version | None = None,
        created_at: datetime | None = None,
        ago: timedelta | None = None,
        initiator_id: uuid.UUID | None = None,
        error: str | None = None,
        error_code: str | None = None,
        agents: Sequence[str] | None = None,
        worker_id: uuid.UUID | None = None,
    ) -> Build:
        """Append a build. `preset=True` names the workspace's preset on start builds only.

        `agents` lists lifecycle states of top-level agents to create for the build's job; by default a
        succeeded start gets one `ready` agent.
        """
        when = created_at or (self.now - ago if ago is not None else self.now)
        if preset is True:
            build_preset = workspace.preset if transition == "start" else None
        elif preset is False:
            build_preset = None
        else:
            build_preset = preset
        version = (
            version
            or (build_preset.version if build_preset else None)
            or (workspace.preset.version if workspace.preset else None)
        )
        assert version is not None, "a build needs a template version"
        initiator = initiator_id or PREBUILDS_SYSTEM_USER_ID
        job_values: dict[str, Any] = {
            "organization_id": version.template.organization.id,
            "initiator_id": initiator,
            "type": "workspace_build",
            "created_at": when,
            "worker_id": worker_id,
            "error_code": error_code,
            **job_columns(status, when, error),
        }
        job_id = await self._insert("provisioner_jobs", job_values)
        build_number = len(workspace.builds) + 1
        if not workspace.builds:
            existing = await self.connection.fetchval(
                "select coalesce(max(build_number), 0) from workspace_builds where workspace_id = $1",
                workspace.id,
            )
            build_number = existing + 1
        build_id = await self._insert(
            "workspace_builds",
            {
                "workspace_id": workspace.id,
                "build_number": build_number,
                "transition": transition,
                "template_version_id": version.id,
                "template_version_preset_id": build_preset.id if build_preset else None,
                "job_id": job_id,
                "initiator_id": initiator,
                "created_at": when,
            },
        )
        await self.connection.execute(
            "update provisioner_jobs set input = $1 where id = $2",
            json.dumps({"workspace_build_id": str(build_id)}),
            job_id,
        )
        if agents is None:
            agents = ["ready"] if transition == "start" and status == "succeeded" else []
        for state in agents:
            await self.agent(job_id, state)
        build = Build(build_id, job_id, build_number)
        workspace.builds.append(build)
        return build

    async def agent(
        self,
        job_id: uuid.UUID,
        state: str = "ready",
        *,
        parent_id: uuid.UUID | None = None,
        deleted: bool = False,
    ) -> uuid.UUID:
        agent_id: uuid.UUID = await self._insert(
            "workspace_agents",
            {
                "job_id": job_id,
                "name": unique_name("agent"),
                "lifecycle_state": state,
                "parent_id": parent_id,
                "deleted": deleted,
            },
        )
        return agent_id

    async def prebuild(
        self,
        preset: Preset,
        *,
        status: str = "succeeded",
        ready: bool = True,
        ago: timedelta = timedelta(0),
        created_at: datetime | None = None,
        error_code: str | None = None,
        agents: Sequence[str] | None = None,
    ) -> Workspace:
        """A prebuilt workspace of `preset` whose first (start) build's job is in `status`."""
        when = created_at or self.now - ago
        workspace = await self.workspace(preset, created_at=when)
        if agents is None and status == "succeeded":
            agents = ["ready"] if ready else ["starting"]
        await self.build(workspace, status=status, created_at=when, error_code=error_code, agents=agents)
        return workspace

    async def created_prebuilds(self, preset: Preset, count: int) -> list[uuid.UUID]:
        """Exactly what the daemon's create writes (through the store): workspaces with a pending first build."""
        from reconciler.store import writes

        return await writes.create_prebuilds(
            self.connection,
            preset_id=preset.id,
            template_version_id=preset.version.id,
            template_id=preset.template.id,
            organization_id=preset.organization.id,
            count=count,
            now=datetime.now(UTC),
        )

    async def job_statuses(self) -> dict[str, int]:
        """How many provisioner jobs are in each status."""
        rows = await self.connection.fetch("select job_status::text, count(*) from provisioner_jobs group by 1")
        return {row["job_status"]: row["count"] for row in rows}

    async def prebuilds(self, preset: Preset, count: int, **options: Any) -> list[Workspace]:
        return [await self.prebuild(preset, **options) for _ in range(count)]

    async def claim(self, workspace: Workspace, user: User | None = None) -> User:
        """Hand a prebuild to a user, as the platform's API server does."""
        user = user or await self.user()
        await self.connection.execute(
            "update workspaces set owner_id = $1, updated_at = now() where id = $2", user.id, workspace.id
        )
        return user

    async def set_paused(self, paused: bool) -> None:
        await self.connection.execute(
            "insert into site_configs (key, value) values ('prebuilds_settings', $1) "
            "on conflict (key) do update set value = excluded.value",
            json.dumps({"reconciliation_paused": paused}),
        )
