"""The writes of a pass and of the operator's commands (`sql/queries/writes.sql`).

Each function is one statement; the caller owns the transaction (the executor runs one per action).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from reconciler import db
from reconciler.breaker import BreakerRecord
from reconciler.snapshot import PrebuildStatus, Schedule


def _query(name: str) -> str:
    return db.queries_in("writes.sql")[name]


@dataclass(frozen=True, slots=True)
class MarkedPreset:
    """A preset whose status this statement changed, with its failure episode after the change."""

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
    desired_instances_expression: str | None = None


def prebuild_name() -> str:
    """`prebuild-` and 16 random lowercase base32 characters (80 bits: collisions are not a concern)."""
    return "prebuild-" + base64.b32encode(os.urandom(10)).decode().lower()


async def write_paused(connection: db.Connection, paused: bool) -> None:
    await connection.execute(_query("write_prebuilds_settings"), json.dumps({"reconciliation_paused": paused}))


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
    return _create_check(row)


def _create_check(row: asyncpg.Record) -> CreateCheck:
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
        desired_instances_expression=row["desired_instances_expression"],
    )


async def lock_presets_for_create(connection: db.Connection, preset_ids: Sequence[UUID]) -> dict[UUID, CreateCheck]:
    """The batch form of `lock_preset_for_create`: lock the presets' rows (in id order), then read them."""
    locked = [row["id"] for row in await connection.fetch(_query("lock_presets_for_create"), list(preset_ids))]
    if not locked:
        return {}
    rows = await connection.fetch(_query("read_preset_for_create_batch"), locked)
    return {row["id"]: _create_check(row) for row in rows}


async def count_presets_prebuilds(connection: db.Connection, presets: Mapping[UUID, UUID]) -> dict[UUID, int]:
    """The batch form of `count_preset_prebuilds`: preset -> its template in, preset -> count out."""
    rows = await connection.fetch(_query("count_preset_prebuilds_batch"), list(presets), list(set(presets.values())))
    counts = dict.fromkeys(presets, 0)
    for row in rows:
        if presets.get(row["preset_id"]) == row["template_id"]:
            counts[row["preset_id"]] = int(row["prebuilds"])
    return counts


@dataclass(frozen=True, slots=True)
class PrebuildsToCreate:
    preset_id: UUID
    template_version_id: UUID
    template_id: UUID
    organization_id: UUID
    count: int


async def create_prebuilds_batch(
    connection: db.Connection, creates: Sequence[PrebuildsToCreate], now: datetime
) -> dict[UUID, int]:
    """The batch form of `create_prebuilds`, in one statement; returns the prebuilds created per preset."""
    columns: tuple[list[UUID], list[UUID], list[UUID], list[UUID], list[str]] = ([], [], [], [], [])
    for create in creates:
        for _ in range(create.count):
            columns[0].append(create.preset_id)
            columns[1].append(create.template_version_id)
            columns[2].append(create.template_id)
            columns[3].append(create.organization_id)
            columns[4].append(prebuild_name())
    if not columns[0]:
        return {}
    created: dict[UUID, int] = {}
    for row in await connection.fetch(_query("create_prebuilds_batch"), *columns, now):
        created[row["preset_id"]] = created.get(row["preset_id"], 0) + 1
    return created


async def lock_in_flight_budget(connection: db.Connection) -> None:
    """The in-flight budget's lock, to the end of the caller's transaction (see `lock_in_flight_budget`)."""
    await connection.execute(_query("lock_in_flight_budget"), db.IN_FLIGHT_BUDGET_LOCK_KEY)


async def count_in_flight(connection: db.Connection, template_id: UUID) -> tuple[int, int]:
    """Prebuild build jobs in flight now: (across the deployment, for the template)."""
    row = await connection.fetchrow(_query("count_in_flight"), template_id)
    assert row is not None
    return int(row["total"]), int(row["template"])


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
) -> list[MarkedPreset]:
    rows = await connection.fetch(_query("mark_presets_status"), list(preset_ids), status.value, now)
    return [MarkedPreset(row["id"], row["failure_episode"]) for row in rows]


async def mark_presets_recovered(
    connection: db.Connection, preset_ids: Iterable[UUID], now: datetime
) -> list[MarkedPreset]:
    rows = await connection.fetch(_query("mark_presets_recovered"), list(preset_ids), now)
    return [MarkedPreset(row["id"], row["failure_episode"]) for row in rows]


async def invalidate_preset(connection: db.Connection, preset_id: UUID, now: datetime) -> bool:
    """Record an invalidation of the preset's prebuilds at `now`; False when there is no such preset."""
    return await connection.fetchval(_query("invalidate_preset"), preset_id, now) is not None


async def reset_preset(connection: db.Connection, preset_id: UUID, now: datetime) -> PrebuildStatus | None:
    """Set a preset back to normal; None when there is no such preset."""
    previous = await connection.fetchval(_query("reset_preset"), preset_id, now)
    return None if previous is None else PrebuildStatus(previous)


async def record_settings(connection: db.Connection, values: Mapping[str, str], instance: str, now: datetime) -> None:
    """Record the behaviour settings a pass at `now` uses (`reconciler_settings`, one row)."""
    await connection.execute(_query("record_settings"), json.dumps(dict(values)), instance, now)


async def write_breaker(connection: db.Connection, read: BreakerRecord, new: BreakerRecord) -> bool:
    """Move the breaker from the state read to `new`; False when another writer moved it first."""
    episode = await connection.fetchval(
        _query("write_breaker"),
        read.state.value,
        read.episode,
        new.state.value,
        new.episode,
        new.changed_at,
        new.open_until,
        new.open_duration,
    )
    return episode is not None


async def open_breaker_episode(
    connection: db.Connection, episode: int, opened_at: datetime, failures_since: datetime, reason: str
) -> None:
    await connection.execute(_query("open_breaker_episode"), episode, opened_at, failures_since, reason)


async def close_breaker_episode(connection: db.Connection, episode: int, now: datetime) -> datetime | None:
    """Close the episode; returns when it opened (None: it was closed already, or never recorded)."""
    row = await connection.fetchrow(_query("close_breaker_episode"), episode, now)
    return None if row is None else row["opened_at"]


# The purge's batch: small enough that one delete is short, large enough that a day of a busy fleet's
# claims goes in a few hundred statements.
PURGE_BATCH_SIZE = 5000


async def purge_prebuild_events(
    connection: db.Connection, older_than: datetime, *, batch_size: int = PURGE_BATCH_SIZE, max_batches: int = 200
) -> int:
    """Delete claim events created before `older_than`, in batches; returns how many went.

    At most `max_batches` batches per call: whatever is left goes on the next call (the daemon calls it
    on an interval), so a first purge of a large backlog never holds the connection for long.
    """
    purged = 0
    for _ in range(max_batches):
        status = await connection.execute(_query("purge_prebuild_events"), older_than, batch_size)
        deleted = int(status.split()[-1])
        purged += deleted
        if deleted < batch_size:
            break
    return purged


async def count_prebuilds_still_live(connection: db.Connection, workspace_ids: Sequence[UUID]) -> int:
    """How many of `workspace_ids` are still live prebuilds (see `count_prebuilds_still_live`)."""
    if not workspace_ids:
        return 0
    return int(await connection.fetchval(_query("count_prebuilds_still_live"), list(workspace_ids)) or 0)
