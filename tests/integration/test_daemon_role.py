"""The daemon's role (`sql/roles/reconciler_role.sql`) does what the daemon does, and nothing else (issue 12.7).

Every named statement the daemon runs is run here as a login role that is only a member of
`prebuilds_reconciler`, on rows it really changes; every abuse the adversarial review found (and more of
the same kind) is tried as that role and refused: an error, or, for a row the role may not see or
touch, a statement that finds no row, with every table left exactly as it was. The platform's other
roles keep what their grants give them, the script converges to the same privileges however often it
runs, and the snapshot's plans as the role are the owner's.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from bench import fleet
from reconciler import db
from reconciler.snapshot import PREBUILDS_SYSTEM_USER_ID
from tests.conftest import with_database
from tests.daemon_role import GROUP_ROLE, login_role, run_role_script
from tests.factories import Factory, Preset, minutes
from tests.integration.query_plans import explain, plan_nodes

HARD_LIMITED_TEMPLATE = uuid.UUID("414d9331-c1fc-4761-b40c-d1f4702279eb")
VALIDATION_FAILED_TEMPLATE = uuid.UUID("9ab56367-21d6-438e-9e48-0cf94beca3d8")
RECOVERED_TEMPLATE = uuid.UUID("3612b174-7ca6-431d-8222-8b9dcc23a45b")
# sql/queries files of the test tools (the simulated provisioner, the demo's seeding), which run as the
# schema's owner, and of operator commands the daemon never runs (`presets describe`: that it works with
# the role's credentials is tested in test_describe.py); every other named statement is the daemon's and
# must run as its role.
TOOL_QUERY_FILES = {"platform.sql", "describe.sql"}
# Tables whose every row is compared before and after an abuse.
WATCHED_TABLES = (
    "workspaces",
    "workspace_builds",
    "provisioner_jobs",
    "site_configs",
    "notification_messages",
    "notification_deliveries",
    "template_version_presets",
    "templates",
    "users",
    "organization_members",
    "groups",
    "group_members",
    "reconciler_settings",
)


@pytest.fixture
async def role_dsn(database_url: str) -> AsyncIterator[str]:
    async with login_role(database_url) as dsn:
        yield dsn


@pytest.fixture
async def as_role(role_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the daemon's role, opened as the daemon opens its connections."""
    connection = await db.connect(role_dsn)
    try:
        yield connection
    finally:
        await connection.close()


def daemon_statement_names() -> set[str]:
    names: set[str] = set()
    for path in sorted((db.sql_directory() / "queries").glob("*.sql")):
        if path.name not in TOOL_QUERY_FILES:
            names |= set(db.parse_queries(path.read_text(encoding="utf-8"), path.name))
    return names


@dataclass(frozen=True)
class Platform:
    """A platform with something of everyone's: the daemon's prebuilds, users' workspaces and jobs, the
    platform's secrets and notifications. Ids by name, for the abuse statements."""

    ids: dict[str, uuid.UUID]
    preset: Preset

    def sql(self, template: str) -> str:
        return template.format(
            prebuilds=PREBUILDS_SYSTEM_USER_ID, **{key: str(value) for key, value in self.ids.items()}
        )


async def build_platform(factory: Factory) -> Platform:
    connection = factory.connection
    preset = await factory.preset(desired=2)
    organization = preset.organization
    other_organization = await factory.organization()
    limited = await factory.preset(desired=1, status="hard_limited")
    await connection.execute("update template_version_presets set failure_episode = 2 where id = $1", limited.id)
    prebuild = await factory.prebuild(preset, ago=minutes(5))
    pending_prebuild = await factory.prebuild(preset, status="pending", agents=[])
    taken_prebuild = await factory.workspace(preset)
    await factory.build(taken_prebuild, status="running", worker_id=uuid.uuid4(), agents=[])
    claimed = await factory.prebuild(preset, ago=minutes(30))
    claimer = await factory.claim(claimed)
    deleted_prebuild = await factory.workspace(preset, deleted=True)
    await factory.build(deleted_prebuild, status="succeeded", agents=[])
    await factory.build(deleted_prebuild, transition="delete", status="succeeded")

    user = await factory.user(organization=organization)
    user_workspace = await factory.workspace(None, template=preset.template, owner_id=user.id)
    await factory.build(user_workspace, preset=False, version=preset.version, initiator_id=user.id)
    user_pending = await factory.build(
        user_workspace, transition="stop", status="pending", version=preset.version, initiator_id=user.id
    )
    bare_workspace = await factory.workspace(None, template=preset.template, owner_id=user.id)
    admin = await factory.user(site_roles=["template-admin"])
    other_organization_admin = await factory.user(
        organization=other_organization, organization_roles=["organization-template-admin"]
    )

    # The organization's groups: the prebuilds user's, as the daemon adds it, and one of the platform's.
    prebuilds_group = await connection.fetchval(
        "insert into groups (organization_id, name, display_name, quota_allowance) "
        "values ($1, 'coderprebuiltworkspaces', 'Prebuilt Workspaces', 0) returning id",
        organization.id,
    )
    await connection.execute(
        "insert into organization_members (organization_id, user_id) values ($1, $2)",
        organization.id,
        PREBUILDS_SYSTEM_USER_ID,
    )
    await connection.execute(
        "insert into group_members (group_id, user_id) values ($1, $2)", prebuilds_group, PREBUILDS_SYSTEM_USER_ID
    )
    platform_group = await connection.fetchval(
        "insert into groups (organization_id, name, display_name, quota_allowance) "
        "values ($1, 'developers', 'Developers', 50) returning id",
        organization.id,
    )

    await connection.execute(
        "insert into site_configs (key, value) values ('app_signing_key', 'SECRET-SIGNING-KEY'), "
        "('prebuilds_settings', '{\"reconciliation_paused\": false}')"
    )
    platform_template = await connection.fetchval(
        "insert into notification_templates (id, name, title_template, body_template) "
        "values (gen_random_uuid(), 'Workspace Deleted', 'Deleted', 'Your workspace was deleted') returning id"
    )
    # The platform's own notification: `kind` takes its default, as for any row written without it.
    platform_message = await connection.fetchval(
        "insert into notification_messages (notification_template_id, user_id, payload, dedupe_key) "
        "values ($1, $2, '{}', $3) returning id",
        platform_template,
        user.id,
        f"workspace-deleted:{user.id}",
    )
    # The platform's claim events: the preset has a target expression, one claim now, one three days ago.
    await connection.execute(
        "update template_version_presets set desired_instances_expression = 'claims_10m + 1' where id = $1", preset.id
    )
    recent_event = await connection.fetchval(
        "insert into prebuild_events (preset_id, event_type) values ($1, 'claim_succeeded') returning id", preset.id
    )
    old_event = await connection.fetchval(
        "insert into prebuild_events (preset_id, event_type, created_at) "
        "values ($1, 'claim_missed', now() - interval '3 days') returning id",
        preset.id,
    )
    return Platform(
        preset=preset,
        ids={
            "recent_event": recent_event,
            "old_event": old_event,
            "organization": organization.id,
            "template": preset.template.id,
            "version": preset.version.id,
            "preset": preset.id,
            "limited_preset": limited.id,
            "prebuild": prebuild.id,
            "prebuild_job": prebuild.builds[0].job_id,
            "pending_prebuild_job": pending_prebuild.builds[0].job_id,
            "taken_prebuild_job": taken_prebuild.builds[0].job_id,
            "claimed": claimed.id,
            "claimer": claimer.id,
            "deleted_prebuild": deleted_prebuild.id,
            "user": user.id,
            "user_workspace": user_workspace.id,
            "user_pending_job": user_pending.job_id,
            "bare_workspace": bare_workspace.id,
            "admin": admin.id,
            "other_organization": other_organization.id,
            "other_organization_admin": other_organization_admin.id,
            "prebuilds_group": prebuilds_group,
            "platform_group": platform_group,
            "platform_template": platform_template,
            "platform_message": platform_message,
        },
    )


