"""The pass's metrics on a real database: prebuilds (not batches) acted on, by reason; every tick timed by
outcome; the age of the oldest prebuild job no provisioner has started (issue 11.8)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import asyncpg
from prometheus_client import CollectorRegistry

from reconciler import db, executor, reconcile
from reconciler.metrics import Metrics
from reconciler.reconcile import PassOutcome, run_pass
from reconciler.sdnotify import SystemdNotifier
from reconciler.service import Daemon
from tests.factories import Factory, minutes
from tests.integration.reconcile_support import settings_for

ACTIONS = "prebuilds_reconciler_actions_total"
DURATION_COUNT = "coderd_prebuilds_reconciliation_duration_seconds_count"
PENDING_AGE = "prebuilds_reconciler_oldest_pending_prebuild_job_age_seconds"


def actions(metrics: Metrics, kind: str, outcome: str, reason: str = "") -> float:
    value = metrics.registry.get_sample_value(ACTIONS, {"kind": kind, "outcome": outcome, "reason": reason})
    return value or 0.0


async def test_a_first_pass_that_creates_ten_prebuilds_counts_ten(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    """Issue 11.8: a first pass that created 10 prebuilds read 6 (one per action of a preset)."""
    await factory.preset(desired=7)
    await factory.preset(desired=3)
    metrics = Metrics(CollectorRegistry(), process_metrics=False)

    result = await run_pass(pool, settings_for(database_url), datetime.now(UTC), observe_action=metrics.observe_action)

    assert result.outcome is PassOutcome.SUCCESS, result.error
    assert result.execution is not None
    assert result.execution.created == 10
    assert actions(metrics, "create", "success") == 10
    assert await factory.connection.fetchval("select count(*) from workspaces where not deleted") == 10


async def test_deletes_are_counted_per_prebuild_with_their_reason(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    now = datetime.now(UTC)
    past_ttl = await factory.preset(desired=2, ttl_seconds=600)
    await factory.prebuilds(past_ttl, 2, ago=minutes(20))
    # Within its time to live, but made before the operator's invalidation.
    invalidated = await factory.preset(desired=1, ttl_seconds=3600, last_invalidated_at=now - minutes(1))
    await factory.prebuild(invalidated, ago=minutes(5))
    extra = await factory.preset(desired=1)
    await factory.prebuilds(extra, 3, ago=minutes(1))
    outdated = await factory.preset(desired=2, active=False)
    await factory.prebuilds(outdated, 2, ago=minutes(1))
    metrics = Metrics(CollectorRegistry(), process_metrics=False)

    result = await run_pass(pool, settings_for(database_url), now, observe_action=metrics.observe_action)

    assert result.outcome is PassOutcome.SUCCESS, result.error
    assert result.execution is not None
    deleted_by_preset = {
        row["preset_id"]: row["count"]
        for row in await factory.connection.fetch(
            # A delete is a delete build appended to the prebuild.
            "select b.template_version_preset_id as preset_id, count(*) from workspace_builds b "
            "where b.build_number = 1 and exists (select 1 from workspace_builds d "
            "where d.workspace_id = b.workspace_id and d.transition = 'delete') group by 1"
        )
    }
    assert deleted_by_preset == {past_ttl.id: 2, invalidated.id: 1, extra.id: 2, outdated.id: 2}
    expected = {"expired": past_ttl, "invalidated": invalidated, "extraneous": extra, "inactive": outdated}
    for reason, preset in expected.items():
        assert actions(metrics, "delete", "success", reason) == deleted_by_preset[preset.id], reason
    assert sum(actions(metrics, "delete", "success", reason) for reason in expected) == result.execution.deleted
    # The replacements of the expired and the invalidated ones.
    assert actions(metrics, "create", "success") == result.execution.created == 3


async def test_creates_the_clamp_withholds_are_counted_as_skipped_prebuilds(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    """A create of 3 cut to 1 at write time (the target was lowered after the plan) counts 1 prebuild
    created and 2 skipped, not one action."""
    preset = await factory.preset(desired=3)
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    now = datetime.now(UTC)
    async with pool.acquire() as connection:
        plan = await reconcile.read_plan(connection, settings_for(database_url), now)
    await factory.connection.execute(
        "update template_version_presets set desired_instances = 1 where id = $1", preset.id
    )

    summary = await executor.execute(pool, plan, now, observe=metrics.observe_action)

    assert (summary.created, summary.creates_clamped) == (1, 2)
    assert actions(metrics, "create", "success") == 1
    assert actions(metrics, "create", "skipped") == 2


@asynccontextmanager
async def started_daemon(database_url: str, **options: object) -> AsyncIterator[Daemon]:
    """A daemon whose scheduled passes come once an hour: the test runs its passes itself."""
    settings = settings_for(database_url, http_address="127.0.0.1:0", reconciliation_interval="1h")
    # No NOTIFY_SOCKET: the daemon must not talk to a systemd that runs the test session.
    daemon = Daemon(settings, registry=CollectorRegistry(), notifier=SystemdNotifier({}), **options)  # type: ignore[arg-type]
    first_pass = asyncio.Event()
    daemon.pass_listeners.append(lambda _result: first_pass.set())
    await daemon.start()
    try:
        await asyncio.wait_for(first_pass.wait(), timeout=60)
        yield daemon
    finally:
        await daemon.stop()


async def test_every_tick_is_timed_with_its_outcome(factory: Factory, database_url: str) -> None:
    """Coder observes every tick: so do we, under an `outcome` label (issue 11.8)."""
    await factory.preset(desired=1)
    async with started_daemon(database_url) as daemon:
        value = daemon.metrics.registry.get_sample_value
        assert value(DURATION_COUNT, {"outcome": "success"}) == 1  # the start-up pass
        # Another session holds the pass lock: the tick is a skip, and is timed.
        async with factory.connection.transaction():
            await factory.connection.execute("select pg_advisory_xact_lock($1)", db.RECONCILIATION_LOCK_KEY)
            assert (await daemon.run_pass_now()).outcome is PassOutcome.SKIPPED_LOCK
        await factory.set_paused(True)
        assert (await daemon.run_pass_now()).outcome is PassOutcome.PAUSED
        ended_before = value("prebuilds_reconciler_last_pass_timestamp_seconds")

        assert value(DURATION_COUNT, {"outcome": "skipped_lock"}) == 1
        assert value(DURATION_COUNT, {"outcome": "paused"}) == 1
        assert value(DURATION_COUNT, {"outcome": "success"}) == 1
        assert value("prebuilds_reconciler_passes_total", {"outcome": "skipped_lock"}) == 1
        # A pass of any outcome ends a pass; only a success is a successful one.
        last_success = value("prebuilds_reconciler_last_successful_pass_timestamp_seconds")
        assert last_success is not None
        assert ended_before is not None
        assert last_success < ended_before


async def test_the_oldest_pending_prebuild_job_per_organization(factory: Factory, database_url: str) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    waiting = await factory.preset(desired=0)
    idle = await factory.preset(desired=0)
    # The oldest unstarted prebuild job of the organization: 10 minutes.
    for ago in (10, 3):
        workspace = await factory.workspace(waiting)
        await factory.build(workspace, status="pending", created_at=now - minutes(ago))
    # Not counted: a started one, a canceled one, and a user's own job (older still).
    for status in ("running", "canceling"):
        workspace = await factory.workspace(waiting)
        await factory.build(workspace, status=status, created_at=now - minutes(30))
    user = await factory.user()
    users_workspace = await factory.workspace(waiting, owner_id=user.id)
    await factory.build(users_workspace, status="pending", created_at=now - minutes(60), initiator_id=user.id)

    async with started_daemon(database_url, clock=lambda: now) as daemon:
        await daemon.refresh_pending_jobs()
        value = daemon.metrics.registry.get_sample_value
        assert value(PENDING_AGE, {"organization_name": waiting.organization.name}) == 600
        assert value(PENDING_AGE, {"organization_name": idle.organization.name}) == 0

        # A provisioner starts the oldest: the next one is the oldest now.
        await factory.connection.execute(
            "update provisioner_jobs set started_at = $1 where created_at = $2", now, now - minutes(10)
        )
        await daemon.refresh_pending_jobs()
        assert value(PENDING_AGE, {"organization_name": waiting.organization.name}) == 180
