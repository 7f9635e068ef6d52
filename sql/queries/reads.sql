-- The reads of one pass, and its lock. The reads run in one REPEATABLE READ, read-only transaction; none
-- is per preset.
-- The prebuilds system user c42fdf75-3097-471c-8c33-fb52454d81c0 is written literally (not as a
-- parameter) so that the planner can match the partial index workspaces_live_prebuilds_idx, which a
-- generic plan for a parameter could not.
--
-- A targeted pass (BEHAVIOR.md, "Change events") runs the same statements restricted to some templates:
-- a line ending in `-- targeted` is in its variant only, and names the template ids as an array (the
-- last parameter). The full pass's statements do not have those lines at all, rather than a
-- `$n is null or ...` that a generic plan would have to estimate for both uses. The same way, a line
-- ending in `-- only in NAME` is in the variant `verb_noun_NAME` alone, one ending in `-- not in NAME` in
-- every form but that one (reconciler/db.py parse_queries).

-- name: try_reconciliation_lock
-- The pass lock, held by the session (not a transaction), on the pass's own connection, so that it holds
-- while that connection waits outside any transaction for the executor's writes. While it is held, the
-- session ends after idling for $2 milliseconds (the pass's deadline and a margin): a replica stopped
-- mid-pass (SIGSTOP, a frozen VM) does not keep the lock forever.
select pg_try_advisory_lock($1::bigint) as locked, set_config('idle_session_timeout', $2::text, false)

-- name: release_reconciliation_lock
-- False when the session no longer held the lock. The idle limit goes back to the connection's own.
select pg_advisory_unlock($1::bigint) as held, set_config('idle_session_timeout', '0', false)

-- name: try_template_locks
-- The template locks (docs/DECISIONS.md, "Targeted passes beside full passes"): $1 the lock class, $2
-- templates. A session lock per template, keyed by the hash of its id in the class's own key space
-- (two templates that share a hash merely exclude each other too). Never waits: each key is tried once;
-- the caller keeps what was granted, or releases it all. One row per template: its key and whether it is
-- held now. A targeted pass holds its templates' locks, exclusive, from before its snapshot to after its
-- writes. A full pass holds a preset's template lock shared (`try_template_locks_shared`) while it writes
-- that preset: its own writers, many at once, never exclude each other, and exclude any targeted pass.
with keys as (
    select distinct hashtext(template_id::text) as key from unnest($2::uuid[]) as template_id
),
taken as materialized (
    select key, pg_try_advisory_lock($1::integer, key) as locked from keys  -- not in shared
    select key, pg_try_advisory_lock_shared($1::integer, key) as locked from keys  -- only in shared
)
select template_id, taken.key, taken.locked
from unnest($2::uuid[]) as template_id
join taken on taken.key = hashtext(template_id::text)

-- name: release_template_locks
-- $1 the lock class, $2 keys taken by `try_template_locks` (`release_template_locks_shared`: by
-- `try_template_locks_shared`) on this session. Returns how many were still held (fewer: the session lost
-- them, as a lost connection does).
select count(*) filter (where pg_advisory_unlock($1::integer, key))::integer as held  -- not in shared
select count(*) filter (where pg_advisory_unlock_shared($1::integer, key))::integer as held  -- only in shared
from unnest($2::integer[]) as key

-- name: try_template_locks_in_transaction
-- `try_template_locks_shared` held to the end of the caller's transaction instead (a full pass's status
-- changes). Returns the templates of $2 whose lock the transaction holds.
with keys as (
    select distinct hashtext(template_id::text) as key from unnest($2::uuid[]) as template_id
),
taken as materialized (
    select key, pg_try_advisory_xact_lock_shared($1::integer, key) as locked from keys
)
select template_id
from unnest($2::uuid[]) as template_id
join taken on taken.key = hashtext(template_id::text)
where taken.locked

-- name: limit_idle_session
-- While a targeted pass holds its template locks on this session, the server ends the session once it
-- has idled $1 milliseconds (as `try_reconciliation_lock` does); '0' gives the connection its own again.
select set_config('idle_session_timeout', $1::text, false)

-- name: read_prebuilds_settings
select value from site_configs where key = 'prebuilds_settings'

