"""The reads of a pass (`sql/queries/reads.sql`): the pass lock, the pause flag, and the snapshot.

The lifetime totals behind the created/failed/claimed counters are read beside the passes, not in them
(`reconciler.store.totals`). So is the age of the oldest pending prebuild job
(`read_oldest_pending_prebuild_jobs`).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from itertools import repeat
from operator import attrgetter
from uuid import UUID

import asyncpg
import structlog

from reconciler import db, prebuilds_settings
from reconciler.breaker import BreakerObservation, BreakerRecord, BreakerState
from reconciler.demand import WINDOWS_MINUTES, DemandCounts
from reconciler.failed_cleanup import FailedPrebuild
from reconciler.recorded_settings import RecordedSettings
from reconciler.snapshot import (
    Backoff,
    FailedPrebuilds,
    InFlight,
    InProgress,
    PendingNonActive,
    PrebuildStatus,
    Preset,
    PresetDemand,
    PresetFailures,
    PresetNames,
    RunningPrebuild,
    Schedule,
    Snapshot,
    Transition,
    preset_log_fields,
)

logger = structlog.get_logger(__name__)

MILLISECOND = timedelta(milliseconds=1)
# A full snapshot's rows are converted in runs of this many between yields to the event loop.
YIELD_EVERY_ROWS = 5000


def _query(name: str) -> str:
    return db.queries_in("reads.sql")[name]


@dataclass(frozen=True, slots=True)
class SnapshotParameters:
    # The pass's now: the end of the demand windows.
    now: datetime
    lookback_start: datetime
    failure_hard_limit: int
    non_retryable_error_codes: frozenset[str]
    capacity_error_codes: frozenset[str]
    # The start of the breaker's window (now - RECONCILER_BREAKER_WINDOW); None: the breaker is not read.
    breaker_window_start: datetime | None = None
    # The start of the slow start's window (the breaker's); None: the slow start is off and not read.
    slow_start_window_start: datetime | None = None


class BadRowError(Exception):
    """A row written by another component breaks an assumption; the preset it belongs to is skipped."""

    def __init__(self, preset_id: UUID | None, detail: str) -> None:
        super().__init__(detail)
        self.preset_id = preset_id
        self.detail = detail
        # The preset's names as far as its rows could be read, for the log line.
        self.names = PresetNames(preset_id)

    @property
    def consequence(self) -> str:
        return "preset skipped this pass" if self.preset_id else "row ignored"


async def try_reconciliation_lock(connection: db.Connection, idle_limit: timedelta) -> bool:
    """Take the pass lock for this session; False when another replica holds it.

    Until it is released, the server ends the session (and so releases the lock) once it has been idle
    for `idle_limit` (set either way: the pool's reset of a released connection clears it).
    """
    row = await connection.fetchrow(
        _query("try_reconciliation_lock"), db.RECONCILIATION_LOCK_KEY, str(max(int(idle_limit / MILLISECOND), 1))
    )
    assert row is not None
    return bool(row["locked"])


async def release_reconciliation_lock(connection: db.Connection) -> bool:
    """Release the pass lock; False when this session no longer held it."""
    row = await connection.fetchrow(_query("release_reconciliation_lock"), db.RECONCILIATION_LOCK_KEY)
    assert row is not None
    return bool(row["held"])


@dataclass(frozen=True, slots=True)
class TemplateLocks:
    """What `try_template_locks` got: the templates whose lock this session holds now, and the keys to
    release (each key once, whatever the templates that share it), exclusive or shared."""

    granted: frozenset[UUID]
    keys: tuple[int, ...]
    shared: bool = False


async def try_template_locks(
    connection: db.Connection, template_ids: Iterable[UUID], *, shared: bool = False
) -> TemplateLocks:
    """Try each template's session lock once, without waiting (docs/DECISIONS.md, "Targeted passes beside
    full passes"): exclusive for a targeted pass, `shared` for a full pass's writers (which never exclude
    each other); the caller releases them with `release_template_locks`."""
    ids = sorted(set(template_ids))
    if not ids:
        return TemplateLocks(frozenset(), (), shared)
    name = "try_template_locks_shared" if shared else "try_template_locks"
    rows = await connection.fetch(_query(name), db.TEMPLATE_LOCK_CLASS, ids)
    return TemplateLocks(
        frozenset(row["template_id"] for row in rows if row["locked"]),
        tuple(sorted({int(row["key"]) for row in rows if row["locked"]})),
        shared,
    )


async def release_template_locks(connection: db.Connection, locks: TemplateLocks) -> bool:
    """Release the session's template locks; False when some were no longer held."""
    if not locks.keys:
        return True
    name = "release_template_locks_shared" if locks.shared else "release_template_locks"
    held = await connection.fetchval(_query(name), db.TEMPLATE_LOCK_CLASS, list(locks.keys))
    return int(held or 0) == len(locks.keys)


