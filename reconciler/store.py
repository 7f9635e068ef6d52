"""The only module that runs SQL: typed methods over the named statements of `sql/queries/`."""

from __future__ import annotations

import base64
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import structlog

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

logger = structlog.get_logger(__name__)


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
    schedules: tuple[Schedule, ...] = ()
    scheduling_timezone: str = ""


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


def _aware(moment: datetime) -> datetime:
    """asyncpg returns `infinity` and `-infinity` timestamptz values as *naive* datetime.max and .min;
    the rest of the code compares aware datetimes, so they are given the UTC zone here."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _aware_or_none(moment: datetime | None) -> datetime | None:
    return None if moment is None else _aware(moment)


def _require(row: asyncpg.Record, columns: Iterable[str]) -> None:
    """Columns the snapshot types cannot do without; another component's schema may not promise them."""
    missing = [column for column in columns if row[column] is None]
    if missing:
        raise ValueError(f"null in {', '.join(missing)}")


_PRESET_REQUIRED = (
    "id",
    "name",
    "template_id",
    "template_name",
    "template_version_id",
    "template_version_name",
    "organization_id",
    "organization_name",
    "desired_instances",
    "scheduling_timezone",
    "prebuild_status",
    "is_active_version",
    "template_deleted",
    "template_deprecated",
    "failure_episode",
)


def _preset_from_row(row: asyncpg.Record, schedules: Sequence[Schedule]) -> Preset:
    _require(row, _PRESET_REQUIRED)
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
        last_invalidated_at=_aware_or_none(row["last_invalidated_at"]),
        is_active_version=row["is_active_version"],
        template_deleted=row["template_deleted"],
        template_deprecated=row["template_deprecated"],
        schedules=tuple(schedules),
        failure_episode=row["failure_episode"],
    )


@dataclass(slots=True)
class _SnapshotRows:
    running: list[RunningPrebuild] = field(default_factory=list)
    in_progress: list[InProgress] = field(default_factory=list)
    pending: list[PendingNonActive] = field(default_factory=list)
    backoffs: list[Backoff] = field(default_factory=list)
    failures: list[PresetFailures] = field(default_factory=list)

    def add(self, row: asyncpg.Record) -> None:
        """Convert one tagged row of `snapshot_prebuilds`; raises ValueError or TypeError on a bad one."""
        kind = row["kind"]
        if kind == "running":
            # The hot path: one row per preset, its running prebuilds as arrays ordered oldest first.
            _require(row, ("preset_id", "template_version_id", "workspace_ids", "ready_flags", "created_ats"))
            preset_id, version_id = row["preset_id"], row["template_version_id"]
            workspace_ids, ready_flags, created_ats = row["workspace_ids"], row["ready_flags"], row["created_ats"]
            if not len(workspace_ids) == len(ready_flags) == len(created_ats):
                raise ValueError("running prebuilds: arrays of different lengths")
            if None in workspace_ids or None in ready_flags or None in created_ats:
                nulls = [
                    f"null in {field} of workspace {workspace_id}"
                    for workspace_id, ready, at in zip(workspace_ids, ready_flags, created_ats, strict=True)
                    for field, value in (("workspace_id", workspace_id), ("ready", ready), ("at", at))
                    if value is None
                ]
                raise ValueError("; ".join(nulls))
            self.running.extend(
                RunningPrebuild(workspace_id, preset_id, version_id, ready, at if at.tzinfo else _aware(at))
                for workspace_id, ready, at in zip(workspace_ids, ready_flags, created_ats, strict=True)
            )
        elif kind == "in_progress":
            _require(row, ("preset_id", "template_version_id", "transition", "count"))
            self.in_progress.append(
                InProgress(row["preset_id"], row["template_version_id"], Transition(row["transition"]), row["count"])
            )
        elif kind == "pending":
            _require(row, ("preset_id", "count"))
            self.pending.append(PendingNonActive(row["preset_id"], row["count"]))
        elif kind == "backoff":
            _require(row, ("preset_id", "count", "at"))
            self.backoffs.append(Backoff(row["preset_id"], row["count"], _aware(row["at"])))
        elif kind == "failures":
            _require(row, ("preset_id", "count"))
            self.failures.append(
                PresetFailures(
                    preset_id=row["preset_id"],
                    hard_limited=bool(row["ready"]),
                    validation_failed=row["transition"] == "validation_failed",
                    failure_streak=row["count"],
                    last_error=row["error"],
                    last_error_code=row["error_code"],
                    last_failed_at=_aware_or_none(row["at"]),
                    failed_workspace_ids=tuple(row["workspace_ids"] or ()),
                )
            )
        else:
            raise ValueError(f"unknown row kind {kind!r}")


