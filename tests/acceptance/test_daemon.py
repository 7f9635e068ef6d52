"""`reconciler run` as people run it: a subprocess, scraped over HTTP, stopped by signals."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from reconciler import db
from reconciler.demo.embedded_postgres import EmbeddedPostgres
from tests.acceptance.daemon_process import DaemonProcess, cli_environment, run_cli, wait_for
from tests.factories import Factory, minutes

LABELS = ("template_name", "preset_name", "organization_name")


def preset_labels(preset: object) -> dict[str, str]:
    from tests.factories import Preset

    assert isinstance(preset, Preset)
    return {
        "template_name": preset.template.name,
        "preset_name": preset.name,
        "organization_name": preset.organization.name,
    }


@pytest.fixture
async def daemon(database_url: str) -> AsyncIterator[DaemonProcess]:
    process = DaemonProcess(database_url, extra_environment={"RECONCILER_FAILURE_HARD_LIMIT": "3"})
    try:
        yield process
    finally:
        process.stop()


async def test_daemon_reconciles_and_serves_exact_metrics(factory: Factory, daemon: DaemonProcess) -> None:
    healthy = await factory.preset(desired=3)
    await factory.prebuild(healthy, ready=True)
    await factory.prebuild(healthy, ready=False)
    broken = await factory.preset(desired=2)
    for age in (3, 2, 1):
        await factory.prebuild(broken, status="failed", ago=minutes(age))
    outdated = await factory.preset(desired=1, template=healthy.template, active=False)
    del outdated

    daemon.start().wait_ready()
    wait_for(
        lambda: (daemon.metric("prebuilds_reconciler_passes_total", {"outcome": "success"}) or 0) >= 1,
        30,
        "a successful pass",
    )

    assert daemon.metric("coderd_prebuilt_workspaces_desired", preset_labels(healthy)) == 3
    assert daemon.metric("coderd_prebuilt_workspaces_running", preset_labels(healthy)) == 2
    assert daemon.metric("coderd_prebuilt_workspaces_eligible", preset_labels(healthy)) == 1
    assert daemon.metric("coderd_prebuilt_workspaces_desired", preset_labels(broken)) == 2
    assert daemon.metric("coderd_prebuilt_workspaces_running", preset_labels(broken)) == 0
    assert daemon.metric("coderd_prebuilt_workspaces_preset_hard_limited", preset_labels(broken)) == 1
    assert daemon.metric("coderd_prebuilt_workspaces_preset_hard_limited", preset_labels(healthy)) is None
    assert daemon.metric("coderd_prebuilt_workspaces_reconciliation_paused") == 0
    assert (daemon.metric("prebuilds_reconciler_heartbeat_timestamp_seconds") or 0) > time.time() - 10

    # The healthy pool got its one missing prebuild (a pending first build); the broken one got none.
    created = await factory.connection.fetch(
        "select b.template_version_preset_id as preset_id, count(*) from workspace_builds b "
        "join provisioner_jobs j on j.id = b.job_id where j.job_status = 'pending' group by 1"
    )
    assert {row["preset_id"]: row["count"] for row in created} == {healthy.id: 1}
    status = await factory.connection.fetchval(
        "select prebuild_status::text from template_version_presets where id = $1", broken.id
    )
    assert status == "hard_limited"

    assert daemon.get("/healthz")[0] == 200
    assert daemon.get("/nope")[0] == 404
    events = [event for event in daemon.events() if event.get("event") == "reconcile.pass"]
    assert events
    assert events[0]["outcome"] == "success"
    assert "run_id" in events[0]

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is installed by .ci/deploy-checks.sh")
async def test_metrics_pass_promtool(factory: Factory, daemon: DaemonProcess) -> None:
    preset = await factory.preset(desired=1)
    await factory.prebuild(preset)
    daemon.start().wait_ready()
    wait_for(
        lambda: (daemon.metric("prebuilds_reconciler_passes_total", {"outcome": "success"}) or 0) >= 1,
        30,
        "a successful pass",
    )
    status, body = daemon.get("/metrics")
    assert status == 200
    # A blocking subprocess is fine here: the daemon under test is another process.
    checked = subprocess.run(  # noqa: ASYNC221
        ["promtool", "check", "metrics"], input=body, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_sigterm_mid_pass_exits_within_grace_without_partial_rows(factory: Factory, database_url: str) -> None:
    preset = await factory.preset(desired=2)
    # Hold the preset's row lock so the daemon's create waits inside its transaction: a pass in flight.
    blocker = await asyncpg.connect(database_url)
    transaction = blocker.transaction()
    await transaction.start()
    await blocker.execute("select 1 from template_version_presets where id = $1 for update", preset.id)
    daemon = DaemonProcess(database_url, extra_environment={"RECONCILER_SHUTDOWN_GRACE": "2s"})
    try:
        daemon.start().wait_ready()

        async def waiting_on_lock() -> bool:
            count = await factory.connection.fetchval(
                "select count(*) from pg_stat_activity where wait_event_type = 'Lock' "
                "and datname = current_database() and application_name = 'reconciler'"
            )
            return bool(count)

        deadline = time.monotonic() + 30
        while not await waiting_on_lock():
            assert time.monotonic() < deadline, "the pass never blocked on the preset lock"
            await asyncio.sleep(0.1)
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0
        assert time.monotonic() - started < 2 + 8
        assert any(event.get("event") == "daemon.pass_cancelled" for event in daemon.events())
    finally:
        await transaction.rollback()
        await blocker.close()
        daemon.stop()
    orphans = await factory.connection.fetchval(
        "select count(*) from workspaces w "
        "where not exists (select 1 from workspace_builds b where b.workspace_id = w.id)"
    )
    jobs_without_builds = await factory.connection.fetchval(
        "select count(*) from provisioner_jobs j "
        "where not exists (select 1 from workspace_builds b where b.job_id = j.id)"
    )
    assert (orphans, jobs_without_builds) == (0, 0)
    assert await factory.connection.fetchval("select count(*) from workspaces") == 0


async def test_port_in_use_is_a_clear_startup_error(database_url: str) -> None:
    with socket.socket() as occupied:
        occupied.bind(("127.0.0.1", 0))
        occupied.listen()
        port = occupied.getsockname()[1]
        daemon = DaemonProcess(database_url, port=port)
        daemon.start()
        try:
            assert daemon.wait(timeout=30) == 1
            assert f"cannot listen on 127.0.0.1:{port}" in daemon.output()
            assert "Traceback" not in daemon.output()
        finally:
            daemon.stop()


async def test_sd_notify_ready_watchdog_and_stopping(database_url: str, tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        receiver.settimeout(30)
        daemon = DaemonProcess(database_url, extra_environment={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
        try:
            daemon.start()
            messages: list[str] = []
            while not any("READY=1" in message for message in messages):
                messages.append(receiver.recv(4096).decode())
            # READY only once the database, the schema, HTTP and the scheduler are up.
            assert daemon.is_ready()
            while messages.count("WATCHDOG=1") < 2:
                messages.append(receiver.recv(4096).decode())
            daemon.signal(signal.SIGTERM)
            while "STOPPING=1" not in messages:
                messages.append(receiver.recv(4096).decode())
            assert daemon.wait(timeout=30) == 0
        finally:
            daemon.stop()


async def test_healthcheck_command(database_url: str) -> None:
    daemon = DaemonProcess(database_url)
    environment = cli_environment(None, RECONCILER_HTTP_ADDRESS=f"127.0.0.1:{daemon.port}")
    assert run_cli("healthcheck", "--timeout", "2", environment=environment).returncode == 1
    try:
        daemon.start().wait_ready()
        result = run_cli("healthcheck", environment=environment)
        assert result.returncode == 0, result.stderr
    finally:
        daemon.stop()
    assert run_cli("healthcheck", "--timeout", "2", environment=environment).returncode == 1


async def test_database_outage_daemon_stays_up_and_recovers() -> None:
    with tempfile.TemporaryDirectory(prefix="reconciler-outage-") as directory:
        server = EmbeddedPostgres(Path(directory) / "data")
        server.start()
        daemon = DaemonProcess(server.dsn())
        try:
            connection = await db.connect(server.dsn())
            await db.migrate(connection)
            await connection.close()
            daemon.start().wait_ready()
            server.stop(mode="immediate")
            wait_for(lambda: not daemon.is_ready(), 30, "/readyz to turn 503")
            status, body = daemon.get("/readyz")
            assert status == 503
            assert "database unreachable" in body
            await asyncio.sleep(3)  # a few failed passes at a 1 s interval
            assert daemon.process is not None
            assert daemon.process.poll() is None
            failed_before = daemon.metric("prebuilds_reconciler_passes_total", {"outcome": "failed"}) or 0
            assert failed_before >= 1
            errors = [event for event in daemon.events() if event.get("level") == "error"]
            # One error line per failed pass (plus the readiness transition), not a flood.
            failed_passes = [event for event in errors if event.get("event") == "reconcile.pass"]
            assert len(errors) <= len(failed_passes) + 3
            server.start()
            daemon.wait_ready(timeout=60)
            successes = daemon.metric("prebuilds_reconciler_passes_total", {"outcome": "success"}) or 0
            wait_for(
                lambda: (daemon.metric("prebuilds_reconciler_passes_total", {"outcome": "success"}) or 0) > successes,
                30,
                "passes to resume",
            )
            daemon.signal(signal.SIGTERM)
            assert daemon.wait(timeout=30) == 0
        finally:
            daemon.stop()
            server.stop(mode="immediate")
