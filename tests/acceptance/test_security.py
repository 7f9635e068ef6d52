"""Secrets stay secret in everything a running daemon and the commands show; shutdown never loses a message.

The daemon runs as people run it (a subprocess) with a password in its DSN, an SMTP password and a
webhook secret, and a webhook URL carrying a token. Deliveries fail on purpose (a receiver answering 500,
an SMTP port nobody listens on), so that the error paths log as much as they ever will.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from reconciler import db
from reconciler.config import load_settings
from reconciler.demo.embedded_postgres import EmbeddedPostgres, free_port
from reconciler.logs import spellings
from tests.acceptance.daemon_process import DaemonProcess, cli_environment, http_get, run_cli
from tests.factories import Factory, minutes
from tests.integration.notification_helpers import HANG, WEBHOOK_PATH, WebhookReceiver, fail_prebuilds

DSN_PASSWORD = "dsn-Pa55word-s3cret"
SMTP_PASSWORD = "smtp-Pa55word-s3cret"
WEBHOOK_SECRET = "hook-signing-s3cret"
TOKEN = WEBHOOK_PATH.rsplit("/", 1)[-1]


def with_password(database_url: str) -> str:
    # The test servers trust local connections, so the password is carried along but never checked.
    parts = urlsplit(database_url)
    netloc = f"{parts.username}:{DSN_PASSWORD}@{parts.hostname}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def secret_environment(webhook_url: str) -> dict[str, str]:
    return {
        "RECONCILER_FAILURE_HARD_LIMIT": "3",
        "RECONCILER_LOG_LEVEL": "debug",
        "RECONCILER_SMTP_HOST": "127.0.0.1",
        "RECONCILER_SMTP_PORT": str(free_port()),
        "RECONCILER_SMTP_SECURITY": "none",
        "RECONCILER_SMTP_TIMEOUT": "2s",
        "RECONCILER_SMTP_FROM": "reconciler@example.test",
        "RECONCILER_SMTP_USERNAME": "reconciler",
        "RECONCILER_SMTP_PASSWORD": SMTP_PASSWORD,
        "RECONCILER_WEBHOOK_0_URL": webhook_url,
        "RECONCILER_WEBHOOK_0_SECRET": WEBHOOK_SECRET,
        "RECONCILER_WEBHOOK_0_TIMEOUT": "2s",
        "RECONCILER_NOTIFICATION_POLL_INTERVAL": "0.2s",
        "RECONCILER_NOTIFICATION_RETRY_BASE": "1s",
        "RECONCILER_NOTIFICATION_LEASE": "15s",
    }


async def until(condition: Callable[[], Awaitable[bool] | bool], what: str, seconds: float = 30) -> None:
    """Poll without blocking the loop: the webhook receiver lives in it."""
    try:
        async with asyncio.timeout(seconds):
            while True:
                outcome = condition()
                if await outcome if isinstance(outcome, Awaitable) else outcome:
                    return
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"timed out after {seconds}s waiting for {what}") from None


def ready(daemon: DaemonProcess) -> bool:
    assert daemon.process is not None
    assert daemon.process.poll() is None, f"the daemon exited with {daemon.process.returncode}:\n{daemon.output()}"
    return daemon.is_ready()


async def hard_limited_preset(factory: Factory) -> None:
    preset = await factory.preset(desired=1)
    await factory.user(username="admin", site_roles=["template-admin"])
    await fail_prebuilds(factory, preset, 3, at=factory.now - minutes(30))


async def test_no_secret_in_logs_metrics_status_plan_or_the_outbox(factory: Factory, database_url: str) -> None:
    await hard_limited_preset(factory)
    async with WebhookReceiver([500] * 50) as receiver:
        environment = secret_environment(receiver.url)
        daemon = DaemonProcess(with_password(database_url), extra_environment=environment)
        daemon.start()
        try:
            await until(lambda: ready(daemon), "the daemon to be ready")
            # Two failed webhook attempts: the failure and retry paths have logged.
            await until(lambda: len(receiver.requests) >= 2, "two webhook attempts")
            # Both sinks failed and said so (the error paths are the ones that quote what went wrong).
            await until(
                lambda: (
                    daemon.output().count("notification.delivery_failed") >= 2
                    and "notification.retry_scheduled" in daemon.output()
                ),
                "failed deliveries to be logged",
            )
            _, metrics = http_get(daemon.base_url + "/metrics")
            command_environment = cli_environment(with_password(database_url), **environment)
            outputs = {"daemon log": daemon.output(), "/metrics": metrics}
            for command in (("status",), ("status", "--json"), ("plan", "--json"), ("notifications", "list", "--json")):
                result = await asyncio.to_thread(run_cli, *command, environment=command_environment)
                assert result.returncode == 0, result.stderr
                outputs[" ".join(command)] = result.stdout + result.stderr
        finally:
            daemon.stop()
        outputs["daemon log"] = daemon.output()
        outputs["webhook requests"] = "\n".join(
            f"{request.headers} {request.body.decode()}" for request in receiver.requests
        )

    assert "notifications list --json" in outputs
    for where, text in outputs.items():
        for secret in (DSN_PASSWORD, SMTP_PASSWORD, WEBHOOK_SECRET, TOKEN):
            if where == "webhook requests" and secret == TOKEN:
                continue  # the receiver itself is given its URL, token included
            assert secret not in text, f"{secret!r} appears in the {where}"
    # The requests were signed with the secret (so it was used), which the body and headers never carry.
    assert all(request.headers.get("X-Reconciler-Signature", "").startswith("sha256=") for request in receiver.requests)


async def test_http_is_loopback_by_default_and_read_only(factory: Factory, database_url: str) -> None:
    assert load_settings({"RECONCILER_DATABASE_URL": database_url}).http_host == "127.0.0.1"
    del factory
    daemon = DaemonProcess(database_url).start()
    try:
        await until(lambda: ready(daemon), "the daemon to be ready")
        for path in ("/metrics", "/healthz", "/readyz", "/"):
            for method in ("POST", "PUT", "DELETE"):
                status = await asyncio.to_thread(request_status, daemon.base_url + path, method)
                assert status in (404, 405), (method, path, status)
    finally:
        daemon.stop()


def request_status(url: str, method: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=b"x", method=method), timeout=5) as response:  # noqa: S310 - loopback
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


async def test_sigterm_during_a_delivery_loses_no_message(
    factory: Factory, database_url: str, connection: asyncpg.Connection
) -> None:
    await hard_limited_preset(factory)
    async with WebhookReceiver([HANG]) as receiver:
        environment = {
            **secret_environment(receiver.url),
            "RECONCILER_SMTP_HOST": "",
            "RECONCILER_WEBHOOK_0_TIMEOUT": "30s",
            "RECONCILER_NOTIFICATION_LEASE": "45s",
            "RECONCILER_SHUTDOWN_GRACE": "5s",
        }
        del environment["RECONCILER_SMTP_HOST"]
        daemon = DaemonProcess(database_url, extra_environment=environment).start()
        try:
            await until(lambda: len(receiver.requests) == 1, "the webhook call to be in flight")
            assert daemon.process is not None
            daemon.process.send_signal(signal.SIGTERM)
            exit_code = await asyncio.to_thread(daemon.process.wait, 20)
        finally:
            daemon.stop()
    assert exit_code == 0, daemon.output()
    rows = await connection.fetch("select status, sent_at from notification_messages")
    # Nothing was recorded as sent (the receiver never answered), nothing was given up: it will be retried.
    assert rows
    assert all(row["status"] == "pending" and row["sent_at"] is None for row in rows), rows
    delivered = await connection.fetchval("select count(*) from notification_deliveries")
    assert delivered == 0


# A password the server checks, with characters that must be percent-encoded in the DSN: so that both its
# spelling in the DSN and its decoded spelling (what the driver sends, and holds in its frames) are sought.
OUTAGE_PASSWORD = "0utage/Pa55:w0rd-s3cret"
# Local connections of the superuser are trusted (to set up); the daemon's role must give its password.
PASSWORD_HBA = """\
host all postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 scram-sha-256
"""


def passes(daemon: DaemonProcess, outcome: str) -> int:
    return sum(event.get("event") == "reconcile.pass" and event.get("outcome") == outcome for event in daemon.events())


async def test_no_secret_in_anything_the_daemon_writes_through_a_database_outage() -> None:
    # Not in pytest's tmp_path: its root is set back to mode 0700 by any pytest session starting meanwhile,
    # and the server (run as another user under root) could then no longer reach its directory.
    with tempfile.TemporaryDirectory(prefix="reconciler-secret-outage-") as directory:
        await outage_with_a_password(Path(directory))


async def outage_with_a_password(directory: Path) -> None:
    server = EmbeddedPostgres(directory / "data")
    server.initialize()
    (server.data_directory / "pg_hba.conf").write_text(PASSWORD_HBA)
    await asyncio.to_thread(server.start)
    daemon: DaemonProcess | None = None
    try:
        admin = await asyncpg.connect(server.dsn())
        try:
            await admin.execute(f"create role outage login password '{OUTAGE_PASSWORD}'")
            await admin.execute("create database outage owner outage")
        finally:
            await admin.close()
        dsn = f"postgresql://outage:{quote(OUTAGE_PASSWORD, safe='')}@127.0.0.1:{server.port}/outage"
        connection = await db.connect(dsn)  # the password is checked: scram-sha-256
        try:
            await db.migrate(connection)
        finally:
            await connection.close()
        async with WebhookReceiver([500] * 1000) as receiver:
            daemon = DaemonProcess(dsn, extra_environment=secret_environment(receiver.url)).start()
            await until(lambda: ready(daemon), "the daemon to be ready")
            await asyncio.to_thread(server.stop, "immediate")
            await until(lambda: not daemon.is_ready(), "/readyz to turn 503")
            # The driver's pool logs its failed reconnections with a traceback whose frames held the DSN.
            await until(
                lambda: (
                    "Failed to restore the pool connection floor" in daemon.output() and passes(daemon, "failed") >= 2
                ),
                "the pool's reconnection failures and failed passes to be logged",
                seconds=60,
            )
            await asyncio.to_thread(server.start)
            await until(lambda: ready(daemon), "the daemon to be ready again", seconds=60)
            before = passes(daemon, "success")
            await until(lambda: passes(daemon, "success") > before, "a pass after the outage")
            daemon.signal(signal.SIGTERM)
            assert await asyncio.to_thread(daemon.wait, 30) == 0
            written = daemon.output()
    finally:
        if daemon is not None:
            daemon.stop()
        await asyncio.to_thread(server.stop, "immediate")
    assert "Traceback" in written or '"exception"' in written, "no traceback was logged: the test saw nothing"
    for secret in (OUTAGE_PASSWORD, quote(OUTAGE_PASSWORD, safe=""), SMTP_PASSWORD, WEBHOOK_SECRET, TOKEN):
        for spelling in spellings(secret):
            assert spelling not in written, f"{secret!r} ({spelling!r}) appears in what the daemon wrote"
