"""The operator commands of CONTRACTS.md section 2, run as people run them: the real console entry point in
a subprocess, against a real database built with the factories.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest

from reconciler.snapshot import PREBUILDS_SYSTEM_USER_ID
from tests.acceptance.daemon_process import cli_environment, run_cli
from tests.factories import Factory, Preset, Workspace, minutes, seconds
from tests.integration.reconcile_support import prebuild_workspaces, preset_row, table_checksums

# Backoff of an hour per failure, so that a preset that failed just now is still backing off when the
# subprocess runs, whatever the machine's speed.
ENVIRONMENT = {"RECONCILER_BACKOFF_INTERVAL": "1h"}


async def cli(database_url: str | None, *arguments: str, **environment: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        run_cli, *arguments, environment=cli_environment(database_url, **{**ENVIRONMENT, **environment})
    )


def parse_json(process: subprocess.CompletedProcess[str]) -> Any:
    assert process.returncode == 0, process.stderr
    return json.loads(process.stdout)


def is_uuid(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def parse_instant(value: object) -> datetime:
    assert isinstance(value, str), value
    moment = datetime.fromisoformat(value)
    assert moment.utcoffset() == timedelta(0), f"{value} is not an aware UTC timestamp"
    return moment


def exactly(value: object, kind: type) -> bool:
    """`isinstance` without bool passing for int."""
    return type(value) is kind


STATE_KEYS = {"desired", "actual", "eligible", "extraneous", "expired", "starting", "stopping", "deleting"}

# CONTRACTS.md section 2, key by key. The contract allows extensions ("extend, don't rename"), so other
# keys may appear beside these; every one of these must be there, with exactly this type.
PRESET_KEYS: dict[str, Any] = {
    "preset_id": is_uuid,
    "preset_name": str,
    "template_id": is_uuid,
    "template_name": str,
    "template_version_id": is_uuid,
    "organization_name": str,
    "active": bool,
    "prebuild_status": lambda value: value in ("normal", "hard_limited", "validation_failed"),
    "hard_limited": bool,
    "state": dict,
    "actions": list,
}


def check_action(action: Any) -> None:
    """Each action has exactly the contract's keys and types."""
    assert isinstance(action, dict)
    kind = action.get("type")
    if kind == "backoff":
        assert set(action) == {"type", "until", "num_failed"}
        parse_instant(action["until"])
        assert exactly(action["num_failed"], int)
    elif kind in ("cancel_pending", "create"):
        assert set(action) == {"type", "count"}
        assert exactly(action["count"], int)
        assert action["count"] > 0
    elif kind == "delete":
        assert set(action) == {"type", "workspace_ids", "reason"}
        assert isinstance(action["workspace_ids"], list)
        assert action["workspace_ids"]
        assert all(is_uuid(workspace_id) for workspace_id in action["workspace_ids"])
        assert action["reason"] in ("expired", "invalidated", "extraneous", "inactive")
    else:
        raise AssertionError(f"unknown action type {kind!r}")


def check_plan_document(document: Any) -> None:
    assert isinstance(document, dict)
    assert {"generated_at", "paused", "presets"} <= set(document)
    parse_instant(document["generated_at"])
    assert exactly(document["paused"], bool)
    assert isinstance(document["presets"], list)
    for preset in document["presets"]:
        assert isinstance(preset, dict)
        for key, check in PRESET_KEYS.items():
            assert key in preset, f"missing {key}"
            value = preset[key]
            ok = exactly(value, check) if isinstance(check, type) else check(value)
            assert ok, f"{key}: {value!r}"
        assert set(preset["state"]) == STATE_KEYS
        assert all(exactly(count, int) and count >= 0 for count in preset["state"].values())
        for action in preset["actions"]:
            check_action(action)
        order = ["backoff", "cancel_pending", "delete", "create"]
        kinds = [action["type"] for action in preset["actions"]]
        assert kinds == sorted(kinds, key=order.index), f"actions out of execution order: {kinds}"


def by_preset(document: Any) -> dict[str, Any]:
    return {preset["preset_id"]: preset for preset in document["presets"]}


class Fleet:
    """One preset per kind of action, so that one `plan --json` shows every action shape."""

    backing_off: Preset
    failed_at: datetime
    outdated: Preset
    outdated_running: Workspace
    renewing: Preset
    expired: Workspace
    shrinking: Preset
    extraneous: Workspace
    idle: Preset
    limited: Preset


