"""The soak: three replicas, a flaky provisioner, a platform that keeps changing, users claiming, faults.

`Soak.run()` seeds a fleet, starts three `reconciler run` replicas (1 s interval) and the simulated
provisioner (random latency, 20% failed builds), then for `chaos_seconds` plays the rest of the
platform at random: targets changed (desired counts and schedules), new template versions published,
presets invalidated, prebuilds claimed by users, hard-limited presets reset by an operator, the active
replica killed with SIGKILL in the middle of a pass (and replaced), all replicas' connections terminated
by the server. An invariant checker (`invariants.FleetChecker`) samples the database throughout. Then
the chaos stops (no more failures, the broken template fixed, every limited preset reset) and every
active preset must reach its target within three passes of the moment it may create again.

Everything is bounded: each phase has a deadline, and every loop ends by itself.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg

from reconciler import db
from reconciler.demo import platform
from reconciler.demo.simulated_provisioner import ProvisionerOptions, SimulatedProvisioner
from reconciler.store import writes
from tests.acceptance.daemon_process import DaemonProcess
from tests.factories import Factory
from tests.soak.invariants import (
    ALWAYS,
    NEVER,
    FleetChecker,
    PassWindow,
    lock_holder_client_ports,
    overlapping_passes,
    pass_windows,
    process_owning_local_port,
)

SET_DESIRED = "update template_version_presets set desired_instances = $2 where id = $1"
SET_SCHEDULE = """
with removed as (delete from template_version_preset_prebuild_schedules where preset_id = $1)
insert into template_version_preset_prebuild_schedules (preset_id, cron_expression, desired_instances)
values ($1, $2, $3)
"""
PREBUILDS_USER = UUID("c42fdf75-3097-471c-8c33-fb52454d81c0")
INVALIDATE = "update template_version_presets set last_invalidated_at = now() where id = $1"
# A platform's claim: lock a running, ready prebuild, re-check it under the lock (a delete build may have
# been committed meanwhile), then give it to the user.
CLAIM_CANDIDATES = """
select w.id from workspaces w
cross join lateral (
    select b.transition, b.job_id from workspace_builds b
    where b.workspace_id = w.id order by b.build_number desc limit 1
) latest
join provisioner_jobs job on job.id = latest.job_id
where w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and not w.deleted
    and latest.transition = 'start' and job.job_status = 'succeeded'
    and exists (select 1 from workspace_agents a where a.job_id = job.id and a.lifecycle_state = 'ready')
order by random()
limit 3
"""
LOCK_FOR_CLAIM = """
select 1 from workspaces
where id = $1 and owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' and not deleted
for update skip locked
"""
STILL_CLAIMABLE = """
select latest.transition = 'start' and job.job_status = 'succeeded'
from (select b.transition, b.job_id from workspace_builds b
      where b.workspace_id = $1 order by b.build_number desc limit 1) latest
join provisioner_jobs job on job.id = latest.job_id
"""
# How long the build jobs created in [$1, $2) waited for the provisioner: median and max, in seconds.
QUEUE_WAIT = """
select coalesce(percentile_cont(0.5) within group (order by wait), 0)::float8 as median,
       coalesce(max(wait), 0)::float8 as max
