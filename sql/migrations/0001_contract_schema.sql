-- The contract schema of CONTRACTS.md section 1: every table, enum and fixed row that the platform's
-- other components (API server, provisioners) share with the reconciler, plus the constraints and
-- indexes that the reconciliation queries rely on.

create type provisioner_job_status as enum
    ('pending', 'running', 'succeeded', 'canceling', 'canceled', 'failed', 'unknown');
create type workspace_transition as enum ('start', 'stop', 'delete');
create type build_reason as enum
    ('initiator', 'autostart', 'autostop', 'dormancy', 'failedstop', 'autodelete', 'dashboard', 'cli');
create type prebuild_status as enum ('normal', 'hard_limited', 'validation_failed');
create type workspace_agent_lifecycle_state as enum
    ('created', 'starting', 'start_timeout', 'start_error', 'ready', 'shutting_down',
     'shutdown_timeout', 'shutdown_error', 'off');

create table organizations (
    id uuid primary key default gen_random_uuid(),
    name text not null unique check (name <> ''),
    created_at timestamptz not null default now()
);

create table users (
    id uuid primary key default gen_random_uuid(),
    username text not null unique check (username <> ''),
    email text not null default '',
    status text not null default 'active' check (status in ('active', 'suspended', 'dormant')),
    rbac_roles text[] not null default '{}',
    deleted boolean not null default false,
    is_system boolean not null default false,
    created_at timestamptz not null default now()
);

create table organization_members (
    organization_id uuid not null references organizations (id) on delete cascade,
    user_id uuid not null references users (id) on delete cascade,
    roles text[] not null default '{}',
    created_at timestamptz not null default now(),
    primary key (organization_id, user_id)
);
-- Recipients of notifications are looked up by user (site roles) and by organization (org roles).
create index organization_members_user_idx on organization_members (user_id);

