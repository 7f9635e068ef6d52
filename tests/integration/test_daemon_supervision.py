"""The daemon notices when a part of it dies: supervised tasks, survivable database errors, an ordered stop.

Each test runs the real `Daemon` in this process against a real database, and breaks one part of it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from reconciler import db, service
from reconciler.config import Settings
from reconciler.notify.dispatcher import Dispatcher
from reconciler.notify.metrics import NotificationMetrics
from reconciler.sdnotify import SystemdNotifier
from reconciler.service import Daemon, serve
from tests.factories import Factory
from tests.integration.notification_helpers import WebhookReceiver, eventually, fail_prebuilds, open_pool
from tests.integration.reconcile_support import settings_for


def daemon_settings(database_url: str, **overrides: str) -> Settings:
    return settings_for(database_url, http_address="127.0.0.1:0", reconciliation_interval="1s", **overrides)


def new_daemon(settings: Settings) -> Daemon:
    # No NOTIFY_SOCKET: the daemon must not talk to a systemd that runs the test session.
    return Daemon(settings, registry=CollectorRegistry(), notifier=SystemdNotifier({}))


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Daemon]:
    daemon = new_daemon(settings)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


async def readyz(daemon: Daemon) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(daemon.http_url + "/readyz") as response:
        return response.status, await response.text()


def failures(daemon: Daemon, task: str) -> float:
    value = daemon.metrics.registry.get_sample_value("prebuilds_reconciler_task_failures_total", {"task": task})
    return value or 0.0


def fail_once(
    real: Callable[..., Awaitable[Any]], error: Exception
) -> tuple[Callable[..., Awaitable[Any]], asyncio.Event]:
    """`real`, except that its first call raises `error`; the event is set once it has."""
    raised = asyncio.Event()

    async def wrapper(*arguments: Any) -> Any:
        if not raised.is_set():
            raised.set()
            raise error
        return await real(*arguments)

    return wrapper, raised


async def test_a_crashed_readiness_probe_is_restarted_and_readyz_keeps_telling_the_truth(
    database_url: str, connection: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "READINESS_PROBE_SECONDS", 0.1)
    async with running(daemon_settings(database_url)) as daemon:
        assert (await readyz(daemon))[0] == 200
        crashing, crashed = fail_once(db.schema_is_current, RuntimeError("a bug in the probe"))
        with capture_logs() as events:
            monkeypatch.setattr(db, "schema_is_current", crashing)
            await asyncio.wait_for(crashed.wait(), 10)
            # The schema falls behind after the crash: only a probe that still runs can tell.
            await connection.execute("delete from reconciler_schema_migrations where version = 1")

            async def says_schema_not_ready() -> bool:
                status, body = await readyz(daemon)
                return status == 503 and "schema not ready" in body

            await eventually(says_schema_not_ready, "/readyz to report the schema")
        crashes = [event for event in events if event["event"] == "daemon.task_failed"]
        assert [(event["task"], event["action"], event["ended"]) for event in crashes] == [
            ("readiness", "restart", "raised")
        ]
        assert crashes[0]["log_level"] == "error"
        assert isinstance(crashes[0]["exc_info"], RuntimeError)
        assert failures(daemon, "readiness") == 1


async def test_an_internal_client_error_in_the_probe_is_an_outage_not_a_crash(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "READINESS_PROBE_SECONDS", 0.1)
    async with running(daemon_settings(database_url)) as daemon:
        broken, raised = fail_once(db.schema_is_current, asyncpg.InternalClientError("cannot switch to state 15"))
        seen: list[tuple[int, str]] = []

        async def answers() -> bool:
            seen.append(await readyz(daemon))
            return raised.is_set() and seen[-1][0] == 200 and any(status == 503 for status, _ in seen)

        with capture_logs() as events:
            monkeypatch.setattr(db, "schema_is_current", broken)
            # 503 while the probe fails, then 200 again: the probe survived the driver's error.
            await eventually(answers, "/readyz to go 503 and back to 200")
        assert any("database unreachable: InternalClientError" in body for status, body in seen if status == 503)
        assert not [event for event in events if event["event"] == "daemon.task_failed"]
        assert failures(daemon, "readiness") == 0


async def test_a_dead_heartbeat_stops_the_daemon_with_exit_code_1(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = daemon_settings(database_url)
    daemon = new_daemon(settings)
    serving = asyncio.create_task(serve(settings, daemon=daemon))
    await eventually(lambda: asyncio.sleep(0, daemon.readiness.ready), "the daemon to be ready")

    def broken_gauge(value: float) -> None:
        raise RuntimeError("the heartbeat gauge is broken")

    with capture_logs() as events:
        monkeypatch.setattr(daemon.metrics.heartbeat, "set", broken_gauge)
        assert await asyncio.wait_for(serving, 20) == 1
    fatal = [event for event in events if event["event"] == "daemon.task_failed"]
    assert [(event["task"], event["action"], event["log_level"]) for event in fatal] == [
        ("heartbeat", "stop", "critical")
    ]
    assert any(event["event"] == "daemon.stopped" for event in events)
    assert failures(daemon, "heartbeat") == 1


async def test_the_dispatcher_finishes_its_delivery_when_the_daemon_stops(factory: Factory, database_url: str) -> None:
    await factory.user(username="ada", email="ada@example.test", site_roles=["template-admin"])
    preset = await factory.preset(desired=1)
    await fail_prebuilds(factory, preset, 3)
    # The receiver takes 1.5 s to answer: the daemon is asked to stop while the delivery is in flight.
    async with WebhookReceiver(delay=1.5) as receiver:
        settings = daemon_settings(
            database_url, webhook_0_url=receiver.url, notification_poll_interval="100ms", shutdown_grace="10s"
        )
        daemon = new_daemon(settings)
        await daemon.start()
        try:
            await eventually(lambda: asyncio.sleep(0, bool(receiver.requests)), "the webhook to be called")
        finally:
            await daemon.stop()
        # The poll in flight was let finish: the message is sent, not left leased for a later retry.
        rows = await factory.connection.fetch("select status, attempts from notification_messages")
        assert [(row["status"], row["attempts"]) for row in rows] == [("sent", 1)]
        assert len(receiver.requests) == 1


async def test_a_driver_internal_error_fails_a_poll_and_the_next_one_runs(database_url: str) -> None:
    """asyncpg's InternalClientError after a terminated backend is a database error like the others."""

    class Driver(Dispatcher):
        polls = 0

        async def dispatch_once(self, now: Any) -> int:
            self.polls += 1
            if self.polls == 1:
                raise asyncpg.InternalClientError("cannot switch to state 15")
            return await super().dispatch_once(now)

    pool = await open_pool(database_url)
    try:
        settings = settings_for(database_url, notification_poll_interval="100ms")
        dispatcher = Driver(pool, settings, NotificationMetrics(CollectorRegistry()))
        stop = asyncio.Event()
        with capture_logs() as events:
            running_dispatcher = asyncio.create_task(dispatcher.run(stop))
            await eventually(lambda: asyncio.sleep(0, dispatcher.polls >= 3), "three polls")
            stop.set()
            await asyncio.wait_for(running_dispatcher, 10)
    finally:
        await pool.close()
    names = [event["event"] for event in events]
    assert "notification.poll_crashed" not in names
    failed = [event for event in events if event["event"] == "notification.poll_failed"]
    assert [(event["log_level"], event["error"]) for event in failed] == [
        ("warning", "InternalClientError: cannot switch to state 15")
    ]
    assert "notification.poll_recovered" in names