async def try_template_locks_in_transaction(connection: db.Connection, template_ids: Iterable[UUID]) -> frozenset[UUID]:
    """The templates whose lock the caller's transaction now holds, shared, of `template_ids`, tried once
    each (a full pass's status changes)."""
    ids = sorted(set(template_ids))
    if not ids:
        return frozenset()
    rows = await connection.fetch(_query("try_template_locks_in_transaction"), db.TEMPLATE_LOCK_CLASS, ids)
    return frozenset(row["template_id"] for row in rows)


async def limit_idle_session(connection: db.Connection, idle_limit: timedelta | None) -> None:
    """End this session once it idles `idle_limit` (None: the connection's own limit again)."""
    value = "0" if idle_limit is None else str(max(int(idle_limit / MILLISECOND), 1))
    await connection.execute(_query("limit_idle_session"), value)


async def read_prebuilds_settings(connection: db.Connection) -> str | None:
    """The stored `prebuilds_settings` text (None: no row); `reconciler.prebuilds_settings` reads it."""
    value = await connection.fetchval(_query("read_prebuilds_settings"))
    return None if value is None else str(value)


async def read_paused(connection: db.Connection) -> bool:
    """Whether reconciliation is paused. Raises MalformedSettingsError for a value that says neither."""
    return prebuilds_settings.parse(await read_prebuilds_settings(connection)).reconciliation_paused


def _aware(moment: datetime) -> datetime:
    """asyncpg returns `infinity` and `-infinity` timestamptz values as *naive* datetime.max and .min;
    the rest of the code compares aware datetimes, so they are given the UTC zone here."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _aware_or_none(moment: datetime | None) -> datetime | None:
    return None if moment is None else _aware(moment)


def _require(row: asyncpg.Record, columns: Iterable[str]) -> None:
    """Columns the snapshot types cannot do without; another component's schema may not promise them."""
    missing = [column for column in columns if row[column] is None]
    if missing:
        raise ValueError(f"null in {', '.join(missing)}")


_PRESET_REQUIRED = (
    "id",
    "name",
    "template_id",
    "template_name",
    "template_version_id",
    "template_version_name",
    "organization_id",
    "organization_name",
    "desired_instances",
    "scheduling_timezone",
    "prebuild_status",
    "is_active_version",
    "template_deleted",
    "template_deprecated",
    "failure_episode",
)
# The columns of `snapshot_presets`, in its order: read_snapshot unpacks its rows by position (a lookup by
# name costs as much as the rest of the conversion) once it has checked that the statement's columns are
# these; otherwise by name.
_PRESET_COLUMNS = (
    "id",
    "name",
    "template_version_id",
    "template_version_name",
    "template_id",
    "template_name",
    "organization_id",
    "organization_name",
    "desired_instances",
    "invalidate_after_secs",
    "scheduling_timezone",
    "prebuild_status",
    "last_invalidated_at",
    "is_active_version",
    "template_deleted",
    "template_deprecated",
    "failure_episode",
    "prebuild_status_changed_at",
    "desired_instances_expression",
)
# The enum's members by value: a dictionary lookup, where calling the enum costs ten times as much. A value
# it does not hold still goes through the enum, which raises as it always did.
_PREBUILD_STATUSES = {status.value: status for status in PrebuildStatus}


