-- The writes of a pass and of the operator commands. Each create, delete and cancel statement is one
-- atomic unit: either every row of it lands or none does.

-- name: lock_preset_for_create
-- Serializes creators of one preset (replicas, a manual `reconcile --once`) with each other and with a
-- platform change that locks the preset's row. Only the lock: under READ COMMITTED, a `FOR UPDATE` that
-- waited re-reads the locked row alone, and everything else the same statement read (schedules, the
-- template's active version) would be from before the lock was granted. Returns the preset's id (no
-- row: no such preset).
select p.id from template_version_presets p where p.id = $1 for update

-- name: read_preset_for_create
-- Run right after `lock_preset_for_create`, in the same transaction, so that its snapshot includes every
-- change committed before the lock was granted. What a create must still be true of: the preset has
-- prebuilds, is active, and may create; and what its target is made of now (desired count, schedules in
-- snapshot order, time zone, expression), since the platform may have changed any of them after the pass's
-- snapshot. `read_preset_for_create_batch`: the same for the presets $1 of a batch (after
-- `lock_presets_for_create`), with their ids.
select
    p.id,
    p.desired_instances,
    p.scheduling_timezone,
    array(
        select s.cron_expression from template_version_preset_prebuild_schedules s
        where s.preset_id = p.id order by s.id
    ) as schedule_crons,
    array(
        select s.desired_instances from template_version_preset_prebuild_schedules s
        where s.preset_id = p.id order by s.id
    ) as schedule_instances,
    p.prebuild_status::text as prebuild_status,
    t.active_version_id is not distinct from p.template_version_id and not t.deleted and t.deprecated = ''
        as active,
    t.id as template_id,
    t.organization_id,
    p.desired_instances_expression
from template_version_presets p
join template_versions tv on tv.id = p.template_version_id
join templates t on t.id = tv.template_id
where p.id = $1  -- not in batch
where p.id = any($1::uuid[])  -- only in batch

-- name: count_preset_prebuilds
-- Fresh count for the create clamp: live prebuilds of the preset that are running or on their way
-- (latest build a start that has not failed or been canceled), counted for their current preset as the
-- plan counts them: the preset of the workspace's latest start naming one (a later stop and start may
-- name none). `count_preset_prebuilds_batch`: the same for a batch, $1 presets and $2 templates, by
-- current preset and template (the caller keeps each preset's pair with its own template).
select count(*)  -- not in batch
select current_preset.template_version_preset_id as preset_id, w.template_id, count(*)::integer as prebuilds  -- only in batch
from workspaces w
cross join lateral (
    select b.transition, b.job_id
    from workspace_builds b
    where b.workspace_id = w.id
    order by b.build_number desc
    limit 1
) latest
join provisioner_jobs job on job.id = latest.job_id
cross join lateral (
    select b.template_version_preset_id
    from workspace_builds b
    where b.workspace_id = w.id and b.transition = 'start' and b.template_version_preset_id is not null
    order by b.build_number desc
    limit 1
) current_preset
where w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and not w.deleted
    and w.template_id = $2  -- not in batch
    and w.template_id = any($2::uuid[])  -- only in batch
    and latest.transition = 'start'
    and current_preset.template_version_preset_id = $1  -- not in batch
    and current_preset.template_version_preset_id = any($1::uuid[])  -- only in batch
    and job.job_status in ('pending', 'running', 'succeeded')
group by 1, 2  -- only in batch

-- name: lock_in_flight_budget
-- $1 the lock's key. Serializes the writers of the in-flight budget (creates and deletes of every replica
-- and pass) for the rest of the transaction: taken before anything else the write locks, then the jobs
-- in flight are counted afresh (`count_in_flight`, a statement of its own, so that it sees every job a
-- previous holder committed), so that two writers never both spend the same room. Taken only when a
-- budget is set.
select pg_advisory_xact_lock($1::bigint)

-- name: count_in_flight
-- $1 template. The jobs in flight as `snapshot_in_flight` counts them, across the deployment and for
-- one template, right now (under `lock_in_flight_budget`).
select count(*)::integer as total, (count(*) filter (where w.template_id = $1))::integer as template
from provisioner_jobs job
join workspace_builds b on b.job_id = job.id
join workspaces w on w.id = b.workspace_id
where job.job_status in ('pending', 'running')
    and w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'

