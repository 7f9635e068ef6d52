-- Groups (CONTRACTS.md section 4): the platform charges quota by group, and the prebuilds user belongs
-- to the group `coderprebuiltworkspaces` of every organization with prebuilds, with a quota allowance
-- of 0, so that prebuilds never spend anybody's quota (BEHAVIOR.md section 7).

create table groups (
    id uuid primary key default gen_random_uuid(),
    organization_id uuid not null references organizations (id) on delete cascade,
    name text not null check (name <> ''),
    -- Beyond the contract: the name people read ("Prebuilt Workspaces"); `name` is the stable key that
    -- the daemon and the platform look the group up by. Empty means "show the name".
    display_name text not null default '',
    quota_allowance integer not null default 0,
    created_at timestamptz not null default now(),
    unique (organization_id, name)
);

create table group_members (
    group_id uuid not null references groups (id) on delete cascade,
    user_id uuid not null references users (id) on delete cascade,
    created_at timestamptz not null default now(),
    primary key (group_id, user_id)
);
-- A user's groups (quota is charged by the groups of a workspace's owner).
create index group_members_user_idx on group_members (user_id);