def _preset_from_row(
    row: asyncpg.Record,
    schedules: Sequence[Schedule],
    *,
    by_position: bool = False,
) -> Preset:
    """`by_position`: the row's columns are `_PRESET_COLUMNS`, in that order.

    The ids are not shared between presets (one object per distinct value), though it would make fewer
    objects: measured at fleet L, the cyclic collections after a pass took ~20 ms longer with them."""
    (
        preset_id,
        name,
        version_id,
        version_name,
        template_id,
        template_name,
        organization_id,
        organization_name,
        desired_instances,
        ttl,
        timezone,
        status,
        invalidated,
        is_active_version,
        template_deleted,
        template_deprecated,
        failure_episode,
        changed_at,
        expression,
    ) = row if by_position else tuple(row[column] for column in _PRESET_COLUMNS)
    if (
        preset_id is None
        or name is None
        or template_id is None
        or template_name is None
        or version_id is None
        or version_name is None
        or organization_id is None
        or organization_name is None
        or desired_instances is None
        or timezone is None
        or status is None
        or is_active_version is None
        or template_deleted is None
        or template_deprecated is None
        or failure_episode is None
    ):
        _require(row, _PRESET_REQUIRED)
    return Preset(
        preset_id,
        name,
        template_id,
        template_name,
        version_id,
        version_name,
        organization_id,
        organization_name,
        desired_instances,
        ttl,
        timezone,
        _PREBUILD_STATUSES.get(status) or PrebuildStatus(status),
        invalidated if invalidated is None or invalidated.tzinfo else _aware(invalidated),
        is_active_version,
        template_deleted,
        template_deprecated,
        tuple(schedules),
        failure_episode,
        changed_at if changed_at is None or changed_at.tzinfo else _aware(changed_at),
        expression,
    )


_RUNNING_REQUIRED = ("preset_id", "template_version_id", "workspace_ids", "ready_flags", "created_ats")
_TZINFO = attrgetter("tzinfo")
_NEW_RUNNING_PREBUILD = partial(tuple.__new__, RunningPrebuild)