create table templates (
    id uuid primary key default gen_random_uuid(),
    organization_id uuid not null references organizations (id) on delete cascade,
    name text not null check (name <> ''),
    active_version_id uuid,
    deleted boolean not null default false,
    deprecated text not null default '',
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
-- A deleted template frees its name; two live templates of one organization cannot share one.
create unique index templates_organization_name_live_idx
    on templates (organization_id, lower(name)) where not deleted;

create table template_versions (
    id uuid primary key default gen_random_uuid(),
    -- Nullable as in Coder: a version may be uploaded before its template exists.
    template_id uuid references templates (id) on delete cascade,
    organization_id uuid not null references organizations (id) on delete cascade,
    name text not null check (name <> ''),
    created_at timestamptz not null default now()
);
create index template_versions_template_idx on template_versions (template_id);

-- Deferrable: a template and its first version are usually created in one transaction, in either order.
alter table templates
    add constraint templates_active_version_fk foreign key (active_version_id)
    references template_versions (id) deferrable initially deferred;

create table template_version_presets (
    id uuid primary key default gen_random_uuid(),
    template_version_id uuid not null references template_versions (id) on delete cascade,
    name text not null check (name <> ''),
    desired_instances integer check (desired_instances >= 0),
    invalidate_after_secs integer check (invalidate_after_secs >= 0),
    scheduling_timezone text not null default '',
    prebuild_status prebuild_status not null default 'normal',
    last_invalidated_at timestamptz,
    created_at timestamptz not null default now(),
    -- Ours: when prebuild_status last changed, and the count of failure episodes (hard limit or
    -- validation failure) so far. An episode number makes "notify once per episode" a unique key.
    prebuild_status_changed_at timestamptz,
    failure_episode integer not null default 0 check (failure_episode >= 0),
    -- Ours: an operator reset; failures of builds created before it no longer count.
    failure_reset_at timestamptz,
    unique (template_version_id, name)
);
-- The snapshot reads only presets that have prebuilds.
create index template_version_presets_prebuilds_idx
    on template_version_presets (template_version_id) where desired_instances is not null;

create table template_version_preset_parameters (
    id uuid primary key default gen_random_uuid(),
    template_version_preset_id uuid not null references template_version_presets (id) on delete cascade,
    name text not null,
    value text not null,
    unique (template_version_preset_id, name)
);

create table template_version_preset_prebuild_schedules (
    id uuid primary key default gen_random_uuid(),
    preset_id uuid not null references template_version_presets (id) on delete cascade,
    cron_expression text not null,
    desired_instances integer not null check (desired_instances >= 0)
);
create index template_version_preset_prebuild_schedules_preset_idx
    on template_version_preset_prebuild_schedules (preset_id);

create table workspaces (
    id uuid primary key default gen_random_uuid(),
    owner_id uuid not null references users (id),
    organization_id uuid not null references organizations (id),
    template_id uuid not null references templates (id),
    name text not null check (name <> ''),
    deleted boolean not null default false,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create unique index workspaces_owner_name_live_idx on workspaces (owner_id, lower(name)) where not deleted;
-- Live prebuilds: the system user's workspaces that are not deleted. The predicate names the fixed
-- system user literally so that the snapshot queries (which do too) can use this small index instead
-- of scanning every workspace, deleted and claimed ones included.
create index workspaces_live_prebuilds_idx on workspaces (template_id, created_at)
    where owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and not deleted;
create index workspaces_owner_live_idx on workspaces (owner_id) where not deleted;

create table provisioner_jobs (
    id uuid primary key default gen_random_uuid(),
    organization_id uuid not null references organizations (id),
    initiator_id uuid not null references users (id),
    type text not null default 'workspace_build'
        check (type in ('workspace_build', 'template_version_import', 'template_version_dry_run')),
    input jsonb not null default '{}',
    worker_id uuid,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    started_at timestamptz,
    canceled_at timestamptz,
    completed_at timestamptz,
    error text,
    error_code text,
    -- Derived by the database so that every component agrees on what a job's status is.
    job_status provisioner_job_status not null generated always as (
        case
            when completed_at is not null then
                case
                    when coalesce(error, '') <> '' then 'failed'::provisioner_job_status
                    when canceled_at is not null then 'canceled'::provisioner_job_status
                    else 'succeeded'::provisioner_job_status
                end
            else
                case
                    when coalesce(error, '') <> '' then 'failed'::provisioner_job_status
                    when canceled_at is not null then 'canceling'::provisioner_job_status
                    when started_at is null then 'pending'::provisioner_job_status
                    else 'running'::provisioner_job_status
                end
        end
    ) stored
);
-- Provisioners (and the demo's simulated one) poll for work; few jobs are ever unfinished.
create index provisioner_jobs_unfinished_idx on provisioner_jobs (created_at)
    where job_status in ('pending', 'running', 'canceling');

create table workspace_builds (
    id uuid primary key default gen_random_uuid(),
    workspace_id uuid not null references workspaces (id) on delete cascade,
    build_number integer not null check (build_number > 0),
    transition workspace_transition not null,
    template_version_id uuid not null references template_versions (id),
    template_version_preset_id uuid references template_version_presets (id) on delete set null,
    job_id uuid not null unique references provisioner_jobs (id),
    initiator_id uuid not null references users (id),
    reason build_reason not null default 'initiator',
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    -- The latest build of a workspace is found by a backward scan of this unique index.
    unique (workspace_id, build_number)
);
-- A workspace's current preset: its most recent start build that names a preset.
create index workspace_builds_preset_start_idx on workspace_builds (workspace_id, build_number desc)
    where transition = 'start' and template_version_preset_id is not null;
-- First builds by preset: the created/failed/claimed counters.
create index workspace_builds_first_by_preset_idx on workspace_builds (template_version_preset_id)
    where build_number = 1;

create table workspace_agents (
    id uuid primary key default gen_random_uuid(),
    job_id uuid not null references provisioner_jobs (id) on delete cascade,
    name text not null,
    lifecycle_state workspace_agent_lifecycle_state not null default 'created',
    parent_id uuid references workspace_agents (id) on delete cascade,
    deleted boolean not null default false,
    created_at timestamptz not null default now()
);
create index workspace_agents_job_idx on workspace_agents (job_id);

create table site_configs (
    key text primary key,
    value text not null
);

create table notification_templates (
    id uuid primary key,
    name text not null unique,
    title_template text not null,
    body_template text not null
);

create table notification_messages (
    id uuid primary key default gen_random_uuid(),
    notification_template_id uuid not null references notification_templates (id),
    -- Null when the template had no administrator to tell: the message is still recorded.
    user_id uuid references users (id),
    payload jsonb not null default '{}',
    status text not null default 'pending',
    -- "Exactly once per preset and episode (and recipient)" is enforced here, not in memory.
    dedupe_key text not null unique,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
create index notification_messages_pending_idx on notification_messages (created_at)
    where status = 'pending';

insert into users (id, username, email, status, is_system)
values ('c42fdf75-3097-471c-8c33-fb52454d81c0', 'prebuilds', '', 'active', true);

insert into notification_templates (id, name, title_template, body_template)
values (
    '414d9331-c1fc-4761-b40c-d1f4702279eb',
    'Prebuild Failure Limit Reached',
    'Prebuilds of preset "{preset}" ({template}) stopped: failure limit reached',
    'The last {failure_count} prebuilds of preset "{preset}" of template "{template}" '
    '(version "{template_version}", organization "{organization}") failed, so no more are created. '
    'Last error: {last_error} ({last_error_code}). Failed prebuilds (workspace ids): {failed_workspaces}. '
    'Fix the template and publish a new version, '
    'or run "reconciler presets reset {preset_id}" to try again.'
);
