"""The notification outbox: what a status change enqueues, in the same transaction as the change.

Exactly once per preset, episode and recipient is the database's job (`dedupe_key` is unique); this module
decides what a message says. Delivery is elsewhere (`dispatcher.py`), so a pass never waits on a sink.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar
from uuid import UUID

import structlog

from reconciler import db
from reconciler.plan import StatusChangeKind
from reconciler.snapshot import PrebuildStatus, Preset, PresetFailures, preset_log_fields
from reconciler.store import notifications, writes

logger = structlog.get_logger(__name__)

# Fixed ids: the contract's template, and the two of our own (migration 0002).
HARD_LIMITED_TEMPLATE_ID = UUID("414d9331-c1fc-4761-b40c-d1f4702279eb")
RECOVERED_TEMPLATE_ID = UUID("3612b174-7ca6-431d-8222-8b9dcc23a45b")
VALIDATION_FAILED_TEMPLATE_ID = UUID("9ab56367-21d6-438e-9e48-0cf94beca3d8")


# The notification template of each kind of status change.
TEMPLATE_IDS = {
    StatusChangeKind.HARD_LIMITED: HARD_LIMITED_TEMPLATE_ID,
    StatusChangeKind.VALIDATION_FAILED: VALIDATION_FAILED_TEMPLATE_ID,
    StatusChangeKind.RECOVERED: RECOVERED_TEMPLATE_ID,
}


@dataclass(frozen=True, slots=True)
class StatusNotice:
    """One preset's status change, to be told to the template's administrators."""

    kind: StatusChangeKind
    preset: Preset
    failure_episode: int
    failures: PresetFailures | None
    at: datetime

    def payload(self) -> dict[str, Any]:
        preset = self.preset
        failures = self.failures
        failed_ids = [str(workspace_id) for workspace_id in failures.failed_workspace_ids] if failures else []
        return {
            "kind": self.kind.value,
            "organization": preset.organization_name,
            "organization_id": str(preset.organization_id),
            "template": preset.template_name,
            "template_id": str(preset.template_id),
            "template_version": preset.template_version_name,
            "template_version_id": str(preset.template_version_id),
            "preset": preset.name,
            "preset_id": str(preset.id),
            "episode": self.failure_episode,
            "failure_count": failures.failure_streak if failures else 0,
            "last_error": failures.last_error if failures else None,
            "last_error_code": failures.last_error_code if failures else None,
            "last_failed_at": failures.last_failed_at.isoformat() if failures and failures.last_failed_at else None,
            "failed_workspace_ids": failed_ids,
            # The same, as text for the message templates.
            "failed_workspaces": ", ".join(failed_ids) or "-",
            "at": self.at.isoformat(),
        }


async def enqueue_notices(connection: db.Connection, notices: list[StatusNotice]) -> int:
    """Write the outbox rows of `notices` (inside the caller's transaction); returns rows written."""
    rows = await notifications.enqueue_notifications(
        connection,
        template_ids=[TEMPLATE_IDS[notice.kind] for notice in notices],
        preset_ids=[notice.preset.id for notice in notices],
        episodes=[notice.failure_episode for notice in notices],
        kinds=[notice.kind.value for notice in notices],
        payloads=[json.dumps(notice.payload()) for notice in notices],
    )
    addressed = {(row.kind, row.preset_id) for row in rows if row.user_id is not None}
    for notice in notices:
        if (notice.kind.value, notice.preset.id) not in addressed:
            # Recorded all the same, with no user: nothing is lost, and an operator can see it.
            logger.warning("notification.no_recipients", kind=notice.kind.value, **preset_log_fields(notice.preset))
    return len(rows)


# The breaker's notifications (migration 0005): one when an episode opens, one when it closes.
BREAKER_OPENED_TEMPLATE_ID = UUID("f045ca47-72a8-4ca6-9606-5a0120f177ed")
BREAKER_CLOSED_TEMPLATE_ID = UUID("23683045-4e77-431a-bb8b-208c0f5fe506")


async def enqueue_breaker_notice(
    connection: db.Connection,
    *,
    opened: bool,
    episode: int,
    reason: str,
    at: datetime,
    opened_at: datetime | None,
    open_until: datetime | None,
) -> int:
    """The breaker's notice of one episode (inside the caller's transaction); returns rows written."""
    kind = "breaker_opened" if opened else "breaker_closed"
    payload = {
        "kind": kind,
        "episode": episode,
        "reason": reason,
        "opened_at": opened_at.isoformat() if opened_at else None,
        "open_until": open_until.isoformat() if open_until else None,
        "at": at.isoformat(),
    }
    return await notifications.enqueue_breaker_notification(
        connection,
        template_id=BREAKER_OPENED_TEMPLATE_ID if opened else BREAKER_CLOSED_TEMPLATE_ID,
        kind=kind,
        episode=episode,
        payload=json.dumps(payload),
    )


async def reset_preset(
    connection: db.Connection, preset_id: UUID, *, actor: str, now: datetime
) -> PrebuildStatus | None:
    """An operator's reset to `normal`; None when there is no such preset."""
    previous = await writes.reset_preset(connection, preset_id, now)
    if previous is not None:
        logger.info("preset.reset", preset_id=str(preset_id), previous_status=previous.value, actor=actor)
    return previous


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A notification message as `reconciler notifications list` shows it."""

    ROW_HEADERS: ClassVar[tuple[str, ...]] = (
        "CREATED",
        "KIND",
        "STATUS",
        "RECIPIENT",
        "TEMPLATE",
        "PRESET",
        "ATTEMPTS",
        "LAST ERROR",
    )

    id: UUID
    kind: str
    status: str
    created_at: datetime
    sent_at: datetime | None
    attempts: int
    last_error: str | None
    payload: dict[str, Any]
    recipient: str | None
    recipient_email: str | None
    notification_template: str

    def as_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "kind": self.kind,
            "notification_template": self.notification_template,
            "status": self.status,
            "created_at": self.created_at.isoformat(),
            "sent_at": self.sent_at.isoformat() if self.sent_at else None,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "recipient": self.recipient,
            "recipient_email": self.recipient_email,
            "payload": self.payload,
        }

    def as_row(self) -> tuple[object, ...]:
        return (
            f"{self.created_at:%Y-%m-%d %H:%M:%S}",
            self.kind,
            self.status,
            self.recipient or "(nobody)",
            self.payload.get("template", "-"),
            self.payload.get("preset", "-"),
            self.attempts,
            (self.last_error or "-")[:60],
        )


async def list_messages(connection: db.Connection, *, limit: int = 50) -> list[OutboxMessage]:
    return [
        OutboxMessage(
            id=row.id,
            kind=row.kind,
            status=row.status,
            created_at=row.created_at,
            sent_at=row.sent_at,
            attempts=row.attempts,
            last_error=row.last_error,
            payload=row.payload,
            recipient=row.username,
            recipient_email=row.email,
            notification_template=row.template_name,
        )
        for row in await notifications.list_notifications(connection, limit)
    ]
