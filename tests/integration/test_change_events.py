"""The daemon reacts to change events (BEHAVIOR.md, "Change events"): a real daemon in this process, a
real database whose triggers notify it, and the platform's writes made by the test.

The periodic pass is set to a minute in the reaction tests, so that whatever happens within seconds is
the events' doing.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from reconciler.config import Settings
from reconciler.sdnotify import SystemdNotifier
from reconciler.service import Daemon
from reconciler.snapshot import PREBUILDS_SYSTEM_USER_ID
from tests.factories import Factory, Preset
from tests.integration.notification_helpers import eventually
from tests.integration.reconcile_support import settings_for


def daemon_settings(database_url: str, **overrides: str) -> Settings:
    values = {"http_address": "127.0.0.1:0", "reconciliation_interval": "60s", **overrides}
    return settings_for(database_url, **values)


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Daemon]:
    daemon = Daemon(settings, registry=CollectorRegistry(), notifier=SystemdNotifier({}))
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


async def settled(daemon: Daemon) -> None:
    """The start-up pass is done and the daemon listens."""
    await eventually(lambda: _true(daemon.last_pass is not None), "the start-up pass")
    assert daemon.event_listener is not None
    await asyncio.wait_for(daemon.event_listener.listening.wait(), timeout=10)


async def _true(value: bool) -> bool:
    return value


def sample(daemon: Daemon, name: str, labels: dict[str, str] | None = None) -> float:
    return daemon.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def full_passes(daemon: Daemon) -> float:
    return sample(daemon, "prebuilds_reconciler_passes_total", {"outcome": "success"})


async def live_prebuilds(connection: asyncpg.Connection, preset: Preset) -> set[uuid.UUID]:
    rows = await connection.fetch(
        "select id from workspaces where owner_id = $1 and not deleted and template_id = $2",
        PREBUILDS_SYSTEM_USER_ID,
        preset.template.id,
    )
    return {row["id"] for row in rows}


def passes(events: list[MutableMapping[str, Any]], scope: str) -> list[MutableMapping[str, Any]]:
    return [event for event in events if event["event"] == "reconcile.pass" and event.get("scope") == scope]


async def test_a_claim_is_replaced_within_seconds_not_at_the_next_interval(
    factory: Factory, connection: asyncpg.Connection, database_url: str
) -> None:
    preset = await factory.preset(desired=1)
    prebuild = await factory.prebuild(preset)
    async with running(daemon_settings(database_url)) as daemon:
        await settled(daemon)
        assert await live_prebuilds(connection, preset) == {prebuild.id}
        started = asyncio.get_running_loop().time()
        await factory.claim(prebuild)

        async def replaced() -> bool:
            return len(await live_prebuilds(connection, preset) - {prebuild.id}) == 1

        await eventually(replaced, "the claimed prebuild's replacement", seconds=5)
        reaction = asyncio.get_running_loop().time() - started
        # The pass counts itself once its writes are done: a moment after the replacement is visible.
        await eventually(lambda: _true(daemon.last_targeted_pass is not None), "the targeted pass to finish")
        # One full pass (at start-up): the replacement came from a targeted pass, long before the next.
        assert full_passes(daemon) == 1
        assert sample(daemon, "prebuilds_reconciler_targeted_passes_total", {"outcome": "success"}) >= 1
        assert sample(daemon, "prebuilds_reconciler_events_received_total", {"kind": "claim"}) == 1
        assert sample(daemon, "prebuilds_reconciler_event_reaction_seconds_count") >= 1
        assert reaction < 5


async def test_changes_arriving_together_make_one_targeted_pass(
    factory: Factory, connection: asyncpg.Connection, database_url: str
) -> None:
    presets = [await factory.preset(desired=1) for _ in range(3)]
    prebuilds = [await factory.prebuild(preset) for preset in presets]
    async with running(daemon_settings(database_url, event_coalesce="1s")) as daemon:
        await settled(daemon)
        with capture_logs() as events:
            # Three statements, three notifications, delivered together at the commit (separate
            # transactions would do as well, but a loaded machine could space them beyond the window).
            async with connection.transaction():
                for prebuild in prebuilds:
                    await factory.claim(prebuild)

            async def all_replaced() -> bool:
                return all([len(await live_prebuilds(connection, preset)) == 1 for preset in presets])

            await eventually(all_replaced, "three replacements", seconds=10)
            await eventually(lambda: _true(daemon.last_targeted_pass is not None), "the targeted pass to finish")
        targeted = passes(events, "targeted")
        assert [(event["templates"], event["created"]) for event in targeted] == [(3, 3)]
        assert sample(daemon, "prebuilds_reconciler_events_received_total", {"kind": "claim"}) == 3


async def test_a_lost_listening_connection_reconnects_and_runs_a_full_pass(
    factory: Factory, connection: asyncpg.Connection, database_url: str
) -> None:
    await factory.preset(desired=0)
    async with running(daemon_settings(database_url)) as daemon:
        await settled(daemon)
        assert daemon.event_listener is not None
        assert full_passes(daemon) == 1
        terminated = await connection.fetchval(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity "
            "where application_name = 'reconciler-events' and datname = current_database()"
        )
        assert terminated == 1
        await eventually(lambda: _true(daemon.event_listener.connections == 2), "a new listening connection")  # type: ignore[union-attr]
        # Notifications may have been lost meanwhile: a full pass catches up, long before the interval.
        await eventually(lambda: _true(full_passes(daemon) == 2), "a full pass after the reconnection", seconds=10)
        assert sample(daemon, "prebuilds_reconciler_events_connection_losses_total") == 1
        assert sample(daemon, "prebuilds_reconciler_events_listening") == 1
        # And it listens again: a claim is acted on.
        preset = await factory.preset(desired=1)
        prebuild = await factory.prebuild(preset)
        await factory.claim(prebuild)

        async def replaced() -> bool:
            return len(await live_prebuilds(connection, preset) - {prebuild.id}) == 1

        await eventually(replaced, "a replacement after the reconnection", seconds=5)
        await eventually(lambda: _true(daemon.last_targeted_pass is not None), "the targeted pass to finish")
        assert full_passes(daemon) == 2


async def test_with_events_off_nothing_listens_and_the_periodic_pass_does_the_work(
    factory: Factory, connection: asyncpg.Connection, database_url: str
) -> None:
    preset = await factory.preset(desired=1)
    prebuild = await factory.prebuild(preset)
    settings = daemon_settings(database_url, events_enabled="false", reconciliation_interval="1s")
    async with running(settings) as daemon:
        await eventually(lambda: _true(daemon.last_pass is not None), "the start-up pass")
        assert daemon.event_listener is None
        listeners = await connection.fetchval(
            "select count(*) from pg_stat_activity where application_name = 'reconciler-events'"
            " and datname = current_database()"
        )
        assert listeners == 0
        await factory.claim(prebuild)

        async def replaced() -> bool:
            return len(await live_prebuilds(connection, preset) - {prebuild.id}) == 1

        await eventually(replaced, "the replacement by a periodic pass", seconds=10)
        await eventually(lambda: _true(full_passes(daemon) >= 2), "the periodic pass to finish")
        assert sample(daemon, "prebuilds_reconciler_events_received_total", {"kind": "claim"}) == 0
        assert (
            sum(
                sample(daemon, "prebuilds_reconciler_targeted_passes_total", {"outcome": outcome})
                for outcome in ("success", "failed", "skipped_lock", "paused")
            )
            == 0
        )
        assert full_passes(daemon) >= 2


async def test_passes_of_two_replicas_never_hold_one_template_at_once(
    factory: Factory, connection: asyncpg.Connection, database_url: str
) -> None:
    """Full passes of two replicas never overlap; targeted passes run beside them (docs/DECISIONS.md,
    "Targeted passes beside full passes") but never two at once for one template; and every claim is
    replaced exactly once."""
    presets = [await factory.preset(desired=2) for _ in range(8)]
    prebuilds = [prebuild for preset in presets for prebuild in await factory.prebuilds(preset, 2)]
    settings = daemon_settings(database_url, reconciliation_interval="1s", event_coalesce="0")
    with capture_logs() as events:
        async with running(settings) as first, running(settings) as second:
            await settled(first)
            await settled(second)
            # Claims at a steady pace while both replicas run their periodic passes every second.
            for prebuild in prebuilds:
                await factory.claim(prebuild)
                await asyncio.sleep(0.15)

            async def all_replaced() -> bool:
                counts = [len(await live_prebuilds(connection, preset)) for preset in presets]
                return counts == [2] * len(presets)

            await eventually(all_replaced, "every claimed prebuild replaced", seconds=15)
            await first.stop()
            await second.stop()
    succeeded = [event for event in events if event["event"] == "reconcile.pass" and event.get("outcome") == "success"]
    assert {event["scope"] for event in succeeded} == {"full", "targeted"}
    full = sorted(
        (event["lock_held_from"], event["lock_held_until"]) for event in succeeded if event["scope"] == "full"
    )
    for (_, until), (start, _) in itertools.pairwise(full):
        assert until <= start, full
    for template_id in {str(preset.template.id) for preset in presets}:
        targeted = sorted(
            (event["lock_held_from"], event["lock_held_until"])
            for event in succeeded
            if event["scope"] == "targeted" and template_id in event["template_ids"]
        )
        for (_, until), (start, _) in itertools.pairwise(targeted):
            assert until <= start, targeted
    # Every claim was replaced once: nobody created twice for one claim.
    counts = [len(await live_prebuilds(connection, preset)) for preset in presets]
    assert counts == [2] * len(presets)


async def test_a_targeted_pass_adds_the_prebuilds_user_to_its_new_organization(
    factory: Factory, connection: asyncpg.Connection, database_url: str
) -> None:
    """A template published in an organization the prebuilds user does not belong to yet: the targeted
    pass that its event starts reads the memberships of its templates' organizations (not every one's)
    and adds what is missing before it creates."""
    async with running(daemon_settings(database_url)) as daemon:
        await settled(daemon)
        preset = await factory.preset(desired=1)

        async def member_with_a_prebuild() -> bool:
            member = await connection.fetchval(
                "select count(*) from organization_members where organization_id = $1 and user_id = $2",
                preset.organization.id,
                PREBUILDS_SYSTEM_USER_ID,
            )
            return member == 1 and len(await live_prebuilds(connection, preset)) == 1

        await eventually(member_with_a_prebuild, "the membership and the first prebuild", seconds=5)
        assert full_passes(daemon) == 1