@dataclass(slots=True)
class _SnapshotRows:
    running: list[RunningPrebuild] = field(default_factory=list)
    in_progress: list[InProgress] = field(default_factory=list)
    pending: list[PendingNonActive] = field(default_factory=list)
    backoffs: list[Backoff] = field(default_factory=list)
    failures: list[PresetFailures] = field(default_factory=list)
    failed: list[FailedPrebuilds] = field(default_factory=list)

    def add(self, row: asyncpg.Record) -> None:
        """Convert one tagged row of `snapshot_prebuilds`; raises ValueError or TypeError on a bad one."""
        kind = row["kind"]
        if kind == "running":
            # The hot path: one row per preset, its running prebuilds as arrays ordered oldest first.
            preset_id, version_id = row["preset_id"], row["template_version_id"]
            workspace_ids, ready_flags, created_ats = row["workspace_ids"], row["ready_flags"], row["created_ats"]
            if (
                preset_id is None
                or version_id is None
                or workspace_ids is None
                or ready_flags is None
                or created_ats is None
            ):
                _require(row, _RUNNING_REQUIRED)
            if not len(workspace_ids) == len(ready_flags) == len(created_ats):
                raise ValueError("running prebuilds: arrays of different lengths")
            if None in workspace_ids or None in ready_flags or None in created_ats:
                nulls = [
                    f"null in {field} of workspace {workspace_id}"
                    for workspace_id, ready, at in zip(workspace_ids, ready_flags, created_ats, strict=True)
                    for field, value in (("workspace_id", workspace_id), ("ready", ready), ("at", at))
                    if value is None
                ]
                raise ValueError("; ".join(nulls))
            count = len(workspace_ids)
            if all(map(_TZINFO, created_ats)):
                # Every time aware (no `infinity`): the tuples are built without a Python call each, tens of
                # thousands of them at fleet size (`tuple.__new__` is what the named tuple's constructor does).
                ids = repeat(preset_id, count), repeat(version_id, count)
                columns = zip(workspace_ids, *ids, ready_flags, created_ats, strict=True)
                self.running.extend(map(_NEW_RUNNING_PREBUILD, columns))
                return
            self.running.extend(
                RunningPrebuild(workspace_id, preset_id, version_id, ready, at if at.tzinfo else _aware(at))
                for workspace_id, ready, at in zip(workspace_ids, ready_flags, created_ats, strict=True)
            )
        elif kind == "in_progress":
            _require(row, ("preset_id", "template_version_id", "in_progress_transition", "in_progress_count"))
            self.in_progress.append(
                InProgress(
                    row["preset_id"],
                    row["template_version_id"],
                    Transition(row["in_progress_transition"]),
                    row["in_progress_count"],
                    oldest_pending_at=_aware_or_none(row["in_progress_oldest_pending_at"]),
                )
            )
        elif kind == "pending":
            _require(row, ("preset_id", "pending_count"))
            self.pending.append(PendingNonActive(row["preset_id"], row["pending_count"]))
        elif kind == "backoff":
            _require(row, ("preset_id", "num_failed", "last_build_at"))
            self.backoffs.append(Backoff(row["preset_id"], row["num_failed"], _aware(row["last_build_at"])))
        elif kind == "failures":
            _require(row, ("preset_id", "failure_streak"))
            self.failures.append(
                PresetFailures(
                    preset_id=row["preset_id"],
                    hard_limited=bool(row["hard_limited"]),
                    validation_failed=bool(row["validation_failed"]),
                    failure_streak=row["failure_streak"],
                    last_error=row["last_error"],
                    last_error_code=row["last_error_code"],
                    last_failed_at=_aware_or_none(row["last_failed_at"]),
                    failed_workspace_ids=tuple(row["failed_workspace_ids"] or ()),
                )
            )
        elif kind == "failed":
            _require(row, ("preset_id", "cleanup_workspace_ids", "cleanup_failed_ats", "cleanup_protected"))
            ids, ats, protected = row["cleanup_workspace_ids"], row["cleanup_failed_ats"], row["cleanup_protected"]
            if not len(ids) == len(ats) == len(protected) or None in ids or None in ats:
                raise ValueError("failed prebuilds: arrays of different lengths, or a null")
            self.failed.append(
                FailedPrebuilds(
                    row["preset_id"],
                    tuple(
                        FailedPrebuild(workspace_id, _aware(at), bool(flag))
                        for workspace_id, at, flag in zip(ids, ats, protected, strict=True)
                    ),
                )
            )
        else:
            raise ValueError(f"unknown row kind {kind!r}")


def _names(preset_id: UUID | None, row: asyncpg.Record | None) -> PresetNames:
    """What a preset's row says of its names, even when the row could not become a `Preset`."""
    if row is None:
        return PresetNames(preset_id)
    return PresetNames(
        preset_id, row["name"], row["template_name"], row["template_version_name"], row["organization_name"]
    )


def _bad_row(preset_id: UUID | None, what: str, error: Exception) -> BadRowError:
    return BadRowError(preset_id, f"{what}: {type(error).__name__}: {error}")