-- name: snapshot_presets
-- Every preset that has prebuilds, on any version, deleted templates included.
select
    p.id,
    p.name,
    p.template_version_id,
    tv.name as template_version_name,
    t.id as template_id,
    t.name as template_name,
    o.id as organization_id,
    o.name as organization_name,
    p.desired_instances,
    p.invalidate_after_secs,
    p.scheduling_timezone,
    p.prebuild_status::text as prebuild_status,
    -- Times another component wrote may lie beyond what Python's datetime holds (years 1 to 9999), which
    -- asyncpg cannot decode: the whole statement would fail, for every preset. Outside that range they
    -- read as `infinity` or `-infinity`, which is what they mean to every rule. (So below, in
    -- snapshot_prebuilds, for every time read.)
    case when p.last_invalidated_at > '9999-12-31 23:59:59.999999+00' then 'infinity'
         when p.last_invalidated_at < '0001-01-01 00:00:00+00' then '-infinity'
         else p.last_invalidated_at end as last_invalidated_at,
    t.active_version_id is not distinct from p.template_version_id as is_active_version,
    t.deleted as template_deleted,
    t.deprecated <> '' as template_deprecated,
    p.failure_episode,
    case when p.prebuild_status_changed_at > '9999-12-31 23:59:59.999999+00' then 'infinity'
         when p.prebuild_status_changed_at < '0001-01-01 00:00:00+00' then '-infinity'
         else p.prebuild_status_changed_at end as prebuild_status_changed_at,
    p.desired_instances_expression
from template_version_presets p
join template_versions tv on tv.id = p.template_version_id
join templates t on t.id = tv.template_id
join organizations o on o.id = t.organization_id
where p.desired_instances is not null
    and t.id = any($1::uuid[])  -- targeted
order by t.name, tv.created_at, p.name, p.id

-- name: snapshot_schedules
select s.preset_id, s.cron_expression, s.desired_instances
from template_version_preset_prebuild_schedules s
join template_version_presets p on p.id = s.preset_id
where p.desired_instances is not null
    and p.template_version_id in (select id from template_versions where template_id = any($1::uuid[]))  -- targeted
order by s.preset_id, s.id

-- name: snapshot_in_flight
-- The prebuild build jobs in flight, per template, for the in-flight budget (issue 15.1): jobs pending or
-- running of any build of a workspace the prebuilds user owns, creates and deletes alike, whoever
-- started them (a delete an administrator asked for takes a provisioner all the same). Deleted
-- workspaces count too: a delete build's job is in flight until it completes, whatever marks the
-- workspace deleted meanwhile. Starts from the unfinished jobs (a partial index: few rows, however long
-- the history), then two primary-key lookups per job.
select w.template_id, count(*)::integer as jobs
from provisioner_jobs job
join workspace_builds b on b.job_id = job.id
join workspaces w on w.id = b.workspace_id
where job.job_status in ('pending', 'running')
    and w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
group by w.template_id
order by w.template_id

-- name: snapshot_breaker
-- The global breaker (issue 15.2): its row, its current episode (while open or half-open), and its
-- evidence. $1 the start of the window (now - RECONCILER_BREAKER_WINDOW); the window never starts before
-- the breaker last changed state, so the failures that opened it cannot open it again once it closes.
-- Evidence: first (create) builds of prebuilds that completed in the window, succeeded or failed (a
-- canceled one is neither), from the partial index on prebuild jobs' completion. Probes: while
-- half-open, the create builds created since it turned half-open, by outcome; otherwise not read.
with breaker as (
    select b.*, greatest($1::timestamptz, coalesce(b.changed_at, '-infinity')) as window_start
    from prebuild_breaker b
),
completed as (
    select job.job_status, build.template_version_preset_id as preset_id, job.created_at
    from provisioner_jobs job
    join workspace_builds build on build.job_id = job.id
    where job.initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and job.completed_at is not null
        and job.completed_at >= (select window_start from breaker)
        and job.job_status in ('succeeded', 'failed')
        and build.transition = 'start' and build.build_number = 1
        and build.template_version_preset_id is not null
),
probes as (
    select job.job_status
    from provisioner_jobs job
    join workspace_builds build on build.job_id = job.id
    where (select state from breaker) = 'half_open'
        and job.initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
        and job.created_at >= (select changed_at from breaker)
        and job.job_status in ('pending', 'running', 'succeeded', 'failed')
        and build.transition = 'start' and build.build_number = 1
        and build.template_version_preset_id is not null
)
select
    b.state, b.episode, b.changed_at, b.open_until, b.open_duration,
    e.opened_at, e.failures_since,
    (select count(*) from completed)::integer as completed,
    (select count(*) from completed where job_status = 'failed')::integer as failed,
    (select count(distinct preset_id) from completed where job_status = 'failed')::integer as failed_presets,
    (select count(*) from probes where job_status = 'succeeded')::integer as probes_succeeded,
    (select count(*) from probes where job_status = 'failed')::integer as probes_failed,
    (select count(*) from probes where job_status in ('pending', 'running'))::integer as probes_in_flight
