-- The least-privilege role of the reconciler: what `reconciler run`, `reconcile --once`, `plan`,
-- `status`, `pause`, `resume`, `presets reset` and `notifications list` need, and nothing more. The test
-- tools (`simulate-provisioner`, `demo`) and `reconciler migrate` run as the schema's owner, not as this
-- role.
--
-- Not a migration: the schema's owner runs it after `reconciler migrate`, and again after every upgrade
-- (a new table needs its block below). It runs in one transaction and may be run any number of times,
-- from several places at once:
--
--     psql "$OWNER_DSN" -v ON_ERROR_STOP=1 -f sql/roles/reconciler_role.sql
--     psql "$OWNER_DSN" -c "create role reconciler_daemon login password '...' in role prebuilds_reconciler"
--
-- `prebuilds_reconciler` is a group role without LOGIN; the daemon logs in as a member of it, which must
-- not be the tables' owner, a superuser or BYPASSRLS (each of those skips the row policies below).
--
-- How it is built:
--   1. The role starts from nothing on every run: every privilege it holds on the tables of `public`
--      and every row policy that names it are dropped, then granted and created again below. What is
--      not in this file, the role does not have, whatever an older version of the file granted.
--   2. Column privileges say which columns it may insert and update: it can never write a workspace's
--      owner, a job's worker or result, a build after it exists, a preset's target, or a user.
--   3. Row policies say which rows. A table with row level security gets one permissive policy
--      `as_granted` for every role (`using (true)`), so that the platform's roles see and write exactly
--      what their grants allow, as before; the policies for this role are RESTRICTIVE, so they narrow
--      what it does and nobody else. The tables' owner is not subject to row security at all (no FORCE
--      ROW LEVEL SECURITY: the daemon's role is never the owner, and the platform, migrations and test
--      tools that run as the owner must not be narrowed).
--   4. Reads of the platform's tables are not narrowed by row: the snapshot needs every build of the
--      prebuilds user's workspaces (whoever started them: an administrator may stop or delete a
--      prebuild), the claimed workspaces for the claimed counter, every template and preset. A policy
--      on those reads would be evaluated for every row of the snapshot; these hold nothing secret. The
--      rows that are narrowed for reading, too, are those that can hold secrets or belong to others:
--      `site_configs` (the platform's signing keys) and the notification outbox.
--   5. What only grows whoever writes it (a preset's `failure_episode`) is a rule of the schema
--      (migration 0004, a trigger), not of this role.
--
-- To give the daemon a new table: add one block at the end, in the shape of the others: a comment
-- saying which statements of sql/queries need it and why; `grant select` and column-level `grant
-- insert (...)` / `grant update (...)` for exactly the columns those statements write; and, when the
-- table holds rows that are not the daemon's (a platform table), `enable row level security`, the
-- `as_granted` policy and restrictive policies for `prebuilds_reconciler`. A table only the daemon
-- writes needs grants only. `tests/integration/test_daemon_role.py` runs the daemon's statements and
-- the abuses as the role: add the new statements' abuses there.
--
-- The prebuilds system user (c42fdf75-3097-471c-8c33-fb52454d81c0) and the daemon's notification
-- templates are written literally, as in sql/queries: constants let the planner use the partial indexes
-- and cost nothing per row.

begin;

-- A re-run takes an ACCESS EXCLUSIVE lock on each table whose policies it replaces: wait briefly for
-- the platform's transactions, and fail (to be run again) rather than queue the platform's queries
-- behind us for long.
set local lock_timeout = '5s';
-- The first run's "policy does not exist, skipping" notices say nothing useful.
set local client_min_messages = warning;

do $$
begin
    -- Two runs at once would race on the same grants and policies ("tuple concurrently updated").
    perform pg_advisory_xact_lock(hashtext('sql/roles/reconciler_role.sql'));
end
$$;

do $$
begin
    create role prebuilds_reconciler nologin;
exception
    -- Roles are cluster-wide: another database, or a concurrent run, may have created it already.
    when duplicate_object or unique_violation then null;
end
$$;

-- 1. From nothing.
revoke all on all tables in schema public from prebuilds_reconciler;
revoke all on all sequences in schema public from prebuilds_reconciler;
do $$
declare
    policy record;
begin
    for policy in
        select schemaname, tablename, policyname
        from pg_policies
        where schemaname = 'public' and 'prebuilds_reconciler' = any (roles)
    loop
        execute format('drop policy %I on %I.%I', policy.policyname, policy.schemaname, policy.tablename);
    end loop;
end
$$;

-- Functions (gen_random_uuid, the advisory locks) and the enum types are usable by PUBLIC already; no
-- table uses a sequence (every key is a uuid).
grant usage on schema public to prebuilds_reconciler;

-- ---------------------------------------------------------------------------------------------------
-- Read only: the platform's templates, presets and people. The snapshot (snapshot_presets,
-- snapshot_schedules, snapshot_prebuilds), the create's re-check (lock_preset_for_create), the
-- notification recipients (enqueue_notifications: site roles; organization roles are in
-- organization_members, below) and the migration check of `/readyz` and every command
-- (reconciler_schema_migrations).
grant select on
    organizations,
    users,
    templates,
    template_versions,
    template_version_preset_prebuild_schedules,
    workspace_agents,
    notification_templates,
    reconciler_schema_migrations
to prebuilds_reconciler;

-- ---------------------------------------------------------------------------------------------------
-- template_version_presets: read by the snapshot; the status columns written by mark_presets_status
-- (hard limit, validation failure: a new episode), mark_presets_recovered and reset_preset (an
-- operator's reset), and `last_invalidated_at` by invalidate_preset (an operator's invalidation,
-- `reconciler presets invalidate`, which the platform's own invalidation also writes). Not the target,
-- the time to live or the name: those are the platform's. UPDATE on a column also allows the `for update` of lock_preset_for_create, which
-- serializes creators of one preset. `failure_episode` may only grow (migration 0004). No row policy:
-- every preset with prebuilds may change status, and an operator may reset any preset.
grant select on template_version_presets to prebuilds_reconciler;
grant update (prebuild_status, prebuild_status_changed_at, failure_episode, failure_reset_at, last_invalidated_at)
    on template_version_presets to prebuilds_reconciler;

-- ---------------------------------------------------------------------------------------------------
-- site_configs: the daemon's own keys only, for reading too (other keys hold the platform's secrets,
-- such as its signing key). `prebuilds_settings` is read by every pass (read_prebuilds_settings) and
-- written by `pause` / `resume` (write_prebuilds_settings: insert ... on conflict do update). A new key
-- the daemon owns goes into the list of the policy.
grant select, insert (key, value), update (value) on site_configs to prebuilds_reconciler;
alter table site_configs enable row level security;
drop policy if exists as_granted on site_configs;
create policy as_granted on site_configs as permissive for all to public using (true) with check (true);
create policy prebuilds_reconciler_own_keys on site_configs as restrictive for all to prebuilds_reconciler
    using (key in ('prebuilds_settings'))
    with check (key in ('prebuilds_settings'));

-- ---------------------------------------------------------------------------------------------------
-- workspaces: read by the snapshot (live prebuilds), the counters' totals_* reads (claimed ones, now users')
-- and the create clamp. create_prebuilds inserts prebuilds (owner: the prebuilds user, never deleted
-- at birth: `deleted` is not an insertable column); cancel_pending_prebuilds marks a never-provisioned
-- prebuild deleted, and delete_prebuilds / cancel_pending_prebuilds lock prebuilds `for update` (which
-- the update policy's USING also governs). A live prebuild can only become deleted: never a workspace of
-- someone else (a claimed one included), never back from deleted, never another owner (not an
-- updatable column).
grant select on workspaces to prebuilds_reconciler;
grant insert (id, owner_id, organization_id, template_id, name, created_at, updated_at)
    on workspaces to prebuilds_reconciler;
grant update (deleted, updated_at) on workspaces to prebuilds_reconciler;
alter table workspaces enable row level security;
drop policy if exists as_granted on workspaces;
create policy as_granted on workspaces as permissive for all to public using (true) with check (true);
create policy prebuilds_reconciler_creates_prebuilds on workspaces as restrictive for insert
    to prebuilds_reconciler
    with check (owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and not deleted);
create policy prebuilds_reconciler_deletes_prebuilds on workspaces as restrictive for update
    to prebuilds_reconciler
    using (owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and not deleted)
    with check (owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and deleted);

-- ---------------------------------------------------------------------------------------------------
-- provisioner_jobs: read by the snapshot (the latest build's job). create_prebuilds and delete_prebuilds
-- insert pending jobs initiated by the prebuilds user; cancel_pending_prebuilds inserts a delete job
-- completed at once (started_at, completed_at) and cancels pending first-build jobs that no provisioner
-- took. The role inserts jobs of the prebuilds user only, and never a worker, an error or a cancel
-- (not insertable columns); it updates only a pending, untaken job of the prebuilds user, and only to
-- canceled (job_status is generated from the columns, so the check sees the outcome): it cannot take,
-- complete, fail or cancel anyone else's job, nor complete its own as succeeded.
grant select on provisioner_jobs to prebuilds_reconciler;
grant insert (id, organization_id, initiator_id, type, input, created_at, updated_at, started_at, completed_at)
    on provisioner_jobs to prebuilds_reconciler;
grant update (canceled_at, completed_at, updated_at) on provisioner_jobs to prebuilds_reconciler;
alter table provisioner_jobs enable row level security;
drop policy if exists as_granted on provisioner_jobs;
create policy as_granted on provisioner_jobs as permissive for all to public using (true) with check (true);
create policy prebuilds_reconciler_creates_jobs on provisioner_jobs as restrictive for insert
    to prebuilds_reconciler
    with check (initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and type = 'workspace_build');
create policy prebuilds_reconciler_cancels_pending_jobs on provisioner_jobs as restrictive for update
    to prebuilds_reconciler
    using (initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and job_status = 'pending' and worker_id is null)
    with check (initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and job_status = 'canceled');

-- ---------------------------------------------------------------------------------------------------
-- workspace_builds: read by the snapshot and the counters' totals_* reads. Inserted, never updated: the first build
-- of a new prebuild (create_prebuilds: build 1, a start of a preset) and delete builds of live
-- prebuilds (delete_prebuilds, cancel_pending_prebuilds), all initiated by the prebuilds user. A delete
-- build of a workspace that is not a live prebuild (a claimed one, a user's) is refused.
--
-- The workspace of a first build is inserted by the same statement (create_prebuilds), and a policy's
-- subquery sees the database as the statement found it, without that statement's own rows. So a first
-- build passes when its workspace is not visible yet, i.e. new in this statement (the foreign key then
-- requires that it exists, and the workspaces policy that it is the prebuilds user's). A workspace that
-- existed before has its first build already (unique build numbers), so this admits nothing else. Both
-- subqueries are primary-key lookups, run per inserted build only, never on reads.
grant select on workspace_builds to prebuilds_reconciler;
grant insert (id, workspace_id, build_number, transition, template_version_id, template_version_preset_id,
              job_id, initiator_id, reason, created_at, updated_at)
    on workspace_builds to prebuilds_reconciler;
alter table workspace_builds enable row level security;
drop policy if exists as_granted on workspace_builds;
create policy as_granted on workspace_builds as permissive for all to public using (true) with check (true);
create policy prebuilds_reconciler_builds_prebuilds on workspace_builds as restrictive for insert
    to prebuilds_reconciler
    with check (
        initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
        and (
            (transition = 'start' and build_number = 1 and template_version_preset_id is not null)
            or transition = 'delete'
        )
        and (
            exists (
                select 1 from workspaces w
                where w.id = workspace_builds.workspace_id
                    and w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and not w.deleted
            )
            or (
                build_number = 1
                and not exists (select 1 from workspaces w where w.id = workspace_builds.workspace_id)
            )
        )
    );

-- ---------------------------------------------------------------------------------------------------
-- notification_messages: the daemon's outbox, i.e. messages of its three notification templates; the
-- platform's own notifications in the same table are neither visible to it nor writable. Inserted by
-- enqueue_notifications (each kind with its template, about a preset, to an active template
-- administrator of the preset's organization or to nobody: the same recipients as the statement's),
-- read by list_notifications, lease_notifications and notification_backlog, updated by the lease and
-- the delivery outcome (finish_notification_attempt). Never the recipient, the payload or the dedupe
-- key of an existing message (not updatable columns).
grant select on notification_messages to prebuilds_reconciler;
grant insert (notification_template_id, user_id, payload, kind, preset_id, episode, dedupe_key)
    on notification_messages to prebuilds_reconciler;
grant update (status, attempts, next_attempt_at, leased_until, lease_token, last_error, sent_at, updated_at)
    on notification_messages to prebuilds_reconciler;
alter table notification_messages enable row level security;
drop policy if exists as_granted on notification_messages;
create policy as_granted on notification_messages as permissive for all to public using (true) with check (true);
create policy prebuilds_reconciler_own_outbox on notification_messages as restrictive for all
    to prebuilds_reconciler
    using (notification_template_id in (
        '414d9331-c1fc-4761-b40c-d1f4702279eb',  -- hard_limited: Prebuild Failure Limit Reached
        '9ab56367-21d6-438e-9e48-0cf94beca3d8',  -- validation_failed: Prebuild Validation Failed
        '3612b174-7ca6-431d-8222-8b9dcc23a45b',  -- recovered: Prebuild Failure Limit Recovered
        'f045ca47-72a8-4ca6-9606-5a0120f177ed',  -- breaker_opened: Prebuild Provisioning Outage
        '23683045-4e77-431a-bb8b-208c0f5fe506'   -- breaker_closed: Prebuild Provisioning Recovered
    ))
    with check (notification_template_id in (
        '414d9331-c1fc-4761-b40c-d1f4702279eb',
        '9ab56367-21d6-438e-9e48-0cf94beca3d8',
        '3612b174-7ca6-431d-8222-8b9dcc23a45b',
        'f045ca47-72a8-4ca6-9606-5a0120f177ed',
        '23683045-4e77-431a-bb8b-208c0f5fe506'
    ));
create policy prebuilds_reconciler_notifies_template_admins on notification_messages as restrictive for insert
    to prebuilds_reconciler
    with check (
        (
            (kind, notification_template_id) in (
                ('hard_limited', '414d9331-c1fc-4761-b40c-d1f4702279eb'::uuid),
                ('validation_failed', '9ab56367-21d6-438e-9e48-0cf94beca3d8'::uuid),
                ('recovered', '3612b174-7ca6-431d-8222-8b9dcc23a45b'::uuid)
            )
            and preset_id is not null
            or
            -- The breaker's (enqueue_breaker_notification): about no preset, to the site's template
            -- administrators only (no organization's: the outage is the deployment's).
            (kind, notification_template_id) in (
                ('breaker_opened', 'f045ca47-72a8-4ca6-9606-5a0120f177ed'::uuid),
                ('breaker_closed', '23683045-4e77-431a-bb8b-208c0f5fe506'::uuid)
            )
            and preset_id is null
            and (
                notification_messages.user_id is null
                or exists (
                    select 1 from users u
                    where u.id = notification_messages.user_id
                        and u.status = 'active' and not u.deleted and not u.is_system
                        and 'template-admin' = any (u.rbac_roles)
                )
            )
        )
        and (
            -- A preset's notice: to nobody, or to a template administrator of its organization or the site.
            notification_messages.preset_id is null
            or notification_messages.user_id is null
            or exists (
                select 1 from users u
                where u.id = notification_messages.user_id
                    and u.status = 'active' and not u.deleted and not u.is_system
                    and (
                        'template-admin' = any (u.rbac_roles)
                        or exists (
                            select 1
                            from template_version_presets p
                            join template_versions tv on tv.id = p.template_version_id
                            join templates t on t.id = tv.template_id
                            join organization_members m on m.organization_id = t.organization_id
                            where p.id = notification_messages.preset_id and m.user_id = u.id
                                and 'organization-template-admin' = any (m.roles)
                        )
                    )
            )
        )
    );

-- ---------------------------------------------------------------------------------------------------
-- notification_deliveries: which sink has which message, read with the lease (lease_notifications) and
-- written by record_notification_delivery, for the daemon's own messages only (the subquery sees only
-- those, through the outbox's policy; one primary-key lookup per inserted row). Reads are not narrowed:
-- a delivery row says nothing but a message id, a sink name and a time.
grant select, insert (message_id, sink, delivered_at) on notification_deliveries to prebuilds_reconciler;
alter table notification_deliveries enable row level security;
drop policy if exists as_granted on notification_deliveries;
create policy as_granted on notification_deliveries as permissive for all to public using (true) with check (true);
create policy prebuilds_reconciler_records_own_deliveries on notification_deliveries as restrictive for insert
    to prebuilds_reconciler
    with check (exists (select 1 from notification_messages m where m.id = notification_deliveries.message_id));

-- ---------------------------------------------------------------------------------------------------
-- organization_members, groups, group_members: the prebuilds user's memberships (BEHAVIOR.md section
-- 7). read_prebuilds_memberships reads what the prebuilds user has in each organization with prebuilds
-- (and enqueue_notifications reads organization roles); add_prebuilds_organization_members,
-- add_prebuilds_groups and add_prebuilds_group_members add what is missing, with `on conflict do
-- nothing`, which needs no privilege beyond INSERT. The role adds exactly these rows and nothing else
-- in these tables: the prebuilds user's organization membership, without roles; a group named
-- `coderprebuiltworkspaces`, displayed "Prebuilt Workspaces", with a quota allowance of 0; the
-- prebuilds user's membership of such a group. Never another user's membership, another group, a role
-- or a quota; never an update or a delete (no grant). The group policy's subquery is a primary-key
-- lookup per inserted row, and it sees the group: add_prebuilds_groups is a statement of its own,
-- before add_prebuilds_group_members in the same transaction.
grant select on organization_members, groups, group_members to prebuilds_reconciler;
grant insert (organization_id, user_id, roles) on organization_members to prebuilds_reconciler;
alter table organization_members enable row level security;
drop policy if exists as_granted on organization_members;
create policy as_granted on organization_members as permissive for all to public using (true) with check (true);
create policy prebuilds_reconciler_adds_prebuilds_membership on organization_members as restrictive for insert
    to prebuilds_reconciler
    with check (user_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and cardinality(roles) = 0);

grant insert (organization_id, name, display_name, quota_allowance) on groups to prebuilds_reconciler;
alter table groups enable row level security;
drop policy if exists as_granted on groups;
create policy as_granted on groups as permissive for all to public using (true) with check (true);
create policy prebuilds_reconciler_adds_prebuilds_group on groups as restrictive for insert
    to prebuilds_reconciler
    with check (
        name = 'coderprebuiltworkspaces' and display_name = 'Prebuilt Workspaces' and quota_allowance = 0
    );

grant insert (group_id, user_id) on group_members to prebuilds_reconciler;
alter table group_members enable row level security;
drop policy if exists as_granted on group_members;
create policy as_granted on group_members as permissive for all to public using (true) with check (true);
create policy prebuilds_reconciler_joins_prebuilds_group on group_members as restrictive for insert
    to prebuilds_reconciler
    with check (
        user_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
        and exists (
            select 1 from groups g
            where g.id = group_members.group_id and g.name = 'coderprebuiltworkspaces'
        )
    );

-- ---------------------------------------------------------------------------------------------------
-- reconciler_settings: the daemon's behaviour settings as its last pass used them (migration 0006).
-- Written by every pass under its lock (record_settings: insert ... on conflict do update, which reads
-- the conflicting row), read by `plan`, `status` and the other read-only commands
-- (read_recorded_settings). A table only the daemon writes: grants only. Not `id` (one row, the default).
grant select, insert (settings, instance, recorded_at, last_pass_at),
    update (settings, instance, recorded_at, last_pass_at)
    on reconciler_settings to prebuilds_reconciler;

-- ---------------------------------------------------------------------------------------------------
-- prebuild_breaker, prebuild_breaker_episodes: the global breaker (migration 0005), tables only the
-- daemon writes: grants only. Read by every pass (snapshot_breaker; snapshot_prebuilds reads the
-- episodes to leave the outage's failures out of the presets' evidence); the one breaker row updated by
-- write_breaker (not `id`); an episode inserted when the breaker opens (open_breaker_episode: on
-- conflict do nothing, which needs no other privilege) and closed when it closes (close_breaker_episode).
grant select, update (state, episode, changed_at, open_until, open_duration)
    on prebuild_breaker to prebuilds_reconciler;
grant select, insert (episode, opened_at, failures_since, reason), update (closed_at)
    on prebuild_breaker_episodes to prebuilds_reconciler;

-- ---------------------------------------------------------------------------------------------------
-- prebuild_events: the platform's claim events. Read by snapshot_demand (counts per window, for presets
-- with a target expression); deleted by purge_prebuild_events once older than the retention. Never
-- inserted or updated by the daemon (no grant). The delete is narrowed to events more than 2 hours old,
-- the least RECONCILER_PREBUILD_EVENTS_RETENTION accepts: the role cannot erase the recent demand that
-- targets are computed from.
grant select, delete on prebuild_events to prebuilds_reconciler;
alter table prebuild_events enable row level security;
drop policy if exists as_granted on prebuild_events;
create policy as_granted on prebuild_events as permissive for all to public using (true) with check (true);
create policy prebuilds_reconciler_purges_old_events on prebuild_events as restrictive for delete
    to prebuilds_reconciler
    using (created_at < now() - interval '2 hours');

commit;