async def read_snapshot(
    connection: db.Connection,
    parameters: SnapshotParameters,
    *,
    bad_rows: list[BadRowError] | None = None,
    template_ids: Sequence[UUID] | None = None,
) -> Snapshot:
    """Read a pass's snapshot: five statements, whatever the number of presets.

    With `template_ids`, a targeted pass's: the same statements restricted to the presets of those
    templates (their `_targeted` variants, see sql/queries/reads.sql); None reads every preset.

    The caller runs this inside a REPEATABLE READ transaction so that the statements agree.

    Other components write these tables, and a newer one may write values this code does not know (an
    enum value added by its migration, a null where ours has none). Such a row must not fail the pass:
    it is reported (appended to `bad_rows` when given, for the caller to log; else logged here as
    `snapshot.bad_row`), and the preset
    it belongs to is left out of this snapshot whole, because its counts would be wrong without the row.
    Every other preset goes on.
    """
    problems: list[BadRowError] = []
    suffix, targets = ("", ()) if template_ids is None else ("_targeted", (list(template_ids),))
    schedules: dict[UUID, list[Schedule]] = defaultdict(list)
    for row in await connection.fetch(_query("snapshot_schedules" + suffix), *targets):
        schedules[row["preset_id"]].append(Schedule(row["cron_expression"], row["desired_instances"]))
    presets: list[Preset] = []
    names: dict[UUID, asyncpg.Record] = {}
    converted = _SnapshotRows()
    preset_rows = await connection.fetch(_query("snapshot_presets" + suffix), *targets)
    by_position = bool(preset_rows) and tuple(preset_rows[0].keys()) == _PRESET_COLUMNS
    for row in preset_rows:
        names[row["id"]] = row
        try:
            presets.append(_preset_from_row(row, schedules.get(row["id"], ()), by_position=by_position))
        except (ValueError, TypeError) as error:
            problems.append(_bad_row(row["id"], "preset", error))
    rows = await connection.fetch(
        _query("snapshot_prebuilds" + suffix),
        parameters.lookback_start,
        parameters.failure_hard_limit,
        sorted(parameters.non_retryable_error_codes),
        sorted(parameters.capacity_error_codes),
        *targets,
    )
    # The in-flight budget's use. Every job counts, a bad preset's too: they occupy provisioners all the same.
    in_flight = tuple(
        InFlight(row["template_id"], row["jobs"])
        for row in await connection.fetch(_query("snapshot_in_flight"))
        if row["template_id"] is not None
    )
    breaker, observation = BreakerRecord(), BreakerObservation()
    if parameters.breaker_window_start is not None:
        breaker, observation = await read_breaker(connection, parameters.breaker_window_start)
    creates_in_flight, create_succeeded_recently = 0, True
    if parameters.slow_start_window_start is not None:
        creates_in_flight = await count_prebuild_creates_in_flight(connection)
        create_succeeded_recently = bool(
            await connection.fetchval(_query("prebuild_create_succeeded_since"), parameters.slow_start_window_start)
        )
    for index, row in enumerate(rows):
        if index % YIELD_EVERY_ROWS == YIELD_EVERY_ROWS - 1:
            # Tens of thousands of rows at fleet L: let the event loop run a targeted pass meanwhile.
            await asyncio.sleep(0)
        try:
            converted.add(row)
        except (ValueError, TypeError) as error:
            subject = f"{row['kind']} row"
            problems.append(_bad_row(row["preset_id"], subject, error))
    demand = [
        _demand_from_row(row)
        for row in await connection.fetch(_query("snapshot_demand" + suffix), parameters.now, *targets)
    ]
    bad_preset_ids = {problem.preset_id for problem in problems}
    for problem in problems:
        preset_row = names.get(problem.preset_id) if problem.preset_id is not None else None
        problem.names = _names(problem.preset_id, preset_row)
    if bad_rows is not None:
        # The caller logs them (the daemon once per change, with its problem log).
        bad_rows.extend(problems)
    else:
        for problem in problems:
            logger.warning(
                "snapshot.bad_row",
                **preset_log_fields(problem.names),
                detail=problem.detail,
                consequence=problem.consequence,
            )

    def keep(preset_id: UUID) -> bool:
        return preset_id not in bad_preset_ids

    failures = [failure for failure in converted.failures if keep(failure.preset_id)]
    # Tens of thousands of running rows: filtered only when some preset has to be left out.
    running = (
        tuple(prebuild for prebuild in converted.running if keep(prebuild.preset_id))
        if bad_preset_ids
        else tuple(converted.running)
    )
    return Snapshot(
        presets=tuple(preset for preset in presets if keep(preset.id)),
        running=running,
        in_progress=tuple(row for row in converted.in_progress if keep(row.preset_id)),
        pending_non_active=tuple(row for row in converted.pending if keep(row.preset_id)),
        backoffs=tuple(row for row in converted.backoffs if keep(row.preset_id)),
        in_flight=in_flight,
        breaker=breaker,
        breaker_observation=observation,
        creates_in_flight=creates_in_flight,
        create_succeeded_recently=create_succeeded_recently,
        hard_limited_preset_ids=frozenset(f.preset_id for f in failures if f.hard_limited),
        validation_failed_preset_ids=frozenset(f.preset_id for f in failures if f.validation_failed),
        failures=tuple(failures),
        failed_prebuilds=tuple(row for row in converted.failed if keep(row.preset_id)),
        demand=tuple(row for row in demand if keep(row.preset_id)),
    )


