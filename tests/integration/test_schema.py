"""The contract schema: columns as CONTRACTS.md fixes them, derived job status, and the constraints that
keep bad rows out."""

import itertools
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from tests.factories import Factory

T = datetime(2026, 1, 1, tzinfo=UTC)
SYSTEM_USER = "c42fdf75-3097-471c-8c33-fb52454d81c0"
CONTRACTS = Path(__file__).resolve().parents[2] / "docs" / "CONTRACTS.md"

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


def contract_job_status(
    started: datetime | None, canceled: datetime | None, completed: datetime | None, error: str | None
) -> str:
    """CONTRACTS.md's definition of `job_status`, sentence by sentence."""
    failed = error is not None and error != ""
    if completed is not None:
        if failed:
            return "failed"
        return "canceled" if canceled is not None else "succeeded"
    if failed:
        return "failed"
    if canceled is not None:
        return "canceling"
    return "pending" if started is None else "running"


@pytest.mark.parametrize(("started", "canceled", "completed", "error", "expected"), JOB_STATUS_CASES)
def test_the_definition_used_below_agrees_with_worked_cases(
    started: datetime | None, canceled: datetime | None, completed: datetime | None, error: str | None, expected: str
) -> None:
    assert contract_job_status(started, canceled, completed, error) == expected


async def test_job_status_for_every_combination_of_timestamps_and_error(factory: Factory) -> None:
    organization = await factory.organization()
    timestamps = (None, T)
    # Null, empty, blank (non-empty: it counts as an error) and a real message.
    errors = (None, "", " ", "boom")
    combinations = list(itertools.product(timestamps, timestamps, timestamps, errors))
    assert len(combinations) == 32
    wrong = []
    for started, canceled, completed, error in combinations:
        status = await factory.connection.fetchval(
            "insert into provisioner_jobs (organization_id, initiator_id, started_at, canceled_at, completed_at,"
            " error) values ($1, $2, $3, $4, $5, $6) returning job_status::text",
            organization.id,
            uuid.UUID(SYSTEM_USER),
            started,
            canceled,
            completed,
            error,
        )
        expected = contract_job_status(started, canceled, completed, error)
        if status != expected:
            wrong.append((started, canceled, completed, error, status, expected))
    assert wrong == []
    # Every status but `unknown` (which no combination of columns gives) is reachable.
    statuses = await factory.connection.fetch("select distinct job_status::text as status from provisioner_jobs")
    assert {row["status"] for row in statuses} == {
        "pending",
        "running",
        "succeeded",
        "canceling",
        "canceled",
        "failed",
    }


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


# --- columns, as `\d` shows them ------------------------------------------------------------------------

UUID, TEXT, TIMESTAMPTZ, INTEGER, BOOLEAN = "uuid", "text", "timestamp with time zone", "integer", "boolean"
NULL, NOT_NULL = True, False

