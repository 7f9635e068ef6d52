"""The only module that runs SQL: typed methods over the named statements of `sql/queries/`."""

from __future__ import annotations

import base64
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg

from reconciler import db
from reconciler.snapshot import (
    Backoff,
    InProgress,
    PendingNonActive,
    PrebuildStatus,
    Preset,
    PresetFailures,
    RunningPrebuild,
    Schedule,
    Snapshot,
    Transition,
)


def _query(name: str) -> str:
    return db.queries()[name]


@dataclass(frozen=True, slots=True)
class SnapshotParameters:
    lookback_start: datetime
    failure_hard_limit: int
    non_retryable_error_codes: frozenset[str]
    capacity_error_codes: frozenset[str]


@dataclass(frozen=True, slots=True)
class StatusChange:
    preset_id: UUID
    failure_episode: int


@dataclass(frozen=True, slots=True)
class CreateCheck:
    """What a create re-reads under the preset's row lock."""

    desired_instances: int | None
    prebuild_status: PrebuildStatus
    active: bool
    template_id: UUID
    organization_id: UUID


class BadRowError(Exception):
    """A row written by another component breaks an assumption; the preset it belongs to is skipped."""

    def __init__(self, preset_id: UUID | None, detail: str) -> None:
        super().__init__(detail)
        self.preset_id = preset_id
        self.detail = detail


def prebuild_name() -> str:
    """`prebuild-` and 16 random lowercase base32 characters (80 bits: collisions are not a concern)."""
    return "prebuild-" + base64.b32encode(os.urandom(10)).decode().lower()


async def try_reconciliation_lock(connection: db.Connection) -> bool:
    """Take the pass lock for the current transaction; False when another replica holds it."""
    return bool(await connection.fetchval(_query("try_reconciliation_lock"), db.RECONCILIATION_LOCK_KEY))


async def read_paused(connection: db.Connection) -> bool:
    value = await connection.fetchval(_query("read_prebuilds_settings"))
    if value is None:
        return False
    try:
        settings = json.loads(value)
    except ValueError:
        # An unreadable setting must not stop reconciliation; the pass logs it through the caller.
        return False
    return isinstance(settings, dict) and settings.get("reconciliation_paused") is True


async def write_paused(connection: db.Connection, paused: bool) -> None:
    await connection.execute(_query("write_prebuilds_settings"), json.dumps({"reconciliation_paused": paused}))


def _preset_from_row(row: asyncpg.Record, schedules: Sequence[Schedule]) -> Preset:
    return Preset(
        id=row["id"],
        name=row["name"],
        template_id=row["template_id"],
        template_name=row["template_name"],
        template_version_id=row["template_version_id"],
        template_version_name=row["template_version_name"],
        organization_id=row["organization_id"],
        organization_name=row["organization_name"],
        desired_instances=row["desired_instances"],
        invalidate_after_secs=row["invalidate_after_secs"],
        scheduling_timezone=row["scheduling_timezone"],
        prebuild_status=PrebuildStatus(row["prebuild_status"]),
        last_invalidated_at=row["last_invalidated_at"],
        is_active_version=row["is_active_version"],
        template_deleted=row["template_deleted"],
        template_deprecated=row["template_deprecated"],
        schedules=tuple(schedules),
        failure_episode=row["failure_episode"],
    )