async def build_fleet(factory: Factory) -> Fleet:
    fleet = Fleet()
    fleet.backing_off = await factory.preset(desired=1)
    fleet.failed_at = factory.now - seconds(10)
    await factory.prebuild(fleet.backing_off, status="failed", created_at=fleet.failed_at)
    fleet.outdated = await factory.preset(desired=2)
    fleet.outdated_running = await factory.prebuild(fleet.outdated, ago=minutes(30))
    await factory.prebuild(fleet.outdated, status="pending", ago=minutes(1))
    fleet.renewing = await factory.preset(desired=2, ttl_seconds=3600, template=fleet.outdated.template)
    fleet.expired = await factory.prebuild(fleet.renewing, ago=minutes(90))
    await factory.prebuild(fleet.renewing, ago=minutes(10))
    fleet.shrinking = await factory.preset(desired=0)
    fleet.extraneous = await factory.prebuild(fleet.shrinking, ago=minutes(20))
    fleet.idle = await factory.preset(desired=3, template=fleet.shrinking.template, active=False)
    await factory.version(fleet.shrinking.template)  # keeps `shrinking` active: `idle` was never active
    await factory.activate(fleet.shrinking.version)
    # At the limit (three failures, long enough ago that backoff is over), and marked so.
    fleet.limited = await factory.preset(desired=1, status="hard_limited")
    for age in (92, 91, 90):
        await factory.prebuild(fleet.limited, status="failed", ago=minutes(age))
    return fleet


async def test_plan_json_matches_the_contract_and_writes_nothing(factory: Factory, database_url: str) -> None:
    fleet = await build_fleet(factory)
    before = await table_checksums(factory.connection)

    process = await cli(database_url, "plan", "--json")
    document = parse_json(process)
    check_plan_document(document)
    assert document["paused"] is False
    assert abs(parse_instant(document["generated_at"]) - factory.now) < timedelta(minutes=5)
    presets = by_preset(document)
    assert len(presets) == len(document["presets"]) == 6

    backing_off = presets[str(fleet.backing_off.id)]
    assert backing_off["actions"] == [{"type": "backoff", "until": backing_off["actions"][0]["until"], "num_failed": 1}]
    assert parse_instant(backing_off["actions"][0]["until"]) == fleet.failed_at + timedelta(hours=1)
    assert backing_off["preset_name"] == fleet.backing_off.name
    assert backing_off["template_id"] == str(fleet.backing_off.template.id)
    assert backing_off["template_name"] == fleet.backing_off.template.name
    assert backing_off["template_version_id"] == str(fleet.backing_off.version.id)
    assert backing_off["organization_name"] == fleet.backing_off.organization.name

    outdated = presets[str(fleet.outdated.id)]
    assert outdated["active"] is False
    assert outdated["actions"] == [
        {"type": "cancel_pending", "count": 1},
        {"type": "delete", "workspace_ids": [str(fleet.outdated_running.id)], "reason": "inactive"},
    ]
    renewing = presets[str(fleet.renewing.id)]
    assert renewing["active"] is True
    assert renewing["state"] == {
        "desired": 2,
        "actual": 2,
        "eligible": 1,
        "extraneous": 0,
        "expired": 1,
        "starting": 0,
        "stopping": 0,
        "deleting": 0,
    }
    assert renewing["actions"] == [
        {"type": "delete", "workspace_ids": [str(fleet.expired.id)], "reason": "expired"},
        {"type": "create", "count": 1},
    ]
    assert presets[str(fleet.shrinking.id)]["actions"] == [
        {"type": "delete", "workspace_ids": [str(fleet.extraneous.id)], "reason": "extraneous"}
    ]
    # Skipped presets are listed, with no actions.
    assert presets[str(fleet.idle.id)]["actions"] == []
    limited = presets[str(fleet.limited.id)]
    assert (limited["prebuild_status"], limited["hard_limited"], limited["actions"]) == ("hard_limited", True, [])

    # The readable forms (and the status command) are read-only too.
    table = await cli(database_url, "plan")
    assert table.returncode == 0, table.stderr
    assert fleet.renewing.name in table.stdout
    status = await cli(database_url, "status")
    assert status.returncode == 0, status.stderr
    assert await table_checksums(factory.connection) == before


