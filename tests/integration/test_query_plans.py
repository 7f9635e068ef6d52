"""The snapshot's statements use their indexes on realistic data, and never scan the build history.

A few thousand rows made by the benchmark's fleet generator (live pools, stop/start cycles, claimed and
deleted workspaces, failures), analyzed as autovacuum would. A sequential scan of `workspace_builds` or
`provisioner_jobs` is what made Coder's early queries slow: it grows with history, not with the fleet.
"""

from __future__ import annotations

import json
from datetime import timedelta

import asyncpg
import pytest

from bench import fleet
from reconciler import db
from reconciler.snapshot import PREBUILDS_SYSTEM_USER_ID
from tests.integration.query_plans import explain, plan_nodes

HISTORY_TABLES = {"workspace_builds", "provisioner_jobs", "workspace_agents"}


@pytest.fixture
async def generated_fleet(connection: asyncpg.Connection) -> fleet.Fleet:
    parameters = fleet.FleetParameters(presets=200, desired=5, outdated_presets=40, history_builds=30_000)
    return await fleet.generate(connection, parameters)


@pytest.mark.parametrize("name", ["snapshot_prebuilds", "snapshot_presets", "snapshot_schedules"])
async def test_snapshot_statements_never_scan_history_tables(
    connection: asyncpg.Connection, generated_fleet: fleet.Fleet, name: str
) -> None:
    arguments: tuple[object, ...] = ()
    if name == "snapshot_prebuilds":
        arguments = (
            generated_fleet.now - timedelta(hours=1),
            3,
            ["REQUIRED_TEMPLATE_VARIABLES"],
            ["INSUFFICIENT_QUOTA"],
        )
    nodes = await explain(connection, name, *arguments)
    scanned = {node.get("Relation Name") for node in nodes if node["Node Type"] == "Seq Scan"}
    assert not scanned & HISTORY_TABLES, f"sequential scan of {scanned & HISTORY_TABLES}"


async def test_live_prebuilds_are_found_through_the_partial_index(
    connection: asyncpg.Connection, generated_fleet: fleet.Fleet
) -> None:
    del generated_fleet
    nodes = await explain(
        connection,
        "snapshot_prebuilds",
        fleet.reference_time() - timedelta(hours=1),
        3,
        ["REQUIRED_TEMPLATE_VARIABLES"],
        ["INSUFFICIENT_QUOTA"],
    )
    # Deleted and claimed workspaces (most of the table) are never visited: no sequential scan of
    # workspaces, and the live prebuilds come from a partial index of live workspaces (directly or
    # through a bitmap).
    assert not [node for node in nodes if node["Node Type"] == "Seq Scan" and node.get("Relation Name") == "workspaces"]
    live_indexes = {"workspaces_live_prebuilds_idx", "workspaces_owner_live_idx"}
    assert live_indexes & {node.get("Index Name") for node in nodes}
    latest_build_lookups = [node for node in nodes if node.get("Relation Name") == "workspace_builds"]
    assert latest_build_lookups
    assert all("Index" in node["Node Type"] for node in latest_build_lookups)


@pytest.mark.parametrize(
    "name", ["totals_live_first_builds", "totals_unfinished_first_builds", "totals_recent_first_builds"]
)
async def test_the_counters_refresh_reads_no_history(
    connection: asyncpg.Connection, generated_fleet: fleet.Fleet, name: str
) -> None:
    """The counters' refresh after start-up (issue 11.4): the history tables are only looked up by key,
    from the live workspaces or from the indexes of unfinished and recently completed jobs (the ids of the
    live workspaces, the refresh's other read, touch no history table)."""
    arguments: tuple[object, ...] = (generated_fleet.now - timedelta(minutes=10),) if "recent" in name else ()
    nodes = await explain(connection, name, *arguments)
    history_reads = [node for node in nodes if node.get("Relation Name") in HISTORY_TABLES]
    assert history_reads
    assert all(node["Node Type"] == "Index Scan" for node in history_reads), [
        (node["Node Type"], node.get("Relation Name")) for node in history_reads
    ]
    assert not [node for node in nodes if node["Node Type"] == "Seq Scan" and node.get("Relation Name") == "workspaces"]
    # By key, not by preset: the index of first builds by preset would read the whole history.
    assert "workspace_builds_first_by_preset_idx" not in {node.get("Index Name") for node in nodes}


async def test_a_targeted_snapshot_reads_only_its_templates_prebuilds_through_the_index(
    connection: asyncpg.Connection, generated_fleet: fleet.Fleet
) -> None:
    """A targeted pass's statements find the live prebuilds of its templates by the partial index's
    template column, and scan neither the history nor every preset (issue 16: cheap whatever the fleet)."""
    templates = await connection.fetchval("select array_agg(id) from (select id from templates limit 2) t")
    arguments = (generated_fleet.now - timedelta(hours=1), 3, ["REQUIRED_TEMPLATE_VARIABLES"], ["INSUFFICIENT_QUOTA"])
    nodes = await explain(connection, "snapshot_prebuilds_targeted", *arguments, templates)
    scanned = {node.get("Relation Name") for node in nodes if node["Node Type"] == "Seq Scan"}
    assert not scanned & (HISTORY_TABLES | {"workspaces", "template_version_presets"}), scanned
    by_template = [
        node
        for node in nodes
        if node.get("Index Name") == "workspaces_live_prebuilds_idx" and "template_id" in node.get("Index Cond", "")
    ]
    assert by_template, "live prebuilds not looked up by template"
    for name in ("snapshot_presets_targeted", "snapshot_schedules_targeted"):
        nodes = await explain(connection, name, templates)
        scanned = {node.get("Relation Name") for node in nodes if node["Node Type"] == "Seq Scan"}
        assert not scanned & (HISTORY_TABLES | {"workspaces"}), (name, scanned)


async def test_the_failed_prebuilds_protection_reads_the_verdicts_evidence_once(
    connection: asyncpg.Connection, generated_fleet: fleet.Fleet
) -> None:
    """Whether a failed prebuild is evidence of a verdict (and so kept from the cleanup) is looked up in a
    set hashed once, not by scanning all the evidence again for each failed prebuild: at fleet L that
    per-row scan was 1.5 s of a 3.5 s snapshot."""
    document = await connection.fetchval(
        "explain (analyze, format json) " + db.queries()["snapshot_prebuilds"],
        generated_fleet.now - timedelta(hours=1),
        3,
        ["REQUIRED_TEMPLATE_VARIABLES"],
        ["INSUFFICIENT_QUOTA"],
    )
    parsed = json.loads(document) if isinstance(document, str) else document
    nodes = list(plan_nodes(parsed[0]["Plan"]))
    failed_rows = await connection.fetchval(
        "select count(*) from workspaces w where w.owner_id = $1 and not w.deleted and exists ("
        " select 1 from workspace_builds b join provisioner_jobs j on j.id = b.job_id"
        " where b.workspace_id = w.id and j.job_status = 'failed')",
        PREBUILDS_SYSTEM_USER_ID,
    )
    assert failed_rows > 1, "the fleet has failed prebuilds to protect or clean up"
    evidence_scans = [
        node for node in nodes if node["Node Type"] == "CTE Scan" and node["CTE Name"] == "limit_evidence"
    ]
    assert evidence_scans
    assert max(node["Actual Loops"] for node in evidence_scans) == 1
