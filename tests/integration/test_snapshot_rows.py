"""`snapshot_prebuilds` returns rows of several kinds in one statement; each kind has columns of its own,
named for what they hold, and leaves every other kind's columns null (issue 13.6): no column means one
thing in one kind of row and another thing in the next."""

from __future__ import annotations

from datetime import timedelta

from reconciler import db
from tests.factories import Factory, minutes
from tests.integration.test_commands import build_fleet

SHARED = {"kind", "preset_id", "template_version_id"}
OWN_COLUMNS = {
    "running": {"workspace_ids", "ready_flags", "created_ats"},
    "in_progress": {"in_progress_transition", "in_progress_count", "in_progress_oldest_pending_at"},
    "pending": {"pending_count"},
    "backoff": {"num_failed", "last_build_at"},
    "failures": {
        "hard_limited",
        "validation_failed",
        "failure_streak",
        "last_error",
        "last_error_code",
        "last_failed_at",
        "failed_workspace_ids",
    },
    # Failed prebuilds, for their cleanup (issue 15.5).
    "failed": {"cleanup_workspace_ids", "cleanup_failed_ats", "cleanup_protected"},
}


async def test_each_kind_of_row_fills_only_its_own_columns(factory: Factory) -> None:
    fleet = await build_fleet(factory)
    # A create in flight on the active version, for an `in_progress` row.
    await factory.prebuild(fleet.renewing, status="running", ago=minutes(1))
    rows = await factory.connection.fetch(
        db.queries()["snapshot_prebuilds"],
        factory.now - timedelta(hours=2),
        3,
        ["REQUIRED_TEMPLATE_VARIABLES"],
        ["INSUFFICIENT_QUOTA"],
    )

    assert {row["kind"] for row in rows} == set(OWN_COLUMNS)
    every_column = set(rows[0].keys())
    assert every_column == SHARED.union(*OWN_COLUMNS.values())
    for row in rows:
        filled = {column for column in every_column if row[column] is not None}
        others = every_column - SHARED - OWN_COLUMNS[row["kind"]]
        assert not filled & others, f"a {row['kind']} row fills {sorted(filled & others)}"
    failures = {row["preset_id"]: row for row in rows if row["kind"] == "failures"}
    limited = failures[fleet.limited.id]
    assert (limited["hard_limited"], limited["validation_failed"], limited["failure_streak"]) == (True, False, 3)