@pytest.fixture
async def platform(factory: Factory) -> Platform:
    return await build_platform(factory)


@dataclass(frozen=True)
class Shared:
    owner: asyncpg.Connection
    as_role: asyncpg.Connection
    platform: Platform


@pytest.fixture(scope="module")
async def shared(server_dsn: str, template_database: str) -> AsyncIterator[Shared]:
    """One platform for every abuse: each abuse is asserted to change nothing, so they can share it (a
    database of their own each would cost seconds apiece)."""
    name = f"reconciler_role_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'create database "{name}" template "{template_database}"')
        database_url = with_database(server_dsn, name)
        owner = await db.connect(database_url)
        try:
            platform = await build_platform(Factory(owner))
            async with login_role(database_url) as dsn:
                as_role = await db.connect(dsn)
                try:
                    yield Shared(owner, as_role, platform)
                finally:
                    await as_role.close()
        finally:
            await owner.close()
        await admin.execute(f'drop database if exists "{name}" with (force)')
    finally:
        await admin.close()


async def table_contents(connection: asyncpg.Connection) -> dict[str, str]:
    """Every row of the watched tables, as text (read by the owner)."""
    contents = {}
    for table in WATCHED_TABLES:
        contents[table] = await connection.fetchval(
            f"select coalesce(string_agg(t::text, e'\\n' order by t::text), '') from {table} t"
        )
    return contents


BUILD = """
with job as (
    insert into provisioner_jobs (organization_id, initiator_id, type)
    values ('{organization}', '{prebuilds}', 'workspace_build') returning id
)
insert into workspace_builds (workspace_id, build_number, transition, template_version_id,
                              template_version_preset_id, job_id, initiator_id)
select '{workspace}', {build_number}, '{transition}', '{version}', {preset_or_null}, job.id, '{initiator}' from job
"""


def build_on(
    workspace: str, *, build_number: int = 3, transition: str = "delete", initiator: str = "{prebuilds}"
) -> str:
    """A build (and its job) as the daemon writes them, for a workspace of the abuser's choice; a start
    names the preset, as a first build must."""
    return (
        BUILD.replace("{workspace}", "{" + workspace + "}")
        .replace("{build_number}", str(build_number))
        .replace("{transition}", transition)
        .replace("{initiator}", initiator)
        .replace("{preset_or_null}", "'{preset}'" if transition == "start" else "null")
    )


def message_to(user: str, *, template: str = str(HARD_LIMITED_TEMPLATE), kind: str = "hard_limited") -> str:
    return (
        "insert into notification_messages (notification_template_id, user_id, payload, kind, preset_id, episode, "
        f"dedupe_key) values ('{template}', '{{{user}}}', '{{{{}}}}', '{kind}', '{{preset}}', 1, "
        f"'intruder:{kind}:{user}')"
    )


@dataclass(frozen=True)
class Refusal:
    """How the server refuses: an error whose message matches `reason`, or (`reason` None) a statement
    that finds no row the role may see or change."""

    error: type[Exception] | None
    reason: str | None = None


def denied(reason: str) -> Refusal:
    """An insufficient-privilege error: a row policy (by its name), a column grant, or ownership."""
    return Refusal(asyncpg.InsufficientPrivilegeError, reason)


NO_ROW = Refusal(None)
EPISODE_ONLY_GROWS = Refusal(asyncpg.CheckViolationError, "failure_episode of preset .* cannot go from 2 back")
NOT_GRANTED = "permission denied for table"
NOT_OWNER = "must be owner of"
BUILDS_POLICY = "prebuilds_reconciler_builds_prebuilds"
JOBS_INSERT_POLICY = "prebuilds_reconciler_creates_jobs"
JOBS_UPDATE_POLICY = "prebuilds_reconciler_cancels_pending_jobs"
SETTINGS_POLICY = "prebuilds_reconciler_own_keys"
RECIPIENTS_POLICY = "prebuilds_reconciler_notifies_template_admins"
MEMBERSHIP_POLICY = "prebuilds_reconciler_adds_prebuilds_membership"
GROUP_POLICY = "prebuilds_reconciler_adds_prebuilds_group"
GROUP_MEMBER_POLICY = "prebuilds_reconciler_joins_prebuilds_group"

