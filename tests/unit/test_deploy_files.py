"""The deployment files in deploy/: what can be checked without systemd, a container engine or Prometheus.

The metric names that the dashboard and the alert rules query must exist in what the daemon serves at
/metrics, or a panel stays empty and an alert never fires. The tools (systemd-analyze, promtool) run
here when installed (`.ci/deploy-checks.sh` installs them); the YAML checks use PyYAML, a test extra.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from reconciler.demand import DemandCounts
from reconciler.expression import ErrorKind, ExpressionError
from reconciler.metrics import Metrics
from reconciler.plan import Plan, PresetPlan, PresetState
from reconciler.snapshot import PrebuildStatus, PrebuildTotals, Preset, PresetDemand, Snapshot
from reconciler.target import Target, TargetSource
from tests.unit.test_metrics import make_preset

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "reconciler.json"
RULES = DEPLOY / "prometheus" / "rules" / "reconciler.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "reconciler.test.yml"
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
UNIT = DEPLOY / "systemd" / "reconciler.service"
DOCKERFILE = DEPLOY / "container" / "Dockerfile"
COMPOSE = DEPLOY / "container" / "compose.yaml"
# Our metric names; a name right after ":" is part of a recording rule's name, not a metric.
METRIC_NAME = re.compile(r"(?<![:\w])((?:coderd|prebuilds_reconciler)_[a-z0-9_]+)")


def yaml_module() -> Any:
    return pytest.importorskip("yaml", reason="PyYAML (a test extra) is not installed")


def exported_sample_names() -> set[str]:
    """Every sample name of /metrics once a pass has acted on a healthy, a hard-limited and an invalid preset."""
    metrics = Metrics(CollectorRegistry())
    presets = [make_preset(name, status=status) for name, status in (("ok", PrebuildStatus.NORMAL), *_FAILED_PRESETS)]
    plan = Plan(
        generated_at=datetime.now(UTC),
        presets=tuple(
            PresetPlan(
                item,
                PresetState(desired=2, actual=1, eligible=1),
                (),
                hard_limited=item.prebuild_status is PrebuildStatus.HARD_LIMITED,
            )
            for item in presets
        ),
    )
    # A preset whose target an expression computed (issue 14), failing once (its fallback counter).
    computed = make_preset("computed")
    plan = replace(
        plan,
        presets=(*plan.presets, _computed_plan(computed)),
        snapshot=Snapshot(demand=(PresetDemand(computed.id, DemandCounts(has_history=True)),)),
    )
    metrics.observe_pass("success", 0.1, plan, paused=False)
    # Labelled children appear with their first sample: the first action of a pass creates this one.
    metrics.observe_action("create", "success", 1)
    metrics.set_oldest_pending_jobs({"acme": 0.0})
    metrics.presets.update_totals(
        {
            (item.template_name, item.name, item.organization_name): PrebuildTotals(created=3, failed=1, claimed=1)
            for item in presets
        }
    )
    exposition = generate_latest(metrics.registry).decode()
    return {sample.name for family in text_string_to_metric_families(exposition) for sample in family.samples}


def _computed_plan(preset: Preset) -> PresetPlan:
    error = ExpressionError(ErrorKind.DIVISION_BY_ZERO, "division by zero")
    target = Target(
        TargetSource.EXPRESSION_FALLBACK, 2, 2, scheduled_target=2, expression="claims_10m / misses_10m", error=error
    )
    return PresetPlan(preset, PresetState(desired=2), (), hard_limited=False, target=target)


_FAILED_PRESETS = (("limited", PrebuildStatus.HARD_LIMITED), ("invalid", PrebuildStatus.VALIDATION_FAILED))


def dashboard_expressions() -> list[str]:
    document = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in document["panels"] for target in panel.get("targets", [])]
    expressions += [variable["definition"] for variable in document["templating"]["list"] if "definition" in variable]
    return expressions


def test_dashboard_queries_only_metrics_the_daemon_exports() -> None:
    exported = exported_sample_names()
    queried = {name for expression in dashboard_expressions() for name in METRIC_NAME.findall(expression)}
    assert queried - exported == set()
    # What the dashboard is for: pools per preset, failures, hard limits, passes, lock skips, notifications.
    for wanted in (
        "coderd_prebuilt_workspaces_desired",
        "coderd_prebuilt_workspaces_running",
        "coderd_prebuilt_workspaces_eligible",
        "coderd_prebuilt_workspaces_failed_total",
        "coderd_prebuilt_workspaces_preset_hard_limited",
        "coderd_prebuilds_reconciliation_duration_seconds_bucket",
        "prebuilds_reconciler_passes_total",
        "prebuilds_reconciler_notifications_delivered_total",
        "prebuilds_reconciler_preset_target",
        "prebuilds_reconciler_preset_demand",
    ):
        assert wanted in queried, wanted
    assert any('outcome="skipped_lock"' in expression for expression in dashboard_expressions())


# Series every replica exports alike, read from the database: summed over replicas they count once per
# replica (issue 11.7: 7.3 creates shown where the database had 4). They are aggregated with max.
SHARED_SERIES = re.compile(r"coderd_prebuilt_workspaces_(?:created|failed|claimed)_total")


def per_replica_aggregations(expression: str) -> list[str]:
    """The aggregation operators applied to the per-preset database series of `expression`."""
    aggregation = r"\b(sum|max|min|avg|count)\s+by\s*\([^)]*\)\s*\(\s*(?:increase|rate)\(\s*"
    return re.findall(aggregation + SHARED_SERIES.pattern, expression)


def test_dashboard_and_rules_take_the_max_of_what_every_replica_exports_alike() -> None:
    expressions = [*dashboard_expressions(), RULES.read_text()]
    found = [operator for expression in expressions for operator in per_replica_aggregations(expression)]
    assert found, "the dashboard shows the created/failed/claimed totals"
    assert set(found) == {"max"}, found


def test_the_promtool_two_replica_case_tests_the_dashboards_query() -> None:
    """The two-replica case of the rule tests evaluates the dashboard's own "created" query."""
    yaml = yaml_module()
    (created,) = [expression for expression in dashboard_expressions() if "created_total" in expression]
    as_tested = created.replace("$template", ".*").replace("$preset", ".*").replace("$__rate_interval", "10m")
    tests = yaml.safe_load(RULE_TESTS.read_text())
    tested = [case["expr"] for test in tests["tests"] for case in test.get("promql_expr_test", [])]
    assert as_tested in tested


