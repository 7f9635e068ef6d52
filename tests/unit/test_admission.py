"""The in-flight budget's admission (issue 15 point 1): deletes first, creates shared by relative deficit."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.admission import DELETE_CLASSES, Admission, Budget, HoldReason, Wants, admit

TEMPLATE_A = uuid.UUID(int=0xA)
TEMPLATE_B = uuid.UUID(int=0xB)


def preset(index: int) -> uuid.UUID:
    return uuid.UUID(int=1000 + index)


def wants(index: int, *, creates: int = 0, desired: int = 1, template: uuid.UUID = TEMPLATE_A, **deletes: int) -> Wants:
    return Wants(preset_id=preset(index), template_id=template, desired=desired, creates=creates, deletes=deletes)


def test_without_a_budget_everything_is_admitted() -> None:
    wanted = [wants(1, creates=40, desired=40, expired=3), wants(2, creates=1, extraneous=2)]
    admission = admit(wanted, Budget(), in_flight=10_000, in_flight_by_template={TEMPLATE_A: 10_000})
    assert admission.presets[preset(1)].creates == 40
    assert admission.presets[preset(1)].deletes == {"expired": 3}
    assert admission.presets[preset(2)].deletes == {"extraneous": 2}
    assert admission.creates_held == admission.deletes_held == 0


def test_jobs_in_flight_count_whoever_started_them() -> None:
    admission = admit([wants(1, creates=5, desired=5)], Budget(max_in_flight=8), 6, {TEMPLATE_A: 6})
    assert admission.presets[preset(1)].creates == 2
    assert admission.presets[preset(1)].creates_held == 3
    assert admission.presets[preset(1)].creates_held_by is HoldReason.MAX_IN_FLIGHT


def test_over_budget_already_admits_nothing() -> None:
    admission = admit([wants(1, creates=5, expired=1)], Budget(max_in_flight=3), 7, {TEMPLATE_A: 7})
    assert admission.admitted == 0
    assert admission.presets[preset(1)].deletes_held == 1


def test_deletes_go_before_creates_and_inactive_before_cleanup() -> None:
    wanted = [
        wants(1, creates=3, desired=3),
        wants(2, failed_cleanup=2),
        wants(3, inactive=2),
        wants(4, expired=1),
    ]
    admission = admit(wanted, Budget(max_in_flight=4), 0, {})
    assert admission.presets[preset(3)].deletes == {"inactive": 2}
    assert admission.presets[preset(4)].deletes == {"expired": 1}
    assert admission.presets[preset(2)].deletes == {"failed_cleanup": 1}
    assert admission.presets[preset(2)].deletes_held == 1
    assert admission.presets[preset(1)].creates == 0
    assert admission.presets[preset(1)].creates_held == 3


def test_one_big_template_does_not_starve_the_others() -> None:
    big = [wants(index, creates=20, desired=20) for index in range(3)]
    small = [wants(10 + index, creates=1, desired=1, template=TEMPLATE_B) for index in range(5)]
    admission = admit(big + small, Budget(max_in_flight=10), 0, {})
    for want in small:
        assert admission.presets[want.preset_id].creates == 1
    assert sum(admission.presets[want.preset_id].creates for want in big) == 5


def test_every_starved_preset_gets_one_before_any_gets_a_second() -> None:
    wanted = [wants(index, creates=10, desired=10) for index in range(6)]
    admission = admit(wanted, Budget(max_in_flight=6), 0, {})
    assert [admission.presets[preset(index)].creates for index in range(6)] == [1] * 6


def test_fewer_creates_than_presets_go_to_the_emptiest_pools() -> None:
    wanted = [
        wants(1, creates=1, desired=10),  # 10% empty
        wants(2, creates=5, desired=5),  # empty
        wants(3, creates=2, desired=4),  # half empty
    ]
    admission = admit(wanted, Budget(max_in_flight=2), 0, {})
    assert {want.preset_id: admission.presets[want.preset_id].creates for want in wanted} == {
        preset(1): 0,
        preset(2): 1,
        preset(3): 1,
    }


def test_beyond_the_first_round_creates_follow_the_relative_deficit() -> None:
    wanted = [wants(1, creates=8, desired=8), wants(2, creates=2, desired=8)]
    admission = admit(wanted, Budget(max_in_flight=6), 0, {})
    # After one each: 7/8 against 1/8; 7/8 keeps winning until it falls to 1/8 or the budget runs out.
    assert admission.presets[preset(1)].creates == 5
    assert admission.presets[preset(2)].creates == 1


def test_the_per_template_budget_holds_with_its_own_reason() -> None:
    wanted = [wants(1, creates=5, desired=5), wants(2, creates=5, desired=5, template=TEMPLATE_B)]
    admission = admit(wanted, Budget(max_in_flight=100, max_in_flight_per_template=3), 1, {TEMPLATE_A: 1})
    assert admission.presets[preset(1)].creates == 2
    assert admission.presets[preset(1)].creates_held_by is HoldReason.MAX_IN_FLIGHT_PER_TEMPLATE
    assert admission.presets[preset(2)].creates == 3


def test_an_open_breaker_admits_no_create_but_every_delete() -> None:
    wanted = [wants(1, creates=5, expired=2), wants(2, creates=1, template=TEMPLATE_B)]
    admission = admit(wanted, Budget(), 0, {}, creates_allowed=0)
    assert admission.presets[preset(1)].deletes == {"expired": 2}
    assert admission.presets[preset(1)].creates == 0
    assert admission.presets[preset(1)].creates_held_by is HoldReason.BREAKER_OPEN


def test_half_open_probes_go_one_per_template() -> None:
    wanted = [
        wants(1, creates=5, desired=5),
        wants(2, creates=5, desired=5),
        wants(3, creates=2, desired=2, template=TEMPLATE_B),
        wants(4, creates=1, desired=1, template=uuid.UUID(int=0xC)),
    ]
    admission = admit(wanted, Budget(), 0, {}, creates_allowed=2, probing=True)
    counts = {want.preset_id: admission.presets[want.preset_id].creates for want in wanted}
    assert sum(counts.values()) == 2
    assert all(count <= 1 for count in counts.values())
    assert counts[preset(1)] + counts[preset(2)] <= 1
    assert admission.presets[preset(1)].creates_held_by is HoldReason.BREAKER_PROBING


# Properties over random plans and budgets.

templates = st.sampled_from([uuid.UUID(int=index) for index in range(1, 5)])


@st.composite
def wanted_lists(draw: st.DrawFn) -> list[Wants]:
    count = draw(st.integers(0, 12))
    result = []
    for index in range(count):
        desired = draw(st.integers(0, 12))
        deletes = {delete_class: draw(st.integers(0, 4)) for delete_class in DELETE_CLASSES if draw(st.booleans())}
        result.append(
            Wants(
                preset_id=preset(index),
                template_id=draw(templates),
                desired=desired,
                creates=draw(st.integers(0, max(desired, 1) + 2)),
                deletes=deletes,
            )
        )
    return result


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[Wants], Budget, int, dict[uuid.UUID, int]]:
    wanted = draw(wanted_lists())
    budget = Budget(max_in_flight=draw(st.integers(0, 30)), max_in_flight_per_template=draw(st.integers(0, 10)))
    by_template = {template: draw(st.integers(0, 8)) for template in {want.template_id for want in wanted}}
    in_flight = sum(by_template.values()) + draw(st.integers(0, 5))
    return wanted, budget, in_flight, by_template


def _by_template(wanted: Sequence[Wants], admission: Admission) -> Counter[uuid.UUID]:
    used: Counter[uuid.UUID] = Counter()
    for want in wanted:
        admitted = admission.presets.get(want.preset_id)
        if admitted is not None:
            used[want.template_id] += admitted.creates + admitted.delete_total
    return used


@given(cases())
@settings(max_examples=600)
def test_the_budget_is_never_exceeded(case: tuple[list[Wants], Budget, int, dict[uuid.UUID, int]]) -> None:
    wanted, budget, in_flight, by_template = case
    admission = admit(wanted, budget, in_flight, by_template)
    if budget.max_in_flight:
        assert admission.admitted <= max(budget.max_in_flight - in_flight, 0)
    if budget.max_in_flight_per_template:
        for template, used in _by_template(wanted, admission).items():
            assert used <= max(budget.max_in_flight_per_template - by_template.get(template, 0), 0)


@given(cases())
@settings(max_examples=600)
def test_nothing_is_admitted_that_was_not_wanted_and_everything_is_accounted_for(
    case: tuple[list[Wants], Budget, int, dict[uuid.UUID, int]],
) -> None:
    wanted, budget, in_flight, by_template = case
    admission = admit(wanted, budget, in_flight, by_template)
    for want in wanted:
        admitted = admission.presets.get(want.preset_id)
        if not (want.creates or want.delete_total):
            assert admitted is None
            continue
        assert admitted is not None
        assert admitted.creates + admitted.creates_held == want.creates
        assert admitted.delete_total + admitted.deletes_held == want.delete_total
        for delete_class, count in admitted.deletes.items():
            assert 0 <= count <= want.deletes[delete_class]
        assert (admitted.creates_held_by is None) == (admitted.creates_held == 0)
        assert (admitted.deletes_held_by is None) == (admitted.deletes_held == 0)


def _template_full(want: Wants, budget: Budget, by_template: Mapping[uuid.UUID, int], used: Counter[uuid.UUID]) -> bool:
    if not budget.max_in_flight_per_template:
        return False
    return by_template.get(want.template_id, 0) + used[want.template_id] >= budget.max_in_flight_per_template


@given(cases())
@settings(max_examples=600)
def test_deletes_first_and_work_conserving(case: tuple[list[Wants], Budget, int, dict[uuid.UUID, int]]) -> None:
    """Nothing is held while there is room for it; a create never takes room a delete of its template needed."""
    wanted, budget, in_flight, by_template = case
    admission = admit(wanted, budget, in_flight, by_template)
    used = _by_template(wanted, admission)
    overall_full = bool(budget.max_in_flight) and in_flight + admission.admitted >= budget.max_in_flight
    creates_in = Counter[uuid.UUID]()
    for want in wanted:
        admitted = admission.presets.get(want.preset_id)
        if admitted is not None:
            creates_in[want.template_id] += admitted.creates
    for want in wanted:
        admitted = admission.presets.get(want.preset_id)
        if admitted is None:
            continue
        if admitted.creates_held or admitted.deletes_held:
            assert overall_full or _template_full(want, budget, by_template, used)
        if admitted.deletes_held:
            # Held deletes: no create anywhere took the last room, and none in this template.
            assert creates_in[want.template_id] == 0
            if admitted.deletes_held_by is HoldReason.MAX_IN_FLIGHT:
                assert sum(creates_in.values()) == 0


@given(cases())
@settings(max_examples=600)
def test_every_starved_preset_has_one_before_any_has_two(
    case: tuple[list[Wants], Budget, int, dict[uuid.UUID, int]],
) -> None:
    wanted, budget, in_flight, by_template = case
    admission = admit(wanted, budget, in_flight, by_template)
    used = _by_template(wanted, admission)
    creates = {want.preset_id: admission.presets[want.preset_id].creates for want in wanted if want.creates}
    if any(count >= 2 for count in creates.values()):
        for want in wanted:
            if want.creates and creates[want.preset_id] == 0:
                # Only a full template can leave a starved preset without its first create.
                assert _template_full(want, budget, by_template, used)


@given(cases())
@settings(max_examples=600)
def test_beyond_the_first_create_the_emptier_pool_is_served_first(
    case: tuple[list[Wants], Budget, int, dict[uuid.UUID, int]],
) -> None:
    """When a gets a create beyond its first and b is held back (not for its template), a's relative
    deficit before that last create was at least b's after everything."""
    wanted, budget, in_flight, by_template = case
    admission = admit(wanted, budget, in_flight, by_template)
    used = _by_template(wanted, admission)
    for a in wanted:
        given_a = admission.presets[a.preset_id].creates if a.creates else 0
        if given_a < 2:
            continue
        before_last = Fraction(a.creates - given_a + 1, max(a.desired, 1))
        for b in wanted:
            if b is a or not b.creates or _template_full(b, budget, by_template, used):
                continue
            held_b = admission.presets[b.preset_id].creates_held
            if held_b:
                assert before_last >= Fraction(held_b, max(b.desired, 1))