ABUSES: list[tuple[str, str, Refusal]] = [
    # The review's findings (issue 12, point 7).
    ("mark a user's workspace deleted", "update workspaces set deleted = true where id = '{user_workspace}'", NO_ROW),
    ("mark a claimed prebuild deleted", "update workspaces set deleted = true where id = '{claimed}'", NO_ROW),
    ("add a delete build to a claimed workspace", build_on("claimed"), denied(BUILDS_POLICY)),
    ("cancel a user's job", "update provisioner_jobs set canceled_at = now() where id = '{user_pending_job}'", NO_ROW),
    (
        "complete a user's job",
        "update provisioner_jobs set completed_at = now() where id = '{user_pending_job}'",
        NO_ROW,
    ),
    (
        "complete the prebuilds user's pending job as succeeded",
        "update provisioner_jobs set completed_at = now() where id = '{pending_prebuild_job}'",
        denied(JOBS_UPDATE_POLICY),
    ),
    (
        "insert a workspace owned by a user",
        "insert into workspaces (owner_id, organization_id, template_id, name) "
        "values ('{user}', '{organization}', '{template}', 'intruder')",
        denied("prebuilds_reconciler_creates_prebuilds"),
    ),
    ("read the platform's signing key", "select value from site_configs where key = 'app_signing_key'", NO_ROW),
    ("list the platform's settings", "select key from site_configs where key <> 'prebuilds_settings'", NO_ROW),
    (
        "overwrite the platform's signing key",
        "update site_configs set value = 'intruder' where key = 'app_signing_key'",
        NO_ROW,
    ),
    (
        "overwrite the signing key as pause writes its setting",
        "insert into site_configs (key, value) values ('app_signing_key', 'intruder') "
        "on conflict (key) do update set value = excluded.value",
        denied(SETTINGS_POLICY),
    ),
    ("add a setting", "insert into site_configs (key, value) values ('intruder', 'x')", denied(SETTINGS_POLICY)),
    ("notify a user who administers no template", message_to("user"), denied(RECIPIENTS_POLICY)),
    (
        "reset the failure episode to 0",
        "update template_version_presets set failure_episode = 0 where id = '{limited_preset}'",
        EPISODE_ONLY_GROWS,
    ),
    # More of the same kind.
    ("add a delete build to a user's workspace", build_on("user_workspace"), denied(BUILDS_POLICY)),
    (
        "add a delete build to a prebuild as a user",
        build_on("prebuild", build_number=2, initiator="{user}"),
        denied(BUILDS_POLICY),
    ),
    ("add a delete build to a deleted prebuild", build_on("deleted_prebuild"), denied(BUILDS_POLICY)),
    (
        "rebuild a prebuild (a start that is not its first build)",
        build_on("prebuild", build_number=2, transition="start"),
        denied(BUILDS_POLICY),
    ),
    ("stop a prebuild", build_on("prebuild", build_number=2, transition="stop"), denied(BUILDS_POLICY)),
    (
        "give a user's workspace (without builds) a first build",
        build_on("bare_workspace", build_number=1, transition="start"),
        denied(BUILDS_POLICY),
    ),
    ("bring a deleted prebuild back", "update workspaces set deleted = false where id = '{deleted_prebuild}'", NO_ROW),
    (
        "insert a deleted workspace",
        "insert into workspaces (owner_id, organization_id, template_id, name, deleted) "
        "values ('{prebuilds}', '{organization}', '{template}', 'intruder', true)",
        denied(NOT_GRANTED),
    ),
    (
        "cancel a prebuild's job a provisioner has taken",
        "update provisioner_jobs set canceled_at = now(), completed_at = now() where id = '{taken_prebuild_job}'",
        NO_ROW,
    ),
    (
        "cancel a finished job",
        "update provisioner_jobs set canceled_at = now(), completed_at = now() where id = '{prebuild_job}'",
        NO_ROW,
    ),
    (
        "leave a pending prebuild job canceling forever",
        "update provisioner_jobs set canceled_at = now() where id = '{pending_prebuild_job}'",
        denied(JOBS_UPDATE_POLICY),
    ),
    (
        "insert a job for a user",
        "insert into provisioner_jobs (organization_id, initiator_id, type) "
        "values ('{organization}', '{user}', 'workspace_build')",
        denied(JOBS_INSERT_POLICY),
    ),
    (
        "insert a template import job",
        "insert into provisioner_jobs (organization_id, initiator_id, type) "
        "values ('{organization}', '{prebuilds}', 'template_version_import')",
        denied(JOBS_INSERT_POLICY),
    ),
    ("notify the claimer of a prebuild", message_to("claimer"), denied(RECIPIENTS_POLICY)),
    (
        "notify a template administrator of another organization",
        message_to("other_organization_admin"),
        denied(RECIPIENTS_POLICY),
    ),
    (
        "notify with the platform's template",
        message_to("admin", template="{platform_template}"),
        # Both of the outbox's insert policies refuse it; the server names the first.
        denied("prebuilds_reconciler_(own_outbox|notifies_template_admins)"),
    ),
    (
        "notify with another kind's template",
        message_to("admin", template=str(RECOVERED_TEMPLATE), kind="hard_limited"),
        denied(RECIPIENTS_POLICY),
    ),
    (
        "a notification about no preset",
        "insert into notification_messages (notification_template_id, user_id, kind, dedupe_key) "
        f"values ('{HARD_LIMITED_TEMPLATE}', '{{admin}}', 'hard_limited', 'intruder')",
        denied(RECIPIENTS_POLICY),
    ),
    (
        "insert a message already sent",
        "insert into notification_messages (notification_template_id, user_id, kind, preset_id, dedupe_key, status) "
        f"values ('{HARD_LIMITED_TEMPLATE}', '{{admin}}', 'hard_limited', '{{preset}}', 'intruder', 'sent')",
        denied(NOT_GRANTED),
    ),
    (
        "read the platform's notifications",
        "select id from notification_messages where id = '{platform_message}'",
        NO_ROW,
    ),
    (
        "lease the platform's notifications",
        "update notification_messages set leased_until = now() + interval '1 hour' where id = '{platform_message}'",
        NO_ROW,
    ),
    (
        "record a delivery of the platform's notification",
        "insert into notification_deliveries (message_id, sink) values ('{platform_message}', 'webhook:0')",
        denied("prebuilds_reconciler_records_own_deliveries"),
    ),
    ("redirect a notification", "update notification_messages set user_id = '{user}'", denied(NOT_GRANTED)),
    (
        "lower the failure episode by one",
        "update template_version_presets set failure_episode = failure_episode - 1 where id = '{limited_preset}'",
        EPISODE_ONLY_GROWS,
    ),
    # What the daemon never needs at all (issue 8).
    ("drop a table", "drop table workspaces", denied(NOT_OWNER)),
    ("create a table", "create table intruder (id int)", denied("permission denied for schema public")),
    ("add a column", "alter table workspaces add column intruder int", denied(NOT_OWNER)),
    ("change an enum", "alter type prebuild_status add value 'intruder'", denied(NOT_OWNER)),
    ("switch the row policies off", "alter table workspaces disable row level security", denied(NOT_OWNER)),
    ("drop a policy", "drop policy prebuilds_reconciler_deletes_prebuilds on workspaces", denied(NOT_OWNER)),
    (
        "disable a trigger",
        "alter table template_version_presets disable trigger failure_episode_only_grows",
        denied(NOT_OWNER),
    ),
    ("truncate", "truncate provisioner_jobs", denied(NOT_GRANTED)),
    ("delete a workspace row", "delete from workspaces where id = '{prebuild}'", denied(NOT_GRANTED)),
    ("delete the outbox", "delete from notification_messages", denied(NOT_GRANTED)),
    ("make someone an owner", "update users set rbac_roles = '{{owner}}'", denied(NOT_GRANTED)),
    ("add a user", "insert into users (username) values ('intruder')", denied(NOT_GRANTED)),
    ("change a membership", "update organization_members set roles = '{{organization-admin}}'", denied(NOT_GRANTED)),
    (
        "take a workspace",
        "update workspaces set owner_id = '{prebuilds}' where id = '{user_workspace}'",
        denied(NOT_GRANTED),
    ),
    ("rename a workspace", "update workspaces set name = 'intruder' where id = '{prebuild}'", denied(NOT_GRANTED)),
    (
        "change a job's result",
        "update provisioner_jobs set error = 'intruder' where id = '{pending_prebuild_job}'",
        denied(NOT_GRANTED),
    ),
    (
        "take a job",
        "update provisioner_jobs set worker_id = gen_random_uuid() where id = '{pending_prebuild_job}'",
        denied(NOT_GRANTED),
    ),
    ("rewrite a build", "update workspace_builds set transition = 'delete'", denied(NOT_GRANTED)),
    ("publish a version", "update templates set active_version_id = null", denied(NOT_GRANTED)),
    ("change a target", "update template_version_presets set desired_instances = 1000", denied(NOT_GRANTED)),
    (
        "add a version",
        "insert into template_versions (organization_id, name) values ('{organization}', 'x')",
        denied(NOT_GRANTED),
    ),
    ("fake the schema version", "update reconciler_schema_migrations set checksum = 'x'", denied(NOT_GRANTED)),
    ("read preset parameters", "select * from template_version_preset_parameters", denied(NOT_GRANTED)),
    # The prebuilds user's memberships (issue 17): those rows, and nothing else in those tables.
    (
        "make a user a member of an organization",
        "insert into organization_members (organization_id, user_id) values ('{other_organization}', '{user}')",
        denied(MEMBERSHIP_POLICY),
    ),
    (
        "make the prebuilds user an organization admin",
        "insert into organization_members (organization_id, user_id, roles) "
        "values ('{other_organization}', '{prebuilds}', '{{organization-admin}}')",
        denied(MEMBERSHIP_POLICY),
    ),
    (
        "give the prebuilds user a role where it is a member",
        "update organization_members set roles = '{{organization-admin}}' where user_id = '{prebuilds}'",
        denied(NOT_GRANTED),
    ),
    (
        "remove a user from an organization",
        "delete from organization_members where user_id = '{user}'",
        denied(NOT_GRANTED),
    ),
    (
        "create another group",
        "insert into groups (organization_id, name) values ('{other_organization}', 'admins')",
        denied(GROUP_POLICY),
    ),
    (
        "create the prebuilds group with a quota",
        "insert into groups (organization_id, name, display_name, quota_allowance) "
        "values ('{other_organization}', 'coderprebuiltworkspaces', 'Prebuilt Workspaces', 1000)",
        denied(GROUP_POLICY),
    ),
    (
        "raise the prebuilds group's quota",
        "update groups set quota_allowance = 1000 where id = '{prebuilds_group}'",
        denied(NOT_GRANTED),
    ),
    (
        "rename a group",
        "update groups set name = 'coderprebuiltworkspaces' where id = '{platform_group}'",
        denied(NOT_GRANTED),
    ),
    ("delete a group", "delete from groups where id = '{platform_group}'", denied(NOT_GRANTED)),
    (
        "add a user to the prebuilds group",
        "insert into group_members (group_id, user_id) values ('{prebuilds_group}', '{user}')",
        denied(GROUP_MEMBER_POLICY),
    ),
    (
        "add the prebuilds user to the platform's group",
        "insert into group_members (group_id, user_id) values ('{platform_group}', '{prebuilds}')",
        denied(GROUP_MEMBER_POLICY),
    ),
    (
        "add a user to the platform's group",
        "insert into group_members (group_id, user_id) values ('{platform_group}', '{user}')",
        denied(GROUP_MEMBER_POLICY),
    ),
    ("leave a group", "delete from group_members where user_id = '{prebuilds}'", denied(NOT_GRANTED)),
    # The recorded settings: one row, which the role updates but never removes nor doubles.
    (
        "record a second row of settings",
        "insert into reconciler_settings (id, settings, instance, recorded_at, last_pass_at) "
        "values (false, '{{}}', 'x', now(), now())",
        denied(NOT_GRANTED),
    ),
    ("delete the recorded settings", "delete from reconciler_settings", denied(NOT_GRANTED)),
    # Demand: the claim events are the platform's; the daemon only purges old ones.
    ("erase the recent demand", "delete from prebuild_events where id = '{recent_event}'", NO_ROW),
    (
        "invent demand",
        "insert into prebuild_events (preset_id, event_type) values ('{preset}', 'claim_missed')",
        denied(NOT_GRANTED),
    ),
    (
        "backdate demand",
        "update prebuild_events set created_at = now() where id = '{old_event}'",
        denied(NOT_GRANTED),
    ),
    (
        "change a preset's target expression",
        "update template_version_presets set desired_instances_expression = '100' where id = '{preset}'",
        denied(NOT_GRANTED),
    ),
]