# table -> column -> (type, nullable, default or None). What CONTRACTS.md section 1 fixes, column by column.
CONTRACT_TABLES: dict[str, dict[str, tuple[str, bool, str | None]]] = {
    "organizations": {
        "id": (UUID, NOT_NULL, None),
        "name": (TEXT, NOT_NULL, None),
        "created_at": (TIMESTAMPTZ, NOT_NULL, None),
    },
    "users": {
        "id": (UUID, NOT_NULL, None),
        "username": (TEXT, NOT_NULL, None),
        "email": (TEXT, NOT_NULL, None),
        "status": (TEXT, NOT_NULL, None),
        "rbac_roles": ("text[]", NOT_NULL, None),
        "deleted": (BOOLEAN, NOT_NULL, "false"),
        "is_system": (BOOLEAN, NOT_NULL, "false"),
        "created_at": (TIMESTAMPTZ, NOT_NULL, None),
    },
    "organization_members": {
        "organization_id": (UUID, NOT_NULL, None),
        "user_id": (UUID, NOT_NULL, None),
        "roles": ("text[]", NOT_NULL, None),
    },
    "templates": {
        "id": (UUID, NOT_NULL, None),
        "organization_id": (UUID, NOT_NULL, None),
        "name": (TEXT, NOT_NULL, None),
        "active_version_id": (UUID, NULL, None),
        "deleted": (BOOLEAN, NOT_NULL, "false"),
        "deprecated": (TEXT, NOT_NULL, "''::text"),
        "created_at": (TIMESTAMPTZ, NOT_NULL, None),
        "updated_at": (TIMESTAMPTZ, NOT_NULL, None),
    },
    "template_versions": {
        "id": (UUID, NOT_NULL, None),
        # Nullable, as in Coder: a version may be uploaded before its template exists (see the migration).
        "template_id": (UUID, NULL, None),
        "organization_id": (UUID, NOT_NULL, None),
        "name": (TEXT, NOT_NULL, None),
        "created_at": (TIMESTAMPTZ, NOT_NULL, None),
    },
    "template_version_presets": {
        "id": (UUID, NOT_NULL, None),
        "template_version_id": (UUID, NOT_NULL, None),
        "name": (TEXT, NOT_NULL, None),
        "desired_instances": (INTEGER, NULL, None),
        "invalidate_after_secs": (INTEGER, NULL, None),
        "scheduling_timezone": (TEXT, NOT_NULL, "''::text"),
        "prebuild_status": ("prebuild_status", NOT_NULL, "'normal'::prebuild_status"),
        "last_invalidated_at": (TIMESTAMPTZ, NULL, None),
        "created_at": (TIMESTAMPTZ, NOT_NULL, None),
    },
    "template_version_preset_parameters": {
        "id": (UUID, NOT_NULL, None),
        "template_version_preset_id": (UUID, NOT_NULL, None),
        "name": (TEXT, NOT_NULL, None),
        "value": (TEXT, NOT_NULL, None),
    },
    "template_version_preset_prebuild_schedules": {
        "id": (UUID, NOT_NULL, None),
        "preset_id": (UUID, NOT_NULL, None),
        "cron_expression": (TEXT, NOT_NULL, None),
        "desired_instances": (INTEGER, NOT_NULL, None),
    },
    "workspaces": {
        "id": (UUID, NOT_NULL, None),
        "owner_id": (UUID, NOT_NULL, None),
        "organization_id": (UUID, NOT_NULL, None),
        "template_id": (UUID, NOT_NULL, None),
        "name": (TEXT, NOT_NULL, None),
        "deleted": (BOOLEAN, NOT_NULL, "false"),
        "created_at": (TIMESTAMPTZ, NOT_NULL, None),
        "updated_at": (TIMESTAMPTZ, NOT_NULL, None),
    },
    "workspace_builds": {
        "id": (UUID, NOT_NULL, None),
        "workspace_id": (UUID, NOT_NULL, None),
        "build_number": (INTEGER, NOT_NULL, None),
        "transition": ("workspace_transition", NOT_NULL, None),
        "template_version_id": (UUID, NOT_NULL, None),
        "template_version_preset_id": (UUID, NULL, None),
        "job_id": (UUID, NOT_NULL, None),
        "initiator_id": (UUID, NOT_NULL, None),
        "reason": ("build_reason", NOT_NULL, "'initiator'::build_reason"),
        "created_at": (TIMESTAMPTZ, NOT_NULL, None),
    },
    "provisioner_jobs": {
        "id": (UUID, NOT_NULL, None),
        "organization_id": (UUID, NOT_NULL, None),
        "initiator_id": (UUID, NOT_NULL, None),
        "type": (TEXT, NOT_NULL, "'workspace_build'::text"),
        "input": ("jsonb", NOT_NULL, None),
        "worker_id": (UUID, NULL, None),
        "created_at": (TIMESTAMPTZ, NOT_NULL, None),
        "started_at": (TIMESTAMPTZ, NULL, None),
        "canceled_at": (TIMESTAMPTZ, NULL, None),
        "completed_at": (TIMESTAMPTZ, NULL, None),
        "error": (TEXT, NULL, None),
        "error_code": (TEXT, NULL, None),
        "job_status": ("provisioner_job_status", NOT_NULL, None),
    },
    "workspace_agents": {
        "id": (UUID, NOT_NULL, None),
        "job_id": (UUID, NOT_NULL, None),
        "name": (TEXT, NOT_NULL, None),
        "lifecycle_state": ("workspace_agent_lifecycle_state", NOT_NULL, None),
        "parent_id": (UUID, NULL, None),
        "deleted": (BOOLEAN, NOT_NULL, "false"),
        "created_at": (TIMESTAMPTZ, NOT_NULL, None),
    },
    "site_configs": {
        "key": (TEXT, NOT_NULL, None),
        "value": (TEXT, NOT_NULL, None),
    },
    "notification_templates": {
        "id": (UUID, NOT_NULL, None),
        "name": (TEXT, NOT_NULL, None),
        "title_template": (TEXT, NOT_NULL, None),
        "body_template": (TEXT, NOT_NULL, None),
    },
    "notification_messages": {
        "id": (UUID, NOT_NULL, None),
        "notification_template_id": (UUID, NOT_NULL, None),
        # Nullable: a message for a template without administrators is still recorded (see the migration).
        "user_id": (UUID, NULL, None),
        "payload": ("jsonb", NOT_NULL, None),
        "status": (TEXT, NOT_NULL, None),
        "created_at": (TIMESTAMPTZ, NOT_NULL, None),
    },
}