@given(cases(), st.integers(0, 4))
@settings(max_examples=400)
def test_probes_are_few_and_one_per_template(
    case: tuple[list[Wants], Budget, int, dict[uuid.UUID, int]], probes: int
) -> None:
    wanted, budget, in_flight, by_template = case
    admission = admit(wanted, budget, in_flight, by_template, creates_allowed=probes, probing=True)
    per_template: Counter[uuid.UUID] = Counter()
    for want in wanted:
        if want.creates:
            per_template[want.template_id] += admission.presets[want.preset_id].creates
    assert sum(per_template.values()) <= probes
    assert all(count <= 1 for count in per_template.values())
    # Deletes are not limited by the breaker.
    unlimited = admit(wanted, budget, in_flight, by_template, creates_allowed=0)
    plain = admit(wanted, budget, in_flight, by_template)
    for want in wanted:
        if want.delete_total:
            assert unlimited.presets[want.preset_id].deletes == plain.presets[want.preset_id].deletes


@given(cases())
@settings(max_examples=300)
def test_the_same_inputs_give_the_same_admission(case: tuple[list[Wants], Budget, int, dict[uuid.UUID, int]]) -> None:
    wanted, budget, in_flight, by_template = case
    assert admit(wanted, budget, in_flight, by_template) == admit(list(wanted), budget, in_flight, dict(by_template))


