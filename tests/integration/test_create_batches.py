"""Creates go in batches (one transaction, a savepoint per preset), and a failing preset fails alone.

A preset's create is made to fail by a trigger on `workspaces` that raises for its template: a real
PostgreSQL error, raised inside the batch's transaction (an immediate trigger: the statement fails, its
savepoint rolls back) or only at the batch's commit (a deferred constraint trigger: the whole batch rolls
back, and is written again one preset at a time).
"""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

import asyncpg
import pytest

from reconciler import executor
from reconciler.executor import ActionOutcome
from reconciler.plan import CreateAction
from tests.factories import Factory, Preset
from tests.integration.reconcile_support import open_pool, plan_of, read_plan, settings_for

FAILING_FUNCTION = """
create function test_refuse_template() returns trigger language plpgsql as $$
begin
    if new.template_id = '{template_id}'::uuid then
        raise exception 'refused for the test';
    end if;
    return null;
end $$
"""


async def refuse_creates_of(connection: asyncpg.Connection, preset: Preset, *, at_commit: bool) -> None:
    await connection.execute(FAILING_FUNCTION.format(template_id=preset.template.id))
    if at_commit:
        await connection.execute(
            "create constraint trigger test_refuse after insert on workspaces deferrable initially deferred"
            " for each row execute function test_refuse_template()"
        )
    else:
        await connection.execute(
            "create trigger test_refuse after insert on workspaces for each row execute function test_refuse_template()"
        )


async def created_per_preset(connection: asyncpg.Connection, presets: list[Preset]) -> dict[UUID, int]:
    rows = await connection.fetch(
        "select template_version_preset_id, count(*) from workspace_builds"
        " where template_version_preset_id = any($1::uuid[]) group by 1",
        [preset.id for preset in presets],
    )
    counts = {preset.id: 0 for preset in presets}
    counts.update({row[0]: row[1] for row in rows})
    return counts


@pytest.mark.parametrize("at_commit", [False, True], ids=["in_the_statement", "at_commit"])
async def test_a_failing_preset_does_not_fail_the_others_of_its_batch(
    factory: Factory, database_url: str, at_commit: bool
) -> None:
    presets = [await factory.preset(desired=2) for _ in range(6)]
    failing = presets[3]
    await refuse_creates_of(factory.connection, failing, at_commit=at_commit)
    now = datetime.now(UTC)
    plan = await read_plan(factory.connection, settings_for(database_url), now)
    assert all(plan_of(plan, preset).actions == (CreateAction(count=2),) for preset in presets)
    observed: list[tuple[str, ActionOutcome, int, str]] = []

    async with open_pool(database_url) as pool:
        # All six in one batch.
        summary = await executor.execute(
            pool, plan, now, create_batch_size=10, observe=lambda *event: observed.append(event)
        )

    counts = await created_per_preset(factory.connection, presets)
    assert counts == {preset.id: 0 if preset is failing else 2 for preset in presets}
    assert (summary.created, summary.presets_failed, summary.failed_preset_ids) == (10, 1, [failing.id])
    assert summary.actions == {("create", ActionOutcome.SUCCESS): 5, ("create", ActionOutcome.ERROR): 1}
    # Counted once each, whichever way the batch went (the fallback does not count the batch's work twice).
    assert sorted(observed) == sorted(
        [("create", ActionOutcome.SUCCESS, 2, "")] * 5 + [("create", ActionOutcome.ERROR, 2, "")]
    )


async def test_batched_creates_clamp_each_preset_against_its_fresh_target(factory: Factory, database_url: str) -> None:
    """The clamp of a preset written in a batch reads the database as it is at its turn, as alone."""
    presets = [await factory.preset(desired=3) for _ in range(4)]
    lowered = presets[1]
    now = datetime.now(UTC)
    plan = await read_plan(factory.connection, settings_for(database_url), now)
    # After the snapshot, the platform lowers one target and starts a prebuild of another.
    await factory.connection.execute(
        "update template_version_presets set desired_instances = 1 where id = $1", lowered.id
    )
    await factory.prebuild(presets[2], status="pending", agents=[])

    async with open_pool(database_url) as pool:
        summary = await executor.execute(pool, plan, now, create_batch_size=10)

    counts = await created_per_preset(factory.connection, presets)
    assert counts == {presets[0].id: 3, lowered.id: 1, presets[2].id: 3, presets[3].id: 3}
    assert (summary.created, summary.creates_clamped, summary.presets_failed) == (3 + 1 + 2 + 3, 2 + 1, 0)
