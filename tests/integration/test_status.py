"""`reconciler status` (issue 11.6) and the escaping of every table (issue 12.6), run as people run them:
the console entry point in a subprocess, against a real database built with the factories. Output is
read as bytes, so that a CR the command printed is seen as a CR (text mode would turn it into a newline).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from reconciler import planner, reports
from reconciler.reconcile import read_plan
from tests.acceptance.daemon_process import cli_environment
from tests.factories import Factory, Preset, minutes, seconds
from tests.integration.notification_helpers import settings_for
from tests.integration.reconcile_support import complete_memberships

# Backoff of an hour per failure, so that a preset that failed just now is still backing off when the
# subprocess runs, whatever the machine's speed.
ENVIRONMENT = {"RECONCILER_BACKOFF_INTERVAL": "1h"}
# A time as tables show it: today's time of day, or a date and time, always with its zone.
TIME = r"(\d{4}-\d\d-\d\d )?\d\d:\d\d:\d\d UTC"
# What must never reach a terminal from the data: ESC, CR, BEL, the bidi override and isolates.
FORBIDDEN = ("\x1b", "\r", "\x07", "\u202e", "\u2066", "\x9b")


async def complete(factory: Factory) -> None:
    """The prebuilds user's memberships made, as a pass would: `status` then prints its table alone."""
    await complete_memberships(factory.connection)