ABUSE_STATEMENTS = {abuse: statement for abuse, statement, _ in ABUSES}


@pytest.mark.parametrize(("abuse", "statement", "refusal"), ABUSES, ids=[abuse for abuse, _, _ in ABUSES])
async def test_the_role_is_refused(shared: Shared, abuse: str, statement: str, refusal: Refusal) -> None:
    before = await table_contents(shared.owner)
    sql = shared.platform.sql(statement)
    if refusal.error is not None:
        with pytest.raises(refusal.error, match=refusal.reason):
            await shared.as_role.execute(sql)
    elif sql.lstrip().startswith("select"):
        assert await shared.as_role.fetch(sql) == [], abuse
    else:
        status = await shared.as_role.execute(sql)
        assert status.split()[-1] == "0", (abuse, status)
    assert await table_contents(shared.owner) == before, f"{abuse}: something changed"


async def test_every_statement_of_the_daemon_runs_as_the_role(
    factory: Factory, platform: Platform, as_role: asyncpg.Connection
) -> None:
    """Each named statement, as the daemon runs it, on rows it really writes."""
    owner = factory.connection
    ids = platform.ids
    now = datetime.now(UTC)
    ran: set[str] = set()

    async def run(name: str, *arguments: Any) -> list[asyncpg.Record]:
        ran.add(name)
        return await as_role.fetch(db.queries()[name], *arguments)

    # The snapshot and its companions.
    assert (await run("try_reconciliation_lock", db.RECONCILIATION_LOCK_KEY, "60000"))[0]["locked"] is True
    assert (await run("release_reconciliation_lock", db.RECONCILIATION_LOCK_KEY))[0]["held"] is True
    # The template locks (a targeted pass's, and a full pass's while it writes a template).
    template_lock = (await run("try_template_locks", db.TEMPLATE_LOCK_CLASS, [ids["template"]]))[0]
    assert (template_lock["template_id"], template_lock["locked"]) == (ids["template"], True)
    await run("limit_idle_session", "60000")
    assert (await run("release_template_locks", db.TEMPLATE_LOCK_CLASS, [template_lock["key"]]))[0]["held"] == 1
    await run("limit_idle_session", "0")
    shared_lock = (await run("try_template_locks_shared", db.TEMPLATE_LOCK_CLASS, [ids["template"]]))[0]
    assert shared_lock["locked"] is True
    assert (await run("release_template_locks_shared", db.TEMPLATE_LOCK_CLASS, [shared_lock["key"]]))[0]["held"] == 1
    async with as_role.transaction():
        locked = await run("try_template_locks_in_transaction", db.TEMPLATE_LOCK_CLASS, [ids["template"]])
        assert [row["template_id"] for row in locked] == [ids["template"]]
    assert json.loads((await run("read_prebuilds_settings"))[0]["value"]) == {"reconciliation_paused": False}
    assert {row["id"] for row in await run("snapshot_presets")} >= {ids["preset"], ids["limited_preset"]}
    await run("snapshot_schedules")
    kinds = {row["kind"] for row in await run("snapshot_prebuilds", now - timedelta(hours=1), 3, ["X"], ["Y"])}
    assert "running" in kinds
    in_flight = {row["template_id"]: row["jobs"] for row in await run("snapshot_in_flight")}
    assert in_flight[ids["template"]] == 2  # the pending prebuild and the one a provisioner took
    breaker = (await run("snapshot_breaker", now - timedelta(minutes=10)))[0]
    # Completed create builds in the window: the running prebuild's and the claimed one's.
    assert (breaker["state"], breaker["episode"], breaker["completed"]) == ("closed", 0, 2)
    # The slow start's reads: the pending prebuild's create is in flight; the running prebuild's create
    # succeeded within the window.
    assert (await run("count_prebuild_creates_in_flight"))[0][0] >= 1
    assert (await run("prebuild_create_succeeded_since", now - timedelta(minutes=10)))[0][0] is True
    # The lifetime counters' reads, beside the passes.
    await run("totals_clock")
    totals = {row["preset_id"]: row for row in await run("totals_by_preset")}
    assert totals[ids["preset"]]["claimed"] == 1
    live = await run("totals_live_first_builds")
    assert live
    await run("totals_unfinished_first_builds")
    await run("totals_recent_first_builds", now - timedelta(days=365))
    live_workspaces = [uuid.UUID(text) for text in (await run("totals_live_workspaces"))[0]["ids"].split(",")]
    assert {row["workspace_id"] for row in live} == set(live_workspaces)
    assert len(await run("totals_first_builds_of_workspaces", live_workspaces)) == len(live)
    labels = await run("totals_preset_labels")
    assert ids["preset"] in {row["id"] for row in labels}
    assert (await run("totals_preset_labels_digest"))[0]["digest"].startswith(f"{len(labels)}:")
    waiting = {row["organization_name"]: row["age_seconds"] for row in await run("oldest_pending_prebuild_jobs", now)}
    assert waiting
    assert all(age >= 0 for age in waiting.values())
    # A targeted pass's variants (change events), for the preset's template.
    targets = [ids["template"]]
    assert {row["id"] for row in await run("snapshot_presets_targeted", targets)} == {ids["preset"]}
    await run("snapshot_schedules_targeted", targets)
    targeted = await run("snapshot_prebuilds_targeted", now - timedelta(hours=1), 3, ["X"], ["Y"], targets)
    assert "running" in {row["kind"] for row in targeted}
    assert await run("snapshot_demand_targeted", now, targets) == await run("snapshot_demand", now)
    assert await run("snapshot_demand_targeted", now, [ids["other_organization"]]) == []
    assert [row["claims_5m"] for row in await run("snapshot_demand_one_preset", now, ids["preset"])] == [1]
    demand = await run("snapshot_demand", now)
    assert [(row["preset_id"], row["claims_5m"], row["has_history"]) for row in demand] == [(ids["preset"], 1, True)]
    # The claim/miss counters' reads (with the lifetime counters' refresh): both events, then the recent one.
    assert [tuple(row) for row in await run("claim_events_by_preset")] == [(ids["preset"], 1, 1)]
    assert [row["id"] for row in await run("claim_events_since", now - timedelta(hours=1))] == [ids["recent_event"]]

    # The behaviour settings each pass records, and the read-only commands read.
    assert await run("read_recorded_settings") == []
    await run("record_settings", json.dumps({"RECONCILER_BACKOFF_INTERVAL": "10s"}), "host:1", now)
    await run("record_settings", json.dumps({"RECONCILER_BACKOFF_INTERVAL": "10s"}), "host:1", now + minutes(1))
    recorded = (await run("read_recorded_settings"))[0]
    assert json.loads(recorded["settings"]) == {"RECONCILER_BACKOFF_INTERVAL": "10s"}
    assert (recorded["instance"], recorded["recorded_at"], recorded["last_pass_at"]) == (
        "host:1",
        now,
        now + minutes(1),
    )

    # The purge: old events only (the recent one stays, whatever the cutoff says).
    assert await as_role.execute(db.queries()["purge_prebuild_events"], now + timedelta(days=1), 100) == "DELETE 1"
    ran.add("purge_prebuild_events")
    assert await owner.fetchval("select array_agg(id) from prebuild_events") == [ids["recent_event"]]

    # Pause and resume; the role LISTENs for change events, and its own writes fire the triggers.
    heard: asyncio.Queue[str] = asyncio.Queue()

    def hear(*event: Any) -> None:
        heard.put_nowait(event[3])

    await as_role.add_listener("reconciler_events", hear)
    await run("write_prebuilds_settings", json.dumps({"reconciliation_paused": True}))
    assert await asyncio.wait_for(heard.get(), timeout=10) == "settings:*"
    await as_role.remove_listener("reconciler_events", hear)
    assert json.loads((await run("read_prebuilds_settings"))[0]["value"]) == {"reconciliation_paused": True}

    # Creates, under the in-flight budget's lock and the preset's.
    async with as_role.transaction():
        await run("lock_in_flight_budget", db.IN_FLIGHT_BUDGET_LOCK_KEY)
        assert tuple((await run("count_in_flight", ids["template"]))[0]) == (2, 2)
        assert (await run("lock_preset_for_create", ids["preset"]))[0]["id"] == ids["preset"]
        assert (await run("read_preset_for_create", ids["preset"]))[0]["active"] is True
        assert (await run("count_preset_prebuilds", ids["preset"], ids["template"]))[0][0] == 3
        created = await run(
            "create_prebuilds", ids["preset"], ids["version"], ids["template"], ids["organization"], ["a", "b"], now
        )
    assert len(created) == 2
    # The same, in the batch forms (creates of several presets in one transaction).
    async with as_role.transaction():
        assert [row["id"] for row in await run("lock_presets_for_create", [ids["preset"]])] == [ids["preset"]]
        assert (await run("read_preset_for_create_batch", [ids["preset"]]))[0]["active"] is True
        counted = await run("count_preset_prebuilds_batch", [ids["preset"]], [ids["template"]])
        assert [tuple(row) for row in counted] == [(ids["preset"], ids["template"], 5)]
        batch = await run(
            "create_prebuilds_batch",
            [ids["preset"]] * 2,
            [ids["version"]] * 2,
            [ids["template"]] * 2,
            [ids["organization"]] * 2,
            ["c", "d"],
            now,
        )
    assert [row["preset_id"] for row in batch] == [ids["preset"]] * 2

    # A delete of a running prebuild (an extraneous one re-counts the others first: the claimed one is not
    # a live prebuild), and a cancel of a pending first build on an outdated version.
    assert (await run("count_prebuilds_still_live", [ids["prebuild"], ids["claimed"]]))[0][0] == 1
    assert [row["workspace_id"] for row in await run("delete_prebuilds", [ids["prebuild"], ids["claimed"]], now)] == [
        ids["prebuild"]
    ]
    await factory.version(platform.preset.template, active=True)
    canceled = await run("cancel_pending_prebuilds", ids["preset"], now)
    assert len(canceled) == 5  # the pending prebuild and the four just created (two by the batch form)

    # Status changes and an operator's reset.
    assert [tuple(row) for row in await run("mark_presets_status", [ids["preset"]], "hard_limited", now)] == [
        (ids["preset"], 1)
    ]
    assert len(await run("mark_presets_recovered", [ids["preset"]], now)) == 1
    assert (await run("reset_preset", ids["limited_preset"], now))[0][0] == "hard_limited"
    assert (await run("invalidate_preset", ids["preset"], now))[0]["id"] == ids["preset"]

    # The outbox: each kind with its template, to the site's template administrator.
    enqueued = await run(
        "enqueue_notifications",
        [HARD_LIMITED_TEMPLATE, VALIDATION_FAILED_TEMPLATE, RECOVERED_TEMPLATE],
        [ids["preset"]] * 3,
        [1, 2, 2],
        ["hard_limited", "validation_failed", "recovered"],
        ["{}"] * 3,
    )
    assert {(row["kind"], row["user_id"]) for row in enqueued} == {
        ("hard_limited", ids["admin"]),
        ("validation_failed", ids["admin"]),
        ("recovered", ids["admin"]),
    }
    assert len(await run("list_notifications", 50)) == 3  # the platform's message is not the daemon's
    token = uuid.uuid4()
    # Due: the messages are due from the server's now() at their insert, after `now` was taken.
    later = datetime.now(UTC) + timedelta(minutes=1)
    leased = await run("lease_notifications", later, later + timedelta(minutes=1), token, 10)
    assert len(leased) == 3
    for message in leased:
        await run("record_notification_delivery", message["id"], "webhook:0", now)
        finished = await run("finish_notification_attempt", message["id"], token, "sent", None, None, later, later)
        assert len(finished) == 1
    assert (await run("notification_backlog"))[0]["pending"] == 0
    assert await owner.fetchval("select count(*) from notification_deliveries") == 3

    # The breaker: opened (its episode and its one notification, to the site's template administrator),
    # then closed; a second writer from the same state changes nothing.
    async with as_role.transaction():
        assert (
            await run("write_breaker", "closed", 0, "open", 1, now, now + timedelta(minutes=5), timedelta(minutes=5))
        )[0]["episode"] == 1
        await run("open_breaker_episode", 1, now, now - timedelta(minutes=10), "4 of 6 builds failed")
        breaker_messages = await run(
            "enqueue_breaker_notification",
            uuid.UUID("f045ca47-72a8-4ca6-9606-5a0120f177ed"),
            "breaker_opened",
            1,
            json.dumps({"reason": "x"}),
        )
        assert [row["user_id"] for row in breaker_messages] == [ids["admin"]]
    assert await run("write_breaker", "closed", 0, "open", 1, now, now, timedelta(minutes=5)) == []
    assert (await run("close_breaker_episode", 1, now))[0]["reason"] == "4 of 6 builds failed"
    await owner.execute("delete from notification_messages where kind like 'breaker_%'")

    # The prebuilds user's memberships: in the hard-limited preset's organization, which has none yet.
    memberships = {row["organization_id"]: row for row in await run("read_prebuilds_memberships")}
    assert tuple(memberships[ids["organization"]])[2:] == (True, True, True)
    limited_organization = await owner.fetchval(
        "select t.organization_id from template_version_presets p "
        "join template_versions tv on tv.id = p.template_version_id join templates t on t.id = tv.template_id "
        "where p.id = $1",
        ids["limited_preset"],
    )
    assert tuple(memberships[limited_organization])[2:] == (False, False, False)
    # A targeted pass's read: the organizations of its templates only.
    targeted_memberships = await run("read_prebuilds_memberships_targeted", [ids["template"]])
    assert [row["organization_id"] for row in targeted_memberships] == [ids["organization"]]
    async with as_role.transaction():
        for statement in ("add_prebuilds_organization_members", "add_prebuilds_groups", "add_prebuilds_group_members"):
            added = await run(statement, [ids["organization"], limited_organization])
            assert [row["organization_id"] for row in added] == [limited_organization], statement
    memberships = {row["organization_id"]: row for row in await run("read_prebuilds_memberships")}
    assert tuple(memberships[limited_organization])[2:] == (True, True, True)

    missing = daemon_statement_names() - ran
    assert not missing, (
        f"statements {sorted(missing)} are not run as the daemon's role here: add them (and their grants and "
        "policies in sql/roles/reconciler_role.sql), or, for a test tool's file, add it to TOOL_QUERY_FILES"
    )


