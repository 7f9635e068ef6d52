"""A synthetic fleet of prebuilt workspaces, generated with set-based SQL (seconds, not minutes).

The fleet is in the steady state a pass should find most of the time: every active preset's pool is full
(running prebuilds whose latest build is a succeeded start with one ready agent), outdated presets have
nothing running, and the history a real deployment accumulates sits beside it:

- stop/start cycles on a quarter of the live prebuilds (later starts do not always name the preset),
- claimed workspaces, now owned by users, with their own stop/start builds,
- deleted workspaces with several builds each (some failed), mostly from outdated presets,
- presets in backoff (a prebuild that failed 30 seconds before `now`, so still inside the interval),
- presets at the failure hard limit (their newest prebuilds failed; already marked `hard_limited`),
- presets with a schedule and presets with a time to live (neither changes the target or expires anything).

A pass run at `now` (the fleet's reference time) therefore has nothing to write. Presets are named by
their role (`plain-17`, `backoff-21`, `limited-102`, `scheduled-13`, `outdated-5`) so that a benchmark can
pick, say, plain presets to raise their target.

Rows are inserted in time order, as a real deployment writes them, so that the heap and index layout
(recent builds together at the end of the table) is the one production has.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from reconciler.snapshot import PREBUILDS_SYSTEM_USER_ID

# Share of the history spent on stop/start cycles of live prebuilds, and on claimed workspaces.
CYCLE_SHARE = 0.10
CLAIMED_SHARE = 0.05
BUILDS_PER_CLAIMED_WORKSPACE = 5
# One live prebuild in this many has stop/start cycles.
CYCLED_EVERY = 4
# Roles of active presets, by preset number (disjoint: n % 20 == 1, n % 100 == 2, n % 10 == 3).
BACKOFF_EVERY = 20
LIMITED_EVERY = 100
SCHEDULED_EVERY = 10
# The daemon's default failure hard limit: limited presets get this many failed prebuilds.
FAILURE_HARD_LIMIT = 3
TIME_TO_LIVE_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class FleetParameters:
    """What to generate. The defaults are the fleet L of issue 7."""

    presets: int = 10_000
    desired: int = 5
    outdated_presets: int = 2_000
    history_builds: int = 1_000_000
    # Default: one deleted workspace per five builds of history (200,000 for 1,000,000 builds).
    deleted_workspaces: int | None = None
    presets_per_template: int = 5
    organizations: int = 10
    users: int = 1_000

    def shape(self) -> FleetShape:
        return FleetShape.of(self)


@dataclass(frozen=True, slots=True)
class FleetShape:
    """The counts the generator derives from the parameters (all passed to SQL as parameters)."""

    templates: int
    running_prebuilds: int
    backoff_presets: int
    limited_presets: int
    cycles_per_cycled_workspace: int
    claimed_workspaces: int
    deleted_workspaces: int
    builds_per_deleted_workspace: int
    deleted_workspaces_with_one_more_build: int

    @classmethod
    def of(cls, parameters: FleetParameters) -> FleetShape:
        templates = max(1, -(-parameters.presets // parameters.presets_per_template))
        running = parameters.presets * parameters.desired
        backoff = parameters.presets // BACKOFF_EVERY + (1 if parameters.presets % BACKOFF_EVERY >= 1 else 0)
        limited = parameters.presets // LIMITED_EVERY + (1 if parameters.presets % LIMITED_EVERY >= 2 else 0)
        cycled = running // CYCLED_EVERY
        cycle_builds = int(parameters.history_builds * CYCLE_SHARE)
        cycles = max(1, round(cycle_builds / 2 / cycled)) if cycled else 0
        claimed = int(parameters.history_builds * CLAIMED_SHARE) // BUILDS_PER_CLAIMED_WORKSPACE
        deleted = (
            parameters.deleted_workspaces
            if parameters.deleted_workspaces is not None
            else parameters.history_builds // 5
        )
        used = running + 2 * cycles * cycled + backoff + FAILURE_HARD_LIMIT * limited
        used += claimed * BUILDS_PER_CLAIMED_WORKSPACE
        remaining = max(parameters.history_builds - used, 2 * deleted)
        per_deleted, extra = divmod(remaining, deleted) if deleted else (0, 0)
        return cls(
            templates=templates,
            running_prebuilds=running,
            backoff_presets=backoff,
            limited_presets=limited,
            cycles_per_cycled_workspace=cycles,
            claimed_workspaces=claimed,
            deleted_workspaces=deleted,
            builds_per_deleted_workspace=per_deleted,
            deleted_workspaces_with_one_more_build=extra,
        )


@dataclass(frozen=True, slots=True)
class Fleet:
    """A generated fleet: its parameters, reference time, row counts and how long it took."""

    parameters: FleetParameters
    shape: FleetShape
    now: datetime
    row_counts: dict[str, int]
    generate_seconds: float
    analyze_seconds: float

    def as_json(self) -> dict[str, Any]:
        return {
            "parameters": asdict(self.parameters),
            "shape": asdict(self.shape),
            "now": self.now.isoformat(),
            "row_counts": self.row_counts,
            "generate_seconds": round(self.generate_seconds, 2),
            "analyze_seconds": round(self.analyze_seconds, 2),
        }


# --- the statements, in order. Each names the values it binds, as $1, $2... in that order. -------------


@dataclass(frozen=True, slots=True)
class _Statement:
    sql: str
    binds: tuple[str, ...] = ()


_STATEMENTS = (
    _Statement(
        """
        create temp table fleet_organizations on commit drop as
        select n, gen_random_uuid() as id from generate_series(1, $1::int) as n
        """,
        ("organizations",),
    ),
    _Statement(
        """
        insert into organizations (id, name, created_at)
        select id, 'bench-org-' || n, $1::timestamptz - interval '365 days' from fleet_organizations
        """,
        ("now",),
    ),
    _Statement(
        """
        create temp table fleet_users on commit drop as
        select n, gen_random_uuid() as id from generate_series(1, $1::int) as n
        """,
        ("users",),
    ),
    _Statement(
        """
        insert into users (id, username, email, created_at)
        select id, 'bench-user-' || n, 'bench-user-' || n || '@example.test', $1::timestamptz - interval '300 days'
        from fleet_users
        """,
        ("now",),
    ),
    _Statement(
        """
        create temp table fleet_templates on commit drop as
        select t.n, gen_random_uuid() as id, o.id as organization_id,
               gen_random_uuid() as active_version_id, gen_random_uuid() as outdated_version_id
        from generate_series(1, $1::int) as t(n)
        join fleet_organizations o on o.n = (t.n - 1) % $2::int + 1
        """,
        ("templates", "organizations"),
    ),
    _Statement(
        """
        insert into templates (id, organization_id, name, active_version_id, created_at, updated_at)
        select id, organization_id, 'template-' || n, active_version_id,
               $1::timestamptz - interval '90 days', $1::timestamptz - interval '7 days'
        from fleet_templates
        """,
        ("now",),
    ),
    _Statement(
        """
        insert into template_versions (id, template_id, organization_id, name, created_at)
        select active_version_id, id, organization_id, 'v2', $1::timestamptz - interval '7 days'
        from fleet_templates
        union all
        select outdated_version_id, id, organization_id, 'v1', $1::timestamptz - interval '60 days'
        from fleet_templates
        """,
        ("now",),
    ),
    _Statement(
        """
        create temp table fleet_presets on commit drop as
        select gen_random_uuid() as id, j as n, t.id as template_id, t.organization_id,
               t.active_version_id as version_id, true as active,
               case
                   when j % $4::int = 1 then 'backoff'
                   when j % $5::int = 2 then 'limited'
                   when j % $6::int = 3 then 'scheduled'
                   else 'plain'
               end as role
        from generate_series(1, $1::int) as j
        join fleet_templates t on t.n = (j - 1) % $3::int + 1
        union all
        select gen_random_uuid(), k, t.id, t.organization_id, t.outdated_version_id, false, 'outdated'
        from generate_series(1, $2::int) as k
        join fleet_templates t on t.n = (k - 1) % $3::int + 1
        """,
        ("presets", "outdated_presets", "templates", "backoff_every", "limited_every", "scheduled_every"),
    ),
    _Statement(
        """
        insert into template_version_presets (
            id, template_version_id, name, desired_instances, invalidate_after_secs, scheduling_timezone,
            prebuild_status, prebuild_status_changed_at, failure_episode, last_invalidated_at, created_at)
        select id, version_id, role || '-' || n, $2::int,
               case when n % 5 = 4 then $3::int end,
               case when role = 'scheduled' then 'UTC' else '' end,
               case when role = 'limited' then 'hard_limited' else 'normal' end::prebuild_status,
               case when role = 'limited' then $1::timestamptz - interval '100 minutes' end,
               case when role = 'limited' then 1 else 0 end,
               case when n % 7 = 5 then $1::timestamptz - interval '30 days' end,
               case when active then $1::timestamptz - interval '7 days' else $1::timestamptz - interval '60 days' end
        from fleet_presets
        """,
        ("now", "desired", "time_to_live_seconds"),
    ),
    _Statement(
        """
        insert into template_version_preset_prebuild_schedules (preset_id, cron_expression, desired_instances)
        select id, '* * * * *', $1::int from fleet_presets where role = 'scheduled'
        """,
        ("desired",),
    ),
    _Statement(
        """
        create temp table fleet_workspaces on commit drop as
        -- The pools: `desired` running prebuilds per active preset, 6 to 54 hours old; some have had
        -- stop/start cycles since.
        select gen_random_uuid() as id, 'prebuild' as kind, p.id as preset_id, p.template_id, p.organization_id,
               p.version_id, $2::uuid as owner_id, false as deleted,
               $1::timestamptz - interval '6 hours' - ((p.n * $3::int + s) % 2880) * interval '1 minute'
                   as created_at,
               case when (p.n * $3::int + s) % $4::int = 0 then 1 + 2 * $5::int else 1 end as build_count,
               'succeeded' as last_status
        from fleet_presets p
        cross join generate_series(1, $3::int) as s
        where p.active
        union all
        -- Backoff: a prebuild that failed 30 seconds ago, the newest of its preset.
        select gen_random_uuid(), 'prebuild', p.id, p.template_id, p.organization_id, p.version_id, $2::uuid, false,
               $1::timestamptz - interval '30 seconds', 1, 'failed'
        from fleet_presets p
        where p.role = 'backoff'
        union all
        -- Hard limit: the preset's newest prebuilds failed two hours ago (outside the backoff lookback).
        select gen_random_uuid(), 'prebuild', p.id, p.template_id, p.organization_id, p.version_id, $2::uuid, false,
               $1::timestamptz - interval '2 hours' + s * interval '1 minute', 1, 'failed'
        from fleet_presets p
        cross join generate_series(1, $6::int) as s
        where p.role = 'limited'
        union all
        -- Claimed prebuilds, now users' workspaces with stop/start builds of their own.
        select gen_random_uuid(), 'claimed', p.id, p.template_id, p.organization_id, p.version_id, u.id, false,
               $1::timestamptz - interval '10 days' + (i % 12000) * interval '1 minute', $8::int, 'succeeded'
        from generate_series(1, $7::int) as i
        join fleet_presets p on p.active and p.n = (i - 1) % $9::int + 1
        join fleet_users u on u.n = (i - 1) % $10::int + 1
        union all
        -- Deleted workspaces of the last 60 days, mostly former prebuilds of outdated presets.
        select gen_random_uuid(), 'deleted', p.id, p.template_id, p.organization_id, p.version_id,
               case when i % 10 = 0 then u.id else $2::uuid end, true,
               $1::timestamptz - interval '60 days' + (i::float8 / $11::int) * interval '50 days',
               $13::int + (i <= $14::int)::int, 'succeeded'
        from generate_series(1, $11::int) as i
        join fleet_presets p
            on p.active = ($12::int = 0)
            and p.n = (i - 1) % (case when $12::int = 0 then $9::int else $12::int end) + 1
        join fleet_users u on u.n = (i - 1) % $10::int + 1
        """,
        (
            "now",
            "system_user",
            "desired",
            "cycled_every",
            "cycles_per_cycled_workspace",
            "failure_hard_limit",
            "claimed_workspaces",
            "builds_per_claimed_workspace",
            "presets",
            "users",
            "deleted_workspaces",
            "outdated_presets",
            "builds_per_deleted_workspace",
            "deleted_workspaces_with_one_more_build",
        ),
    ),
    _Statement(
        """
        insert into workspaces (id, owner_id, organization_id, template_id, name, deleted, created_at, updated_at)
        select id, owner_id, organization_id, template_id,
               kind || '-' || row_number() over (order by created_at, id), deleted, created_at, created_at
        from fleet_workspaces
        order by created_at
        """,
    ),
    _Statement(
        """
        create temp table fleet_builds on commit drop as
        select b.*,
               case when b.transition = 'start' and b.status = 'succeeded' then
                   case when b.build_number = b.build_count and not b.deleted then 'ready' else 'off' end
               end as agent_state
        from (
            select gen_random_uuid() as id, gen_random_uuid() as job_id, w.id as workspace_id,
                   n as build_number, w.build_count, w.deleted, w.organization_id, w.version_id,
                   case
                       when w.deleted and n = w.build_count then 'delete'
                       when n % 2 = 1 then 'start'
                       else 'stop'
                   end::workspace_transition as transition,
                   -- The first start names the preset, later ones only every other cycle (a restart need
                   -- not name one), so the current preset is often an older build's.
                   case when n % 4 = 1 and not (w.deleted and n = w.build_count) then w.preset_id end
                       as preset_id,
                   case when w.kind = 'claimed' and n > 1 then w.owner_id else $1::uuid end as initiator_id,
                   -- Live workspaces' builds a minute apart, squeezed when there are many (a small fleet
                   -- with a long history) so that all of them are older than the hard-limited presets'
                   -- failures (two hours before `now`), which must stay their newest prebuilds.
                   w.created_at
                       + (n - 1) * case
                           when w.deleted then interval '10 minutes'
                           else least(
                               interval '1 minute',
                               ($2::timestamptz - interval '3 hours' - w.created_at) / (w.build_count + 1)
                           )
                       end
                       as created_at,
                   case
                       when n = w.build_count then w.last_status
                       when w.deleted and n % 10 = 3 then 'failed'
                       else 'succeeded'
                   end as status
            from fleet_workspaces w
            cross join generate_series(1, w.build_count) as n
        ) as b
        """,
        ("system_user", "now"),
    ),
    _Statement(
        """
        insert into provisioner_jobs (id, organization_id, initiator_id, type, input, created_at, updated_at,
                                      started_at, completed_at, error)
        select job_id, organization_id, initiator_id, 'workspace_build',
               jsonb_build_object('workspace_build_id', id), created_at, created_at + interval '20 seconds',
               created_at + interval '1 second', created_at + interval '20 seconds',
               case when status = 'failed' then 'terraform apply failed' end
        from fleet_builds
        order by created_at
        """,
    ),
    _Statement(
        """
        insert into workspace_builds (id, workspace_id, build_number, transition, template_version_id,
                                      template_version_preset_id, job_id, initiator_id, reason, created_at,
                                      updated_at)
        select id, workspace_id, build_number, transition, version_id, preset_id, job_id, initiator_id,
               'initiator', created_at, created_at + interval '20 seconds'
        from fleet_builds
        order by created_at
        """,
    ),
    _Statement(
        """
        insert into workspace_agents (job_id, name, lifecycle_state, created_at)
        select job_id, 'main', agent_state::workspace_agent_lifecycle_state, created_at + interval '10 seconds'
        from fleet_builds
        where agent_state is not null
        order by created_at
        """,
    ),
)

_TABLES = (
    "organizations",
    "users",
    "templates",
    "template_versions",
    "template_version_presets",
    "template_version_preset_prebuild_schedules",
    "workspaces",
    "provisioner_jobs",
    "workspace_builds",
    "workspace_agents",
)

_COUNT_ROWS = """
select
    (select count(*) from templates) as templates,
    (select count(*) from template_version_presets where desired_instances is not null) as presets,
    (select count(*) from workspaces) as workspaces,
    (select count(*) from workspaces where deleted) as deleted_workspaces,
    (select count(*) from workspaces where owner_id = $1 and not deleted) as live_prebuilds,
    (select count(*) from workspace_builds) as builds,
    (select count(*) from provisioner_jobs) as jobs,
    (select count(*) from workspace_agents) as agents
