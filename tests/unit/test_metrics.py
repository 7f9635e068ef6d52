import uuid
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, generate_latest

from reconciler.metrics import Metrics
from reconciler.plan import Plan, PresetPlan, PresetState
from reconciler.snapshot import PrebuildStatus, PrebuildTotals, Preset

NOW = datetime(2026, 1, 5, 12, tzinfo=UTC)


def make_preset(
    name: str, *, active: bool = True, deleted: bool = False, status: PrebuildStatus = PrebuildStatus.NORMAL
) -> Preset:
    return Preset(
        id=uuid.uuid5(uuid.NAMESPACE_URL, name),
        name=name,
        template_id=uuid.uuid4(),
        template_name="go",
        template_version_id=uuid.uuid4(),
        template_version_name="v1",
        organization_id=uuid.uuid4(),
        organization_name="acme",
        desired_instances=3,
        invalidate_after_secs=None,
        scheduling_timezone="",
        prebuild_status=status,
        last_invalidated_at=None,
        is_active_version=active,
        template_deleted=deleted,
        template_deprecated=False,
    )


def make_plan(*preset_plans: PresetPlan) -> Plan:
    return Plan(generated_at=NOW, presets=preset_plans)


def labels(preset: str) -> dict[str, str]:
    return {"template_name": "go", "preset_name": preset, "organization_name": "acme"}


def test_per_preset_gauges_have_exact_values() -> None:
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    plan = make_plan(
        PresetPlan(make_preset("small"), PresetState(desired=3, actual=2, eligible=1), (), hard_limited=False),
        PresetPlan(make_preset("broken"), PresetState(desired=2), (), hard_limited=True),
    )
    metrics.observe_pass("success", 0.2, plan, paused=False)
    value = metrics.registry.get_sample_value
    assert value("coderd_prebuilt_workspaces_desired", labels("small")) == 3
    assert value("coderd_prebuilt_workspaces_running", labels("small")) == 2
    assert value("coderd_prebuilt_workspaces_eligible", labels("small")) == 1
    assert value("coderd_prebuilt_workspaces_preset_hard_limited", labels("broken")) == 1
    assert value("coderd_prebuilt_workspaces_preset_hard_limited", labels("small")) is None
    assert value("coderd_prebuilt_workspaces_reconciliation_paused") == 0
    assert value("prebuilds_reconciler_passes_total", {"outcome": "success"}) == 1
    assert value("coderd_prebuilds_reconciliation_duration_seconds_count", {"outcome": "success"}) == 1


def test_presets_off_the_active_version_or_of_deleted_templates_are_not_exported() -> None:
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    plan = make_plan(
        PresetPlan(make_preset("old", active=False), PresetState(), (), hard_limited=False),
        PresetPlan(make_preset("gone", deleted=True), PresetState(), (), hard_limited=False),
    )
    metrics.observe_pass("success", 0.1, plan, paused=False)
    assert metrics.registry.get_sample_value("coderd_prebuilt_workspaces_desired", labels("old")) is None
    assert metrics.registry.get_sample_value("coderd_prebuilt_workspaces_desired", labels("gone")) is None


def test_stale_series_disappear_when_a_preset_stops_qualifying() -> None:
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    metrics.observe_pass(
        "success",
        0.1,
        make_plan(PresetPlan(make_preset("a"), PresetState(desired=1), (), hard_limited=True)),
        paused=False,
    )
    assert metrics.registry.get_sample_value("coderd_prebuilt_workspaces_preset_hard_limited", labels("a")) == 1
    metrics.observe_pass(
        "success",
        0.1,
        make_plan(PresetPlan(make_preset("a", active=False), PresetState(), (), hard_limited=False)),
        paused=False,
    )
    assert metrics.registry.get_sample_value("coderd_prebuilt_workspaces_desired", labels("a")) is None
    assert metrics.registry.get_sample_value("coderd_prebuilt_workspaces_preset_hard_limited", labels("a")) is None


def test_lifetime_counters_never_decrease() -> None:
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    preset = make_preset("small")
    metrics.observe_pass(
        "success", 0.1, make_plan(PresetPlan(preset, PresetState(), (), hard_limited=False)), paused=False
    )
    metrics.presets.update_totals(
        {(preset.template_name, preset.name, preset.organization_name): PrebuildTotals(created=5, failed=2, claimed=1)}
    )
    metrics.presets.update_totals(
        {(preset.template_name, preset.name, preset.organization_name): PrebuildTotals(created=4, failed=2, claimed=3)}
    )
    value = metrics.registry.get_sample_value
    assert value("coderd_prebuilt_workspaces_created_total", labels("small")) == 5
    assert value("coderd_prebuilt_workspaces_failed_total", labels("small")) == 2
    assert value("coderd_prebuilt_workspaces_claimed_total", labels("small")) == 3