async def test_a_skipped_tick_is_logged_as_a_scheduler_event(factory: Factory, database_url: str) -> None:
    preset = await factory.preset(desired=1)
    # The pass's create waits on this row lock (up to the 10 s lock timeout), over several 1 s ticks.
    blocker = await asyncpg.connect(database_url)
    transaction = blocker.transaction()
    await transaction.start()
    await blocker.execute("select 1 from template_version_presets where id = $1 for update", preset.id)
    try:
        with capture_logs() as events:
            async with running(daemon_settings(database_url)) as daemon:

                async def skipped() -> bool:
                    return any(event["event"] == "scheduler.event" for event in events)

                await eventually(skipped, "a skipped tick")
                await transaction.rollback()
    finally:
        await blocker.close()
    skipped_events = [event for event in events if event["event"] == "scheduler.event"]
    assert skipped_events[0]["scheduler_event"] == "max_instances"
    assert skipped_events[0]["log_level"] == "info"
    value = daemon.metrics.registry.get_sample_value(
        "prebuilds_reconciler_scheduler_events_total", {"event": "max_instances"}
    )
    assert value is not None
    assert value >= 1


async def test_a_tick_lost_to_the_lock_moves_the_replicas_ticks_to_a_new_phase(
    factory: Factory, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicas started together tick together: the later one would lose the lock on every tick for as long
    as a pass outlasts their offset. A lost tick moves this replica's ticks to a random moment of the
    interval (here the middle of it, for a deterministic check), instead of the next regular tick."""
    await factory.preset(desired=0)
    monkeypatch.setattr(random, "uniform", lambda low, high: (low + high) / 2)
    other_replica = await asyncpg.connect(database_url)
    try:
        assert await other_replica.fetchval("select pg_try_advisory_lock($1)", db.RECONCILIATION_LOCK_KEY)
        settings = settings_for(database_url, http_address="127.0.0.1:0", reconciliation_interval="60s")
        async with running(settings) as daemon:

            def until_next_tick() -> float | None:
                assert daemon._scheduler is not None
                job = daemon._scheduler.get_job("reconcile")
                if daemon.last_pass is None or job is None or job.next_run_time is None:
                    return None
                return float((job.next_run_time - daemon.last_pass.started_at).total_seconds())

            async def moved() -> bool:
                seconds = until_next_tick()
                # The regular next tick is 60 s after the first.
                return seconds is not None and seconds < 50

            await eventually(moved, "the next tick to move")
            assert daemon.last_pass is not None
            assert daemon.last_pass.outcome.value == "skipped_lock"
            seconds = until_next_tick()
            assert seconds is not None
            assert 25 <= seconds <= 35, "half an interval after the lost tick"
    finally:
        await other_replica.close()
