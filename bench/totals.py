"""The refresh behind the created/failed/claimed counters (issue 11.4): the whole history vs what changed.

    python -m bench.totals                                  # 10,000 presets at 1M and 4M builds, embedded
    RECONCILER_DATABASE_URL=postgresql://... python -m bench.totals --histories 1000000 4000000

For each history size, on a fleet generated as `bench.run` does (scratch database, dropped after):

- **per-preset aggregate**: the statement the daemon ran every minute before (every first build of the
  history, grouped by preset), which `reconciler.counters` still runs at start-up and hourly;
- **full read**: the start-up read (the aggregate, the open first builds, the window's, the labels);
- **refresh, idle**: an incremental refresh with nothing new since the last one;
- **refresh, busy minute**: an incremental refresh after a minute of a busy fleet's activity (`--creates`
  new prebuilds, `--completions` jobs completed of which a tenth failed, `--claims` claims, `--deletes`
  workspaces deleted), written just before, outside the measured time.

Each is the median of `--rounds` runs. After the busy rounds the incrementally followed counts are checked
against a full read (they must be equal). Prints one JSON document and a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg

from bench import fleet
from bench.run import scratch_database, server
from reconciler import db
from reconciler.counters import PrebuildCounters
from reconciler.dsn import redact_dsn
from reconciler.logs import configure_logging
from reconciler.snapshot import PREBUILDS_SYSTEM_USER_ID
from reconciler.store import totals

# A minute of a busy fleet: prebuilds created (first builds with pending jobs) on active presets.
_CREATE = """
with chosen as (
    select p.id as preset_id, p.template_version_id, v.template_id, t.organization_id,
           gen_random_uuid() as workspace_id, gen_random_uuid() as job_id, gen_random_uuid() as build_id
    from template_version_presets p
    join template_versions v on v.id = p.template_version_id
    join templates t on t.id = v.template_id and t.active_version_id = v.id
    order by random()
    limit $1
), workspaces_added as (
    insert into workspaces (id, owner_id, organization_id, template_id, name)
    select workspace_id, $2, organization_id, template_id, 'bench-' || workspace_id from chosen
), jobs_added as (
    insert into provisioner_jobs (id, organization_id, initiator_id, type, input)
    select job_id, organization_id, $2, 'workspace_build', '{}' from chosen
)
insert into workspace_builds (id, workspace_id, build_number, transition, template_version_id,
                              template_version_preset_id, job_id, initiator_id, reason)
select build_id, workspace_id, 1, 'start', template_version_id, preset_id, job_id, $2, 'initiator' from chosen
"""
# Pending prebuild jobs completed, one in ten failed.
_COMPLETE = """
update provisioner_jobs set started_at = now(), completed_at = now(), updated_at = now(),
       error = case when random() < 0.1 then 'provisioning failed' end