def test_every_runbook_url_is_a_section_of_the_runbook() -> None:
    yaml = yaml_module()
    rules = yaml.safe_load(RULES.read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]
    # GitHub's anchors: the heading in lower case (our headings are alert names: no spaces or signs).
    sections = {line[3:].strip().lower() for line in RUNBOOK.read_text().splitlines() if line.startswith("## ")}
    for alert in alerts:
        url = alert["annotations"]["runbook_url"]
        assert url == f"docs/RUNBOOK.md#{alert['alert'].lower()}", alert["alert"]
        assert alert["alert"].lower() in sections, alert["alert"]
    assert sections == {alert["alert"].lower() for alert in alerts}, "one section per alert, no more"
    text = RUNBOOK.read_text()
    for alert in alerts:
        section = text.split(f"## {alert['alert']}\n", 1)[1].split("\n## ", 1)[0]
        assert all(part in section for part in ("**Means**", "**Check**", "**Do**")), alert["alert"]


def test_dashboard_is_well_formed() -> None:
    document = json.loads(DASHBOARD.read_text())
    assert document["uid"] == "prebuilds-reconciler"
    panels = document["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    variables = {variable["name"] for variable in document["templating"]["list"]}
    assert {"datasource", "template", "preset"} <= variables
    for panel in panels:
        assert panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            # Every query goes to the chosen data source, so the dashboard imports anywhere.
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_alert_rules_query_only_exported_metrics() -> None:
    exported = exported_sample_names()
    for path in (RULES, RULE_TESTS):
        referenced = set(METRIC_NAME.findall(path.read_text()))
        assert referenced, path
        assert referenced - exported == set(), path


def test_every_alert_has_severity_summary_description_runbook_and_a_test() -> None:
    yaml = yaml_module()
    rules = yaml.safe_load(RULES.read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]
    names = {alert["alert"] for alert in alerts}
    assert {
        "ReconcilerDown",
        "ReconcilerNotReady",
        "ReconcilerNoSuccessfulPass",
        "ReconcilerPassesFailing",
        "PrebuildPresetHardLimited",
        "PrebuildPresetValidationFailed",
        "PrebuildPoolBelowTarget",
        "ReconcilerPassesStalled",
        "ReconcilerInstancePassesStalled",
        "PrebuildJobsWaiting",
        "ReconcilerSettingsMalformed",
        "ReconcilerNotificationsFailing",
        "ReconcilerNotificationsPilingUp",
    } <= names
    for alert in alerts:
        assert re.fullmatch(r"(?:[A-Z][a-z]+)+", alert["alert"]), alert["alert"]
        assert alert["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description", "runbook_url"} <= set(alert["annotations"]), alert["alert"]
    tests = yaml.safe_load(RULE_TESTS.read_text())
    tested = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert names - tested == set()


def unit_settings() -> list[tuple[str, str]]:
    settings = []
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            settings.append((key, value))
    return settings


def test_systemd_unit_has_the_service_contract() -> None:
    settings = unit_settings()
    values: dict[str, list[str]] = {}
    for key, value in settings:
        values.setdefault(key, []).append(value)
    assert values["Type"] == ["notify"]
    assert values["WatchdogSec"]
    assert values["Restart"] == ["on-failure"]
    assert values["RestartPreventExitStatus"] == ["78"]
    assert values["DynamicUser"] == ["yes"]
    assert values["ExecStartPre"][0].endswith("reconciler migrate")
    assert values["ExecStart"][0].endswith("reconciler run")
    # The credential names are the file names config.py looks for in $CREDENTIALS_DIRECTORY.
    assert values["LoadCredential"][0].startswith("database_url:")
    assert "LoadCredential=smtp_password:" in UNIT.read_text()
    for hardening in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "RestrictAddressFamilies", "SystemCallFilter"):
        assert hardening in values, hardening
    assert values["CapabilityBoundingSet"] == [""]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify insists that ExecStart= exists: point a copy at this interpreter's console script.
    reconciler = Path(sys.executable).with_name("reconciler")
    if not reconciler.exists():
        pytest.skip(f"no console script at {reconciler}")
    unit = tmp_path / "reconciler.service"
    unit.write_text(UNIT.read_text().replace("/opt/reconciler/bin/reconciler", str(reconciler)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)
    # Unknown keys only warn (exit 0): any output at all is a problem.
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is installed by .ci/deploy-checks.sh")
@pytest.mark.parametrize(
    "command",
    [
        ["check", "rules", str(RULES)],
        ["test", "rules", str(RULE_TESTS)],
        ["check", "config", str(PROMETHEUS_CONFIG)],
    ],
    ids=["check-rules", "test-rules", "check-config"],
)
def test_promtool(command: list[str]) -> None:
    result = subprocess.run(["promtool", *command], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_non_root_with_exec_entrypoint_and_healthcheck() -> None:
    instructions = []
    for line in re.sub(r"\\\n", " ", DOCKERFILE.read_text()).splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    stages = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(stages) >= 2
    final = instructions[max(index for index, (keyword, _) in enumerate(instructions) if keyword == "FROM") :]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users, "the runtime stage must not run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}
    entrypoint = [rest for keyword, rest in final if keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint[-1]) == ["reconciler"]
    healthcheck = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    assert healthcheck
    assert '"reconciler", "healthcheck"' in healthcheck[-1]


def test_compose_stack() -> None:
    yaml = yaml_module()
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"postgres", "migrate", "reconciler", "prometheus", "grafana"} <= set(services)
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    reconciler = services["reconciler"]
    assert reconciler["command"] == ["run"]
    assert reconciler["deploy"]["replicas"] == 2
    assert reconciler["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "database_url" in reconciler["secrets"]
    # Every file mounted from the repository exists, and Grafana finds the dashboard where it looks.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), volume
    provisioning = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "reconciler.yaml").read_text())
    dashboard_path = provisioning["providers"][0]["options"]["path"]
    assert any(volume.endswith(f":{dashboard_path}:ro") for volume in services["grafana"]["volumes"])
    prometheus_config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert [job["job_name"] for job in prometheus_config["scrape_configs"]] == ["reconciler"]
    assert prometheus_config["scrape_configs"][0]["dns_sd_configs"][0]["names"] == ["reconciler"]


def test_environment_example_names_only_real_settings() -> None:
    config = importlib.import_module("reconciler.config")
    known = {config.variable_name(field) for field in config.Settings.model_fields}
    text = (DEPLOY / "systemd" / "reconciler.env.example").read_text()
    named = set(re.findall(r"^#?\s*(RECONCILER_[A-Z0-9_]+)=", text, re.MULTILINE))
    indexed = {name for name in named if re.fullmatch(r"RECONCILER_WEBHOOK_\d+_(URL|SECRET|TIMEOUT)", name)}
    assert named - indexed - known == set()
    # Secrets go through credentials, never the environment file.
    assert not {"RECONCILER_DATABASE_URL", "RECONCILER_SMTP_PASSWORD"} & named
