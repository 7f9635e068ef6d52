"""Targeted passes beside full passes (docs/DECISIONS.md, "Targeted passes beside full passes").

A targeted pass holds its templates' locks instead of the pass lock, so it runs while a full pass does;
a full pass writes each preset under its template's lock and defers what a targeted pass holds or has
taken since the full pass's snapshot. Each interleaving is made to happen, not hoped for: a lock held by
the test, or a full pass held between its snapshot and its writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from reconciler import db, executor, reconcile
from reconciler.plan import CreateAction, DeleteAction, DeleteReason
from reconciler.reconcile import PassOutcome, run_pass
from reconciler.sdnotify import SystemdNotifier
from reconciler.service import Daemon
from reconciler.snapshot import PREBUILDS_SYSTEM_USER_ID
from tests.factories import Factory, Preset, minutes
from tests.integration.notification_helpers import eventually
from tests.integration.reconcile_support import plan_of, preset_row, read_plan, settings_for

TEMPLATE_LOCK = "select pg_advisory_lock($1::integer, hashtext($2::text))"
# pg_locks is the whole server's: only this test's database counts (other tests run beside it).
HELD_ADVISORY_LOCKS = """
select count(*) from pg_locks
where locktype = 'advisory' and database = (select oid from pg_database where datname = current_database())
"""


async def live_prebuilds(connection: asyncpg.Connection, preset: Preset) -> set[UUID]:
    """The preset's prebuilds whose latest build is a start: not being deleted, not claimed."""
    rows = await connection.fetch(
        """
        select w.id from workspaces w
        where w.owner_id = $1 and not w.deleted
            and (select b.transition from workspace_builds b where b.workspace_id = w.id
                 order by b.build_number desc limit 1) = 'start'
            and exists (select from workspace_builds b where b.workspace_id = w.id
                        and b.template_version_preset_id = $2)
        """,
        PREBUILDS_SYSTEM_USER_ID,
        preset.id,
    )
    return {row["id"] for row in rows}


async def messages_of(connection: asyncpg.Connection, preset: Preset) -> list[str]:
    rows = await connection.fetch("select kind from notification_messages where preset_id = $1", preset.id)
    return [row["kind"] for row in rows]


@asynccontextmanager
async def template_held(database_url: str, preset: Preset) -> AsyncIterator[None]:
    """Hold the preset's template lock from another session, as a targeted pass (or a full pass writing
    that template) does."""
    holder = await db.connect(database_url)
    try:
        await holder.execute(TEMPLATE_LOCK, db.TEMPLATE_LOCK_CLASS, str(preset.template.id))
        yield
    finally:
        await holder.close()


async def test_a_targeted_pass_runs_while_a_full_pass_holds_the_pass_lock(
    factory: Factory, pool: asyncpg.Pool, database_url: str, connection: asyncpg.Connection
) -> None:
    preset = await factory.preset(desired=1)
    settings = settings_for(database_url)
    holder = await db.connect(database_url)
    try:
        # A full pass (this process's or another replica's) holds the pass lock throughout.
        assert await holder.fetchval("select pg_try_advisory_lock($1::bigint)", db.RECONCILIATION_LOCK_KEY)
        result = await run_pass(pool, settings, factory.now, template_ids=[preset.template.id])
    finally:
        await holder.close()
    assert result.outcome is PassOutcome.SUCCESS, result.error
    assert result.execution is not None
    assert result.execution.created == 1
    assert len(await live_prebuilds(connection, preset)) == 1


async def test_a_targeted_pass_waits_while_its_template_is_held(
    factory: Factory, pool: asyncpg.Pool, database_url: str, connection: asyncpg.Connection
) -> None:
    preset = await factory.preset(desired=1)
    settings = settings_for(database_url)
    async with template_held(database_url, preset):
        held = await run_pass(pool, settings, factory.now, template_ids=[preset.template.id])
    assert held.outcome is PassOutcome.SKIPPED_LOCK
    assert await live_prebuilds(connection, preset) == set()
    # It released nothing it did not hold, and holds nothing now: the next try goes through.
    again = await run_pass(pool, settings, factory.now, template_ids=[preset.template.id])
    assert again.outcome is PassOutcome.SUCCESS, again.error
    assert len(await live_prebuilds(connection, preset)) == 1
    assert await connection.fetchval(HELD_ADVISORY_LOCKS) == 0