async def run(database_url: str, *arguments: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr, decoded without newline translation."""

    def call() -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "reconciler", *arguments],
            env=cli_environment(database_url, **ENVIRONMENT),
            capture_output=True,
            timeout=60,
            check=False,
        )

    process = await asyncio.to_thread(call)
    return process.returncode, process.stdout.decode(), process.stderr.decode()


async def status_json(database_url: str) -> dict[str, Any]:
    code, out, err = await run(database_url, "status", "--json")
    assert code == 0, err
    document: dict[str, Any] = json.loads(out)
    return document


def rows_by_id(table: str, presets: dict[str, Preset]) -> dict[str, str]:
    """The table's line of each named preset, found by its short id (the first column)."""
    lines = table.splitlines()
    found = {}
    for name, preset in presets.items():
        matching = [line for line in lines if line.startswith(str(preset.id)[:8] + " ")]
        assert len(matching) == 1, (name, table)
        found[name] = matching[0]
    return found


async def mark_status_changed(factory: Factory, preset: Preset, at: datetime) -> None:
    await factory.connection.execute(
        "update template_version_presets set prebuild_status_changed_at = $2 where id = $1", preset.id, at
    )


async def test_status_gives_one_reason_per_preset_that_is_not_filling(factory: Factory, database_url: str) -> None:
    # Short names, so that every reason fits whole in the 120 columns (shortening is tested below).
    organization = await factory.organization(name="acme")
    made = 0

    async def preset(**options: Any) -> Preset:
        nonlocal made
        made += 1
        template = await factory.template(organization, name=f"t{made}")
        return await factory.preset(await factory.version(template, name="v1"), name="p", **options)

    presets: dict[str, Preset] = {}
    presets["backing_off"] = await preset(desired=1)
    await factory.prebuild(presets["backing_off"], status="failed", ago=seconds(10))
    presets["limited"] = await preset(desired=1, status="hard_limited")
    limited_since = factory.now - timedelta(hours=2)
    await mark_status_changed(factory, presets["limited"], limited_since)
    for age in (92, 91, 90):
        await factory.prebuild(presets["limited"], status="failed", ago=minutes(age))
    presets["invalid"] = await preset(desired=1, status="validation_failed")
    await mark_status_changed(factory, presets["invalid"], factory.now - minutes(89))
    await factory.prebuild(
        presets["invalid"], status="failed", ago=minutes(90), error_code="REQUIRED_TEMPLATE_VARIABLES"
    )
    presets["unscheduled"] = await preset(desired=1, timezone="Europe", schedules=[("* 9-17 * * *", 3)])
    presets["capped"] = await preset(desired=500)
    presets["waiting"] = await preset(desired=2)
    await factory.prebuild(presets["waiting"], ago=minutes(20))
    await factory.prebuild(presets["waiting"], status="pending", ago=minutes(7))
    presets["full"] = await preset(desired=1)
    await factory.prebuild(presets["full"], ago=minutes(5))

    await complete(factory)
    code, out, err = await run(database_url, "status")
    assert code == 0, err
    header, *_ = out.splitlines()
    assert re.fullmatch(rf"status at {TIME}", header), header
    lines = rows_by_id(out, presets)
    expected = {
        "backing_off": rf"backoff until {TIME} after 1 failure",
        "limited": rf"hard limited since {TIME} after 3 failures in a row",
        "invalid": r"validation failed with error code REQUIRED_TEMPLATE_VARIABLES",
        "unscheduled": r"schedule ignored because unknown time zone 'Europe'",
        "capped": r"target capped at 100 \(asked 500\)",
        "waiting": r"oldest pending job waiting for 7m(\d+s)?",
        "full": r"-",
    }
    for name, reason in expected.items():
        assert re.search(rf"  {reason}$", lines[name]), (name, lines[name])
    # The organization is shown, and the short id is the start of the preset's id.
    assert presets["full"].organization.name in lines["full"]
    assert re.match(r"[0-9a-f]{8}  ", lines["full"])

    document = await status_json(database_url)
    entries = {entry["preset_id"]: entry for entry in document["presets"]}
    limited = entries[str(presets["limited"].id)]
    assert limited["short_id"] == str(presets["limited"].id)[:8]
    assert datetime.fromisoformat(limited["status_changed_at"]) == limited_since
    assert limited["failure_streak"] == 3
    assert limited["reason"] == limited["reasons"][0]
    assert limited["reason"].startswith("hard limited since ")
    invalid = entries[str(presets["invalid"].id)]
    assert invalid["last_error_code"] == "REQUIRED_TEMPLATE_VARIABLES"
    waiting = entries[str(presets["waiting"].id)]
    assert datetime.fromisoformat(waiting["oldest_pending_job_created_at"]) == factory.now - minutes(7)
    assert waiting["oldest_pending_job_age_seconds"] >= 7 * 60
    capped = entries[str(presets["capped"].id)]
    assert (capped["desired"], capped["uncapped_target"], capped["target_source"]) == (100, 500, "static")
    assert entries[str(presets["unscheduled"].id)]["schedule_problem"] == "unknown time zone 'Europe'"
    assert entries[str(presets["full"].id)]["reasons"] == []


async def test_status_shows_creates_withheld_while_paused(factory: Factory, database_url: str) -> None:
    preset = await factory.preset(desired=2)
    await factory.set_paused(True)
    await complete(factory)
    code, out, err = await run(database_url, "status")
    assert code == 0, err
    assert "reconciliation is PAUSED" in out.splitlines()[0]
    line = rows_by_id(out, {"preset": preset})["preset"]
    assert line.endswith("creates withheld because reconciliation is paused")


async def test_status_fits_120_columns_and_wide_and_json_keep_everything(factory: Factory, database_url: str) -> None:
    organization = await factory.organization(name="organization-" + "o" * 40)
    template = await factory.template(organization, name="template-" + "t" * 60)
    long_name = "preset-" + "p" * 60
    preset = await factory.preset(
        await factory.version(template, name="version-" + "v" * 40),
        name=long_name,
        desired=2,
        timezone="Nowhere/" + "z" * 50,
        schedules=[("* * * * *", 1)],
    )
    await factory.prebuild(preset, status="failed", ago=seconds(5))
    await complete(factory)
    code, out, err = await run(database_url, "status")
    assert code == 0, err
    widths = [len(line) for line in out.splitlines()]
    assert max(widths) <= 120, out
    line = rows_by_id(out, {"preset": preset})["preset"]
    assert "…" in line
    assert re.search(rf"backoff until {TIME} after 1 failure", line), line

    code, wide, err = await run(database_url, "status", "--wide")
    assert code == 0, err
    assert max(len(line) for line in wide.splitlines()) > 120
    wide_line = next(line for line in wide.splitlines() if line.startswith(str(preset.id)))
    for name in (organization.name, template.name, long_name):
        assert name in wide_line
    # Every reason, not only the first.
    assert "; schedule ignored because unknown time zone 'Nowhere/zzz" in wide_line

    entry = (await status_json(database_url))["presets"][0]
    assert (entry["organization_name"], entry["template_name"], entry["preset_name"]) == (
        organization.name,
        template.name,
        long_name,
    )


HOSTILE = "evil\x1b[2J\x1b]0;owned\x07\r\nFAKE ROW\u202egnp.exe\u2066\x9b"


async def test_tables_escape_control_and_bidi_characters_and_json_keeps_them(
    factory: Factory, database_url: str
) -> None:
    template = await factory.template(name="t-" + HOSTILE)
    preset = await factory.preset(await factory.version(template, name="v-" + HOSTILE), name="p-" + HOSTILE, desired=1)
    await factory.prebuild(preset, status="failed", ago=seconds(5))
    await complete(factory)
    for arguments in (("status",), ("status", "--wide"), ("plan",)):
        code, out, err = await run(database_url, *arguments)
        assert code == 0, err
        for character in FORBIDDEN:
            assert character not in out, (arguments, repr(character))
        # One header line, the column names, the rule and one row: the CR/LF made no row of its own.
        assert len(out.splitlines()) == 4, (arguments, out)
        assert "FAKE ROW" not in out.splitlines()[0]
        assert "p-evil\\x1b[2J\\x1b]0;owned\\x07\\r\\nFAKE ROW\\u202egnp.exe\\u2066\\x9b" in out or arguments == (
            "status",
        ), (arguments, out)
    code, out, _ = await run(database_url, "status")
    # The default table shortens names to fit, but what it shows is escaped too.
    assert "t-evil\\x1b" in out
    document = await status_json(database_url)
    assert document["presets"][0]["preset_name"] == "p-" + HOSTILE
    assert document["presets"][0]["template_name"] == "t-" + HOSTILE


async def test_status_shows_a_preset_the_planner_failed_on(
    factory: Factory, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A preset left out of the plan (a bug meeting rows nobody foresaw) is a pool that cannot fill: it is
    listed, with why, instead of vanishing from `status`."""
    fine = await factory.preset(desired=1)
    broken = await factory.preset(desired=1)
    plan_preset = planner.plan_preset

    def failing_for_broken(preset: Any, *arguments: Any) -> Any:
        if preset.id == broken.id:
            raise KeyError("boom")
        return plan_preset(preset, *arguments)

    monkeypatch.setattr(planner, "plan_preset", failing_for_broken)
    steady_plan = planner._SteadyPath.plan

    def general_path_for_broken(self: planner._SteadyPath, preset: Any, *arguments: Any) -> Any:
        # The steady fast path would plan it without `plan_preset`: it goes by the general path, made to raise.
        return None if preset.id == broken.id else steady_plan(self, preset, *arguments)

    monkeypatch.setattr(planner._SteadyPath, "plan", general_path_for_broken)
    plan = await read_plan(factory.connection, settings_for(database_url), datetime.now(UTC))
    assert broken.id not in {preset_plan.preset.id for preset_plan in plan.presets}

    lines = rows_by_id(reports.status_table(plan, paused=False), {"fine": fine, "broken": broken})
    assert broken.name in lines["broken"]
    # The reason's tail may be shortened to fit 120 columns when the names are long (they are numbered by
    # the factories, so their length depends on how many tests ran before); --wide and --json show it whole.
    assert re.search(r"  \?  +not planned: KeyError: 'boom'", lines["broken"])
    assert lines["fine"].endswith("  -")
    wide = reports.status_wide_table(plan, paused=False)
    assert any(line.startswith(str(broken.id)) and "not planned: KeyError" in line for line in wide.splitlines())
    document = reports.status_json(plan, paused=False)
    (entry,) = document["unplanned"]
    assert (entry["preset_id"], entry["preset_name"]) == (str(broken.id), broken.name)
    assert entry["reason"].startswith("not planned: KeyError")
