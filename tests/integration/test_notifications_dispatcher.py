"""The dispatcher: attempts and failure, leases across replicas and crashes, no sinks, logs, the daemon."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from reconciler import cli
from reconciler.logs import configure_logging
from reconciler.notify.dispatcher import Dispatcher
from reconciler.service import Daemon
from reconciler.store import notifications
from tests.factories import Factory, Preset, minutes
from tests.integration.notification_helpers import (
    HANG,
    WEBHOOK_PATH,
    WEBHOOK_QUERY,
    MetricsProbe,
    SmtpReceiver,
    WebhookReceiver,
    eventually,
    fail_prebuilds,
    open_pool,
    pass_at,
    settings_for,
)

pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")


async def limit_presets(
    factory: Factory, pool: asyncpg.Pool, database_url: str, count: int, *, now: datetime | None = None
) -> list[Preset]:
    presets = [await factory.preset(desired=1) for _ in range(count)]
    for preset in presets:
        await fail_prebuilds(factory, preset, 3)
    await pass_at(pool, settings_for(database_url), now or factory.now)
    return presets


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def rows_by_user(connection: asyncpg.Connection) -> dict[str, list[tuple[str, int]]]:
    rows = await connection.fetch(
        "select u.username, m.status, m.attempts from notification_messages m join users u on u.id = m.user_id "
        "order by m.created_at, m.id"
    )
    result: dict[str, list[tuple[str, int]]] = {}
    for row in rows:
        result.setdefault(row["username"], []).append((row["status"], row["attempts"]))
    return result


async def test_a_recipient_refused_for_good_fails_after_max_attempts_and_blocks_nobody(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    await factory.user(username="ada", email="ada@example.test", site_roles=["template-admin"])
    await factory.user(username="bob", email="bob@example.test", site_roles=["template-admin"])
    await limit_presets(factory, pool, database_url, 1)
    probe = MetricsProbe()
    start = datetime.now(UTC) + timedelta(seconds=1)

    async with SmtpReceiver(refuse={"bob@example.test": "451 4.2.1 mailbox unavailable"}) as receiver:
        settings = settings_for(
            database_url,
            RECONCILER_SMTP_HOST="127.0.0.1",
            RECONCILER_SMTP_PORT=str(receiver.port),
            RECONCILER_SMTP_FROM="reconciler@example.test",
            RECONCILER_SMTP_SECURITY="none",
            RECONCILER_NOTIFICATION_MAX_ATTEMPTS="3",
            RECONCILER_NOTIFICATION_RETRY_BASE="10s",
        )
        dispatcher = Dispatcher(pool, settings, probe.metrics, jitter=lambda: 0.0)
        with capture_logs() as logs:
            await dispatcher.dispatch_once(start)
            assert await rows_by_user(factory.connection) == {"ada": [("sent", 1)], "bob": [("pending", 1)]}
            await dispatcher.dispatch_once(start + timedelta(seconds=5))
            # A new notice while bob's first message is still retrying: it goes out at once.
            await limit_presets(factory, pool, database_url, 1, now=start)
            await dispatcher.dispatch_once(start + timedelta(seconds=15))
            assert await dispatcher.dispatch_once(start + timedelta(days=1)) == 1  # only bob's second message
        await dispatcher.close()

    assert await rows_by_user(factory.connection) == {
        "ada": [("sent", 1), ("sent", 1)],
        "bob": [("failed", 3), ("pending", 2)],
    }
    assert sorted(mail.recipients[0] for mail in receiver.mails) == ["ada@example.test", "ada@example.test"]
    # bob: two retries then the failure of the first message, two retries of the second.
    assert probe.delivered("retry", "email") == 4
    assert probe.delivered("failed", "email") == 1
    assert probe.finished("failed") == 1
    failures = [log for log in logs if log["event"] == "notification.failed"]
    assert len(failures) == 1
    assert failures[0]["log_level"] == "error"
    assert failures[0]["attempts"] == 3
    assert failures[0]["last_error"] == "email: recipient refused: SMTP 451"


async def test_a_webhook_down_for_good_fails_after_max_attempts(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    await factory.user(username="ada", site_roles=["template-admin"])
    await limit_presets(factory, pool, database_url, 1)
    probe = MetricsProbe()
    settings = settings_for(
        database_url,
        RECONCILER_WEBHOOK_0_URL=f"http://127.0.0.1:{closed_port()}/hook",
        RECONCILER_NOTIFICATION_MAX_ATTEMPTS="2",
    )
    dispatcher = Dispatcher(pool, settings, probe.metrics, jitter=lambda: 1.0)
    start = datetime.now(UTC) + timedelta(seconds=1)
    assert await dispatcher.dispatch_once(start) == 1
    assert await dispatcher.dispatch_once(start + timedelta(seconds=29)) == 0
    assert await dispatcher.dispatch_once(start + timedelta(seconds=30)) == 1
    assert await dispatcher.dispatch_once(start + timedelta(days=1)) == 0
    await dispatcher.close()

    row = await factory.connection.fetchrow("select status, attempts, last_error from notification_messages")
    assert row is not None
    assert (row["status"], row["attempts"]) == ("failed", 2)
    assert row["last_error"].startswith("webhook:0: cannot connect: ")
    assert (probe.delivered("retry"), probe.delivered("failed")) == (1, 1)


async def test_two_dispatchers_share_the_work_and_never_deliver_twice(
    factory: Factory, database_url: str, pool: asyncpg.Pool
) -> None:
    await factory.user(username="ada", site_roles=["template-admin"])
    await limit_presets(factory, pool, database_url, 12)
    now = datetime.now(UTC) + timedelta(seconds=1)
    handled: list[int] = [0, 0]

    async with WebhookReceiver(delay=0.05) as receiver:
        settings = settings_for(
            database_url, RECONCILER_WEBHOOK_0_URL=receiver.url, RECONCILER_NOTIFICATION_BATCH_SIZE="3"
        )
        replicas = [await open_pool(database_url) for _ in range(2)]
        dispatchers = [Dispatcher(replica, settings, MetricsProbe().metrics) for replica in replicas]

        async def drain(index: int) -> None:
            while count := await dispatchers[index].dispatch_once(now):
                handled[index] += count

        try:
            await asyncio.gather(drain(0), drain(1))
        finally:
            for dispatcher, replica in zip(dispatchers, replicas, strict=True):
                await dispatcher.close()
                await replica.close()

    assert sum(handled) == 12
    assert min(handled) > 0, handled
    assert len(receiver.requests) == 12
    assert len({request.headers["Idempotency-Key"] for request in receiver.requests}) == 12
    assert len({json.loads(request.body)["id"] for request in receiver.requests}) == 12
    statuses = await factory.connection.fetch("select status, attempts from notification_messages")
    assert {(row["status"], row["attempts"]) for row in statuses} == {("sent", 1)}


async def test_a_cancelled_delivery_keeps_its_lease_and_is_retried_once_it_runs_out(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    await factory.user(username="ada", site_roles=["template-admin"])
    await limit_presets(factory, pool, database_url, 1)
    start = datetime.now(UTC) + timedelta(seconds=1)

    async with WebhookReceiver() as healthy, WebhookReceiver([HANG]) as hanging:
        settings = settings_for(
            database_url,
            RECONCILER_WEBHOOK_0_URL=healthy.url,
            RECONCILER_WEBHOOK_1_URL=hanging.url,
            RECONCILER_WEBHOOK_1_TIMEOUT="30s",
        )
        first = Dispatcher(pool, settings, MetricsProbe().metrics)
        in_flight = asyncio.create_task(first.dispatch_once(start))

        async def half_delivered() -> bool:
            recorded = await factory.connection.fetchval("select count(*) from notification_deliveries")
            return bool(hanging.requests) and recorded == 1

        await eventually(half_delivered, "webhook 0 delivered and webhook 1 hanging")
        in_flight.cancel()  # a shutdown
        with pytest.raises(asyncio.CancelledError):
            await in_flight
        await first.close()

        row = await factory.connection.fetchrow("select * from notification_messages")
        assert row is not None
        assert (row["status"], row["attempts"], row["leased_until"]) == ("pending", 0, start + timedelta(minutes=2))

        second = Dispatcher(pool, settings, MetricsProbe().metrics)
        assert await second.dispatch_once(start + timedelta(minutes=1)) == 0  # still leased
        assert await second.dispatch_once(start + timedelta(minutes=2)) == 1  # the lease ran out
        await second.close()

    # Webhook 0 already had it (recorded before the cancellation): not sent again.
    assert len(healthy.requests) == 1
    assert [request.answered for request in hanging.requests] == [HANG, 200]
    row = await factory.connection.fetchrow("select status, attempts from notification_messages")
    assert row is not None
    assert (row["status"], row["attempts"]) == ("sent", 1)


async def test_a_dispatcher_whose_lease_was_taken_over_cannot_record_its_outcome(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    await factory.user(username="ada", site_roles=["template-admin"])
    await limit_presets(factory, pool, database_url, 1)
    start = datetime.now(UTC) + timedelta(seconds=1)
    stale_token = uuid.uuid4()
    # A dispatcher leased the message, then stalled (or died) past its lease.
    [stale] = await notifications.lease_notifications(
        factory.connection, now=start, leased_until=start + timedelta(minutes=2), lease_token=stale_token, limit=10
    )
    async with WebhookReceiver() as receiver:
        settings = settings_for(database_url, RECONCILER_WEBHOOK_0_URL=receiver.url)
        dispatcher = Dispatcher(pool, settings, MetricsProbe().metrics)
        assert await dispatcher.dispatch_once(start + timedelta(minutes=2, seconds=1)) == 1
        await dispatcher.close()

    kept = await notifications.finish_notification_attempt(
        factory.connection,
        message_id=stale.id,
        lease_token=stale_token,
        status="pending",
        next_attempt_at=start,
        last_error="late",
        sent_at=None,
        now=start,
    )
    assert not kept
    row = await factory.connection.fetchrow("select status, attempts, last_error from notification_messages")
    assert row is not None
    assert (row["status"], row["attempts"], row["last_error"]) == ("sent", 1, None)
    assert len(receiver.requests) == 1


@pytest.mark.usefixtures("restore_logging")
async def test_without_sinks_messages_stay_pending_and_are_listed(
    factory: Factory,
    pool: asyncpg.Pool,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await factory.user(username="ada", site_roles=["template-admin"])
    await factory.user(username="bob", site_roles=["template-admin"])
    await limit_presets(factory, pool, database_url, 1)
    created_at = await factory.connection.fetchval("select min(created_at) from notification_messages")
    probe = MetricsProbe()
    dispatcher = Dispatcher(pool, settings_for(database_url), probe.metrics)

    for hours in (0, 1, 24 * 30):
        assert await dispatcher.dispatch_once(created_at + timedelta(hours=hours)) == 0
    stop = asyncio.Event()
    with capture_logs() as logs:
        running = asyncio.create_task(dispatcher.run(stop))
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(running, 10)

    rows = await factory.connection.fetch("select status, attempts, leased_until from notification_messages")
    assert [(row["status"], row["attempts"], row["leased_until"]) for row in rows] == [("pending", 0, None)] * 2
    assert probe.value("prebuilds_reconciler_notifications_pending") == 2
    assert probe.value("prebuilds_reconciler_notification_sinks", sink_kind="webhook") == 0
    assert probe.value("prebuilds_reconciler_notification_sinks", sink_kind="email") == 0
    assert [log["event"] for log in logs] == ["notification.no_sinks"]

    monkeypatch.setenv("RECONCILER_DATABASE_URL", database_url)
    capsys.readouterr()  # the pass's log lines so far
    exit_code = await asyncio.to_thread(cli.main, ["notifications", "list", "--json"])
    captured = capsys.readouterr()
    assert exit_code == 0, captured.err
    listed = json.loads(captured.out)
    assert sorted(entry["recipient"] for entry in listed) == ["ada", "bob"]
    assert {(entry["status"], entry["kind"], entry["attempts"]) for entry in listed} == {("pending", "hard_limited", 0)}


async def test_oldest_pending_age_is_measured_from_now(factory: Factory, pool: asyncpg.Pool, database_url: str) -> None:
    await limit_presets(factory, pool, database_url, 1)
    created_at = await factory.connection.fetchval("select created_at from notification_messages")
    probe = MetricsProbe()
    dispatcher = Dispatcher(pool, settings_for(database_url), probe.metrics)
    await dispatcher.dispatch_once(created_at + timedelta(minutes=90))
    assert probe.value("prebuilds_reconciler_notifications_oldest_pending_age_seconds") == 5400
    assert probe.value("prebuilds_reconciler_notifications_pending") == 1


@pytest.mark.usefixtures("restore_logging")
async def test_secrets_never_reach_logs_or_rows(factory: Factory, pool: asyncpg.Pool, database_url: str) -> None:
    await factory.user(username="ada", email="ada@example.test", site_roles=["template-admin"])
    await limit_presets(factory, pool, database_url, 1)
    secrets = ["webhook-s3cret-value", "smtp-pa55word-value", WEBHOOK_PATH, WEBHOOK_QUERY, "/dead/T0KEN-2"]
    stream = io.StringIO()
    configure_logging("json", "debug", stream)

    async with WebhookReceiver([500]) as receiver, SmtpReceiver(credentials=("mailer", "other")) as mail_server:
        settings = settings_for(
            database_url,
            RECONCILER_WEBHOOK_0_URL=receiver.url,
            RECONCILER_WEBHOOK_0_SECRET="webhook-s3cret-value",
            RECONCILER_WEBHOOK_1_URL=f"http://127.0.0.1:{closed_port()}/dead/T0KEN-2?x=1",
            RECONCILER_SMTP_HOST="127.0.0.1",
            RECONCILER_SMTP_PORT=str(mail_server.port),
            RECONCILER_SMTP_FROM="reconciler@example.test",
            RECONCILER_SMTP_SECURITY="none",
            RECONCILER_SMTP_USERNAME="mailer",
            RECONCILER_SMTP_PASSWORD="smtp-pa55word-value",
        )
        dispatcher = Dispatcher(pool, settings, MetricsProbe().metrics)
        stop = asyncio.Event()
        running = asyncio.create_task(dispatcher.run(stop))

        async def attempted() -> bool:
            return bool(await factory.connection.fetchval("select attempts from notification_messages"))

        await eventually(attempted, "one delivery attempt")
        stop.set()
        await asyncio.wait_for(running, 10)

    output = stream.getvalue()
    records = [json.loads(line) for line in output.splitlines()]
    events = [record["event"] for record in records]
    assert "notification.dispatcher_started" in events
    assert events.count("notification.delivery_failed") == 3
    # Sinks are named by scheme, host and port only.
    assert f"webhook 0 (http://127.0.0.1:{receiver.port}/…)" in {record.get("sink") for record in records}
    last_error = await factory.connection.fetchval("select last_error from notification_messages")
    assert "webhook:0: HTTP 500" in last_error
    assert "email: SMTP 535" in last_error
    for secret in secrets:
        assert secret not in output
        assert secret not in last_error


async def test_the_daemon_mails_each_admin_and_calls_the_webhook_once_then_tells_the_recovery(
    factory: Factory, database_url: str
) -> None:
    """The issue's "done when": three failures, one e-mail per admin and one webhook call; then recovery."""
    organization = await factory.organization()
    await factory.user(username="ada", email="ada@example.test", site_roles=["template-admin"])
    await factory.user(
        username="grace",
        email="grace@example.test",
        organization=organization,
        organization_roles=["organization-template-admin"],
    )
    preset = await factory.preset(desired=1, template=await factory.template(organization))
    await fail_prebuilds(factory, preset, 3)

    async with SmtpReceiver() as mail_server, WebhookReceiver() as webhook:
        settings = settings_for(
            database_url,
            RECONCILER_HTTP_ADDRESS="127.0.0.1:0",
            RECONCILER_RECONCILIATION_INTERVAL="1s",
            RECONCILER_NOTIFICATION_POLL_INTERVAL="100ms",
            RECONCILER_WEBHOOK_0_URL=webhook.url,
            RECONCILER_WEBHOOK_0_SECRET="s3cret",
            RECONCILER_SMTP_HOST="127.0.0.1",
            RECONCILER_SMTP_PORT=str(mail_server.port),
            RECONCILER_SMTP_FROM="reconciler@example.test",
            RECONCILER_SMTP_SECURITY="none",
        )
        registry = CollectorRegistry()
        daemon = Daemon(settings, registry=registry)
        await daemon.start()
        try:

            async def told(mails: int, calls: int) -> bool:
                return len(mail_server.mails) >= mails and len(webhook.requests) >= calls

            await eventually(lambda: told(2, 1), "two mails and a webhook call")
            # A few more passes and polls: still one of each.
            await asyncio.sleep(1.5)
            assert sorted(mail.recipients[0] for mail in mail_server.mails) == [
                "ada@example.test",
                "grace@example.test",
            ]
            assert len(webhook.requests) == 1
            assert json.loads(webhook.requests[0].body)["kind"] == "hard_limited"

            await factory.prebuild(preset, ago=minutes(1))
            await eventually(lambda: told(4, 2), "the recovery told")
            await asyncio.sleep(1.5)
        finally:
            await daemon.stop()

    recovered = mail_server.mails[2:]
    assert len(mail_server.mails) == 4
    assert all("recovered" in mail.message["Subject"] for mail in recovered)
    assert [json.loads(request.body)["kind"] for request in webhook.requests] == ["hard_limited", "recovered"]
    value = registry.get_sample_value
    assert (
        value("prebuilds_reconciler_notifications_delivered_total", {"sink_kind": "email", "outcome": "success"}) == 4
    )
    assert (
        value("prebuilds_reconciler_notifications_delivered_total", {"sink_kind": "webhook", "outcome": "success"}) == 2
    )
    assert value("prebuilds_reconciler_notification_messages_enqueued_total") == 4
    assert value("prebuilds_reconciler_notifications_pending") == 0


