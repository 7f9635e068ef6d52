-- The notification outbox beyond the contract: which preset and episode a message is about, and what
-- delivery needs (attempts, backoff, leases, and one row per sink that has received the message).

create table notification_message_kinds (
    kind text primary key
);
insert into notification_message_kinds (kind) values ('hard_limited'), ('validation_failed'), ('recovered');

alter table notification_messages
    add column kind text not null default 'hard_limited' references notification_message_kinds (kind),
    add column preset_id uuid references template_version_presets (id) on delete set null,
    add column episode integer not null default 0,
    add column attempts integer not null default 0 check (attempts >= 0),
    add column next_attempt_at timestamptz not null default now(),
    -- A dispatcher that leased a message owns it until then; a crashed one's lease simply runs out.
    add column leased_until timestamptz,
    -- Which lease the dispatcher holds: one whose lease ran out (and was taken over) cannot record its
    -- late outcome over the new holder's.
    add column lease_token uuid,
    add column last_error text,
    add column sent_at timestamptz,
    add constraint notification_messages_status_check
        -- pending: to deliver (and kept so while no sink is configured); sent: at least one sink has it;
        -- failed: attempts exhausted, or refused for good; recorded: kept, but no configured sink applies
        -- (nobody to e-mail and no webhook).
        check (status in ('pending', 'sent', 'failed', 'recorded'));

-- What the dispatchers poll: due pending messages.
drop index notification_messages_pending_idx;
create index notification_messages_due_idx on notification_messages (next_attempt_at)
    where status = 'pending';
create index notification_messages_preset_idx on notification_messages (preset_id, created_at);

-- A success per (message, sink) is recorded here, so a retry after a partial failure never delivers a
-- message twice to the sink that already has it.
create table notification_deliveries (
    message_id uuid not null references notification_messages (id) on delete cascade,
    sink text not null,
    delivered_at timestamptz not null default now(),
    primary key (message_id, sink)
);

insert into notification_templates (id, name, title_template, body_template)
values
(
    '3612b174-7ca6-431d-8222-8b9dcc23a45b',
    'Prebuild Failure Limit Recovered',
    'Prebuilds of preset "{preset}" ({template}) recovered',
    'Preset "{preset}" of template "{template}" (version "{template_version}", organization '
    '"{organization}") is creating prebuilds again: its failure streak is broken.'
),
(
    '9ab56367-21d6-438e-9e48-0cf94beca3d8',
    'Prebuild Validation Failed',
    'Prebuilds of preset "{preset}" ({template}) stopped: the template is invalid',
    'A prebuild of preset "{preset}" of template "{template}" (version "{template_version}", organization '
    '"{organization}") failed with the non-retryable error {last_error_code}: {last_error}. No more are '
    'created for this version. Fix the template and publish a new version, or run '
    '"reconciler presets reset {preset_id}".'
);
