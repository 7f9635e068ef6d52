-- The notification outbox.

-- name: enqueue_notifications
-- One row per recipient of each notice, in the transaction that changed the preset's status. Recipients:
-- active, non-deleted, non-system users with the site role template-admin, or members of the template's
-- organization with organization-template-admin. A notice with nobody to tell is still recorded, with
-- no user. `dedupe_key` (unique) makes a second enqueue of the same preset, episode and recipient a no-op.
-- $1 notification templates, $2 presets, $3 episodes, $4 kinds, $5 payloads (JSON text).
with notices as (
    select *
    from unnest($1::uuid[], $2::uuid[], $3::int[], $4::text[], $5::text[])
        as notice (notification_template_id, preset_id, episode, kind, payload)
),
scoped as (
    select notices.*, t.organization_id
    from notices
    join template_version_presets p on p.id = notices.preset_id
    join template_versions tv on tv.id = p.template_version_id
    join templates t on t.id = tv.template_id
),
recipients as (
    select scoped.*, u.id as user_id
    from scoped
    join users u on u.status = 'active' and not u.deleted and not u.is_system
        and (
            'template-admin' = any(u.rbac_roles)
            or exists (
                select 1 from organization_members m
                where m.user_id = u.id and m.organization_id = scoped.organization_id
                    and 'organization-template-admin' = any(m.roles)
            )
        )
),
addressed as (
    select notification_template_id, preset_id, episode, kind, payload, user_id from recipients
    union all
    select notification_template_id, preset_id, episode, kind, payload, null::uuid
    from scoped
    where not exists (
        select 1 from recipients
        where recipients.preset_id = scoped.preset_id and recipients.kind = scoped.kind
            and recipients.episode = scoped.episode
    )
)
insert into notification_messages (notification_template_id, user_id, payload, kind, preset_id, episode, dedupe_key)
select notification_template_id, user_id, payload::jsonb, kind, preset_id, episode,
       kind || ':' || preset_id || ':' || episode || ':' || coalesce(user_id::text, 'nobody')
from addressed
on conflict (dedupe_key) do nothing
returning id, user_id, kind, preset_id

-- name: enqueue_breaker_notification
-- One notification per breaker episode when it opens, one when it closes (issue 15.2), to the site's
-- template administrators (active, non-deleted, non-system users with the site role template-admin),
-- or, with nobody to tell, recorded with no user; webhooks get it either way. About no preset.
-- `dedupe_key` makes a second enqueue of the same episode and kind a no-op.
-- $1 notification template, $2 kind, $3 episode, $4 payload (JSON text).
with recipients as (
    select u.id as user_id
    from users u
    where u.status = 'active' and not u.deleted and not u.is_system and 'template-admin' = any(u.rbac_roles)
),
addressed as (
    select user_id from recipients
    union all
    select null::uuid where not exists (select 1 from recipients)
)
insert into notification_messages (notification_template_id, user_id, payload, kind, preset_id, episode, dedupe_key)
select $1::uuid, user_id, $4::jsonb, $2::text, null, $3::integer,
       $2::text || ':breaker:' || $3::integer || ':' || coalesce(user_id::text, 'nobody')
from addressed
on conflict (dedupe_key) do nothing
returning id, user_id

-- name: list_notifications
select m.id, m.kind, m.status, m.created_at, m.sent_at, m.attempts, m.last_error, m.payload, m.preset_id,
       m.episode, u.username, u.email, nt.name as template_name
from notification_messages m
join notification_templates nt on nt.id = m.notification_template_id
left join users u on u.id = m.user_id
order by m.created_at desc, m.id
limit $1

-- name: lease_notifications
-- Lease up to $4 due pending messages until $2 under token $3 ($1 now). SKIP LOCKED: replicas polling at
-- the same moment take different messages instead of queueing on each other's row locks; the lease
-- (committed with this statement) keeps them apart afterwards, and runs out if its holder dies.
-- Returns what rendering and delivery need, with the sinks that already have each message. A notice (one
-- kind, preset and episode) has one message per recipient; webhooks are told once per notice, by the
-- message with the lowest id (`carries_notice`), which lists every recipient of the notice.
with due as (
    select id
    from notification_messages
    where status = 'pending' and next_attempt_at <= $1 and (leased_until is null or leased_until <= $1)
    order by next_attempt_at, id
    limit $4
    for update skip locked
),
leased as (
    update notification_messages m
    set leased_until = $2, lease_token = $3, updated_at = $1
    from due
    where m.id = due.id
    returning m.id, m.kind, m.payload, m.attempts, m.created_at, m.user_id, m.notification_template_id,
              m.preset_id, m.episode
)
select leased.id, leased.kind, leased.payload, leased.attempts, leased.created_at, leased.preset_id,
       leased.user_id, u.username, u.email,
       coalesce(u.status = 'active' and not u.deleted, false) as user_active,
       nt.name as template_name, nt.title_template, nt.body_template,
       array(
           select d.sink from notification_deliveries d where d.message_id = leased.id order by d.sink
       ) as delivered_sinks,
       not exists (
           select 1 from notification_messages other
           where other.preset_id = leased.preset_id and other.kind = leased.kind
               and other.episode = leased.episode and other.id < leased.id
       ) as carries_notice,
       coalesce((
           select jsonb_agg(jsonb_build_object('username', ru.username, 'email', nullif(ru.email, ''))
                            order by ru.username)
           from notification_messages other
           join users ru on ru.id = other.user_id
           where other.id = leased.id
               or (other.preset_id = leased.preset_id and other.kind = leased.kind
                   and other.episode = leased.episode)
       ), '[]'::jsonb) as notice_recipients
from leased
join notification_templates nt on nt.id = leased.notification_template_id
left join users u on u.id = leased.user_id
order by leased.created_at, leased.id

-- name: record_notification_delivery
-- A sink has the message ($1 message, $2 sink, $3 when): written at once, so that a retry (or another
-- dispatcher after a crash) never delivers it to that sink again.
insert into notification_deliveries (message_id, sink, delivered_at)
values ($1, $2, $3)
on conflict (message_id, sink) do nothing

-- name: finish_notification_attempt
-- The outcome of one attempt, only by the lease holder ($1 message, $2 lease token): $3 status,
-- $4 next attempt (null: unchanged), $5 last error, $6 sent at, $7 now. Releases the lease.
update notification_messages
set status = $3,
    attempts = attempts + 1,
    next_attempt_at = coalesce($4, next_attempt_at),
    last_error = $5,
    sent_at = $6,
    leased_until = null,
    lease_token = null,
    updated_at = $7
where id = $1 and lease_token = $2
returning id

-- name: notification_backlog
-- Pending messages (due or not, leased or not) and the oldest one's creation time, for the gauges.
select count(*) as pending, min(created_at) as oldest_created_at
from notification_messages
where status = 'pending'
