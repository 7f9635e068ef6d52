"""Issue 14 ("seeing it"): claims and misses per preset as counters, on a real database.

Events are written as the platform's claim path writes them (`prebuild_events`); the counters are
refreshed as the daemon refreshes them (the lifetime counters' refresh, then `store.claim_events.refresh`
into `ClaimEventCounters`, published under the presets' labels), and qualify through a plan read as a
pass reads it.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
from prometheus_client import CollectorRegistry

from reconciler.claim_event_counters import ClaimEventCounters
from reconciler.counters import OVERLAP, PrebuildCounters
from reconciler.metrics import Metrics
from reconciler.sdnotify import SystemdNotifier
from reconciler.service import Daemon
from reconciler.store import claim_events, totals, writes
from tests.factories import Factory, Preset, minutes
from tests.integration.reconcile_support import read_plan, settings_for

SERIES = "prebuilds_reconciler_preset_claim_events_total"


class Exported:
    def __init__(self, connection: asyncpg.Connection, database_url: str) -> None:
        self.connection = connection
        self.settings = settings_for(database_url)
        self.counters = PrebuildCounters()
        self.claim_events = ClaimEventCounters()
        self.metrics = Metrics(CollectorRegistry(), process_metrics=False)

    async def refresh(self, factory: Factory) -> bool:
        plan = await read_plan(self.connection, self.settings, factory.now)
        self.metrics.observe_pass("success", 0.0, plan, paused=False)
        await totals.refresh(self.connection, self.counters)
        full = await claim_events.refresh(self.connection, self.claim_events)
        self.claim_events.publish(self.counters.labels)
        self.metrics.presets.update_claim_events(self.claim_events.by_labels())
        return full

    def values(self, preset: Preset) -> tuple[float | None, float | None]:
        return values(self.metrics, preset)


def values(metrics: Metrics, preset: Preset) -> tuple[float | None, float | None]:
    labels = {
        "template_name": preset.template.name,
        "preset_name": preset.name,
        "organization_name": preset.organization.name,
    }
    return (
        metrics.registry.get_sample_value(SERIES, labels | {"event_type": "claim_succeeded"}),
        metrics.registry.get_sample_value(SERIES, labels | {"event_type": "claim_missed"}),
    )


async def events(factory: Factory, preset: Preset, event_type: str, count: int, *, ago: timedelta) -> None:
    for _ in range(count):
        await factory.event(preset, event_type, at=factory.now - ago)


async def test_the_counters_follow_the_events_and_count_none_twice_in_the_overlap(
    factory: Factory, connection: asyncpg.Connection, database_url: str
) -> None:
    preset = await factory.preset(desired=0)
    other = await factory.preset(desired=0)
    await events(factory, preset, "claim_succeeded", 3, ago=timedelta(days=2))
    await events(factory, preset, "claim_missed", 2, ago=minutes(1))  # within the overlap window
    await events(factory, preset, "claim_cancelled", 4, ago=minutes(1))  # a type the counters do not know
    await events(factory, other, "claim_missed", 1, ago=minutes(1))
    exported = Exported(connection, database_url)
    assert await exported.refresh(factory) is True
    assert exported.values(preset) == (3, 2)
    assert exported.values(other) == (0, 1)

    # New events, some of an unknown type; the older ones are still in the overlap window and read again.
    await events(factory, preset, "claim_succeeded", 2, ago=timedelta(0))
    await events(factory, preset, "claim_missed", 1, ago=timedelta(0))
    await events(factory, preset, "prebuild_expired", 2, ago=timedelta(0))
    assert await exported.refresh(factory) is False
    assert exported.values(preset) == (5, 3)
    assert exported.values(other) == (0, 1)
    # Nothing new: the same window again counts nothing twice.
    assert await exported.refresh(factory) is False
    assert exported.values(preset) == (5, 3)
    # The events of known types created within the window are remembered (by id), no more.
    assert exported.claim_events.remembered_events == 2 + 1 + 2 + 1
    # An event created just inside the window (a late commit) is still counted.
    await factory.event(preset, "claim_succeeded", at=factory.now - OVERLAP + minutes(2))
    await exported.refresh(factory)
    assert exported.values(preset) == (6, 3)


async def test_a_purge_does_not_lower_the_counters(
    factory: Factory, connection: asyncpg.Connection, database_url: str
) -> None:
    preset = await factory.preset(desired=0)
    await events(factory, preset, "claim_succeeded", 4, ago=timedelta(days=9))
    await events(factory, preset, "claim_missed", 2, ago=timedelta(days=9))
    await events(factory, preset, "claim_succeeded", 1, ago=minutes(3))
    exported = Exported(connection, database_url)
    await exported.refresh(factory)
    assert exported.values(preset) == (5, 2)

    assert await writes.purge_prebuild_events(connection, factory.now - timedelta(days=8)) == 6
    await exported.refresh(factory)
    assert exported.values(preset) == (5, 2)
    # New events still add: to what was counted, not to what is left in the table.
    await events(factory, preset, "claim_missed", 1, ago=timedelta(0))
    await exported.refresh(factory)
    assert exported.values(preset) == (5, 3)


async def test_two_versions_of_a_preset_add_to_the_same_series(
    factory: Factory, connection: asyncpg.Connection, database_url: str
) -> None:
    old = await factory.preset(desired=0, name="small")
    await events(factory, old, "claim_succeeded", 2, ago=timedelta(hours=1))
    await events(factory, old, "claim_missed", 1, ago=timedelta(hours=1))
    exported = Exported(connection, database_url)
    await exported.refresh(factory)
    assert exported.values(old) == (2, 1)

    version = await factory.version(old.template)
    new = await factory.preset(version, name="small", desired=0)
    await events(factory, new, "claim_succeeded", 3, ago=timedelta(0))
    await events(factory, new, "claim_missed", 4, ago=timedelta(0))
    await exported.refresh(factory)
    assert exported.values(new) == (5, 5)


async def test_the_daemon_serves_the_claim_counters(factory: Factory, database_url: str) -> None:
    """The daemon's own refresh (start-up's count, then an incremental one) feeds /metrics' counters."""
    preset = await factory.preset(desired=0)
    await events(factory, preset, "claim_succeeded", 2, ago=timedelta(hours=2))
    settings = settings_for(database_url, HTTP_ADDRESS="127.0.0.1:0", RECONCILIATION_INTERVAL="1h", LOG_LEVEL="warning")
    daemon = Daemon(settings, registry=CollectorRegistry(), notifier=SystemdNotifier({}))
    start_up_pass = asyncio.Event()
    daemon.pass_listeners.append(lambda _result: start_up_pass.set())
    await daemon.start()
    try:
        await asyncio.wait_for(start_up_pass.wait(), timeout=60)
        await daemon.refresh_totals()  # the loop's first refresh may or may not have run: this one is after it
        await events(factory, preset, "claim_missed", 3, ago=timedelta(0))
        await daemon.refresh_totals()
        assert values(daemon.metrics, preset) == (2, 3)
    finally:
        await daemon.stop()
