"""`reconciler presets describe` and the PRESET forms of `describe` and `reset` (issue 11.6), run as people
run them: the console entry point in a subprocess, against a real database built with the factories.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from reconciler.store import notifications as outbox
from tests.daemon_role import login_role
from tests.factories import Factory, minutes, seconds
from tests.integration.notification_helpers import fail_prebuilds, open_pool, pass_at, settings_for
from tests.integration.reconcile_support import complete_memberships, preset_row
from tests.integration.test_status import FORBIDDEN, HOSTILE, run

EXIT_USAGE = 2


async def describe_json(database_url: str, preset: str) -> dict[str, Any]:
    code, out, err = await run(database_url, "presets", "describe", preset, "--json")
    assert code == 0, err
    document: dict[str, Any] = json.loads(out)
    return document


async def deliver_all(factory: Factory, sink: str, at: datetime) -> int:
    """What a dispatcher does with every due message: lease it, record the sink's delivery, mark it sent."""
    token = uuid.uuid4()
    leased = await outbox.lease_notifications(
        factory.connection, now=at, leased_until=at + minutes(1), lease_token=token, limit=100
    )
    for message in leased:
        await outbox.record_notification_delivery(factory.connection, message.id, sink, at)
        finished = await outbox.finish_notification_attempt(
            factory.connection,
            message_id=message.id,
            lease_token=token,
            status="sent",
            next_attempt_at=None,
            last_error=None,
            sent_at=at,
            now=at,
        )
        assert finished
    return len(leased)


async def test_describe_shows_everything_about_a_hard_limited_preset(factory: Factory, database_url: str) -> None:
    template = await factory.template(name="python-dev")
    old = await factory.preset(await factory.version(template, name="v1"), name="small", desired=1)
    preset = await factory.preset(
        await factory.version(template, name="v2"),
        name="small",
        desired=1,
        timezone="Europe/Paris",
        schedules=[("* * * * *", 2)],
    )
    admin = await factory.user(site_roles=["template-admin"])
    # A build still pending (older than the failures, so that they are the newest three: the limit).
    await factory.prebuild(preset, status="pending", ago=minutes(100))
    await fail_prebuilds(factory, preset, 3, at=factory.now - minutes(90), error="quota exceeded", error_code="QUOTA")
    await complete_memberships(factory.connection)
    # A real pass marks it hard limited and enqueues the notice; a dispatcher's steps deliver it.
    pool = await open_pool(database_url)
    try:
        await pass_at(pool, settings_for(database_url), datetime.now(UTC))
    finally:
        await pool.close()
    assert (await preset_row(factory.connection, preset))["prebuild_status"] == "hard_limited"
    delivered_at = datetime.now(UTC)
    assert await deliver_all(factory, "webhook:0", delivered_at) == 1

    by_id = await describe_json(database_url, str(preset.id))
    # The other forms name the same preset: the short id, and template/preset (the active version's,
    # although the old version has a preset of that name too), and template/version/preset.
    for form in (str(preset.id)[:8], "python-dev/small", "python-dev/v2/small"):
        assert (await describe_json(database_url, form))["preset"]["preset_id"] == str(preset.id), form
    assert (await describe_json(database_url, "python-dev/v1/small"))["preset"]["preset_id"] == str(old.id)

    assert by_id["preset"]["template_version_name"] == "v2"
    assert by_id["preset"]["active_version"] is True
    assert by_id["settings"]["values"]["RECONCILER_FAILURE_HARD_LIMIT"] == "3"
    target = by_id["target"]
    assert (target["desired"], target["source"], target["desired_instances"]) == (2, "schedule", 1)
    assert target["schedules"] == [{"cron_expression": "* * * * *", "desired_instances": 2}]
    assert target["scheduling_timezone"] == "Europe/Paris"
    assert by_id["state"]["desired"] == 2
    assert by_id["state"]["starting"] == 1
    status = by_id["status"]
    assert (status["prebuild_status"], status["failure_episode"]) == ("hard_limited", 1)
    assert status["since"] is not None
    failures = by_id["failures"]
    assert (failures["failure_streak"], failures["last_error_code"], failures["last_error"]) == (
        3,
        "QUOTA",
        "quota exceeded",
    )
    (episode,) = by_id["history"]
    assert (episode["episode"], episode["kind"]) == (1, "hard_limited")
    (message,) = episode["messages"]
    assert (message["recipient"], message["status"], message["attempts"]) == (admin.username, "sent", 1)
    assert [delivery["sink"] for delivery in message["deliveries"]] == ["webhook:0"]
    prebuilds = by_id["recent_prebuilds"]
    assert len(prebuilds) == 4
    assert prebuilds[3]["job_status"] == "pending"
    assert [(row["job_status"], row["error_code"], row["error"]) for row in prebuilds[:3]] == [
        ("failed", "QUOTA", "quota exceeded")
    ] * 3
    assert by_id["oldest_pending_job"]["age_seconds"] >= 100 * 60
    assert by_id["next_pass"]["create_blocked"] == "hard_limited"
    assert by_id["next_pass"]["creates_withheld"] == 1
    assert by_id["reasons"][0].startswith("hard limited since ")

    code, text, err = await run(database_url, "presets", "describe", str(preset.id)[:8])
    assert code == 0, err
    for expected in (
        f"Preset:             small ({preset.id})",
        "Version:            v2 (active)",
        "Target:             2 (schedule)",
        "  Static:           desired_instances 1",
        "    * * * * *  ->  2",
        "Status:             hard_limited since ",
        "  Last error:       QUOTA: quota exceeded",
        "RECONCILER_FAILURE_HARD_LIMIT=3",
        "Oldest pending job: created ",
        "  - withhold 1 create (hard_limited)",
        "Reasons:            hard limited since ",
    ):
        assert expected in text, (expected, text)
    history = text[text.index("History") :].splitlines()
    assert "hard_limited" in history[3]
    assert admin.username in history[3]
    assert "webhook:0 " in history[3]
    assert " UTC" in history[3]