async def role_state(connection: asyncpg.Connection) -> dict[str, Any]:
    """What the role holds in this database: table and column privileges, row policies, RLS switches."""
    tables = await connection.fetch(
        "select c.relname, acl.privilege_type from pg_class c cross join aclexplode(c.relacl) acl "
        "where acl.grantee = $1::regrole order by 1, 2",
        GROUP_ROLE,
    )
    columns = await connection.fetch(
        "select c.relname, a.attname, acl.privilege_type "
        "from pg_attribute a join pg_class c on c.oid = a.attrelid cross join aclexplode(a.attacl) acl "
        "where acl.grantee = $1::regrole order by 1, 2, 3",
        GROUP_ROLE,
    )
    policies = await connection.fetch(
        "select tablename, policyname, permissive, roles::text[], cmd, qual, with_check from pg_policies "
        "where schemaname = 'public' order by 1, 2"
    )
    switches = await connection.fetch(
        "select relname, relrowsecurity, relforcerowsecurity from pg_class "
        "where relnamespace = 'public'::regnamespace and relkind = 'r' order by 1"
    )
    return {
        "tables": [tuple(row) for row in tables],
        "columns": [tuple(row) for row in columns],
        "policies": [tuple(row) for row in policies],
        "switches": [tuple(row) for row in switches],
    }


