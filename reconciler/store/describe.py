"""What `presets describe` and `presets reset` read beyond a plan (`sql/queries/describe.sql`): finding the
preset an operator named, its settings and history, its recent prebuilds and notifications.

An operator's command: never on a pass's path.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from reconciler import db
from reconciler.store.reads import _aware_or_none


def _query(name: str) -> str:
    return db.queries_in("describe.sql")[name]


@dataclass(frozen=True, slots=True)
class PresetCandidate:
    id: UUID
    name: str
    template_version_name: str
    template_name: str
    organization_name: str
    is_active_version: bool
    has_prebuilds: bool

    @property
    def label(self) -> str:
        version = self.template_version_name + ("" if self.is_active_version else ", not active")
        return f"{self.id}  {self.organization_name}: {self.template_name}/{self.name} (version {version})"


@dataclass(frozen=True, slots=True)
class PresetReference:
    """What an operator's PRESET argument can be: a full id, an id prefix, or template/[version/]preset."""

    text: str
    full_id: UUID | None = None
    id_prefix: str | None = None
    template_name: str | None = None
    version_name: str | None = None
    preset_name: str | None = None


# A prefix of a uuid's text form: hex digits and dashes, 1 to 36 characters.
_ID_PREFIX = re.compile(r"[0-9a-f-]{1,36}")


def parse_reference(text: str) -> PresetReference | None:
    """None when `text` can be neither an id, an id prefix, nor a template/preset name."""
    try:
        return PresetReference(text, full_id=uuid.UUID(text))
    except ValueError:
        pass
    reference = PresetReference(text)
    lowered = text.strip().lower()
    if _ID_PREFIX.fullmatch(lowered):
        reference = PresetReference(text, id_prefix=lowered)
    parts = text.split("/")
    if len(parts) == 2 and all(parts):
        return PresetReference(text, id_prefix=reference.id_prefix, template_name=parts[0], preset_name=parts[1])
    if len(parts) == 3 and all(parts):
        return PresetReference(
            text, id_prefix=reference.id_prefix, template_name=parts[0], version_name=parts[1], preset_name=parts[2]
        )
    return reference if reference.id_prefix is not None else None


async def find_presets(connection: db.Connection, reference: PresetReference) -> list[PresetCandidate]:
    rows = await connection.fetch(
        _query("find_presets"),
        reference.full_id,
        reference.id_prefix,
        reference.template_name,
        reference.preset_name,
        reference.version_name,
    )
    return [
        PresetCandidate(
            id=row["id"],
            name=row["name"],
            template_version_name=row["template_version_name"],
            template_name=row["template_name"],
            organization_name=row["organization_name"],
            is_active_version=row["is_active_version"],
            has_prebuilds=row["has_prebuilds"],
        )
        for row in rows
    ]


@dataclass(frozen=True, slots=True)
class PresetSettings:
    desired_instances: int | None
    invalidate_after_secs: int | None
    scheduling_timezone: str
    prebuild_status: str
    status_changed_at: datetime | None
    failure_episode: int
    failure_reset_at: datetime | None
    last_invalidated_at: datetime | None
    template_deleted: bool
    template_deprecation: str
    is_active_version: bool
    schedules: tuple[tuple[str, int], ...]


async def read_preset(connection: db.Connection, preset_id: UUID) -> PresetSettings | None:
    row = await connection.fetchrow(_query("describe_preset"), preset_id)
    if row is None:
        return None
    schedules = await connection.fetch(_query("describe_schedules"), preset_id)
    return PresetSettings(
        desired_instances=row["desired_instances"],
        invalidate_after_secs=row["invalidate_after_secs"],
        scheduling_timezone=row["scheduling_timezone"],
        prebuild_status=row["prebuild_status"],
        status_changed_at=_aware_or_none(row["prebuild_status_changed_at"]),
        failure_episode=row["failure_episode"],
        failure_reset_at=_aware_or_none(row["failure_reset_at"]),
        last_invalidated_at=_aware_or_none(row["last_invalidated_at"]),
        template_deleted=row["template_deleted"],
        template_deprecation=row["template_deprecation"],
        is_active_version=row["is_active_version"],
        schedules=tuple((schedule["cron_expression"], schedule["desired_instances"]) for schedule in schedules),
    )


@dataclass(frozen=True, slots=True)
class RecentPrebuild:
    workspace_id: UUID
    workspace_name: str
    created_at: datetime
    job_status: str
    error_code: str | None
    error: str | None
    completed_at: datetime | None
    deleted: bool
    claimed: bool

    @property
    def outcome(self) -> str:
        """The build's outcome, then what became of the workspace."""
        fate = "deleted" if self.deleted else "claimed" if self.claimed else "live"
        return f"{self.job_status}, {fate}"


async def recent_prebuilds(connection: db.Connection, preset_id: UUID, limit: int) -> list[RecentPrebuild]:
    rows = await connection.fetch(_query("describe_prebuilds"), preset_id, limit)
    return [
        RecentPrebuild(
            workspace_id=row["workspace_id"],
            workspace_name=row["workspace_name"],
            created_at=_aware_or_none(row["created_at"]) or row["created_at"],
            job_status=row["job_status"],
            error_code=row["error_code"],
            error=row["error"],
            completed_at=_aware_or_none(row["completed_at"]),
            deleted=row["deleted"],
            claimed=row["claimed"],
        )
        for row in rows
    ]


@dataclass(frozen=True, slots=True)
class PresetNotification:
    id: UUID
    kind: str
    episode: int
    status: str
    created_at: datetime
    sent_at: datetime | None
    attempts: int
    last_error: str | None
    recipient: str | None
    recipient_email: str | None
    # (sink, delivered_at as ISO text), in delivery order.
    deliveries: tuple[tuple[str, str], ...]


async def preset_notifications(connection: db.Connection, preset_id: UUID, limit: int) -> list[PresetNotification]:
    rows = await connection.fetch(_query("describe_notifications"), preset_id, limit)
    result = []
    for row in rows:
        deliveries: list[dict[str, Any]] = json.loads(row["deliveries"])
        result.append(
            PresetNotification(
                id=row["id"],
                kind=row["kind"],
                episode=row["episode"],
                status=row["status"],
                created_at=row["created_at"],
                sent_at=row["sent_at"],
                attempts=row["attempts"],
                last_error=row["last_error"],
                recipient=row["username"],
                recipient_email=row["email"] or None,
                deliveries=tuple((str(item["sink"]), str(item["delivered_at"])) for item in deliveries),
            )
        )
    return result
