"""Whatever text another component writes into one preset's rows, the other presets are reconciled.

Issue 12.3: one schedule row (a zone naming a directory of the tz database, `²` in a cron) failed every
pass for every preset. This test writes arbitrary text (any unicode, surrogates and NULs included, huge
strings, and text that PostgreSQL reads as numbers and times at the ends of their ranges) into every field
of one preset that comes from another component, through the real database (the server refuses what it
cannot store: surrogates, NULs, text that is no number), runs a real pass, and asserts that two healthy
presets beside it are reconciled exactly, that the pass succeeded, and that the planner's last-resort guard
was never needed: the rules themselves handled every value.

One database serves all the examples of a test (each starts by emptying it), to stay fast enough for the
suite; the check constraints on the counts are dropped, as a component with a laxer schema would have.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from uuid import UUID

import asyncpg
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from structlog.testing import capture_logs

from reconciler import reports
from reconciler.config import load_settings
from reconciler.metrics import Metrics
from reconciler.reconcile import PassOutcome, run_pass
from tests.factories import Factory

# Text as another component may send it: anything (the server refuses some), huge, or near a known edge.
huge_text = st.tuples(st.text(min_size=1, max_size=3), st.integers(min_value=300, max_value=60_000)).map(
    lambda pair: pair[0] * pair[1]
)
any_text = st.text() | st.text(alphabet=st.characters(codec="utf-8"), max_size=30) | huge_text
names = any_text | st.sampled_from(["", " ", "\x00", "\udcff", "\x1b[2J", "‮evil", "préset ✓ 名前", "a\r\nb"])
zones = any_text | st.sampled_from(
    ["Europe", "Europe/", "Europe/Paris", "UTC", "", "../../etc/passwd", "/etc/localtime", "zone.tab", "x" * 300]
)
crons = any_text | st.sampled_from(
    ["* * * * *", "* 9-17 * * 1-5", "* ² * * *", "* ٣ * * *", "0 9 * * *", "* * * * 7", "* 99999999999 * * *"]
)
number_texts = (
    any_text
    | st.integers(min_value=-(2**31), max_value=2**31 - 1).map(str)
    | st.sampled_from(["-1", "0", "2147483647", "2147483648", " 3 ", "+2", "1e3", "0x10", "1_000", "NaN"])
)
time_texts = any_text | st.sampled_from(
    [
        "infinity",
        "-infinity",
        "epoch",
        "now",
        "20000-01-01",
        "294276-12-31 23:59:59+00",
        "4713-01-01 BC",
        "0001-01-01 00:00:00+00",
        "9999-12-31 23:59:59.999999+00",
        "2999-01-01",
        "1999-01-08 04:05:06 PST",
    ]
)


@dataclass
class HostileRows:
    """Per field, the text to write; None leaves the factory's ordinary value."""

    organization_name: str | None
    template_name: str | None
    template_deprecated: str | None
    version_name: str | None
    preset_name: str | None
    timezone: str | None
    desired_instances: str | None
    invalidate_after_secs: str | None
    last_invalidated_at: str | None
    schedules: list[tuple[str, str]] = field(default_factory=list)
    running_created_at: str | None = None
    failed_created_at: str | None = None


