"""Metrics of notification delivery, on the daemon's injected registry.

Deliveries are counted per sink attempt (`sink_kind`, `outcome`); messages are counted once, when they
reach a final status. The backlog gauges come from the database, so every replica reports the same
shared queue, whichever of them delivers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SINK_KINDS = ("webhook", "email")
# success: the sink has it; retry: failed, will be tried again; failed: failed for good (attempts
# exhausted or refused permanently); skipped: nothing to deliver to (no recipient, no e-mail address).
DELIVERY_OUTCOMES = ("success", "retry", "failed", "skipped")
MESSAGE_KINDS = ("hard_limited", "validation_failed", "recovered")
FINAL_STATUSES = ("sent", "failed", "recorded")
# Webhook calls take milliseconds; SMTP sessions up to seconds; timeouts are counted in the last bucket.
DELIVERY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class NotificationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.deliveries = Counter(
            "prebuilds_reconciler_notifications_delivered",
            "Delivery attempts of notification messages, by sink kind and outcome.",
            ["sink_kind", "outcome"],
            registry=registry,
        )
        for sink_kind in SINK_KINDS:
            for outcome in DELIVERY_OUTCOMES:
                self.deliveries.labels(sink_kind, outcome)
        self.messages_finished = Counter(
            "prebuilds_reconciler_notification_messages_finished",
            "Notification messages that reached a final status (sent, failed, recorded), by message kind.",
            ["kind", "status"],
            registry=registry,
        )
        for kind in MESSAGE_KINDS:
            for status in FINAL_STATUSES:
                self.messages_finished.labels(kind, status)
        self.enqueued = Counter(
            "prebuilds_reconciler_notification_messages_enqueued",
            "Notification messages written to the outbox by this process's passes.",
            registry=registry,
        )
        self.pending = Gauge(
            "prebuilds_reconciler_notifications_pending",
            "Notification messages waiting for delivery (all replicas), as of the dispatcher's last poll.",
            registry=registry,
        )
        self.oldest_pending_age = Gauge(
            "prebuilds_reconciler_notifications_oldest_pending_age_seconds",
            "Age of the oldest pending notification message; 0 when none is pending.",
            registry=registry,
        )
        self.sinks = Gauge(
            "prebuilds_reconciler_notification_sinks",
            "Configured notification sinks, by kind (none: messages stay pending).",
            ["sink_kind"],
            registry=registry,
        )
        for sink_kind in SINK_KINDS:
            self.sinks.labels(sink_kind)
        self.delivery_duration = Histogram(
            "prebuilds_reconciler_notification_delivery_duration_seconds",
            "Duration of one delivery attempt to one sink.",
            ["sink_kind"],
            buckets=DELIVERY_BUCKETS,
            registry=registry,
        )
        self.dispatch_errors = Counter(
            "prebuilds_reconciler_notification_dispatch_errors",
            "Dispatcher polls that failed (database unreachable, or a bug).",
            registry=registry,
        )
        self.last_poll = Gauge(
            "prebuilds_reconciler_notification_last_poll_timestamp_seconds",
            "Unix time of the dispatcher's last successful poll of the outbox.",
            registry=registry,
        )
