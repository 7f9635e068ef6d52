"""The outbox side of BEHAVIOR.md section 5, through real passes: who is told, what, and exactly once."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from reconciler import cli, executor, reconcile
from reconciler.config import Settings
from reconciler.notify.message import render
from reconciler.snapshot import PREBUILDS_SYSTEM_USER_ID
from tests.factories import Factory, Preset, User, minutes
from tests.integration.notification_helpers import fail_prebuilds, open_pool, pass_at, settings_for

HARD_LIMITED_TEMPLATE = "Prebuild Failure Limit Reached"
RECOVERED_TEMPLATE = "Prebuild Failure Limit Recovered"


@pytest.fixture
def settings(database_url: str) -> Settings:
    return settings_for(database_url)


async def messages(connection: asyncpg.Connection, kind: str | None = None) -> list[asyncpg.Record]:
    return await connection.fetch(
        "select m.*, u.username, nt.name as template_name from notification_messages m "
        "join notification_templates nt on nt.id = m.notification_template_id "
        "left join users u on u.id = m.user_id "
        "where $1::text is null or m.kind = $1 order by u.username nulls first",
        kind,
    )


async def preset_status(connection: asyncpg.Connection, preset: Preset) -> tuple[str, int]:
    row = await connection.fetchrow(
        "select prebuild_status::text, failure_episode from template_version_presets where id = $1", preset.id
    )
    assert row is not None
    return row["prebuild_status"], row["failure_episode"]


async def admins(factory: Factory, preset: Preset) -> tuple[User, User]:
    site_admin = await factory.user(username="site-admin", site_roles=["template-admin"])
    organization_admin = await factory.user(
        username="org-admin", organization=preset.organization, organization_roles=["organization-template-admin"]
    )
    return site_admin, organization_admin


async def test_hard_limit_enqueues_one_message_per_recipient_with_the_payload(
    factory: Factory, pool: asyncpg.Pool, settings: Settings
) -> None:
    preset = await factory.preset(desired=1, name="large")
    site_admin, organization_admin = await admins(factory, preset)
    other_organization = await factory.organization()
    # Not recipients: an admin of another organization, the wrong organization role, suspended and deleted
    # admins, a plain user, and the system user even when it carries the role.
    await factory.user(
        username="other-org-admin",
        organization=other_organization,
        organization_roles=["organization-template-admin"],
    )
    await factory.user(
        username="org-owner", organization=preset.organization, organization_roles=["organization-admin"]
    )
    await factory.user(username="suspended-admin", site_roles=["template-admin"], status="suspended")
    await factory.user(username="deleted-admin", site_roles=["template-admin"], deleted=True)
    await factory.user(
        username="deleted-org-admin",
        organization=preset.organization,
        organization_roles=["organization-template-admin"],
        deleted=True,
    )
    await factory.user(username="plain")
    await factory.connection.execute(
        "update users set rbac_roles = '{template-admin}' where id = $1", PREBUILDS_SYSTEM_USER_ID
    )
    await fail_prebuilds(factory, preset, 3, error="terraform apply failed: boom", error_code="TF_APPLY")

    result = await pass_at(pool, settings, factory.now)

    assert result.status_changes.hard_limited == (preset.id,)
    assert result.status_changes.notifications_enqueued == 2
    assert await preset_status(factory.connection, preset) == ("hard_limited", 1)
    rows = await messages(factory.connection)
    failed = sorted(
        str(row["workspace_id"])
        for row in await factory.connection.fetch(
            "select workspace_id from workspace_builds where template_version_preset_id = $1", preset.id
        )
    )
    assert len(failed) == 3
    assert [row["username"] for row in rows] == ["org-admin", "site-admin"]
    assert {row["user_id"] for row in rows} == {site_admin.id, organization_admin.id}
    for row in rows:
        assert (row["kind"], row["status"], row["episode"], row["preset_id"]) == (
            "hard_limited",
            "pending",
            1,
            preset.id,
        )
        assert row["template_name"] == HARD_LIMITED_TEMPLATE
        payload: dict[str, Any] = row["payload"]
        assert payload["organization"] == preset.organization.name
        assert payload["template"] == preset.template.name
        assert payload["template_version"] == preset.version.name
        assert payload["preset"] == "large"
        assert payload["preset_id"] == str(preset.id)
        assert payload["failure_count"] == 3
        assert payload["last_error"] == "terraform apply failed: boom"
        assert payload["last_error_code"] == "TF_APPLY"
        assert payload["at"] == factory.now.isoformat()
        # It points at the failed prebuilds (BEHAVIOR.md 5), in the payload and in the rendered body.
        assert sorted(payload["failed_workspace_ids"]) == failed
        body = await factory.connection.fetchval(
            "select body_template from notification_templates where name = $1", HARD_LIMITED_TEMPLATE
        )
        assert all(workspace_id in render(body, payload) for workspace_id in failed)


async def test_more_passes_and_racing_replicas_add_no_message(
    factory: Factory, pool: asyncpg.Pool, settings: Settings, database_url: str
) -> None:
    preset = await factory.preset(desired=1)
    await admins(factory, preset)
    await fail_prebuilds(factory, preset, 3)

    for minute in range(10):
        await pass_at(pool, settings, factory.now + minutes(minute))
    replicas = [await open_pool(database_url) for _ in range(3)]
    try:
        # Three replicas at once: the pass lock lets one through, the others skip.
        results = await asyncio.gather(*(reconcile.run_pass(replica, settings, factory.now) for replica in replicas))
    finally:
        for replica in replicas:
            await replica.close()

    assert all(result.outcome.value in ("success", "skipped_lock") for result in results)
    assert len(await messages(factory.connection)) == 2
    assert await preset_status(factory.connection, preset) == ("hard_limited", 1)


async def test_status_changes_racing_without_the_pass_lock_are_decided_by_the_database(
    factory: Factory, settings: Settings, database_url: str
) -> None:
    """Even two writers that both saw the preset `normal` (no pass lock) open one episode, one message each."""
    preset = await factory.preset(desired=1)
    await admins(factory, preset)
    await fail_prebuilds(factory, preset, 3)
    replicas = [await open_pool(database_url) for _ in range(3)]
    try:
        async with replicas[0].acquire() as connection:
            plan = await reconcile.read_plan(connection, settings, factory.now)
        results = await asyncio.gather(
            *(executor.write_status_changes(replica, plan, factory.now) for replica in replicas)
        )
    finally:
        for replica in replicas:
            await replica.close()

    assert sorted(len(changes.hard_limited) for changes in results) == [0, 0, 1]
    assert sum(changes.notifications_enqueued for changes in results) == 2
    assert len(await messages(factory.connection)) == 2
    assert await preset_status(factory.connection, preset) == ("hard_limited", 1)


async def test_nobody_to_tell_records_one_message_without_a_user(
    factory: Factory, pool: asyncpg.Pool, settings: Settings
) -> None:
    preset = await factory.preset(desired=1)
    await factory.user(username="only-a-user")
    await fail_prebuilds(factory, preset, 3)

    with capture_logs() as logs:
        await pass_at(pool, settings, factory.now)
        await pass_at(pool, settings, factory.now + minutes(1))

    rows = await messages(factory.connection)
    assert len(rows) == 1
    assert rows[0]["user_id"] is None
    assert rows[0]["payload"]["preset_id"] == str(preset.id)
    warnings = [log for log in logs if log["event"] == "notification.no_recipients"]
    assert len(warnings) == 1
    assert warnings[0]["preset_id"] == str(preset.id)


async def test_recovery_then_a_new_episode_notifies_again(
    factory: Factory, pool: asyncpg.Pool, settings: Settings
) -> None:
    preset = await factory.preset(desired=1)
    site_admin, _ = await admins(factory, preset)
    await fail_prebuilds(factory, preset, 3, at=factory.now - minutes(50))
    await pass_at(pool, settings, factory.now)
    assert await preset_status(factory.connection, preset) == ("hard_limited", 1)

    # A later prebuild succeeded: the streak is broken.
    await factory.prebuild(preset, ago=minutes(40))
    result = await pass_at(pool, settings, factory.now)
    await pass_at(pool, settings, factory.now + minutes(1))

    assert result.status_changes.recovered == (preset.id,)
    assert await preset_status(factory.connection, preset) == ("normal", 1)
    recovered = await messages(factory.connection, "recovered")
    assert [row["username"] for row in recovered] == ["org-admin", "site-admin"]
    assert {row["template_name"] for row in recovered} == {RECOVERED_TEMPLATE}
    assert {row["episode"] for row in recovered} == {1}
    assert recovered[0]["payload"]["preset_id"] == str(preset.id)

    # A new streak is a new episode, told again.
    await fail_prebuilds(factory, preset, 3, at=factory.now - minutes(30))
    await pass_at(pool, settings, factory.now)
    await pass_at(pool, settings, factory.now + minutes(1))

    assert await preset_status(factory.connection, preset) == ("hard_limited", 2)
    hard_limited = await messages(factory.connection, "hard_limited")
    assert sorted((row["episode"], row["username"]) for row in hard_limited) == [
        (1, "org-admin"),
        (1, "site-admin"),
        (2, "org-admin"),
        (2, "site-admin"),
    ]
    assert len(await messages(factory.connection, "recovered")) == 2
    assert site_admin.id in {row["user_id"] for row in hard_limited}


async def test_removing_the_failed_prebuilds_recovers_the_preset(
    factory: Factory, pool: asyncpg.Pool, settings: Settings
) -> None:
    preset = await factory.preset(desired=1)
    await admins(factory, preset)
    await fail_prebuilds(factory, preset, 3)
    await pass_at(pool, settings, factory.now)

    await factory.connection.execute(
        "update workspaces set deleted = true where owner_id = $1 and template_id = $2",
        PREBUILDS_SYSTEM_USER_ID,
        preset.template.id,
    )
    await pass_at(pool, settings, factory.now + minutes(1))

    assert await preset_status(factory.connection, preset) == ("normal", 1)
    assert len(await messages(factory.connection, "recovered")) == 2


async def test_non_retryable_error_marks_validation_failed_and_notifies_once(
    factory: Factory, pool: asyncpg.Pool, settings: Settings
) -> None:
    preset = await factory.preset(desired=1)
    await admins(factory, preset)
    await fail_prebuilds(factory, preset, 1, error="missing variable region", error_code="REQUIRED_TEMPLATE_VARIABLES")

    for minute in range(3):
        await pass_at(pool, settings, factory.now + minutes(minute))

    assert await preset_status(factory.connection, preset) == ("validation_failed", 1)
    rows = await messages(factory.connection)
    assert {row["kind"] for row in rows} == {"validation_failed"}
    assert len(rows) == 2
    assert {row["template_name"] for row in rows} == {"Prebuild Validation Failed"}
    assert rows[0]["payload"]["last_error_code"] == "REQUIRED_TEMPLATE_VARIABLES"


async def test_capacity_failures_do_not_reach_the_hard_limit(
    factory: Factory, pool: asyncpg.Pool, settings: Settings
) -> None:
    preset = await factory.preset(desired=1)
    await admins(factory, preset)
    await fail_prebuilds(factory, preset, 5, error="quota exceeded", error_code="INSUFFICIENT_QUOTA")

    await pass_at(pool, settings, factory.now)

    assert await preset_status(factory.connection, preset) == ("normal", 0)
    assert await messages(factory.connection) == []


@pytest.mark.usefixtures("restore_logging")
async def test_reset_from_the_cli_gives_the_preset_a_fresh_chance(
    factory: Factory,
    pool: asyncpg.Pool,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = settings_for(database_url)
    preset = await factory.preset(desired=1)
    await admins(factory, preset)
    now = datetime.now(UTC)
    await fail_prebuilds(factory, preset, 3, at=now - minutes(30))
    await pass_at(pool, settings, now)
    assert await preset_status(factory.connection, preset) == ("hard_limited", 1)

    monkeypatch.setenv("RECONCILER_DATABASE_URL", database_url)
    monkeypatch.setenv("RECONCILER_LOG_FORMAT", "json")
    monkeypatch.setenv("SUDO_USER", "operator-on-call")
    # The CLI runs its own event loop: give it a thread of its own.
    exit_code = await asyncio.to_thread(cli.main, ["presets", "reset", str(preset.id)])

    captured = capsys.readouterr()
    assert exit_code == 0, captured.err
    name = f"{preset.template.name}/{preset.version.name}/{preset.name}"
    assert f"preset {preset.id} ({name}) reset to normal (was hard_limited)" in captured.out
    reset_events = [json.loads(line) for line in captured.err.splitlines() if '"preset.reset"' in line]
    assert reset_events[0]["actor"] == "operator-on-call"
    assert reset_events[0]["previous_status"] == "hard_limited"
    assert await preset_status(factory.connection, preset) == ("normal", 1)

    # The old failures no longer count: creation resumes, and no second message.
    later = datetime.now(UTC) + timedelta(seconds=1)
    result = await pass_at(pool, settings, later)
    assert await preset_status(factory.connection, preset) == ("normal", 1)
    assert result.plan is not None
    plan = next(preset_plan for preset_plan in result.plan.presets if preset_plan.preset.id == preset.id)
    assert not plan.hard_limited
    assert [action.type for action in plan.actions] == ["create"]
    assert len(await messages(factory.connection)) == 2

    # Only failure_hard_limit *new* failures reach the limit again, as a new episode. (They are newer than
    # the prebuild the pass above created, which is still pending: an unfinished build breaks a streak.)
    await fail_prebuilds(factory, preset, 2, at=later + timedelta(seconds=10))
    await pass_at(pool, settings, later + minutes(1))
    assert await preset_status(factory.connection, preset) == ("normal", 1)
    await fail_prebuilds(factory, preset, 1, at=later + minutes(1) + timedelta(seconds=10))
    await pass_at(pool, settings, later + minutes(2))
    assert await preset_status(factory.connection, preset) == ("hard_limited", 2)
    assert sorted(row["episode"] for row in await messages(factory.connection)) == [1, 1, 2, 2]
