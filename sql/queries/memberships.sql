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
-- It is looked at only for presets that have neither a count nor a schedule. A targeted pass (change
-- events) reads only the organizations of its templates $1 (the `-- targeted` line, see reads.sql).
with organizations_with_prebuilds as (
    select distinct t.organization_id
    from templates t
    where not t.deleted
        and t.id = any($1::uuid[])  -- targeted
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

-- The three statements below add, in the organizations $1, what is missing of: the prebuilds user's
-- membership (no roles), the group `coderprebuiltworkspaces` ("Prebuilt Workspaces", quota allowance
-- 0), and the user's membership of that group. They run in this order in one transaction, so that all
-- of it lands or none does, and so that the third sees the groups the second added. They never change
-- a row that exists (an administrator may have given the user roles, or the group another quota), and
-- organizations that no longer exist are skipped. Each returns the organizations where it added a row.
--
-- Safe with a concurrent writer (another replica, the platform): a row that a concurrent transaction
-- inserts first is a conflict that `on conflict do nothing` skips once that transaction commits (and
-- inserts after all if it rolls back), never a unique violation. Every writer takes the three tables in
-- this order, and the organizations in id order within each, so two of them wait on each other in one
-- order, never in a cycle (a deadlock). Three statements rather than one with three data-modifying
-- CTEs: the order in which a single statement runs its CTEs is the plan's, not the text's, and a row
-- policy on group_members can then see the group it checks.

-- name: add_prebuilds_organization_members
with added as (
    insert into organization_members (organization_id, user_id, roles)
    select o.id, 'c42fdf75-3097-471c-8c33-fb52454d81c0', '{}'
    from organizations o
    where o.id = any($1::uuid[])
        and not exists (
            select from organization_members m
            where m.organization_id = o.id and m.user_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
        )
    order by o.id
    on conflict (organization_id, user_id) do nothing
    returning organization_id
)
select o.id as organization_id, o.name as organization_name
from added
join organizations o on o.id = added.organization_id

-- name: add_prebuilds_groups
with added as (
    insert into groups (organization_id, name, display_name, quota_allowance)
    select o.id, 'coderprebuiltworkspaces', 'Prebuilt Workspaces', 0
    from organizations o
    where o.id = any($1::uuid[])
        and not exists (
            select from groups g where g.organization_id = o.id and g.name = 'coderprebuiltworkspaces'
        )
    order by o.id
    on conflict (organization_id, name) do nothing
    returning organization_id
)
select o.id as organization_id, o.name as organization_name
from added
join organizations o on o.id = added.organization_id

-- name: add_prebuilds_group_members
with added as (
    insert into group_members (group_id, user_id)
    select g.id, 'c42fdf75-3097-471c-8c33-fb52454d81c0'
    from groups g
    where g.organization_id = any($1::uuid[])
        and g.name = 'coderprebuiltworkspaces'
        and not exists (
            select from group_members m
            where m.group_id = g.id and m.user_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
        )
    order by g.organization_id
    on conflict (group_id, user_id) do nothing
    returning group_id
)
select o.id as organization_id, o.name as organization_name
from added
join groups g on g.id = added.group_id
join organizations o on o.id = g.organization_id
