"""Issue 11.4 on a real database: the created/failed/claimed counters count by organization, template
and preset name across template versions, follow the database incrementally, and never go down.

The counters are refreshed as the daemon refreshes them (`store.totals.refresh` into `PrebuildCounters`,
then the metrics); the per-preset series qualify through a plan read as a pass reads it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from uuid import UUID

import asyncpg
from prometheus_client import CollectorRegistry

from reconciler.counters import OVERLAP, PrebuildCounters
from reconciler.metrics import Metrics
from reconciler.sdnotify import SystemdNotifier
from reconciler.service import Daemon
from reconciler.snapshot import PrebuildTotals
from reconciler.store import totals
from tests.factories import Factory, Preset, Version, Workspace, minutes
from tests.integration.reconcile_support import read_plan, settings_for

COUNTERS = (
    "coderd_prebuilt_workspaces_created_total",
    "coderd_prebuilt_workspaces_failed_total",
    "coderd_prebuilt_workspaces_claimed_total",
)


class Exported:
    """The daemon's side: counters kept across refreshes, and the metrics they feed."""

    def __init__(self, connection: asyncpg.Connection, database_url: str) -> None:
        self.connection = connection
        self.settings = settings_for(database_url)
        self.counters = PrebuildCounters()
        self.metrics = Metrics(CollectorRegistry(), process_metrics=False)

    async def refresh(self, factory: Factory) -> bool:
        # A plan, as a pass reads it, decides which series qualify (presets on active versions).
        plan = await read_plan(self.connection, self.settings, factory.now)
        self.metrics.observe_pass("success", 0.0, plan, paused=False)
        full = await totals.refresh(self.connection, self.counters)
        self.metrics.presets.update_totals(self.counters.by_labels())
        return full

    def values(self, preset: Preset, name: str | None = None) -> tuple[float | None, ...]:
        labels = {
            "template_name": preset.template.name,
            "preset_name": name or preset.name,
            "organization_name": preset.organization.name,
        }
        return tuple(self.metrics.registry.get_sample_value(counter, labels) for counter in COUNTERS)


async def history(factory: Factory, preset: Preset, *, succeeded: int, failed: int, claimed: int) -> list[Workspace]:
    """`succeeded + failed + claimed` prebuilds of `preset`; the claimed ones succeeded, then were claimed."""
    workspaces = await factory.prebuilds(preset, succeeded + claimed, ago=minutes(3))
    for workspace in workspaces[succeeded:]:
        await factory.claim(workspace)
    await factory.prebuilds(preset, failed, status="failed", ago=minutes(2))
    return workspaces[:succeeded]


async def truth(connection: asyncpg.Connection) -> dict[UUID, PrebuildTotals]:
    return await totals.read_totals_by_preset(connection)


async def new_version_with(factory: Factory, old: Preset, names: Sequence[str]) -> tuple[Version, list[Preset]]:
    version = await factory.version(old.template)
    return version, [await factory.preset(version, name=name, desired=0) for name in names]


async def test_a_new_versions_counts_add_to_the_old_versions_series(
    factory: Factory, connection: asyncpg.Connection, database_url: str
) -> None:
    old = await factory.preset(desired=0, name="small")
    await history(factory, old, succeeded=12, failed=5, claimed=3)
    exported = Exported(connection, database_url)
    assert await exported.refresh(factory) is True
    assert exported.values(old) == (20, 5, 3)

    # Publish a new version with a preset of the same name; it builds, fails and is claimed a lot.
    _, (new,) = await new_version_with(factory, old, ["small"])
    await history(factory, new, succeeded=0, failed=8, claimed=15)
    assert await exported.refresh(factory) is False
    # Before the change: max(old, new) per preset id, so (20, 8, 15) or, by label set, still (20, 5, 3).
    assert exported.values(new) == (43, 13, 18)


async def test_the_incremental_counts_follow_the_database_as_a_full_read_does(
    factory: Factory, connection: asyncpg.Connection, database_url: str
) -> None:
    preset = await factory.preset(desired=0)
    live = await history(factory, preset, succeeded=4, failed=1, claimed=1)
    pending = await factory.prebuild(preset, status="pending")
    exported = Exported(connection, database_url)
    await exported.refresh(factory)
    assert exported.values(preset) == (7, 1, 1)

    # A late claim of a prebuild built long ago, a pending build that fails, a new one, and a deletion.
    await factory.claim(live[0])
    await connection.execute(
        "update provisioner_jobs set started_at = now(), completed_at = now(), error = 'boom' where id = $1",
        pending.builds[0].job_id,
    )
    await factory.prebuild(preset)
    await connection.execute("update workspaces set deleted = true where id = $1", live[1].id)
    assert await exported.refresh(factory) is False
    assert exported.values(preset) == (8, 2, 2)
    assert exported.counters.preset_counts() == await truth(connection)

    # Nothing changed: a refresh counts nothing twice (the builds of the overlap window are remembered).
    await exported.refresh(factory)
    assert exported.values(preset) == (8, 2, 2)
    assert exported.counters.preset_counts() == await truth(connection)