async def test_a_full_pass_defers_the_presets_and_status_changes_of_a_held_template(
    factory: Factory, pool: asyncpg.Pool, database_url: str, connection: asyncpg.Connection
) -> None:
    settings = settings_for(database_url, failure_hard_limit="1")
    await factory.user(site_roles=["template-admin"])
    held = await factory.preset(desired=1)
    failing = await factory.preset(held.version, desired=1)
    await factory.prebuild(failing, status="failed", ago=minutes(30))
    free = await factory.preset(desired=1)
    async with template_held(database_url, held):
        result = await run_pass(pool, settings, factory.now)
        assert result.outcome is PassOutcome.SUCCESS, result.error
        assert result.execution is not None
        # The other template's preset was written; the held template's create and status change wait.
        assert len(await live_prebuilds(connection, free)) == 1
        assert await live_prebuilds(connection, held) == set()
        assert result.execution.presets_deferred == 1
        assert result.status_changes.deferred == 1
        assert result.status_changes.hard_limited == ()
        assert (await preset_row(connection, failing))["prebuild_status"] == "normal"
        assert await messages_of(connection, failing) == []
    later = await run_pass(pool, settings, factory.now + minutes(1))
    assert later.outcome is PassOutcome.SUCCESS, later.error
    assert later.status_changes.hard_limited == (failing.id,)
    assert len(await live_prebuilds(connection, held)) == 1
    assert await messages_of(connection, failing) == ["hard_limited"]
    # Every template lock a full pass took was released with its writes.
    assert await connection.fetchval(HELD_ADVISORY_LOCKS) == 0


class HeldFullPass:
    """The daemon's full pass held between its snapshot and its writes, until `release()`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.planned = asyncio.Event()
        self._go = asyncio.Event()
        self.plan: Any = None
        real = executor.execute

        async def held(*args: Any, **kwargs: Any) -> executor.ExecutionSummary:
            if kwargs.get("template_locks"):
                self.plan = args[1]
                self.planned.set()
                await self._go.wait()
            return await real(*args, **kwargs)

        monkeypatch.setattr(executor, "execute", held)

    def release(self) -> None:
        self._go.set()


@asynccontextmanager
async def daemon_of(database_url: str) -> AsyncIterator[Daemon]:
    """A daemon whose passes run only when the test asks (no change events, a long interval)."""
    settings = settings_for(
        database_url, http_address="127.0.0.1:0", reconciliation_interval="1h", events_enabled="false"
    )
    daemon = Daemon(settings, registry=CollectorRegistry(), notifier=SystemdNotifier({}))
    await daemon.start()
    try:
        await eventually(lambda: _true(daemon.last_pass is not None), "the start-up pass")
        yield daemon
    finally:
        await daemon.stop()


async def _true(value: bool) -> bool:
    return value


async def interleaved(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, meanwhile: Callable[[], Awaitable[None]]
) -> reconcile.PassResult:
    """A full pass of the daemon, held after its snapshot while `meanwhile` runs (a targeted pass of the
    same daemon among it), then let go."""
    held = HeldFullPass(monkeypatch)
    full = asyncio.create_task(daemon.run_pass_now())
    try:
        await asyncio.wait_for(held.planned.wait(), timeout=10)
        # Before the change, the targeted pass waited for the full one to end: this timed out.
        await asyncio.wait_for(meanwhile(), timeout=10)
    finally:
        held.release()
    return await asyncio.wait_for(full, timeout=10)


async def test_a_full_pass_held_after_its_snapshot_leaves_a_fresher_targeted_pass_be(
    factory: Factory, database_url: str, connection: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The full pass planned to delete an extraneous prebuild; a claim of the other one and the targeted
    pass it started came in between. Written from its older snapshot, the delete would have left the pool
    empty: the full pass defers that template to its next pass instead."""
    async with daemon_of(database_url) as daemon:
        preset = await factory.preset(desired=1)
        older, newer = await factory.prebuild(preset, ago=minutes(10)), await factory.prebuild(preset)
        daemon_passes = 0

        async def claim_and_react() -> None:
            nonlocal daemon_passes
            await factory.claim(newer)
            targeted = await daemon.run_targeted_pass_now(frozenset({preset.template.id}))
            assert targeted.outcome is PassOutcome.SUCCESS, targeted.error
            assert targeted.plan is not None
            # One prebuild left, one wanted: nothing to do.
            assert plan_of(targeted.plan, preset).actions == ()
            daemon_passes += 1

        result = await interleaved(daemon, monkeypatch, claim_and_react)
        assert daemon_passes == 1
        assert result.outcome is PassOutcome.SUCCESS, result.error
        assert result.plan is not None
        assert plan_of(result.plan, preset).actions == (DeleteAction((older.id,), DeleteReason.EXTRANEOUS),)
        assert result.execution is not None
        assert (result.execution.deleted, result.execution.presets_deferred) == (0, 1)
        assert await live_prebuilds(connection, preset) == {older.id}


