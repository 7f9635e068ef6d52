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

-- name: list_notifications
select m.id, m.kind, m.status, m.created_at, m.sent_at, m.attempts, m.last_error, m.payload, m.preset_id,
       m.episode, u.username, u.email, nt.name as template_name
from notification_messages m
join notification_templates nt on nt.id = m.notification_template_id
left join users u on u.id = m.user_id
order by m.created_at desc, m.id
limit $1
