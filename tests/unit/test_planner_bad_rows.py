"""The pure planner against rows another component got wrong (issue 12, points 3 and 5).

- An invalidation time far in the future is ignored (reported as a problem), not obeyed: obeyed, it
  expires every new prebuild the moment it exists, for ever with `infinity`. Within the clock-skew
  tolerance it is obeyed, as Coder does.
- Whatever one preset holds, planning it never raises out of `plan`: an unexpected exception leaves that
  preset alone out of the plan, with a `preset.plan_failed` problem.
- Plan problems are logged once per change (reconciler.problem_log), which needs a problem to be the same
  on every pass for the same rows.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler import planner
from reconciler.plan import CreateAction, DeleteAction, DeleteReason, PlanProblem
from reconciler.problem_log import ProblemLog, changes
from reconciler.snapshot import PrebuildStatus, Preset, RunningPrebuild, Schedule, Snapshot

NOW = datetime(2026, 1, 5, 12, tzinfo=UTC)
CONFIG = planner.PlannerConfig(backoff_interval=timedelta(minutes=1), max_desired_instances=100)
INFINITY = datetime.max.replace(tzinfo=UTC)


def make_preset(number: int, **changes: object) -> Preset:
    preset = Preset(
        id=uuid.UUID(int=number),
        name=f"preset-{number}",
        template_id=uuid.UUID(int=1000 + number),
        template_name="template",
        template_version_id=uuid.UUID(int=2000 + number),
        template_version_name="v1",
        organization_id=uuid.UUID(int=3000),
        organization_name="org",
        desired_instances=2,
        invalidate_after_secs=None,
        scheduling_timezone="",
        prebuild_status=PrebuildStatus.NORMAL,
        last_invalidated_at=None,
        is_active_version=True,
        template_deleted=False,
        template_deprecated=False,
    )
    return dataclasses.replace(preset, **changes)  # type: ignore[arg-type]  # the fields vary per test


def running(preset: Preset, number: int, created_at: datetime) -> RunningPrebuild:
    return RunningPrebuild(uuid.UUID(int=10_000 + number), preset.id, preset.template_version_id, True, created_at)


# --- invalidation in the future -------------------------------------------------------------------


def test_an_invalidation_within_the_tolerance_is_obeyed_as_coder_does() -> None:
    # +60 s, as the shared vectors PS-024 and PS-025 have it, and exactly at the tolerance.
    for ahead in (timedelta(seconds=60), planner.INVALIDATION_CLOCK_SKEW):
        preset = make_preset(1, last_invalidated_at=NOW + ahead)
        old, new = running(preset, 1, NOW - timedelta(hours=1)), running(preset, 2, NOW - timedelta(seconds=1))
        plan = planner.plan(Snapshot(presets=(preset,), running=(old, new)), CONFIG, NOW)

        (preset_plan,) = plan.presets
        assert preset_plan.state.expired == 2
        assert preset_plan.actions == (
            DeleteAction((old.workspace_id, new.workspace_id), DeleteReason.INVALIDATED),
            CreateAction(count=2),
        )
        assert plan.problems == ()


def test_an_invalidation_beyond_the_tolerance_is_ignored_and_reported() -> None:
    for invalidated in (NOW + planner.INVALIDATION_CLOCK_SKEW + timedelta(microseconds=1), INFINITY):
        preset = make_preset(1, last_invalidated_at=invalidated)
        fresh = running(preset, 1, NOW - timedelta(seconds=5))
        plan = planner.plan(Snapshot(presets=(preset,), running=(fresh,)), CONFIG, NOW)

        (preset_plan,) = plan.presets
        assert preset_plan.state.expired == 0
        assert preset_plan.actions == (CreateAction(count=1),)
        (problem,) = plan.problems
        assert problem.preset_id == preset.id
        assert problem.event == "preset.invalidation_ignored"
        assert "more than 120 s in the future" in problem.detail
    assert "last_invalidated_at infinity " in problem.detail


def test_the_time_to_live_still_applies_when_the_invalidation_is_ignored() -> None:
    preset = make_preset(1, last_invalidated_at=INFINITY, invalidate_after_secs=60)
    old, young = running(preset, 1, NOW - timedelta(seconds=61)), running(preset, 2, NOW - timedelta(seconds=59))
    (preset_plan,) = planner.plan(Snapshot(presets=(preset,), running=(old, young)), CONFIG, NOW).presets
    assert preset_plan.actions[0] == DeleteAction((old.workspace_id,), DeleteReason.EXPIRED)


def test_an_ignored_invalidation_counts_once_it_is_near_enough() -> None:
    """Ignored is deferred, not lost: from `invalidated - tolerance` on, what was built before it expires."""
    invalidated = NOW + timedelta(minutes=10)
    preset = make_preset(1, last_invalidated_at=invalidated)
    built = running(preset, 1, NOW)
    snapshot = Snapshot(presets=(preset,), running=(built,))

    still_ignored = planner.plan(snapshot, CONFIG, invalidated - planner.INVALIDATION_CLOCK_SKEW - timedelta(seconds=1))
    assert still_ignored.presets[0].state.expired == 0
    obeyed = planner.plan(snapshot, CONFIG, invalidated - planner.INVALIDATION_CLOCK_SKEW)
    assert obeyed.presets[0].state.expired == 1
    assert obeyed.problems == ()


def test_the_problem_is_the_same_on_every_pass_so_that_it_is_logged_once() -> None:
    preset = make_preset(1, last_invalidated_at=NOW + timedelta(days=365))
    snapshot = Snapshot(presets=(preset,))
    passes = [planner.plan(snapshot, CONFIG, NOW + timedelta(minutes=minute)) for minute in range(5)]
    assert len({plan.problems for plan in passes}) == 1

    log = ProblemLog()
    logged = [log.update(plan.problems).appeared for plan in passes]
    assert logged == [passes[0].problems, (), (), (), ()]


# --- a preset the planner fails on ----------------------------------------------------------------


def test_a_preset_the_planner_fails_on_is_left_out_and_the_others_are_planned() -> None:
    before, after = make_preset(1), make_preset(3)
    # A value of the wrong type, as a bug elsewhere (or a newer store) would hand over.
    broken = make_preset(2, desired_instances="2")
    plan = planner.plan(Snapshot(presets=(before, broken, after)), CONFIG, NOW)

    assert [preset_plan.preset.id for preset_plan in plan.presets] == [before.id, after.id]
    assert all(preset_plan.actions == (CreateAction(count=2),) for preset_plan in plan.presets)
    (problem,) = plan.problems
    assert problem.preset_id == broken.id
    assert problem.event == planner.PLAN_FAILED
    assert problem.detail.startswith("TypeError: ")
    assert problem.detail.endswith("; preset left out of this plan")
    assert problem.traceback is not None
    assert "planner.py" in problem.traceback
    assert "in plan_preset" in problem.traceback


def test_a_long_error_message_is_cut_short() -> None:
    broken = make_preset(1, desired_instances="x" * 100_000)
    (problem,) = planner.plan(Snapshot(presets=(broken,)), CONFIG, NOW).problems
    assert problem.event == planner.PLAN_FAILED
    assert len(problem.detail) < 400


# --- any value of the right type ------------------------------------------------------------------

INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
TIMESTAMPS = st.datetimes(timezones=st.just(UTC)) | st.just(INFINITY) | st.just(datetime.min.replace(tzinfo=UTC))


@st.composite
def hostile_presets(draw: st.DrawFn, number: int) -> Preset:
    return make_preset(
        number,
        name=draw(st.text()),
        template_name=draw(st.text()),
        desired_instances=draw(INT32),
        invalidate_after_secs=draw(st.none() | INT32),
        scheduling_timezone=draw(st.text(max_size=400)),
        last_invalidated_at=draw(st.none() | TIMESTAMPS),
        schedules=tuple(
            Schedule(draw(st.text(max_size=50)), draw(INT32))
            for _ in range(draw(st.integers(min_value=0, max_value=3)))
        ),
        is_active_version=draw(st.booleans()),
    )


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_no_value_of_the_right_type_makes_the_planner_fail(data: st.DataObject) -> None:
    """The guard is the last resort, not the plan: every typed value is handled by the rules themselves."""
    presets = tuple(data.draw(hostile_presets(number)) for number in range(1, 4))
    prebuilds = tuple(
        running(presets[index % 3], index, data.draw(TIMESTAMPS)) for index in range(data.draw(st.integers(0, 6)))
    )
    plan = planner.plan(Snapshot(presets=presets, running=prebuilds), CONFIG, NOW)

    assert [problem for problem in plan.problems if problem.event == planner.PLAN_FAILED] == []
    assert len(plan.presets) == 3
    for preset_plan in plan.presets:
        state = preset_plan.state
        assert 0 <= state.desired <= CONFIG.max_desired_instances
        assert 0 <= state.extraneous <= state.actual
        assert 0 <= state.expired <= state.actual


# --- logging problems once per change ----------------------------------------------------------------


def problem(number: int, detail: str = "d") -> PlanProblem:
    return PlanProblem(uuid.UUID(int=number), "preset.schedule_ignored", detail)


def test_changes_are_what_appeared_and_what_cleared_in_plan_order() -> None:
    assert changes((), [problem(1), problem(2)]).appeared == (problem(1), problem(2))
    found = changes([problem(1), problem(2)], [problem(2), problem(3), problem(3)])
    assert found.appeared == (problem(3),)
    assert found.cleared == (problem(1),)
    # Another detail is another problem: the old one cleared, the new one appeared.
    found = changes([problem(1, "cron a")], [problem(1, "cron b")])
    assert (found.appeared, found.cleared) == ((problem(1, "cron b"),), (problem(1, "cron a"),))


def test_the_traceback_is_not_part_of_a_problems_identity() -> None:
    first = PlanProblem(uuid.UUID(int=1), planner.PLAN_FAILED, "TypeError: x", traceback="a.py:1 in f")
    again = PlanProblem(uuid.UUID(int=1), planner.PLAN_FAILED, "TypeError: x", traceback="a.py:2 in f")
    assert changes([first], [again]).appeared == ()


def test_the_log_remembers_what_it_reported_across_passes() -> None:
    log = ProblemLog()
    assert log.update([problem(1)]).appeared == (problem(1),)
    assert log.update([problem(1)]).appeared == ()
    cleared = log.update([])
    assert cleared.cleared == (problem(1),)
    assert log.reported == ()
    # Back again after it cleared: logged again.
    assert log.update([problem(1)]).appeared == (problem(1),)