async def test_the_script_converges_however_often_and_from_wherever_it_runs(
    connection: asyncpg.Connection, database_url: str
) -> None:
    await run_role_script(connection)
    first = await role_state(connection)
    assert ("workspaces", "owner_id", "UPDATE") not in first["columns"]
    assert ("site_configs", True, False) in first["switches"]

    # What an older version of the script (or a hand) left: wider grants, a stale policy, a switch off.
    await connection.execute(
        """
        grant delete, truncate on workspaces to prebuilds_reconciler;
        grant update (owner_id) on workspaces to prebuilds_reconciler;
        create policy prebuilds_reconciler_stale on users to prebuilds_reconciler using (true);
        alter table site_configs disable row level security;
        """
    )
    assert await role_state(connection) != first
    await run_role_script(connection)
    assert await role_state(connection) == first

    # Several deploy steps running it at once: each one succeeds, and the outcome is the same.
    others = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        await asyncio.gather(*(run_role_script(other) for other in others))
    finally:
        for other in others:
            await other.close()
    assert await role_state(connection) == first


async def test_the_platforms_roles_keep_what_their_grants_give(
    factory: Factory, platform: Platform, database_url: str
) -> None:
    """Row security is on for the platform's tables, but narrows the daemon's role only: a role of the
    platform that is not the owner (and not in the daemon's group) does what its grants allow."""
    assert await factory.connection.fetch("select relname from pg_class where relforcerowsecurity") == []
    async with login_role(database_url, member_of=None) as dsn:
        user = urlsplit(dsn).username
        await factory.connection.execute(
            await factory.connection.fetchval(
                "select format('grant select, insert, update on all tables in schema public to %I', $1::text)", user
            )
        )
        platform_role = await db.connect(dsn)
        try:
            assert await platform_role.fetchval("select value from site_configs where key = 'app_signing_key'") == (
                "SECRET-SIGNING-KEY"
            )
            assert await platform_role.execute(platform.sql(ABUSE_STATEMENTS["mark a user's workspace deleted"])) == (
                "UPDATE 1"
            )
            assert await platform_role.execute(platform.sql(ABUSE_STATEMENTS["cancel a user's job"])) == "UPDATE 1"
            await platform_role.execute(platform.sql(ABUSE_STATEMENTS["add a delete build to a claimed workspace"]))
            await platform_role.execute(platform.sql(ABUSE_STATEMENTS["notify a user who administers no template"]))
            assert (
                await platform_role.fetchval(
                    platform.sql("select count(*) from notification_messages where id = '{platform_message}'")
                )
                == 1
            )
            # The episode rule is the schema's: it holds for every role.
            with pytest.raises(asyncpg.CheckViolationError):
                await platform_role.execute(platform.sql(ABUSE_STATEMENTS["reset the failure episode to 0"]))
        finally:
            await platform_role.close()


