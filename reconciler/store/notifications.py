"""The notification outbox (`sql/queries/notifications.sql`): enqueue, list, lease, record, finish."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from reconciler import db


def _query(name: str) -> str:
    return db.queries_in("notifications.sql")[name]


@dataclass(frozen=True, slots=True)
class EnqueuedNotification:
    id: UUID
    user_id: UUID | None
    kind: str
    preset_id: UUID


async def enqueue_notifications(
    connection: db.Connection,
    *,
    template_ids: Sequence[UUID],
    preset_ids: Sequence[UUID],
    episodes: Sequence[int],
    kinds: Sequence[str],
    payloads: Sequence[str],
) -> list[EnqueuedNotification]:
    rows = await connection.fetch(
        _query("enqueue_notifications"),
        list(template_ids),
        list(preset_ids),
        list(episodes),
        list(kinds),
        list(payloads),
    )
    return [EnqueuedNotification(row["id"], row["user_id"], row["kind"], row["preset_id"]) for row in rows]


async def enqueue_breaker_notification(
    connection: db.Connection, *, template_id: UUID, kind: str, episode: int, payload: str
) -> int:
    """The breaker's notification of one episode, to every site template administrator; rows written."""
    rows = await connection.fetch(_query("enqueue_breaker_notification"), template_id, kind, episode, payload)
    return len(rows)


@dataclass(frozen=True, slots=True)
class NotificationRow:
    id: UUID
    kind: str
    status: str
    created_at: datetime
    sent_at: datetime | None
    attempts: int
    last_error: str | None
    payload: dict[str, Any]
    preset_id: UUID | None
    episode: int
    username: str | None
    email: str | None
    template_name: str


async def list_notifications(connection: db.Connection, limit: int) -> list[NotificationRow]:
    rows = await connection.fetch(_query("list_notifications"), limit)
    return [NotificationRow(**dict(row)) for row in rows]


@dataclass(frozen=True, slots=True)
class LeasedNotification:
    """A pending message leased for delivery, with what rendering and the sinks need."""

    id: UUID
    kind: str
    payload: dict[str, Any]
    attempts: int
    created_at: datetime
    preset_id: UUID | None
    user_id: UUID | None
    username: str | None
    email: str | None
    user_active: bool
    template_name: str
    title_template: str
    body_template: str
    delivered_sinks: tuple[str, ...]
    # Webhooks are told once per notice (kind, preset, episode): by this message when True.
    carries_notice: bool
    # Every recipient of the notice: {"username": ..., "email": ... or None}.
    notice_recipients: tuple[dict[str, str | None], ...]


async def lease_notifications(
    connection: db.Connection, *, now: datetime, leased_until: datetime, lease_token: UUID, limit: int
) -> list[LeasedNotification]:
    rows = await connection.fetch(_query("lease_notifications"), now, leased_until, lease_token, limit)
    return [
        LeasedNotification(
            id=row["id"],
            kind=row["kind"],
            payload=row["payload"],
            attempts=row["attempts"],
            created_at=row["created_at"],
            preset_id=row["preset_id"],
            user_id=row["user_id"],
            username=row["username"],
            email=row["email"],
            user_active=row["user_active"],
            template_name=row["template_name"],
            title_template=row["title_template"],
            body_template=row["body_template"],
            delivered_sinks=tuple(row["delivered_sinks"]),
            carries_notice=row["carries_notice"],
            notice_recipients=tuple(row["notice_recipients"]),
        )
        for row in rows
    ]


async def record_notification_delivery(
    connection: db.Connection, message_id: UUID, sink: str, delivered_at: datetime
) -> None:
    await connection.execute(_query("record_notification_delivery"), message_id, sink, delivered_at)


async def finish_notification_attempt(
    connection: db.Connection,
    *,
    message_id: UUID,
    lease_token: UUID,
    status: str,
    next_attempt_at: datetime | None,
    last_error: str | None,
    sent_at: datetime | None,
    now: datetime,
) -> bool:
    """Record one attempt's outcome; False when the lease was lost (another dispatcher took over)."""
    row = await connection.fetchval(
        _query("finish_notification_attempt"),
        message_id,
        lease_token,
        status,
        next_attempt_at,
        last_error,
        sent_at,
        now,
    )
    return row is not None


@dataclass(frozen=True, slots=True)
class NotificationBacklog:
    pending: int
    oldest_created_at: datetime | None


async def read_notification_backlog(connection: db.Connection) -> NotificationBacklog:
    row = await connection.fetchrow(_query("notification_backlog"))
    assert row is not None
    return NotificationBacklog(pending=row["pending"], oldest_created_at=row["oldest_created_at"])
