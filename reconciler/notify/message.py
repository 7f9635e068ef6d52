"""What a sink delivers (a rendered message) and what one delivery attempt can come to."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from reconciler.store.notifications import LeasedNotification

# How a payload value that is null reads in a title or body.
NULL_TEXT = "none"
# Sinks report reasons of a few words; anything longer is cut so that `last_error` stays readable.
MAX_REASON_LENGTH = 200


class DeliveryOutcome(enum.StrEnum):
    SUCCESS = "success"
    # Failed this time (timeout, refused connection, non-2xx, 4xx SMTP reply): try again later.
    RETRY = "retry"
    # This sink has nobody to deliver to (no recipient, no e-mail address): not a failure, never retried.
    SKIPPED = "skipped"
    # Refused for good (a 5xx SMTP reply to the recipient): retrying would not help.
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    outcome: DeliveryOutcome
    reason: str = ""

    @classmethod
    def success(cls) -> DeliveryResult:
        return cls(DeliveryOutcome.SUCCESS)

    @classmethod
    def retry(cls, reason: str) -> DeliveryResult:
        return cls(DeliveryOutcome.RETRY, reason[:MAX_REASON_LENGTH])

    @classmethod
    def skipped(cls, reason: str) -> DeliveryResult:
        return cls(DeliveryOutcome.SKIPPED, reason[:MAX_REASON_LENGTH])

    @classmethod
    def rejected(cls, reason: str) -> DeliveryResult:
        return cls(DeliveryOutcome.REJECTED, reason[:MAX_REASON_LENGTH])


@dataclass(frozen=True, slots=True)
class Recipient:
    username: str
    email: str | None
    # Suspended or deleted since the message was enqueued: no longer told.
    active: bool


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    id: UUID
    kind: str
    notification_template: str
    title: str
    body: str
    payload: Mapping[str, Any]
    recipient: Recipient | None
    created_at: datetime
    # 1 for the first attempt.
    attempt: int
    # A notice (kind, preset, episode) has a message per recipient; channel-like sinks (webhooks) are told
    # once per notice, by the message that carries it, with every recipient listed.
    carries_notice: bool = True
    notice_recipients: tuple[NoticeRecipient, ...] = ()

    def as_json(self) -> dict[str, Any]:
        """The webhook body. Identical on every attempt (no attempt number), as idempotency keys expect."""
        return {
            "id": str(self.id),
            "kind": self.kind,
            "notification_template": self.notification_template,
            "title": self.title,
            "body": self.body,
            "payload": dict(self.payload),
            # Empty when the template had nobody to tell.
            "recipients": [
                {"username": recipient.username, "email": recipient.email} for recipient in self.notice_recipients
            ],
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class NoticeRecipient:
    username: str
    email: str | None


class Sink(Protocol):
    """A place messages are delivered to. Implementations never raise for a failed delivery."""

    @property
    def name(self) -> str:
        """Stable identity (`webhook:0`, `email`), recorded per delivered message."""
        ...

    @property
    def kind(self) -> str: ...

    @property
    def description(self) -> str:
        """For logs: never a secret, never a URL's path or query."""
        ...

    async def deliver(self, message: OutgoingMessage) -> DeliveryResult: ...

    async def close(self) -> None: ...


class _TolerantValues(dict[str, object]):
    def __missing__(self, key: str) -> str:
        # A template naming a field the payload lacks shows the placeholder rather than failing.
        return "{" + key + "}"


def render(template: str, payload: Mapping[str, Any]) -> str:
    """`template` formatted with the payload; missing keys stay as placeholders, nulls read `none`.

    Templates are rows an operator may edit: a malformed one (a stray brace) renders as its raw text
    instead of stopping delivery.
    """
    values = _TolerantValues({key: NULL_TEXT if value is None else value for key, value in payload.items()})
    try:
        return template.format_map(values)
    except (ValueError, AttributeError, IndexError, KeyError, TypeError):
        return template


def outgoing_message(leased: LeasedNotification) -> OutgoingMessage:
    recipient = None
    if leased.username is not None:
        recipient = Recipient(username=leased.username, email=leased.email or None, active=leased.user_active)
    return OutgoingMessage(
        id=leased.id,
        kind=leased.kind,
        notification_template=leased.template_name,
        title=render(leased.title_template, leased.payload),
        body=render(leased.body_template, leased.payload),
        payload=leased.payload,
        recipient=recipient,
        created_at=leased.created_at,
        attempt=leased.attempts + 1,
        carries_notice=leased.carries_notice,
        notice_recipients=tuple(
            NoticeRecipient(username=str(entry["username"]), email=entry.get("email") or None)
            for entry in leased.notice_recipients
        ),
    )
