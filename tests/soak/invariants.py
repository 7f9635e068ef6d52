"""What must hold while several replicas reconcile one fleet, checked from the database and the logs.

Used by the replica acceptance test and the soak test. The checker plays no part in reconciling: it
reads what the replicas, the simulated provisioner and the test's "users" wrote, and records violations
instead of raising, so that a run reports all of them in its summary.

The pool-size invariant, precisely. A replica creates only up to its target, and the create is clamped
under the preset's row lock against a fresh count of live prebuilds (running, or starting and not failed).
So for each preset, at every instant, live prebuilds <= a *ceiling*: the target, except right after the
target was lowered, when the prebuilds already there (or in flight) may exceed it until the reconciler
has deleted the surplus. The ceiling then starts at what was live when the target dropped, and can only
come down: while a preset is above its target, its number of live prebuilds never grows.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from reconciler import db

# Live prebuilds per preset that has prebuilds: system-owned, not deleted, whose latest build is a start
# that has not failed or been canceled, counted for their current preset (latest start naming one).
LIVE_PREBUILDS = """
select p.id as preset_id, coalesce(live.count, 0)::int as live, coalesce(live.running, 0)::int as running
from template_version_presets p
left join (
    select current_preset.id as preset_id, count(*) as count,
           count(*) filter (where job.job_status = 'succeeded') as running
    from workspaces w
    cross join lateral (
        select b.transition, b.job_id from workspace_builds b
        where b.workspace_id = w.id order by b.build_number desc limit 1
    ) latest
    join provisioner_jobs job on job.id = latest.job_id
    cross join lateral (
        select b.template_version_preset_id as id from workspace_builds b
        where b.workspace_id = w.id and b.transition = 'start' and b.template_version_preset_id is not null
        order by b.build_number desc limit 1
    ) current_preset
    where w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and not w.deleted
        and latest.transition = 'start' and job.job_status in ('pending', 'running', 'succeeded')
    group by current_preset.id
) live on live.preset_id = p.id
where p.desired_instances is not null and ($1::uuid[] is null or p.id = any($1::uuid[]))
"""

# Workspaces a user owns on which the prebuilds system user ever started a delete: the reconciler deleted
# a claimed workspace (claims are only made of running prebuilds, so any such delete came after).
CLAIMED_THEN_DELETED = """
select w.id from workspaces w
join workspace_builds b on b.workspace_id = w.id
where w.owner_id <> 'c42fdf75-3097-471c-8c33-fb52454d81c0'
    and b.transition = 'delete' and b.initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
"""

# Workspaces or jobs of a create that is not whole, and workspaces with two first builds.
HALF_CREATED = """
select
    (select count(*) from workspaces w where not exists
        (select 1 from workspace_builds b where b.workspace_id = w.id and b.build_number = 1)) as without_build,
    (select count(*) from provisioner_jobs j where not exists
        (select 1 from workspace_builds b where b.job_id = j.id)) as job_without_build
"""

# Per preset, episode and recipient, the failure notifications (hard limit, validation failure).
EPISODE_MESSAGES = """
select p.id as preset_id, p.failure_episode, m.episode, m.user_id, count(m.id)::int as messages
from template_version_presets p
left join notification_messages m
    on m.preset_id = p.id and m.kind in ('hard_limited', 'validation_failed')