-- name: create_prebuilds
-- $1 preset, $2 template version, $3 template, $4 organization, $5 names, $6 now.
-- One workspace, one first build and one pending provisioner job per name, in one statement.
with fresh as (
    select gen_random_uuid() as workspace_id, gen_random_uuid() as job_id, gen_random_uuid() as build_id, name
    from unnest($5::text[]) as name
),
inserted_workspaces as (
    insert into workspaces (id, owner_id, organization_id, template_id, name, created_at, updated_at)
    select workspace_id, 'c42fdf75-3097-471c-8c33-fb52454d81c0', $4, $3, name, $6, $6 from fresh
),
inserted_jobs as (
    insert into provisioner_jobs (id, organization_id, initiator_id, type, input, created_at, updated_at)
    select job_id, $4, 'c42fdf75-3097-471c-8c33-fb52454d81c0', 'workspace_build',
           jsonb_build_object('workspace_build_id', build_id), $6, $6
    from fresh
)
insert into workspace_builds (id, workspace_id, build_number, transition, template_version_id,
                              template_version_preset_id, job_id, initiator_id, reason, created_at, updated_at)
select build_id, workspace_id, 1, 'start', $2, $1, job_id, 'c42fdf75-3097-471c-8c33-fb52454d81c0',
       'initiator', $6, $6
from fresh
returning workspace_id

-- name: lock_presets_for_create
-- The batch form of `lock_preset_for_create` (a batch of presets that only create, in one transaction):
-- $1 the presets. Locks their rows in id order (every batch writer locks in that order: no two wait on
-- each other in opposite orders) and returns the ids of those that exist.
select p.id from template_version_presets p where p.id = any($1::uuid[]) order by p.id for update

-- name: create_prebuilds_batch
-- The batch form of `create_prebuilds`: one element per prebuild in each of $1 presets, $2 template
-- versions, $3 templates, $4 organizations, $5 names; $6 now. The same rows, in one statement.
with fresh as (
    select gen_random_uuid() as workspace_id, gen_random_uuid() as job_id, gen_random_uuid() as build_id,
           f.preset_id, f.version_id, f.template_id, f.organization_id, f.name
    from unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[])
        as f(preset_id, version_id, template_id, organization_id, name)
),
inserted_workspaces as (
    insert into workspaces (id, owner_id, organization_id, template_id, name, created_at, updated_at)
    select workspace_id, 'c42fdf75-3097-471c-8c33-fb52454d81c0', organization_id, template_id, name, $6, $6
    from fresh
),
inserted_jobs as (
    insert into provisioner_jobs (id, organization_id, initiator_id, type, input, created_at, updated_at)
    select job_id, organization_id, 'c42fdf75-3097-471c-8c33-fb52454d81c0', 'workspace_build',
           jsonb_build_object('workspace_build_id', build_id), $6, $6
    from fresh
)
insert into workspace_builds (id, workspace_id, build_number, transition, template_version_id,
                              template_version_preset_id, job_id, initiator_id, reason, created_at, updated_at)
select build_id, workspace_id, 1, 'start', version_id, preset_id, job_id, 'c42fdf75-3097-471c-8c33-fb52454d81c0',
       'initiator', $6, $6
from fresh
returning template_version_preset_id as preset_id

