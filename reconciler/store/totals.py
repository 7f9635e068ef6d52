"""Typed access to the lifetime counts behind the created/failed/claimed counters (`sql/queries/totals.sql`).

`read_full` reads the whole history (start-up, then hourly); `read_changes` only what can have changed
since the last refresh. Each reads in one REPEATABLE READ snapshot, so its parts and its time agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from uuid import UUID

import asyncpg

from reconciler import db
from reconciler.counters import OVERLAP, ChangesRead, FirstBuild, FullRead, Labels, PrebuildCounters
from reconciler.snapshot import PrebuildTotals


def _query(name: str) -> str:
    return db.queries_in("totals.sql")[name]


def _first_builds(rows: Iterable[asyncpg.Record]) -> list[FirstBuild]:
    return [
        FirstBuild(
            id=row["id"],
            workspace_id=row["workspace_id"],
            preset_id=row["preset_id"],
            job_status=row["job_status"],
            claimed=row["claimed"],
            deleted=row["deleted"],
        )
        for row in rows
    ]


async def read_clock(connection: db.Connection) -> datetime:
    now: datetime = await connection.fetchval(_query("totals_clock"))
    return now


async def read_totals_by_preset(connection: db.Connection) -> dict[UUID, PrebuildTotals]:
    rows = await connection.fetch(_query("totals_by_preset"))
    return {row["preset_id"]: PrebuildTotals(row["created"], row["failed"], row["claimed"]) for row in rows}


async def read_live_first_builds(connection: db.Connection) -> list[FirstBuild]:
    return _first_builds(await connection.fetch(_query("totals_live_first_builds")))


async def read_unfinished_first_builds(connection: db.Connection) -> list[FirstBuild]:
    return _first_builds(await connection.fetch(_query("totals_unfinished_first_builds")))


async def read_recent_first_builds(connection: db.Connection, since: datetime) -> list[FirstBuild]:
    return _first_builds(await connection.fetch(_query("totals_recent_first_builds"), since))


async def read_live_workspaces(connection: db.Connection) -> set[str]:
    """The ids of the live prebuilds' workspaces, as text."""
    ids: str = await connection.fetchval(_query("totals_live_workspaces"))
    return set(ids.split(",")) if ids else set()


async def read_first_builds_of_workspaces(connection: db.Connection, workspace_ids: Iterable[UUID]) -> list[FirstBuild]:
    return _first_builds(await connection.fetch(_query("totals_first_builds_of_workspaces"), list(workspace_ids)))


async def read_preset_labels(connection: db.Connection) -> dict[UUID, Labels]:
    rows = await connection.fetch(_query("totals_preset_labels"))
    return {row["id"]: (row["template_name"], row["preset_name"], row["organization_name"]) for row in rows}


async def read_preset_labels_digest(connection: db.Connection) -> str:
    digest: str = await connection.fetchval(_query("totals_preset_labels_digest"))
    return digest


async def read_full(connection: db.Connection) -> FullRead:
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        at = await read_clock(connection)
        return FullRead(
            at=at,
            totals=await read_totals_by_preset(connection),
            open=[*await read_live_first_builds(connection), *await read_unfinished_first_builds(connection)],
            recent=await read_recent_first_builds(connection, at - OVERLAP),
            labels=await read_preset_labels(connection),
            labels_digest=await read_preset_labels_digest(connection),
        )


async def read_changes(connection: db.Connection, counters: PrebuildCounters) -> ChangesRead:
    """What may have changed since `counters`' last refresh, in one snapshot."""
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        at = await read_clock(connection)
        recent = await read_recent_first_builds(connection, counters.since)
        unfinished = await read_unfinished_first_builds(connection)
        live = await read_live_workspaces(connection)
        # Live prebuilds that are no longer live (claimed, deleted) and live ones not followed yet.
        followed = counters.live_workspace_ids()
        seen = {str(build.workspace_id) for build in recent} | {str(build.workspace_id) for build in unfinished}
        to_look_up = frozenset(UUID(text) for text in (followed - live) | (live - followed - seen))
        looked_up = await read_first_builds_of_workspaces(connection, to_look_up) if to_look_up else []
        digest = await read_preset_labels_digest(connection)
        labels = await read_preset_labels(connection) if digest != counters.labels_digest else None
        return ChangesRead(
            at=at,
            recent=recent,
            open=unfinished,
            departed=looked_up,
            labels=labels,
            looked_up_workspaces=to_look_up,
            labels_digest=digest,
        )


async def refresh(connection: db.Connection, counters: PrebuildCounters) -> bool:
    """Bring `counters` up to date; True when it read the whole history (start-up, then hourly)."""
    if counters.full_read_due:
        counters.reset(await read_full(connection))
        return True
    counters.apply(await read_changes(connection, counters))
    return False
