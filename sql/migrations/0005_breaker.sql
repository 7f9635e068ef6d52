-- The global breaker for shared outages (issue 15 point 2). Its state is one row that every replica
-- reads in its snapshot and that a pass changes, so that replicas agree and a restart keeps it; its
-- episodes are kept, because the failures of an episode's builds count for neither a preset's backoff
-- nor its hard limit (a shared outage is nobody's template's fault).

create table prebuild_breaker (
    -- One row: the breaker is the deployment's.
    id boolean primary key default true check (id),
    state text not null default 'closed' check (state in ('closed', 'open', 'half_open')),
    -- Episodes so far: the current one while open or half-open. A pass changes the row only from the
    -- state and episode it read, so a pass working from an older snapshot cannot undo a newer change.
    episode integer not null default 0 check (episode >= 0),
    changed_at timestamptz,
    -- Open: when it turns half-open. How long it was open the last time (a failed probe doubles it).
    open_until timestamptz,
    open_duration interval,
    check ((state = 'open') = (open_until is not null))
);
insert into prebuild_breaker default values;

create table prebuild_breaker_episodes (
    episode integer primary key check (episode > 0),
    opened_at timestamptz not null,
    -- Failed prebuild builds that completed from here until `closed_at` are the outage's.
    failures_since timestamptz not null,
    closed_at timestamptz,
    -- Why it opened (how many builds failed, across how many presets), for the operator.
    reason text not null default '',
    check (failures_since <= opened_at),
    check (closed_at is null or closed_at >= opened_at)
);

-- The breaker's evidence: prebuild builds completed in its window. Few rows per window, among all jobs.
create index provisioner_jobs_prebuild_completed_idx on provisioner_jobs (completed_at)
    where initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and completed_at is not null;

-- One notification when an episode opens, one when it closes, to the site's template administrators.
insert into notification_message_kinds (kind) values ('breaker_opened'), ('breaker_closed');

insert into notification_templates (id, name, title_template, body_template)
values
(
    'f045ca47-72a8-4ca6-9606-5a0120f177ed',
    'Prebuild Provisioning Outage',
    'Prebuilds paused everywhere: builds are failing across many presets',
    'Prebuild builds are failing across many presets at once ({reason}), which looks like a shared outage '
    '(an expired cloud credential, an unreachable registry) rather than broken templates. No prebuild is '
    'created anywhere until {open_until}; then a few probe builds test whether provisioning works again. '
    'Deletes go on, and no preset is marked hard-limited for these failures. Episode {episode}.'
),
(
    '23683045-4e77-431a-bb8b-208c0f5fe506',
    'Prebuild Provisioning Recovered',
    'Prebuilds are being created again',
    'The shared outage that paused prebuilds since {opened_at} is over ({reason}); pools are being filled '
    'again. Episode {episode}.'
);
