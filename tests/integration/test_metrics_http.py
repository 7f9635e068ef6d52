"""/metrics over HTTP: gzip when asked, and the per-preset text rendered once per pass, never per scrape."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from reconciler.http import HealthState, Readiness, bound_port, build_application, start_http
from reconciler.metrics import Metrics, PresetCollector
from reconciler.plan import Plan, PresetPlan, PresetState
from reconciler.snapshot import PrebuildTotals
from tests.unit.test_metrics import make_plan, make_preset


def fleet_plan(presets: int) -> Plan:
    return make_plan(
        *(
            PresetPlan(make_preset(f"preset-{index}"), PresetState(desired=index % 5, actual=index % 3), (), False)
            for index in range(presets)
        )
    )


@asynccontextmanager
async def served(metrics: Metrics) -> AsyncIterator[str]:
    health = HealthState(readiness=Readiness(ready=True, reason=""), heartbeat=time.time)
    runner: web.AppRunner = await start_http(build_application(metrics, health), "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{bound_port(runner)}/metrics"
    finally:
        await runner.cleanup()


async def fetch(url: str, accept_encoding: str | None) -> tuple[str | None, bytes]:
    """The raw body (not decompressed) and its Content-Encoding."""
    headers = {"Accept-Encoding": accept_encoding} if accept_encoding is not None else {}
    async with (
        aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=["Accept-Encoding"]) as session,
        session.get(url, headers=headers) as response,
    ):
        assert response.status == 200
        return response.headers.get("Content-Encoding"), await response.read()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_gzip_is_served_when_asked_and_decodes_to_the_plain_text() -> None:
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    plan = fleet_plan(2_000)
    metrics.observe_pass("success", 0.5, plan, paused=False)
    preset = plan.presets[7].preset
    metrics.presets.update_totals(
        {(preset.template_name, preset.name, preset.organization_name): PrebuildTotals(created=3, failed=1, claimed=2)}
    )
    async with served(metrics) as url:
        plain_encoding, plain = await fetch(url, None)
        gzip_encoding, compressed = await fetch(url, "deflate, gzip;q=0.8")
        refused_encoding, _ = await fetch(url, "gzip;q=0, identity")
    assert plain_encoding is None
    assert refused_encoding is None
    assert gzip_encoding == "gzip"
    decoded = gzip.decompress(compressed)
    assert len(compressed) * 5 < len(decoded)
    # The registry's own part (pass counters, heartbeat) is the same between the two scrapes: nothing ran.
    assert decoded == plain
    parsed = samples(decoded.decode())
    labels = (("organization_name", "acme"), ("preset_name", preset.name), ("template_name", "go"))
    assert parsed[("coderd_prebuilt_workspaces_desired", labels)] == 7 % 5
    assert parsed[("coderd_prebuilt_workspaces_claimed_total", labels)] == 2
    assert parsed[("prebuilds_reconciler_passes_total", (("outcome", "success"),))] == 1


async def test_a_scrape_never_renders_the_per_preset_series(monkeypatch: pytest.MonkeyPatch) -> None:
    renders = 0
    render_lines = PresetCollector._render_lines

    def counting(collector: PresetCollector, *arguments):  # type: ignore[no-untyped-def]
        nonlocal renders
        renders += 1
        return render_lines(collector, *arguments)

    monkeypatch.setattr(PresetCollector, "_render_lines", counting)
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    async with served(metrics) as url:
        metrics.observe_pass("success", 0.5, fleet_plan(500), paused=False)
        # Rendered with the pass's results, before any scrape asks.
        assert renders == 1
        bodies = [await fetch(url, encoding) for encoding in (None, "gzip", None, "gzip")]
        assert renders == 1
        assert b"preset-499" in bodies[0][1]
        assert b"preset-499" in gzip.decompress(bodies[1][1])
        metrics.observe_pass("success", 0.5, fleet_plan(10), paused=False)
        assert renders == 2
        _, after = await fetch(url, None)
        assert renders == 2
        assert b"preset-499" not in after
        # As the daemon does: rendered on a thread first, then published without rendering again.
        plan = fleet_plan(20)
        prepared = await asyncio.to_thread(metrics.presets.prepare, plan)
        assert renders == 3
        _, before_publishing = await fetch(url, None)
        assert b"preset-19" not in before_publishing
        metrics.observe_pass("success", 0.5, plan, paused=False, prepared=prepared)
        _, published = await fetch(url, "gzip")
        assert renders == 3
        assert b"preset-19" in gzip.decompress(published)


async def test_totals_changed_while_a_pass_was_prepared_are_not_lost() -> None:
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    plan = fleet_plan(3)
    preset = plan.presets[1].preset
    prepared = metrics.presets.prepare(plan)
    metrics.presets.update_totals(
        {(preset.template_name, preset.name, preset.organization_name): PrebuildTotals(created=5, failed=0, claimed=1)}
    )
    metrics.observe_pass("success", 0.5, plan, paused=False, prepared=prepared)
    assert b'coderd_prebuilt_workspaces_created_total{organization_name="acme",preset_name="preset-1"' in (
        metrics.render()
    )
