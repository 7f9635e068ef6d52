"""The prebuilds user's memberships (BEHAVIOR.md section 7) on a real database: what is added where, that
it is added once, that concurrent writers never make it fail, and that one organization's failure stays
with that organization."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from structlog.testing import capture_logs

from reconciler import db
from reconciler.memberships import ensure_prebuilds_memberships
from reconciler.snapshot import PREBUILDS_SYSTEM_USER_ID
from reconciler.store.memberships import (
    MembershipKind,
    add_prebuilds_memberships,
    read_prebuilds_memberships,
)
from tests.factories import Factory, Organization

MEMBERSHIP_STATEMENTS = {
    "read_prebuilds_memberships",
    "add_prebuilds_organization_members",
    "add_prebuilds_groups",
    "add_prebuilds_group_members",
}
ALL_THREE = (MembershipKind.ORGANIZATION_MEMBER, MembershipKind.GROUP, MembershipKind.GROUP_MEMBER)


async def memberships_of(connection: asyncpg.Connection, organization: Organization) -> dict[str, object]:
    """The prebuilds user's rows in one organization, as the platform would read them."""
    member = await connection.fetchrow(
        "select roles from organization_members where organization_id = $1 and user_id = $2",
        organization.id,
        PREBUILDS_SYSTEM_USER_ID,
    )
    group = await connection.fetchrow(
        "select id, display_name, quota_allowance from groups"
        " where organization_id = $1 and name = 'coderprebuiltworkspaces'",
        organization.id,
    )
    in_group = group is not None and await connection.fetchval(
        "select exists (select from group_members where group_id = $1 and user_id = $2)",
        group["id"],
        PREBUILDS_SYSTEM_USER_ID,
    )
    return {
        "member_roles": None if member is None else list(member["roles"]),
        "group": None if group is None else (group["display_name"], group["quota_allowance"]),
        "in_group": in_group,
    }


COMPLETE = {"member_roles": [], "group": ("Prebuilt Workspaces", 0), "in_group": True}
NOTHING = {"member_roles": None, "group": None, "in_group": False}


async def row_counts(connection: asyncpg.Connection) -> tuple[int, int, int]:
    return (
        await connection.fetchval(
            "select count(*) from organization_members where user_id = $1", PREBUILDS_SYSTEM_USER_ID
        ),
        await connection.fetchval("select count(*) from groups where name = 'coderprebuiltworkspaces'"),
        await connection.fetchval("select count(*) from group_members where user_id = $1", PREBUILDS_SYSTEM_USER_ID),
    )


async def organization_with_prebuilds(factory: Factory, name: str | None = None) -> Organization:
    organization = await factory.organization(name)
    await factory.preset(template=await factory.template(organization), desired=2)
    return organization


# --- the schema ---------------------------------------------------------------------------------------


async def test_group_names_are_unique_per_organization_and_go_with_their_organization(factory: Factory) -> None:
    first, second = await factory.organization(), await factory.organization()
    insert = "insert into groups (organization_id, name) values ($1, 'coderprebuiltworkspaces') returning id"
    group_id = await factory.connection.fetchval(insert, first.id)
    await factory.connection.fetchval(insert, second.id)
    with pytest.raises(asyncpg.UniqueViolationError):
        await factory.connection.fetchval(insert, first.id)
    defaults = await factory.connection.fetchrow(
        "select quota_allowance, display_name from groups where id = $1", group_id
    )
    assert defaults is not None
    assert tuple(defaults) == (0, "")
    await factory.connection.execute(
        "insert into group_members (group_id, user_id) values ($1, $2)", group_id, PREBUILDS_SYSTEM_USER_ID
    )
    with pytest.raises(asyncpg.UniqueViolationError):
        await factory.connection.execute(
            "insert into group_members (group_id, user_id) values ($1, $2)", group_id, PREBUILDS_SYSTEM_USER_ID
        )
    await factory.connection.execute("delete from organizations where id = $1", first.id)
    assert await row_counts(factory.connection) == (0, 1, 0)


# --- which organizations ------------------------------------------------------------------------------


async def test_a_new_organization_with_prebuilds_gets_all_three_rows(factory: Factory) -> None:
    organization = await organization_with_prebuilds(factory)
    outcome = await ensure_prebuilds_memberships(factory.connection)
    assert [(added.organization_id, added.added) for added in outcome.added] == [(organization.id, ALL_THREE)]
    assert outcome.failures == ()
    assert await memberships_of(factory.connection, organization) == COMPLETE