def maybe(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[str | None]:
    return st.none() | strategy


hostile_rows = st.builds(
    HostileRows,
    organization_name=maybe(names),
    template_name=maybe(names),
    template_deprecated=maybe(names),
    version_name=maybe(names),
    preset_name=maybe(names),
    timezone=maybe(zones),
    desired_instances=maybe(number_texts),
    invalidate_after_secs=maybe(number_texts),
    last_invalidated_at=maybe(time_texts),
    schedules=st.lists(st.tuples(crons, number_texts), max_size=3),
    running_created_at=maybe(time_texts),
    failed_created_at=maybe(time_texts),
)

# What the server may refuse: text it cannot store (NUL, surrogates, which asyncpg cannot even encode),
# text that is no number or time, a value that breaks a constraint (an empty name, a duplicate).
_REFUSED = (asyncpg.PostgresError, asyncpg.InterfaceError, UnicodeError)


async def written(connection: asyncpg.Connection, statement: str, *arguments: object) -> bool:
    """Write one hostile value; False when the server (or the driver) refused it."""
    try:
        await connection.execute(statement, *arguments)
    except _REFUSED:
        return False
    return True


async def write_hostile_rows(factory: Factory, rows: HostileRows) -> UUID:
    connection = factory.connection
    preset = await factory.preset(desired=1)
    prebuild = await factory.prebuild(preset)
    failed = await factory.prebuild(preset, status="failed")
    updates = [
        ("organizations", "name", "", preset.organization.id, rows.organization_name),
        ("templates", "name", "", preset.template.id, rows.template_name),
        ("templates", "deprecated", "", preset.template.id, rows.template_deprecated),
        ("template_versions", "name", "", preset.version.id, rows.version_name),
        ("template_version_presets", "name", "", preset.id, rows.preset_name),
        ("template_version_presets", "scheduling_timezone", "", preset.id, rows.timezone),
        ("template_version_presets", "desired_instances", "::integer", preset.id, rows.desired_instances),
        ("template_version_presets", "invalidate_after_secs", "::integer", preset.id, rows.invalidate_after_secs),
        ("template_version_presets", "last_invalidated_at", "::timestamptz", preset.id, rows.last_invalidated_at),
        ("workspaces", "created_at", "::timestamptz", prebuild.id, rows.running_created_at),
        ("workspace_builds", "created_at", "::timestamptz", failed.builds[0].id, rows.failed_created_at),
    ]
    for table, column, cast, row_id, value in updates:
        if value is not None:
            # The server casts the text: what it reads as a number or a time is stored, the rest refused.
            await written(connection, f"update {table} set {column} = $2::text{cast} where id = $1", row_id, value)
    for cron, instances in rows.schedules:
        await written(
            connection,
            "insert into template_version_preset_prebuild_schedules (preset_id, cron_expression, desired_instances) "
            "values ($1, $2, $3::text::integer)",
            preset.id,
            cron,
            instances,
        )
    return preset.id


async def pending_first_builds(connection: asyncpg.Connection) -> dict[UUID, int]:
    rows = await connection.fetch(
        "select b.template_version_preset_id as preset_id, count(*) as count from workspace_builds b "
        "join provisioner_jobs j on j.id = b.job_id "
        "where b.build_number = 1 and j.job_status = 'pending' group by 1"
    )
    return {row["preset_id"]: row["count"] for row in rows}


async def relax_the_schema(connection: asyncpg.Connection) -> None:
    """As a component whose migrations allow what ours refuse: negative counts."""
    for table in ("template_version_presets", "template_version_preset_prebuild_schedules"):
        constraints = await connection.fetch(
            "select conname from pg_constraint where conrelid = $1::regclass and contype = 'c'", table
        )
        for row in constraints:
            await connection.execute(f'alter table {table} drop constraint "{row["conname"]}"')


async def empty(connection: asyncpg.Connection) -> None:
    # Everything the examples write hangs off organizations (users and the seeded rows stay).
    await connection.execute("truncate organizations, notification_messages cascade")


@settings(
    max_examples=40,
    deadline=None,
    # One database for all the examples of this test, emptied by each: on purpose.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(rows=hostile_rows)
@example(rows=HostileRows(None, None, None, None, None, "Europe", None, None, None, [("* * * * *", "4")]))
@example(rows=HostileRows(None, None, None, None, None, "x" * 300, None, None, None, [("* * * * *", "4")]))
@example(rows=HostileRows(None, None, None, None, None, "UTC", None, None, None, [("* ² * * *", "4")]))
@example(rows=HostileRows(None, None, None, None, None, None, "-5", "-1", "20000-01-01", [("* * * * *", "-3")]))
@example(rows=HostileRows(None, None, None, None, None, None, None, None, "infinity", [], "294276-01-01", "infinity"))
async def test_one_presets_rows_never_stop_the_others(
    rows: HostileRows, factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    connection = factory.connection
    await relax_the_schema(connection)
    await empty(connection)
    hostile = await write_hostile_rows(factory, rows)
    plain = await factory.preset(desired=1)
    scheduled = await factory.preset(desired=1, timezone="Europe/Paris", schedules=[("* * * * *", 2)])
    settings_ = load_settings({"RECONCILER_DATABASE_URL": database_url})

    with capture_logs() as events:
        result = await run_pass(pool, settings_, datetime.now(UTC))

    assert result.outcome is PassOutcome.SUCCESS, result.error
    assert result.execution is not None
    assert result.execution.presets_failed == 0, [e for e in events if e["event"] == "reconcile.preset_failed"]
    crashes = [event for event in events if event["event"] in ("reconcile.pass_crashed", "preset.plan_failed")]
    assert crashes == []
    created = await pending_first_builds(connection)
    assert (created.get(plain.id), created.get(scheduled.id)) == (1, 2)
    assert result.plan is not None
    planned = {preset_plan.preset.id for preset_plan in result.plan.presets}
    assert {plain.id, scheduled.id} <= planned
    if hostile not in planned:
        # Left out of the pass: only as a bad row, said so.
        assert [
            event for event in events if event["event"] == "snapshot.bad_row" and event["preset_id"] == str(hostile)
        ]

    # What `plan`, `status` and /metrics make of the same plan: nothing raises either.
    for document in (reports.plan_json(result.plan, paused=False), reports.status_json(result.plan, paused=False)):
        json.dumps(document)
    reports.plan_table(result.plan, paused=False)
    reports.status_table(result.plan, paused=False)
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    metrics.observe_pass(result.outcome.value, result.duration_seconds, result.plan, False)
    generate_latest(metrics.registry)
