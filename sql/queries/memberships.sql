-- The prebuilds user's memberships (BEHAVIOR.md section 7): in every organization that has prebuilds
-- configured, the prebuilds user c42fdf75-3097-471c-8c33-fb52454d81c0 is a member (no roles) and a
-- member of the organization's group `coderprebuiltworkspaces` (quota allowance 0). The user and the
-- group are fixed by the contract and written literally, as the least-privilege role's policies do.

-- name: read_prebuilds_memberships
-- Every organization where a preset of a live (not deleted) template, on any of its versions, has
-- prebuilds configured: a desired count, a schedule, or a target expression that is not blank. Then
-- what the prebuilds user has there. One read, whatever the number of organizations; the pass writes
-- only when a row of it says something is missing.
--
-- `desired_instances_expression` is read through `to_jsonb(p)` rather than named: the column is added
-- by a later migration (CONTRACTS.md section 4), and this statement must work before and after it.
-- It is looked at only for presets that have neither a count nor a schedule.
with organizations_with_prebuilds as (
    select distinct t.organization_id
    from templates t
    where not t.deleted
        and exists (
            select
            from template_versions tv
            join template_version_presets p on p.template_version_id = tv.id
            where tv.template_id = t.id
                and (
                    p.desired_instances is not null
                    or exists (
                        select from template_version_preset_prebuild_schedules s where s.preset_id = p.id
                    )
                    or btrim(coalesce(to_jsonb(p) ->> 'desired_instances_expression', '')) <> ''
                )
        )
)
select
    o.id as organization_id,
    o.name as organization_name,
    member.user_id is not null as is_member,
    prebuilds_group.id is not null as group_exists,
    group_member.user_id is not null as in_group
from organizations_with_prebuilds owp
join organizations o on o.id = owp.organization_id
left join organization_members member
    on member.organization_id = o.id and member.user_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
left join groups prebuilds_group
    on prebuilds_group.organization_id = o.id and prebuilds_group.name = 'coderprebuiltworkspaces'
left join group_members group_member
    on group_member.group_id = prebuilds_group.id
    and group_member.user_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
order by o.name, o.id

-- name: add_prebuilds_memberships
-- $1: the organizations to complete. Adds, in each, what is missing of: the prebuilds user's
-- membership (no roles), the group `coderprebuiltworkspaces` ("Prebuilt Workspaces", quota allowance
-- 0), and the user's membership of that group. Never changes a row that exists (an administrator may
-- have given the user roles or the group another quota). One statement: all of it lands or none does.
--
-- Safe with a concurrent writer (another replica, the platform): a row that a concurrent transaction
-- inserts first is a conflict that `on conflict do nothing` skips, never a unique violation. If that
-- transaction created the group, this statement does not see the group and leaves the group
-- membership to it: the same statement there added both, atomically. Organizations are taken in id
-- order in every insert, so that two such statements wait on each other in one order, never in a cycle.
-- Returns one row per organization where something was added.
with targets as (
    select o.id as organization_id
    from organizations o
    where o.id = any($1::uuid[])
),
added_members as (
    insert into organization_members (organization_id, user_id, roles)
    select t.organization_id, 'c42fdf75-3097-471c-8c33-fb52454d81c0', '{}'
    from targets t
    where not exists (
        select from organization_members m
        where m.organization_id = t.organization_id and m.user_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
    )
    order by t.organization_id
    on conflict (organization_id, user_id) do nothing
    returning organization_id
),
added_groups as (
    insert into groups (organization_id, name, display_name, quota_allowance)
    select t.organization_id, 'coderprebuiltworkspaces', 'Prebuilt Workspaces', 0
    from targets t
    where not exists (
        select from groups g where g.organization_id = t.organization_id and g.name = 'coderprebuiltworkspaces'
    )
    order by t.organization_id
    on conflict (organization_id, name) do nothing
    returning id, organization_id
),
prebuilds_groups as (
    select id, organization_id from added_groups
    union all
    select g.id, g.organization_id
    from groups g
    join targets t on t.organization_id = g.organization_id
    where g.name = 'coderprebuiltworkspaces'
),
added_group_members as (
    insert into group_members (group_id, user_id)
    select pg.id, 'c42fdf75-3097-471c-8c33-fb52454d81c0'
    from prebuilds_groups pg
    where not exists (
        select from group_members gm
        where gm.group_id = pg.id and gm.user_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
    )
    order by pg.organization_id
    on conflict (group_id, user_id) do nothing
    returning group_id
)
select
    o.id as organization_id,
    o.name as organization_name,
    exists (select from added_members a where a.organization_id = o.id) as member_added,
    exists (select from added_groups a where a.organization_id = o.id) as group_added,
    exists (
        select from added_group_members a join prebuilds_groups pg on pg.id = a.group_id
        where pg.organization_id = o.id
    ) as group_member_added
from organizations o
where o.id in (select organization_id from added_members)
    or o.id in (select organization_id from added_groups)
    or o.id in (select pg.organization_id from added_group_members a join prebuilds_groups pg on pg.id = a.group_id)
order by o.name, o.id