SNAPSHOT_STATEMENTS = (
    "snapshot_prebuilds",
    "snapshot_presets",
    "snapshot_schedules",
    "snapshot_in_flight",
    "totals_by_preset",
    "totals_live_first_builds",
    "totals_unfinished_first_builds",
    "totals_recent_first_builds",
    "snapshot_breaker",
    "count_prebuild_creates_in_flight",
    "prebuild_create_succeeded_since",
    "snapshot_demand",
    "totals_live_workspaces",
    "claim_events_by_preset",
    "claim_events_since",
)


async def test_the_snapshot_plans_as_the_role_are_the_owners(connection: asyncpg.Connection, role_dsn: str) -> None:
    """No row policy reaches the snapshot's reads, on a fleet with history: the role's plans read the same
    tables as the owner's, with the same filters and no other (a policy shows as an extra filter, or as a
    subquery reading another table), and live prebuilds come through their partial index.

    The plans are not compared node for node: on a table with row security, PostgreSQL 16 and newer keep
    non-leakproof operators away from the column statistics for a user who is not the owner, so the
    estimates, and with them the join order between the snapshot's small CTEs, may differ (seen on the
    embedded server; node for node the same on PostgreSQL 15). What a policy would change is the reads.
    """
    generated = await fleet.generate(
        connection, fleet.FleetParameters(presets=200, desired=5, outdated_presets=40, history_builds=30_000)
    )
    arguments: dict[str, tuple[object, ...]] = {
        "snapshot_prebuilds": (generated.now - timedelta(hours=1), 3, ["X"], ["Y"]),
        "totals_recent_first_builds": (generated.now - timedelta(hours=1),),
        "snapshot_breaker": (generated.now - timedelta(minutes=10),),
        "prebuild_create_succeeded_since": (generated.now - timedelta(minutes=10),),
        "snapshot_demand": (generated.now,),
        "claim_events_since": (generated.now - timedelta(hours=1),),
    }
    role = await db.connect(role_dsn)
    try:
        for name in SNAPSHOT_STATEMENTS:
            role_plan = await explain(role, name, *arguments.get(name, ()))
            owner_plan = await explain(connection, name, *arguments.get(name, ()))
            assert table_reads(role_plan) == table_reads(owner_plan), name
            if name == "snapshot_prebuilds":
                indexes = {node.get("Index Name") for node in role_plan}
                assert {"workspaces_live_prebuilds_idx", "workspaces_owner_live_idx"} & indexes
    finally:
        await role.close()


