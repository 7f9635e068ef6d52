"""The daemon runs as the least-privilege role of `sql/roles/reconciler_role.sql` (issue 8, issue 12).

The script runs on a migrated database as its owner; then the CLI and the daemon run as a login role
that is only a member of `prebuilds_reconciler`: every write of a pass works (creates, deletes, cancels,
status changes, notifications and their delivery), as do the operator's commands. What the role is
refused is tried statement by statement in `tests/integration/test_daemon_role.py`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from tests.acceptance.daemon_process import DaemonProcess, cli_environment, run_cli, wait_for
from tests.daemon_role import login_role
from tests.factories import Factory, minutes


@pytest.fixture
async def role_dsn(database_url: str) -> AsyncIterator[str]:
    """A login role of the daemon's group on this test's database (the script run by the owner)."""
    async with login_role(database_url) as dsn:
        yield dsn


async def test_a_pass_as_the_least_privilege_role(factory: Factory, role_dsn: str) -> None:
    # Every kind of write a pass makes: creates, deletes (expired, extraneous, inactive), a cancel, a hard
    # limit with its notification.
    to_fill = await factory.preset(desired=2)
    expiring = await factory.preset(desired=1, ttl_seconds=60)
    expired = await factory.prebuild(expiring, ago=minutes(10))
    crowded = await factory.preset(desired=1)
    await factory.prebuilds(crowded, 2, ago=minutes(5))
    outdated = await factory.preset(desired=1)
    pending = await factory.prebuild(outdated, status="pending", agents=[])
    running_outdated = await factory.prebuild(outdated, ago=minutes(5))
    await factory.version(outdated.template, active=True)
    failing = await factory.preset(desired=1)
    for age in (3, 2, 1):
        await factory.prebuild(failing, status="failed", ago=minutes(age))
    admin = await factory.user(site_roles=["template-admin"])
    environment = cli_environment(role_dsn, RECONCILER_FAILURE_HARD_LIMIT="3")

    result = run_cli("reconcile", "--once", environment=environment)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "reconciled: created 3, deleted 3, canceled 1, presets failed 0" in result.stdout
    connection = factory.connection
    assert (
        await connection.fetchval(
            "select count(*) from workspace_builds where transition = 'delete' and workspace_id = any($1::uuid[])",
            [expired.id, running_outdated.id],
        )
        == 2
    )
    assert await connection.fetchval("select deleted from workspaces where id = $1", pending.id)
    assert (
        await connection.fetchval(
            "select prebuild_status::text from template_version_presets where id = $1", failing.id
        )
        == "hard_limited"
    )
    assert (
        await connection.fetchval(
            "select count(*) from notification_messages where preset_id = $1 and user_id = $2", failing.id, admin.id
        )
        == 1
    )
    assert (
        await connection.fetchval(
            "select count(*) from workspace_builds b join provisioner_jobs j on j.id = b.job_id "
            "where b.template_version_preset_id = $1 and j.job_status = 'pending'",
            to_fill.id,
        )
        == 2
    )

    # The operator's commands too.
    for arguments in (
        ("plan", "--json"),
        ("status", "--json"),
        ("pause",),
        ("resume",),
        ("presets", "reset", str(failing.id)),
        ("notifications", "list", "--json"),
    ):
        completed = run_cli(*arguments, environment=environment)
        assert completed.returncode == 0, (arguments, completed.stdout, completed.stderr)
    assert json.loads(run_cli("plan", "--json", environment=environment).stdout)["paused"] is False
    assert (
        await connection.fetchval(
            "select prebuild_status::text from template_version_presets where id = $1", failing.id
        )
        == "normal"
    )


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        self.received.append(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        del format, args


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[bytes]]]:
    """A webhook receiver on loopback that accepts everything."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Hook.received = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", _Hook.received
    finally:
        server.shutdown()
        server.server_close()


async def test_the_daemon_runs_as_the_least_privilege_role(
    factory: Factory, role_dsn: str, webhook: tuple[str, list[bytes]]
) -> None:
    url, received = webhook
    preset = await factory.preset(desired=2)
    failing = await factory.preset(desired=1)
    for age in (3, 2, 1):
        await factory.prebuild(failing, status="failed", ago=minutes(age))
    await factory.user(site_roles=["template-admin"])
    daemon = DaemonProcess(
        role_dsn,
        extra_environment={
            "RECONCILER_FAILURE_HARD_LIMIT": "3",
            "RECONCILER_NOTIFICATION_POLL_INTERVAL": "200ms",
            "RECONCILER_WEBHOOK_0_URL": url,
        },
    )
    try:
        daemon.start().wait_ready()
        wait_for(
            lambda: (daemon.metric("prebuilds_reconciler_passes_total", {"outcome": "success"}) or 0) >= 3,
            30,
            "three passes",
        )
        # The hard-limit notification is leased, delivered and marked sent by the same role.
        deadline = time.monotonic() + 30
        while (
            await factory.connection.fetchval(
                "select status from notification_messages where preset_id = $1", failing.id
            )
            != "sent"
        ):
            assert time.monotonic() < deadline, "the notification was never delivered"
            await asyncio.sleep(0.2)
    finally:
        daemon.stop()
    assert len(received) == 1
    assert await factory.connection.fetchval("select count(*) from notification_deliveries") == 1
    errors = [event for event in daemon.events() if event.get("level") in ("error", "critical")]
    assert errors == []
    assert not [event for event in daemon.events() if "permission denied" in json.dumps(event)]
    assert (
        await factory.connection.fetchval(
            "select count(*) from workspace_builds where template_version_preset_id = $1", preset.id
        )
        == 2
    )
