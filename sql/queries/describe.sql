-- What `reconciler presets describe` and `presets reset` read beyond a plan: an operator's command, run
-- now and then, never by the daemon's passes. Each reads one preset (or finds it), by index.

-- name: find_presets
-- The presets an operator's PRESET may mean: $1 a full id; $2 an id prefix (lower-case hex and dashes
-- only, checked by the caller; null: none); $3 and $4 a template and a preset name, $5 a version name
-- (null: any version). At most 50, active versions first, so that the error for an ambiguous name can
-- list them.
select p.id, p.name, tv.name as template_version_name, t.name as template_name, o.name as organization_name,
       t.active_version_id is not distinct from p.template_version_id as is_active_version,
       p.desired_instances is not null as has_prebuilds
from template_version_presets p
join template_versions tv on tv.id = p.template_version_id
join templates t on t.id = tv.template_id
join organizations o on o.id = t.organization_id
where p.id = $1
    or ($2::text is not null and p.id::text like $2::text || '%')
    or (t.name = $3 and p.name = $4 and ($5::text is null or tv.name = $5))
order by is_active_version desc, t.name, tv.created_at desc, p.name, p.id
limit 50

-- name: describe_preset
-- The preset's own settings and status history fields ($1 the preset).
select p.desired_instances, p.invalidate_after_secs, p.scheduling_timezone, p.prebuild_status::text as prebuild_status,
       p.prebuild_status_changed_at, p.failure_episode, p.failure_reset_at, p.last_invalidated_at,
       t.deleted as template_deleted, t.deprecated as template_deprecation,
       t.active_version_id is not distinct from p.template_version_id as is_active_version
from template_version_presets p
join template_versions tv on tv.id = p.template_version_id
join templates t on t.id = tv.template_id
where p.id = $1

-- name: describe_schedules
select cron_expression, desired_instances
from template_version_preset_prebuild_schedules
where preset_id = $1
order by id

-- name: describe_prebuilds
-- The preset's $2 most recent prebuilds (their first build, by the prebuilds user), newest first, with
-- the outcome of that build and what became of the workspace: live, claimed by a user, or deleted.
select w.id as workspace_id, w.name as workspace_name, b.created_at, j.job_status::text as job_status,
       j.error_code, j.error, j.completed_at, w.deleted,
       w.owner_id <> 'c42fdf75-3097-471c-8c33-fb52454d81c0' as claimed
from workspace_builds b
join provisioner_jobs j on j.id = b.job_id
join workspaces w on w.id = b.workspace_id
where b.template_version_preset_id = $1
    and b.build_number = 1
    and b.initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
order by b.created_at desc, w.id
limit $2

-- name: describe_notifications
-- The preset's $2 most recent notification messages (one per recipient of each status change), newest
-- first, with the sinks that have each one and when.
select m.id, m.kind, m.episode, m.status, m.created_at, m.sent_at, m.attempts, m.last_error,
       u.username, u.email,
       coalesce((
           select jsonb_agg(jsonb_build_object('sink', d.sink, 'delivered_at', d.delivered_at) order by d.delivered_at, d.sink)
           from notification_deliveries d
           where d.message_id = m.id
       ), '[]'::jsonb)::text as deliveries
from notification_messages m
left join users u on u.id = m.user_id
where m.preset_id = $1
order by m.created_at desc, m.id
limit $2