where id in (select id from provisioner_jobs where job_status = 'pending' and initiator_id = $2 limit $1)
"""
# Live prebuilds claimed by a user, and others deleted.
_CLAIM = """
update workspaces set owner_id = (select id from users where id <> $2 order by id limit 1), updated_at = now()
where id in (select id from workspaces where owner_id = $2 and not deleted order by random() limit $1)
"""
_DELETE = """
update workspaces set deleted = true, updated_at = now()
where id in (select id from workspaces where owner_id = $2 and not deleted order by random() limit $1)
"""


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


async def _timed(action: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await action()
    return time.perf_counter() - started


async def busy_minute(connection: asyncpg.Connection, arguments: argparse.Namespace) -> None:
    system = PREBUILDS_SYSTEM_USER_ID
    await connection.execute(_COMPLETE, arguments.completions, system)
    await connection.execute(_CREATE, arguments.creates, system)
    await connection.execute(_CLAIM, arguments.claims, system)
    await connection.execute(_DELETE, arguments.deletes, system)


async def measure(database_url: str, history: int, arguments: argparse.Namespace) -> dict[str, Any]:
    parameters = fleet.FleetParameters(
        presets=arguments.presets, outdated_presets=arguments.presets // 5, history_builds=history
    )
    connection = await db.connect(database_url, statement_timeout=timedelta(hours=1))
    try:
        await db.migrate(connection)
        generated = await fleet.generate(connection, parameters)
        print(f"fleet generated in {generated.generate_seconds:.1f}s: {generated.row_counts}", file=sys.stderr)
        rounds = arguments.rounds

        aggregate = [await _timed(lambda: totals.read_totals_by_preset(connection)) for _ in range(rounds)]
        full = []
        counters = PrebuildCounters()
        for _ in range(rounds):
            counters = PrebuildCounters()
            started = time.perf_counter()
            counters.reset(await totals.read_full(connection))
            full.append(time.perf_counter() - started)

        async def refresh() -> None:
            counters.apply(await totals.read_changes(connection, counters))

        idle = [await _timed(refresh) for _ in range(rounds)]
        busy = []
        for _ in range(rounds):
            await busy_minute(connection, arguments)
            busy.append(await _timed(refresh))
        followed = counters.preset_counts()
        truth = await totals.read_totals_by_preset(connection)
        if followed != truth:
            raise SystemExit("the incrementally followed counts differ from a full read")
        counts = await connection.fetchrow(
            "select (select count(*) from workspace_builds) as builds, "
            "(select count(*) from workspace_builds where build_number = 1 and initiator_id = $1) as first_builds, "
            "(select count(*) from template_version_presets) as presets",
            PREBUILDS_SYSTEM_USER_ID,
        )
        assert counts is not None
    finally:
        await connection.close()
    return {
        "history_builds": history,
        "row_counts": {**generated.row_counts, **{key: int(value) for key, value in counts.items()}},
        "tracked_builds": counters.tracked_builds,
        "per_preset_aggregate_ms": _ms(statistics.median(aggregate)),
        "full_read_ms": _ms(statistics.median(full)),
        "refresh_idle_ms": _ms(statistics.median(idle)),
        "refresh_busy_minute_ms": _ms(statistics.median(busy)),
        "refresh_busy_minute_max_ms": _ms(max(busy)),
        "samples_ms": {
            "aggregate": [_ms(value) for value in aggregate],
            "full": [_ms(value) for value in full],
            "idle": [_ms(value) for value in idle],
            "busy": [_ms(value) for value in busy],
        },
        "counts_checked_against_a_full_read": True,
    }


def table(reports: list[dict[str, Any]]) -> str:
    lines = [
        "| builds | first builds | presets | tracked builds | per-preset aggregate ms | full read ms "
        "| refresh idle ms | refresh after a busy minute ms (max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        counts = report["row_counts"]
        lines.append(
            f"| {counts['builds']:,} | {counts['first_builds']:,} | {counts['presets']:,} "
            f"| {report['tracked_builds']:,} | {report['per_preset_aggregate_ms']} | {report['full_read_ms']} "
            f"| {report['refresh_idle_ms']} | {report['refresh_busy_minute_ms']} "
            f"({report['refresh_busy_minute_max_ms']}) |"
        )
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.totals", description=__doc__.split("\n")[0])
    parser.add_argument("--presets", type=int, default=10_000)
    parser.add_argument("--histories", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--creates", type=int, default=500)
    parser.add_argument("--completions", type=int, default=400)
    parser.add_argument("--claims", type=int, default=100)
    parser.add_argument("--deletes", type=int, default=100)
    parser.add_argument("--data-dir", default=None, help="keep the embedded server's data here")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    return parser.parse_args(argv)


async def main_async(arguments: argparse.Namespace) -> list[dict[str, Any]]:
    dsn = os.environ.get("RECONCILER_DATABASE_URL")
    if dsn:
        print(f"benchmark: using the server of {redact_dsn(dsn)} (a scratch database)", file=sys.stderr)
    reports = []
    async with server(dsn, arguments.data_dir) as server_dsn:
        for history in arguments.histories:
            async with scratch_database(server_dsn) as database_url:
                reports.append(await measure(database_url, history, arguments))
    return reports


def main(argv: list[str] | None = None) -> int:
    configure_logging(log_level="warning")
    arguments = parse_arguments(argv)
    reports = asyncio.run(main_async(arguments))
    document = json.dumps(reports, indent=2)
    print(document)
    if arguments.output:
        with open(arguments.output, "w", encoding="utf-8") as output:
            output.write(document)
    print(table(reports), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
