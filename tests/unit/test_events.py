"""Change events, the pure parts: reading a payload, gathering changes for a pass, scoped problem logs."""

from __future__ import annotations

import uuid

from reconciler.events import Batch, PendingChanges, parse_payload
from reconciler.plan import PlanProblem
from reconciler.problem_log import ProblemLog

A, B, C = (uuid.UUID(int=n) for n in (1, 2, 3))


def test_a_payload_names_its_kind_and_templates() -> None:
    change = parse_payload(f"claim:{A},{B}")
    assert (change.kind, change.template_ids) == ("claim", frozenset({A, B}))
    assert parse_payload("settings:*").template_ids is None


def test_an_unreadable_payload_is_a_change_of_everything() -> None:
    for payload in ("", "claim", "claim:", "claim:not-a-uuid", f"claim:{A},", "x" * 10_000):
        assert parse_payload(payload).template_ids is None, payload
    assert parse_payload(f"newkind:{A}").kind == "other"


def test_pending_changes_gather_until_taken_and_everything_absorbs_the_rest() -> None:
    pending = PendingChanges()
    assert pending.take() is None
    pending.add(frozenset({A}), received=10.0)
    pending.add(frozenset({B}), received=11.0)
    assert pending.ready.is_set()
    assert pending.take() == Batch(frozenset({A, B}), 10.0)
    assert not pending.ready.is_set()
    assert pending.take() is None
    pending.add(frozenset({A}), received=5.0)
    pending.add(None, received=6.0)
    pending.add(frozenset({C}), received=7.0)
    assert pending.take() == Batch(None, 5.0)


def test_a_batch_put_back_keeps_its_arrival_time() -> None:
    pending = PendingChanges()
    pending.put_back(Batch(frozenset({A}), 1.0))
    pending.add(frozenset({B}), received=2.0)
    assert pending.take() == Batch(frozenset({A, B}), 1.0)


def problem(preset: uuid.UUID, detail: str = "d") -> PlanProblem:
    return PlanProblem(preset_id=preset, event="preset.target_capped", detail=detail)


def test_a_targeted_pass_neither_clears_nor_repeats_the_problems_of_presets_it_did_not_see() -> None:
    log = ProblemLog()
    log.update([problem(A), problem(B)])
    # A targeted pass over B only: A's problem is not cleared; B's is unchanged, so nothing to log.
    found = log.update([problem(B)], scope={B})
    assert (found.appeared, found.cleared) == ((), ())
    # B's problem is gone in the next targeted pass over B: cleared, and A's stays reported.
    found = log.update([], scope={B})
    assert found.cleared == (problem(B),)
    assert log.reported == (problem(A),)
    # A full pass compares everything again.
    found = log.update([problem(C)])
    assert (found.appeared, found.cleared) == ((problem(C),), (problem(A),))