where p.failure_episode > 0
group by p.id, p.failure_episode, m.episode, m.user_id
"""


@dataclass
class FleetChecker:
    """Samples the fleet and records every broken invariant (see the module's docstring)."""

    max_desired_instances: int = 100
    targets: dict[UUID, int] = field(default_factory=dict)
    ceilings: dict[UUID, int] = field(default_factory=dict)
    checks: int = 0
    violations: list[str] = field(default_factory=list)
    peak_surplus: int = 0
    # Per preset, what the checker saw and did, in order (wall-clock time, what): target changes and
    # every sample that changed its count or ceiling. The soak prints it for a preset over its ceiling.
    history: dict[UUID, list[tuple[datetime, str]]] = field(default_factory=dict)
    last_seen: dict[UUID, tuple[int, int]] = field(default_factory=dict)
    over_ceiling: list[UUID] = field(default_factory=list)

    def capped(self, target: int) -> int:
        return min(target, self.max_desired_instances)

    def set_target(self, preset_id: UUID, target: int, live_now: int, why: str = "target") -> None:
        """Record a new target; `live_now` is what was live when it took effect (same transaction)."""
        target = self.capped(target)
        self.targets[preset_id] = target
        self.ceilings[preset_id] = max(target, live_now)
        self.note(preset_id, f"checker: {why}: target {target}, live {live_now}, ceiling {self.ceilings[preset_id]}")

    def note(self, preset_id: UUID, what: str) -> None:
        self.history.setdefault(preset_id, []).append((datetime.now(UTC), what))

    async def live(self, connection: db.Connection, preset_ids: Sequence[UUID] | None = None) -> dict[UUID, int]:
        rows = await connection.fetch(LIVE_PREBUILDS, list(preset_ids) if preset_ids is not None else None)
        return {row["preset_id"]: row["live"] for row in rows}

    async def running(self, connection: db.Connection) -> dict[UUID, int]:
        rows = await connection.fetch(LIVE_PREBUILDS, None)
        return {row["preset_id"]: row["running"] for row in rows}

    async def change_target(
        self, connection: db.Connection, preset_id: UUID, change: str, *arguments: Any, why: str = "target"
    ) -> None:
        """Run `change` (SQL changing the preset's target; `$1` is the preset) and record the new target.

        The preset's row is locked first, so the change serializes with creates (which lock it too): the
        count taken after the change includes every create decided under the old target.
        """
        async with connection.transaction():
            await connection.execute("select 1 from template_version_presets where id = $1 for update", preset_id)
            await connection.execute(change, preset_id, *arguments)
            live = (await self.live(connection, [preset_id])).get(preset_id, 0)
            target = await self.read_target(connection, preset_id)
            committing = await connection.fetchval("select clock_timestamp()")
        self.set_target(preset_id, target, live, f"{why} (committing at {committing:%H:%M:%S.%f})")

    async def read_target(self, connection: db.Connection, preset_id: UUID) -> int:
        """The target the test intends: desired, or the value of an always-on schedule; 0 when inactive."""
        row = await connection.fetchrow(
            "select p.desired_instances, t.active_version_id = p.template_version_id and not t.deleted "
            "and t.deprecated = '' as active, "
            "(select s.desired_instances from template_version_preset_prebuild_schedules s "
            " where s.preset_id = p.id and s.cron_expression = $2) as scheduled "
            "from template_version_presets p join template_versions v on v.id = p.template_version_id "
            "join templates t on t.id = v.template_id where p.id = $1",
            preset_id,
            ALWAYS,
        )
        assert row is not None
        if not row["active"]:
            return 0
        return int(row["scheduled"] if row["scheduled"] is not None else row["desired_instances"])

    async def sample(self, connection: db.Connection) -> None:
        """One invariant check of every preset, from one consistent read."""
        live = await self.live(connection)
        self.checks += 1
        for preset_id, count in live.items():
            if preset_id not in self.targets:
                continue
            ceiling = self.ceilings[preset_id]
            target = self.targets[preset_id]
            if count > ceiling:
                self.violations.append(
                    f"preset {preset_id}: {count} live prebuilds, above its ceiling {ceiling} (target {target})"
                )
                if preset_id not in self.over_ceiling:
                    self.over_ceiling.append(preset_id)
            self.peak_surplus = max(self.peak_surplus, count - target)
            self.ceilings[preset_id] = max(target, min(ceiling, count))
            if self.last_seen.get(preset_id) != (count, self.ceilings[preset_id]):
                self.last_seen[preset_id] = (count, self.ceilings[preset_id])
                self.note(preset_id, f"checker: sample: live {count}, ceiling now {self.ceilings[preset_id]}")

    async def check_claims(self, connection: db.Connection) -> None:
        self.checks += 1
        for row in await connection.fetch(CLAIMED_THEN_DELETED):
            self.violations.append(f"workspace {row['id']} was claimed and then deleted by the reconciler")

    async def check_whole(self, connection: db.Connection) -> None:
        self.checks += 1
        row = await connection.fetchrow(HALF_CREATED)
        assert row is not None
        if row["without_build"] or row["job_without_build"]:
            self.violations.append(f"half-created prebuilds: {dict(row)}")

    async def check_episode_messages(self, connection: db.Connection, recipients: int) -> int:
        """Each failure episode of each preset has exactly one message per recipient; returns episodes."""
        self.checks += 1
        seen: dict[UUID, dict[int, dict[UUID | None, int]]] = {}
        episodes: dict[UUID, int] = {}
        for row in await connection.fetch(EPISODE_MESSAGES):
            episodes[row["preset_id"]] = row["failure_episode"]
            if row["episode"] is not None:
                seen.setdefault(row["preset_id"], {}).setdefault(row["episode"], {})[row["user_id"]] = row["messages"]
        for preset_id, count in episodes.items():
            for episode in range(1, count + 1):
                messages = seen.get(preset_id, {}).get(episode, {})
                if len(messages) != recipients or any(number != 1 for number in messages.values()):
                    self.violations.append(
                        f"preset {preset_id} episode {episode}: messages per recipient {messages}, "
                        f"expected one for each of {recipients}"
                    )
        return sum(episodes.values())


# A schedule that always applies, and one that never does (the 31st of February).
ALWAYS = "* * * * *"
NEVER = "* * 31 2 *"


# --- the replicas' logs --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PassWindow:
    """A successful pass of one replica, from its canonical `reconcile.pass` event: when it held the lock.

    `start` and `end` are the event's `lock_held_from` and `lock_held_until`, read by the replica after
    the lock was granted and before it was released: within the time it really held the lock, on the
    host's wall clock, which every replica of a test shares.
    """

    replica: str
    run_id: str
    start: float
    end: float
    created: int
    deleted: int
    # The templates of a targeted pass (which holds their template locks, not the pass lock); None for a
    # full pass.
    templates: frozenset[str] | None = None


def pass_windows(replica: str, events: Iterable[Mapping[str, Any]]) -> list[PassWindow]:
    windows = []
    for event in events:
        if event.get("event") != "reconcile.pass" or event.get("outcome") != "success":
            continue
        windows.append(
            PassWindow(
                replica=replica,
                run_id=str(event["run_id"]),
                start=float(event["lock_held_from"]),
                end=float(event["lock_held_until"]),
                created=int(event.get("created", 0)),
                deleted=int(event.get("deleted", 0)),
                templates=frozenset(event["template_ids"]) if event.get("scope") == "targeted" else None,
            )
        )
    return windows


def _exclusive(first: PassWindow, second: PassWindow) -> bool:
    """Whether two passes hold a lock in common: two full passes (the pass lock), or two targeted passes
    with a template in common (its template lock). A targeted pass and a full one run side by side by
    design: the full pass defers the presets of the templates the targeted one holds."""
    if first.templates is None and second.templates is None:
        return True
    if first.templates is not None and second.templates is not None:
        return bool(first.templates & second.templates)
    return False


def overlapping_passes(windows: Sequence[PassWindow]) -> list[tuple[PassWindow, PassWindow]]:
    """Pairs of passes of different replicas, holding a lock in common (`_exclusive`), that overlap in
    time, at all.

    No tolerance: each window lies within the time its replica really held the lock. (Windows made from
    a pass's duration and the time of its event were wider than that, by the wait for a connection and
    the time to write the event: on a loaded machine by 0.1 s, and a tolerance had to guess.)
    """
    ordered = sorted(windows, key=lambda window: window.start)
    pairs = []
    for first, second in itertools.combinations(ordered, 2):
        if second.start >= first.end:
            continue
        if first.replica != second.replica and _exclusive(first, second):
            pairs.append((first, second))
    return pairs


# --- which process holds the reconciliation lock ----------------------------------------------------


async def lock_holder_client_ports(connection: db.Connection) -> list[int]:
    """Client ports of the backends holding the reconciliation lock (at most one, by construction)."""
    rows = await connection.fetch(
        "select a.client_port from pg_locks l join pg_stat_activity a on a.pid = l.pid "
        "where l.locktype = 'advisory' and l.granted and l.classid = 0 and l.objid = $1 "
        "and a.datname = current_database()",
        db.RECONCILIATION_LOCK_KEY,
    )
    return [row["client_port"] for row in rows if row["client_port"] is not None]


def process_owning_local_port(pids: Iterable[int], port: int) -> int | None:
    """The process (among `pids`) that owns the TCP socket bound locally to `port` (Linux /proc)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    if int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except FileNotFoundError:
            continue
    for pid in pids:
        directory = f"/proc/{pid}/fd"
        try:
            names = os.listdir(directory)
        except (FileNotFoundError, PermissionError):
            continue
        for name in names:
            try:
                link = os.readlink(os.path.join(directory, name))
            except (FileNotFoundError, PermissionError):
                continue  # closed meanwhile
            if link.startswith("socket:[") and link[8:-1] in inodes:
                return pid
    return None