def test_validation_failed_gauge_and_pause() -> None:
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    preset = make_preset("invalid", status=PrebuildStatus.VALIDATION_FAILED)
    metrics.observe_pass(
        "success", 0.1, make_plan(PresetPlan(preset, PresetState(), (), hard_limited=False)), paused=False
    )
    assert (
        metrics.registry.get_sample_value("coderd_prebuilt_workspaces_preset_validation_failed", labels("invalid")) == 1
    )
    metrics.observe_pass("paused", 0.01, None, paused=True)
    assert metrics.registry.get_sample_value("coderd_prebuilt_workspaces_reconciliation_paused") == 1
    assert metrics.registry.get_sample_value("prebuilds_reconciler_passes_total", {"outcome": "paused"}) == 1
    # Every tick is observed, under its outcome (as Coder observes every tick).
    duration_count = "coderd_prebuilds_reconciliation_duration_seconds_count"
    assert metrics.registry.get_sample_value(duration_count, {"outcome": "success"}) == 1
    assert metrics.registry.get_sample_value(duration_count, {"outcome": "paused"}) == 1


def test_every_tick_is_timed_and_ends_a_pass_whatever_its_outcome() -> None:
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    for outcome, seconds in (("failed", 31.0), ("skipped_lock", 0.002), ("success", 0.3)):
        metrics.observe_pass(outcome, seconds, None, paused=None)
    value = metrics.registry.get_sample_value
    assert value("coderd_prebuilds_reconciliation_duration_seconds_sum", {"outcome": "failed"}) == 31.0
    assert value("coderd_prebuilds_reconciliation_duration_seconds_count", {"outcome": "skipped_lock"}) == 1
    assert value("coderd_prebuilds_reconciliation_duration_seconds_bucket", {"outcome": "failed", "le": "30.0"}) == 0
    assert value("prebuilds_reconciler_last_pass_timestamp_seconds") > 0  # type: ignore[operator]
    # Only a success is a successful pass.
    metrics.observe_pass("failed", 1.0, None, paused=None)
    last_success = value("prebuilds_reconciler_last_successful_pass_timestamp_seconds")
    last_pass = value("prebuilds_reconciler_last_pass_timestamp_seconds")
    assert last_success is not None
    assert last_pass is not None
    assert last_success <= last_pass


def test_actions_count_prebuilds_with_the_reason_of_deletes() -> None:
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    metrics.observe_action("create", "success", 10)
    metrics.observe_action("delete", "success", 3, "expired")
    metrics.observe_action("delete", "success", 2, "invalidated")

    def value(kind: str, reason: str) -> float | None:
        labels = {"kind": kind, "outcome": "success", "reason": reason}
        return metrics.registry.get_sample_value("prebuilds_reconciler_actions_total", labels)

    assert value("create", "") == 10
    assert value("delete", "expired") == 3
    assert value("delete", "invalidated") == 2


def test_oldest_pending_job_per_organization_and_gone_organizations_dropped() -> None:
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    name = "prebuilds_reconciler_oldest_pending_prebuild_job_age_seconds"
    metrics.set_oldest_pending_jobs({"acme": 120.0, "other": 0.0})
    assert metrics.registry.get_sample_value(name, {"organization_name": "acme"}) == 120.0
    assert metrics.registry.get_sample_value(name, {"organization_name": "other"}) == 0.0
    metrics.set_oldest_pending_jobs({"acme": 180.0})
    assert metrics.registry.get_sample_value(name, {"organization_name": "acme"}) == 180.0
    assert metrics.registry.get_sample_value(name, {"organization_name": "other"}) is None


def test_exposition_declares_the_coder_metric_types() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.observe_pass(
        "success",
        0.1,
        make_plan(PresetPlan(make_preset("small"), PresetState(desired=1), (), hard_limited=False)),
        paused=False,
    )
    metrics.presets.update_totals({("go", "small", "acme"): PrebuildTotals(1, 0, 0)})
    text = generate_latest(metrics.registry).decode()
    for name, kind in [
        ("coderd_prebuilt_workspaces_desired", "gauge"),
        ("coderd_prebuilt_workspaces_running", "gauge"),
        ("coderd_prebuilt_workspaces_eligible", "gauge"),
        ("coderd_prebuilt_workspaces_created_total", "counter"),
        ("coderd_prebuilt_workspaces_failed_total", "counter"),
        ("coderd_prebuilt_workspaces_claimed_total", "counter"),
        ("coderd_prebuilt_workspaces_reconciliation_paused", "gauge"),
        ("coderd_prebuilt_workspaces_metrics_last_updated", "gauge"),
        ("coderd_prebuilds_reconciliation_duration_seconds", "histogram"),
        ("prebuilds_reconciler_passes_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
    ]:
        assert f"# TYPE {name} {kind}" in text or f"# TYPE {name.removesuffix('_total')} {kind}" in text, name
    sample_names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    assert not [name for name in sample_names if name.endswith("_created")]
