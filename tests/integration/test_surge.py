"""Surge replacement and TTL jitter on a real database (issue 15.4): a pool whose prebuilds all expire at
once keeps its claimable count while the replacements are built, where Coder's rule empties it."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from reconciler.plan import CreateAction
from tests.factories import Factory, minutes
from tests.integration.reconcile_support import open_pool, pass_at, plan_of, read_plan, settings_for
from tests.integration.test_commands import cli


async def finish_pending_creates(factory: Factory) -> int:
    """The provisioner: every pending create succeeds, with a ready agent."""
    jobs = await factory.connection.fetch(
        "select j.id from provisioner_jobs j join workspace_builds b on b.job_id = j.id "
        "where j.started_at is null and b.transition = 'start'"
    )
    for job in jobs:
        await factory.connection.execute(
            "update provisioner_jobs set started_at = now(), completed_at = now() where id = $1", job["id"]
        )
        await factory.agent(job["id"], "ready")
    return len(jobs)


async def finish_pending_deletes(connection: asyncpg.Connection) -> None:
    await connection.execute(
        "update workspaces set deleted = true where id in (select b.workspace_id from workspace_builds b "
        "join provisioner_jobs j on j.id = b.job_id where j.started_at is null and b.transition = 'delete')"
    )
    await connection.execute(
        "update provisioner_jobs set started_at = now(), completed_at = now() where started_at is null"
    )


async def test_a_rotation_with_surge_never_lowers_the_eligible_count(factory: Factory, database_url: str) -> None:
    preset = await factory.preset(desired=2, ttl_seconds=3600)
    await factory.prebuilds(preset, 2, ago=minutes(120))
    settings = settings_for(database_url, surge="1")
    now = datetime.now(UTC)
    eligible: list[int] = []
    async with open_pool(database_url) as pool:
        for step in range(8):
            result = await pass_at(pool, settings, now + minutes(step))
            assert result.plan is not None
            state = plan_of(result.plan, preset).state
            eligible.append(state.eligible)
            # Never more than the surge beyond the target: kept expired + fresh + starting.
            live = await factory.connection.fetchval(
                "select count(*) from workspaces where owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' "
                "and not deleted and id not in (select b.workspace_id from workspace_builds b "
                "where b.transition = 'delete')"
            )
            assert live <= 2 + 1
            await finish_pending_creates(factory)
            await finish_pending_deletes(factory.connection)
    assert min(eligible) == 2, eligible
    # Rotated: two fresh prebuilds, none expired.
    final = await read_plan(factory.connection, settings, now + minutes(8))
    assert (plan_of(final, preset).state.eligible, plan_of(final, preset).state.expired) == (2, 0)


async def test_without_surge_the_rotation_empties_the_pool_as_coders_does(factory: Factory, database_url: str) -> None:
    preset = await factory.preset(desired=2, ttl_seconds=3600)
    old = await factory.prebuilds(preset, 2, ago=minutes(120))
    plan = await read_plan(factory.connection, settings_for(database_url), datetime.now(UTC))
    preset_plan = plan_of(plan, preset)
    assert preset_plan.state.eligible == 0
    deleted = {workspace_id for action in preset_plan.actions for workspace_id in getattr(action, "workspace_ids", ())}
    assert deleted == {workspace.id for workspace in old}


async def test_ttl_jitter_spreads_expiry_the_same_way_every_time(factory: Factory, database_url: str) -> None:
    preset = await factory.preset(desired=20, ttl_seconds=3600)
    # Twenty prebuilds built together, 55 minutes ago: without jitter none has expired.
    await factory.prebuilds(preset, 20, ago=minutes(55))
    now = datetime.now(UTC)
    plain = await read_plan(factory.connection, settings_for(database_url), now)
    assert plan_of(plain, preset).state.expired == 0
    settings = settings_for(database_url, ttl_jitter="0.2")
    first = await read_plan(factory.connection, settings, now)
    second = await read_plan(factory.connection, settings, now)
    expired = plan_of(first, preset).state.expired
    # Lifetimes spread over 48-60 minutes: at 55, some have expired and some not; two replicas agree.
    assert 0 < expired < 20
    assert plan_of(second, preset).actions == plan_of(first, preset).actions


async def test_presets_invalidate_expires_the_pool_and_honours_the_surge(factory: Factory, database_url: str) -> None:
    preset = await factory.preset(desired=2)
    await factory.prebuilds(preset, 2, ago=minutes(10))
    name = f"{preset.template.name}/{preset.name}"

    invalidated = await cli(database_url, "presets", "invalidate", name)
    assert invalidated.returncode == 0, invalidated.stderr
    assert str(preset.id) in invalidated.stdout
    assert await factory.connection.fetchval(
        "select last_invalidated_at is not null from template_version_presets where id = $1", preset.id
    )
    now = datetime.now(UTC)
    # Coder's rule: both deleted at once, the pool empty until the replacements are ready.
    coder = plan_of(await read_plan(factory.connection, settings_for(database_url), now), preset)
    assert (coder.state.expired, coder.state.eligible) == (2, 0)
    # With a surge of 1: both stay claimable, one replacement is built first.
    surged = plan_of(await read_plan(factory.connection, settings_for(database_url, surge="1"), now), preset)
    assert (surged.state.eligible, surged.surge_kept) == (2, 2)
    assert surged.actions == (CreateAction(count=1),)

    missing = await cli(database_url, "presets", "invalidate", "no-such-template/preset")
    assert missing.returncode == 1
