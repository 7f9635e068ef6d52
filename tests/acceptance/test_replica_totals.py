"""Two replicas, scraped as Prometheus scrapes them: the dashboard's query of the lifetime totals gives the
database's count, where a sum over replicas gave twice it (issue 11.7: 7.3 creates shown, 4 in the
database). Also what really happens with replicas: each one reconciles on its own ticks."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import defaultdict
from pathlib import Path

from tests.acceptance.daemon_process import DaemonProcess
from tests.factories import Factory

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "reconciler.json"
CREATED = "coderd_prebuilt_workspaces_created_total"
# One refresh of the totals per minute (service.TOTALS_REFRESH_SECONDS), and a margin.
TOTALS_WAIT_SECONDS = 90


def dashboard_aggregation(metric: str) -> str:
    """The aggregation operator the dashboard applies across replicas to `increase(metric[...])`."""
    document = json.loads(DASHBOARD.read_text())
    for panel in document["panels"]:
        for target in panel.get("targets", []):
            found = re.match(r"\s*(\w+) by \(template_name, preset_name\) \(increase\(" + metric, target["expr"])
            if found:
                return found.group(1)
    raise AssertionError(f"no panel of the dashboard shows increase({metric})")


def increase(samples: list[float]) -> float:
    """Prometheus's increase() over a window holding all of `samples` (a counter: no reset here)."""
    return samples[-1] - samples[0]


async def test_two_replicas_totals_aggregated_as_the_dashboard_does_equal_the_database(
    factory: Factory, database_url: str
) -> None:
    # One prebuild of the preset exists before the replicas start, so that both export its series (1) from
    # their first refresh, before the creates this test counts.
    preset = await factory.preset(desired=1)
    await factory.prebuild(preset)
    labels = {"template_name": preset.template.name, "preset_name": preset.name}
    replicas = [DaemonProcess(database_url, interval="1s").start() for _ in range(2)]
    try:
        for replica in replicas:
            replica.wait_ready()
        samples: dict[int, list[float]] = defaultdict(list)

        def scrape() -> None:
            for index, replica in enumerate(replicas):
                value = replica.metric(CREATED, labels)
                if value is not None:
                    samples[index].append(value)

        deadline = time.monotonic() + 30
        while len(samples) < 2 and time.monotonic() < deadline:
            scrape()
            await asyncio.sleep(0.5)
        assert [samples[index][0] for index in range(2)] == [1, 1], "both replicas export the series at 1"

        await factory.connection.execute(
            "update template_version_presets set desired_instances = 5 where id = $1", preset.id
        )
        created = 0
        deadline = time.monotonic() + TOTALS_WAIT_SECONDS
        while time.monotonic() < deadline:
            scrape()
            created = await factory.connection.fetchval(
                "select count(*) from workspace_builds where build_number = 1 and template_version_preset_id = $1",
                preset.id,
            )
            if created == 5 and all(samples[index][-1] == created for index in range(2)):
                break
            await asyncio.sleep(0.5)
        assert created == 5
        per_replica = [increase(samples[index]) for index in range(2)]
        assert per_replica == [4, 4], "every replica exports the database's totals"

        # The 4 creates of the window, as the database counts them and as the dashboard shows them.
        aggregations = {"max": max(per_replica), "sum": sum(per_replica)}
        assert aggregations[dashboard_aggregation(CREATED)] == created - 1
        assert aggregations["sum"] == 2 * (created - 1)  # what the dashboard used to show

        # No leader: both replicas ran passes that reconciled, on their own ticks.
        for replica in replicas:
            assert (replica.metric("prebuilds_reconciler_passes_total", {"outcome": "success"}) or 0) > 0
    finally:
        for replica in replicas:
            replica.stop()