async def test_a_build_completed_before_the_window_is_counted_by_the_next_full_read(
    factory: Factory, connection: asyncpg.Connection, database_url: str
) -> None:
    """The window's limit: a first build that becomes visible already settled, with a completion time
    older than the overlap, is counted by the hourly full read, which only adds."""
    preset = await factory.preset(desired=0)
    await history(factory, preset, succeeded=2, failed=0, claimed=0)
    exported = Exported(connection, database_url)
    await exported.refresh(factory)
    # Seen for the first time already settled (completed before the window, and deleted): a live one
    # would be found among the live prebuilds whatever its times.
    late = await factory.prebuild(preset, status="failed", ago=OVERLAP + minutes(5))
    await connection.execute("update workspaces set deleted = true where id = $1", late.id)
    await exported.refresh(factory)
    assert exported.values(preset) == (2, 0, 0)

    exported.counters.reset(await totals.read_full(connection))
    exported.metrics.presets.update_totals(exported.counters.by_labels())
    assert exported.values(preset) == (3, 1, 0)


async def test_a_renamed_or_removed_preset_lowers_no_counter(
    factory: Factory, connection: asyncpg.Connection, database_url: str
) -> None:
    old = await factory.preset(desired=0, name="small")
    await history(factory, old, succeeded=2, failed=1, claimed=1)
    _, (new, other) = await new_version_with(factory, old, ["small", "other"])
    await history(factory, new, succeeded=1, failed=1, claimed=1)
    await history(factory, other, succeeded=1, failed=0, claimed=0)
    exported = Exported(connection, database_url)
    await exported.refresh(factory)
    assert exported.values(new) == (7, 2, 2)
    before = exported.counters.by_labels()

    # The new version's "small" becomes "large": "small" is no longer on the active version, so its
    # series ends (and keeps its value); "large" carries the renamed preset's history.
    await connection.execute("update template_version_presets set name = 'large' where id = $1", new.id)
    await exported.refresh(factory)
    assert exported.values(new, "small") == (None, None, None)
    assert exported.values(new, "large") == (3, 1, 1)
    # The old version's preset is removed: its builds keep no preset (on delete set null).
    await connection.execute("delete from template_version_presets where id = $1", old.id)
    await factory.prebuild(other)
    await exported.refresh(factory)
    # A full read (start-up's, or the hourly one) of a history that lost rows lowers nothing either.
    exported.counters.reset(await totals.read_full(connection))
    exported.metrics.presets.update_totals(exported.counters.by_labels())
    after = exported.counters.by_labels()
    for labels, counts in before.items():
        assert after[labels].created >= counts.created, labels
        assert after[labels].failed >= counts.failed, labels
        assert after[labels].claimed >= counts.claimed, labels
    assert (
        after[(old.template.name, "small", old.organization.name)]
        == before[(old.template.name, "small", old.organization.name)]
    )
    assert exported.values(other) == (2, 0, 0)
    assert exported.values(new, "large") == (3, 1, 1)


async def test_the_daemon_serves_the_counters_of_the_whole_history_then_of_what_changed(
    factory: Factory, database_url: str
) -> None:
    """The daemon's own refresh (start-up's full read, then an incremental one) feeds /metrics' counters."""
    old = await factory.preset(desired=0, name="small")
    await history(factory, old, succeeded=2, failed=1, claimed=1)
    settings = settings_for(database_url, HTTP_ADDRESS="127.0.0.1:0", RECONCILIATION_INTERVAL="1h", LOG_LEVEL="warning")
    daemon = Daemon(settings, registry=CollectorRegistry(), notifier=SystemdNotifier({}))
    start_up_pass = asyncio.Event()
    daemon.pass_listeners.append(lambda _result: start_up_pass.set())
    await daemon.start()
    try:
        await asyncio.wait_for(start_up_pass.wait(), timeout=60)
        await daemon.refresh_totals()  # the loop's first refresh may or may not have run: this one is after it
        _, (new,) = await new_version_with(factory, old, ["small"])
        await history(factory, new, succeeded=0, failed=2, claimed=1)
        assert await daemon.run_pass_now() is not None
        assert await daemon.refresh_totals() is False
        labels = {
            "template_name": new.template.name,
            "preset_name": "small",
            "organization_name": new.organization.name,
        }
        value = daemon.metrics.registry.get_sample_value
        assert tuple(value(counter, labels) for counter in COUNTERS) == (7, 3, 2)
    finally:
        await daemon.stop()