async def test_organizations_without_prebuilds_get_nothing(factory: Factory) -> None:
    empty = await factory.organization()
    without_count = await factory.organization()
    await factory.preset(template=await factory.template(without_count), desired=None)
    deleted_template = await factory.organization()
    await factory.preset(template=await factory.template(deleted_template, deleted=True), desired=3)
    with_prebuilds = await organization_with_prebuilds(factory)

    organizations = await read_prebuilds_memberships(factory.connection)
    assert [organization.organization_id for organization in organizations] == [with_prebuilds.id]
    outcome = await ensure_prebuilds_memberships(factory.connection)
    assert [added.organization_id for added in outcome.added] == [with_prebuilds.id]
    for organization in (empty, without_count, deleted_template):
        assert await memberships_of(factory.connection, organization) == NOTHING


async def test_a_schedule_or_an_outdated_version_is_enough(factory: Factory) -> None:
    scheduled = await factory.organization()
    await factory.preset(template=await factory.template(scheduled), desired=None, schedules=[("* 9-17 * * 1-5", 2)])
    outdated = await factory.organization()
    template = await factory.template(outdated)
    await factory.preset(template=template, desired=1, active=False)
    await factory.preset(template=template, desired=None)

    await ensure_prebuilds_memberships(factory.connection)
    assert await memberships_of(factory.connection, scheduled) == COMPLETE
    assert await memberships_of(factory.connection, outdated) == COMPLETE


async def test_a_target_expression_is_enough_once_the_column_exists(factory: Factory) -> None:
    # The column arrives with another migration (CONTRACTS.md section 4); the statement reads it without
    # naming it, so it works on either side of that migration. Here it is added as that migration does.
    before = await organization_with_prebuilds(factory)
    assert [row.organization_id for row in await read_prebuilds_memberships(factory.connection)] == [before.id]
    await factory.connection.execute(
        "alter table template_version_presets add column if not exists desired_instances_expression text"
    )
    expression = await factory.organization()
    preset = await factory.preset(template=await factory.template(expression), desired=None)
    blank = await factory.organization()
    blank_preset = await factory.preset(template=await factory.template(blank), desired=None)
    set_expression = "update template_version_presets set desired_instances_expression = $2 where id = $1"
    await factory.connection.execute(set_expression, preset.id, "min(claims_10m * 10, 20)")
    await factory.connection.execute(set_expression, blank_preset.id, "   ")

    outcome = await ensure_prebuilds_memberships(factory.connection)
    assert {added.organization_id for added in outcome.added} == {before.id, expression.id}
    assert await memberships_of(factory.connection, expression) == COMPLETE
    assert await memberships_of(factory.connection, blank) == NOTHING


# --- idempotence and repair ---------------------------------------------------------------------------


async def test_a_second_pass_adds_nothing_and_reads_once(factory: Factory) -> None:
    organizations = [await organization_with_prebuilds(factory) for _ in range(30)]
    named = {
        sql: name for name, sql in db.queries().items() if "prebuilds_" in name and name.startswith(("read_", "add_"))
    }
    statements: list[str] = []
    factory.connection.add_query_logger(lambda record: statements.append(named.get(record.query, "other")))

    first = await ensure_prebuilds_memberships(factory.connection)
    assert {added.organization_id for added in first.added} == {organization.id for organization in organizations}
    counts = await row_counts(factory.connection)
    assert counts == (30, 30, 30)
    second = await ensure_prebuilds_memberships(factory.connection)
    assert (second.missing, second.added, second.failures) == ((), (), ())
    assert await row_counts(factory.connection) == counts

    # Set-based: one read and a write per table for thirty organizations, then a read alone.
    assert [name for name in statements if name != "other"] == [
        "read_prebuilds_memberships",
        "add_prebuilds_organization_members",
        "add_prebuilds_groups",
        "add_prebuilds_group_members",
        "read_prebuilds_memberships",
    ]


