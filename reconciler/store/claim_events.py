"""Typed access to the claim events behind the claim/miss counters (`sql/queries/claim_events.sql`)."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from reconciler import db
from reconciler.claim_event_counters import ClaimEvent, ClaimEventCounters, Counts, EventsFullRead, EventsRead
from reconciler.counters import OVERLAP
from reconciler.store.totals import read_clock


def _query(name: str) -> str:
    return db.queries_in("claim_events.sql")[name]


async def read_counts_by_preset(connection: db.Connection) -> dict[UUID, Counts]:
    rows = await connection.fetch(_query("claim_events_by_preset"))
    return {row["preset_id"]: (row["claim_succeeded"], row["claim_missed"]) for row in rows}


async def read_events_since(connection: db.Connection, since: datetime) -> list[ClaimEvent]:
    rows = await connection.fetch(_query("claim_events_since"), since)
    return [ClaimEvent(row["id"], row["preset_id"], row["event_type"], row["created_at"]) for row in rows]


async def read_full(connection: db.Connection) -> EventsFullRead:
    # One snapshot: the events of the window are the same ones the counts include.
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        at = await read_clock(connection)
        counts = await read_counts_by_preset(connection)
        return EventsFullRead(at=at, counts=counts, recent=await read_events_since(connection, at - OVERLAP))


async def read_recent(connection: db.Connection, since: datetime) -> EventsRead:
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        at = await read_clock(connection)
        return EventsRead(at=at, recent=await read_events_since(connection, since))


async def refresh(connection: db.Connection, counters: ClaimEventCounters) -> bool:
    """Bring `counters` up to date; True when it counted every event (the first refresh of a process)."""
    if not counters.started:
        counters.start(await read_full(connection))
        return True
    counters.apply(await read_recent(connection, counters.since))
    return False
