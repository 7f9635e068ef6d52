-- The lifetime counts behind the created/failed/claimed counters (reconciler/counters.py), read beside
-- the passes, never in them. A prebuild is counted by its first build (build 1, initiated by the
-- prebuilds user): created when that build exists, failed when its job failed, claimed when its
-- workspace has another owner. The daemon reads the whole history once (totals_by_preset and the
-- first builds that can still change) and then only what can have changed since: first builds whose
-- job completed lately or is unfinished, and which live prebuilds are no longer live (claimed or
-- deleted: their ids only, compared in the daemon with the ones it follows).
--
-- Each row's build, job and workspace are looked up by key (lateral, limit 1: unique keys anyway): a
-- join would let the planner hash every first build of the history instead, as it did at 30,000 builds,
-- and as the daemon's role, which row security keeps from some of the statistics, it did more often.

-- name: totals_clock
-- The database's time, as the watermark of a refresh: the same clock for every replica.
select now() as now

-- name: totals_by_preset
-- Every preset's counts, from the whole history (at start-up, and once an hour to heal).
select
    b.template_version_preset_id as preset_id,
    count(*) as created,
    count(*) filter (where j.job_status = 'failed') as failed,
    count(*) filter (where w.owner_id <> 'c42fdf75-3097-471c-8c33-fb52454d81c0') as claimed
from workspace_builds b
join provisioner_jobs j on j.id = b.job_id
join workspaces w on w.id = b.workspace_id
where b.build_number = 1
    and b.initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
    and b.template_version_preset_id is not null
group by b.template_version_preset_id

-- name: totals_live_first_builds
-- The first builds of the prebuilds user's live workspaces (a claim is still to come), through the
-- partial index of live workspaces: as many as the pools hold, however long the history. Full reads only.
select b.id, w.id as workspace_id, b.template_version_preset_id as preset_id, j.job_status::text as job_status,
       false as claimed, false as deleted
from workspaces w
cross join lateral (
    select b.id, b.template_version_preset_id, b.job_id
    from workspace_builds b
    where b.workspace_id = w.id and b.build_number = 1
        and b.initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
        and b.template_version_preset_id is not null
    limit 1
) b
cross join lateral (select j.job_status from provisioner_jobs j where j.id = b.job_id limit 1) j
where w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and not w.deleted

-- name: totals_unfinished_first_builds
-- First builds of prebuilds whose job is unfinished (a failure is still to come), through the index of
-- unfinished jobs.
select b.id, b.workspace_id, b.template_version_preset_id as preset_id, j.job_status::text as job_status,
       w.owner_id <> 'c42fdf75-3097-471c-8c33-fb52454d81c0' as claimed, w.deleted
from provisioner_jobs j
cross join lateral (
    select b.id, b.template_version_preset_id, b.workspace_id
    from workspace_builds b
    where b.job_id = j.id and b.build_number = 1
        and b.initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
        and b.template_version_preset_id is not null
    limit 1
) b
cross join lateral (select w.owner_id, w.deleted from workspaces w where w.id = b.workspace_id limit 1) w
where j.job_status in ('pending', 'running', 'canceling')

-- name: totals_recent_first_builds
-- First builds of prebuilds whose job completed since $1 (the last refresh's time less the overlap
-- window), through the index of completed prebuild jobs.
select b.id, b.workspace_id, b.template_version_preset_id as preset_id, j.job_status::text as job_status,
       w.owner_id <> 'c42fdf75-3097-471c-8c33-fb52454d81c0' as claimed, w.deleted
from provisioner_jobs j
cross join lateral (
    select b.id, b.template_version_preset_id, b.workspace_id
    from workspace_builds b
    where b.job_id = j.id and b.build_number = 1
        and b.initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
        and b.template_version_preset_id is not null
    limit 1
) b
cross join lateral (select w.owner_id, w.deleted from workspaces w where w.id = b.workspace_id limit 1) w
where j.initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
    and j.completed_at is not null and j.completed_at >= $1

-- name: totals_live_workspaces
-- The ids of the prebuilds user's live workspaces, from their partial index and a few heap pages, as one
-- text (tens of thousands of rows would cost the daemon more to decode than the database to read): the
-- daemon finds claims and deletions as the ones that left this set.
select coalesce(string_agg(w.id::text, ','), '') as ids
from workspaces w
where w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and not w.deleted

-- name: totals_first_builds_of_workspaces
-- The first builds of these workspaces (those that left the live set, or joined it unseen), as they are now.
select b.id, w.id as workspace_id, b.template_version_preset_id as preset_id, j.job_status::text as job_status,
       w.owner_id <> 'c42fdf75-3097-471c-8c33-fb52454d81c0' as claimed, w.deleted
from workspaces w
cross join lateral (
    select b.id, b.template_version_preset_id, b.job_id
    from workspace_builds b
    where b.workspace_id = w.id and b.build_number = 1
        and b.initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
    limit 1
) b
cross join lateral (select j.job_status from provisioner_jobs j where j.id = b.job_id limit 1) j
where w.id = any($1::uuid[])

-- name: totals_preset_labels
-- Every preset's labels: the counters are kept by organization, template and preset name, across
-- template versions, so a new version's presets add to the series of the same names.
select p.id, o.name as organization_name, t.name as template_name, p.name as preset_name
from template_version_presets p
join template_versions v on v.id = p.template_version_id
join templates t on t.id = v.template_id
join organizations o on o.id = t.organization_id

-- name: totals_preset_labels_digest
-- A digest of every preset's labels: the labels are read again only when it changed (a rename, a new
-- preset, a preset removed).
-- An order-free sum of 64-bit hashes: no sort of the presets, and a collision would only delay a rename
-- to the hourly full read.
select count(*)::text || ':' || coalesce(sum(hashtextextended(p.id::text || '/' || o.name || '/' || t.name || '/'
    || p.name, 0)::numeric), 0)::text as digest
from template_version_presets p
join template_versions v on v.id = p.template_version_id
join templates t on t.id = v.template_id
join organizations o on o.id = t.organization_id
