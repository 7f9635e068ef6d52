"""The cached per-preset exposition is byte for byte what prometheus_client would write."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from reconciler.metrics import Metrics, PresetCollector, PresetSample
from reconciler.plan import PresetPlan, PresetState
from reconciler.snapshot import PrebuildStatus, PrebuildTotals
from tests.unit.test_metrics import make_plan, make_preset

HOSTILE_NAMES = ["plain", 'quote " and \\ backslash', "new\nline", "ünïcødé ✓", "semi;colon'"]


def hostile_plans() -> list[PresetPlan]:
    plans = []
    for index, name in enumerate(HOSTILE_NAMES):
        status = [PrebuildStatus.NORMAL, PrebuildStatus.HARD_LIMITED, PrebuildStatus.VALIDATION_FAILED][index % 3]
        preset = dataclasses.replace(make_preset(name, status=status), organization_name=f"org {name}")
        state = PresetState(desired=index + 1, actual=index, eligible=max(index - 1, 0))
        plans.append(PresetPlan(preset=preset, state=state, actions=(), hard_limited=index == 3))
    return plans


def populated_collector() -> PresetCollector:
    collector = PresetCollector()
    plan = make_plan(*hostile_plans())
    collector.update_from_plan(plan)
    collector.update_totals(
        {
            (
                preset_plan.preset.template_name,
                preset_plan.preset.name,
                preset_plan.preset.organization_name,
            ): PrebuildTotals(created=10 * index, failed=index, claimed=2 * index)
            for index, preset_plan in enumerate(plan.presets)
        }
    )
    # The claim/miss counters (one label set of no qualifying preset: not exported).
    collector.update_claim_events(
        {
            (preset_plan.preset.template_name, preset_plan.preset.name, preset_plan.preset.organization_name): (
                3 * index,
                index,
            )
            for index, preset_plan in enumerate(plan.presets)
        }
        | {("gone", "gone", "gone"): (1, 1)}
    )
    return collector


def test_exposition_matches_the_client_library_byte_for_byte() -> None:
    collector = populated_collector()
    registry = CollectorRegistry()
    registry.register(collector)
    assert collector.exposition() == generate_latest(registry)


def test_exposition_parses_back_to_the_same_samples() -> None:
    collector = populated_collector()
    parsed = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(collector.exposition().decode())
        for sample in family.samples
    }
    expected = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in collector.collect()
        for sample in family.samples
    }
    assert parsed == expected
    assert len(parsed) > 3 * len(HOSTILE_NAMES)
    claims = {key: value for key, value in parsed.items() if key[0] == "prebuilds_reconciler_preset_claim_events_total"}
    assert len(claims) == 2 * len(HOSTILE_NAMES)
    assert not any(("preset_name", "gone") in labels for _, labels in claims)


def test_the_cache_follows_each_update() -> None:
    collector = populated_collector()
    before = collector.exposition()
    collector.update_from_plan(make_plan())
    after = collector.exposition()
    assert after != before
    assert b"coderd_prebuilt_workspaces_desired{" not in after


def test_render_serves_every_metric_once() -> None:
    metrics = Metrics(process_metrics=False)
    metrics.presets.update_from_plan(make_plan(PresetPlan(make_preset("a"), PresetState(desired=2), (), False)))
    text = metrics.render().decode()
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(names) == len(set(names))
    assert "coderd_prebuilt_workspaces_desired" in names
    assert "prebuilds_reconciler_passes_total" in names
    # The same samples as the plain client rendering (family order aside, which Prometheus ignores).
    assert sorted(text.splitlines()) == sorted(generate_latest(metrics.registry).decode().splitlines())


def test_a_replica_that_skips_a_pass_withdraws_its_gauges_and_keeps_its_counters() -> None:
    metrics = Metrics(process_metrics=False)
    preset_plan = PresetPlan(make_preset("a"), PresetState(desired=2, actual=1), (), False)
    metrics.observe_pass("success", 0.1, make_plan(preset_plan), paused=False)
    metrics.presets.update_totals(
        {
            (
                preset_plan.preset.template_name,
                preset_plan.preset.name,
                preset_plan.preset.organization_name,
            ): PrebuildTotals(created=4, failed=1, claimed=0)
        }
    )
    value = metrics.registry.get_sample_value
    labels = {"template_name": "go", "preset_name": "a", "organization_name": "acme"}
    assert value("coderd_prebuilt_workspaces_desired", labels) == 2
    assert value("coderd_prebuilt_workspaces_created_total", labels) == 4

    metrics.observe_pass("skipped_lock", 0.0, None, paused=None)
    assert value("coderd_prebuilt_workspaces_desired", labels) is None
    assert b"coderd_prebuilt_workspaces_desired{" not in metrics.render()
    # The lifetime counters come from the database, not from a plan: they stay, and keep moving, so that a
    # replica's counter series never comes and goes with the lock.
    assert value("coderd_prebuilt_workspaces_created_total", labels) == 4
    assert b"coderd_prebuilt_workspaces_created_total{" in metrics.render()
    metrics.presets.update_totals(
        {
            (
                preset_plan.preset.template_name,
                preset_plan.preset.name,
                preset_plan.preset.organization_name,
            ): PrebuildTotals(created=5, failed=1, claimed=0)
        }
    )
    assert value("coderd_prebuilt_workspaces_created_total", labels) == 5
    series = b'coderd_prebuilt_workspaces_created_total{organization_name="acme",preset_name="a",template_name="go"}'
    assert series + b" 5.0" in metrics.render()

    # Back in charge: the series return, and the counter did not go down meanwhile.
    metrics.observe_pass("success", 0.1, make_plan(preset_plan), paused=False)
    assert value("coderd_prebuilt_workspaces_desired", labels) == 2
    assert value("coderd_prebuilt_workspaces_created_total", labels) == 5


def test_a_render_formats_only_the_presets_that_changed_and_writes_what_a_fresh_render_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    collector = populated_collector()
    formatted: list[str] = []
    gauge_row = PresetCollector._gauge_row

    def counting(self: PresetCollector, sample: PresetSample) -> tuple[str, ...]:
        formatted.append(sample.labels[1])
        return gauge_row(self, sample)

    monkeypatch.setattr(PresetCollector, "_gauge_row", counting)
    plans = []
    for index, name in enumerate(HOSTILE_NAMES):
        status = [PrebuildStatus.NORMAL, PrebuildStatus.HARD_LIMITED, PrebuildStatus.VALIDATION_FAILED][index % 3]
        preset = dataclasses.replace(make_preset(name, status=status), organization_name=f"org {name}")
        # One preset's pool changed since the last render; the others are as they were.
        state = PresetState(desired=index + 1, actual=index + (name == "plain"), eligible=max(index - 1, 0))
        plans.append(PresetPlan(preset=preset, state=state, actions=(), hard_limited=index == 3))
    collector.update_from_plan(make_plan(*plans))
    assert formatted == ["plain"]

    # The cached lines make the same text as a render from nothing, which the client library agrees with.
    fresh = PresetCollector()
    fresh.update_from_plan(make_plan(*plans))
    fresh.update_totals({labels: PrebuildTotals(*values) for labels, values in collector._totals.items()})
    fresh.update_claim_events(collector._claim_events)
    assert collector.exposition() == fresh.exposition()
    registry = CollectorRegistry()
    registry.register(collector)
    assert collector.exposition() == generate_latest(registry)


def test_a_steady_pass_publishes_the_last_text_without_rendering_it_again(monkeypatch: pytest.MonkeyPatch) -> None:
    collector = populated_collector()
    # The same presets in the same states as the last pass, in new objects, as a steady pass plans them.
    plan = make_plan(*hostile_plans())
    renders = 0
    render_lines = PresetCollector._render_lines

    def counting(self: PresetCollector, *arguments: Any) -> list[str]:
        nonlocal renders
        renders += 1
        return render_lines(self, *arguments)

    monkeypatch.setattr(PresetCollector, "_render_lines", counting)
    before = collector._rendered
    prepared = collector.prepare(plan)
    assert prepared.rendered is before
    collector.update_from_plan(plan, prepared)
    assert renders == 0
    assert collector._rendered is before

    # New totals: the next pass's text is rendered again, with them.
    labels = next(iter(collector._totals))
    collector.update_totals({labels: PrebuildTotals(created=999, failed=0, claimed=0)})
    assert renders == 1
    prepared = collector.prepare(plan)
    assert prepared.rendered is collector._rendered
    assert b" 999.0\n" in collector.exposition()
