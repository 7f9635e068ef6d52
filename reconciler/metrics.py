"""Prometheus metrics: Coder-compatible prebuild series, and the daemon's own health.

Everything lives on an injected registry (tests read exact values with `get_sample_value`). Per-preset
series are rendered from the last pass's plan by a custom collector, so a scrape runs no query, and a
preset that stops qualifying simply disappears from the next scrape (no stale series to remove).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from uuid import UUID

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from reconciler.actions import Plan
from reconciler.snapshot import PrebuildStatus
from reconciler.store import PrebuildTotals

# `_created` series double the size of a scrape at tens of thousands of presets and no dashboard uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

PRESET_LABELS = ("template_name", "preset_name", "organization_name")
PASS_OUTCOMES = ("success", "failed", "skipped_lock", "paused")
# Pass durations from a few milliseconds (small fleets) to minutes (a stuck database).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True, slots=True)
class PresetSample:
    labels: tuple[str, str, str]
    desired: int
    running: int
    eligible: int
    hard_limited: bool
    validation_failed: bool


class PresetCollector(Collector):
    """Per-preset gauges and lifetime counters, for presets on the active version of live templates."""

    def __init__(self) -> None:
        self._samples: tuple[PresetSample, ...] = ()
        self._labels_by_preset: dict[UUID, tuple[str, str, str]] = {}
        # Counters must never go down while the process runs, even if rows disappear from the database.
        self._totals: dict[tuple[str, str, str], tuple[int, int, int]] = {}

    def update_from_plan(self, plan: Plan) -> None:
        samples = []
        labels_by_preset = {}
        for preset_plan in plan.presets:
            preset = preset_plan.preset
            if not preset.is_active_version or preset.template_deleted:
                continue
            labels = (preset.template_name, preset.name, preset.organization_name)
            labels_by_preset[preset.id] = labels
            samples.append(
                PresetSample(
                    labels=labels,
                    desired=preset_plan.state.desired,
                    running=preset_plan.state.actual,
                    eligible=preset_plan.state.eligible,
                    hard_limited=preset_plan.hard_limited or preset.prebuild_status is PrebuildStatus.HARD_LIMITED,
                    validation_failed=preset.prebuild_status is PrebuildStatus.VALIDATION_FAILED,
                )
            )
        self._samples = tuple(samples)
        self._labels_by_preset = labels_by_preset

    def qualifying_preset_ids(self) -> list[UUID]:
        return list(self._labels_by_preset)

    def update_totals(self, totals: Mapping[UUID, PrebuildTotals]) -> None:
        updated = dict(self._totals)
        for preset_id, total in totals.items():
            labels = self._labels_by_preset.get(preset_id)
            if labels is None:
                continue
            previous = updated.get(labels, (0, 0, 0))
            updated[labels] = (
                max(previous[0], total.created),
                max(previous[1], total.failed),
                max(previous[2], total.claimed),
            )
        self._totals = updated

    def collect(self) -> Iterator[Metric]:
        samples = self._samples
        families = {
            "desired": GaugeMetricFamily(
                "coderd_prebuilt_workspaces_desired",
                "Target number of prebuilt workspaces of the preset.",
                labels=PRESET_LABELS,
            ),
            "running": GaugeMetricFamily(
                "coderd_prebuilt_workspaces_running",
                "Running prebuilt workspaces of the preset (expired included).",
                labels=PRESET_LABELS,
            ),
            "eligible": GaugeMetricFamily(
                "coderd_prebuilt_workspaces_eligible",
                "Ready, unexpired prebuilt workspaces that can be claimed.",
                labels=PRESET_LABELS,
            ),
        }
        hard_limited = GaugeMetricFamily(
            "coderd_prebuilt_workspaces_preset_hard_limited",
            "1 while the preset is at the failure hard limit.",
            labels=PRESET_LABELS,
        )
        validation_failed = GaugeMetricFamily(
            "coderd_prebuilt_workspaces_preset_validation_failed",
            "1 while the preset is marked validation_failed.",
            labels=PRESET_LABELS,
        )
        for sample in samples:
            labels = list(sample.labels)
            families["desired"].add_metric(labels, sample.desired)
            families["running"].add_metric(labels, sample.running)
            families["eligible"].add_metric(labels, sample.eligible)
            if sample.hard_limited:
                hard_limited.add_metric(labels, 1)
            if sample.validation_failed:
                validation_failed.add_metric(labels, 1)
        yield from families.values()
        yield hard_limited
        yield validation_failed
        qualifying = {sample.labels for sample in samples}
        counters = [
            CounterMetricFamily(
                "coderd_prebuilt_workspaces_created",
                "Prebuilt workspaces created (first builds).",
                labels=PRESET_LABELS,
            ),
            CounterMetricFamily(
                "coderd_prebuilt_workspaces_failed",
                "Prebuilt workspaces whose first build failed.",
                labels=PRESET_LABELS,
            ),
            CounterMetricFamily(
                "coderd_prebuilt_workspaces_claimed", "Prebuilt workspaces claimed by users.", labels=PRESET_LABELS
            ),
        ]
        for label_values, totals in self._totals.items():
            if label_values not in qualifying:
                continue
            for counter, value in zip(counters, totals, strict=True):
                counter.add_metric(list(label_values), value)
        yield from counters

    def describe(self) -> Iterable[Metric]:
        # Describing nothing keeps registration cheap and lets the samples change freely.
        return ()


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, process_metrics: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        registry = self.registry
        self.presets = PresetCollector()
        registry.register(self.presets)
        if process_metrics:
            ProcessCollector(registry=registry)
        self.paused = Gauge(
            "coderd_prebuilt_workspaces_reconciliation_paused", "1 while reconciliation is paused.", registry=registry
        )
        self.metrics_last_updated = Gauge(
            "coderd_prebuilt_workspaces_metrics_last_updated",
            "Unix time of the pass that produced the per-preset series.",
            registry=registry,
        )
        self.duration = Histogram(
            "coderd_prebuilds_reconciliation_duration_seconds",
            "Duration of reconciliation passes.",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.passes = Counter("prebuilds_reconciler_passes", "Passes by outcome.", ["outcome"], registry=registry)
        for outcome in PASS_OUTCOMES:
            self.passes.labels(outcome)
        self.last_success = Gauge(
            "prebuilds_reconciler_last_successful_pass_timestamp_seconds",
            "Unix time at which the last successful pass ended.",
            registry=registry,
        )
        self.heartbeat = Gauge(
            "prebuilds_reconciler_heartbeat_timestamp_seconds",
            "Unix time of the event loop's last heartbeat.",
            registry=registry,
        )
        self.interval = Gauge(
            "prebuilds_reconciler_reconciliation_interval_seconds",
            "The configured time between passes.",
            registry=registry,
        )
        self.actions = Counter(
            "prebuilds_reconciler_actions",
            "Actions executed, by kind and outcome.",
            ["kind", "outcome"],
            registry=registry,
        )
        self.database_errors = Counter(
            "prebuilds_reconciler_database_errors",
            "Database errors (failed passes, failed presets, failed probes).",
            registry=registry,
        )
        self.scheduler_events = Counter(
            "prebuilds_reconciler_scheduler_events",
            "Scheduler runs missed, failed, or skipped because one was running.",
            ["event"],
            registry=registry,
        )
        for event in ("missed", "error", "max_instances"):
            self.scheduler_events.labels(event)
        self.ready = Gauge("prebuilds_reconciler_ready", "1 while /readyz answers 200.", registry=registry)

    def observe_action(self, kind: str, outcome: str, rows: int) -> None:
        del rows
        self.actions.labels(kind, outcome).inc()

    def observe_pass(self, outcome: str, duration_seconds: float, plan: Plan | None, paused: bool | None) -> None:
        self.passes.labels(outcome).inc()
        if paused is not None:
            self.paused.set(1 if paused else 0)
        if outcome == "success":
            self.duration.observe(duration_seconds)
            self.last_success.set(time.time())
        if plan is not None:
            self.presets.update_from_plan(plan)
            self.metrics_last_updated.set(time.time())
