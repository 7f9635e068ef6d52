"""`reconciler demo` as a newcomer runs it: the real command in a subprocess, read back from its output.

Its output is not a terminal here, so the demo prints plain `key=value` lines instead of redrawing a
table; the assertions read those lines.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.acceptance.daemon_process import cli_environment, http_get, run_cli, wait_for

HEALTHY = ("go-backend/standard", "data-science/gpu", "web-frontend/ephemeral")
BROKEN = "legacy-monolith/default"
ROW = re.compile(r"pass=\d+ preset=(?P<preset>\S+) (?P<fields>.*)$")
METRICS_URL = re.compile(r"metrics: (http://127\.0\.0\.1:\d+/metrics)")
DATABASE_URL = re.compile(r"database: (postgresql://\S+)")


def rows(output: str) -> list[tuple[str, dict[str, str]]]:
    """Every table line printed, in order: (preset, its fields)."""
    found = []
    for line in output.splitlines():
        match = ROW.search(line)
        if match:
            fields = dict(part.split("=", 1) for part in match.group("fields").split())
            found.append((match.group("preset"), fields))
    return found


def server_processes(data_directory: Path) -> list[str]:
    """Processes whose command line names the demo's data directory (the embedded server's do)."""
    listing = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [line for line in listing.splitlines() if str(data_directory) in line and "pytest" not in line]


@pytest.fixture
def demo_directory() -> Iterator[Path]:
    """The demo's data directory. Not under pytest's tmp_path: under root the server runs as another user,
    and pytest keeps its own temporary root private (0700), which would lock that user out."""
    with tempfile.TemporaryDirectory(prefix="reconciler-demo-test-") as directory:
        yield Path(directory)


def start_demo(directory: Path, *arguments: str) -> tuple[subprocess.Popen[str], Path]:
    output_path = directory / "demo.out"
    with output_path.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "demo", "--data-dir", str(directory / "demo"), *arguments],
            env=cli_environment(None),
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
        )
    return process, output_path


def test_demo_converges_backs_off_hits_the_hard_limit_and_cleans_up(demo_directory: Path) -> None:
    started = time.monotonic()
    process, output_path = start_demo(
        demo_directory, "--duration", "40", "--interval", "1", "--failure-rate", "0", "--publish-after", "8"
    )
    hard_limited_metric: float | None = None
    try:
        # While it runs: once the broken preset is hard limited, the daemon's metrics say so too.
        def hard_limited_shown() -> bool:
            assert process.poll() is None, output_path.read_text()
            return f"preset={BROKEN} " in output_path.read_text() and "status=hard_limited" in output_path.read_text()

        wait_for(hard_limited_shown, 45, "the broken preset to reach the hard limit", interval=0.5)
        url_match = METRICS_URL.search(output_path.read_text())
        assert url_match is not None

        # The per-preset series follow the full passes (every second here); the line above may come from
        # a targeted pass (a change event) that acted before the next full one.
        def hard_limited_exported() -> bool:
            nonlocal hard_limited_metric
            status, body = http_get(url_match.group(1))
            assert status == 200
            for line in body.splitlines():
                if line.startswith("coderd_prebuilt_workspaces_preset_hard_limited{") and "legacy-monolith" in line:
                    hard_limited_metric = float(line.rsplit(" ", 1)[1])
            return hard_limited_metric == 1

        wait_for(hard_limited_exported, 5, "the hard limit in the metrics", interval=0.2)
        # `status` against the demo's database, from a shell whose environment says otherwise, computes
        # with the demo daemon's recorded settings (issue 11.3): its 5 s backoff, not the shell's 1 h.
        dsn_match = DATABASE_URL.search(output_path.read_text())
        assert dsn_match is not None
        status_process = run_cli(
            "status",
            "--json",
            environment=cli_environment(dsn_match.group(1), RECONCILER_BACKOFF_INTERVAL="1h"),
        )
        assert status_process.returncode == 0, status_process.stderr
        assert process.wait(timeout=45) == 0
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)
    elapsed = time.monotonic() - started
    output = output_path.read_text()
    assert hard_limited_metric == 1, output
    status_document = json.loads(status_process.stdout)
    assert status_document["settings"]["source"] == "recorded"
    assert status_document["settings"]["values"]["RECONCILER_BACKOFF_INTERVAL"] == "5s"
    assert "your environment sets RECONCILER_BACKOFF_INTERVAL=1h, but the daemon uses 5s" in status_process.stderr
    (broken_status,) = [
        entry for entry in status_document["presets"] if f"{entry['template_name']}/{entry['preset_name']}" == BROKEN
    ]
    assert broken_status["prebuild_status"] == "hard_limited"
    # Its backoff, when still running, ends when the demo's table said it would.
    if broken_status["backoff_until"] is not None:
        shown = {fields["backoff_until"] for name, fields in rows(output) if name == BROKEN}
        assert f"{datetime.fromisoformat(broken_status['backoff_until']):%H:%M:%S}" in shown, (broken_status, shown)
    assert elapsed < 60, f"the demo took {elapsed:.0f}s"

    printed = rows(output)
    # Every healthy pool filled: at some pass all its prebuilds were running and eligible.
    for preset in HEALTHY:
        assert any(
            name == preset and fields["status"] == "ready" and fields["eligible"] == fields["desired"] != "0"
            for name, fields in printed
        ), f"{preset} never converged:\n{output}"
    # The broken preset backed off between failures, then reached the hard limit, and was told once to
    # each template admin (alice: site role; bob: organization role), not to carol (a plain member).
    broken = [fields["status"] for name, fields in printed if name == BROKEN]
    assert "backoff" in broken, output
    assert broken.index("backoff") < broken.index("hard_limited"), output
    assert output.count(f"BUILD FAILED {BROKEN}") >= 3, output
    notifications = [line for line in output.splitlines() if "NOTIFICATION 'Prebuild Failure Limit Reached'" in line]
    assert len(notifications) == 2, output
    assert all('template "legacy-monolith"' in line for line in notifications)
    assert {re.search(r"to (\w+) <", line).group(1) for line in notifications} == {"alice", "bob"}  # type: ignore[union-attr]
    # Publishing a version: the outdated prebuilds were shown going away, and the new version's pool filled.
    assert "PUBLISHED go-backend version v2" in output
    assert any(name == "go-backend/standard" and fields["active"] == "no" for name, fields in printed), output
    assert any(
        name == "go-backend/standard" and fields["version"] == "v2" and fields["status"] == "ready"
        for name, fields in printed
    ), output
    # A clean stop: the summary, the server stopped, and nothing of it left running.
    assert "stopping (the end of --duration)" in output
    assert "final state:" in output
    assert output.rstrip().endswith("embedded PostgreSQL stopped"), output
    assert not (demo_directory / "demo" / "postgres" / "postmaster.pid").exists()
    assert server_processes(demo_directory / "demo") == []
    assert "Traceback" not in output


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_demo_stops_cleanly_on_sigterm(demo_directory: Path, signum: signal.Signals) -> None:
    """SIGHUP is the terminal closing: the embedded server must not outlive the demo then either."""
    process, output_path = start_demo(demo_directory, "--interval", "1")
    try:
        wait_for(lambda: "pass=1 " in output_path.read_text(), 30, "the first pass")
        assert server_processes(demo_directory / "demo"), "the embedded server should be running"
        process.send_signal(signum)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = output_path.read_text()
    assert f"stopping ({signum.name})" in output, output
    assert output.rstrip().endswith("embedded PostgreSQL stopped"), output
    assert server_processes(demo_directory / "demo") == []
    assert "Traceback" not in output
