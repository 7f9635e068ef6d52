"""The timeline the soak prints for a preset above its ceiling: what the reader of a failure works from."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tests.factories import Factory
from tests.soak.invariants import FleetChecker
from tests.soak.soak import SET_DESIRED, Soak, SoakConfig


async def test_a_preset_above_its_ceiling_gets_its_timeline(factory: Factory, database_url: str) -> None:
    soak = Soak(factory, database_url, SoakConfig(chaos_seconds=0))
    soak.platform = factory.connection
    checker: FleetChecker = soak.checker
    preset = await factory.preset(desired=2)
    await checker.change_target(factory.connection, preset.id, SET_DESIRED, 2, why="desired")
    await factory.created_prebuilds(preset, 2)
    await checker.sample(factory.connection)
    await checker.change_target(factory.connection, preset.id, SET_DESIRED, 0, why="desired")
    await factory.created_prebuilds(preset, 1)  # a create the target no longer allows
    await checker.sample(factory.connection)
    assert checker.over_ceiling == [preset.id]
    assert checker.violations == [f"preset {preset.id}: 3 live prebuilds, above its ceiling 2 (target 0)"]

    create: dict[str, Any] = {
        "event": "prebuilds.create",
        "preset_id": str(preset.id),
        "run_id": "run1",
        "rows": 1,
        "planned": 1,
        "clamped": 0,
        "timestamp": datetime.now(UTC).isoformat(),
    }
    unrelated = {**create, "preset_id": "another"}
    timeline = (await soak.preset_timeline(preset.id, [("7001", create), ("7001", unrelated)])).splitlines()

    assert timeline[0] == f"  timeline of preset {preset.id} (prebuilds do not expire):"
    what = [line.split(" ", 5)[-1] for line in timeline[1:]]
    checker_lines = [line for line in what if line.startswith("checker:")]
    assert [line.split(" (committing at")[0] for line in checker_lines] == [
        "checker: desired",
        "checker: sample: live 2, ceiling now 2",
        "checker: desired",
        "checker: sample: live 3, ceiling now 2",
    ]
    assert checker_lines[0].endswith("target 2, live 0, ceiling 2")
    assert checker_lines[2].endswith("target 0, live 2, ceiling 2")
    # The replica's create of this preset (not the other's), and the three first builds, in time order.
    assert [line for line in what if line.startswith("replica")] == [
        "replica :7001 pass run1: prebuilds.create (rows 1, planned 1, clamped 0)"
    ]
    builds = [line for line in what if line.startswith("database:")]
    assert len(builds) == 3
    assert all(line.endswith("build 1 start stamped (job now pending)") for line in builds)
    assert what.index(builds[-1]) < what.index(checker_lines[3])
