"""`reconciler run` against a database that stops answering (issue 12.4): a real freeze, through a proxy
that stops forwarding between the daemon and the real server."""

from __future__ import annotations

import time

import asyncpg

from reconciler import reconcile, service
from tests.acceptance.daemon_process import DaemonProcess, wait_for
from tests.factories import Factory
from tests.tcp_proxy import TcpProxy

INTERVAL_SECONDS = 1.0
PASS_TIMEOUT_SECONDS = 2.0
GRACE_SECONDS = 2.0
# What a stop may take past its grace, whatever the database does (service.STOP_* budgets), and a
# second for the process's own start and exit.
STOP_MARGIN_SECONDS = service.STOP_CANCEL_SECONDS + service.STOP_TASKS_SECONDS + service.STOP_POOL_SECONDS + 2 + 1


def passes(daemon: DaemonProcess, outcome: str) -> float:
    return daemon.metric("prebuilds_reconciler_passes_total", {"outcome": outcome}) or 0


async def test_a_frozen_database_ends_passes_by_their_deadline_fails_healthz_and_a_stop_is_bounded(
    factory: Factory, database_url: str, platform: asyncpg.Connection
) -> None:
    await factory.preset(desired=1)
    with TcpProxy.to(database_url) as proxy:
        daemon = DaemonProcess(
            proxy.dsn(database_url),
            interval=f"{INTERVAL_SECONDS:g}s",
            extra_environment={
                "RECONCILER_STATEMENT_TIMEOUT": "1s",
                "RECONCILER_PASS_TIMEOUT": f"{PASS_TIMEOUT_SECONDS:g}s",
                "RECONCILER_SHUTDOWN_GRACE": f"{GRACE_SECONDS:g}s",
            },
        )
        try:
            daemon.start().wait_ready()
            wait_for(lambda: passes(daemon, "success") >= 1, 30, "a first pass")
            assert daemon.get("/healthz")[0] == 200

            proxy.freeze()
            frozen_at = time.monotonic()

            # Passes end by their deadline (plus the cleanup's bounded steps), one after another.
            def deadline_passes() -> list[dict[str, object]]:
                return [
                    event
                    for event in daemon.events()
                    if event.get("event") == "reconcile.pass" and "PassDeadlineError" in str(event.get("error"))
                ]

            wait_for(lambda: len(deadline_passes()) >= 2, 30, "two passes ended by their deadline")
            for event in deadline_passes():
                duration = float(str(event["duration_seconds"]))
                assert duration < PASS_TIMEOUT_SECONDS + 2 * reconcile.CLEANUP_SECONDS + 1, event

            # /healthz turns 503 once no pass has ended by itself for the interval, the deadline and a margin.
            wait_for(lambda: daemon.get("/healthz")[0] == 503, 30, "/healthz to say the loop is stuck")
            stuck_after = time.monotonic() - frozen_at
            limit = INTERVAL_SECONDS + PASS_TIMEOUT_SECONDS + service.STUCK_MARGIN_SECONDS
            # Counted from the last pass that ended by itself, up to an interval before the freeze.
            assert limit - INTERVAL_SECONDS - 1 <= stuck_after < limit + 6, stuck_after
            status, body = daemon.get("/healthz")
            assert status == 503
            assert '"stuck"' in body
            # Readiness says so on its own cycle: a probe every 5 s, each bounded (acquire, query, release).
            wait_for(lambda: daemon.get("/readyz")[0] == 503, 30, "/readyz to say not ready")

            # SIGTERM while frozen: the process exits within the grace and a bounded margin.
            signalled = time.monotonic()
            daemon.signal()
            code = daemon.wait(timeout=GRACE_SECONDS + STOP_MARGIN_SECONDS + 30)
            took = time.monotonic() - signalled
            assert code == 0, daemon.output()
            assert took < GRACE_SECONDS + STOP_MARGIN_SECONDS, (took, daemon.output()[-3000:])
            assert not [event for event in daemon.events() if "Traceback" in str(event)]
        finally:
            proxy.thaw()
            daemon.stop()