async def test_an_ambiguous_prefix_or_name_is_refused_with_the_candidates(factory: Factory, database_url: str) -> None:
    first = await factory.preset(desired=1, name="shared")
    second = await factory.preset(desired=1, name="other")
    # Two ids with a common prefix (set before anything refers to them).
    ids = [uuid.UUID("abcdef12-0000-4000-8000-000000000001"), uuid.UUID("abcdef12-1000-4000-8000-000000000002")]
    for preset, new_id in zip((first, second), ids, strict=True):
        await factory.connection.execute("update template_version_presets set id = $2 where id = $1", preset.id, new_id)
    # The same template and preset names in two organizations, both active.
    twins = []
    for _ in range(2):
        template = await factory.template(await factory.organization(), name="twin")
        twins.append(
            await factory.preset(await factory.version(template), name="default", desired=1, status="hard_limited")
        )

    for command in ("describe", "reset"):
        for text, expected in (("abcdef12", ids), ("twin/default", [twin.id for twin in twins])):
            code, out, err = await run(database_url, "presets", command, text)
            assert code == EXIT_USAGE, (command, text, err)
            assert f"{text} matches 2 presets" in err
            for candidate in expected:
                assert str(candidate) in err
            assert "Traceback" not in err
            assert out == ""
    # Nothing was reset.
    for twin in twins:
        assert (await preset_row(factory.connection, twin))["prebuild_status"] == "hard_limited"
    # A longer prefix is unique.
    assert (await describe_json(database_url, "abcdef12-0"))["preset"]["preset_id"] == str(ids[0])
    code, _, err = await run(database_url, "presets", "describe", "no-such/preset")
    assert code == 1
    assert "no preset matches 'no-such/preset'" in err


async def test_reset_takes_a_short_id_or_a_name(factory: Factory, database_url: str) -> None:
    template = await factory.template(name="go-dev")
    limited = await factory.preset(await factory.version(template, name="v1"), name="large", status="hard_limited")
    code, out, err = await run(database_url, "presets", "reset", str(limited.id)[:8])
    assert code == 0, err
    assert f"preset {limited.id} (go-dev/v1/large) reset to normal (was hard_limited)" in out
    assert (await preset_row(factory.connection, limited))["prebuild_status"] == "normal"
    await factory.connection.execute(
        "update template_version_presets set prebuild_status = 'validation_failed' where id = $1", limited.id
    )
    code, out, err = await run(database_url, "presets", "reset", "go-dev/large")
    assert code == 0, err
    assert "(was validation_failed)" in out


async def test_describe_escapes_names_and_errors_and_json_keeps_them(factory: Factory, database_url: str) -> None:
    template = await factory.template(name="t-" + HOSTILE)
    preset = await factory.preset(await factory.version(template, name="v-" + HOSTILE), name="p-" + HOSTILE, desired=1)
    await fail_prebuilds(
        factory, preset, 1, at=factory.now - seconds(5), error="boom " + HOSTILE, error_code="E\x1b[31m"
    )
    code, out, err = await run(database_url, "presets", "describe", str(preset.id))
    assert code == 0, err
    for character in FORBIDDEN:
        assert character not in out, repr(character)
    assert "p-evil\\x1b[2J\\x1b]0;owned\\x07\\r\\nFAKE ROW\\u202egnp.exe\\u2066\\x9b" in out
    assert "boom evil\\x1b[2J" in out
    assert "E\\x1b[31m" in out
    document = await describe_json(database_url, str(preset.id))
    assert document["preset"]["preset_name"] == "p-" + HOSTILE
    assert document["recent_prebuilds"][0]["error"] == "boom " + HOSTILE
    # An ambiguous name is listed escaped too.
    await factory.preset(await factory.version(template, name="v2"), name="p-" + HOSTILE, desired=1, active=False)
    await factory.connection.execute("update templates set active_version_id = null where id = $1", template.id)
    code, out, err = await run(database_url, "presets", "describe", f"t-{HOSTILE}/p-{HOSTILE}")
    assert code == EXIT_USAGE, err
    for character in FORBIDDEN:
        assert character not in err, repr(character)


async def test_describe_runs_with_the_daemons_role(factory: Factory, database_url: str) -> None:
    """An operator may run it with the daemon's credentials: what it reads, the role may read."""
    preset = await factory.preset(desired=1)
    await fail_prebuilds(factory, preset, 1, at=factory.now - seconds(5))
    async with login_role(database_url) as role_dsn:
        document = await describe_json(role_dsn, str(preset.id)[:8])
        code, _, err = await run(role_dsn, "presets", "describe", f"{preset.template.name}/{preset.name}")
    assert code == 0, err
    assert document["preset"]["preset_id"] == str(preset.id)
    assert document["recent_prebuilds"][0]["error_code"] == "PROVISIONER_ERROR"