-- name: delete_prebuilds
-- $1 workspace ids, $2 now. Re-checks in this transaction that each workspace is still a live prebuild
-- whose latest build is a start that completed, succeeded or (a failed prebuild's cleanup, issue 15.5)
-- failed: a workspace claimed meanwhile (another owner), already being deleted or being rebuilt is left
-- alone. Returns the workspaces for which a delete build was created.
with candidates as (
    select w.id, w.organization_id
    from workspaces w
    where w.id = any($1::uuid[]) and w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and not w.deleted
    order by w.id
    for update
),
deletable as (
    select candidates.id as workspace_id, candidates.organization_id, latest.build_number,
           latest.template_version_id, gen_random_uuid() as job_id, gen_random_uuid() as build_id
    from candidates
    cross join lateral (
        select b.build_number, b.template_version_id, b.transition, b.job_id
        from workspace_builds b
        where b.workspace_id = candidates.id
        order by b.build_number desc
        limit 1
    ) latest
    join provisioner_jobs job on job.id = latest.job_id
    where latest.transition = 'start' and job.job_status in ('succeeded', 'failed')
),
inserted_jobs as (
    insert into provisioner_jobs (id, organization_id, initiator_id, type, input, created_at, updated_at)
    select job_id, organization_id, 'c42fdf75-3097-471c-8c33-fb52454d81c0', 'workspace_build',
           jsonb_build_object('workspace_build_id', build_id), $2, $2
    from deletable
)
insert into workspace_builds (id, workspace_id, build_number, transition, template_version_id,
                              template_version_preset_id, job_id, initiator_id, reason, created_at, updated_at)
select build_id, workspace_id, build_number + 1, 'delete', template_version_id, null, job_id,
       'c42fdf75-3097-471c-8c33-fb52454d81c0', 'initiator', $2, $2
from deletable
returning workspace_id

-- name: count_prebuilds_still_live
-- $1 workspace ids: how many are still live prebuilds (the prebuilds user's, not deleted, latest build a
-- start). An extraneous delete re-counts, in its transaction, the other prebuilds its plan counted, so
-- that a plan older than a claim (another replica's pass, or one from before a targeted pass) does not
-- shrink the pool below its target: each of them claimed or deleted since is one delete fewer.
select count(*)::integer
from workspaces w
where w.id = any($1::uuid[]) and w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and not w.deleted
    and (
        select b.transition from workspace_builds b where b.workspace_id = w.id order by b.build_number desc limit 1
    ) = 'start'

-- name: cancel_pending_prebuilds
-- $1 preset, $2 now. First builds of the preset on a non-active version whose job no provisioner has
-- picked up: cancel the job, add a delete build completed at once (nothing was provisioned), and mark
-- the workspace deleted. Decided by the same criteria at write time; a job being picked up right now
-- (row locked) is skipped, one picked up already no longer matches.
with pending as (
    select job.id as job_id, build.workspace_id, build.template_version_id, workspace.organization_id
    from workspace_builds build
    join provisioner_jobs job on job.id = build.job_id
    join workspaces workspace on workspace.id = build.workspace_id
    join template_versions tv on tv.id = build.template_version_id
    join templates t on t.id = tv.template_id
    where build.template_version_preset_id = $1
        and build.build_number = 1
        and build.transition = 'start'
        and t.active_version_id is distinct from build.template_version_id
        and workspace.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and not workspace.deleted
        and job.started_at is null and job.worker_id is null and job.canceled_at is null
        and job.completed_at is null and coalesce(job.error, '') = ''
    for update of job, workspace skip locked
),
canceled as (
    update provisioner_jobs set canceled_at = $2, completed_at = $2, updated_at = $2
    where id in (select job_id from pending)
),
fresh as (
    select pending.*, gen_random_uuid() as delete_job_id, gen_random_uuid() as delete_build_id from pending
),
delete_jobs as (
    insert into provisioner_jobs (id, organization_id, initiator_id, type, input, created_at, updated_at,
                                  started_at, completed_at)
    select delete_job_id, organization_id, 'c42fdf75-3097-471c-8c33-fb52454d81c0', 'workspace_build',
           jsonb_build_object('workspace_build_id', delete_build_id), $2, $2, $2, $2
    from fresh
),
delete_builds as (
    insert into workspace_builds (id, workspace_id, build_number, transition, template_version_id,
                                  template_version_preset_id, job_id, initiator_id, reason, created_at,
                                  updated_at)
    select delete_build_id, workspace_id, 2, 'delete', template_version_id, null, delete_job_id,
           'c42fdf75-3097-471c-8c33-fb52454d81c0', 'initiator', $2, $2
    from fresh
)
update workspaces set deleted = true, updated_at = $2
where id in (select workspace_id from fresh)
returning id

-- name: mark_presets_status
-- $1 presets, $2 the new status, $3 now. Moves presets from `normal` into a failure status; each move
-- starts a new failure episode. Presets already in a failure status are left as they are, so that two
-- replicas (or two passes) never open two episodes. Returns the presets moved and their episode.
update template_version_presets
set prebuild_status = $2::prebuild_status,
    prebuild_status_changed_at = $3,
    failure_episode = failure_episode + 1
where id = any($1::uuid[]) and prebuild_status = 'normal'
returning id, failure_episode

-- name: mark_presets_recovered
-- $1 presets, $2 now. Back to `normal` from `hard_limited` (the streak is broken). Returns the presets
-- moved, with the episode that just ended.
update template_version_presets
set prebuild_status = 'normal', prebuild_status_changed_at = $2
where id = any($1::uuid[]) and prebuild_status = 'hard_limited'
returning id, failure_episode

-- name: reset_preset
-- An operator's reset: back to `normal`, and failures of builds created until now no longer count
-- toward the hard limit or the validation check. Returns the previous status (null: no such preset).
update template_version_presets p
set prebuild_status = 'normal', prebuild_status_changed_at = $2, failure_reset_at = $2
from (select id, prebuild_status from template_version_presets where id = $1 for update) previous
where p.id = previous.id
returning previous.prebuild_status::text as previous_status

-- name: invalidate_preset
-- An operator's invalidation (`reconciler presets invalidate`, issue 15.4): every prebuild of the preset
-- created before $2 is expired, and replaced as any expired one is (with RECONCILER_SURGE, replacements
-- first). Returns the preset's id (no row: no such preset).
update template_version_presets set last_invalidated_at = $2 where id = $1 returning id

-- name: write_prebuilds_settings
insert into site_configs (key, value) values ('prebuilds_settings', $1)
on conflict (key) do update set value = excluded.value

-- name: record_settings
-- Every pass that holds the reconciliation lock records the behaviour settings it uses. `recorded_at`
-- moves only when the settings or the recording instance change, so it says since when they hold. $1 is
-- JSON text (whatever jsonb codec the connection has).
insert into reconciler_settings as r (settings, instance, recorded_at, last_pass_at)
values ($1::text::jsonb, $2, $3, $3)
on conflict (id) do update set
    settings = excluded.settings,
    instance = excluded.instance,
    recorded_at = case
        when r.settings = excluded.settings and r.instance = excluded.instance
            and r.recorded_at <= excluded.last_pass_at
        then r.recorded_at
        else excluded.recorded_at
    end,
    last_pass_at = excluded.last_pass_at

-- name: write_breaker
-- The breaker's next state (issue 15.2), only from the state and episode the pass read: a pass working
-- from an older snapshot, or a second replica, changes nothing (no row returned). $1 state read,
-- $2 episode read, $3 new state, $4 new episode, $5 changed_at, $6 open_until, $7 open_duration.
update prebuild_breaker
set state = $3, episode = $4, changed_at = $5, open_until = $6, open_duration = $7
where state = $1 and episode = $2
returning episode

-- name: open_breaker_episode
-- $1 episode, $2 opened_at, $3 failures_since, $4 reason. In the transaction that opened the breaker.
insert into prebuild_breaker_episodes (episode, opened_at, failures_since, reason)
values ($1, $2, $3, $4)
on conflict (episode) do nothing

-- name: close_breaker_episode
-- $1 episode, $2 closed_at. From then on, failed builds are the presets' own again.
update prebuild_breaker_episodes set closed_at = $2 where episode = $1 and closed_at is null
returning opened_at, reason

-- name: purge_prebuild_events
-- One bounded batch of the purge: at most $2 claim events created before $1 (now minus
-- RECONCILER_PREBUILD_EVENTS_RETENTION), oldest first, found through prebuild_events_created_idx. The
-- caller repeats while batches come back full, each in its own short transaction, so that the platform's
-- claim path never waits behind one long delete.
delete from prebuild_events
where id in (select e.id from prebuild_events e where e.created_at < $1 order by e.created_at limit $2)