async def test_deleted_rows_are_restored_and_existing_ones_left_alone(factory: Factory) -> None:
    member_deleted, group_member_deleted, group_deleted = [await organization_with_prebuilds(factory) for _ in range(3)]
    untouched = await organization_with_prebuilds(factory)
    await ensure_prebuilds_memberships(factory.connection)
    connection = factory.connection
    user = PREBUILDS_SYSTEM_USER_ID
    await connection.execute(
        "delete from organization_members where organization_id = $1 and user_id = $2", member_deleted.id, user
    )
    await connection.execute(
        "delete from group_members gm using groups g where g.id = gm.group_id and g.organization_id = $1",
        group_member_deleted.id,
    )
    await connection.execute("delete from groups where organization_id = $1", group_deleted.id)
    # An administrator's changes to rows that exist are theirs: roles given, another quota.
    await connection.execute(
        "update organization_members set roles = '{organization-auditor}' where organization_id = $1 and user_id = $2",
        untouched.id,
        user,
    )
    await connection.execute("update groups set quota_allowance = 5 where organization_id = $1", untouched.id)

    outcome = await ensure_prebuilds_memberships(connection)
    assert {added.organization_id: added.added for added in outcome.added} == {
        member_deleted.id: (MembershipKind.ORGANIZATION_MEMBER,),
        group_member_deleted.id: (MembershipKind.GROUP_MEMBER,),
        group_deleted.id: (MembershipKind.GROUP, MembershipKind.GROUP_MEMBER),
    }
    for organization in (member_deleted, group_member_deleted, group_deleted):
        assert await memberships_of(connection, organization) == COMPLETE
    assert await memberships_of(connection, untouched) == {
        "member_roles": ["organization-auditor"],
        "group": ("Prebuilt Workspaces", 5),
        "in_group": True,
    }


async def test_a_vanished_organization_is_ignored(factory: Factory) -> None:
    organization = await organization_with_prebuilds(factory)
    added = await add_prebuilds_memberships(factory.connection, [uuid.uuid4(), organization.id])
    assert [row.organization_id for row in added] == [organization.id]


# --- concurrent writers -------------------------------------------------------------------------------


