"""Webhook delivery against a real aiohttp server on 127.0.0.1: body, signature, idempotency, retries."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from reconciler.notify.dispatcher import Dispatcher
from tests.factories import Factory, Preset
from tests.integration.notification_helpers import (
    HANG,
    WEBHOOK_PATH,
    WEBHOOK_QUERY,
    MetricsProbe,
    WebhookReceiver,
    fail_prebuilds,
    pass_at,
    settings_for,
)

SECRET = "webhook-s3cret"


async def hard_limited(
    factory: Factory, pool: asyncpg.Pool, database_url: str, *, admins: int = 1, presets: int = 1
) -> list[Preset]:
    """Presets at the hard limit, their messages enqueued by a real pass (one per preset and admin)."""
    for index in range(admins):
        await factory.user(username=f"admin-{index}", site_roles=["template-admin"])
    limited = []
    for index in range(presets):
        preset = await factory.preset(desired=1, name=f"large-{index}")
        await fail_prebuilds(factory, preset, 3)
        limited.append(preset)
    await pass_at(pool, settings_for(database_url), factory.now)
    return limited


async def message_row(connection: asyncpg.Connection) -> asyncpg.Record:
    row = await connection.fetchrow("select * from notification_messages")
    assert row is not None
    return row


async def test_a_signed_json_body_with_an_idempotency_key(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    [preset] = await hard_limited(factory, pool, database_url)
    probe = MetricsProbe()
    now = datetime.now(UTC) + timedelta(seconds=1)
    async with WebhookReceiver() as receiver:
        settings = settings_for(database_url, RECONCILER_WEBHOOK_0_URL=receiver.url, RECONCILER_WEBHOOK_0_SECRET=SECRET)
        dispatcher = Dispatcher(pool, settings, probe.metrics)
        try:
            assert await dispatcher.dispatch_once(now) == 1
            assert await dispatcher.dispatch_once(now + timedelta(hours=1)) == 0
        finally:
            await dispatcher.close()

    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    assert (request.path, request.query) == (WEBHOOK_PATH, WEBHOOK_QUERY)
    expected_signature = hmac.new(SECRET.encode(), request.body, hashlib.sha256).hexdigest()
    assert request.headers["X-Reconciler-Signature"] == f"sha256={expected_signature}"
    assert request.headers["Content-Type"] == "application/json"
    row = await message_row(factory.connection)
    assert request.headers["Idempotency-Key"] == str(uuid.uuid5(row["id"], "webhook:0"))
    document = json.loads(request.body)
    assert document["id"] == str(row["id"])
    assert document["kind"] == "hard_limited"
    assert document["notification_template"] == "Prebuild Failure Limit Reached"
    assert document["title"] == f'Prebuilds of preset "large-0" ({preset.template.name}) stopped: failure limit reached'
    assert f"reconciler presets reset {preset.id}" in document["body"]
    assert "The last 3 prebuilds" in document["body"]
    assert document["payload"]["preset_id"] == str(preset.id)
    assert document["recipients"] == [{"username": "admin-0", "email": "admin-0@example.test"}]
    assert datetime.fromisoformat(document["created_at"]) == row["created_at"]

    assert (row["status"], row["attempts"], row["sent_at"], row["leased_until"]) == ("sent", 1, now, None)
    sinks = await factory.connection.fetch("select sink from notification_deliveries where message_id = $1", row["id"])
    assert [sink["sink"] for sink in sinks] == ["webhook:0"]
    assert probe.delivered("success") == 1
    assert probe.finished("sent") == 1
    assert probe.value("prebuilds_reconciler_notifications_pending") == 0


async def test_a_receiver_failing_twice_gets_the_message_once_after_success(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    await hard_limited(factory, pool, database_url)
    probe = MetricsProbe()
    start = datetime.now(UTC) + timedelta(seconds=1)
    async with WebhookReceiver([503, 500]) as receiver:
        settings = settings_for(
            database_url,
            RECONCILER_WEBHOOK_0_URL=receiver.url,
            RECONCILER_WEBHOOK_0_SECRET=SECRET,
            RECONCILER_NOTIFICATION_RETRY_BASE="10s",
            RECONCILER_NOTIFICATION_MAX_ATTEMPTS="5",
        )
        # Jitter 0: each wait is exactly half of base x 2^(attempt - 1): 5s, then 10s.
        dispatcher = Dispatcher(pool, settings, probe.metrics, jitter=lambda: 0.0)
        try:
            assert await dispatcher.dispatch_once(start) == 1
            row = await message_row(factory.connection)
            assert (row["status"], row["attempts"], row["last_error"]) == ("pending", 1, "webhook:0: HTTP 503")
            assert row["next_attempt_at"] == start + timedelta(seconds=5)
            assert row["leased_until"] is None

            assert await dispatcher.dispatch_once(start + timedelta(seconds=4.9)) == 0
            assert await dispatcher.dispatch_once(start + timedelta(seconds=5)) == 1
            row = await message_row(factory.connection)
            assert (row["attempts"], row["last_error"]) == (2, "webhook:0: HTTP 500")
            assert row["next_attempt_at"] == start + timedelta(seconds=15)

            assert await dispatcher.dispatch_once(start + timedelta(seconds=15)) == 1
            assert await dispatcher.dispatch_once(start + timedelta(days=1)) == 0
        finally:
            await dispatcher.close()

    row = await message_row(factory.connection)
    assert (row["status"], row["attempts"], row["last_error"]) == ("sent", 3, None)
    assert [request.answered for request in receiver.requests] == [503, 500, 200]
    assert len(receiver.accepted()) == 1
    # The same message each time: same key, same body, same signature, so a receiver can deduplicate.
    assert len({request.headers["Idempotency-Key"] for request in receiver.requests}) == 1
    assert len({request.body for request in receiver.requests}) == 1
    assert len({request.headers["X-Reconciler-Signature"] for request in receiver.requests}) == 1
    assert [request.headers["X-Reconciler-Attempt"] for request in receiver.requests] == ["1", "2", "3"]
    assert (probe.delivered("retry"), probe.delivered("success"), probe.delivered("failed")) == (2, 1, 0)


async def test_a_retry_only_goes_to_the_sinks_that_lack_the_message(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    await hard_limited(factory, pool, database_url)
    probe = MetricsProbe()
    start = datetime.now(UTC) + timedelta(seconds=1)
    async with WebhookReceiver() as healthy, WebhookReceiver([502]) as flaky:
        settings = settings_for(
            database_url,
            RECONCILER_WEBHOOK_0_URL=healthy.url,
            RECONCILER_WEBHOOK_0_SECRET=SECRET,
            RECONCILER_WEBHOOK_1_URL=flaky.url,
        )
        dispatcher = Dispatcher(pool, settings, probe.metrics, jitter=lambda: 1.0)
        try:
            await dispatcher.dispatch_once(start)
            row = await message_row(factory.connection)
            assert (row["status"], row["last_error"]) == ("pending", "webhook:1: HTTP 502")
            assert row["next_attempt_at"] == start + timedelta(seconds=30)
            await dispatcher.dispatch_once(start + timedelta(seconds=30))
        finally:
            await dispatcher.close()

    assert len(healthy.requests) == 1
    assert [request.answered for request in flaky.requests] == [502, 200]
    # Without a secret there is no signature; the key differs per sink.
    assert "X-Reconciler-Signature" not in flaky.requests[0].headers
    assert healthy.requests[0].headers["Idempotency-Key"] != flaky.requests[0].headers["Idempotency-Key"]
    row = await message_row(factory.connection)
    assert (row["status"], row["attempts"]) == ("sent", 2)
    sinks = await factory.connection.fetch("select sink from notification_deliveries order by sink")
    assert [sink["sink"] for sink in sinks] == ["webhook:0", "webhook:1"]


async def test_a_hanging_webhook_times_out_without_blocking(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    await hard_limited(factory, pool, database_url, presets=3)
    probe = MetricsProbe()
    async with WebhookReceiver([HANG, HANG, HANG]) as hanging, WebhookReceiver() as healthy:
        settings = settings_for(
            database_url,
            RECONCILER_WEBHOOK_0_URL=hanging.url,
            RECONCILER_WEBHOOK_0_TIMEOUT="1s",
            RECONCILER_WEBHOOK_1_URL=healthy.url,
        )
        dispatcher = Dispatcher(pool, settings, probe.metrics)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        started = time.monotonic()
        try:
            assert await dispatcher.dispatch_once(datetime.now(UTC) + timedelta(seconds=1)) == 3
        finally:
            elapsed = time.monotonic() - started
            ticking.cancel()
            await dispatcher.close()

    # The three messages waited on the hanging receiver together, for one timeout, not three.
    assert 1.0 <= elapsed < 2.5
    # The event loop kept running meanwhile (about 20 ticks in a second).
    assert ticks >= 10
    assert len(healthy.requests) == 3
    rows = await factory.connection.fetch("select status, last_error from notification_messages")
    assert {(row["status"], row["last_error"]) for row in rows} == {("pending", "webhook:0: no answer within 1s")}
    assert probe.delivered("retry") == 3
    assert probe.delivered("success") == 3


async def test_a_webhook_is_told_once_per_notice_with_every_recipient(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    """Three administrators get a message each (for e-mail); the webhook, a channel, gets one call."""
    await hard_limited(factory, pool, database_url, admins=3)
    probe = MetricsProbe()
    async with WebhookReceiver() as receiver:
        settings = settings_for(database_url, RECONCILER_WEBHOOK_0_URL=receiver.url)
        dispatcher = Dispatcher(pool, settings, probe.metrics)
        try:
            assert await dispatcher.dispatch_once(datetime.now(UTC) + timedelta(seconds=1)) == 3
        finally:
            await dispatcher.close()

    assert len(receiver.requests) == 1
    document = json.loads(receiver.requests[0].body)
    assert [recipient["username"] for recipient in document["recipients"]] == ["admin-0", "admin-1", "admin-2"]
    rows = await factory.connection.fetch("select id, status, last_error from notification_messages order by id")
    # The lowest id carries the notice; with no e-mail configured the others have nothing left to do.
    assert document["id"] == str(rows[0]["id"])
    assert [(row["status"], row["last_error"]) for row in rows] == [
        ("sent", None),
        ("recorded", "webhook:0: told once per notice, by another message of it"),
        ("recorded", "webhook:0: told once per notice, by another message of it"),
    ]
    assert (probe.delivered("success"), probe.delivered("skipped")) == (1, 2)
