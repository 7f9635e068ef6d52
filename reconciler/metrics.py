"""Prometheus metrics: Coder-compatible prebuild series, and the daemon's own health.

Everything lives on an injected registry (tests read exact values with `get_sample_value`). Per-preset
series are rendered from the last pass's plan by a custom collector, so a scrape runs no query, and a
preset that stops qualifying simply disappears from the next scrape (no stale series to remove).
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from reconciler.breaker import BreakerState
from reconciler.demand_metrics import DemandCollector
from reconciler.notify.metrics import NotificationMetrics
from reconciler.plan import Plan
from reconciler.snapshot import PrebuildStatus, PrebuildTotals

# `_created` series double the size of a scrape at tens of thousands of presets and no dashboard uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

PRESET_LABELS = ("template_name", "preset_name", "organization_name")
PASS_OUTCOMES = ("success", "failed", "skipped_lock", "paused")
# The prebuilds user's rows that a pass may add (reconciler.store.memberships.MembershipKind's values;
# spelled out here because metrics do not import data access).
MEMBERSHIP_KINDS = ("organization_member", "group", "group_member")
# Pass durations from a few milliseconds (small fleets) to minutes (a stuck database).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


# (name, help, PresetSample attribute) of the per-preset series, in exposition order.
GAUGE_SERIES = (
    ("coderd_prebuilt_workspaces_desired", "Target number of prebuilt workspaces of the preset.", "desired"),
    ("coderd_prebuilt_workspaces_running", "Running prebuilt workspaces of the preset (expired included).", "running"),
    ("coderd_prebuilt_workspaces_eligible", "Ready, unexpired prebuilt workspaces that can be claimed.", "eligible"),
)
# Present (value 1) only while the flag holds: the series disappears otherwise.
FLAG_SERIES = (
    (
        "coderd_prebuilt_workspaces_preset_hard_limited",
        "1 while the preset is at the failure hard limit.",
        "hard_limited",
    ),
    (
        "coderd_prebuilt_workspaces_preset_validation_failed",
        "1 while the preset is marked validation_failed.",
        "validation_failed",
    ),
)
# Lifetime counters (created, failed, claimed), in the order of the totals tuples.
COUNTER_SERIES = (
    ("coderd_prebuilt_workspaces_created", "Prebuilt workspaces created (first builds)."),
    ("coderd_prebuilt_workspaces_failed", "Prebuilt workspaces whose first build failed."),
    ("coderd_prebuilt_workspaces_claimed", "Prebuilt workspaces claimed by users."),
)
# Claim events of the platform's claim path (`prebuild_events`), by type, in the order of the counts tuples
# (`reconciler.claim_event_counters.EVENT_TYPES`). Coder exports no such counter: ours, hence our prefix.
CLAIM_EVENTS_SERIES = "prebuilds_reconciler_preset_claim_events"
CLAIM_EVENTS_HELP = "Claim events of the preset by type (claim_succeeded, claim_missed), from prebuild_events."
CLAIM_EVENT_TYPES = ("claim_succeeded", "claim_missed")


@dataclass(frozen=True, slots=True)
class PresetSample:
    labels: tuple[str, str, str]
    desired: int
    running: int
    eligible: int
    hard_limited: bool
    validation_failed: bool


# Fast enough to compress a fleet L exposition (~6.6 MB) in tens of milliseconds; repetitive metric text
# shrinks ~20x even at this level.
_GZIP_LEVEL = 1
# A gzip member header (RFC 1952): no name, no modification time, unknown operating system.
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


def _header(name: str, documentation: str, kind: str) -> str:
    documentation = documentation.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {name} {documentation}\n# TYPE {name} {kind}\n"


@dataclass(frozen=True, slots=True)
class _Rendered:
    """The per-preset text, and the same as raw deflate blocks ending on a byte boundary (not final)."""

    text: bytes
    deflated: bytes
    crc: int

    @classmethod
    def of(cls, text: bytes) -> _Rendered:
        compressor = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
        deflated = compressor.compress(text) + compressor.flush(zlib.Z_SYNC_FLUSH)
        return cls(text=text, deflated=deflated, crc=zlib.crc32(text))


@dataclass(frozen=True, slots=True)
class PreparedPresets:
    """A plan's per-preset samples and their rendered text, ready to publish (`PresetCollector.prepare`)."""

    samples: tuple[PresetSample, ...]
    totals: Mapping[tuple[str, str, str], tuple[int, int, int]]
    rendered: _Rendered
    claim_events: Mapping[tuple[str, str, str], tuple[int, int]] | None = None


