"""Metrics of demand-driven targets (issue 14): each expression preset's target, source and demand.

Per-preset series exist only for presets with a target expression (on the active version of a live
template): a fleet of static presets pays nothing for them at scrape time. For all presets, the number
per target source. Rendered from the last full pass's plan, like the other per-preset series, so a
scrape runs no query and a preset that loses its expression simply disappears from the next scrape.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from reconciler.demand import WINDOWS_MINUTES
from reconciler.plan import Plan
from reconciler.target import TargetSource

PRESET_LABELS = ("template_name", "preset_name", "organization_name")
# The demand windows exported (of WINDOWS_MINUTES): the short one bursts show in, and the hour.
EXPORTED_WINDOWS = (5, 60)


@dataclass(frozen=True, slots=True)
class _Sample:
    labels: tuple[str, str, str]
    source: str
    desired: int
    retained: int
    scheduled: int
    claims: tuple[int, ...]
    misses: tuple[int, ...]


class DemandCollector(Collector):
    def __init__(self) -> None:
        self._samples: tuple[_Sample, ...] = ()
        self._by_source: dict[str, int] = dict.fromkeys((source.value for source in TargetSource), 0)
        # Passes in which each preset's expression failed: only grows while the process runs.
        self._fallbacks: dict[tuple[str, str, str], int] = {}

    def update_from_plan(self, plan: Plan) -> None:
        """A full pass's plan (a targeted pass's covers some templates only)."""
        demand = {row.preset_id: row.counts for row in plan.snapshot.demand} if plan.snapshot is not None else {}
        by_source = dict.fromkeys((source.value for source in TargetSource), 0)
        samples = []
        indexes = [WINDOWS_MINUTES.index(window) for window in EXPORTED_WINDOWS]
        for preset_plan in plan.presets:
            target = preset_plan.target
            if target is None:
                continue
            by_source[target.source.value] += 1
            preset = preset_plan.preset
            if target.expression is None or not preset.is_active_version or preset.template_deleted:
                continue
            labels = (preset.template_name, preset.name, preset.organization_name)
            if target.source is TargetSource.EXPRESSION_FALLBACK:
                self._fallbacks[labels] = self._fallbacks.get(labels, 0) + 1
            counts = demand.get(preset.id)
            samples.append(
                _Sample(
                    labels=labels,
                    source=target.source.value,
                    desired=target.desired,
                    retained=target.retained,
                    scheduled=target.scheduled_target,
                    claims=tuple(counts.claims[index] if counts else 0 for index in indexes),
                    misses=tuple(counts.misses[index] if counts else 0 for index in indexes),
                )
            )
        self._samples = tuple(samples)
        self._by_source = by_source

    def withdraw(self) -> None:
        """Another replica reconciles: its series are the current ones (the fallback counts are kept)."""
        self._samples = ()

    def collect(self) -> Iterator[Metric]:
        samples = self._samples
        sources = GaugeMetricFamily(
            "prebuilds_reconciler_presets_by_target_source",
            "Presets by where the last full pass took their target from.",
            labels=("source",),
        )
        for source, count in self._by_source.items():
            sources.add_metric([source], count)
        yield sources
        target = GaugeMetricFamily(
            "prebuilds_reconciler_preset_target",
            "Target of a preset with an expression, by source (expression, or expression_fallback when it failed).",
            labels=(*PRESET_LABELS, "source"),
        )
        retained = GaugeMetricFamily(
            "prebuilds_reconciler_preset_target_retained",
            "Pool size a preset with an expression is held at while a lower target stabilizes.",
            labels=PRESET_LABELS,
        )
        scheduled = GaugeMetricFamily(
            "prebuilds_reconciler_preset_scheduled_target",
            "The static or scheduled target of a preset with an expression (its scheduled_target).",
            labels=PRESET_LABELS,
        )
        demand = GaugeMetricFamily(
            "prebuilds_reconciler_preset_demand",
            "Claim events of a preset with an expression in the last `window` (event: claims or misses).",
            labels=(*PRESET_LABELS, "event", "window"),
        )
        for sample in samples:
            labels = list(sample.labels)
            target.add_metric([*labels, sample.source], sample.desired)
            retained.add_metric(labels, sample.retained)
            scheduled.add_metric(labels, sample.scheduled)
            for window, claims, misses in zip(EXPORTED_WINDOWS, sample.claims, sample.misses, strict=True):
                demand.add_metric([*labels, "claims", f"{window}m"], claims)
                demand.add_metric([*labels, "misses", f"{window}m"], misses)
        yield from (target, retained, scheduled, demand)
        fallbacks = CounterMetricFamily(
            "prebuilds_reconciler_preset_expression_fallbacks",
            "Full passes in which the preset's expression failed and its scheduled target was used.",
            labels=PRESET_LABELS,
        )
        for labels_tuple, count in self._fallbacks.items():
            fallbacks.add_metric(list(labels_tuple), count)
        yield fallbacks

    def describe(self) -> Iterable[Metric]:
        return ()
