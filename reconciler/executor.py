"""Turns a plan's actions into writes, preset by preset, through `store/writes.py`.

Presets are independent: they run concurrently up to a bound (so a pass cannot exhaust the pool), and an
error on one preset is logged and counted while the others go on. Each action is one transaction.
"""

from __future__ import annotations

import asyncio
import enum
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

import asyncpg
import structlog

from reconciler import db, schedule
from reconciler.plan import (
    BackoffAction,
    CancelPendingAction,
    CreateAction,
    DeleteAction,
    Plan,
    PresetPlan,
)
from reconciler.snapshot import PrebuildStatus
from reconciler.store import writes

logger = structlog.get_logger(__name__)


class ActionOutcome(enum.StrEnum):
    SUCCESS = "success"
    ERROR = "error"
    SKIPPED = "skipped"


@dataclass
class ExecutionSummary:
    created: int = 0
    deleted: int = 0
    canceled: int = 0
    # Creates withheld at write time by the fresh clamp, and deletes refused (claimed meanwhile).
    creates_clamped: int = 0
    deletes_skipped: int = 0
    presets_failed: int = 0
    # (kind, outcome) -> number of actions, for the actions metric.
    actions: Counter[tuple[str, ActionOutcome]] = field(default_factory=Counter)
    failed_preset_ids: list[UUID] = field(default_factory=list)


# Observes each action as it completes: (kind, outcome, number of rows). The daemon counts metrics with it.
ActionObserver = Callable[[str, ActionOutcome, int], None]


async def _create(
    connection: db.Connection, preset_plan: PresetPlan, action: CreateAction, now: datetime
) -> tuple[int, int]:
    """Create up to `action.count` prebuilds atomically; returns (created, clamped away)."""
    preset = preset_plan.preset
    async with connection.transaction():
        check = await writes.lock_preset_for_create(connection, preset.id)
        if (
            check is None
            or check.desired_instances is None
            or not check.active
            or check.prebuild_status is not PrebuildStatus.NORMAL
        ):
            return 0, action.count
        # Clamp to a target computed now from the preset's current desired count and schedules (a schedule
        # that covers `now` still decides), never above the plan's: a lowered desired count, or schedules
        # replaced after the snapshot, clamp the creates decided from the snapshot.
        fresh = schedule.target(check.desired_instances, check.schedules, check.scheduling_timezone, now)
        target = min(preset_plan.state.desired, fresh.instances)
        existing = await writes.count_preset_prebuilds(connection, preset.id, check.template_id)
        count = max(min(action.count, target - existing), 0)
        if count == 0:
            return 0, action.count
        created = await writes.create_prebuilds(
            connection,
            preset_id=preset.id,
            template_version_id=preset.template_version_id,
            template_id=check.template_id,
            organization_id=check.organization_id,
            count=count,
            now=now,
        )
        return len(created), action.count - len(created)


async def _delete(connection: db.Connection, action: DeleteAction, now: datetime) -> int:
    async with connection.transaction():
        deleted = await writes.delete_prebuilds(connection, action.workspace_ids, now)
    return len(deleted)


async def _cancel(connection: db.Connection, preset_plan: PresetPlan, now: datetime) -> int:
    async with connection.transaction():
        canceled = await writes.cancel_pending_prebuilds(connection, preset_plan.preset.id, now)
    return len(canceled)


async def execute_preset(
    connection: db.Connection,
    preset_plan: PresetPlan,
    now: datetime,
    summary: ExecutionSummary,
    observe: ActionObserver | None = None,
) -> None:
    """Run one preset's actions in order. Raises on the first failing action; earlier ones stay done."""

    preset = preset_plan.preset

    def record(kind: str, outcome: ActionOutcome, rows: int, **details: object) -> None:
        summary.actions[(kind, outcome)] += 1
        if observe is not None:
            observe(kind, outcome, rows)
        if outcome is not ActionOutcome.ERROR:
            # One line per preset and action: what was written, and what was planned but not done.
            logger.info(
                f"prebuilds.{kind}",
                outcome=outcome.value,
                rows=rows,
                preset_id=str(preset.id),
                preset_name=preset.name,
                template_name=preset.template_name,
                template_version_name=preset.template_version_name,
                **details,
            )

    for action in preset_plan.actions:
        try:
            if isinstance(action, BackoffAction):
                continue
            if isinstance(action, CancelPendingAction):
                canceled = await _cancel(connection, preset_plan, now)
                summary.canceled += canceled
                record("cancel_pending", ActionOutcome.SUCCESS, canceled, planned=action.count)
            elif isinstance(action, DeleteAction):
                deleted = await _delete(connection, action, now)
                summary.deleted += deleted
                summary.deletes_skipped += len(action.workspace_ids) - deleted
                record(
                    "delete",
                    ActionOutcome.SUCCESS if deleted else ActionOutcome.SKIPPED,
                    deleted,
                    planned=len(action.workspace_ids),
                    reason=action.reason.value,
                )
            elif isinstance(action, CreateAction):
                created, clamped = await _create(connection, preset_plan, action, now)
                summary.created += created
                summary.creates_clamped += clamped
                record(
                    "create",
                    ActionOutcome.SUCCESS if created else ActionOutcome.SKIPPED,
                    created,
                    planned=action.count,
                    clamped=clamped,
                )
        except Exception:
            record(action.type, ActionOutcome.ERROR, 0)
            raise


async def execute(
    pool: asyncpg.Pool,
    plan: Plan,
    now: datetime,
    *,
    concurrency: int = 8,
    observe: ActionObserver | None = None,
) -> ExecutionSummary:
    summary = ExecutionSummary()
    semaphore = asyncio.Semaphore(concurrency)

    async def run(preset_plan: PresetPlan) -> None:
        preset = preset_plan.preset
        async with semaphore:
            try:
                async with pool.acquire() as connection:
                    await execute_preset(connection, preset_plan, now, summary, observe)
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as error:
                summary.presets_failed += 1
                summary.failed_preset_ids.append(preset.id)
                logger.error(
                    "reconcile.preset_failed",
                    preset_id=str(preset.id),
                    preset_name=preset.name,
                    template_name=preset.template_name,
                    template_version_name=preset.template_version_name,
                    organization_name=preset.organization_name,
                    error=f"{type(error).__name__}: {error}",
                )

    work = [preset_plan for preset_plan in plan.presets if _has_writes(preset_plan)]
    await asyncio.gather(*(run(preset_plan) for preset_plan in work))
    return summary


def _has_writes(preset_plan: PresetPlan) -> bool:
    return any(not isinstance(action, BackoffAction) for action in preset_plan.actions)
