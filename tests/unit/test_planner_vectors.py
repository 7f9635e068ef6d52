"""The 86 planner cases of `tests/vectors/planner-scenarios.json` against our pure planner.

The cases speak a small vocabulary of their own (see the vectors' README); `Adapter` turns it into our
snapshot types. Where a case contradicts a rule of ours (docs/BEHAVIOR.md "Ours:"), `OURS` says why and what
we assert instead.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from reconciler import planner, schedule
from reconciler.plan import (
    Action,
    BackoffAction,
    CancelPendingAction,
    CreateAction,
    CreateBlock,
    DeleteAction,
    PresetPlan,
)
from reconciler.snapshot import (
    Backoff,
    InProgress,
    PendingNonActive,
    PrebuildStatus,
    Preset,
    RunningPrebuild,
    Schedule,
    Snapshot,
    Transition,
)

VECTORS_FILE = Path(__file__).resolve().parents[1] / "vectors" / "planner-scenarios.json"


CASES: list[dict[str, Any]] = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))
# Any fixed instant will do for "T0".
T0 = datetime(2025, 1, 15, 12, 0, 0, tzinfo=UTC)
# Coder's zero time, for rows whose creation time the case leaves out.
ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)

# Cases that contradict a rule of ours, with the reason. The test asserts our rule instead.
OURS = {
    "PS-083": "Ours: a hard-limited active preset's creates are withheld by the planner itself (create_blocked, "
    "creates_withheld = the count Coder's planner would emit), so `plan --json` never shows a create that "
    "the executor would then skip.",
}


def key(name: str) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"vector:{name}")


def instant(value: str) -> datetime:
    return T0 if value == "T0" else datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass
class Adapter:
    now: datetime

    def offset(self, seconds: float | None) -> datetime:
        return ZERO_TIME if seconds is None else self.now + timedelta(seconds=seconds)

    def preset(self, data: dict[str, Any]) -> Preset:
        last_invalidated = data.get("last_invalidated_at_offset_s")
        return Preset(
            id=key(data["id"]),
            name=data["id"],
            template_id=key(data["template_id"]),
            template_name=data["template_id"],
            template_version_id=key(data["template_version_id"]),
            template_version_name=data["template_version_id"],
            organization_id=key("org"),
            organization_name="org",
            # A preset without prebuilds never reaches the planner; the skip cases use one as "inactive".
            desired_instances=data["desired_instances"] or 0,
            invalidate_after_secs=data.get("ttl_s"),
            scheduling_timezone=data.get("scheduling_timezone", ""),
            prebuild_status=PrebuildStatus(data.get("prebuild_status", "normal")),
            last_invalidated_at=None if last_invalidated is None else self.offset(last_invalidated),
            is_active_version=data["active"],
            template_deleted=data["template_deleted"],
            template_deprecated=data["template_deprecated"],
            schedules=tuple(Schedule(row["cron"], row["instances"]) for row in data.get("schedules", [])),
        )

    def running(self, data: dict[str, Any]) -> RunningPrebuild:
        return RunningPrebuild(
            workspace_id=key(data["id"]),
            preset_id=key(data["preset_id"]),
            template_version_id=key(data["template_version_id"]),
            ready=data["ready"],
            created_at=self.offset(data["created_at_offset_s"]),
        )

    def in_progress(self, data: dict[str, Any]) -> InProgress:
        return InProgress(
            preset_id=key(data["preset_id"]),
            template_version_id=key(data["template_version_id"]),
            transition=Transition(data["transition"]),
            count=data["count"],
        )

    def backoff(self, preset_id: str, data: dict[str, Any]) -> Backoff:
        return Backoff(key(preset_id), data["num_failed"], self.offset(data["last_build_at_offset_s"]))

    def snapshot(self, setup: dict[str, Any]) -> Snapshot:
        return Snapshot(
            presets=tuple(self.preset(preset) for preset in setup["presets"]),
            running=tuple(self.running(row) for row in setup["running"]),
            in_progress=tuple(self.in_progress(row) for row in setup["in_progress"]),
            pending_non_active=tuple(
                PendingNonActive(key(row["preset_id"]), row["count"]) for row in setup["pending_non_active"]
            ),
            backoffs=tuple(self.backoff(row["preset_id"], row) for row in setup["backoffs"]),
            hard_limited_preset_ids=frozenset(key(name) for name in setup["hard_limited_preset_ids"]),
        )


def config(setup: dict[str, Any]) -> planner.PlannerConfig:
    return planner.PlannerConfig(backoff_interval=timedelta(seconds=setup["config"]["backoff_interval_s"]))


def assert_actions(actual: tuple[Action, ...], expected: list[dict[str, Any]], origin: datetime) -> None:
    assert [action.type for action in actual] == [item["type"] for item in expected], actual
    for action, item in zip(actual, expected, strict=True):
        if isinstance(action, CreateAction):
            assert action.count == item["count"]
        elif isinstance(action, DeleteAction):
            if item.get("ids") is None:
                assert len(action.workspace_ids) == item["count"]
            else:
                assert list(action.workspace_ids) == [key(name) for name in item["ids"]]
        elif isinstance(action, BackoffAction):
            assert action.until == origin + timedelta(seconds=item["until_offset_s"])
        else:
            assert isinstance(action, CancelPendingAction)
            assert action.count > 0


def assert_state(preset_plan: PresetPlan, expected: dict[str, int] | None) -> None:
    if expected is None:
        return
    state = preset_plan.state
    assert {name: getattr(state, name) for name in expected} == expected


def by_kind(kind: str) -> list[Any]:
    return [pytest.param(case, id=case["id"]) for case in CASES if case["kind"] == kind]


def test_every_case_is_run() -> None:
    kinds = {"preset_reconcile", "desired_instances", "cron_matches", "cron_within_range", "can_skip"}
    assert len(CASES) == 86
    assert {case["kind"] for case in CASES} == kinds


@pytest.mark.parametrize("case", by_kind("preset_reconcile"))
def test_preset_reconcile(case: dict[str, Any]) -> None:
    setup = case["setup"]
    origin = instant(setup["now"])
    steps = case["expect"].get("steps") or [{"advance_clock_s": 0, "presets": case["expect"]["presets"]}]
    for step in steps:
        now = origin + timedelta(seconds=step["advance_clock_s"])
        # Offsets in the setup stay relative to the original instant.
        snapshot = Adapter(origin).snapshot(setup)
        plan = planner.plan(snapshot, config(setup), now)
        plans = {preset_plan.preset.name: preset_plan for preset_plan in plan.presets}
        for preset_name, expected in step["presets"].items():
            assert_state(plans[preset_name], expected["state"])
            assert_actions(plans[preset_name].actions, expected["actions"], origin)


@pytest.mark.parametrize("case", by_kind("desired_instances"))
def test_desired_instances(case: dict[str, Any]) -> None:
    at = instant(case["setup"]["at"])
    preset = Adapter(at).preset(case["setup"]["preset"])
    preset_plan, problems = planner.plan_preset(preset, planner.PresetInputs(), planner.PlannerConfig(), at)
    assert preset_plan.state.desired == case["expect"]["desired"]
    assert problems == []


def within_range(expression: str, moment: datetime) -> bool:
    """Whether the cron expression, read as a time range, contains `moment` (in UTC)."""
    return schedule.parse_time_range(expression).contains(moment.astimezone(schedule.zone("UTC")))


@pytest.mark.parametrize("case", by_kind("cron_matches") + by_kind("cron_within_range"))
def test_cron_time_ranges(case: dict[str, Any]) -> None:
    spec, at = case["setup"]["spec"], instant(case["setup"]["at"])
    expected = case["expect"].get("matches", case["expect"].get("within_range"))
    error = case["expect"].get("error_contains")
    if error:
        with pytest.raises(schedule.ScheduleError, match=error.replace("(", r"\(").replace(")", r"\)")):
            within_range(spec, at)
    else:
        assert within_range(spec, at) is expected


@pytest.mark.parametrize("case", by_kind("can_skip"))
def test_can_skip(case: dict[str, Any]) -> None:
    setup = case["setup"]
    now = instant(setup["now"])
    adapter = Adapter(now)
    preset = adapter.preset(setup["preset"])
    inputs = planner.PresetInputs(
        running=tuple(adapter.running(row) for row in setup["running"] + setup["expired"]),
        in_progress=tuple(adapter.in_progress(row) for row in setup["in_progress"]),
        pending_non_active=setup["pending_count"],
        backoff=adapter.backoff(setup["preset"]["id"], setup["backoff"]) if setup["backoff"] else None,
        at_hard_limit=setup["is_hard_limited"],
    )
    preset_plan, _ = planner.plan_preset(preset, inputs, config(setup), now)
    expected = case["expect"]
    assert preset_plan.skipped is expected["can_skip"]
    if case["id"] in OURS:
        create = next(item for item in expected["actions_per_code"] if item["type"] == "create")
        assert preset_plan.actions == ()
        assert preset_plan.create_blocked is CreateBlock.HARD_LIMITED
        assert preset_plan.creates_withheld == create["count"]
        return
    assert (not preset_plan.actions) is expected["actions_noop"]
    assert_actions(preset_plan.actions, expected["actions_per_code"], now)