# Nullable in the schema though the contract does not say `null`, each for the reason noted above.
NULLABLE_BEYOND_THE_CONTRACT = {("template_versions", "template_id"), ("notification_messages", "user_id")}


async def describe(connection: asyncpg.Connection, table: str) -> dict[str, tuple[str, bool, str | None, str]]:
    """What `\\d table` shows: column -> (type, nullable, default, generated ('s' for stored, else ''))."""
    rows = await connection.fetch(
        "select a.attname, format_type(a.atttypid, a.atttypmod) as type, not a.attnotnull as nullable,"
        " case when a.attgenerated = '' then pg_get_expr(d.adbin, d.adrelid) end as default,"
        " a.attgenerated::text as generated"
        " from pg_attribute a left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum"
        " where a.attrelid = $1::regclass and a.attnum > 0 and not a.attisdropped",
        table,
    )
    return {row["attname"]: (row["type"], row["nullable"], row["default"], row["generated"]) for row in rows}


async def test_every_contract_column_has_its_type_nullability_and_default(connection: asyncpg.Connection) -> None:
    wrong = []
    for table, columns in CONTRACT_TABLES.items():
        described = await describe(connection, table)
        for column, (expected_type, nullable, default) in columns.items():
            if column not in described:
                wrong.append(f"{table}.{column}: missing")
                continue
            found_type, found_nullable, found_default, _ = described[column]
            if found_type != expected_type:
                wrong.append(f"{table}.{column}: type {found_type}, expected {expected_type}")
            if found_nullable != nullable:
                wrong.append(f"{table}.{column}: {'nullable' if found_nullable else 'not null'}")
            if default is not None and found_default != default:
                wrong.append(f"{table}.{column}: default {found_default}, expected {default}")
    assert wrong == []


async def test_ids_are_uuid_primary_keys_with_a_default(connection: asyncpg.Connection) -> None:
    for table, columns in CONTRACT_TABLES.items():
        keys = await connection.fetch(
            "select a.attname from pg_index i join pg_attribute a on a.attrelid = i.indrelid"
            " and a.attnum = any(i.indkey) where i.indrelid = $1::regclass and i.indisprimary",
            table,
        )
        primary_key = sorted(row["attname"] for row in keys)
        if table == "organization_members":
            assert primary_key == ["organization_id", "user_id"]
        elif table == "site_configs":
            assert primary_key == ["key"]
        else:
            assert "id" in columns
            assert primary_key == ["id"], table
            # Other components insert rows without inventing ids; fixed rows name theirs.
            if table != "notification_templates":
                assert (await describe(connection, table))["id"][2] == "gen_random_uuid()", table


async def test_job_status_is_a_stored_generated_column(connection: asyncpg.Connection) -> None:
    _, _, _, generated = (await describe(connection, "provisioner_jobs"))["job_status"]
    assert generated == "s"


def _contract_columns(markdown: str) -> dict[str, dict[str, str]]:
    """Section 1's table: table -> column -> the contract's words about that column."""
    section = markdown.partition("## 1.")[2].partition("## 2.")[0]
    tables: dict[str, dict[str, str]] = {}
    for match in re.finditer(r"^\| ([a-z_]+) \| (.+) \|$", section, re.MULTILINE):
        table, text = match.groups()
        if table == "table":
            continue
        parts, depth, current = [], 0, ""
        for character in text:
            depth += {"(": 1, ")": -1}.get(character, 0)
            if character == "," and depth == 0:
                parts.append(current.strip())
                current = ""
            else:
                current += character
        parts.append(current.strip())
        tables[table] = {}
        for part in parts:
            name = re.match(r"`?([a-z_]+)", part)
            assert name is not None, part
            tables[table][name.group(1)] = part
    return tables


