-- The least-privilege role of the reconciler: what `reconciler run` (and `reconcile --once`, `plan`,
-- `status`, `pause`, `resume`, `presets reset`, `notifications list`) need to read and write, nothing
-- more. Not a migration: the schema's owner runs it once after `reconciler migrate`, and again after
-- every upgrade (it is idempotent, and new tables need their grants).
--
--     psql "$OWNER_DSN" -v ON_ERROR_STOP=1 -f sql/roles/reconciler_role.sql
--     psql "$OWNER_DSN" -c "create role reconciler_daemon login password '...' in role prebuilds_reconciler"
--
-- `prebuilds_reconciler` is a group role without LOGIN: the daemon logs in as a role that is a member of
-- it. Migrations stay with the owner: the daemon cannot create, alter or drop anything.
--
-- What the grants encode:
--   - it reads the platform's tables (presets, templates, workspaces, builds, jobs, agents, users for
--     notification recipients), never writes users, organizations, templates or versions;
--   - it creates prebuilds (workspace, first build, job rows), deletes them by adding a build and a job
--     (never a DELETE: there is no DELETE grant anywhere), and, for canceled first builds, sets the
--     job's cancel/complete times and the workspace's `deleted`: column grants, so it cannot change a
--     workspace's owner, a job's result or a build;
--   - it sets a preset's status columns (hard limit, validation failure, reset), and the pause setting;
--   - it writes the notification outbox (messages, deliveries) and its delivery bookkeeping.
-- Column-level UPDATE also allows SELECT ... FOR UPDATE on those tables, which the creates and deletes
-- use to serialize with replicas and claims. Functions (gen_random_uuid, the advisory locks) and the
-- enum types are usable by PUBLIC already; no table uses a sequence (every key is a uuid).

do $$
begin
    create role prebuilds_reconciler nologin;
exception
    -- Roles are cluster-wide: another database (or a concurrent run) may have created it already.
    when duplicate_object then null;
end $$;

grant usage on schema public to prebuilds_reconciler;

-- Reads.
grant select on
    organizations,
    users,
    organization_members,
    templates,
    template_versions,
    template_version_presets,
    template_version_preset_prebuild_schedules,
    workspaces,
    workspace_builds,
    provisioner_jobs,
    workspace_agents,
    site_configs,
    notification_templates,
    notification_messages,
    notification_deliveries,
    reconciler_schema_migrations
to prebuilds_reconciler;

-- Prebuilds: created whole, deleted by a delete build, canceled first builds marked done.
grant insert on workspaces, workspace_builds, provisioner_jobs to prebuilds_reconciler;
grant update (deleted, updated_at) on workspaces to prebuilds_reconciler;
grant update (canceled_at, completed_at, updated_at) on provisioner_jobs to prebuilds_reconciler;

-- Preset status: hard limit and validation failure episodes, recovery, an operator's reset.
grant update (prebuild_status, prebuild_status_changed_at, failure_episode, failure_reset_at)
    on template_version_presets to prebuilds_reconciler;

-- `reconciler pause` / `resume`.
grant insert, update (value) on site_configs to prebuilds_reconciler;

-- The notification outbox and its delivery.
grant insert on notification_messages, notification_deliveries to prebuilds_reconciler;
grant update (status, attempts, next_attempt_at, leased_until, lease_token, last_error, sent_at, updated_at)
    on notification_messages to prebuilds_reconciler;
