-- Demand-driven targets (issue 14; docs/DEMAND.md, BEHAVIOR.md section 2.1). The platform writes both:
-- a preset's expression when it publishes a template version, and an event on every claim. The daemon
-- reads them in its snapshot and purges events older than RECONCILER_PREBUILD_EVENTS_RETENTION.

-- Null or blank: the static or scheduled target, as before.
alter table template_version_presets add column desired_instances_expression text;

create table prebuild_events (
    id uuid primary key default gen_random_uuid(),
    preset_id uuid not null references template_version_presets (id) on delete cascade,
    -- `claim_succeeded` or `claim_missed`; other types are kept and ignored (no check: a newer platform
    -- may write types this daemon does not know, and its claim path must never fail on ours).
    event_type text not null,
    created_at timestamptz not null default now()
);
-- The snapshot's windowed counts: one range scan per preset with an expression, whatever the table's age.
create index prebuild_events_preset_created_idx on prebuild_events (preset_id, created_at desc);
-- Ours: the purge's batches find the oldest rows without scanning per preset.
create index prebuild_events_created_idx on prebuild_events (created_at);
