-- The platform's side, played by the demo and the tests (reconciler/demo/platform.py): the simulated
-- provisioner (`reconciler simulate-provisioner`, and the demo's), and the writes with which
-- the demo plays the platform's API server (seeding templates, publishing a version). None of this is
-- used by the daemon: it stands in for the components outside it, for demonstrations and tests.

-- name: acquire_provisioner_jobs
-- $1 worker id, $2 now, $3 how many at most. Takes pending workspace-build jobs, oldest first, and marks
-- them running for this worker. SKIP LOCKED: two provisioners (or a real one beside ours) never take
-- the same job, and neither waits for the other. The outer `where` re-checks the job is still pending,
-- because the row may have changed between the scan and the lock.
-- `simulated_failure` / `simulated_error_code` are preset parameters through which a template tells the
-- simulation how its builds end (the demo's broken template has `simulated_failure = always`).
with picked as (
    select job.id
    from provisioner_jobs job
    where job.job_status = 'pending' and job.type = 'workspace_build' and job.worker_id is null
    order by job.created_at, job.id
    limit $3
    for update skip locked
),
started as (
    update provisioner_jobs job
    set started_at = $2, worker_id = $1, updated_at = $2
    from picked
    where job.id = picked.id and job.started_at is null and job.completed_at is null
        and job.canceled_at is null and coalesce(job.error, '') = ''
    returning job.id, job.created_at
)
select
    started.id as job_id,
    build.id as build_id,
    build.workspace_id,
    build.build_number,
    build.transition::text as transition,
    build.template_version_id,
    build.template_version_preset_id as preset_id,
    workspace.name as workspace_name,
    template.name as template_name,
    preset.name as preset_name,
    coalesce(failure.value, '') as simulated_failure,
    coalesce(error_code.value, '') as simulated_error_code
from started
join workspace_builds build on build.job_id = started.id
join workspaces workspace on workspace.id = build.workspace_id
join templates template on template.id = workspace.template_id
left join template_version_presets preset on preset.id = build.template_version_preset_id
left join template_version_preset_parameters failure
    on failure.template_version_preset_id = build.template_version_preset_id and failure.name = 'simulated_failure'
left join template_version_preset_parameters error_code
    on error_code.template_version_preset_id = build.template_version_preset_id
    and error_code.name = 'simulated_error_code'
order by started.created_at, started.id

-- name: complete_provisioner_job
-- $1 job, $2 worker id, $3 now, $4 error (null: success), $5 error code. Finishes a job this worker holds
-- and applies what a real provisioner's success means: a start build gets a ready top-level agent, a
-- delete build marks its workspace deleted. A job canceled meanwhile ends canceled (no error, no
-- agent). Returns nothing when the job is not (or no longer) this worker's.
with completed as (
    update provisioner_jobs
    set completed_at = $3,
        updated_at = $3,
        error = case when canceled_at is null then $4 end,
        error_code = case when canceled_at is null then $5 end
    where id = $1 and worker_id = $2 and completed_at is null
    returning id, canceled_at is null and $4::text is null as succeeded, canceled_at is not null as canceled
),
build as (
    select completed.id as job_id, completed.succeeded, completed.canceled, b.transition, b.workspace_id
    from completed
    join workspace_builds b on b.job_id = completed.id
),
agent as (
    insert into workspace_agents (job_id, name, lifecycle_state, created_at)
    select job_id, 'main', 'ready', $3 from build where succeeded and transition = 'start'
),
deleted as (
    update workspaces set deleted = true, updated_at = $3
    where id in (select workspace_id from build where succeeded and transition = 'delete')
)
select job_id, succeeded, canceled, transition::text as transition, workspace_id from build

-- name: release_provisioner_jobs
-- $1 worker id, $2 now. A provisioner that stops puts its unfinished jobs back in the queue, so that
-- they are neither lost nor counted as "starting" forever. Returns the jobs released.
update provisioner_jobs
set started_at = null, worker_id = null, updated_at = $2
where worker_id = $1 and completed_at is null and coalesce(error, '') = ''
returning id

-- name: complete_canceling_jobs
-- $1 now. Jobs canceled before any provisioner took them (status `canceling`, no worker) are acknowledged
-- as canceled, as a real provisioner daemon does; jobs held by a worker are left to that worker.
update provisioner_jobs
set completed_at = $1, updated_at = $1
where id in (
    select id from provisioner_jobs
    where job_status = 'canceling' and worker_id is null
    for update skip locked
)
returning id

-- name: create_organization
insert into organizations (name, created_at) values ($1, $2) returning id

-- name: create_user
-- $1 username, $2 e-mail, $3 site roles, $4 now.
insert into users (username, email, rbac_roles, created_at) values ($1, $2, $3::text[], $4) returning id

-- name: add_organization_member
-- $1 organization, $2 user, $3 organization roles, $4 now.
insert into organization_members (organization_id, user_id, roles, created_at) values ($1, $2, $3::text[], $4)

-- name: create_template
-- $1 organization, $2 name, $3 now. The template has no active version until one is published.
insert into templates (organization_id, name, created_at, updated_at) values ($1, $2, $3, $3) returning id

-- name: create_template_version
-- $1 template, $2 name, $3 now. Published at once: it becomes the template's active version.
with template as (
    select id, organization_id from templates where id = $1 for update
),
version as (
    insert into template_versions (template_id, organization_id, name, created_at)
    select id, organization_id, $2, $3 from template
    returning id, template_id
),
activated as (
    update templates set active_version_id = version.id, updated_at = $3
    from version where templates.id = version.template_id
)
select id from version

-- name: create_preset
-- $1 template version, $2 name, $3 desired instances, $4 time-to-live (seconds), $5 scheduling timezone,
-- $6 now.
insert into template_version_presets (template_version_id, name, desired_instances, invalidate_after_secs,
                                      scheduling_timezone, created_at)
values ($1, $2, $3, $4, $5, $6)
returning id

-- name: add_preset_parameter
insert into template_version_preset_parameters (template_version_preset_id, name, value) values ($1, $2, $3)

-- name: add_preset_schedule
-- $1 preset, $2 cron expression (a time range), $3 desired instances while it applies.
insert into template_version_preset_prebuild_schedules (preset_id, cron_expression, desired_instances)
values ($1, $2, $3)

-- name: publish_template_version
-- $1 template, $2 new version name, $3 now. What an API server does when a template admin publishes: a
-- new version whose presets (parameters and schedules included) copy the active version's, made active
-- in the same transaction. The old version's prebuilds become outdated and the reconciler replaces them.
-- Returns the new version's id (nothing when the template has no active version).
with template as (
    select id, organization_id, active_version_id from templates
    where id = $1 and active_version_id is not null
    for update
),
version as (
    insert into template_versions (id, template_id, organization_id, name, created_at)
    select gen_random_uuid(), id, organization_id, $2, $3 from template
    returning id, template_id
),
old_presets as (
    select p.*, gen_random_uuid() as new_id
    from template_version_presets p
    join template on template.active_version_id = p.template_version_id
),
new_presets as (
    insert into template_version_presets (id, template_version_id, name, desired_instances,
                                          invalidate_after_secs, scheduling_timezone, created_at)
    select old_presets.new_id, version.id, old_presets.name, old_presets.desired_instances,
           old_presets.invalidate_after_secs, old_presets.scheduling_timezone, $3
    from old_presets cross join version
),
parameters as (
    insert into template_version_preset_parameters (template_version_preset_id, name, value)
    select old_presets.new_id, parameter.name, parameter.value
    from old_presets
    join template_version_preset_parameters parameter on parameter.template_version_preset_id = old_presets.id
),
schedules as (
    insert into template_version_preset_prebuild_schedules (preset_id, cron_expression, desired_instances)
    select old_presets.new_id, schedule.cron_expression, schedule.desired_instances
    from old_presets
    join template_version_preset_prebuild_schedules schedule on schedule.preset_id = old_presets.id
),
activated as (
    update templates set active_version_id = version.id, updated_at = $3
    from version where templates.id = version.template_id
)
select id from version

-- name: find_organization
-- $1 name. The demo reuses the platform it seeded when started again on the same data directory.
select id from organizations where name = $1

-- name: find_template
-- $1 organization, $2 name: the live template of that name.
select id from templates where organization_id = $1 and lower(name) = lower($2) and not deleted

-- name: release_all_provisioner_jobs
-- $1 now. Every unfinished job back in the queue, whoever held it. Only for a database that no real
-- provisioner uses: the demo, restarted on its data directory after a crash, owns every worker there.
update provisioner_jobs
set started_at = null, worker_id = null, updated_at = $1
where worker_id is not null and completed_at is null and coalesce(error, '') = ''
returning id
