"""What the daemon remembers of stabilizing targets between passes (reconcile.remember_holds)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from reconciler.plan import Plan, PresetPlan, PresetState
from reconciler.reconcile import remember_holds
from reconciler.target import Target, TargetHold, TargetSource
from tests.unit.test_metrics import make_preset

NOW = datetime(2026, 1, 5, 12, tzinfo=UTC)


def plan_with(*entries: tuple[str, TargetHold | None]) -> Plan:
    presets = []
    for name, hold in entries:
        target = Target(TargetSource.EXPRESSION, 1, 4 if hold else 1, 1, expression="claims_10m", hold=hold)
        presets.append(PresetPlan(make_preset(name), PresetState(desired=1), (), hard_limited=False, target=target))
    return Plan(generated_at=NOW, presets=tuple(presets))


def preset_id(name: str) -> uuid.UUID:
    return make_preset(name).id


def test_a_full_pass_keeps_exactly_its_plans_holds() -> None:
    gone = TargetHold(retained=9)
    holds = {preset_id("gone"): gone, preset_id("a"): TargetHold(retained=2)}
    held = TargetHold(retained=4, lowered_since=NOW, peak=1)
    remember_holds(holds, plan_with(("a", held), ("b", None)), targeted=False)
    assert holds == {preset_id("a"): held}


def test_a_targeted_pass_leaves_the_other_templates_holds_alone() -> None:
    other = TargetHold(retained=7, lowered_since=NOW, peak=3)
    holds = {preset_id("other"): other, preset_id("a"): TargetHold(retained=2), preset_id("b"): TargetHold(retained=5)}
    held = TargetHold(retained=4, lowered_since=NOW, peak=1)
    remember_holds(holds, plan_with(("a", held), ("b", None)), targeted=True)
    assert holds == {preset_id("other"): other, preset_id("a"): held}