"""


def reference_time() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


async def generate(
    connection: asyncpg.Connection,
    parameters: FleetParameters,
    *,
    now: datetime | None = None,
    analyze: bool = True,
) -> Fleet:
    """Fill a migrated, empty database with the fleet, then VACUUM ANALYZE it (as autovacuum would)."""
    now = now or reference_time()
    shape = parameters.shape()
    values: dict[str, object] = {
        **asdict(parameters),
        **asdict(shape),
        "now": now,
        "system_user": PREBUILDS_SYSTEM_USER_ID,
        "backoff_every": BACKOFF_EVERY,
        "limited_every": LIMITED_EVERY,
        "scheduled_every": SCHEDULED_EVERY,
        "cycled_every": CYCLED_EVERY,
        "failure_hard_limit": FAILURE_HARD_LIMIT,
        "builds_per_claimed_workspace": BUILDS_PER_CLAIMED_WORKSPACE,
        "time_to_live_seconds": TIME_TO_LIVE_SECONDS,
    }
    started = time.perf_counter()
    is_superuser = await connection.fetchval("select rolsuper from pg_roles where rolname = current_user")
    async with connection.transaction():
        await connection.execute("set local work_mem = '256MB'")
        if is_superuser:
            # Every reference is consistent by construction; skipping the row-by-row foreign key checks
            # makes loading several times faster. Without the privilege the checks simply run.
            await connection.execute("set local session_replication_role = replica")
        for statement in _STATEMENTS:
            await connection.execute(statement.sql, *(values[name] for name in statement.binds))
    generated = time.perf_counter()
    if analyze:
        # Production tables are vacuumed and analyzed by autovacuum; a freshly loaded one is neither.
        await connection.execute("vacuum (analyze) " + ", ".join(_TABLES))
    analyzed = time.perf_counter()
    counts = await connection.fetchrow(_COUNT_ROWS, PREBUILDS_SYSTEM_USER_ID)
    assert counts is not None
    return Fleet(
        parameters=parameters,
        shape=shape,
        now=now,
        row_counts={key: int(value) for key, value in counts.items()},
        generate_seconds=generated - started,
        analyze_seconds=analyzed - generated,
    )


async def raise_targets(connection: asyncpg.Connection, creates: int) -> int:
    """Raise the targets of plain presets so that the next pass must create `creates` prebuilds.

    Spreads the creates over as many plain presets as possible (one or more each); returns the number of
    presets changed.
    """
    plain = int(
        await connection.fetchval(
            "select count(*) from template_version_presets where name like 'plain-%' and desired_instances is not null"
        )
    )
    if creates <= 0 or plain == 0:
        return 0
    per_preset, extra = divmod(creates, plain)
    # Presets ranked 1..extra get one more than the others; ranks beyond `creates` get none.
    status = await connection.execute(
        """
        with ranked as (
            select id, row_number() over (order by id) as rank
            from template_version_presets
            where name like 'plain-%' and desired_instances is not null
        )
        update template_version_presets p
        set desired_instances = p.desired_instances + $1::int + (ranked.rank <= $2::int)::int
        from ranked
        where ranked.id = p.id and $1::int + (ranked.rank <= $2::int)::int > 0
        """,
        per_preset,
        extra,
    )
    return int(status.split()[-1])
