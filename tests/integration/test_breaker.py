"""The global breaker on a real database (issue 15.2): a shared outage opens one circuit instead of N hard
limits and N notifications; deletes go on; half-open probes spread over templates; a probe's success
closes it with one notification, their failure opens it again for longer; the state survives a restart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from reconciler.breaker import BreakerEvent, BreakerState
from reconciler.plan import DeleteAction, StatusChangeKind
from reconciler.reports import plan_json
from tests.factories import Factory, Preset, minutes
from tests.integration.reconcile_support import open_pool, pass_at, plan_of, read_plan, settings_for

BREAKER = {
    "breaker_enabled": "true",
    "breaker_min_builds": "6",
    "breaker_min_presets": "3",
    "breaker_probes": "2",
    "breaker_open_duration": "5m",
}


async def outage(factory: Factory, presets: int = 4) -> list[Preset]:
    """Presets of different templates whose last three prebuilds all failed in the last minutes: each is at
    the hard limit (3) on its own evidence."""
    failing = [await factory.preset(desired=1) for _ in range(presets)]
    for preset in failing:
        for ago in (3, 2, 1):
            await factory.prebuild(preset, status="failed", ago=minutes(ago))
    return failing


async def messages(connection: asyncpg.Connection) -> list[tuple[str, str | None]]:
    rows = await connection.fetch(
        "select kind, user_id::text from notification_messages order by created_at, kind, user_id"
    )
    return [(row["kind"], row["user_id"]) for row in rows]


async def breaker_row(connection: asyncpg.Connection) -> tuple[str, int]:
    row = await connection.fetchrow("select state, episode from prebuild_breaker")
    assert row is not None
    return row["state"], row["episode"]


async def finish_jobs_of(connection: asyncpg.Connection, workspace_ids: list[object], *, failed: bool) -> None:
    await connection.execute(
        "update provisioner_jobs set started_at = now(), completed_at = now(), error = $2 "
        "where id in (select job_id from workspace_builds where workspace_id = any($1::uuid[]))",
        workspace_ids,
        "registry unreachable" if failed else None,
    )


async def test_without_the_breaker_a_shared_outage_is_n_hard_limits(factory: Factory, database_url: str) -> None:
    """The control: Coder's behaviour, which the breaker replaces."""
    failing = await outage(factory)
    plan = await read_plan(factory.connection, settings_for(database_url), datetime.now(UTC))
    assert {change.preset.id for change in plan.status_changes} == {preset.id for preset in failing}
    assert plan.breaker is None


async def test_a_shared_outage_opens_the_breaker_once(factory: Factory, database_url: str) -> None:
    admin = await factory.user(site_roles=["template-admin"])
    failing = await outage(factory)
    shrinking = await factory.preset(desired=0)
    extraneous = await factory.prebuild(shrinking, ago=minutes(30))
    healthy = await factory.preset(desired=2)
    settings = settings_for(database_url, **BREAKER)
    now = datetime.now(UTC)

    plan = await read_plan(factory.connection, settings, now)
    assert plan.breaker is not None
    assert plan.breaker.event is BreakerEvent.OPENED
    assert plan.breaker.creates_allowed == 0
    # No preset becomes hard limited for the outage; creates stop everywhere; deletes go on.
    assert [change.kind for change in plan.status_changes if change.kind is StatusChangeKind.HARD_LIMITED] == []
    assert plan_of(plan, healthy).actions == ()
    assert plan_of(plan, healthy).creates_held_by == "breaker_open"
    deletes = plan_of(plan, shrinking).actions
    assert [(type(action), action.workspace_ids) for action in deletes if isinstance(action, DeleteAction)] == [
        (DeleteAction, (extraneous.id,))
    ]
    assert plan_json(plan, paused=False)["breaker"]["state"] == "open"

    async with open_pool(database_url) as pool:
        first = await pass_at(pool, settings, now)
        assert first.execution is not None
        assert (first.execution.breaker_event, first.execution.created, first.execution.deleted) == (
            BreakerEvent.OPENED,
            0,
            1,
        )
        assert await breaker_row(factory.connection) == ("open", 1)
        assert await messages(factory.connection) == [("breaker_opened", str(admin.id))]

        # Later passes of the same episode: no other notification, still no hard limit (the episode's
        # failures are the outage's), still no creates.
        second = await pass_at(pool, settings, now + minutes(1))
        assert second.execution is not None
        assert second.execution.created == 0
        assert second.execution.status_changes.hard_limited == ()
    assert await messages(factory.connection) == [("breaker_opened", str(admin.id))]
    statuses = await factory.connection.fetch(
        "select prebuild_status::text from template_version_presets where id = any($1::uuid[])",
        [preset.id for preset in failing],
    )
    assert {row["prebuild_status"] for row in statuses} == {"normal"}

    # A restart (a new process, or another replica) reads the same breaker from the database.
    again = await read_plan(factory.connection, settings, now + minutes(2))
    assert again.breaker is not None
    assert (again.breaker.record.state, again.breaker.record.episode, again.breaker.event) == (
        BreakerState.OPEN,
        1,
        None,
    )