def table_reads(plan: list[dict[str, Any]]) -> set[tuple[str, frozenset[str] | None]]:
    """Each table a plan reads, with each filter it reads it with (as its conjuncts: on a table with row
    security, PostgreSQL orders a non-owner's conditions leakproof ones first, the owner's by cost)."""
    return {
        (node["Relation Name"], conjuncts(node["Filter"]) if "Filter" in node else None)
        for node in plan
        if "Relation Name" in node
    }


def conjuncts(condition: str) -> frozenset[str]:
    """The top-level AND terms of an EXPLAIN condition: "((a) AND (b = 1))" -> {"(a)", "(b = 1)"}."""
    if condition.startswith("(") and condition.endswith(")"):
        depth = 0
        for index, character in enumerate(condition):
            depth += {"(": 1, ")": -1}.get(character, 0)
            if depth == 0 and index < len(condition) - 1:
                break
        else:
            condition = condition[1:-1]
    terms, depth, start = [], 0, 0
    for index, character in enumerate(condition):
        depth += {"(": 1, ")": -1}.get(character, 0)
        if depth == 0 and condition.startswith(" AND ", index):
            terms.append(condition[start:index])
            start = index + len(" AND ")
    terms.append(condition[start:])
    return frozenset(terms)


async def test_the_outbox_policy_keeps_the_dispatchers_poll_on_its_index(
    factory: Factory, connection: asyncpg.Connection, role_dsn: str
) -> None:
    """The outbox's row policy is a constant filter on the daemon's templates: leasing and the backlog
    gauge, as the role, have the owner's plans (the due index, no scan of the history) on an outbox of
    10,000 sent messages and 3 pending ones."""
    version = await factory.version()
    admin = await factory.user(site_roles=["template-admin"])
    await connection.execute(
        "insert into template_version_presets (template_version_id, name, desired_instances) "
        "select $1, 'preset-' || i, 1 from generate_series(1, 500) i",
        version.id,
    )
    await connection.execute(
        """
        insert into notification_messages (notification_template_id, user_id, payload, status, dedupe_key, kind,
                                           preset_id, episode, attempts, sent_at, created_at)
        select $1, $2, '{}', 'sent', 'hard_limited:' || p.id || ':' || e || ':' || $2::uuid::text, 'hard_limited',
               p.id, e, 1, now() - make_interval(days => e), now() - make_interval(days => e)
        from template_version_presets p, generate_series(1, 20) e
        where p.template_version_id = $3
        """,
        HARD_LIMITED_TEMPLATE,
        admin.id,
        version.id,
    )
    await connection.execute(
        "update notification_messages set status = 'pending', sent_at = null "
        "where id in (select id from notification_messages where episode = 1 limit 3)"
    )
    await connection.execute("analyze notification_messages")
    await connection.execute("analyze template_version_presets")
    now = datetime.now(UTC)
    token = uuid.uuid4()
    role = await db.connect(role_dsn)
    try:
        for name, arguments in (("lease_notifications", (now, now, token, 20)), ("notification_backlog", ())):
            plan = await explain_shape(role, name, *arguments)
            assert plan == await explain_shape(connection, name, *arguments), name
            assert "notification_messages_due_idx" in {index for _, _, index in plan}, name
        assert await role.fetchval(db.queries()["notification_backlog"]) == 3
    finally:
        await role.close()


async def explain_shape(connection: asyncpg.Connection, name: str, *arguments: object) -> list[tuple[Any, ...]]:
    document = await connection.fetchval(f"explain (format json) {db.queries()[name]}", *arguments)
    parsed = json.loads(document) if isinstance(document, str) else document
    return [
        (node["Node Type"], node.get("Relation Name"), node.get("Index Name")) for node in plan_nodes(parsed[0]["Plan"])
    ]