def _demand_from_row(row: asyncpg.Record) -> PresetDemand:
    # Counts of our own statement: never null (coalesce, count, exists).
    return PresetDemand(
        row["preset_id"],
        DemandCounts(
            claims=tuple(row[f"claims_{minutes}m"] for minutes in WINDOWS_MINUTES),
            misses=tuple(row[f"misses_{minutes}m"] for minutes in WINDOWS_MINUTES),
            claims_next_60m_last_week=row["claims_next_60m_last_week"],
            misses_next_60m_last_week=row["misses_next_60m_last_week"],
            has_history=row["has_history"],
        ),
    )


async def count_prebuild_creates_in_flight(connection: db.Connection) -> int:
    """Prebuild creates pending or running, for the slow start (`count_prebuild_creates_in_flight`)."""
    return int(await connection.fetchval(_query("count_prebuild_creates_in_flight")))


async def read_breaker(connection: db.Connection, window_start: datetime) -> tuple[BreakerRecord, BreakerObservation]:
    """The breaker's row, its current episode and its evidence (`snapshot_breaker`)."""
    row = await connection.fetchrow(_query("snapshot_breaker"), window_start)
    if row is None:
        # The row is the migration's; without it the breaker is simply closed.
        return BreakerRecord(), BreakerObservation()
    record = BreakerRecord(
        state=BreakerState(row["state"]),
        episode=row["episode"],
        changed_at=_aware_or_none(row["changed_at"]),
        open_until=_aware_or_none(row["open_until"]),
        open_duration=row["open_duration"],
        opened_at=_aware_or_none(row["opened_at"]),
        failures_since=_aware_or_none(row["failures_since"]),
    )
    observation = BreakerObservation(
        completed=row["completed"],
        failed=row["failed"],
        failed_presets=row["failed_presets"],
        probes_succeeded=row["probes_succeeded"],
        probes_failed=row["probes_failed"],
        probes_in_flight=row["probes_in_flight"],
    )
    return record, observation


async def read_recorded_settings(connection: db.Connection) -> RecordedSettings | None:
    """The behaviour settings the daemon's last pass recorded; None before any pass."""
    row = await connection.fetchrow(_query("read_recorded_settings"))
    if row is None:
        return None
    return RecordedSettings.from_text(
        row["settings"], row["instance"], _aware(row["recorded_at"]), _aware(row["last_pass_at"])
    )


async def read_oldest_pending_prebuild_jobs(connection: db.Connection, now: datetime) -> dict[str, float]:
    """Per organization name, the age at `now` in seconds of its oldest unstarted prebuild job (0: none)."""
    rows = await connection.fetch(_query("oldest_pending_prebuild_jobs"), now)
    return {row["organization_name"]: row["age_seconds"] for row in rows}


async def read_preset_demand(connection: db.Connection, preset_id: UUID, now: datetime) -> DemandCounts:
    """One preset's demand windows at `now`, expression or not (`presets check-expression EXPR PRESET`)."""
    row = await connection.fetchrow(_query("snapshot_demand_one_preset"), now, preset_id)
    return _demand_from_row(row).counts if row is not None else DemandCounts()
