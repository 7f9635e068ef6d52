"""BEHAVIOR.md section 2 on a real database: what the snapshot and the planner make of real rows.

Each test builds rows with the factories, reads the snapshot a pass would read (read-only) and plans it
at an explicit `now`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID

from reconciler.config import Settings
from reconciler.plan import CreateAction, DeleteAction, DeleteReason, PresetState
from reconciler.snapshot import Snapshot
from tests.factories import Factory, Preset, Workspace, minutes, seconds
from tests.integration.reconcile_support import ids, plan_of, read_plan, read_snapshot, settings_for


def running_by_workspace(snapshot: Snapshot) -> dict[UUID, UUID]:
    """workspace -> the preset it runs for."""
    return {prebuild.workspace_id: prebuild.preset_id for prebuild in snapshot.running}


def readiness(snapshot: Snapshot) -> dict[UUID, bool]:
    return {prebuild.workspace_id: prebuild.ready for prebuild in snapshot.running}


async def prebuilds_in_every_state(factory: Factory, preset: Preset) -> dict[str, Workspace]:
    """One prebuild per latest-build situation; only `running` and `retried` are running prebuilds."""
    workspaces = {
        "running": await factory.prebuild(preset, ago=minutes(30)),
        "failed": await factory.prebuild(preset, status="failed", ago=minutes(29)),
        "canceled": await factory.prebuild(preset, status="canceled", ago=minutes(28)),
        "canceling": await factory.prebuild(preset, status="canceling", ago=minutes(27)),
        "pending": await factory.prebuild(preset, status="pending", ago=minutes(26)),
        "provisioning": await factory.prebuild(preset, status="running", ago=minutes(25)),
    }
    stopped = await factory.prebuild(preset, ago=minutes(24))
    await factory.build(stopped, transition="stop", ago=minutes(23))
    stopping = await factory.prebuild(preset, ago=minutes(22))
    await factory.build(stopping, transition="stop", status="running", ago=minutes(21))
    deleting = await factory.prebuild(preset, ago=minutes(20))
    await factory.build(deleting, transition="delete", status="pending", ago=minutes(19))
    # A first build that failed, then a retry that succeeded: the latest build decides.
    retried = await factory.prebuild(preset, status="failed", ago=minutes(18))
    await factory.build(retried, ago=minutes(17))
    deleted = await factory.workspace(preset, deleted=True, created_at=factory.now - minutes(16))
    await factory.build(deleted, ago=minutes(16))
    claimed = await factory.prebuild(preset, ago=minutes(15))
    await factory.claim(claimed)
    workspaces.update(
        stopped=stopped, stopping=stopping, deleting=deleting, retried=retried, deleted=deleted, claimed=claimed
    )
    return workspaces


async def test_only_a_succeeded_latest_start_is_a_running_prebuild(factory: Factory, database_url: str) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=10)
    workspaces = await prebuilds_in_every_state(factory, preset)

    snapshot = await read_snapshot(factory.connection, settings, factory.now)
    assert running_by_workspace(snapshot) == {
        workspaces["running"].id: preset.id,
        workspaces["retried"].id: preset.id,
    }
    preset_plan = plan_of(await read_plan(factory.connection, settings, factory.now), preset)
    assert preset_plan.state == PresetState(
        desired=10, actual=2, eligible=2, extraneous=0, expired=0, starting=2, stopping=1, deleting=1
    )
    # Starting builds count toward the target; failed, canceled, stopped and in-progress ones get replacements.
    assert preset_plan.actions == (CreateAction(count=10 - 2 - 2),)


async def test_failed_stopped_and_in_progress_prebuilds_are_never_deleted(factory: Factory, database_url: str) -> None:
    settings = settings_for(database_url)
    unwanted = await factory.preset(desired=0)
    unwanted_workspaces = await prebuilds_in_every_state(factory, unwanted)
    outdated = await factory.preset(desired=3, template=unwanted.template, active=False)
    outdated_workspaces = await prebuilds_in_every_state(factory, outdated)

    plan = await read_plan(factory.connection, settings, factory.now)
    assert plan_of(plan, unwanted).actions == (
        DeleteAction(ids(unwanted_workspaces["running"], unwanted_workspaces["retried"]), DeleteReason.EXTRANEOUS),
    )
    # The outdated preset's pending first build (no worker yet) is canceled; the one a provisioner is
    # building, and every other non-running prebuild, stays as evidence.
    outdated_plan = plan_of(plan, outdated)
    assert outdated_plan.state.starting == 0, "in-progress builds on a non-active version are not starting"
    assert [action.type for action in outdated_plan.actions] == ["cancel_pending", "delete"]
    assert outdated_plan.actions[1] == DeleteAction(
        ids(outdated_workspaces["running"], outdated_workspaces["retried"]), DeleteReason.INACTIVE
    )
    assert outdated_plan.actions[0].count == 1  # type: ignore[union-attr]


async def test_current_preset_is_the_latest_start_that_names_one(factory: Factory, database_url: str) -> None:
    settings = settings_for(database_url)
    first = await factory.preset(desired=5)
    second = await factory.preset(first.version, desired=5)

    # Stopped and started again by builds that name no preset: still the first preset's.
    restarted = await factory.prebuild(first, ago=minutes(50))
    await factory.build(restarted, transition="stop", ago=minutes(40))
    await factory.build(restarted, preset=False, ago=minutes(30))
    # A later start that names another preset moves the workspace to it.
    moved = await factory.prebuild(first, ago=minutes(50))
    await factory.build(moved, preset=second, ago=minutes(30))
    # A start without a preset in progress counts as starting for the current preset.
    starting = await factory.prebuild(first, ago=minutes(50))
    await factory.build(starting, transition="stop", ago=minutes(40))
    await factory.build(starting, preset=False, status="running", ago=minutes(1))
    # Stop and delete builds name no preset: they count for the current preset (the second here).
    stopping = await factory.prebuild(first, ago=minutes(50))
    await factory.build(stopping, preset=second, ago=minutes(45))
    await factory.build(stopping, transition="stop", status="running", ago=minutes(1))
    deleting = await factory.prebuild(second, ago=minutes(50))
    await factory.build(deleting, transition="delete", status="pending", ago=minutes(1))
    # A workspace whose builds never named a preset belongs to none.
    no_preset = await factory.workspace(None, template=first.template, created_at=factory.now - minutes(50))
    await factory.build(no_preset, preset=False, version=first.version, ago=minutes(50))

    snapshot = await read_snapshot(factory.connection, settings, factory.now)
    assert running_by_workspace(snapshot) == {restarted.id: first.id, moved.id: second.id}
    plan = await read_plan(factory.connection, settings, factory.now)
    assert plan_of(plan, first).state == PresetState(desired=5, actual=1, eligible=1, starting=1)
    assert plan_of(plan, second).state == PresetState(desired=5, actual=1, eligible=1, stopping=1, deleting=1)


async def test_readiness_counts_live_top_level_agents_of_the_latest_build(factory: Factory, database_url: str) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=20)
    expected: dict[UUID, bool] = {}

    async def prebuild(agents: list[str], ready: bool) -> Workspace:
        workspace = await factory.prebuild(preset, agents=agents)
        expected[workspace.id] = ready
        return workspace

    await prebuild(["ready"], True)
    await prebuild(["ready", "ready"], True)
    await prebuild(["ready", "starting"], False)
    await prebuild(["ready", "start_error"], False)
    await prebuild(["created"], False)
    await prebuild([], False)  # no agents: not ready

    # Sub-agents (with a parent) do not count, whatever their state.
    with_sub_agent = await prebuild(["ready"], True)
    parent = await factory.connection.fetchval(
        "select id from workspace_agents where job_id = $1", with_sub_agent.builds[0].job_id
    )
    await factory.agent(with_sub_agent.builds[0].job_id, "starting", parent_id=parent)
    await factory.agent(with_sub_agent.builds[0].job_id, "start_error", parent_id=parent)

    # Deleted agents do not count; a workspace whose only agents are deleted has no agents.
    with_deleted_agent = await prebuild(["ready"], True)
    await factory.agent(with_deleted_agent.builds[0].job_id, "starting", deleted=True)
    only_deleted = await prebuild([], False)
    await factory.agent(only_deleted.builds[0].job_id, "ready", deleted=True)

    # Only the latest build's agents matter.
    rebuilt_not_ready = await factory.prebuild(preset, agents=["ready"], ago=minutes(10))
    await factory.build(rebuilt_not_ready, preset=False, agents=["starting"])
    expected[rebuilt_not_ready.id] = False
    rebuilt_ready = await factory.prebuild(preset, agents=["starting"], ago=minutes(10))
    await factory.build(rebuilt_ready, preset=False, agents=["ready"])
    expected[rebuilt_ready.id] = True

    snapshot = await read_snapshot(factory.connection, settings, factory.now)
    assert readiness(snapshot) == expected
    state = plan_of(await read_plan(factory.connection, settings, factory.now), preset).state
    assert state.actual == len(expected)
    assert state.eligible == sum(expected.values())


async def test_time_to_live_expires_strictly_older_prebuilds(factory: Factory, database_url: str) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=5, ttl_seconds=600)
    very_old = await factory.prebuild(preset, ago=seconds(3600))
    just_over = await factory.prebuild(preset, ago=seconds(601))
    await factory.prebuild(preset, ago=seconds(600))  # exactly the TTL: not strictly older, so not expired
    await factory.prebuild(preset, ago=seconds(1))
    no_ttl = await factory.preset(desired=1, ttl_seconds=0, template=preset.template, version=preset.version)
    await factory.prebuild(no_ttl, ago=timedelta(days=30))
    null_ttl = await factory.preset(desired=1, ttl_seconds=None, version=preset.version)
    await factory.prebuild(null_ttl, ago=timedelta(days=30))

    plan = await read_plan(factory.connection, settings, factory.now)
    preset_plan = plan_of(plan, preset)
    assert preset_plan.state == PresetState(desired=5, actual=4, eligible=2, extraneous=0, expired=2)
    assert preset_plan.actions == (
        DeleteAction(ids(very_old, just_over), DeleteReason.EXPIRED),
        CreateAction(count=5 - (4 - 2)),
    )
    for unlimited in (no_ttl, null_ttl):
        assert plan_of(plan, unlimited).state == PresetState(desired=1, actual=1, eligible=1)
        assert plan_of(plan, unlimited).actions == ()

    # One second later, the prebuild that was exactly at its TTL has expired too.
    later = plan_of(await read_plan(factory.connection, settings, factory.now + seconds(1)), preset)
    assert later.state.expired == 3


async def test_invalidation_expires_prebuilds_created_before_it(factory: Factory, database_url: str) -> None:
    settings = settings_for(database_url)
    invalidated_at = factory.now - minutes(5)
    preset = await factory.preset(desired=1, last_invalidated_at=invalidated_at)
    before = await factory.prebuild(preset, ago=minutes(10))
    # Created exactly at the invalidation instant: not "before" it.
    at_instant = await factory.prebuild(preset, created_at=invalidated_at)
    await factory.prebuild(preset, ago=minutes(1))

    preset_plan = plan_of(await read_plan(factory.connection, settings, factory.now), preset)
    # Expired prebuilds are in `actual`, not in `extraneous`: max(3 - 1 - 1, 0) = 1.
    assert preset_plan.state == PresetState(desired=1, actual=3, eligible=2, extraneous=1, expired=1)
    assert preset_plan.actions == (
        DeleteAction(ids(before), DeleteReason.INVALIDATED),
        DeleteAction(ids(at_instant), DeleteReason.EXTRANEOUS),
    )


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# (now in UTC, target of the New York, Tokyo and Kolkata presets), all with "* 9-18 * * 1-5" -> 5, else 1.
TIME_ZONE_CASES = [
    ("2026-01-05T14:00:00", (5, 1, 1)),  # Monday: New York 09:00 EST; Tokyo 23:00; Kolkata 19:30
    ("2026-01-05T13:59:59", (1, 1, 1)),  # New York 08:59:59
    ("2026-01-05T23:59:59", (5, 1, 1)),  # New York 18:59:59, the last second of the range; Tokyo Tuesday 08:59
    ("2026-01-06T00:00:00", (1, 5, 1)),  # New York 19:00; Tokyo Tuesday 09:00; Kolkata 05:30
    ("2026-01-05T03:30:00", (1, 5, 5)),  # New York Sunday 22:30; Tokyo Monday 12:30; Kolkata Monday 09:00
    ("2026-01-05T03:29:59", (1, 5, 1)),  # Kolkata 08:59:59 (a half-hour offset)
    ("2026-01-04T23:59:59", (1, 1, 1)),  # Sunday in New York; Monday 08:59:59 in Tokyo
    ("2026-01-10T15:00:00", (1, 1, 1)),  # Saturday everywhere (Sunday 00:00 in Tokyo)
    ("2026-01-09T23:30:00", (5, 1, 1)),  # Friday 18:30 in New York; Saturday in Tokyo and Kolkata
    ("2026-07-06T13:00:00", (5, 1, 5)),  # summer: New York 09:00 EDT (UTC-4); Kolkata 18:30
    ("2026-01-05T13:00:00", (1, 1, 5)),  # winter: the same UTC instant is 08:00 EST in New York
]


async def test_schedules_read_as_time_ranges_in_the_preset_time_zone(factory: Factory, database_url: str) -> None:
    settings = settings_for(database_url)
    template = await factory.template()
    version = await factory.version(template)
    business_hours = [("* 9-18 * * 1-5", 5)]
    zones = [
        await factory.preset(version, desired=1, timezone=zone, schedules=business_hours)
        for zone in ("America/New_York", "Asia/Tokyo", "Asia/Kolkata")
    ]
    mismatches = []
    for moment, expected in TIME_ZONE_CASES:
        plan = await read_plan(factory.connection, settings, at(moment))
        targets = tuple(plan_of(plan, preset).state.desired for preset in zones)
        if targets != expected:
            mismatches.append(f"{moment}: got {targets}, expected {expected}")
        assert not plan.problems
    assert not mismatches, "\n".join(mismatches)


async def test_unusable_schedules_fall_back_to_desired_instances(factory: Factory, database_url: str) -> None:
    settings = settings_for(database_url)
    version = await factory.version()
    always = [("* * * * *", 7)]
    unknown_zone = await factory.preset(version, desired=2, timezone="Mars/Olympus_Mons", schedules=always)
    no_zone = await factory.preset(version, desired=2, timezone="", schedules=always)
    minute_field = await factory.preset(version, desired=2, timezone="UTC", schedules=[("0 9-18 * * *", 7)])
    weekday_seven = await factory.preset(version, desired=2, timezone="UTC", schedules=[("* * * * 7", 7)])
    overlapping = await factory.preset(
        version, desired=2, timezone="UTC", schedules=[("* 9-14 * * *", 3), ("* 12-20 * * *", 4)]
    )
    valid = await factory.preset(version, desired=2, timezone="UTC", schedules=always)

    plan = await read_plan(factory.connection, settings, at("2026-01-05T13:00:00"))
    for preset in (unknown_zone, no_zone, minute_field, weekday_seven, overlapping):
        assert plan_of(plan, preset).state.desired == 2, preset.name
    assert plan_of(plan, valid).state.desired == 7
    # Each fallback is reported, for the pass to log.
    assert {problem.preset_id for problem in plan.problems} == {
        unknown_zone.id,
        no_zone.id,
        minute_field.id,
        weekday_seven.id,
        overlapping.id,
    }
    # Outside the overlap, each of the overlapping schedules applies on its own.
    morning = await read_plan(factory.connection, settings, at("2026-01-05T10:00:00"))
    evening = await read_plan(factory.connection, settings, at("2026-01-05T19:00:00"))
    night = await read_plan(factory.connection, settings, at("2026-01-05T22:00:00"))
    assert [plan_of(p, overlapping).state.desired for p in (morning, evening, night)] == [3, 4, 2]


async def test_a_schedule_can_shrink_the_pool_at_night(factory: Factory, database_url: str) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=2, timezone="Europe/Paris", schedules=[("* 0-5 * * *", 0)])
    older = await factory.prebuild(preset, created_at=at("2026-01-04T10:00:00"))
    newer = await factory.prebuild(preset, created_at=at("2026-01-04T11:00:00"))

    night = plan_of(await read_plan(factory.connection, settings, at("2026-01-05T03:00:00")), preset)
    assert night.state == PresetState(desired=0, actual=2, eligible=2, extraneous=2)
    assert night.actions == (DeleteAction(ids(older, newer), DeleteReason.EXTRANEOUS),)
    # 05:30 UTC is 06:30 in Paris: the schedule no longer applies.
    day = plan_of(await read_plan(factory.connection, settings, at("2026-01-05T05:30:00")), preset)
    assert day.state == PresetState(desired=2, actual=2, eligible=2)
    assert day.actions == ()


async def running_pool(factory: Factory, preset: Preset) -> tuple[Workspace, Workspace]:
    """Two running prebuilds of `preset`, the older one expired when the preset has a TTL."""
    return (
        await factory.prebuild(preset, ago=minutes(120)),
        await factory.prebuild(preset, ago=minutes(5)),
    )


async def test_deleted_deprecated_and_outdated_presets_are_not_active(factory: Factory, database_url: str) -> None:
    settings: Settings = settings_for(database_url)
    live = await factory.preset(desired=2, ttl_seconds=3600)
    live_pool = await running_pool(factory, live)
    deleted = await factory.preset(desired=2, ttl_seconds=3600, template=await factory.template(deleted=True))
    deleted_pool = await running_pool(factory, deleted)
    deprecated_template = await factory.template(deprecated="use another template")
    deprecated = await factory.preset(desired=2, ttl_seconds=3600, template=deprecated_template)
    deprecated_pool = await running_pool(factory, deprecated)
    outdated = await factory.preset(desired=2, ttl_seconds=3600, template=live.template, active=False)
    outdated_pool = await running_pool(factory, outdated)
    # A template without an active version at all.
    unpublished = await factory.preset(desired=2, ttl_seconds=3600, active=False)
    unpublished_pool = await running_pool(factory, unpublished)
    # Inactive with nothing running (failed prebuilds are not running): skipped.
    idle = await factory.preset(desired=2, template=live.template, active=False)
    await factory.prebuild(idle, status="failed", ago=minutes(300))
    no_prebuilds = await factory.preset(desired=None, version=live.version)

    plan = await read_plan(factory.connection, settings, factory.now)
    live_plan = plan_of(plan, live)
    assert live_plan.preset.active
    assert live_plan.state == PresetState(desired=2, actual=2, eligible=1, expired=1)
    assert live_plan.actions == (DeleteAction(ids(live_pool[0]), DeleteReason.EXPIRED), CreateAction(count=1))
    for preset, pool in (
        (deleted, deleted_pool),
        (deprecated, deprecated_pool),
        (outdated, outdated_pool),
        (unpublished, unpublished_pool),
    ):
        preset_plan = plan_of(plan, preset)
        assert not preset_plan.preset.active, preset.name
        # Not active: desired, eligible and extraneous are 0; the expired one is deleted too (ours).
        assert preset_plan.state == PresetState(desired=0, actual=2, eligible=0, extraneous=0, expired=1), preset.name
        assert preset_plan.actions == (DeleteAction(ids(*pool), DeleteReason.INACTIVE),), preset.name
        assert not preset_plan.skipped
    idle_plan = plan_of(plan, idle)
    assert idle_plan.skipped
    assert idle_plan.actions == ()
    assert no_prebuilds.id not in {preset_plan.preset.id for preset_plan in plan.presets}


async def test_in_progress_counts_only_system_builds_that_are_latest_on_the_active_version(
    factory: Factory, database_url: str
) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=6)
    old = await factory.preset(desired=1, template=preset.template, active=False)
    user = await factory.user()

    await factory.prebuild(preset, status="pending")  # counted as starting
    counted_stop = await factory.prebuild(preset, ago=minutes(10))
    await factory.build(counted_stop, transition="stop", status="running")
    counted_delete = await factory.prebuild(preset, ago=minutes(10))
    await factory.build(counted_delete, transition="delete", status="pending")

    # Builds a user started on a prebuild are not the system's.
    user_start = await factory.workspace(preset)
    await factory.build(user_start, status="pending", initiator_id=user.id)
    user_stop = await factory.prebuild(preset, ago=minutes(10))
    await factory.build(user_stop, transition="stop", status="running", initiator_id=user.id)
    # A pending build that is no longer the latest one.
    superseded = await factory.workspace(preset, created_at=factory.now - minutes(10))
    await factory.build(superseded, status="pending", ago=minutes(10))
    await factory.build(superseded, ago=minutes(5))
    # Deleted and claimed workspaces are not prebuilds.
    deleted = await factory.workspace(preset, deleted=True)
    await factory.build(deleted, status="pending")
    claimed = await factory.prebuild(preset, status="running")
    await factory.claim(claimed)
    # On a version that is no longer active: not starting (but pending, hence canceled).
    await factory.prebuild(old, status="pending")
    await factory.prebuild(old, status="running")

    plan = await read_plan(factory.connection, settings, factory.now)
    # The superseded workspace's latest build succeeded: it is running, not starting.
    assert plan_of(plan, preset).state == PresetState(
        desired=6, actual=1, eligible=1, starting=1, stopping=1, deleting=1
    )
    assert plan_of(plan, preset).actions == (CreateAction(count=6 - 1 - 1),)
    assert plan_of(plan, old).state == PresetState()
