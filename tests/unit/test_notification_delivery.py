"""Pure parts of notification delivery: rendering, retry arithmetic, webhook signing, the webhook body."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry

from reconciler.config import ConfigError, load_settings
from reconciler.metrics import Metrics
from reconciler.notify.dispatcher import build_sinks, retry_delay
from reconciler.notify.message import NoticeRecipient, OutgoingMessage, Recipient, render
from reconciler.notify.webhook import encode_body, idempotency_key, signature

PAYLOAD = {"preset": "large", "template": "go", "failure_count": 3, "last_error_code": None}


def test_render_fills_fields_and_tolerates_missing_and_null_ones() -> None:
    assert render('"{preset}" of {template}: {failure_count} failures', PAYLOAD) == '"large" of go: 3 failures'
    assert render("code {last_error_code}", PAYLOAD) == "code none"
    assert render("{preset} in {organization}", PAYLOAD) == "large in {organization}"


@pytest.mark.parametrize("template", ["{preset", "oops }", "{0}", "{preset.missing_attribute}", "{preset[9]}"])
def test_a_malformed_template_renders_as_its_raw_text(template: str) -> None:
    assert render(template, PAYLOAD) == template


BASE = timedelta(seconds=30)
CEILING = timedelta(hours=1)


@pytest.mark.parametrize(
    ("attempt", "full_seconds"),
    [(1, 30), (2, 60), (3, 120), (4, 240), (7, 1920), (8, 3600), (20, 3600), (10_000, 3600)],
)
def test_retry_delay_doubles_up_to_the_ceiling(attempt: int, full_seconds: float) -> None:
    # jitter 1 keeps all of the delay, jitter 0 half of it.
    assert retry_delay(attempt, BASE, CEILING, 1.0) == timedelta(seconds=full_seconds)
    assert retry_delay(attempt, BASE, CEILING, 0.0) == timedelta(seconds=full_seconds / 2)
    assert retry_delay(attempt, BASE, CEILING, 0.5) == timedelta(seconds=full_seconds * 0.75)


def test_retry_delay_jitter_spreads_messages_that_failed_together() -> None:
    source = random.Random(7)
    delays = {retry_delay(3, BASE, CEILING, source.random()) for _ in range(50)}
    assert len(delays) > 40
    assert all(timedelta(seconds=60) <= delay <= timedelta(seconds=120) for delay in delays)


def test_signature_is_the_hex_hmac_sha256_of_the_exact_body() -> None:
    body = b'{"id":"x"}'
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert signature("s3cret", body) == f"sha256={expected}"
    assert signature("s3cret", body + b" ") != signature("s3cret", body)


def test_idempotency_key_is_stable_per_message_and_sink() -> None:
    message_id = uuid.uuid4()
    assert idempotency_key(message_id, "webhook:0") == idempotency_key(message_id, "webhook:0")
    assert idempotency_key(message_id, "webhook:0") != idempotency_key(message_id, "webhook:1")
    assert idempotency_key(message_id, "webhook:0") != idempotency_key(uuid.uuid4(), "webhook:0")


def test_webhook_body_is_the_same_on_every_attempt() -> None:
    message = OutgoingMessage(
        id=uuid.uuid4(),
        kind="hard_limited",
        notification_template="Prebuild Failure Limit Reached",
        title="t",
        body="b",
        payload={"preset": "large"},
        recipient=Recipient("ada", "ada@example.test", True),
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        attempt=1,
        notice_recipients=(NoticeRecipient("ada", "ada@example.test"), NoticeRecipient("bob", None)),
    )
    retried = dataclasses.replace(message, attempt=5)
    assert encode_body(message) == encode_body(retried)
    document = json.loads(encode_body(message))
    assert document["recipients"] == [
        {"username": "ada", "email": "ada@example.test"},
        {"username": "bob", "email": None},
    ]
    assert document["created_at"] == "2026-01-01T00:00:00+00:00"


def test_sinks_follow_the_configuration() -> None:
    settings = load_settings(
        {
            "RECONCILER_DATABASE_URL": "postgresql://reconciler@localhost/db",
            "RECONCILER_WEBHOOK_1_URL": "https://hooks.example.test/b",
            "RECONCILER_WEBHOOK_0_URL": "https://hooks.example.test/a?token=t0ken",
            "RECONCILER_SMTP_HOST": "mail.example.test",
            "RECONCILER_SMTP_FROM": "reconciler@example.test",
        }
    )
    sinks = build_sinks(settings)
    assert [sink.name for sink in sinks] == ["webhook:0", "webhook:1", "email"]
    assert all("t0ken" not in sink.description and "/a" not in sink.description for sink in sinks)
    assert sinks[2].description == "e-mail via mail.example.test:587 (starttls)"
    assert build_sinks(load_settings({"RECONCILER_DATABASE_URL": "postgresql://reconciler@localhost/db"})) == []


def test_a_lease_shorter_than_a_sink_timeout_is_refused() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(
            {
                "RECONCILER_DATABASE_URL": "postgresql://reconciler@localhost/db",
                "RECONCILER_WEBHOOK_0_URL": "https://hooks.example.test/a",
                "RECONCILER_WEBHOOK_0_TIMEOUT": "2m",
                "RECONCILER_NOTIFICATION_LEASE": "1m",
            }
        )
    assert raised.value.problems == [
        "RECONCILER_NOTIFICATION_LEASE: must exceed the longest sink timeout by at least 10s (at least 2m10s)"
    ]


def test_notification_metrics_are_registered_with_every_label_at_zero() -> None:
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    value = metrics.registry.get_sample_value
    for sink_kind in ("webhook", "email"):
        for outcome in ("success", "retry", "failed", "skipped"):
            labels = {"sink_kind": sink_kind, "outcome": outcome}
            assert value("prebuilds_reconciler_notifications_delivered_total", labels) == 0
    assert value("prebuilds_reconciler_notifications_pending") == 0
    assert value("prebuilds_reconciler_notifications_oldest_pending_age_seconds") == 0
    assert value("prebuilds_reconciler_notification_messages_enqueued_total") == 0
