"""The log events of a pass: one run_id on everything it logs, and the hard-limit warning every pass."""

from __future__ import annotations

from datetime import timedelta

import structlog
from structlog.testing import capture_logs

from tests.factories import Factory, minutes
from tests.integration.reconcile_support import open_pool, pass_at, settings_for


async def test_every_event_of_a_pass_carries_its_run_id(factory: Factory, database_url: str) -> None:
    healthy = await factory.preset(desired=2)
    outdated = await factory.preset(desired=1, template=healthy.template, active=False)
    await factory.prebuild(outdated)
    settings = settings_for(database_url)
    async with open_pool(database_url) as pool:
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as events:
            first = await pass_at(pool, settings, factory.now)
            second = await pass_at(pool, settings, factory.now + timedelta(seconds=1))
    by_run = {first.run_id: 0, second.run_id: 0}
    for event in events:
        assert event.get("run_id") in by_run, event
        by_run[event["run_id"]] += 1
    assert first.run_id != second.run_id
    summaries = [event for event in events if event["event"] == "reconcile.pass"]
    assert [event["run_id"] for event in summaries] == [first.run_id, second.run_id]
    assert summaries[0]["created"] == 2
    assert summaries[0]["deleted"] == 1
    # The pass's own summary is not the only event: the writes it made logged too, with the same id.
    assert by_run[first.run_id] > 1


async def test_a_hard_limited_preset_is_warned_about_on_every_pass(factory: Factory, database_url: str) -> None:
    broken = await factory.preset(desired=1)
    for age in (30, 20, 10):
        await factory.prebuild(broken, status="failed", ago=minutes(age))
    # Past the backoff window of the newest failure, so the warning does not depend on wanting a create.
    settings = settings_for(database_url, failure_hard_limit="3", backoff_lookback="5m")
    async with open_pool(database_url) as pool:
        for offset in (0, 60, 120):
            with capture_logs() as events:
                await pass_at(pool, settings, factory.now + timedelta(seconds=offset))
            warnings = [event for event in events if event["event"] == "preset.creates_skipped_hard_limited"]
            assert [event["preset_id"] for event in warnings] == [str(broken.id)]
            assert warnings[0]["log_level"] == "warning"