async def test_a_database_outage_logs_once_and_delivery_resumes_after_it(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    await factory.user(username="ada", site_roles=["template-admin"])
    await limit_presets(factory, pool, database_url, 1)
    probe = MetricsProbe()

    async def errors(at_least: int) -> bool:
        return (probe.value("prebuilds_reconciler_notification_dispatch_errors_total") or 0) >= at_least

    async with WebhookReceiver() as receiver:
        settings = settings_for(
            database_url, RECONCILER_WEBHOOK_0_URL=receiver.url, RECONCILER_NOTIFICATION_POLL_INTERVAL="100ms"
        )
        dispatcher = Dispatcher(pool, settings, probe.metrics)
        # The outbox is gone for a while (a botched manual change, a restore in progress).
        await factory.connection.execute("alter table notification_messages rename to notification_messages_away")
        stop = asyncio.Event()
        with capture_logs() as logs:
            running = asyncio.create_task(dispatcher.run(stop))
            await eventually(lambda: errors(3), "three failed polls")
            await factory.connection.execute("alter table notification_messages_away rename to notification_messages")

            async def delivered() -> bool:
                return len(receiver.requests) == 1

            await eventually(delivered, "the delivery after the outage")
            stop.set()
            await asyncio.wait_for(running, 10)

    events = [log["event"] for log in logs]
    assert events.count("notification.poll_failed") == 1
    assert events.count("notification.poll_recovered") == 1
    assert events.index("notification.poll_failed") < events.index("notification.poll_recovered")
