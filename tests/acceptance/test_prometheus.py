"""A real Prometheus, with our rules, scraping a running daemon: the alert for a failing preset fires.

Runs when the `prometheus` binary is installed (Debian's `prometheus` package, which
`.ci/deploy-checks.sh` installs together with promtool); skipped otherwise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.demo.embedded_postgres import free_port
from tests.acceptance.daemon_process import DaemonProcess, http_get, wait_for
from tests.factories import Factory, minutes

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules" / "reconciler.rules.yml"

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="prometheus is installed by .ci/deploy-checks.sh (Debian package)"
)


class Prometheus:
    """A Prometheus server on loopback with a one-second scrape and evaluation interval."""

    def __init__(self, directory: Path, target: str) -> None:
        self.port = free_port()
        config = directory / "prometheus.yml"
        # The job name is the one the rules expect; the rules file is the one we ship, unchanged.
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {json.dumps(str(RULES))}\n"
            "scrape_configs:\n  - job_name: reconciler\n"
            f"    static_configs:\n      - targets: [{json.dumps(target)}]\n"
        )
        self._log = (directory / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.log_path = directory / "prometheus.log"

    def api(self, path: str) -> Any:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log_path.read_text()[-3000:]}")
        try:
            status, body = http_get(f"http://127.0.0.1:{self.port}/api/v1/{path}")
        except OSError:
            return None
        return json.loads(body)["data"] if status == 200 else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture
def prometheus_directory() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="reconciler-prometheus-") as directory:
        yield Path(directory)


async def test_prometheus_scrapes_the_daemon_and_fires_the_hard_limit_alert(
    factory: Factory, database_url: str, prometheus_directory: Path
) -> None:
    healthy = await factory.preset(desired=1)
    await factory.prebuild(healthy)
    broken = await factory.preset(desired=1)
    for age in (3, 2, 1):
        await factory.prebuild(broken, status="failed", ago=minutes(age))
    daemon = DaemonProcess(database_url, extra_environment={"RECONCILER_FAILURE_HARD_LIMIT": "3"})
    prometheus: Prometheus | None = None
    try:
        daemon.start().wait_ready()
        prometheus = Prometheus(prometheus_directory, f"127.0.0.1:{daemon.port}")
        server = prometheus

        def target_up() -> bool:
            targets = server.api("targets")
            return bool(targets) and any(
                target["labels"]["job"] == "reconciler" and target["health"] == "up"
                for target in targets["activeTargets"]
            )

        wait_for(target_up, 30, "Prometheus to scrape the daemon", interval=0.5)

        def firing() -> list[dict[str, Any]]:
            alerts = server.api("alerts")
            return [alert for alert in (alerts or {}).get("alerts", []) if alert["state"] == "firing"]

        def hard_limit_fires() -> bool:
            return any(alert["labels"]["alertname"] == "PrebuildPresetHardLimited" for alert in firing())

        wait_for(hard_limit_fires, 30, "the hard-limit alert to fire", interval=0.5)
        [alert] = [alert for alert in firing() if alert["labels"]["alertname"] == "PrebuildPresetHardLimited"]
        assert alert["labels"]["template_name"] == broken.template.name
        assert alert["labels"]["preset_name"] == broken.name
        assert alert["labels"]["organization_name"] == broken.organization.name
        assert alert["labels"]["severity"] == "warning"
        assert broken.template.name in alert["annotations"]["summary"]
        assert alert["annotations"]["runbook_url"] == "docs/RUNBOOK.md#prebuildpresethardlimited"
        # The rules' recording rules evaluate against real series too; they are evaluated on their own
        # schedule, so the first evaluation after the series appear is waited for.
        query = (
            f'query?query=preset:coderd_prebuilt_workspaces_shortfall:max{{template_name="{healthy.template.name}"}}'
        )

        def shortfall() -> list[float]:
            answer = server.api(query)
            return [float(sample["value"][1]) for sample in (answer or {}).get("result", [])]

        wait_for(lambda: bool(shortfall()), 30, "the shortfall recording rule to be evaluated", interval=0.5)
        assert shortfall() == [0.0]
        # A healthy daemon raises nothing else (alerts with a `for:` would only be pending anyway).
        assert {alert["labels"]["alertname"] for alert in firing()} == {"PrebuildPresetHardLimited"}
    finally:
        if prometheus is not None:
            prometheus.stop()
        daemon.stop()
