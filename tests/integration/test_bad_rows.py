"""Rows written by other components that break our assumptions (issue 8, "bad input").

The platform's API server and provisioners write the tables the reconciler reads. Whatever they write,
one odd preset must not stop the pool of every other preset: it is skipped or degraded with a clear log
event, every other preset goes on, and the pass succeeds. Where the schema makes a bad row impossible,
the test shows the constraint rejecting it.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from reconciler import planner
from reconciler.config import Settings, load_settings
from reconciler.metrics import Metrics
from reconciler.plan import BackoffAction, DeleteAction, DeleteReason, PresetPlan
from reconciler.problem_log import ProblemLog
from reconciler.reconcile import PassOutcome, PassResult, run_pass
from reconciler.sdnotify import SystemdNotifier
from reconciler.service import Daemon
from tests.acceptance.daemon_process import cli_environment, run_cli
from tests.factories import Factory, Preset, minutes

LogEvents = list[MutableMapping[str, Any]]


def settings_for(database_url: str, **environment: str) -> Settings:
    return load_settings({"RECONCILER_DATABASE_URL": database_url, **environment})


async def successful_pass(pool: asyncpg.Pool, settings: Settings) -> tuple[PassResult, LogEvents]:
    with capture_logs() as events:
        result = await run_pass(pool, settings, datetime.now(UTC))
    assert result.outcome is PassOutcome.SUCCESS, result.error
    assert result.execution is not None
    assert result.execution.presets_failed == 0
    assert not [event for event in events if event["event"] == "reconcile.pass_crashed"]
    return result, events


async def pending_first_builds(connection: asyncpg.Connection) -> dict[uuid.UUID, int]:
    """Prebuilds created by the pass (pending first builds), per preset."""
    rows = await connection.fetch(
        "select b.template_version_preset_id as preset_id, count(*) as count from workspace_builds b "
        "join provisioner_jobs j on j.id = b.job_id "
        "where b.build_number = 1 and j.job_status = 'pending' group by 1"
    )
    return {row["preset_id"]: row["count"] for row in rows}


def plan_of(result: PassResult, preset: Preset) -> PresetPlan:
    assert result.plan is not None
    matches = [preset_plan for preset_plan in result.plan.presets if preset_plan.preset.id == preset.id]
    assert len(matches) == 1, f"preset {preset.name!r} appears {len(matches)} times in the plan"
    return matches[0]


def events_named(events: LogEvents, name: str) -> LogEvents:
    return [event for event in events if event["event"] == name]


def events_for(events: LogEvents, name: str, preset: Preset) -> LogEvents:
    return [event for event in events_named(events, name) if event.get("preset_id") == str(preset.id)]


def summary_event(events: LogEvents) -> MutableMapping[str, Any]:
    (summary,) = [event for event in events_named(events, "reconcile.pass") if event.get("outcome") == "success"]
    return summary


# --- schedules ----------------------------------------------------------------------------------


async def test_unusable_schedules_fall_back_to_desired_and_are_logged(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    minute_not_star = await factory.preset(desired=1, timezone="UTC", schedules=[("0 9-17 * * *", 4)])
    garbage = await factory.preset(desired=1, timezone="UTC", schedules=[("every weekday; drop table", 4)])
    hour_out_of_range = await factory.preset(desired=2, timezone="UTC", schedules=[("* 25 * * *", 4)])
    weekday_seven = await factory.preset(desired=1, timezone="UTC", schedules=[("* * * * 7", 4)])
    unknown_zone = await factory.preset(desired=2, timezone="Mars/Olympus_Mons", schedules=[("* * * * *", 4)])
    no_zone = await factory.preset(desired=1, timezone="", schedules=[("* * * * *", 4)])
    overlapping = await factory.preset(desired=1, timezone="UTC", schedules=[("* * * * *", 3), ("* 0-23 * * *", 4)])
    healthy = await factory.preset(desired=1, timezone="Europe/Paris", schedules=[("* * * * *", 3)])

    result, events = await successful_pass(pool, settings_for(database_url))

    expected = {
        minute_not_star: (1, "minute field must be '*'"),
        garbage: (1, "expected 5 fields"),
        hour_out_of_range: (2, "above maximum"),
        weekday_seven: (1, "above maximum"),
        unknown_zone: (2, "unknown time zone 'Mars/Olympus_Mons'"),
        no_zone: (1, "no scheduling time zone"),
        overlapping: (1, "overlapping schedules"),
    }
    created = await pending_first_builds(factory.connection)
    for preset, (target, reason) in expected.items():
        assert plan_of(result, preset).state.desired == target, preset.name
        assert created.get(preset.id) == target, preset.name
        (event,) = events_for(events, "preset.schedule_ignored", preset)
        assert event["log_level"] == "warning"
        assert reason in event["detail"], event
        assert event["preset_name"] == preset.name
        assert event["template_name"] == preset.template.name
    # The healthy schedule applies, and is not reported.
    assert plan_of(result, healthy).state.desired == 3
    assert created[healthy.id] == 3
    assert not events_for(events, "preset.schedule_ignored", healthy)
    assert summary_event(events)["problems"] == len(expected)


async def test_zones_and_crons_that_broke_the_lookup_itself_fall_back_for_their_preset_only(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    """Issue 12.3: each of these once raised out of the schedule code and failed every pass, for everyone.

    A directory of the time zone database (`IsADirectoryError`), a name too long for the file system
    (`OSError`), `²` (which `str.isdigit()` accepts and `int()` refuses) and a number of 5,000 digits
    (beyond `int()`'s limit); a number of 20 digits is refused too. `٣` (an Arabic-Indic three) was
    silently read as 3: only ASCII digits count.
    """
    long_zone = "Europe/" + "x" * 300
    directory_zone = await factory.preset(desired=1, timezone="Europe", schedules=[("* * * * *", 4)])
    too_long_zone = await factory.preset(desired=2, timezone=long_zone, schedules=[("* * * * *", 4)])
    superscript = await factory.preset(desired=1, timezone="UTC", schedules=[("* ² * * *", 4)])
    arabic_indic = await factory.preset(desired=2, timezone="UTC", schedules=[("* * * * ٣", 4)])
    huge_number = await factory.preset(desired=1, timezone="UTC", schedules=[("* " + "1" * 20 + " * * *", 4)])
    huge_cron = await factory.preset(desired=2, timezone="UTC", schedules=[("* " + "1" * 5000 + " * * *", 4)])
    healthy = await factory.preset(desired=1, timezone="Europe/Paris", schedules=[("* * * * *", 3)])

    result, events = await successful_pass(pool, settings_for(database_url))

    expected = {
        directory_zone: (1, "unknown time zone 'Europe'"),
        too_long_zone: (2, "not a time zone name"),
        superscript: (1, "hour: not a number: '²'"),
        arabic_indic: (2, "day of week: not a number: '٣'"),
        huge_number: (1, "hour: not a number: '11111"),
        huge_cron: (2, "expression too long (5008 characters"),
    }
    created = await pending_first_builds(factory.connection)
    for preset, (target, reason) in expected.items():
        assert plan_of(result, preset).state.desired == target, preset.name
        assert created.get(preset.id) == target, preset.name
        (event,) = events_for(events, "preset.schedule_ignored", preset)
        assert reason in event["detail"], event
        # A hostile string is shown cut short, never whole.
        assert len(event["detail"]) < 200, event["detail"]
    assert created[healthy.id] == 3
    assert not events_for(events, "preset.schedule_ignored", healthy)

    # `plan` and `status` read the same rows: they work, and show every preset.
    for command in ("plan", "status"):
        completed = run_cli(command, "--json", environment=cli_environment(database_url))
        assert completed.returncode == 0, completed.stderr
        assert "Traceback" not in completed.stderr
        document = json.loads(completed.stdout)
        listed = {entry["preset_id"] for entry in document["presets"]}
        assert listed == {str(preset.id) for preset in [*expected, healthy]}


# --- absurd targets -----------------------------------------------------------------------------


async def test_absurd_desired_instances_are_capped_at_100_by_default(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    absurd = await factory.preset(desired=2_147_483_647)
    normal = await factory.preset(desired=2)

    result, events = await successful_pass(pool, settings_for(database_url))

    assert plan_of(result, absurd).state.desired == 100
    created = await pending_first_builds(factory.connection)
    assert created == {absurd.id: 100, normal.id: 2}
    (event,) = events_for(events, "preset.desired_capped", absurd)
    assert event["log_level"] == "warning"
    assert "2147483647" in event["detail"]
    assert "RECONCILER_MAX_DESIRED_INSTANCES" in event["detail"]
    assert not events_for(events, "preset.desired_capped", normal)

    # The next pass creates nothing more: the cap holds at write time too.
    await successful_pass(pool, settings_for(database_url))
    assert await pending_first_builds(factory.connection) == {absurd.id: 100, normal.id: 2}


async def test_the_cap_is_configurable_and_applies_to_schedules(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    scheduled = await factory.preset(desired=1, timezone="UTC", schedules=[("* * * * *", 1_000_000)])
    large = await factory.preset(desired=50)
    small = await factory.preset(desired=2)
    settings = settings_for(database_url, RECONCILER_MAX_DESIRED_INSTANCES="4")

    result, events = await successful_pass(pool, settings)

    assert await pending_first_builds(factory.connection) == {scheduled.id: 4, large.id: 4, small.id: 2}
    assert plan_of(result, scheduled).state.desired == 4
    assert "1000000" in events_for(events, "preset.desired_capped", scheduled)[0]["detail"]
    assert events_for(events, "preset.desired_capped", large)
    assert not events_for(events, "preset.desired_capped", small)


# --- templates and versions -----------------------------------------------------------------------


async def test_templates_without_usable_presets_do_not_disturb_the_others(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    # A template whose active version has no presets at all; its old version had one, with prebuilds.
    template = await factory.template()
    outdated = await factory.preset(desired=2, template=template)
    running = await factory.prebuilds(outdated, 2, ago=minutes(30))
    await factory.version(template, active=True)
    # A template with no active version yet.
    unpublished = await factory.template()
    never_active = await factory.preset(desired=2, template=unpublished, active=False)
    # A version uploaded before its template exists (template_id is nullable, as in Coder).
    organization = await factory.organization()
    orphan_version = await factory.connection.fetchval(
        "insert into template_versions (organization_id, name) values ($1, 'orphan') returning id", organization.id
    )
    orphan_preset = await factory.connection.fetchval(
        "insert into template_version_presets (template_version_id, name, desired_instances) "
        "values ($1, 'orphan preset', 3) returning id",
        orphan_version,
    )
    healthy = await factory.preset(desired=2)

    result, _ = await successful_pass(pool, settings_for(database_url))

    assert result.plan is not None
    planned = {preset_plan.preset.id for preset_plan in result.plan.presets}
    assert orphan_preset not in planned
    # The template's only preset with prebuilds is the outdated one: nothing on its active version.
    of_template = [
        preset_plan.preset for preset_plan in result.plan.presets if preset_plan.preset.template_id == template.id
    ]
    assert [preset.id for preset in of_template] == [outdated.id]
    assert not of_template[0].active
    # The outdated preset's prebuilds go (inactive); the unpublished one is skipped; the healthy one fills.
    (delete,) = [action for action in plan_of(result, outdated).actions if isinstance(action, DeleteAction)]
    assert delete.reason is DeleteReason.INACTIVE
    assert set(delete.workspace_ids) == {workspace.id for workspace in running}
    assert plan_of(result, never_active).skipped
    assert await pending_first_builds(factory.connection) == {healthy.id: 2}


# --- builds, jobs and agents --------------------------------------------------------------------


async def test_a_build_without_its_job_row_is_impossible_by_constraint(factory: Factory) -> None:
    """`workspace_builds.job_id` is NOT NULL and references `provisioner_jobs`: the schema refuses it."""
    preset = await factory.preset(desired=1)
    workspace = await factory.workspace(preset)
    build_values = (
        workspace.id,
        preset.version.id,
        preset.id,
    )
    insert = (
        "insert into workspace_builds (workspace_id, build_number, transition, template_version_id, "
        "template_version_preset_id, job_id, initiator_id) "
        "values ($1, 1, 'start', $2, $3, $4, 'c42fdf75-3097-471c-8c33-fb52454d81c0')"
    )
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await factory.connection.execute(insert, *build_values, uuid.uuid4())
    with pytest.raises(asyncpg.NotNullViolationError):
        await factory.connection.execute(insert, *build_values, None)
    # Nor can the job of an existing build be deleted from under it.
    prebuild = await factory.prebuild(preset)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await factory.connection.execute("delete from provisioner_jobs where id = $1", prebuild.builds[0].job_id)


async def test_a_build_whose_job_vanished_anyway_does_not_fail_the_pass(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    """Constraints can be bypassed (a restore with triggers disabled): the pass still goes on.

    Such a workspace is invisible to the snapshot (no job: neither running nor in progress), so its
    preset gets a replacement, as for any prebuild that is not running.
    """
    if not await factory.connection.fetchval("select rolsuper from pg_roles where rolname = current_user"):
        pytest.skip("bypassing foreign keys (session_replication_role) needs a superuser")
    broken = await factory.preset(desired=1)
    ghost = await factory.prebuild(broken)
    healthy = await factory.preset(desired=1)
    async with factory.connection.transaction():
        await factory.connection.execute("set local session_replication_role = replica")
        await factory.connection.execute("delete from workspace_agents where job_id = $1", ghost.builds[0].job_id)
        await factory.connection.execute("delete from provisioner_jobs where id = $1", ghost.builds[0].job_id)

    result, _ = await successful_pass(pool, settings_for(database_url))

    assert plan_of(result, broken).state.actual == 0
    assert await pending_first_builds(factory.connection) == {broken.id: 1, healthy.id: 1}


async def test_agents_in_unknown_or_unready_states_make_a_prebuild_not_eligible(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    # The enum refuses a state it does not know...
    preset = await factory.preset(desired=9)
    probe = await factory.prebuild(preset, agents=[])
    with pytest.raises(asyncpg.InvalidTextRepresentationError):
        await factory.agent(probe.builds[0].job_id, "bogus")
    # ...but a newer platform may add one by its own migration.
    await factory.connection.execute("alter type workspace_agent_lifecycle_state add value 'hibernating'")

    ready = await factory.prebuild(preset, agents=["ready"])
    for states in (["start_error"], ["ready", "starting"], ["hibernating"], ["off"], ["shutting_down"]):
        await factory.prebuild(preset, agents=states)
    # A sub-agent's state does not count; a deleted agent does not either.
    with_child = await factory.prebuild(preset, agents=["ready"])
    parent = await factory.connection.fetchval(
        "select id from workspace_agents where job_id = $1", with_child.builds[0].job_id
    )
    await factory.agent(with_child.builds[0].job_id, "start_error", parent_id=parent)
    with_deleted = await factory.prebuild(preset, agents=["ready"])
    await factory.agent(with_deleted.builds[0].job_id, "starting", deleted=True)
    other = await factory.preset(desired=1)

    result, events = await successful_pass(pool, settings_for(database_url))

    state = plan_of(result, preset).state
    # probe (no agents) + ready + five unready + with_child + with_deleted
    assert (state.actual, state.eligible, state.extraneous) == (9, 3, 0)
    assert ready.id
    assert await pending_first_builds(factory.connection) == {other.id: 1}
    assert summary_event(events)["bad_rows"] == 0


# --- values and nulls this code does not know ------------------------------------------------------


async def test_enum_values_added_by_a_newer_component_skip_only_their_preset(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    await factory.connection.execute("alter type prebuild_status add value 'quarantined'")
    await factory.connection.execute("alter type workspace_transition add value 'hibernate'")
    quarantined = await factory.preset(desired=2, status="quarantined")
    hibernating = await factory.preset(desired=2)
    workspace = await factory.prebuild(hibernating, ago=minutes(10))
    # A system-initiated build with a transition we do not know, still in progress.
    await factory.build(workspace, transition="hibernate", status="running", preset=False, agents=[])
    healthy = await factory.preset(desired=2)

    result, events = await successful_pass(pool, settings_for(database_url))

    assert result.snapshot is not None
    assert {preset.id for preset in result.snapshot.presets} == {healthy.id}
    assert await pending_first_builds(factory.connection) == {healthy.id: 2}
    bad = {event["preset_id"]: event for event in events_named(events, "snapshot.bad_row")}
    assert set(bad) == {str(quarantined.id), str(hibernating.id)}
    assert "'quarantined' is not a valid PrebuildStatus" in bad[str(quarantined.id)]["detail"]
    assert "'hibernate' is not a valid Transition" in bad[str(hibernating.id)]["detail"]
    for preset in (quarantined, hibernating):
        event = bad[str(preset.id)]
        assert event["log_level"] == "warning"
        assert event["preset_name"] == preset.name
        assert event["template_name"] == preset.template.name
        assert event["consequence"] == "preset skipped this pass"
    assert summary_event(events)["bad_rows"] == 2

    # `plan` reads the same snapshot: it works too, without the skipped presets.
    planned = run_cli("plan", "--json", environment=cli_environment(database_url))
    assert planned.returncode == 0, planned.stderr
    document = json.loads(planned.stdout)
    assert [entry["preset_id"] for entry in document["presets"]] == [str(healthy.id)]
    assert "snapshot.bad_row" in planned.stderr


async def test_a_null_where_a_value_is_expected_skips_only_that_preset(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    # Another component's migration relaxed a constraint, and its rows use that.
    await factory.connection.execute("alter table workspaces alter column created_at drop not null")
    broken = await factory.preset(desired=1, ttl_seconds=3600)
    first, second = await factory.prebuilds(broken, 2, ago=minutes(5))
    await factory.connection.execute("update workspaces set created_at = null where id = $1", first.id)
    healthy = await factory.preset(desired=1)
    extra = await factory.prebuilds(healthy, 2, ago=minutes(5))

    result, events = await successful_pass(pool, settings_for(database_url))

    (event,) = events_named(events, "snapshot.bad_row")
    assert event["preset_id"] == str(broken.id)
    assert "null in at" in event["detail"]
    assert str(first.id) in event["detail"]
    assert second.id
    # The healthy preset still had its extraneous prebuild deleted.
    assert result.execution is not None
    assert result.execution.deleted == 1
    (delete,) = plan_of(result, healthy).actions
    assert isinstance(delete, DeleteAction)
    assert delete.workspace_ids[0] in {workspace.id for workspace in extra}


async def test_timestamps_at_infinity_do_not_overflow(factory: Factory, pool: asyncpg.Pool, database_url: str) -> None:
    # A failed build stamped `infinity`: backoff "forever", not an OverflowError for the whole pass.
    stuck = await factory.preset(desired=2)
    failed = await factory.prebuild(stuck, status="failed")
    await factory.connection.execute(
        "update workspace_builds set created_at = 'infinity' where id = $1", failed.builds[0].id
    )
    # A prebuild created at `-infinity` is older than any time-to-live.
    ancient_preset = await factory.preset(desired=1, ttl_seconds=60)
    ancient = await factory.prebuild(ancient_preset)
    await factory.connection.execute("update workspaces set created_at = '-infinity' where id = $1", ancient.id)
    healthy = await factory.preset(desired=1)

    result, _ = await successful_pass(pool, settings_for(database_url))

    (backoff,) = plan_of(result, stuck).actions
    assert isinstance(backoff, BackoffAction)
    assert backoff.until.year == 9999
    (delete, _create) = plan_of(result, ancient_preset).actions
    assert isinstance(delete, DeleteAction)
    assert delete.reason is DeleteReason.EXPIRED
    assert delete.workspace_ids == (ancient.id,)
    assert await pending_first_builds(factory.connection) == {ancient_preset.id: 1, healthy.id: 1}
    planned = run_cli("plan", "--json", environment=cli_environment(database_url))
    assert planned.returncode == 0, planned.stderr
    (entry,) = [entry for entry in json.loads(planned.stdout)["presets"] if entry["preset_id"] == str(stuck.id)]
    assert entry["actions"][0]["until"].startswith("9999-12-31T23:59:59")


async def test_timestamps_beyond_what_python_can_hold_skip_nothing_and_fail_nothing(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    """PostgreSQL holds years up to 294276 and down to 4713 BC; Python's datetime, 1 to 9999.

    asyncpg raised OverflowError decoding such a value, which failed the whole snapshot statement, so
    every pass failed for every preset. They read as the end (or the beginning) of time instead, as
    `infinity` does.
    """
    far_invalidation = await factory.preset(desired=1)
    await factory.connection.execute(
        "update template_version_presets set last_invalidated_at = '20000-01-01' where id = $1", far_invalidation.id
    )
    ancient_invalidation = await factory.preset(desired=1)
    ancient_prebuild = await factory.prebuild(ancient_invalidation)
    await factory.connection.execute(
        "update template_version_presets set last_invalidated_at = '4713-01-01 BC' where id = $1",
        ancient_invalidation.id,
    )
    # A prebuild created in year 20000, and one before year 1: ages no TTL can compute naively.
    far_created = await factory.preset(desired=2, ttl_seconds=60)
    future, past = await factory.prebuilds(far_created, 2)
    await factory.connection.execute("update workspaces set created_at = '20000-01-01' where id = $1", future.id)
    await factory.connection.execute("update workspaces set created_at = '0100-01-01 BC' where id = $1", past.id)
    # A failed build in year 20000: backoff for ever, as at `infinity`.
    far_failure = await factory.preset(desired=1)
    failed = await factory.prebuild(far_failure, status="failed")
    await factory.connection.execute(
        "update workspace_builds set created_at = '20000-01-01' where id = $1", failed.builds[0].id
    )
    healthy = await factory.preset(desired=1)

    result, events = await successful_pass(pool, settings_for(database_url))

    assert not events_named(events, "snapshot.bad_row")
    assert result.plan is not None
    assert [problem.preset_id for problem in result.plan.problems] == [far_invalidation.id]
    # Before year 1: every prebuild was created after it, nothing expires.
    assert plan_of(result, ancient_invalidation).actions == ()
    assert ancient_prebuild.id
    (delete, _create) = plan_of(result, far_created).actions
    assert isinstance(delete, DeleteAction)
    assert delete.workspace_ids == (past.id,)
    (backoff,) = plan_of(result, far_failure).actions
    assert isinstance(backoff, BackoffAction)
    assert backoff.until.year == 9999
    assert await pending_first_builds(factory.connection) == {
        far_invalidation.id: 1,
        far_created.id: 1,
        healthy.id: 1,
    }
    for command in ("plan", "status"):
        completed = run_cli(command, "--json", environment=cli_environment(database_url))
        assert completed.returncode == 0, completed.stderr


# --- invalidation in the future --------------------------------------------------------------------


async def complete_pending_jobs(connection: asyncpg.Connection, at: datetime) -> int:
    """What a provisioner does: every pending job runs and succeeds at `at`, with a ready agent."""
    rows = await connection.fetch(
        "update provisioner_jobs set started_at = $1, completed_at = $1 "
        "where started_at is null and canceled_at is null returning id",
        at,
    )
    for row in rows:
        await connection.execute(
            "insert into workspace_agents (job_id, name, lifecycle_state) values ($1, 'main', 'ready')", row["id"]
        )
    return len(rows)


async def test_an_invalidation_at_infinity_does_not_churn_over_several_passes(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    """Issue 12.5: obeyed, `infinity` expires every prebuild as soon as it exists (33 creates in 40 s)."""
    forever = await factory.preset(desired=2)
    await factory.connection.execute(
        "update template_version_presets set last_invalidated_at = 'infinity' where id = $1", forever.id
    )
    healthy = await factory.preset(desired=1)
    settings = settings_for(database_url)
    problem_log = ProblemLog()
    start = datetime.now(UTC)
    events: LogEvents = []
    created = deleted = 0
    for minute in range(5):
        now = start + minutes(minute)
        with capture_logs() as pass_events:
            result = await run_pass(pool, settings, now, problem_log=problem_log)
        assert result.outcome is PassOutcome.SUCCESS, result.error
        assert result.execution is not None
        created += result.execution.created
        deleted += result.execution.deleted
        events.extend(pass_events)
        # The ignored invalidation stays a problem of every plan...
        assert result.plan is not None
        assert [(problem.preset_id, problem.event) for problem in result.plan.problems] == [
            (forever.id, "preset.invalidation_ignored")
        ]
        # ...and the builds succeed before the next pass, so that it sees them running.
        await complete_pending_jobs(factory.connection, now)

    assert (created, deleted) == (3, 0)
    assert plan_of(result, forever).state.actual == 2
    assert plan_of(result, forever).state.expired == 0
    assert plan_of(result, healthy).state.actual == 1
    # Logged once, not once per pass.
    (event,) = events_for(events, "preset.invalidation_ignored", forever)
    assert event["log_level"] == "warning"
    assert "last_invalidated_at infinity is more than 120 s in the future" in event["detail"]
    assert event["preset_name"] == forever.name
    assert [summary["problems"] for summary in events_named(events, "reconcile.pass")] == [1] * 5

    # Fixed by the operator: the problem clears (logged once), and an invalidation now is obeyed.
    await factory.connection.execute(
        "update template_version_presets set last_invalidated_at = $2 where id = $1", forever.id, start + minutes(5)
    )
    with capture_logs() as pass_events:
        result = await run_pass(pool, settings, start + minutes(5), problem_log=problem_log)
    assert result.execution is not None
    assert result.execution.deleted == 2
    (cleared,) = events_for(pass_events, "preset.problem_cleared", forever)
    assert cleared["problem"] == "preset.invalidation_ignored"
    assert cleared["log_level"] == "info"


async def test_the_daemon_logs_a_problem_once_over_its_passes(factory: Factory, database_url: str) -> None:
    """The daemon keeps one ProblemLog across its passes: the warning comes once, not every minute."""
    forever = await factory.preset(desired=1)
    await factory.connection.execute(
        "update template_version_presets set last_invalidated_at = 'infinity' where id = $1", forever.id
    )
    settings = settings_for(
        database_url, RECONCILER_HTTP_ADDRESS="127.0.0.1:0", RECONCILER_RECONCILIATION_INTERVAL="1h"
    )
    # No NOTIFY_SOCKET: the daemon must not talk to a systemd that runs the test session.
    daemon = Daemon(settings, registry=CollectorRegistry(), notifier=SystemdNotifier({}))
    start_up_pass = asyncio.Event()
    daemon.pass_listeners.append(lambda _result: start_up_pass.set())
    with capture_logs() as events:
        await daemon.start()
        try:
            await asyncio.wait_for(start_up_pass.wait(), timeout=60)
            for _ in range(2):
                result = await daemon.run_pass_now()
                assert result.outcome is PassOutcome.SUCCESS, result.error
        finally:
            await daemon.stop()

    assert len([event for event in events_named(events, "reconcile.pass") if event["outcome"] == "success"]) == 3
    assert len(events_for(events, "preset.invalidation_ignored", forever)) == 1


async def test_an_invalidation_a_minute_ahead_is_obeyed_as_coder_does(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    """Within the clock-skew tolerance (two minutes) the invalidation counts, as in vectors PS-024/025."""
    now = datetime.now(UTC)
    preset = await factory.preset(desired=1, last_invalidated_at=now + minutes(1))
    built = await factory.prebuild(preset, created_at=now - minutes(0.5))

    result, events = await successful_pass(pool, settings_for(database_url))

    (delete, _create) = plan_of(result, preset).actions
    assert isinstance(delete, DeleteAction)
    assert (delete.reason, delete.workspace_ids) == (DeleteReason.INVALIDATED, (built.id,))
    assert not events_named(events, "preset.invalidation_ignored")


# --- a preset the planner fails on ----------------------------------------------------------------


async def test_a_preset_the_planner_fails_on_is_skipped_and_the_pass_goes_on(
    factory: Factory, pool: asyncpg.Pool, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever escapes the rules (a bug meeting rows nobody foresaw) stays with its preset.

    The planner's own code is made to raise for one preset: before the guard, that failed the pass.
    """
    before = await factory.preset(desired=1)
    broken = await factory.preset(desired=1)
    after = await factory.preset(desired=2)
    plan_preset = planner.plan_preset

    def failing_for_broken(preset: Any, *arguments: Any) -> Any:
        if preset.id == broken.id:
            raise KeyError("x" * 10_000)
        return plan_preset(preset, *arguments)

    monkeypatch.setattr(planner, "plan_preset", failing_for_broken)
    steady_plan = planner._SteadyPath.plan

    def general_path_for_broken(self: planner._SteadyPath, preset: Any, *arguments: Any) -> Any:
        # The steady fast path would plan it without `plan_preset`: it goes by the general path, made to raise.
        return None if preset.id == broken.id else steady_plan(self, preset, *arguments)

    monkeypatch.setattr(planner._SteadyPath, "plan", general_path_for_broken)

    result, events = await successful_pass(pool, settings_for(database_url))

    assert await pending_first_builds(factory.connection) == {before.id: 1, after.id: 2}
    assert result.plan is not None
    assert broken.id not in {preset_plan.preset.id for preset_plan in result.plan.presets}
    (event,) = events_for(events, "preset.plan_failed", broken)
    assert event["log_level"] == "error"
    assert event["preset_name"] == broken.name
    assert event["detail"].startswith("KeyError: ")
    assert len(event["detail"]) < 400
    assert "in failing_for_broken" in event["traceback"]
    assert summary_event(events)["presets_unplanned"] == 1


# --- names --------------------------------------------------------------------------------------

HOSTILE_ORGANIZATION = 'O\'Reilly & "Sons"; DROP TABLE users; -- 🚀'
HOSTILE_TEMPLATE = "tmpl'); delete from workspaces; --\\ $1 %s {preset}"
HOSTILE_VERSION = "v'1\"; select pg_sleep(30); --"
HOSTILE_PRESET = "préset ✓ 名前 'quoted' \"double\";\nsecond line\tend"


async def test_names_with_quotes_semicolons_and_unicode_go_through_untouched(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    organization = await factory.organization(HOSTILE_ORGANIZATION)
    template = await factory.template(organization, name=HOSTILE_TEMPLATE)
    version = await factory.version(template, name=HOSTILE_VERSION)
    failing = await factory.preset(version, desired=2, name=HOSTILE_PRESET)
    for age in (3, 2, 1):
        await factory.prebuild(failing, status="failed", ago=minutes(age))
    healthy = await factory.preset(version, desired=2, name=HOSTILE_PRESET + " (healthy) ;'")
    admin = await factory.user(username="admin'; --", site_roles=["template-admin"])
    users_before = await factory.connection.fetchval("select count(*) from users")

    result, events = await successful_pass(pool, settings_for(database_url, RECONCILER_FAILURE_HARD_LIMIT="3"))

    # The healthy preset filled; the failing one is hard-limited, and its administrator is told.
    assert await pending_first_builds(factory.connection) == {healthy.id: 2}
    assert result.status_changes.hard_limited == (failing.id,)
    (limited,) = events_for(events, "preset.hard_limited", failing)
    assert limited["preset_name"] == HOSTILE_PRESET
    assert limited["template_name"] == HOSTILE_TEMPLATE
    assert limited["template_version_name"] == HOSTILE_VERSION
    assert limited["organization_name"] == HOSTILE_ORGANIZATION
    message = await factory.connection.fetchrow(
        "select user_id, payload from notification_messages where preset_id = $1", failing.id
    )
    assert message is not None
    assert message["user_id"] == admin.id
    payload = json.loads(message["payload"]) if isinstance(message["payload"], str) else message["payload"]
    assert payload["preset"] == HOSTILE_PRESET
    assert payload["template"] == HOSTILE_TEMPLATE
    assert payload["template_version"] == HOSTILE_VERSION
    assert payload["organization"] == HOSTILE_ORGANIZATION
    assert payload["preset_id"] == str(failing.id)
    # Nothing was executed from a name.
    assert await factory.connection.fetchval("select count(*) from users") == users_before
    assert await factory.connection.fetchval("select count(*) from workspaces") == 5

    # `plan --json` prints them exactly.
    planned = run_cli("plan", "--json", environment=cli_environment(database_url))
    assert planned.returncode == 0, planned.stderr
    entries = {entry["preset_id"]: entry for entry in json.loads(planned.stdout)["presets"]}
    for preset in (failing, healthy):
        entry = entries[str(preset.id)]
        assert entry["preset_name"] == preset.name
        assert entry["template_name"] == HOSTILE_TEMPLATE
        assert entry["template_version_name"] == HOSTILE_VERSION
        assert entry["organization_name"] == HOSTILE_ORGANIZATION

    # And /metrics escapes them so that a parser reads them back exactly.
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    metrics.observe_pass(result.outcome.value, result.duration_seconds, result.plan, False)
    labels = {
        sample.labels["preset_name"]: sample.labels
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for sample in family.samples
        if sample.name == "coderd_prebuilt_workspaces_desired"
    }
    assert set(labels) == {failing.name, healthy.name}
    assert labels[HOSTILE_PRESET]["template_name"] == HOSTILE_TEMPLATE
    assert labels[HOSTILE_PRESET]["organization_name"] == HOSTILE_ORGANIZATION