async def read_snapshot(connection: db.Connection, parameters: SnapshotParameters) -> Snapshot:
    """Read a pass's snapshot: three statements, whatever the number of presets.

    The caller runs this inside a REPEATABLE READ transaction so that the statements agree.
    """
    schedules: dict[UUID, list[Schedule]] = defaultdict(list)
    for row in await connection.fetch(_query("snapshot_schedules")):
        schedules[row["preset_id"]].append(Schedule(row["cron_expression"], row["desired_instances"]))
    presets = tuple(
        _preset_from_row(row, schedules.get(row["id"], ()))
        for row in await connection.fetch(_query("snapshot_presets"))
    )
    rows = await connection.fetch(
        _query("snapshot_prebuilds"),
        parameters.lookback_start,
        parameters.failure_hard_limit,
        sorted(parameters.non_retryable_error_codes),
        sorted(parameters.capacity_error_codes),
    )
    running: list[RunningPrebuild] = []
    in_progress: list[InProgress] = []
    pending: list[PendingNonActive] = []
    backoffs: list[Backoff] = []
    failures: list[PresetFailures] = []
    for row in rows:
        kind = row["kind"]
        if kind == "running":
            running.append(
                RunningPrebuild(
                    row["workspace_id"], row["preset_id"], row["template_version_id"], row["ready"], row["at"]
                )
            )
        elif kind == "in_progress":
            in_progress.append(
                InProgress(row["preset_id"], row["template_version_id"], Transition(row["transition"]), row["count"])
            )
        elif kind == "pending":
            pending.append(PendingNonActive(row["preset_id"], row["count"]))
        elif kind == "backoff":
            backoffs.append(Backoff(row["preset_id"], row["count"], row["at"]))
        elif kind == "failures":
            failures.append(
                PresetFailures(
                    preset_id=row["preset_id"],
                    hard_limited=bool(row["ready"]),
                    validation_failed=row["transition"] == "validation_failed",
                    failure_streak=row["count"],
                    last_error=row["error"],
                    last_error_code=row["error_code"],
                    last_failed_at=row["at"],
                )
            )
    return Snapshot(
        presets=presets,
        running=tuple(running),
        in_progress=tuple(in_progress),
        pending_non_active=tuple(pending),
        backoffs=tuple(backoffs),
        hard_limited_preset_ids=frozenset(f.preset_id for f in failures if f.hard_limited),
        validation_failed_preset_ids=frozenset(f.preset_id for f in failures if f.validation_failed),
        failures=tuple(failures),
    )


async def lock_preset_for_create(connection: db.Connection, preset_id: UUID) -> CreateCheck | None:
    row = await connection.fetchrow(_query("lock_preset_for_create"), preset_id)
    if row is None:
        return None
    return CreateCheck(
        desired_instances=row["desired_instances"],
        prebuild_status=PrebuildStatus(row["prebuild_status"]),
        active=row["active"],
        template_id=row["template_id"],
        organization_id=row["organization_id"],
    )


async def count_preset_prebuilds(connection: db.Connection, preset_id: UUID, template_id: UUID) -> int:
    return int(await connection.fetchval(_query("count_preset_prebuilds"), preset_id, template_id))


async def create_prebuilds(
    connection: db.Connection,
    *,
    preset_id: UUID,
    template_version_id: UUID,
    template_id: UUID,
    organization_id: UUID,
    count: int,
    now: datetime,
) -> list[UUID]:
    names = [prebuild_name() for _ in range(count)]
    rows = await connection.fetch(
        _query("create_prebuilds"), preset_id, template_version_id, template_id, organization_id, names, now
    )
    return [row["workspace_id"] for row in rows]


async def delete_prebuilds(connection: db.Connection, workspace_ids: Sequence[UUID], now: datetime) -> list[UUID]:
    rows = await connection.fetch(_query("delete_prebuilds"), list(workspace_ids), now)
    return [row["workspace_id"] for row in rows]


async def cancel_pending_prebuilds(connection: db.Connection, preset_id: UUID, now: datetime) -> list[UUID]:
    rows = await connection.fetch(_query("cancel_pending_prebuilds"), preset_id, now)
    return [row["id"] for row in rows]


async def mark_presets_status(
    connection: db.Connection, preset_ids: Iterable[UUID], status: PrebuildStatus, now: datetime
) -> list[StatusChange]:
    rows = await connection.fetch(_query("mark_presets_status"), list(preset_ids), status.value, now)
    return [StatusChange(row["id"], row["failure_episode"]) for row in rows]


async def mark_presets_recovered(
    connection: db.Connection, preset_ids: Iterable[UUID], now: datetime
) -> list[StatusChange]:
    rows = await connection.fetch(_query("mark_presets_recovered"), list(preset_ids), now)
    return [StatusChange(row["id"], row["failure_episode"]) for row in rows]


async def reset_preset(connection: db.Connection, preset_id: UUID, now: datetime) -> PrebuildStatus | None:
    """Set a preset back to normal; None when there is no such preset."""
    previous = await connection.fetchval(_query("reset_preset"), preset_id, now)
    return None if previous is None else PrebuildStatus(previous)


def lookback_start(now: datetime, lookback: timedelta) -> datetime:
    return now - lookback


@dataclass(frozen=True, slots=True)
class PrebuildTotals:
    created: int
    failed: int
    claimed: int


async def read_prebuild_totals(connection: db.Connection, preset_ids: Sequence[UUID]) -> dict[UUID, PrebuildTotals]:
    rows = await connection.fetch(_query("prebuild_totals"), list(preset_ids))
    return {row["preset_id"]: PrebuildTotals(row["created"], row["failed"], row["claimed"]) for row in rows}


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