async def test_half_open_probes_then_a_success_closes_it_with_one_notification(
    factory: Factory, database_url: str
) -> None:
    admin = await factory.user(site_roles=["template-admin"])
    failing = await outage(factory)
    settings = settings_for(database_url, **BREAKER)
    now = datetime.now(UTC)
    async with open_pool(database_url) as pool:
        await pass_at(pool, settings, now)
        # Before the open duration is over: nothing.
        still_open = await pass_at(pool, settings, now + minutes(4))
        assert still_open.execution is not None
        assert still_open.execution.created == 0

        half_open = await pass_at(pool, settings, now + minutes(5) + timedelta(seconds=1))
        assert half_open.execution is not None
        assert half_open.execution.breaker_event is BreakerEvent.HALF_OPENED
        # Two probes (RECONCILER_BREAKER_PROBES), on two different templates.
        assert half_open.execution.created == 2
        probes = await factory.connection.fetch(
            "select w.id, w.template_id from workspaces w join workspace_builds b on b.workspace_id = w.id "
            "join provisioner_jobs j on j.id = b.job_id where j.completed_at is null"
        )
        assert len({row["template_id"] for row in probes}) == 2
        assert await breaker_row(factory.connection) == ("half_open", 1)

        # While the probes run, no more creates.
        waiting = await pass_at(pool, settings, now + minutes(6))
        assert waiting.execution is not None
        assert waiting.execution.created == 0

        await finish_jobs_of(factory.connection, [probes[0]["id"]], failed=False)
        closing = await pass_at(pool, settings, now + minutes(7))
        assert closing.execution is not None
        assert closing.execution.breaker_event is BreakerEvent.CLOSED
        assert await breaker_row(factory.connection) == ("closed", 1)
        # Closed: the outage's failures count for no preset, so they create again and none is limited.
        assert closing.execution.status_changes.hard_limited == ()
        assert closing.execution.created > 0
    assert await messages(factory.connection) == [
        ("breaker_opened", str(admin.id)),
        ("breaker_closed", str(admin.id)),
    ]
    statuses = await factory.connection.fetch(
        "select prebuild_status::text from template_version_presets where id = any($1::uuid[])",
        [preset.id for preset in failing],
    )
    assert {row["prebuild_status"] for row in statuses} == {"normal"}


async def test_failed_probes_open_it_again_for_longer_without_a_notification(
    factory: Factory, database_url: str
) -> None:
    await factory.user(site_roles=["template-admin"])
    await outage(factory)
    settings = settings_for(database_url, **BREAKER)
    now = datetime.now(UTC)
    async with open_pool(database_url) as pool:
        await pass_at(pool, settings, now)
        await pass_at(pool, settings, now + minutes(6))
        probes = await factory.connection.fetch(
            "select b.workspace_id from workspace_builds b join provisioner_jobs j on j.id = b.job_id "
            "where j.completed_at is null"
        )
        assert len(probes) == 2
        await finish_jobs_of(factory.connection, [row["workspace_id"] for row in probes], failed=True)
        reopened = await pass_at(pool, settings, now + minutes(7))
        assert reopened.execution is not None
        assert reopened.execution.breaker_event is BreakerEvent.REOPENED
        assert reopened.execution.created == 0
    row = await factory.connection.fetchrow("select state, episode, open_duration from prebuild_breaker")
    assert row is not None
    assert (row["state"], row["episode"], row["open_duration"]) == ("open", 1, timedelta(minutes=10))
    assert [kind for kind, _ in await messages(factory.connection)] == ["breaker_opened"]