class PresetCollector(Collector):
    """Per-preset gauges and lifetime counters, for presets on the active version of live templates."""

    def __init__(self) -> None:
        self._samples: tuple[PresetSample, ...] = ()
        # The presets whose lifetime counters are exported: those of the last plan. Kept when the gauges are
        # withdrawn (a tick lost to another replica's lock): the counters come from the database, not from
        # a plan, and a counter series that comes and goes would read as resets.
        self._counted: frozenset[tuple[str, str, str]] = frozenset()
        # Counters must never go down while the process runs, even if rows disappear from the database.
        self._totals: dict[tuple[str, str, str], tuple[int, int, int]] = {}
        # The claim/miss counters by label set (`reconciler.claim_event_counters`), never lowered either.
        self._claim_events: dict[tuple[str, str, str], tuple[int, int]] = {}
        # The text of every per-preset series, rendered when the samples change (see `exposition`).
        self._label_text: dict[tuple[str, str, str], str] = {}
        # Each preset's lines as last rendered, by what they show (see `_render_lines`).
        self._gauge_cache: dict[PresetSample, tuple[str, ...]] = {}
        self._counter_cache: dict[tuple[tuple[str, str, str], tuple[int, int, int]], tuple[str, ...]] = {}
        self._claim_cache: dict[tuple[tuple[str, str, str], tuple[int, int]], str] = {}
        self._rendered = _Rendered.of(b"")
        # What `_rendered` was rendered from (samples, counted, totals, claim events) and the text, as one
        # attribute, replaced at once: `prepare`, on a thread, reads both together.
        self._rendered_from_state: tuple[object, ...] = (
            (),
            frozenset(),
            self._totals,
            self._claim_events,
            self._rendered,
        )
        self._rendering = threading.local()

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """While active (in this thread), `collect` yields nothing: the caller appends `exposition()`."""
        self._rendering.excluded = True
        try:
            yield
        finally:
            self._rendering.excluded = False

    def prepare(self, plan: Plan) -> PreparedPresets:
        """The plan's samples and their text, rendered with the current totals, without publishing them.

        Safe on another thread (the daemon renders there, so that the event loop, and a scrape arriving
        right after a pass, do not wait for it): it only reads, and everything it reads is replaced,
        never changed in place."""
        samples = self._samples_from(plan)
        totals, claim_events = self._totals, self._claim_events
        counted = frozenset(sample.labels for sample in samples)
        last_samples, last_counted, last_totals, last_claim_events, last_rendered = self._rendered_from_state
        if (
            last_totals is totals
            and last_claim_events is claim_events
            and last_samples == samples
            and last_counted == counted
            and isinstance(last_rendered, _Rendered)
        ):
            # A steady pass: the text and its compressed form are the last ones, byte for byte. Not even
            # the cached lines are joined again (~35 ms at 10,000 presets, holding the interpreter lock
            # while the first scrape after the pass waits), nor megabytes compressed.
            return PreparedPresets(samples, totals, last_rendered, claim_events)
        rendered = self._rendered_from(samples, counted, totals, claim_events)
        return PreparedPresets(samples, totals, rendered, claim_events)

    def update_from_plan(self, plan: Plan, prepared: PreparedPresets | None = None) -> None:
        """Publish the plan's samples; with `prepared` (from `prepare`), its text, already rendered."""
        if prepared is None or prepared.totals is not self._totals or prepared.claim_events is not self._claim_events:
            # Not prepared, or the totals moved since: render now (counters must never show going back).
            prepared = self.prepare(plan)
        counted = frozenset(sample.labels for sample in prepared.samples)
        self._samples, self._rendered, self._counted = prepared.samples, prepared.rendered, counted
        self._rendered_from_state = (
            prepared.samples,
            counted,
            prepared.totals,
            prepared.claim_events,
            prepared.rendered,
        )

    @staticmethod
    def _samples_from(plan: Plan) -> tuple[PresetSample, ...]:
        samples = []
        for preset_plan in plan.presets:
            preset = preset_plan.preset
            if not preset.is_active_version or preset.template_deleted:
                continue
            labels = (preset.template_name, preset.name, preset.organization_name)
            samples.append(
                PresetSample(
                    labels=labels,
                    desired=preset_plan.state.desired,
                    running=preset_plan.state.actual,
                    eligible=preset_plan.state.eligible,
                    # The status the pass leaves the preset in: a change it made shows at once.
                    hard_limited=preset_plan.hard_limited or preset_plan.prebuild_status is PrebuildStatus.HARD_LIMITED,
                    validation_failed=preset_plan.prebuild_status is PrebuildStatus.VALIDATION_FAILED,
                )
            )
        return tuple(samples)

    def withdraw(self) -> None:
        """Stop exporting the per-preset gauges until the next plan; the lifetime counters stay exported."""
        self._samples = ()
        self._render()

    def update_totals(self, totals: Mapping[tuple[str, str, str], PrebuildTotals], *, render: bool = True) -> None:
        """The lifetime counters by label set (`reconciler.counters`); exported for qualifying presets.

        `render=False` when the claim events are updated right after: one render (and one compression of
        megabytes of text, on the event loop) instead of two."""
        updated = dict(self._totals)
        for labels, total in totals.items():
            previous = updated.get(labels, (0, 0, 0))
            # `reconciler.counters` never lowers a count; this keeps the promise whatever the caller.
            updated[labels] = (
                max(previous[0], total.created),
                max(previous[1], total.failed),
                max(previous[2], total.claimed),
            )
        self._totals = updated
        if render:
            self._render()

    def update_claim_events(self, counts: Mapping[tuple[str, str, str], tuple[int, int]]) -> None:
        """The claim/miss counters by label set; exported for qualifying presets, like the lifetime ones."""
        updated = dict(self._claim_events)
        for labels, values in counts.items():
            previous = updated.get(labels, (0, 0))
            updated[labels] = (max(previous[0], values[0]), max(previous[1], values[1]))
        self._claim_events = updated
        self._render()

    def collect(self) -> Iterator[Metric]:
        if getattr(self._rendering, "excluded", False):
            return
        yield from self._families()

    def _families(self) -> Iterator[Metric]:
        samples = self._samples
        for name, documentation, attribute in GAUGE_SERIES:
            family = GaugeMetricFamily(name, documentation, labels=PRESET_LABELS)
            for sample in samples:
                family.add_metric(list(sample.labels), getattr(sample, attribute))
            yield family
        for name, documentation, attribute in FLAG_SERIES:
            family = GaugeMetricFamily(name, documentation, labels=PRESET_LABELS)
            for sample in samples:
                if getattr(sample, attribute):
                    family.add_metric(list(sample.labels), 1)
            yield family
        totals = self._qualifying_totals(self._counted, self._totals)
        for index, (name, documentation) in enumerate(COUNTER_SERIES):
            counter = CounterMetricFamily(name, documentation, labels=PRESET_LABELS)
            for label_values, values in totals:
                counter.add_metric(list(label_values), values[index])
            yield counter
        counter = CounterMetricFamily(CLAIM_EVENTS_SERIES, CLAIM_EVENTS_HELP, labels=(*PRESET_LABELS, "event_type"))
        for label_values, event_counts in self._qualifying_claim_events(self._counted, self._claim_events):
            for event_type, value in zip(CLAIM_EVENT_TYPES, event_counts, strict=True):
                counter.add_metric([*label_values, event_type], value)
        yield counter

    @staticmethod
    def _qualifying_totals(
        counted: frozenset[tuple[str, str, str]], totals: Mapping[tuple[str, str, str], tuple[int, int, int]]
    ) -> list[tuple[tuple[str, str, str], tuple[int, int, int]]]:
        return [(labels, values) for labels, values in totals.items() if labels in counted]

    @staticmethod
    def _qualifying_claim_events(
        counted: frozenset[tuple[str, str, str]], claim_events: Mapping[tuple[str, str, str], tuple[int, int]]
    ) -> list[tuple[tuple[str, str, str], tuple[int, int]]]:
        return [(labels, values) for labels, values in claim_events.items() if labels in counted]

    def exposition(self) -> bytes:
        """The text format of `collect()`'s families, byte for byte, as rendered at the last update.

        At tens of thousands of presets, building metric family objects and formatting them on every
        scrape took ~230 ms; the samples only change once per pass, so the text is rendered then (right
        after the pass, before a scrape can ask for it: the first scrape after a pass costs what any other
        does), and each preset's escaped label set is kept between passes.
        """
        return self._rendered.text

    def gzip_exposition(self, head: bytes) -> bytes:
        """A gzip stream of this exposition followed by `head`, the rest of the registry's text.

        The per-preset text (megabytes at fleet L) is compressed once per update; a scrape only compresses
        `head` (a few kilobytes) and appends it: a deflate stream may go on after a flushed block, and
        the CRC-32 of the whole is the per-preset text's, continued over `head`.
        """
        rendered = self._rendered
        compressor = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
        tail = compressor.compress(head) + compressor.flush(zlib.Z_FINISH)
        crc = zlib.crc32(head, rendered.crc)
        size = (len(rendered.text) + len(head)) & 0xFFFFFFFF
        return _GZIP_HEADER + rendered.deflated + tail + struct.pack("<II", crc, size)

    def _render(self) -> None:
        # The samples and totals are replaced, never changed in place.
        samples, counted, totals, claim_events = self._samples, self._counted, self._totals, self._claim_events
        self._rendered = self._rendered_from(samples, counted, totals, claim_events)
        self._rendered_from_state = (samples, counted, totals, claim_events, self._rendered)

    def _rendered_from(
        self,
        samples: tuple[PresetSample, ...],
        counted: frozenset[tuple[str, str, str]],
        totals: Mapping[tuple[str, str, str], tuple[int, int, int]],
        claim_events: Mapping[tuple[str, str, str], tuple[int, int]],
    ) -> _Rendered:
        return _Rendered.of("".join(self._render_lines(samples, counted, totals, claim_events)).encode())

    def _labels(self, label_values: tuple[str, str, str]) -> str:
        text = self._label_text.get(label_values)
        if text is None:
            escaped = (value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for value in label_values)
            # Sorted by label name, as the client library writes them.
            pairs = sorted(zip(PRESET_LABELS, escaped, strict=True))
            text = "{" + ",".join(f'{name}="{value}"' for name, value in pairs) + "}"
            self._label_text[label_values] = text
        return text

    def _render_lines(
        self,
        samples: tuple[PresetSample, ...],
        counted: frozenset[tuple[str, str, str]],
        all_totals: Mapping[tuple[str, str, str], tuple[int, int, int]],
        all_claim_events: Mapping[tuple[str, str, str], tuple[int, int]],
    ) -> list[str]:
        """The same families as `_families`, in the same order, written straight from the samples.

        Each preset's lines are kept from one render to the next, keyed by what they show: a pass that
        changes a few presets formats only theirs. Formatting all of them took ~0.5 s at 10,000 presets on
        a busy machine, on a thread but holding the interpreter lock, so that the first scrape after a
        pass waited for it. The caches are replaced, never changed in place: a render on the event loop
        (new totals) and one on a thread (a new plan) may overlap, and only cost each other a miss."""
        gauge_cache, counter_cache, claim_cache = self._gauge_cache, self._counter_cache, self._claim_cache
        gauge_rows: list[tuple[str, ...]] = []
        new_gauges: dict[PresetSample, tuple[str, ...]] = {}
        for sample in samples:
            row = gauge_cache.get(sample)
            if row is None:
                row = self._gauge_row(sample)
            new_gauges[sample] = row
            gauge_rows.append(row)
        counter_rows: list[tuple[str, ...]] = []
        new_counters: dict[tuple[tuple[str, str, str], tuple[int, int, int]], tuple[str, ...]] = {}
        for key in self._qualifying_totals(counted, all_totals):
            row = counter_cache.get(key)
            if row is None:
                label_text = self._labels(key[0])
                row = tuple(
                    f"{name}_total{label_text} {float(value)!r}\n"
                    for (name, _), value in zip(COUNTER_SERIES, key[1], strict=True)
                )
            new_counters[key] = row
            counter_rows.append(row)
        claim_lines: list[str] = []
        new_claims: dict[tuple[tuple[str, str, str], tuple[int, int]], str] = {}
        for claim_key in self._qualifying_claim_events(counted, all_claim_events):
            text = claim_cache.get(claim_key)
            if text is None:
                label_text = self._labels(claim_key[0])
                # Labels sorted by name, as the client library writes them: event_type comes first.
                text = "".join(
                    f'{CLAIM_EVENTS_SERIES}_total{{event_type="{event_type}",{label_text[1:]} {float(value)!r}\n'
                    for event_type, value in zip(CLAIM_EVENT_TYPES, claim_key[1], strict=True)
                )
            new_claims[claim_key] = text
            claim_lines.append(text)
        self._gauge_cache, self._counter_cache, self._claim_cache = new_gauges, new_counters, new_claims

        parts: list[str] = []
        for index, (name, documentation, _) in enumerate(GAUGE_SERIES + FLAG_SERIES):
            parts.append(_header(name, documentation, "gauge"))
            parts.extend([row[index] for row in gauge_rows])
        for index, (name, documentation) in enumerate(COUNTER_SERIES):
            parts.append(_header(name + "_total", documentation, "counter"))
            parts.extend([row[index] for row in counter_rows])
        parts.append(_header(CLAIM_EVENTS_SERIES + "_total", CLAIM_EVENTS_HELP, "counter"))
        parts.extend(claim_lines)
        return parts

    def _gauge_row(self, sample: PresetSample) -> tuple[str, ...]:
        """One preset's line in each gauge family (an empty string where a flag's series is absent)."""
        label_text = self._labels(sample.labels)
        gauges = tuple(
            f"{name}{label_text} {float(getattr(sample, attribute))!r}\n" for name, _, attribute in GAUGE_SERIES
        )
        flags = tuple(
            f"{name}{label_text} 1.0\n" if getattr(sample, attribute) else "" for name, _, attribute in FLAG_SERIES
        )
        return gauges + flags

    def describe(self) -> Iterable[Metric]:
        # Describing nothing keeps registration cheap and lets the samples change freely.
        return ()


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, process_metrics: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        registry = self.registry
        self.presets = PresetCollector()
        registry.register(self.presets)
        # Demand-driven targets (issue 14): series for presets with an expression only.
        self.demand = DemandCollector()
        registry.register(self.demand)
        if process_metrics:
            ProcessCollector(registry=registry)
        self.paused = Gauge(
            "coderd_prebuilt_workspaces_reconciliation_paused", "1 while reconciliation is paused.", registry=registry
        )
        self.metrics_last_updated = Gauge(
            "coderd_prebuilt_workspaces_metrics_last_updated",
            "Unix time of the pass that produced the per-preset series.",
            registry=registry,
        )
        # Every tick, as Coder observes it, by outcome: a lock skip or a pause is quick, a failed pass
        # may be slow, and a `sum by (le)` still gives the distribution of all of them.
        self.duration = Histogram(
            "coderd_prebuilds_reconciliation_duration_seconds",
            "Duration of reconciliation passes (every tick), by outcome.",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.passes = Counter("prebuilds_reconciler_passes", "Passes by outcome.", ["outcome"], registry=registry)
        for outcome in PASS_OUTCOMES:
            self.passes.labels(outcome)
            self.duration.labels(outcome)
        self.settings_malformed = Gauge(
            "prebuilds_reconciler_settings_malformed",
            "1 while the stored prebuilds_settings cannot be read (the last readable value is used).",
            registry=registry,
        )
        self.last_pass = Gauge(
            "prebuilds_reconciler_last_pass_timestamp_seconds",
            "Unix time at which the last pass ended, whatever its outcome.",
            registry=registry,
        )
        self.last_success = Gauge(
            "prebuilds_reconciler_last_successful_pass_timestamp_seconds",
            "Unix time at which the last successful pass ended.",
            registry=registry,
        )
        self.heartbeat = Gauge(
            "prebuilds_reconciler_heartbeat_timestamp_seconds",
            "Unix time of the event loop's last heartbeat.",
            registry=registry,
        )
        self.interval = Gauge(
            "prebuilds_reconciler_reconciliation_interval_seconds",
            "The configured time between passes.",
            registry=registry,
        )
        self.actions = Counter(
            "prebuilds_reconciler_actions",
            "Prebuilds acted on, by kind, outcome and (deletes) reason.",
            ["kind", "outcome", "reason"],
            registry=registry,
        )
        self.oldest_pending_job_age = Gauge(
            "prebuilds_reconciler_oldest_pending_prebuild_job_age_seconds",
            "Age of the oldest prebuild job no provisioner has started, per organization (0 when none).",
            ["organization_name"],
            registry=registry,
        )
        self._pending_job_organizations: set[str] = set()
        self.database_errors = Counter(
            "prebuilds_reconciler_database_errors",
            "Database errors (failed passes, failed presets, failed probes).",
            registry=registry,
        )
        self.scheduler_events = Counter(
            "prebuilds_reconciler_scheduler_events",
            "Scheduler runs missed, failed, or skipped because one was running.",
            ["event"],
            registry=registry,
        )
        for event in ("missed", "error", "max_instances"):
            self.scheduler_events.labels(event)
        self.ready = Gauge("prebuilds_reconciler_ready", "1 while /readyz answers 200.", registry=registry)
        self.task_failures = Counter(
            "prebuilds_reconciler_task_failures",
            "Background tasks that ended while the daemon was not stopping (then restarted, or the daemon stopped).",
            ["task"],
            registry=registry,
        )
        self.membership_failures = Counter(
            "prebuilds_reconciler_membership_failures",
            "Failures adding the prebuilds user's memberships: one per organization left out, or one when the "
            "step failed as a whole. Retried next pass; presets are reconciled regardless.",
            registry=registry,
        )
        self.memberships_added = Counter(
            "prebuilds_reconciler_memberships_added",
            "Rows added for the prebuilds user, by kind (organization_member, group, group_member).",
            ["kind"],
            registry=registry,
        )
        for kind in MEMBERSHIP_KINDS:
            self.memberships_added.labels(kind)
        self.in_flight_budget = Gauge(
            "prebuilds_reconciler_in_flight_budget",
            "The in-flight budget of prebuild build jobs, across the deployment (scope=total) and per template "
            "(scope=per_template); 0 = unlimited. scope=slow_start: the prebuild creates allowed in flight while "
            "the slow start holds (0 when it does not).",
            ["scope"],
            registry=registry,
        )
        self.in_flight_jobs = Gauge(
            "prebuilds_reconciler_in_flight_jobs",
            "Prebuild build jobs (creates and deletes) pending or running at the last pass's snapshot.",
            registry=registry,
        )
        self.in_flight_withheld = Gauge(
            "prebuilds_reconciler_in_flight_withheld",
            "Creates and deletes the last pass's plan held back under the in-flight budget, by kind.",
            ["kind"],
            registry=registry,
        )
        self.breaker_state = Gauge(
            "prebuilds_reconciler_breaker_state",
            "The global breaker: 1 for its current state (closed, open, half_open), 0 for the others.",
            ["state"],
            registry=registry,
        )
        self.breaker_episode = Gauge(
            "prebuilds_reconciler_breaker_episode",
            "Breaker episodes so far (the current one while open or half-open).",
            registry=registry,
        )
        for state in BreakerState:
            self.breaker_state.labels(state.value).set(1 if state is BreakerState.CLOSED else 0)
        for scope in ("total", "per_template", "slow_start"):
            self.in_flight_budget.labels(scope)
        for kind in ("create", "delete"):
            self.in_flight_withheld.labels(kind)
        self.notifications = NotificationMetrics(registry)
        self.events = EventMetrics(registry)

    def render(self) -> bytes:
        """What /metrics serves: the per-preset series from the pass's cache, then the registry's text."""
        return self.presets.exposition() + self._head()

    def render_gzip(self) -> bytes:
        """`render()`, gzipped, compressing only the registry's part per call (see `gzip_exposition`)."""
        return self.presets.gzip_exposition(self._head())

    def _head(self) -> bytes:
        with self.presets.excluded():
            return generate_latest(self.registry)

    def _observe_budget(self, plan: Plan) -> None:
        budget = plan.budget
        self.in_flight_budget.labels("total").set(budget.max_in_flight if budget else 0)
        self.in_flight_budget.labels("per_template").set(budget.max_in_flight_per_template if budget else 0)
        self.in_flight_budget.labels("slow_start").set(budget.slow_start if budget else 0)
        if plan.snapshot is not None:
            self.in_flight_jobs.set(plan.snapshot.in_flight_total)
        self.in_flight_withheld.labels("create").set(budget.creates_held if budget else 0)
        self.in_flight_withheld.labels("delete").set(budget.deletes_held if budget else 0)
        record = plan.breaker.record if plan.breaker is not None else None
        if record is None and plan.snapshot is not None:
            record = plan.snapshot.breaker
        if record is not None:
            for state in BreakerState:
                self.breaker_state.labels(state.value).set(1 if state is record.state else 0)
            self.breaker_episode.set(record.episode)

    def observe_action(self, kind: str, outcome: str, prebuilds: int, reason: str = "") -> None:
        """`prebuilds` prebuilds created, deleted or canceled (or skipped, or failed) by one action."""
        self.actions.labels(kind, outcome, reason).inc(prebuilds)

    def set_oldest_pending_jobs(self, ages: Mapping[str, float]) -> None:
        """The age of each organization's oldest pending prebuild job; organizations gone are dropped."""
        gauge = self.oldest_pending_job_age
        for organization in self._pending_job_organizations - set(ages):
            gauge.remove(organization)
        for organization, age in ages.items():
            gauge.labels(organization).set(age)
        self._pending_job_organizations = set(ages)

    def observe_memberships(self, added: Iterable[str], failures: int) -> None:
        """One pass's memberships step: the kinds of the rows it added (one entry per row), its failures."""
        for kind in added:
            self.memberships_added.labels(kind).inc()
        if failures:
            self.membership_failures.inc(failures)

    def observe_pass(
        self,
        outcome: str,
        duration_seconds: float,
        plan: Plan | None,
        paused: bool | None,
        prepared: PreparedPresets | None = None,
    ) -> None:
        self.passes.labels(outcome).inc()
        self.duration.labels(outcome).observe(duration_seconds)
        self.last_pass.set(time.time())
        if paused is not None:
            self.paused.set(1 if paused else 0)
        if outcome == "success":
            self.last_success.set(time.time())
        if plan is not None:
            self.presets.update_from_plan(plan, prepared)
            self.demand.update_from_plan(plan)
            self.metrics_last_updated.set(time.time())
            self._observe_budget(plan)
        elif outcome == "skipped_lock":
            # Another replica reconciles now: its series are the current ones, ours would go stale.
            self.presets.withdraw()
            self.demand.withdraw()


# Reactions to change events, from a few milliseconds to the seconds of a pass behind a busy lock.
REACTION_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
EVENT_KINDS = ("claim", "job", "template", "preset", "schedule", "settings", "other")


class EventMetrics:
    """Change events (BEHAVIOR.md, "Change events"): what arrived, the targeted passes, the reaction."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.received = Counter(
            "prebuilds_reconciler_events_received",
            "Change notifications received, by the kind of change the platform made.",
            ["kind"],
            registry=registry,
        )
        for kind in EVENT_KINDS:
            self.received.labels(kind)
        self.listening = Gauge(
            "prebuilds_reconciler_events_listening",
            "1 while the daemon listens for change notifications.",
            registry=registry,
        )
        self.reconnects = Counter(
            "prebuilds_reconciler_events_connection_losses",
            "Times the listening connection was lost (each is followed by a full pass once it is back).",
            registry=registry,
        )
        self.targeted_passes = Counter(
            "prebuilds_reconciler_targeted_passes",
            "Targeted passes (the presets of the templates a change named) by outcome.",
            ["outcome"],
            registry=registry,
        )
        for outcome in PASS_OUTCOMES:
            self.targeted_passes.labels(outcome)
        self.targeted_duration = Histogram(
            "prebuilds_reconciler_targeted_pass_duration_seconds",
            "Duration of successful targeted passes.",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.reaction = Histogram(
            "prebuilds_reconciler_event_reaction_seconds",
            "From the arrival of a change notification to the end of the pass that acted on it.",
            buckets=REACTION_BUCKETS,
            registry=registry,
        )
