"""The demo's scenario: its options, the platform it seeds, and the settings the daemon runs with.

A small platform: organization `acme`; alice (site template admin), bob (organization template admin),
carol (a plain member); up to eight healthy presets, one with a schedule and one with a time-to-live;
and `legacy-monolith`, whose builds always fail, so that backoff and the hard limit show within minutes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from uuid import UUID

from reconciler import db
from reconciler.demo import platform
from reconciler.demo.simulated_provisioner import ProvisionerOptions
from reconciler.durations import format_duration

ORGANIZATION = "acme"
BROKEN_TEMPLATE = "legacy-monolith"
FAILURE_HARD_LIMIT = 3


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
    existing = await platform.find_organization(connection, ORGANIZATION)
    if existing is not None:
        # A previous demo that was killed left its jobs "running" under a worker that is gone.
        await platform.release_all_provisioner_jobs(connection, now)
        publish_id = await platform.find_template(connection, existing, publish_name) if publish_name else None
        return SeededPlatform(existing, True, publish_id, publish_name)
    async with connection.transaction():
        organization = await platform.create_organization(connection, ORGANIZATION, now)
        # Template admins (site-wide, and of this organization) receive the hard-limit notification;
        # carol, a plain member, does not.
        alice = await platform.create_user(connection, "alice", "alice@acme.example.test", ["template-admin"], now)
        bob = await platform.create_user(connection, "bob", "bob@acme.example.test", [], now)
        carol = await platform.create_user(connection, "carol", "carol@acme.example.test", [], now)
        await platform.add_organization_member(connection, organization, alice, [], now)
        await platform.add_organization_member(connection, organization, bob, ["organization-template-admin"], now)
        await platform.add_organization_member(connection, organization, carol, [], now)
        template_ids: dict[str, UUID] = {}
        for seed in (*healthy, BROKEN_PRESET):
            template_id = await platform.create_template(connection, organization, seed.template, now)
            template_ids[seed.template] = template_id
            version_id = await platform.create_template_version(connection, template_id, "v1", now)
            preset_id = await platform.create_preset(
                connection,
                template_version_id=version_id,
                name=seed.preset,
                desired_instances=seed.desired,
                invalidate_after_secs=options.time_to_live if seed.with_time_to_live else None,
                scheduling_timezone=seed.timezone,
                now=now,
            )
            for name, value in seed.parameters:
                await platform.add_preset_parameter(connection, preset_id, name, value)
            for cron, desired in seed.schedules:
                await platform.add_preset_schedule(connection, preset_id, cron, desired)
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