async def test_both_passes_plan_the_same_create_and_one_prebuild_is_made(
    factory: Factory, database_url: str, connection: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with daemon_of(database_url) as daemon:
        preset = await factory.preset(desired=1)

        async def react() -> None:
            targeted = await daemon.run_targeted_pass_now(frozenset({preset.template.id}))
            assert targeted.outcome is PassOutcome.SUCCESS, targeted.error
            assert targeted.execution is not None
            assert targeted.execution.created == 1

        result = await interleaved(daemon, monkeypatch, react)
        assert result.plan is not None
        assert plan_of(result.plan, preset).actions == (CreateAction(count=1),)
        assert result.execution is not None
        assert (result.execution.created, result.execution.presets_deferred) == (0, 1)
        assert len(await live_prebuilds(connection, preset)) == 1


async def test_a_stale_full_plan_written_after_a_targeted_pass_stays_safe(
    factory: Factory, pool: asyncpg.Pool, database_url: str, connection: asyncpg.Connection
) -> None:
    """Another replica's full pass cannot know what this one's targeted pass did since its snapshot: its
    writes stay safe by their own re-checks at write time. No second create (the clamp counts what is
    there now), no second episode or notification (a status moves only from the one read), and no delete
    of a prebuild claimed meanwhile."""
    settings = settings_for(database_url, failure_hard_limit="1")
    await factory.user(site_roles=["template-admin"])
    wanting = await factory.preset(desired=1)
    failing = await factory.preset(desired=1)
    await factory.prebuild(failing, status="failed", ago=minutes(30))
    extra = await factory.preset(desired=1)
    older, newer = await factory.prebuild(extra, ago=minutes(10)), await factory.prebuild(extra)
    presets = (wanting, failing, extra)
    full_plan = await read_plan(connection, settings, factory.now)
    assert plan_of(full_plan, wanting).actions == (CreateAction(count=1),)
    assert [change.preset.id for change in full_plan.status_changes] == [failing.id]
    assert plan_of(full_plan, extra).actions == (DeleteAction((older.id,), DeleteReason.EXTRANEOUS),)

    # The older prebuild is claimed, and a targeted pass acts on all three templates.
    await factory.claim(older)
    targeted = await run_pass(pool, settings, factory.now, template_ids=[p.template.id for p in presets])
    assert targeted.outcome is PassOutcome.SUCCESS, targeted.error
    assert targeted.status_changes.hard_limited == (failing.id,)
    assert len(await live_prebuilds(connection, wanting)) == 1

    # Then the full plan is written, as the full pass writes it.
    summary = await executor.execute(pool, full_plan, factory.now, template_locks=True)
    assert (summary.created, summary.creates_clamped) == (0, 1)
    assert (summary.deleted, summary.deletes_skipped) == (0, 1)
    assert summary.status_changes.hard_limited == ()
    assert summary.status_changes.notifications_enqueued == 0
    assert len(await live_prebuilds(connection, wanting)) == 1
    assert await live_prebuilds(connection, extra) == {newer.id}
    row = await preset_row(connection, failing)
    assert (row["prebuild_status"], row["failure_episode"]) == ("hard_limited", 1)
    assert await messages_of(connection, failing) == ["hard_limited"]


async def test_a_targeted_pass_never_moves_the_breaker(factory: Factory, pool: asyncpg.Pool, database_url: str) -> None:
    """The breaker moves in full passes only: a targeted pass whose plan would move it (here: open past its
    duration, so half-open with probes) writes neither the move nor the probes' creates; the next full
    pass does both."""
    settings = settings_for(
        database_url,
        breaker_enabled="true",
        breaker_min_builds="6",
        breaker_min_presets="3",
        breaker_probes="2",
        breaker_open_duration="5m",
    )
    failing = [await factory.preset(desired=1) for _ in range(4)]
    for preset in failing:
        for ago in (3, 2, 1):
            await factory.prebuild(preset, status="failed", ago=minutes(ago))
    opened = await run_pass(pool, settings, factory.now)
    assert opened.outcome is PassOutcome.SUCCESS, opened.error
    assert await pool.fetchval("select state from prebuild_breaker") == "open"

    later = factory.now + minutes(5) + minutes(0.1)
    targeted = await run_pass(pool, settings, later, template_ids=[preset.template.id for preset in failing])
    assert targeted.outcome is PassOutcome.SUCCESS, targeted.error
    assert targeted.plan is not None
    assert targeted.plan.breaker is not None
    assert targeted.plan.breaker.event is not None
    assert targeted.execution is not None
    assert (targeted.execution.breaker_event, targeted.execution.created) == (None, 0)
    assert await pool.fetchval("select state from prebuild_breaker") == "open"

    full = await run_pass(pool, settings, later)
    assert full.outcome is PassOutcome.SUCCESS, full.error
    assert full.execution is not None
    assert full.execution.created == 2
    assert await pool.fetchval("select state from prebuild_breaker") == "half_open"


async def test_a_full_plan_made_on_a_thread_is_the_plan_made_inline(
    factory: Factory, database_url: str, connection: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large fleet's full pass plans on a thread (so that a targeted pass runs meanwhile): the same plan."""
    settings = settings_for(database_url)
    for desired in (0, 1, 2):
        preset = await factory.preset(desired=desired)
        await factory.prebuilds(preset, 1)
    monkeypatch.setattr(reconcile, "PLAN_ON_A_THREAD_FROM", 10**9)
    inline = await reconcile.read_plan(connection, settings, factory.now)
    monkeypatch.setattr(reconcile, "PLAN_ON_A_THREAD_FROM", 1)
    threaded = await reconcile.read_plan(connection, settings, factory.now)
    assert threaded == inline
    assert sum(bool(preset_plan.actions) for preset_plan in threaded.presets) == 2


async def test_an_extraneous_delete_planned_before_a_claim_is_dropped(
    factory: Factory, pool: asyncpg.Pool, database_url: str, connection: asyncpg.Connection
) -> None:
    """Another replica's full plan, older than a claim: one prebuild too many when it read, none after the
    claim. The delete re-counts the prebuilds its plan counted, and keeps the pool at its target."""
    settings = settings_for(database_url)
    preset = await factory.preset(desired=1)
    older, newer = await factory.prebuild(preset, ago=minutes(10)), await factory.prebuild(preset)
    stale = await read_plan(connection, settings, factory.now)
    assert plan_of(stale, preset).actions == (DeleteAction((older.id,), DeleteReason.EXTRANEOUS),)
    await factory.claim(newer)
    summary = await executor.execute(pool, stale, factory.now, template_locks=True)
    assert (summary.deleted, summary.deletes_skipped) == (0, 1)
    assert await live_prebuilds(connection, preset) == {older.id}
    # Unclaimed, the same plan deletes as before.
    again = await factory.preset(desired=1)
    first, _second = await factory.prebuild(again, ago=minutes(10)), await factory.prebuild(again)
    fresh = await read_plan(connection, settings, factory.now)
    assert plan_of(fresh, again).actions == (DeleteAction((first.id,), DeleteReason.EXTRANEOUS),)
    assert (await executor.execute(pool, fresh, factory.now, template_locks=True)).deleted == 1
