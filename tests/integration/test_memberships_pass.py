"""The prebuilds user's memberships as part of a real pass (BEHAVIOR.md section 7): every pass that is
not paused adds what is missing before its snapshot, a failure there never stops the reconciliation of
any preset, it is counted in a metric, and `plan` and `status` tell what the next pass would add."""

from __future__ import annotations

import asyncio
import json

import asyncpg
from prometheus_client import CollectorRegistry

from reconciler.reconcile import PassOutcome, run_pass
from reconciler.service import Daemon
from tests.factories import Factory, Organization
from tests.integration.reconcile_support import live_prebuilds, open_pool, pass_at, settings_for
from tests.integration.test_commands import cli, parse_json
from tests.integration.test_memberships import (
    ALL_THREE,
    COMPLETE,
    NOTHING,
    REFUSE_MEMBERSHIP,
    memberships_of,
    organization_with_prebuilds,
    row_counts,
)


async def test_a_pass_adds_the_memberships_of_a_new_organization_before_creating_there(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    new = await organization_with_prebuilds(factory, "new-org")
    without = await factory.organization("no-prebuilds")
    await factory.preset(template=await factory.template(without), desired=None)

    result = await pass_at(pool, settings_for(database_url), factory.now)

    assert result.memberships is not None
    assert [(added.organization_id, added.added) for added in result.memberships.added] == [(new.id, ALL_THREE)]
    assert await memberships_of(factory.connection, new) == COMPLETE
    assert await memberships_of(factory.connection, without) == NOTHING
    assert sum((await live_prebuilds(factory.connection)).values()) == 2
    # The next pass finds nothing missing and adds nothing.
    again = await pass_at(pool, settings_for(database_url), factory.now)
    assert again.memberships is not None
    assert (again.memberships.added, again.memberships.missing) == ((), ())
    assert await row_counts(factory.connection) == (1, 1, 1)


async def test_a_deleted_membership_is_restored_by_the_next_pass(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    organization = await organization_with_prebuilds(factory)
    await pass_at(pool, settings_for(database_url), factory.now)
    await factory.connection.execute("delete from group_members where user_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'")
    await factory.connection.execute(
        "delete from organization_members where user_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'"
    )

    result = await pass_at(pool, settings_for(database_url), factory.now)

    assert result.memberships is not None
    assert [added.added for added in result.memberships.added] == [
        (ALL_THREE[0], ALL_THREE[2])  # the group itself was still there
    ]
    assert await memberships_of(factory.connection, organization) == COMPLETE


async def test_a_paused_pass_adds_nothing(factory: Factory, pool: asyncpg.Pool, database_url: str) -> None:
    organization = await organization_with_prebuilds(factory)
    await factory.set_paused(True)
    result = await run_pass(pool, settings_for(database_url), factory.now)
    assert result.outcome is PassOutcome.PAUSED
    assert await memberships_of(factory.connection, organization) == NOTHING


async def test_replicas_racing_on_new_organizations_never_fail(factory: Factory, database_url: str) -> None:
    # Two daemons' passes at the same moment (one waits on the pass lock or skips), and the platform
    # adding the same rows meanwhile: every pass succeeds or skips, and each row exists once.
    organizations = [await organization_with_prebuilds(factory, f"race-{index}") for index in range(6)]
    settings = settings_for(database_url)
    async with open_pool(database_url) as first, open_pool(database_url) as second:
        for _ in range(3):
            await factory.connection.execute(
                "delete from organization_members where user_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'"
            )
            results = await asyncio.gather(
                run_pass(first, settings, factory.now), run_pass(second, settings, factory.now)
            )
            assert {result.outcome for result in results} <= {PassOutcome.SUCCESS, PassOutcome.SKIPPED_LOCK}
            assert PassOutcome.SUCCESS in {result.outcome for result in results}
            for result in results:
                assert result.memberships is None or result.memberships.failures == ()
    assert await row_counts(factory.connection) == (6, 6, 6)
    for organization in organizations:
        assert await memberships_of(factory.connection, organization) == COMPLETE


async def test_a_failure_in_one_organization_is_confined_and_counted(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    organizations: list[Organization] = [await organization_with_prebuilds(factory, f"org-{i}") for i in range(3)]
    refused = organizations[0]
    await factory.connection.execute(REFUSE_MEMBERSHIP.format(organization_id=refused.id))
    daemon = Daemon(settings_for(database_url), registry=CollectorRegistry(), clock=lambda: factory.now)
    daemon._pool = pool  # the pass and its metrics, without the HTTP server and the scheduler

    result = await daemon.run_pass_now()

    assert result.outcome is PassOutcome.SUCCESS, result.error
    assert result.memberships is not None
    assert [failure.organization_id for failure in result.memberships.failures] == [refused.id]
    # Every preset was reconciled, the refused organization's included: 2 prebuilds each.
    assert sorted((await live_prebuilds(factory.connection)).values()) == [2, 2, 2]
    for organization in organizations[1:]:
        assert await memberships_of(factory.connection, organization) == COMPLETE
    registry = daemon.metrics.registry
    assert registry.get_sample_value("prebuilds_reconciler_membership_failures_total") == 1
    assert registry.get_sample_value("prebuilds_reconciler_memberships_added_total", {"kind": "group"}) == 2


async def test_plan_and_status_show_what_the_next_pass_adds(factory: Factory, database_url: str) -> None:
    complete = await organization_with_prebuilds(factory, "complete-org")
    async with open_pool(database_url) as pool:
        await pass_at(pool, settings_for(database_url), factory.now)
    missing = await organization_with_prebuilds(factory, "missing-org")
    before = await row_counts(factory.connection)

    document = parse_json(await cli(database_url, "plan", "--json"))
    assert document["memberships"] == [
        {"organization_id": str(missing.id), "organization_name": "missing-org", "to_add": [k.value for k in ALL_THREE]}
    ]
    status = parse_json(await cli(database_url, "status", "--json"))
    assert [entry["organization_name"] for entry in status["memberships"]] == ["missing-org"]
    table = await cli(database_url, "status")
    assert table.returncode == 0, table.stderr
    assert "the prebuilds user is missing from organization missing-org" in table.stdout
    assert "complete-org (" not in table.stdout
    plan_table = await cli(database_url, "plan")
    assert "memberships: would add organization_member, group, group_member in organization missing-org" in (
        plan_table.stdout
    )
    # Read-only: nothing was added by looking.
    assert await row_counts(factory.connection) == before
    assert json.dumps(document)  # still one JSON object
    assert complete.id != missing.id