async def test_reconcile_once_then_plan_shows_the_new_prebuilds_as_starting(
    factory: Factory, database_url: str
) -> None:
    fleet = await build_fleet(factory)
    growing = await factory.preset(desired=3)

    reconciled = await cli(database_url, "reconcile", "--once")
    assert reconciled.returncode == 0, reconciled.stderr
    # Created 1 (renewing) + 3 (growing); deleted 3 (expired, extraneous, outdated); canceled 1.
    assert "created 4, deleted 3, canceled 1, presets failed 0" in reconciled.stdout
    assert len(await prebuild_workspaces(factory.connection, growing)) == 3

    presets = by_preset(parse_json(await cli(database_url, "plan", "--json")))
    assert presets[str(growing.id)]["state"]["starting"] == 3
    assert presets[str(growing.id)]["actions"] == []
    renewing = presets[str(fleet.renewing.id)]
    assert (renewing["state"]["starting"], renewing["state"]["deleting"], renewing["state"]["actual"]) == (1, 1, 1)
    assert renewing["actions"] == []
    # The hard-limited preset got nothing; the backing-off one is still waiting.
    assert len(await prebuild_workspaces(factory.connection, fleet.limited)) == 3
    assert [action["type"] for action in presets[str(fleet.backing_off.id)]["actions"]] == ["backoff"]


async def test_status_json_lists_every_preset_with_its_counts(factory: Factory, database_url: str) -> None:
    fleet = await build_fleet(factory)
    document = parse_json(await cli(database_url, "status", "--json"))
    assert document["paused"] is False
    parse_instant(document["generated_at"])
    presets = by_preset(document)
    assert set(presets) == {
        str(preset.id)
        for preset in (
            fleet.backing_off,
            fleet.outdated,
            fleet.renewing,
            fleet.shrinking,
            fleet.idle,
            fleet.limited,
        )
    }
    for preset in presets.values():
        assert set(preset) >= STATE_KEYS
        assert all(exactly(preset[key], int) for key in STATE_KEYS)
        for key in ("organization_name", "template_name", "template_version_name", "preset_name"):
            assert exactly(preset[key], str)
        assert exactly(preset["active"], bool)
    backing_off = presets[str(fleet.backing_off.id)]
    assert parse_instant(backing_off["backoff_until"]) == fleet.failed_at + timedelta(hours=1)
    assert presets[str(fleet.renewing.id)]["backoff_until"] is None
    assert (presets[str(fleet.renewing.id)]["actual"], presets[str(fleet.renewing.id)]["expired"]) == (2, 1)
    assert presets[str(fleet.limited.id)]["prebuild_status"] == "hard_limited"
    assert presets[str(fleet.outdated.id)]["active"] is False


async def test_pause_and_resume(factory: Factory, database_url: str) -> None:
    preset = await factory.preset(desired=2)

    paused = await cli(database_url, "pause")
    assert paused.returncode == 0, paused.stderr
    setting = await factory.connection.fetchval("select value from site_configs where key = 'prebuilds_settings'")
    assert json.loads(setting) == {"reconciliation_paused": True}
    assert parse_json(await cli(database_url, "plan", "--json"))["paused"] is True
    assert parse_json(await cli(database_url, "status", "--json"))["paused"] is True

    before = await table_checksums(factory.connection)
    skipped = await cli(database_url, "reconcile", "--once")
    assert skipped.returncode == 0, skipped.stderr
    assert "paused" in skipped.stderr
    assert await table_checksums(factory.connection) == before

    resumed = await cli(database_url, "resume")
    assert resumed.returncode == 0, resumed.stderr
    assert parse_json(await cli(database_url, "plan", "--json"))["paused"] is False
    reconciled = await cli(database_url, "reconcile", "--once")
    assert reconciled.returncode == 0, reconciled.stderr
    assert len(await prebuild_workspaces(factory.connection, preset)) == 2


async def test_presets_reset(factory: Factory, database_url: str) -> None:
    limited = await factory.preset(desired=1, status="hard_limited")
    for age in (92, 91, 90):
        await factory.prebuild(limited, status="failed", ago=minutes(age))

    unknown = str(uuid.uuid4())
    missing = await cli(database_url, "presets", "reset", unknown)
    assert missing.returncode == 1
    assert f"no preset with id {unknown}" in missing.stderr
    assert "Traceback" not in missing.stderr
    malformed = await cli(database_url, "presets", "reset", "not-a-uuid")
    assert malformed.returncode == 1
    assert "not a preset id" in malformed.stderr
    assert "Traceback" not in malformed.stderr

    reset = await cli(database_url, "presets", "reset", str(limited.id))
    assert reset.returncode == 0, reset.stderr
    assert "hard_limited" in reset.stdout
    assert (await preset_row(factory.connection, limited))["prebuild_status"] == "normal"
    # Its three failures no longer count: the next pass creates again instead of limiting it again.
    reconciled = await cli(database_url, "reconcile", "--once")
    assert reconciled.returncode == 0, reconciled.stderr
    assert "created 1," in reconciled.stdout
    assert (await preset_row(factory.connection, limited))["prebuild_status"] == "normal"
    workspaces = await prebuild_workspaces(factory.connection, limited)
    assert [row["owner_id"] for row in workspaces] == [PREBUILDS_SYSTEM_USER_ID] * 4