@pytest.fixture
async def second_connection(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await db.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


async def wait_until_blocked(
    observer: asyncpg.Connection, waiting: asyncpg.Connection, holder: asyncpg.Connection
) -> None:
    """Until `waiting` waits for `holder`'s transaction (its uncommitted rows): an event, not a delay."""
    deadline = time.monotonic() + 30
    while True:
        blocked = await observer.fetchval(
            "select $2::int = any(pg_blocking_pids($1::int))", waiting.get_server_pid(), holder.get_server_pid()
        )
        if blocked:
            return
        assert time.monotonic() < deadline, "the second writer never waited for the first"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("first_commits", [True, False], ids=["first-commits", "first-rolls-back"])
async def test_a_writer_racing_an_uncommitted_one_never_fails(
    factory: Factory, second_connection: asyncpg.Connection, database_url: str, first_commits: bool
) -> None:
    organization = await organization_with_prebuilds(factory)
    first = factory.connection
    observer = await db.connect(database_url)
    try:
        transaction = first.transaction()
        await transaction.start()
        assert [row.added for row in await add_prebuilds_memberships(first, [organization.id])] == [ALL_THREE]
        # The second writer finds the first's rows uncommitted: it must wait for the outcome, then either
        # skip what the first committed or add what the first rolled back, without a unique violation.
        racing = asyncio.create_task(add_prebuilds_memberships(second_connection, [organization.id]))
        await wait_until_blocked(observer, second_connection, first)
        await (transaction.commit() if first_commits else transaction.rollback())
        second_added = await racing
    finally:
        await observer.close()

    assert [row.added for row in second_added] == ([] if first_commits else [ALL_THREE])
    assert await memberships_of(first, organization) == COMPLETE
    assert await row_counts(first) == (1, 1, 1)


async def test_a_group_created_by_a_concurrent_writer_is_theirs_to_join(
    factory: Factory, second_connection: asyncpg.Connection, database_url: str
) -> None:
    # The platform creates the group (and joins the user) while the daemon's statement runs: the daemon's
    # statement skips the group it could not see and adds only the organization membership.
    organization = await organization_with_prebuilds(factory)
    platform = factory.connection
    observer = await db.connect(database_url)
    try:
        async with platform.transaction():
            group_id = await platform.fetchval(
                "insert into groups (organization_id, name, display_name) values ($1, 'coderprebuiltworkspaces', 'x')"
                " returning id",
                organization.id,
            )
            await platform.execute(
                "insert into group_members (group_id, user_id) values ($1, $2)", group_id, PREBUILDS_SYSTEM_USER_ID
            )
            racing = asyncio.create_task(add_prebuilds_memberships(second_connection, [organization.id]))
            await wait_until_blocked(observer, second_connection, platform)
        added = await racing
    finally:
        await observer.close()
    assert [row.added for row in added] == [(MembershipKind.ORGANIZATION_MEMBER,)]
    assert await row_counts(platform) == (1, 1, 1)


async def test_replicas_completing_many_organizations_at_once_never_fail(database_url: str, factory: Factory) -> None:
    organizations = [await organization_with_prebuilds(factory) for _ in range(40)]
    replicas = [await db.connect(database_url) for _ in range(3)]
    try:
        for _ in range(5):
            await factory.connection.execute("delete from groups")
            await factory.connection.execute("delete from organization_members")
            with capture_logs() as events:
                outcomes = await asyncio.gather(*(ensure_prebuilds_memberships(replica) for replica in replicas))
            assert [outcome.failures for outcome in outcomes] == [(), (), ()]
            assert [event for event in events if event["log_level"] != "info"] == []
            # Every row was added exactly once, by one replica or another.
            added = [(row.organization_id, kind) for outcome in outcomes for row in outcome.added for kind in row.added]
            expected = [(organization.id, kind) for organization in organizations for kind in ALL_THREE]
            assert sorted(added) == sorted(expected)
            assert await row_counts(factory.connection) == (40, 40, 40)
    finally:
        for replica in replicas:
            await replica.close()


# --- failures confined to their organization ----------------------------------------------------------


REFUSE_MEMBERSHIP = """
create function refuse_one_organization() returns trigger language plpgsql as $$
begin
    if new.organization_id = '{organization_id}' then
        raise exception 'memberships of % are frozen by policy', new.organization_id;
    end if;
    return new;
end $$;
create trigger refuse_one_organization before insert on organization_members
    for each row execute function refuse_one_organization();
"""

REFUSE_GROUP = """
alter table groups add constraint no_groups_in_one_organization
    check (organization_id <> '{organization_id}') not valid;
"""


@pytest.mark.parametrize("refusal", [REFUSE_MEMBERSHIP, REFUSE_GROUP], ids=["trigger-on-membership", "group-check"])
async def test_one_organization_refused_does_not_stop_the_others(factory: Factory, refusal: str) -> None:
    organizations = [await organization_with_prebuilds(factory, f"org-{index}") for index in range(4)]
    refused = organizations[1]
    await factory.connection.execute(refusal.format(organization_id=refused.id))

    with capture_logs() as events:
        outcome = await ensure_prebuilds_memberships(factory.connection)

    assert [(failure.organization_id, failure.organization_name) for failure in outcome.failures] == [
        (refused.id, refused.name)
    ]
    assert {added.organization_id for added in outcome.added} == {o.id for o in organizations if o != refused}
    for organization in organizations:
        expected = NOTHING if organization == refused else COMPLETE
        assert await memberships_of(factory.connection, organization) == expected
    logged = {event["event"]: event for event in events}
    assert logged["memberships.batch_failed"]["organizations"] == 4
    assert logged["memberships.failed"]["organization_name"] == refused.name
    assert logged["memberships.failed"]["log_level"] == "error"

    # Once the cause is gone, the next pass completes the organization it had to leave out.
    await factory.connection.execute(
        "drop trigger if exists refuse_one_organization on organization_members;"
        " alter table groups drop constraint if exists no_groups_in_one_organization"
    )
    retried = await ensure_prebuilds_memberships(factory.connection)
    assert [(added.organization_id, added.added) for added in retried.added] == [(refused.id, ALL_THREE)]
    assert await memberships_of(factory.connection, refused) == COMPLETE


async def test_a_lock_timeout_is_not_retried_organization_by_organization(
    factory: Factory, second_connection: asyncpg.Connection
) -> None:
    # A lock another component holds concerns every organization: retrying each one would only wait once
    # per organization. The step gives up for this pass with one failure.
    for _ in range(3):
        await organization_with_prebuilds(factory)
    async with second_connection.transaction():
        # Conflicts with inserts, not with reads.
        await second_connection.execute("lock table organization_members in share mode")
        await factory.connection.execute("set lock_timeout = '100ms'")
        with capture_logs() as events:
            outcome = await ensure_prebuilds_memberships(factory.connection)
    assert len(outcome.missing) == 3
    assert outcome.added == ()
    assert [(failure.organization_id, failure.error.split(":")[0]) for failure in outcome.failures] == [
        (None, "LockNotAvailableError")
    ]
    assert [event["event"] for event in events] == ["memberships.failed"]
    assert await row_counts(factory.connection) == (0, 0, 0)