def test_the_expected_columns_are_those_of_the_contract_document() -> None:
    document = _contract_columns(CONTRACTS.read_text(encoding="utf-8"))
    assert set(document) == set(CONTRACT_TABLES)
    for table, columns in document.items():
        assert set(columns) == set(CONTRACT_TABLES[table]), table
        for column, words in columns.items():
            expected_type, nullable, default = CONTRACT_TABLES[table][column]
            said_nullable = bool(re.search(r"\bnull(able)?\b", words)) and "not null" not in words
            if (table, column) not in NULLABLE_BEYOND_THE_CONTRACT:
                assert nullable == said_nullable, f"{table}.{column}: {words}"
            said_default = re.search(r"default (\S+)", words)
            if said_default is not None:
                assert default is not None, f"{table}.{column}: {words}"
                assert said_default.group(1).strip("'`") in default, f"{table}.{column}: {words}"
            for word, type_name in (("int", INTEGER), ("text[]", "text[]"), ("jsonb", "jsonb"), ("bool", BOOLEAN)):
                if re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", words):
                    assert expected_type == type_name, f"{table}.{column}: {words}"
            if column == "id" or column.endswith("_id"):
                assert expected_type == UUID, f"{table}.{column}"
            if column.endswith("_at"):
                assert expected_type == TIMESTAMPTZ, f"{table}.{column}"


# --- constraints ----------------------------------------------------------------------------------------