from breaker b
left join prebuild_breaker_episodes e on e.episode = b.episode and b.state <> 'closed'

-- name: count_prebuild_creates_in_flight
-- The slow start's count (RECONCILER_SLOW_START): first (create) builds of prebuilds whose job is pending
-- or running. Read in the snapshot, and again under the in-flight budget's lock when a create is written
-- while the slow start holds (a statement of its own, so that it sees every create a previous holder
-- committed). Starts from the unfinished jobs, as `snapshot_in_flight` does, then looks each one's build up
-- by its job (the lateral's limit keeps that lookup per job: without statistics, as the daemon's role
-- plans it, a join could instead read every first build of every preset).
select count(*)::integer
from provisioner_jobs job
cross join lateral (
    select 1
    from workspace_builds build
    where build.job_id = job.id
        and build.transition = 'start' and build.build_number = 1
        and build.template_version_preset_id is not null
    limit 1
) as create_build
where job.initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
    and job.job_status in ('pending', 'running')

-- name: prebuild_create_succeeded_since
-- The slow start's evidence: whether a first (create) build of a prebuild completed successfully since $1
-- (now - RECONCILER_BREAKER_WINDOW), from the partial index on prebuild jobs' completion.
select exists (
    select 1
    from provisioner_jobs job
    join workspace_builds build on build.job_id = job.id
    where job.initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and job.completed_at is not null
        and job.completed_at >= $1
        and job.job_status = 'succeeded'
        and build.transition = 'start' and build.build_number = 1
        and build.template_version_preset_id is not null
)