def test_the_slow_start_caps_creates_shared_fairly_and_says_so() -> None:
    wanted = [wants(1, creates=10, desired=10), wants(2, creates=1), wants(3, creates=2, desired=2, expired=1)]
    admission = admit(wanted, Budget(), 0, {}, slow_start=3)
    # One create each before any gets a second; the delete is not the slow start's business.
    assert [admission.presets[preset(index)].creates for index in (1, 2, 3)] == [1, 1, 1]
    assert admission.presets[preset(3)].deletes == {"expired": 1}
    assert admission.presets[preset(1)].creates_held_by is HoldReason.SLOW_START
    assert admission.presets[preset(3)].deletes_held == 0


def test_the_budget_is_said_when_it_binds_harder_than_the_slow_start() -> None:
    admission = admit([wants(1, creates=10, desired=10)], Budget(max_in_flight=4), 2, {TEMPLATE_A: 2}, slow_start=5)
    assert admission.presets[preset(1)].creates == 2
    assert admission.presets[preset(1)].creates_held_by is HoldReason.MAX_IN_FLIGHT


def test_half_open_probes_are_the_breakers_even_under_the_slow_start() -> None:
    wanted = [wants(1, creates=2, desired=2), wants(2, creates=2, desired=2, template=TEMPLATE_B)]
    admission = admit(wanted, Budget(), 0, {}, creates_allowed=3, probing=True, slow_start=1)
    assert admission.admitted == 1
    assert {admitted.creates_held_by for admitted in admission.presets.values()} == {HoldReason.BREAKER_PROBING}