def _bad_row(preset_id: UUID | None, what: str, error: Exception) -> BadRowError:
    return BadRowError(preset_id, f"{what}: {type(error).__name__}: {error}")


async def read_snapshot(
    connection: db.Connection, parameters: SnapshotParameters, *, bad_rows: list[BadRowError] | None = None
) -> Snapshot:
    """Read a pass's snapshot: three statements, whatever the number of presets.

    The caller runs this inside a REPEATABLE READ transaction so that the statements agree.

    Other components write these tables, and a newer one may write values this code does not know (an
    enum value added by its migration, a null where ours has none). Such a row must not fail the pass:
    it is reported (logged as `snapshot.bad_row`, and appended to `bad_rows` when given), and the preset
    it belongs to is left out of this snapshot whole, because its counts would be wrong without the row.
    Every other preset goes on.
    """
    problems: list[BadRowError] = []
    schedules: dict[UUID, list[Schedule]] = defaultdict(list)
    for row in await connection.fetch(_query("snapshot_schedules")):
        schedules[row["preset_id"]].append(Schedule(row["cron_expression"], row["desired_instances"]))
    presets: list[Preset] = []
    names: dict[UUID, asyncpg.Record] = {}
    for row in await connection.fetch(_query("snapshot_presets")):
        names[row["id"]] = row
        try:
            presets.append(_preset_from_row(row, schedules.get(row["id"], ())))
        except (ValueError, TypeError) as error:
            problems.append(_bad_row(row["id"], "preset", error))
    rows = await connection.fetch(
        _query("snapshot_prebuilds"),
        parameters.lookback_start,
        parameters.failure_hard_limit,
        sorted(parameters.non_retryable_error_codes),
        sorted(parameters.capacity_error_codes),
    )
    converted = _SnapshotRows()
    for row in rows:
        try:
            converted.add(row)
        except (ValueError, TypeError) as error:
            subject = f"{row['kind']} row" + (f" of workspace {row['workspace_id']}" if row["workspace_id"] else "")
            problems.append(_bad_row(row["preset_id"], subject, error))
    bad_preset_ids = {problem.preset_id for problem in problems}
    for problem in problems:
        preset_row = names.get(problem.preset_id) if problem.preset_id is not None else None
        logger.warning(
            "snapshot.bad_row",
            preset_id=str(problem.preset_id) if problem.preset_id else None,
            preset_name=preset_row["name"] if preset_row else None,
            template_name=preset_row["template_name"] if preset_row else None,
            template_version_name=preset_row["template_version_name"] if preset_row else None,
            detail=problem.detail,
            consequence="preset skipped this pass" if problem.preset_id else "row ignored",
        )
    if bad_rows is not None:
        bad_rows.extend(problems)

    def keep(preset_id: UUID) -> bool:
        return preset_id not in bad_preset_ids

    failures = [failure for failure in converted.failures if keep(failure.preset_id)]
    # Tens of thousands of running rows: filtered only when some preset has to be left out.
    running = (
        tuple(prebuild for prebuild in converted.running if keep(prebuild.preset_id))
        if bad_preset_ids
        else tuple(converted.running)
    )
    return Snapshot(
        presets=tuple(preset for preset in presets if keep(preset.id)),
        running=running,
        in_progress=tuple(row for row in converted.in_progress if keep(row.preset_id)),
        pending_non_active=tuple(row for row in converted.pending if keep(row.preset_id)),
        backoffs=tuple(row for row in converted.backoffs if keep(row.preset_id)),
        hard_limited_preset_ids=frozenset(f.preset_id for f in failures if f.hard_limited),
        validation_failed_preset_ids=frozenset(f.preset_id for f in failures if f.validation_failed),
        failures=tuple(failures),
    )


async def lock_preset_for_create(connection: db.Connection, preset_id: UUID) -> CreateCheck | None:
    """Lock the preset's row, then read what the create clamp needs; inside the create's transaction.

    Two statements on purpose: a `FOR UPDATE` that had to wait sees what was committed meanwhile only in
    the locked row itself, not in the schedules or the template it reads (issue 11.2).
    """
    if await connection.fetchval(_query("lock_preset_for_create"), preset_id) is None:
        return None
    row = await connection.fetchrow(_query("read_preset_for_create"), preset_id)
    if row is None:
        return None
    return CreateCheck(
        desired_instances=row["desired_instances"],
        prebuild_status=PrebuildStatus(row["prebuild_status"]),
        active=row["active"],
        template_id=row["template_id"],
        organization_id=row["organization_id"],
        schedules=tuple(
            Schedule(cron, instances)
            for cron, instances in zip(row["schedule_crons"], row["schedule_instances"], strict=True)
        ),
        scheduling_timezone=row["scheduling_timezone"],
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