# (what, statement, the error PostgreSQL must raise). `{name}` are ids of the rows built below.
BAD_ROWS: list[tuple[str, str, type[asyncpg.PostgresError]]] = [
    (
        "two organizations with one name",
        "insert into organizations (name) values ('{organization_name}')",
        asyncpg.UniqueViolationError,
    ),
    ("an organization without a name", "insert into organizations (name) values ('')", asyncpg.CheckViolationError),
    ("two users with one username", "insert into users (username) values ('prebuilds')", asyncpg.UniqueViolationError),
    (
        "a member twice",
        "insert into organization_members (organization_id, user_id) values ('{organization}', '{user}')",
        asyncpg.UniqueViolationError,
    ),
    (
        "a member that is no user",
        "insert into organization_members (organization_id, user_id) values ('{organization}', '{unknown}')",
        asyncpg.ForeignKeyViolationError,
    ),
    (
        "a template of no organization",
        "insert into templates (organization_id, name) values ('{unknown}', 'x')",
        asyncpg.ForeignKeyViolationError,
    ),
    (
        "a version of no template",
        "insert into template_versions (template_id, organization_id, name) values"
        " ('{unknown}', '{organization}', 'v')",
        asyncpg.ForeignKeyViolationError,
    ),
    (
        "a preset without a name",
        "insert into template_version_presets (template_version_id, name) values ('{version}', '')",
        asyncpg.CheckViolationError,
    ),
    (
        "a preset of no version",
        "insert into template_version_presets (template_version_id, name) values ('{unknown}', 'p')",
        asyncpg.ForeignKeyViolationError,
    ),
    (
        "a parameter twice",
        "insert into template_version_preset_parameters (template_version_preset_id, name, value)"
        " values ('{preset}', 'region', 'us'), ('{preset}', 'region', 'eu')",
        asyncpg.UniqueViolationError,
    ),
    (
        "a schedule of no preset",
        "insert into template_version_preset_prebuild_schedules (preset_id,"
        " cron_expression, desired_instances) values ('{unknown}', '* * * * *', 1)",
        asyncpg.ForeignKeyViolationError,
    ),
    (
        "a workspace of no user",
        "insert into workspaces (owner_id, organization_id, template_id, name) values"
        " ('{unknown}', '{organization}', '{template}', 'w')",
        asyncpg.ForeignKeyViolationError,
    ),
    (
        "a workspace without a name",
        "insert into workspaces (owner_id, organization_id, template_id, name) values"
        " ('{user}', '{organization}', '{template}', null)",
        asyncpg.NotNullViolationError,
    ),
    (
        "two live workspaces of one owner with one name",
        "insert into workspaces (owner_id, organization_id,"
        " template_id, name) values ('{system}', '{organization}', '{template}', upper('{workspace_name}'))",
        asyncpg.UniqueViolationError,
    ),
    (
        "a build with an unknown transition",
        "update workspace_builds set transition = 'restart' where id = '{build}'",
        asyncpg.InvalidTextRepresentationError,
    ),
    (
        "a build with an unknown reason",
        "update workspace_builds set reason = 'whim' where id = '{build}'",
        asyncpg.InvalidTextRepresentationError,
    ),
    (
        "a build of no workspace",
        "update workspace_builds set workspace_id = '{unknown}' where id = '{build}'",
        asyncpg.ForeignKeyViolationError,
    ),
    (
        "a build of no version",
        "update workspace_builds set template_version_id = '{unknown}' where id = '{build}'",
        asyncpg.ForeignKeyViolationError,
    ),
    (
        "a build of no preset",
        "update workspace_builds set template_version_preset_id = '{unknown}' where id = '{build}'",
        asyncpg.ForeignKeyViolationError,
    ),
    (
        "two builds of one job",
        "insert into workspace_builds (workspace_id, build_number, transition,"
        " template_version_id, job_id, initiator_id) values ('{workspace}', 2, 'stop', '{version}', '{job}',"
        " '{system}')",
        asyncpg.UniqueViolationError,
    ),
    (
        "a job of an unknown type",
        "insert into provisioner_jobs (organization_id, initiator_id, type) values"
        " ('{organization}', '{system}', 'bogus')",
        asyncpg.CheckViolationError,
    ),
    (
        "a job started by no user",
        "insert into provisioner_jobs (organization_id, initiator_id) values ('{organization}', '{unknown}')",
        asyncpg.ForeignKeyViolationError,
    ),
    (
        "an agent in an unknown state",
        "update workspace_agents set lifecycle_state = 'asleep' where job_id = '{job}'",
        asyncpg.InvalidTextRepresentationError,
    ),
    (
        "an agent of no job",
        "insert into workspace_agents (job_id, name) values ('{unknown}', 'main')",
        asyncpg.ForeignKeyViolationError,
    ),
    (
        "an agent of no parent",
        "insert into workspace_agents (job_id, name, parent_id) values ('{job}', 'sub', '{unknown}')",
        asyncpg.ForeignKeyViolationError,
    ),
    (
        "a site setting twice",
        "insert into site_configs (key, value) values ('k', '1'), ('k', '2')",
        asyncpg.UniqueViolationError,
    ),
    (
        "a notification template name twice",
        "insert into notification_templates (id, name, title_template,"
        " body_template) values ('{unknown}', 'Prebuild Failure Limit Reached', 't', 'b')",
        asyncpg.UniqueViolationError,
    ),
    (
        "a message of no template",
        "insert into notification_messages (notification_template_id, dedupe_key) values ('{unknown}', 'k1')",
        asyncpg.ForeignKeyViolationError,
    ),
    (
        "a message in an unknown status",
        "insert into notification_messages (notification_template_id, status,"
        " dedupe_key) values ('414d9331-c1fc-4761-b40c-d1f4702279eb', 'lost', 'k2')",
        asyncpg.CheckViolationError,
    ),
    (
        "a message to no user",
        "insert into notification_messages (notification_template_id, user_id, dedupe_key)"
        " values ('414d9331-c1fc-4761-b40c-d1f4702279eb', '{unknown}', 'k3')",
        asyncpg.ForeignKeyViolationError,
    ),
]


async def test_constraints_reject_bad_rows(factory: Factory) -> None:
    organization = await factory.organization()
    user = await factory.user(organization=organization)
    preset = await factory.preset(await factory.version(await factory.template(organization)))
    workspace = await factory.prebuild(preset)
    ids = {
        "organization": organization.id,
        "organization_name": organization.name,
        "user": user.id,
        "system": SYSTEM_USER,
        "template": preset.template.id,
        "version": preset.version.id,
        "preset": preset.id,
        "workspace": workspace.id,
        "workspace_name": workspace.name,
        "build": workspace.builds[0].id,
        "job": workspace.builds[0].job_id,
        "unknown": uuid.uuid4(),
    }
    accepted, wrong = [], []
    for what, statement, expected in BAD_ROWS:
        try:
            await factory.connection.execute(statement.format(**ids))
        except asyncpg.PostgresError as error:
            if not isinstance(error, expected):
                wrong.append(f"{what}: {type(error).__name__}, expected {expected.__name__}")
        else:
            accepted.append(what)
    assert accepted == []
    assert wrong == []
    # Nothing of the above was left behind: each statement failed as a whole.
    assert await factory.connection.fetchval("select count(*) from site_configs where key = 'k'") == 0