-- name: snapshot_demand
-- Claim events of the presets that have a target expression (docs/DEMAND.md), per window ending at $1
-- (the pass's now): claims_Xm and misses_Xm for X in 5, 10, 30, 60, 120, the hour that started exactly 7
-- days ago, and whether the preset has had any claim event since its version was published. Presets
-- without an expression are not read at all. Each preset is one range scan of
-- prebuild_events_preset_created_idx over the last two hours and one over last week's hour, so the cost
-- follows the presets and their recent events, never the table's age. Recent windows have no upper
-- bound: an event stamped a little ahead of our clock is demand all the same. Targeted: $2 template ids.
select
    p.id as preset_id,
    coalesce(recent.claims_5m, 0) as claims_5m,
    coalesce(recent.claims_10m, 0) as claims_10m,
    coalesce(recent.claims_30m, 0) as claims_30m,
    coalesce(recent.claims_60m, 0) as claims_60m,
    coalesce(recent.claims_120m, 0) as claims_120m,
    coalesce(recent.misses_5m, 0) as misses_5m,
    coalesce(recent.misses_10m, 0) as misses_10m,
    coalesce(recent.misses_30m, 0) as misses_30m,
    coalesce(recent.misses_60m, 0) as misses_60m,
    coalesce(recent.misses_120m, 0) as misses_120m,
    coalesce(last_week.claims, 0) as claims_next_60m_last_week,
    coalesce(last_week.misses, 0) as misses_next_60m_last_week,
    exists (
        select 1 from prebuild_events e
        where e.preset_id = p.id and e.created_at >= tv.created_at
            and e.event_type in ('claim_succeeded', 'claim_missed')
    ) as has_history
from template_version_presets p
join template_versions tv on tv.id = p.template_version_id
cross join lateral (
    select
        count(*) filter (where e.event_type = 'claim_succeeded' and e.created_at > $1::timestamptz - interval '5 minutes')
            as claims_5m,
        count(*) filter (where e.event_type = 'claim_succeeded' and e.created_at > $1::timestamptz - interval '10 minutes')
            as claims_10m,
        count(*) filter (where e.event_type = 'claim_succeeded' and e.created_at > $1::timestamptz - interval '30 minutes')
            as claims_30m,
        count(*) filter (where e.event_type = 'claim_succeeded' and e.created_at > $1::timestamptz - interval '60 minutes')
            as claims_60m,
        count(*) filter (where e.event_type = 'claim_succeeded') as claims_120m,
        count(*) filter (where e.event_type = 'claim_missed' and e.created_at > $1::timestamptz - interval '5 minutes')
            as misses_5m,
        count(*) filter (where e.event_type = 'claim_missed' and e.created_at > $1::timestamptz - interval '10 minutes')
            as misses_10m,
        count(*) filter (where e.event_type = 'claim_missed' and e.created_at > $1::timestamptz - interval '30 minutes')
            as misses_30m,
        count(*) filter (where e.event_type = 'claim_missed' and e.created_at > $1::timestamptz - interval '60 minutes')
            as misses_60m,
        count(*) filter (where e.event_type = 'claim_missed') as misses_120m
    from prebuild_events e
    where e.preset_id = p.id and e.created_at > $1::timestamptz - interval '120 minutes'
) recent
cross join lateral (
    -- The hour that started exactly 7 days ago: [now - 7 days, now - 7 days + 1 hour).
    select
        count(*) filter (where e.event_type = 'claim_succeeded') as claims,
        count(*) filter (where e.event_type = 'claim_missed') as misses
    from prebuild_events e
    where e.preset_id = p.id
        and e.created_at >= $1::timestamptz - interval '7 days' and e.created_at < $1::timestamptz - interval '7 days' + interval '1 hour'
) last_week
-- Blank (whitespace only) is no expression, as in the planner.
where p.desired_instances is not null and p.desired_instances_expression ~ '[^[:space:]]'  -- not in one_preset
    and tv.template_id = any($2::uuid[])  -- targeted
-- `presets check-expression EXPR PRESET` reads one preset's windows ($2), whether or not it has an
-- expression (the one being checked may be its first).
where p.id = $2  -- only in one_preset


-- name: snapshot_prebuilds
-- One statement, so that the latest build of each live prebuild is looked up once (the materialized
-- CTE `live`) and every other figure is derived from that small set: its size is the number of live
-- prebuilds, whatever the length of the build history. Rows are tagged by `kind`, each kind with columns
-- of its own (see the final select):
--   running      per current preset and version: workspaces, readiness and created_at as arrays
--   in_progress  count of system-initiated pending/running builds per preset, version and transition,
--                with the creation time of the oldest one still pending
--   pending      count of pending first builds on a non-active version, per preset
--   backoff      num_failed and last_build_at per preset in backoff (BEHAVIOR.md 3.1)
--   failures     per preset: hard-limit verdict, newest failure's error and code, recent failure count
-- Parameters: $1 start of the backoff lookback window, $2 failure hard limit (0 disables),
-- $3 non-retryable error codes, $4 capacity error codes (not the template's fault); targeted: $5 template ids.
--
-- Shape matters here more than anywhere (see PERFORMANCE-NOTES): "is this the template's active
-- version" is computed once per version and per preset as a column of two small sets (`versions`,
-- `preset_info`), and the live builds are joined to them by a single equality. Joining the live builds
-- to `templates on t.active_version_id = tv.id and tv.template_id = t.id` instead lets the planner
-- estimate that correlated join at one row, pick a nested loop, and take seconds to minutes at scale.
with versions as materialized (
    select tv.id as template_version_id, coalesce(t.active_version_id = tv.id, false) as is_active
    from template_versions tv
    left join templates t on t.id = tv.template_id
    where tv.template_id = any($5::uuid[])  -- targeted
),
preset_info as materialized (
    select p.id as preset_id, p.desired_instances, p.failure_reset_at, t.deleted as template_deleted,
           coalesce(t.active_version_id = p.template_version_id, false) as on_active_version
    from template_version_presets p
    join template_versions tv on tv.id = p.template_version_id
    join templates t on t.id = tv.template_id
    where p.desired_instances is not null
        and t.id = any($5::uuid[])  -- targeted
),
live as materialized (
    select
        w.id as workspace_id,
        w.created_at as workspace_created_at,
        latest.build_number,
        latest.transition,
        latest.template_version_id,
        latest.initiator_id,
        latest.created_at as build_created_at,
        -- A build counts for the preset it names, else for the workspace's current preset.
        coalesce(latest.template_version_preset_id, current_preset.id) as preset_id,
        current_preset.id as current_preset_id,
        job.id as job_id,
        job.job_status,
        job.worker_id,
        job.error,
        job.error_code
    from workspaces w
    cross join lateral (
        select b.build_number, b.transition, b.template_version_id, b.template_version_preset_id,
               b.initiator_id, b.created_at, b.job_id
        from workspace_builds b
        where b.workspace_id = w.id
        order by b.build_number desc
        limit 1
    ) latest
    join provisioner_jobs job on job.id = latest.job_id
    -- The current preset is the latest build's own when it is a start naming one (most prebuilds): the
    -- CASE only looks further back in the history for the others, saving one lookup per prebuild.
    cross join lateral (
        select case
            when latest.transition = 'start' and latest.template_version_preset_id is not null
                then latest.template_version_preset_id
            else (
                select b.template_version_preset_id
                from workspace_builds b
                where b.workspace_id = w.id and b.transition = 'start' and b.template_version_preset_id is not null
                order by b.build_number desc
                limit 1
            )
        end as id
    ) current_preset
    where w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and not w.deleted
        and w.template_id = any($5::uuid[])  -- targeted
),
-- Latest start builds of live prebuilds on their template's active version: the evidence for backoff
-- and for the hard limit. `rank` 1 is the newest prebuild of the preset.
starts as materialized (
    select
        live.preset_id,
        live.workspace_id,
        live.build_created_at,
        live.job_status,
        live.error,
        live.error_code,
        preset_info.desired_instances,
        preset_info.failure_reset_at,
        preset_info.template_deleted,
        row_number() over (partition by live.preset_id order by live.build_created_at desc, live.workspace_id)
            as rank,
        -- A failure of a build created during a breaker episode is the shared outage's, not the preset's
        -- (issue 15.2): it counts for neither backoff nor the hard limit.
        live.job_status = 'failed' and exists (
            select 1 from prebuild_breaker_episodes episode
            where live.build_created_at >= episode.failures_since
                and (episode.closed_at is null or live.build_created_at < episode.closed_at)
        ) as outage
    from live
    join preset_info on preset_info.preset_id = live.preset_id
    where live.transition = 'start' and preset_info.on_active_version
),
-- In backoff: one of the N newest prebuilds failed inside the window. num_failed counts every failure
-- in the window, not only those among the N newest. One aggregate over `starts`: joining `starts` to an
-- aggregate of itself let the planner pick a nested loop over the whole set.
backoff as (
    select
        starts.preset_id,
        count(*) filter (
            where starts.job_status = 'failed' and not starts.outage and starts.build_created_at >= $1
        ) as num_failed,
        max(starts.build_created_at) filter (
            where starts.rank <= starts.desired_instances
                and starts.job_status = 'failed' and not starts.outage and starts.build_created_at >= $1
        ) as last_build_at
    from starts
    where not starts.template_deleted
    group by starts.preset_id
    having bool_or(
        starts.rank <= starts.desired_instances and starts.job_status = 'failed' and not starts.outage
            and starts.build_created_at >= $1
    )
),
-- For the hard limit, failures caused by capacity (quota) are neither a failure nor a success, and
-- builds from before an operator's reset no longer count. A prebuild still in progress is "not failed".
limit_evidence as (
    select
        starts.*,
        -- Ties (prebuilds created at the same instant) broken as `rank` breaks them, so that the verdict
        -- cannot flip between passes on an unchanged history.
        row_number() over (partition by starts.preset_id order by starts.build_created_at desc, starts.rank)
            as limit_rank
    from starts
    -- coalesce: a failure without a code is a plain failure (null = any(...) would drop the row).
    where not (starts.job_status = 'failed' and coalesce(starts.error_code, '') = any($4::text[]))
        and not starts.outage
        and (starts.failure_reset_at is null or starts.build_created_at > starts.failure_reset_at)
),
failures as (
    select
        limit_evidence.preset_id,
        $2::int > 0
            and count(*) filter (where limit_evidence.limit_rank <= $2::int) = $2::int
            and bool_and(limit_evidence.job_status = 'failed') filter (where limit_evidence.limit_rank <= $2::int)
            as hard_limited,
        (array_agg(limit_evidence.error order by limit_evidence.limit_rank)
            filter (where limit_evidence.job_status = 'failed'))[1] as last_error,
        (array_agg(limit_evidence.error_code order by limit_evidence.limit_rank)
            filter (where limit_evidence.job_status = 'failed'))[1] as last_error_code,
        max(limit_evidence.build_created_at) filter (where limit_evidence.job_status = 'failed') as last_failed_at,
        -- The failed prebuilds that make the verdict (newest first), for the operator to look at.
        array_agg(limit_evidence.workspace_id order by limit_evidence.limit_rank) filter (
            where limit_evidence.job_status = 'failed' and limit_evidence.limit_rank <= greatest($2::int, 1)
        ) as failed_workspace_ids,
        -- Consecutive failures from the newest prebuild back to the newest one that did not fail.
        coalesce(
            min(limit_evidence.limit_rank) filter (where limit_evidence.job_status <> 'failed') - 1,
            count(*)
        ) as failure_streak,
        (array_agg(limit_evidence.job_status order by limit_evidence.limit_rank))[1] = 'failed'
            and coalesce((array_agg(limit_evidence.error_code order by limit_evidence.limit_rank))[1], '')
                = any($3::text[]) as validation_failed
    from limit_evidence
    group by limit_evidence.preset_id
    having bool_or(limit_evidence.job_status = 'failed')
),
-- Failed prebuilds (latest build a failed start), for their cleanup (issue 15.5), on any version. The
-- evidence of a verdict is protected, so that a cleanup never changes one: the newest failures the hard
-- limit and the validation check read (limit_rank within the hard limit, at least the newest), and every
-- failure inside the backoff lookback. Deleting older ones changes no rank of a newer one.
-- An uncorrelated IN, not a correlated EXISTS: the server hashes the evidence once (a hashed SubPlan);
-- EXISTS over the CTE scanned all of it again for every failed prebuild (1.5 s of a 3.5 s snapshot at
-- fleet L with 300 failed prebuilds).
failed_prebuilds as (
    select live.current_preset_id as preset_id, live.workspace_id, live.build_created_at,
           live.build_created_at >= $1 or live.workspace_id in (
               select limit_evidence.workspace_id from limit_evidence
               where limit_evidence.limit_rank <= greatest($2::int, 1)
           ) as protected
    from live
    where live.transition = 'start' and live.job_status = 'failed' and live.current_preset_id is not null
)
-- Each kind of row has its own columns, named for what they hold, and null in the other kinds' rows (a
-- null costs one bit of the row's null bitmap, nothing to decode): `kind`, `preset_id` and
-- `template_version_id` are shared; then the running prebuilds' arrays, the in-progress builds, the
-- pending builds of other versions, the backoff, the failures, the failed prebuilds (`cleanup_`).
--
-- Running prebuilds come grouped by preset (and version), as arrays ordered oldest first: a fleet has tens
-- of thousands of them, and a few thousand rows of arrays decode far cheaper than one row each.
select 'running' as kind, live.current_preset_id as preset_id, live.template_version_id,
       array_agg(live.workspace_id order by live.workspace_created_at, live.workspace_id) as workspace_ids,
       array_agg(readiness.ready order by live.workspace_created_at, live.workspace_id) as ready_flags,
       array_agg(
           case when live.workspace_created_at > '9999-12-31 23:59:59.999999+00' then 'infinity'
                when live.workspace_created_at < '0001-01-01 00:00:00+00' then '-infinity'
                else live.workspace_created_at end
           order by live.workspace_created_at, live.workspace_id
       ) as created_ats,
       null::text as in_progress_transition, null::bigint as in_progress_count,
       null::timestamptz as in_progress_oldest_pending_at,
       null::bigint as pending_count,
       null::bigint as num_failed, null::timestamptz as last_build_at,
       null::bool as hard_limited, null::bool as validation_failed, null::bigint as failure_streak,
       null::text as last_error, null::text as last_error_code, null::timestamptz as last_failed_at,
       null::uuid[] as failed_workspace_ids,
       null::uuid[] as cleanup_workspace_ids, null::timestamptz[] as cleanup_failed_ats,
       null::bool[] as cleanup_protected
from live
cross join lateral (
    select coalesce((
        -- Ready when every live top-level agent is ready; a workspace without agents is not.
        select bool_and(agent.lifecycle_state = 'ready')
        from workspace_agents agent
        where agent.job_id = live.job_id and agent.parent_id is null and not agent.deleted
    ), false) as ready
) readiness
where live.transition = 'start' and live.job_status = 'succeeded' and live.current_preset_id is not null
group by live.current_preset_id, live.template_version_id
union all
select 'in_progress', live.preset_id, live.template_version_id,
       null, null, null,
       live.transition::text, count(*),
       -- The oldest build still waiting for a provisioner (for `status`: a stuck queue shows its age).
       min(case when live.build_created_at > '9999-12-31 23:59:59.999999+00' then 'infinity'
                when live.build_created_at < '0001-01-01 00:00:00+00' then '-infinity'
                else live.build_created_at end) filter (where live.job_status = 'pending'),
       null,
       null, null,
       null, null, null, null, null, null, null,
       null, null, null
from live
join versions on versions.template_version_id = live.template_version_id
where versions.is_active and live.initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
    and live.job_status in ('pending', 'running')
    and live.preset_id is not null
group by live.preset_id, live.template_version_id, live.transition
union all
select 'pending', live.preset_id, null,
       null, null, null,
       null, null, null,
       count(*),
       null, null,
       null, null, null, null, null, null, null,
       null, null, null
from live
join versions on versions.template_version_id = live.template_version_id
where live.build_number = 1 and live.transition = 'start' and live.job_status = 'pending'
    and live.worker_id is null
    and not versions.is_active
    and live.preset_id is not null
group by live.preset_id
union all
select 'backoff', preset_id, null,
       null, null, null,
       null, null, null,
       null,
       num_failed,
       case when last_build_at > '9999-12-31 23:59:59.999999+00' then 'infinity'
            when last_build_at < '0001-01-01 00:00:00+00' then '-infinity'
            else last_build_at end,
       null, null, null, null, null, null, null,
       null, null, null
from backoff
union all
select 'failures', preset_id, null,
       null, null, null,
       null, null, null,
       null,
       null, null,
       hard_limited, validation_failed, failure_streak, last_error, last_error_code,
       case when last_failed_at > '9999-12-31 23:59:59.999999+00' then 'infinity'
            when last_failed_at < '0001-01-01 00:00:00+00' then '-infinity'
            else last_failed_at end,
       failed_workspace_ids,
       null, null, null
from failures
union all
select 'failed', preset_id, null,
       null, null, null,
       null, null, null,
       null,
       null, null,
       null, null, null, null, null, null, null,
       array_agg(workspace_id order by build_created_at, workspace_id),
       array_agg(
           case when build_created_at > '9999-12-31 23:59:59.999999+00' then 'infinity'
                when build_created_at < '0001-01-01 00:00:00+00' then '-infinity'
                else build_created_at end
           order by build_created_at, workspace_id
       ),
       array_agg(protected order by build_created_at, workspace_id)
from failed_prebuilds
group by preset_id

-- name: read_recorded_settings
-- The daemon's behaviour settings as its last pass recorded them (no row: no pass yet).
select settings::text as settings, instance, recorded_at, last_pass_at from reconciler_settings

-- name: oldest_pending_prebuild_jobs
-- Per organization, the oldest prebuild job that no provisioner has started yet (the waiting-jobs alert),
-- as seconds before $1 (the daemon's now); 0 for an organization with none. Few jobs are ever unfinished:
-- the partial index provisioner_jobs_unfinished_idx holds them. Not part of a pass.
select o.name as organization_name,
       coalesce(greatest(extract(epoch from ($1::timestamptz - min(j.created_at))), 0), 0)::float8 as age_seconds
from organizations o
left join provisioner_jobs j
    on j.organization_id = o.id
    and j.job_status = 'pending'
    and j.type = 'workspace_build'
    and j.initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
group by o.name
