"""The change-event triggers of migration 0007: which of the platform's writes notify, and with what.

A listener connection receives the notifications as the daemon would. That a write does *not* notify is
shown with a sentinel: notifications of one session arrive in commit order, so once a sentinel sent
after the write has arrived, anything the write sent would have arrived before it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from reconciler import db
from tests.factories import Factory

CHANNEL = "reconciler_events"
SENTINEL = "sentinel:*"


class Listener:
    def __init__(self, connection: asyncpg.Connection, writer: asyncpg.Connection) -> None:
        self.connection = connection
        self.writer = writer
        self.received: asyncio.Queue[str] = asyncio.Queue()

    def on_notification(self, *event: Any) -> None:
        self.received.put_nowait(event[3])

    async def payloads(self) -> list[str]:
        """Every payload received up to a sentinel sent now (in its own transaction)."""
        await self.writer.execute("select pg_notify($1, $2)", CHANNEL, SENTINEL)
        found = []
        while (payload := await asyncio.wait_for(self.received.get(), timeout=10)) != SENTINEL:
            found.append(payload)
        return found


@pytest.fixture
async def listener(database_url: str, connection: asyncpg.Connection) -> AsyncIterator[Listener]:
    listening = await db.connect(database_url)
    result = Listener(listening, connection)
    await listening.add_listener(CHANNEL, result.on_notification)
    try:
        yield result
    finally:
        await listening.close()


async def test_a_claim_names_the_template_and_other_workspace_updates_say_nothing(
    factory: Factory, listener: Listener
) -> None:
    preset = await factory.preset(desired=2)
    first, second = await factory.prebuilds(preset, 2)
    await listener.payloads()  # the setup's own
    await factory.claim(first)
    assert await listener.payloads() == [f"claim:{preset.template.id}"]
    # The claimed workspace's later updates, and a prebuild's own (not a claim), say nothing.
    await factory.connection.execute(
        "update workspaces set updated_at = now() where id = any($1)", [first.id, second.id]
    )
    assert await listener.payloads() == []
    # A prebuild deleted (by anyone) frees room in its pool.
    await factory.connection.execute("update workspaces set deleted = true where id = $1", second.id)
    assert await listener.payloads() == [f"claim:{preset.template.id}"]


async def test_one_statement_claiming_across_templates_notifies_once(factory: Factory, listener: Listener) -> None:
    presets = [await factory.preset(desired=1) for _ in range(3)]
    prebuilds = [(await factory.prebuilds(preset, 2)) for preset in presets]
    await listener.payloads()
    user = await factory.user()
    await factory.connection.execute(
        "update workspaces set owner_id = $1 where id = any($2)",
        user.id,
        [workspace.id for pair in prebuilds for workspace in pair],
    )
    payloads = await listener.payloads()
    assert len(payloads) == 1
    kind, _, ids = payloads[0].partition(":")
    assert kind == "claim"
    assert sorted(ids.split(",")) == sorted(str(preset.template.id) for preset in presets)


async def test_more_templates_than_a_payload_holds_say_everything(factory: Factory, listener: Listener) -> None:
    organization = await factory.organization()
    await factory.connection.execute(
        "insert into templates (organization_id, name) select $1, 'many-' || i from generate_series(1, 101) i",
        organization.id,
    )
    await listener.payloads()
    await factory.connection.execute(
        "update templates set deprecated = 'old' where organization_id = $1", organization.id
    )
    assert await listener.payloads() == ["template:*"]


async def test_a_prebuild_job_that_finishes_notifies_and_one_that_starts_does_not(
    factory: Factory, listener: Listener
) -> None:
    preset = await factory.preset(desired=1)
    prebuild = await factory.prebuild(preset, status="pending", agents=[])
    user = await factory.user()
    user_workspace = await factory.workspace(preset, owner_id=user.id)
    await factory.build(user_workspace, status="pending", agents=[], initiator_id=user.id)
    await listener.payloads()
    jobs = [prebuild.builds[0].job_id, user_workspace.builds[0].job_id]
    await factory.connection.execute(
        "update provisioner_jobs set started_at = now(), worker_id = gen_random_uuid() where id = any($1)", jobs
    )
    assert await listener.payloads() == []
    # The user's job (not initiated by the prebuilds user) finishing says nothing; the prebuild's does.
    await factory.connection.execute("update provisioner_jobs set completed_at = now() where id = $1", jobs[1])
    assert await listener.payloads() == []
    await factory.connection.execute(
        "update provisioner_jobs set completed_at = now(), error = 'boom' where id = $1", jobs[0]
    )
    assert await listener.payloads() == [f"job:{preset.template.id}"]


async def test_a_new_active_version_notifies(factory: Factory, listener: Listener) -> None:
    preset = await factory.preset(desired=1)
    await listener.payloads()
    await factory.version(preset.template, active=True)
    assert await listener.payloads() == [f"template:{preset.template.id}"]
    await factory.connection.execute("update templates set updated_at = now() where id = $1", preset.template.id)
    assert await listener.payloads() == []


async def test_preset_changes_notify_but_not_the_reconcilers_own_status_marks(
    factory: Factory, listener: Listener
) -> None:
    version = await factory.version()
    await listener.payloads()
    preset = await factory.preset(version, desired=2)
    assert await listener.payloads() == [f"preset:{version.template.id}"]
    # A preset without prebuilds is nothing to the reconciler.
    await factory.preset(version, desired=None)
    assert await listener.payloads() == []
    for change in (
        "desired_instances = 3",
        "invalidate_after_secs = 600",
        "last_invalidated_at = now()",
        "failure_reset_at = now()",
    ):
        await factory.connection.execute(f"update template_version_presets set {change} where id = $1", preset.id)
        assert await listener.payloads() == [f"preset:{version.template.id}"], change
    await factory.connection.execute(
        "update template_version_presets set prebuild_status = 'hard_limited', prebuild_status_changed_at = now(), "
        "failure_episode = failure_episode + 1 where id = $1",
        preset.id,
    )
    assert await listener.payloads() == []


async def test_schedule_changes_notify(factory: Factory, listener: Listener) -> None:
    preset = await factory.preset(desired=1)
    await listener.payloads()
    expected = [f"schedule:{preset.template.id}"]
    schedule_id = await factory.connection.fetchval(
        "insert into template_version_preset_prebuild_schedules (preset_id, cron_expression, desired_instances) "
        "values ($1, '* 9-17 * * 1-5', 3) returning id",
        preset.id,
    )
    assert await listener.payloads() == expected
    await factory.connection.execute(
        "update template_version_preset_prebuild_schedules set desired_instances = 4 where id = $1", schedule_id
    )
    assert await listener.payloads() == expected
    await factory.connection.execute(
        "delete from template_version_preset_prebuild_schedules where id = $1", schedule_id
    )
    assert await listener.payloads() == expected


async def test_pausing_and_resuming_concern_everything(factory: Factory, listener: Listener) -> None:
    await listener.payloads()
    await factory.set_paused(True)
    assert await listener.payloads() == ["settings:*"]
    await factory.set_paused(False)
    assert await listener.payloads() == ["settings:*"]
    await factory.connection.execute("insert into site_configs (key, value) values ('something_else', 'x')")
    assert await listener.payloads() == []
    await factory.connection.execute("delete from site_configs where key = 'prebuilds_settings'")
    assert await listener.payloads() == ["settings:*"]


async def test_one_transaction_of_identical_changes_is_one_notification(factory: Factory, listener: Listener) -> None:
    preset = await factory.preset(desired=1)
    first, second = await factory.prebuilds(preset, 2)
    await listener.payloads()
    user = await factory.user()
    async with factory.connection.transaction():
        for workspace in (first, second):
            await factory.connection.execute("update workspaces set owner_id = $1 where id = $2", user.id, workspace.id)
    assert await listener.payloads() == [f"claim:{preset.template.id}"]


async def test_a_claim_event_of_a_preset_with_an_expression_names_its_template(
    factory: Factory, listener: Listener
) -> None:
    """Migration 0009: a miss wakes the daemon for a preset whose expression may answer it; other presets'
    events, and event types the daemon ignores, say nothing."""
    computed = await factory.preset(desired=1, timezone="UTC", expression="misses_10m + 1")
    static = await factory.preset(desired=1)
    await listener.payloads()  # the setup's own
    await factory.event(computed, "claim_missed", at=factory.now)
    assert await listener.payloads() == [f"claim:{computed.template.id}"]
    await factory.event(static, "claim_missed", at=factory.now)
    await factory.event(computed, "claim_cancelled", at=factory.now)
    assert await listener.payloads() == []