async def test_plan_shows_the_status_change_the_next_pass_writes(factory: Factory, database_url: str) -> None:
    """`plan` reads the plan a pass would run: a preset whose failure streak is broken shows as recovering
    (stored status still `hard_limited`), with the create the pass then makes."""
    recovering = await factory.preset(desired=2, status="hard_limited")
    for age in (92, 91, 90):
        await factory.prebuild(recovering, status="failed", ago=minutes(age))
    await factory.prebuild(recovering, ago=minutes(80))
    before = await table_checksums(factory.connection)

    presets = by_preset(parse_json(await cli(database_url, "plan", "--json")))
    planned = presets[str(recovering.id)]
    assert (planned["prebuild_status"], planned["status_change"], planned["hard_limited"]) == (
        "hard_limited",
        "recovered",
        False,
    )
    assert planned["actions"] == [{"type": "create", "count": 1}]
    assert await table_checksums(factory.connection) == before

    reconciled = await cli(database_url, "reconcile", "--once")
    assert reconciled.returncode == 0, reconciled.stderr
    assert "created 1," in reconciled.stdout
    assert (await preset_row(factory.connection, recovering))["prebuild_status"] == "normal"
    again = by_preset(parse_json(await cli(database_url, "plan", "--json")))[str(recovering.id)]
    assert (again["prebuild_status"], again["status_change"], again["actions"]) == ("normal", None, [])


UNREACHABLE = [
    pytest.param("postgresql://postgres@127.0.0.1:1/postgres", id="connection-refused"),
    pytest.param("postgresql://postgres@no-such-host.invalid:5432/postgres", id="unknown-host"),
]


@pytest.mark.parametrize("dsn", UNREACHABLE)
@pytest.mark.parametrize(
    "command", [("plan", "--json"), ("status",), ("reconcile", "--once"), ("pause",), ("presets", "reset", "x")]
)
async def test_an_unreachable_database_is_a_clear_error_without_traceback(dsn: str, command: tuple[str, ...]) -> None:
    if command[0] == "presets":
        command = ("presets", "reset", str(uuid.uuid4()))
    process = await cli(dsn, *command, RECONCILER_CONNECT_TIMEOUT="5s")
    assert process.returncode == 1
    assert "Traceback" not in process.stderr + process.stdout
    assert "cannot connect to the database" in process.stderr
    assert process.stdout == ""


async def test_a_wrong_database_is_a_clear_error_that_hides_the_password(server_dsn: str) -> None:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(server_dsn)
    user = parts.username or "postgres"
    netloc = f"{user}:hunter2secret@{parts.hostname}:{parts.port or 5432}"
    dsn = urlunsplit((parts.scheme, netloc, "/no_such_database_here", "", ""))
    process = await cli(dsn, "plan", "--json")
    assert process.returncode == 1
    assert "Traceback" not in process.stderr
    assert "hunter2secret" not in process.stderr + process.stdout
    assert "cannot connect to the database" in process.stderr


async def test_a_database_without_the_schema_is_a_clear_error(empty_database_url: str) -> None:
    process = await cli(empty_database_url, "plan", "--json")
    assert process.returncode == 1
    assert "Traceback" not in process.stderr
    assert "reconciler migrate" in process.stderr


async def test_a_malformed_dsn_is_a_configuration_error() -> None:
    # Not a connection failure but bad configuration: CONTRACTS.md gives it exit 78, naming the setting
    # and never echoing the secret.
    process = await cli("postgresql://postgres:hunter2secret@127.0.0.1:notaport/x", "plan", "--json")
    assert process.returncode == 78
    assert "RECONCILER_DATABASE_URL" in process.stderr
    assert "hunter2secret" not in process.stderr + process.stdout
    assert "Traceback" not in process.stderr