from (
    select extract(epoch from coalesce(started_at, now()) - created_at) as wait from provisioner_jobs
    where type = 'workspace_build' and created_at >= $1 and created_at < $2
        and (worker_id is not null or job_status = 'pending')
) waits
"""
# An upper bound of each preset's backoff (BEHAVIOR.md 3.1) from its failures in the lookback window:
# the newest failure plus one interval per failure (only the newest N count in the rule; all do here).
BACKOFF_BOUND = """
select max(last_failed + failures * $2::interval) from (
    select max(b.created_at) as last_failed, count(*) as failures
    from workspace_builds b join provisioner_jobs j on j.id = b.job_id
    where b.build_number = 1 and b.initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
        and j.job_status = 'failed' and b.created_at >= now() - $1::interval
    group by b.template_version_preset_id
) failed
"""


@dataclass(frozen=True)
class SoakConfig:
    chaos_seconds: float
    presets: int = 200
    seed: int = 0
    interval_seconds: float = 1.0
    failure_rate: float = 0.2
    min_build_seconds: float = 0.2
    max_build_seconds: float = 3.0
    event_every_seconds: float = 0.25
    kill_every_seconds: float = 60.0
    terminate_every_seconds: float = 45.0
    backoff_lookback_seconds: int = 60


@dataclass
class SoakSummary:
    seed: int
    presets: int
    chaos_seconds: float
    passes: int = 0
    creates: int = 0
    deletes: int = 0
    claims: int = 0
    events: Counter[str] = field(default_factory=Counter)
    failed_builds: int = 0
    kills: int = 0
    terminations: int = 0
    lock_skips: int = 0
    take_over_seconds: list[float] = field(default_factory=list)
    invariant_checks: int = 0
    violations: list[str] = field(default_factory=list)
    hard_limit_episodes: int = 0
    peak_surplus: int = 0
    convergence_seconds: float = 0.0
    convergence_allowed_seconds: float = 0.0
    convergence_queue_wait_seconds: float = 0.0
    # How long build jobs waited for the provisioner (created to picked up), median and max, in the chaos
    # and in the calm.
    queue_wait_chaos: tuple[float, float] = (0.0, 0.0)
    queue_wait_calm: tuple[float, float] = (0.0, 0.0)
    pass_seconds_median: float = 0.0
    pass_seconds_max: float = 0.0
    # The timeline of each preset (up to three) that went above its ceiling, for the reader of a failure.
    timelines: list[str] = field(default_factory=list)

    def render(self) -> str:
        injected = self.failed_builds + self.kills + self.terminations
        lines = [
            f"soak summary (seed {self.seed}, {self.presets} presets, {self.chaos_seconds:g} s of chaos)",
            f"  passes:            {self.passes} (and {self.lock_skips} skipped on the lock); duration median "
            f"{self.pass_seconds_median * 1000:.0f} ms, max {self.pass_seconds_max * 1000:.0f} ms",
            f"  creates:           {self.creates}",
            f"  deletes:           {self.deletes}",
            f"  claims:            {self.claims}",
            f"  platform changes:  {dict(sorted(self.events.items()))}",
            f"  failures injected: {injected} ({self.failed_builds} failed builds, {self.kills} kill -9 of the "
            f"active replica, {self.terminations} rounds of pg_terminate_backend)",
            f"  take-overs:        {', '.join(f'{seconds:.1f} s' for seconds in self.take_over_seconds) or '-'}",
            f"  hard-limit episodes: {self.hard_limit_episodes}",
            f"  peak surplus over target (after a target drop): {self.peak_surplus}",
            f"  convergence:       {self.convergence_seconds:.1f} s (allowed {self.convergence_allowed_seconds:.1f} s, "
            f"of which {self.convergence_queue_wait_seconds:.1f} s waiting for the provisioner)",
            f"  provisioner queue: jobs waited median {self.queue_wait_chaos[0]:.1f} s, max "
            f"{self.queue_wait_chaos[1]:.1f} s in the chaos; median {self.queue_wait_calm[0]:.1f} s, max "
            f"{self.queue_wait_calm[1]:.1f} s in the calm",
            f"  invariant checks:  {self.invariant_checks}",
            f"  violations:        {len(self.violations)}",
        ]
        lines.extend(f"    - {violation}" for violation in self.violations[:20])
        lines.extend(self.timelines)
        return "\n".join(lines)


class Soak:
    def __init__(self, factory: Factory, database_url: str, config: SoakConfig) -> None:
        self.factory = factory
        self.database_url = database_url
        self.config = config
        self.chooser = random.Random(config.seed)
        self.checker = FleetChecker()
        self.summary = SoakSummary(seed=config.seed, presets=config.presets, chaos_seconds=config.chaos_seconds)
        self.replicas: list[DaemonProcess] = []
        self.retired: list[DaemonProcess] = []
        self.windows: list[PassWindow] = []
        # Moments of the run every preset's timeline shows (the calm's start, its deadline), and the
        # presets that did not converge (their timelines are printed too).
        self.milestones: list[tuple[datetime, str]] = []
        self.not_converged: list[UUID] = []
        self.chaos_started_at = self.calm_started_at = datetime.now(UTC)
        # Presets of each template's active version, and the templates whose builds always fail.
        self.templates: dict[UUID, list[UUID]] = {}
        self.broken_templates: set[UUID] = set()
        self.users: list[UUID] = []
        self.platform: asyncpg.Connection | None = None
        self.provisioner: SimulatedProvisioner | None = None

    @property
    def connection(self) -> asyncpg.Connection:
        assert self.platform is not None
        return self.platform

    # --- set-up ---------------------------------------------------------------------------------

    async def seed(self) -> None:
        factory = self.factory
        organization = await factory.organization()
        await factory.user(site_roles=["template-admin"])
        self.users = [(await factory.user(organization=organization)).id for _ in range(8)]
        made = 0
        while made < self.config.presets:
            template = await factory.template(organization)
            version = await factory.version(template)
            broken = made == 0  # one template whose builds always fail: hard-limit episodes
            presets = []
            for _ in range(min(self.chooser.randint(1, 4), self.config.presets - made)):
                ttl = self.chooser.choice([None, None, None, 30, 45, 90])
                preset = await factory.preset(
                    version, desired=self.chooser.randint(0, 4), ttl_seconds=ttl, timezone="UTC"
                )
                if self.chooser.random() < 0.2:
                    cron = self.chooser.choice([ALWAYS, NEVER])
                    await self.connection.execute(SET_SCHEDULE, preset.id, cron, self.chooser.randint(0, 5))
                if broken:
                    await self.connection.execute(
                        "insert into template_version_preset_parameters (template_version_preset_id, name, value) "
                        "values ($1, 'simulated_failure', 'always')",
                        preset.id,
                    )
                presets.append(preset.id)
                made += 1
            self.templates[template.id] = presets
            if broken:
                self.broken_templates.add(template.id)
        for preset_ids in self.templates.values():
            for preset_id in preset_ids:
                await self.checker.change_target(self.connection, preset_id, "select $1::uuid", why="seed")

    def replica_environment(self) -> dict[str, str]:
        return {
            "RECONCILER_BACKOFF_INTERVAL": "1s",
            "RECONCILER_BACKOFF_LOOKBACK": f"{self.config.backoff_lookback_seconds}s",
            "RECONCILER_FAILURE_HARD_LIMIT": "3",
        }

    async def start_replica(self) -> DaemonProcess:
        replica = DaemonProcess(
            self.database_url,
            interval=f"{self.config.interval_seconds:g}s",
            extra_environment=self.replica_environment(),
        ).start()
        await asyncio.to_thread(replica.wait_ready, 60)
        self.replicas.append(replica)
        return replica

    # --- the run --------------------------------------------------------------------------------

    async def run(self) -> SoakSummary:
        self.platform = await asyncpg.connect(self.database_url, server_settings={"application_name": "platform"})
        provisioner_pool = await db.create_pool(self.database_url, max_size=8, application_name="simulated-provisioner")
        self.provisioner = SimulatedProvisioner(
            provisioner_pool,
            ProvisionerOptions(
                failure_rate=self.config.failure_rate,
                min_seconds=self.config.min_build_seconds,
                max_seconds=self.config.max_build_seconds,
                concurrency=64,
                poll_seconds=0.2,
            ),
            chooser=random.Random(self.config.seed + 1),
        )
        try:
            await self.seed()
            for _ in range(3):
                await self.start_replica()
            self.provisioner.start()
            await self.chaos()
            await self.calm()
            await self.final_checks()
        finally:
            await self.provisioner.stop()
            await provisioner_pool.close()
            events: list[tuple[str, dict[str, Any]]] = []
            for replica in self.replicas:
                self.summary.lock_skips += int(await asyncio.to_thread(self._skips, replica))
                self.windows.extend(pass_windows(str(replica.port), replica.events()))
                events.extend((str(replica.port), event) for event in replica.events())
                replica.stop()
            for replica in self.retired:
                events.extend((str(replica.port), event) for event in replica.events())
                replica.stop()
            for preset_id in [*self.checker.over_ceiling[:3], *self.not_converged[:3]]:
                self.summary.timelines.append(await self.preset_timeline(preset_id, events))
            await self.platform.close()
        self.summary.failed_builds = self.provisioner.stats.failed
        self.summary.passes = len(self.windows)
        durations = sorted(window.end - window.start for window in self.windows)
        if durations:
            self.summary.pass_seconds_median = durations[len(durations) // 2]
            self.summary.pass_seconds_max = durations[-1]
        self.summary.invariant_checks = self.checker.checks
        self.summary.violations = list(self.checker.violations)
        self.summary.peak_surplus = self.checker.peak_surplus
        return self.summary

    async def chaos(self) -> None:
        self.chaos_started_at = datetime.now(UTC)
        started = time.monotonic()
        deadline = started + self.config.chaos_seconds
        next_event = started
        next_kill = started + min(self.config.kill_every_seconds, self.config.chaos_seconds / 2)
        next_termination = started + min(self.config.terminate_every_seconds, self.config.chaos_seconds * 0.75)
        next_slow_check = started
        while time.monotonic() < deadline:
            now = time.monotonic()
            if now >= next_event:
                await self.platform_event()
                next_event += self.config.event_every_seconds
            if now >= next_kill:
                await self.kill_active_replica()
                next_kill += self.config.kill_every_seconds
            if now >= next_termination:
                await self.terminate_connections()
                next_termination += self.config.terminate_every_seconds
            if now >= next_slow_check:
                await self.checker.check_claims(self.connection)
                await self.checker.check_whole(self.connection)
                next_slow_check += 2.0
            await self.checker.sample(self.connection)
            await asyncio.sleep(0.05)

    async def platform_event(self) -> None:
        kind = self.chooser.choices(
            ["desired", "schedule", "publish", "invalidate", "claim", "reset"], weights=[30, 15, 4, 8, 35, 8]
        )[0]
        template_id = self.chooser.choice(list(self.templates))
        preset_id = self.chooser.choice(self.templates[template_id]) if self.templates[template_id] else None
        if kind == "desired" and preset_id is not None:
            await self.checker.change_target(
                self.connection, preset_id, SET_DESIRED, self.chooser.randint(0, 5), why="desired"
            )
        elif kind == "schedule" and preset_id is not None:
            cron = self.chooser.choice([ALWAYS, NEVER])
            await self.checker.change_target(
                self.connection, preset_id, SET_SCHEDULE, cron, self.chooser.randint(0, 5), why=f"schedule {cron!r}"
            )
        elif kind == "publish":
            await self.publish(template_id)
        elif kind == "invalidate" and preset_id is not None:
            await self.connection.execute(INVALIDATE, preset_id)
            self.checker.note(preset_id, "platform: invalidated")
        elif kind == "claim":
            if not await self.claim():
                return
        elif kind == "reset":
            if not await self.reset_one_limited():
                return
        else:
            return
        self.summary.events[kind] += 1

    async def publish(self, template_id: UUID) -> None:
        """A new version of the template (its presets copied), serialized with creates of the old ones."""
        old = self.templates[template_id]
        connection = self.connection
        async with connection.transaction():
            await connection.execute(
                "select 1 from template_version_presets where id = any($1::uuid[]) order by id for update", old
            )
            version_id = await platform.publish_template_version(
                connection, template_id, f"v-{uuid.uuid4().hex[:8]}", datetime.now(UTC)
            )
            assert version_id is not None
            live = await self.checker.live(connection, old)
            new = [
                row["id"]
                for row in await connection.fetch(
                    "select id from template_version_presets where template_version_id = $1 "
                    "and desired_instances is not null",
                    version_id,
                )
            ]
            targets = {preset_id: await self.checker.read_target(connection, preset_id) for preset_id in new}
        for preset_id in old:
            self.checker.set_target(preset_id, 0, live.get(preset_id, 0), f"publish: replaced by version {version_id}")
        for preset_id, target in targets.items():
            self.checker.set_target(preset_id, target, 0, "publish: new preset")
        self.templates[template_id] = new

    async def claim(self) -> bool:
        connection = self.connection
        for workspace_id in [row["id"] for row in await connection.fetch(CLAIM_CANDIDATES)]:
            async with connection.transaction():
                if not await connection.fetchval(LOCK_FOR_CLAIM, workspace_id):
                    continue
                if not await connection.fetchval(STILL_CLAIMABLE, workspace_id):
                    continue
                await connection.execute(
                    "update workspaces set owner_id = $2, updated_at = now() where id = $1",
                    workspace_id,
                    self.chooser.choice(self.users),
                )
            self.summary.claims += 1
            return True
        return False

    async def reset_one_limited(self) -> bool:
        limited = await self.connection.fetch(
            "select id from template_version_presets where prebuild_status = 'hard_limited'"
        )
        if not limited:
            return False
        preset_id = self.chooser.choice(limited)["id"]
        await writes.reset_preset(self.connection, preset_id, datetime.now(UTC))
        self.checker.note(preset_id, "operator: reset")
        return True

    # --- faults ---------------------------------------------------------------------------------

    def _skips(self, replica: DaemonProcess) -> float:
        try:
            return replica.metric("prebuilds_reconciler_passes_total", {"outcome": "skipped_lock"}) or 0
        except OSError:
            return 0

    def _successes(self, replicas: list[DaemonProcess]) -> float:
        total = 0.0
        for replica in replicas:
            try:
                total += replica.metric("prebuilds_reconciler_passes_total", {"outcome": "success"}) or 0
            except OSError:
                continue
        return total

    async def kill_active_replica(self) -> None:
        """SIGKILL the replica holding the lock, caught in the middle of a pass; start a replacement."""
        deadline = time.monotonic() + 15
        victim: DaemonProcess | None = None
        while victim is None and time.monotonic() < deadline:
            ports = await lock_holder_client_ports(self.connection)
            if ports:
                pids = {replica.process.pid: replica for replica in self.replicas if replica.process is not None}
                owner = process_owning_local_port(pids, ports[0])
                victim = pids.get(owner) if owner is not None else None
            if victim is None:
                await asyncio.sleep(0.01)
        if victim is None:
            return  # no pass caught in 15 s: nothing to kill this time (the summary shows the count)
        survivors = [replica for replica in self.replicas if replica is not victim]
        self.summary.lock_skips += int(await asyncio.to_thread(self._skips, victim))
        before = await asyncio.to_thread(self._successes, survivors)
        assert victim.process is not None
        victim.process.kill()
        await asyncio.to_thread(victim.wait, 10)
        killed_at = time.monotonic()
        self.summary.kills += 1
        self.windows.extend(pass_windows(str(victim.port), victim.events()))
        self.replicas.remove(victim)
        self.retired.append(victim)
        take_over_deadline = killed_at + 30
        while await asyncio.to_thread(self._successes, survivors) <= before:
            if time.monotonic() > take_over_deadline:
                self.checker.violations.append("no replica took over within 30 s of a kill -9")
                break
            await self.checker.sample(self.connection)
            await asyncio.sleep(0.1)
        self.summary.take_over_seconds.append(time.monotonic() - killed_at)
        await self.start_replica()

    async def terminate_connections(self) -> None:
        await self.connection.fetchval(
            "select count(*) filter (where pg_terminate_backend(pid)) from pg_stat_activity "
            "where datname = current_database() and application_name = 'reconciler'"
        )
        self.summary.terminations += 1

    # --- the end ----------------------------------------------------------------------------------

    async def calm(self) -> None:
        """No more chaos: every active preset must reach its target within 3 passes of being free to."""
        assert self.provisioner is not None
        self.provisioner.options = ProvisionerOptions(
            failure_rate=0.0,
            min_seconds=self.config.min_build_seconds,
            max_seconds=self.config.max_build_seconds,
            concurrency=64,
            poll_seconds=0.2,
        )
        connection = self.connection
        # The broken template is fixed, and the operator resets what is limited.
        await connection.execute("delete from template_version_preset_parameters where name = 'simulated_failure'")
        # Prebuilds stop expiring: an expired prebuild is deleted and replaced, the replacement waits for
        # the provisioner and builds, and meanwhile the next one of the preset may expire, so that a
        # preset whose prebuilds have a short time-to-live may never show its whole target at one instant
        # (seen: 3 running of 4 at the deadline, the fourth a replacement still waiting for the
        # provisioner). The calm judges the daemon filling its pools once nothing takes prebuilds away.
        await connection.execute(
            "update template_version_presets set invalidate_after_secs = null where invalidate_after_secs is not null"
        )
        calm_started = time.monotonic()
        self.calm_started_at = datetime.now(UTC)
        self.milestones.append((self.calm_started_at, "soak: calm: no more failures, the operator resets"))
        for row in await connection.fetch("select id from template_version_presets where prebuild_status <> 'normal'"):
            await writes.reset_preset(connection, row["id"], datetime.now(UTC))
        # Builds started during the chaos had their outcome drawn then: let them end before judging backoff.
        settle_until = calm_started + self.config.max_build_seconds + 0.5
        while time.monotonic() < settle_until:
            await self.checker.sample(connection)
            await asyncio.sleep(0.1)
        # Those builds can still open a new episode (three failures drawn during the chaos, ending after
        # the first reset): the daemon rightly limits the preset again. The operator looks once more,
        # now that nothing from the chaos is in flight, and resets what is limited.
        for row in await connection.fetch("select id from template_version_presets where prebuild_status <> 'normal'"):
            await writes.reset_preset(connection, row["id"], datetime.now(UTC))
        backoff_end = await connection.fetchval(
            BACKOFF_BOUND, timedelta(seconds=self.config.backoff_lookback_seconds), timedelta(seconds=1)
        )
        backoff_seconds = 0.0
        if backoff_end is not None:
            backoff_seconds = max(0.0, (backoff_end - datetime.now(UTC)).total_seconds())
        # Free to create after the backoff; then three passes, one build, and scheduling slack; and the
        # time the calm's builds wait for the provisioner, which is not the daemon's: measured as the run
        # goes (the longest wait of a build job created in the calm, a job still pending counting its age),
        # since its queue depends on how loaded the machine is. Bounded, so that the loop ends.
        base = (time.monotonic() - calm_started) + backoff_seconds
        base += 3 * self.config.interval_seconds + self.config.max_build_seconds + 3.0
        queue_wait_cap = 60.0
        self.milestones.append(
            (
                datetime.now(UTC),
                f"soak: second reset; backoff bound {backoff_seconds:.1f} s from now; convergence deadline in "
                f"{base - (time.monotonic() - calm_started):.1f} s plus the provisioner's queue wait",
            )
        )
        converged: dict[UUID, float] = {}
        running: dict[UUID, int] = {}
        queue_wait = 0.0
        while True:
            waited = await connection.fetchrow(QUEUE_WAIT, self.calm_started_at, datetime.now(UTC) + timedelta(hours=1))
            assert waited is not None
            queue_wait = min(float(waited["max"]), queue_wait_cap)
            allowed = base + queue_wait
            if time.monotonic() >= calm_started + allowed:
                break
            running = await self.checker.running(connection)
            for preset_id, target in self.checker.targets.items():
                if preset_id not in converged and running.get(preset_id, 0) == target:
                    converged[preset_id] = time.monotonic() - calm_started
            if len(converged) == len(self.checker.targets):
                break
            await self.checker.sample(connection)
            await asyncio.sleep(0.1)
        self.summary.convergence_allowed_seconds = allowed
        self.summary.convergence_queue_wait_seconds = queue_wait
        late = {
            preset_id: (running.get(preset_id, 0), target)
            for preset_id, target in self.checker.targets.items()
            if preset_id not in converged
        }
        self.milestones.append((datetime.now(UTC), "soak: convergence judged"))
        self.not_converged = sorted(late)
        for preset_id, (count, target) in sorted(late.items())[:10]:
            self.checker.violations.append(
                f"preset {preset_id} did not converge within {allowed:.1f} s: {count} running, target {target}"
                f" ({await self.describe_preset(preset_id)})"
            )
        self.summary.convergence_seconds = max(converged.values(), default=0.0)

    async def describe_preset(self, preset_id: UUID) -> str:
        """What an operator would look at for a preset that did not converge: status, active, recent builds."""
        row = await self.connection.fetchrow(
            "select p.prebuild_status::text as status, p.desired_instances, "
            "t.active_version_id = p.template_version_id and not t.deleted and t.deprecated = '' as active "
            "from template_version_presets p join template_versions v on v.id = p.template_version_id "
            "join templates t on t.id = v.template_id where p.id = $1",
            preset_id,
        )
        builds = await self.connection.fetch(
            "select b.transition::text, j.job_status::text, count(*) from workspace_builds b "
            "join provisioner_jobs j on j.id = b.job_id join workspaces w on w.id = b.workspace_id "
            "where b.template_version_preset_id = $1 and not w.deleted and b.created_at > now() - interval '2 minutes' "
            "group by 1, 2 order by 1, 2",
            preset_id,
        )
        recent = ", ".join(f"{build['transition']}/{build['job_status']}: {build['count']}" for build in builds)
        status, active = (row["status"], row["active"]) if row else ("?", "?")
        return f"status {status}, active {active}, recent builds {recent or 'none'}"

    async def preset_timeline(self, preset_id: UUID, events: list[tuple[str, dict[str, Any]]]) -> str:
        """What happened to one preset, in time order: the checker's targets and samples, the replicas'
        creates and deletes of it (with their pass), and every build of its workspaces."""
        lines: list[tuple[datetime, str]] = [*self.checker.history.get(preset_id, []), *self.milestones]
        for replica, event in events:
            if event.get("preset_id") != str(preset_id):
                continue
            details = ", ".join(
                f"{key} {event[key]}" for key in ("outcome", "rows", "planned", "clamped", "reason") if key in event
            )
            lines.append(
                (
                    datetime.fromisoformat(str(event["timestamp"])),
                    f"replica :{replica} pass {event.get('run_id')}: {event['event']} ({details})",
                )
            )
        builds = await self.connection.fetch(
            "select w.id as workspace_id, w.owner_id, b.build_number, b.transition::text, b.created_at, "
            "j.started_at, j.completed_at, j.canceled_at, j.job_status::text "
            "from workspace_builds b join provisioner_jobs j on j.id = b.job_id "
            "join workspaces w on w.id = b.workspace_id "
            "where w.id in (select workspace_id from workspace_builds where template_version_preset_id = $1)",
            preset_id,
        )
        for build in builds:
            name = f"workspace {str(build['workspace_id'])[:8]} build {build['build_number']} {build['transition']}"
            # A daemon's build is stamped with its pass's `now`, which precedes the commit.
            owner = "" if build["owner_id"] == PREBUILDS_USER else ", workspace since claimed"
            lines.append((build["created_at"], f"database: {name} stamped (job now {build['job_status']}{owner})"))
            for column in ("started_at", "completed_at", "canceled_at"):
                if build[column] is not None:
                    lines.append((build[column], f"database: {name} job {column.removesuffix('_at')}"))
        lines.sort(key=lambda line: line[0])
        ttl = await self.connection.fetchval(
            "select invalidate_after_secs from template_version_presets where id = $1", preset_id
        )
        expiry = f"prebuilds expire after {ttl} s" if ttl else "prebuilds do not expire"
        rendered = [f"  timeline of preset {preset_id} ({expiry}):"]
        rendered.extend(f"    {moment:%H:%M:%S.%f} {what}" for moment, what in lines)
        return "\n".join(rendered)

    async def final_checks(self) -> None:
        connection = self.connection
        for period, (start, end) in {
            "chaos": (self.chaos_started_at, self.calm_started_at),
            "calm": (self.calm_started_at, datetime.now(UTC)),
        }.items():
            row = await connection.fetchrow(QUEUE_WAIT, start, end)
            assert row is not None
            setattr(self.summary, f"queue_wait_{period}", (row["median"], row["max"]))
        await self.checker.sample(connection)
        await self.checker.check_claims(connection)
        await self.checker.check_whole(connection)
        # One template administrator: one message per failure episode.
        self.summary.hard_limit_episodes = await self.checker.check_episode_messages(connection, recipients=1)
        self.summary.creates = await connection.fetchval(
            "select count(*) from workspace_builds where build_number = 1 "
            "and initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'"
        )
        self.summary.deletes = await connection.fetchval(
            "select count(*) from workspace_builds where transition = 'delete' "
            "and initiator_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'"
        )

    def check_passes(self) -> None:
        """No two replicas' passes that hold a lock in common (two full passes; two targeted passes of a
        common template) overlap; every pass has its own run id."""
        self.checker.checks += 1
        run_ids = Counter(window.run_id for window in self.windows)
        for run_id, count in run_ids.items():
            if count > 1:
                self.checker.violations.append(f"run id {run_id} logged by {count} passes")
        for first, second in overlapping_passes(self.windows):
            self.checker.violations.append(
                f"passes {first.run_id} (replica :{first.replica}) and {second.run_id} (replica "
                f":{second.replica}) overlap by {min(first.end, second.end) - second.start:.3f} s"
            )
        self.summary.invariant_checks = self.checker.checks
        self.summary.violations = list(self.checker.violations)
