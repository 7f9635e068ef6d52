"""The demand-driven target series (reconciler/demand_metrics.py), from a plan as a full pass makes it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from reconciler.demand import DemandCounts
from reconciler.expression import ErrorKind, ExpressionError
from reconciler.metrics import Metrics
from reconciler.plan import Plan, PresetPlan, PresetState
from reconciler.snapshot import PresetDemand, Snapshot
from reconciler.target import Target, TargetSource
from tests.unit.test_metrics import NOW, labels, make_preset


def plan_of(*entries: tuple[str, Target, DemandCounts | None], active: bool = True) -> Plan:
    presets = []
    demand = []
    for name, target, counts in entries:
        preset = make_preset(name, active=active)
        presets.append(PresetPlan(preset, PresetState(desired=target.desired), (), hard_limited=False, target=target))
        if counts is not None:
            demand.append(PresetDemand(preset.id, counts))
    return Plan(generated_at=NOW, presets=tuple(presets), snapshot=Snapshot(demand=tuple(demand)))


COMPUTED = Target(TargetSource.EXPRESSION, desired=6, retained=8, scheduled_target=2, expression="claims_60m", result=6)
FAILED = Target(
    TargetSource.EXPRESSION_FALLBACK,
    desired=2,
    retained=2,
    scheduled_target=2,
    expression="claims_10m / misses_10m",
    error=ExpressionError(ErrorKind.DIVISION_BY_ZERO, "division by zero"),
)
STATIC = Target(TargetSource.STATIC, desired=3, retained=3, scheduled_target=3)
DEMAND = DemandCounts(claims=(1, 2, 3, 6, 9), misses=(0, 0, 1, 2, 2), has_history=True)


def test_expression_presets_export_target_source_hold_and_demand() -> None:
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    metrics.observe_pass("success", 0.1, plan_of(("pool", COMPUTED, DEMAND), ("plain", STATIC, None)), paused=False)
    value = metrics.registry.get_sample_value
    assert value("prebuilds_reconciler_preset_target", {**labels("pool"), "source": "expression"}) == 6
    assert value("prebuilds_reconciler_preset_target_retained", labels("pool")) == 8
    assert value("prebuilds_reconciler_preset_scheduled_target", labels("pool")) == 2
    demand = {
        (event, window): value(
            "prebuilds_reconciler_preset_demand", {**labels("pool"), "event": event, "window": window}
        )
        for event in ("claims", "misses")
        for window in ("5m", "60m")
    }
    assert demand == {("claims", "5m"): 1, ("claims", "60m"): 6, ("misses", "5m"): 0, ("misses", "60m"): 2}
    # A preset without an expression has no per-preset series; it is counted by source.
    assert value("prebuilds_reconciler_preset_target", {**labels("plain"), "source": "static"}) is None
    by_source = {
        source.value: value("prebuilds_reconciler_presets_by_target_source", {"source": source.value})
        for source in TargetSource
    }
    assert by_source == {"static": 1, "schedule": 0, "expression": 1, "expression_fallback": 0, "inactive": 0}


def test_fallbacks_count_full_passes_and_the_source_label_follows_the_target() -> None:
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    value = metrics.registry.get_sample_value
    for _ in range(3):
        metrics.observe_pass("success", 0.1, plan_of(("pool", FAILED, None)), paused=False)
    assert value("prebuilds_reconciler_preset_expression_fallbacks_total", labels("pool")) == 3
    assert value("prebuilds_reconciler_preset_target", {**labels("pool"), "source": "expression_fallback"}) == 2
    metrics.observe_pass("success", 0.1, plan_of(("pool", COMPUTED, DEMAND)), paused=False)
    assert value("prebuilds_reconciler_preset_target", {**labels("pool"), "source": "expression_fallback"}) is None
    assert value("prebuilds_reconciler_preset_target", {**labels("pool"), "source": "expression"}) == 6
    assert value("prebuilds_reconciler_preset_expression_fallbacks_total", labels("pool")) == 3


def test_outdated_presets_and_another_replicas_passes_export_no_preset_series() -> None:
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    value = metrics.registry.get_sample_value
    metrics.observe_pass("success", 0.1, plan_of(("old", COMPUTED, DEMAND), active=False), paused=False)
    assert value("prebuilds_reconciler_preset_target", {**labels("old"), "source": "expression"}) is None
    metrics.observe_pass("success", 0.1, plan_of(("pool", COMPUTED, DEMAND)), paused=False)
    metrics.observe_pass("skipped_lock", 0.01, None, paused=None)
    assert value("prebuilds_reconciler_preset_target", {**labels("pool"), "source": "expression"}) is None
