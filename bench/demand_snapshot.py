"""What the demand windows cost a pass, and that the cost does not grow with the events table's age.

    python -m bench.demand_snapshot                      # 1,000 expression presets, 30 days of events
    python -m bench.demand_snapshot --presets 200 --days 10 --quick

A fleet (bench/fleet.py) whose presets all have a target expression, and claim events at a steady rate
per preset (`--per-hour`, half claims, half misses) for `--days` days. `snapshot_demand` (the pass's one
statement for every window of every preset) is timed, median of `--runs`, in a REPEATABLE READ
transaction as in a pass, with the table holding 1 day, 8 days (the default retention) and `--days` days
of events, then again after the purge brought it back to 8 days. Prints a Markdown table; the server is
RECONCILER_DATABASE_URL's, else an embedded durable one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from datetime import datetime, timedelta

import asyncpg

from bench import fleet
from bench.run import scratch_database, server
from reconciler import db
from reconciler.store import writes

STATEMENT = db.queries_in("reads.sql")["snapshot_demand"]


async def _fill(connection: asyncpg.Connection, since: datetime, until: datetime, per_hour: int) -> int:
    """Events for every preset from `since` to `until`, `per_hour` an hour each (alternately claims and misses),
    a day per statement (the connection's statement timeout)."""
    total = 0
    start = since
    while start < until:
        end = min(start + timedelta(days=1), until)
        total += await _fill_span(connection, start, end, per_hour)
        start = end
    await connection.execute("vacuum analyze prebuild_events")
    return total


async def _fill_span(connection: asyncpg.Connection, since: datetime, until: datetime, per_hour: int) -> int:
    status = await connection.execute(
        """
        insert into prebuild_events (preset_id, event_type, created_at)
        select p.id, case when n % 2 = 0 then 'claim_succeeded' else 'claim_missed' end,
               $1::timestamptz + (n * interval '1 hour' / $3::int)
                   + (abs(hashtext(p.id::text)) % 60) * interval '1 second'
        from template_version_presets p
        cross join generate_series(
            0, (extract(epoch from $2::timestamptz - $1::timestamptz) / 3600 * $3::int)::int - 1
        ) n
        where p.desired_instances_expression is not null
        """,
        since,
        until,
        per_hour,
    )
    return int(status.split()[-1])


async def _time(connection: asyncpg.Connection, now: datetime, runs: int) -> tuple[float, int]:
    """Median milliseconds, and the buffers (8 kB pages) one run touches: a count the machine's load does not
    change, where the timings of a shared machine wander."""
    timings = []
    for _ in range(runs):
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            started = time.perf_counter()
            await connection.fetch(STATEMENT, now)
            timings.append(time.perf_counter() - started)
    plan = await connection.fetchval("explain (analyze, buffers, format json) " + STATEMENT, now)
    top = json.loads(plan)[0]["Plan"]
    buffers = int(top["Shared Hit Blocks"]) + int(top["Shared Read Blocks"])
    return statistics.median(timings) * 1000, buffers


async def measure(database_url: str, presets: int, days: int, per_hour: int, runs: int) -> list[str]:
    # A plain connection: filling weeks of events takes longer than a pass's statement may (db.connect's
    # deadlines).
    connection = await asyncpg.connect(database_url)
    try:
        await db.migrate(connection)
        generated = await fleet.generate(
            connection, fleet.FleetParameters(presets=presets, outdated_presets=0, history_builds=presets * 2)
        )
        now = generated.now
        await connection.execute(
            "update template_version_presets set desired_instances_expression = "
            "'max(scheduled_target, ceil(claim_rate_30m * 8), claims_next_60m_last_week)' "
            "where desired_instances is not null"
        )
        with_expression = await connection.fetchval(
            "select count(*) from template_version_presets where desired_instances_expression is not null"
        )
        lines = [
            f"{with_expression:,} presets with an expression, {per_hour} events an hour each, median of {runs} runs",
            "",
            "| events table holds | rows | snapshot_demand ms | ratio to 1 day | buffers touched |",
            "|---|---|---|---|---|",
        ]
        filled_until = now - timedelta(days=1)
        started = time.perf_counter()
        total = await _fill(connection, filled_until, now, per_hour)
        print(f"filled a day: {total:,} events in {time.perf_counter() - started:.1f} s", flush=True)
        baseline, buffers = await _time(connection, now, runs)
        lines.append(f"| 1 day | {total:,} | {baseline:.1f} | 1.00 | {buffers:,} |")
        for age in sorted({8, days}):
            if age <= 1:
                continue
            start = now - timedelta(days=age)
            total += await _fill(connection, start, filled_until, per_hour)
            filled_until = start
            elapsed, buffers = await _time(connection, now, runs)
            lines.append(f"| {age} days | {total:,} | {elapsed:.1f} | {elapsed / baseline:.2f} | {buffers:,} |")
        started = time.perf_counter()
        purged = await writes.purge_prebuild_events(connection, now - timedelta(days=8), max_batches=100_000)
        purge_seconds = time.perf_counter() - started
        await connection.execute("vacuum analyze prebuild_events")
        elapsed, buffers = await _time(connection, now, runs)
        remaining = total - purged
        lines.append(
            f"| {days} days, purged to 8 | {remaining:,} | {elapsed:.1f} | {elapsed / baseline:.2f} | {buffers:,} |"
        )
        lines.append("")
        lines.append(f"purge: {purged:,} events in {purge_seconds:.1f} s ({purged / max(purge_seconds, 1e-9):,.0f}/s)")
        return lines
    finally:
        await connection.close()


async def main_async(arguments: argparse.Namespace) -> None:
    async with (
        server(os.environ.get("RECONCILER_DATABASE_URL"), None) as server_dsn,
        scratch_database(server_dsn) as database_url,
    ):
        lines = await measure(database_url, arguments.presets, arguments.days, arguments.per_hour, arguments.runs)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.demand_snapshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", type=int, default=1000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--per-hour", type=int, default=4, help="events per preset per hour")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="5 runs")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.runs = 5
    asyncio.run(main_async(arguments))


if __name__ == "__main__":
    main()
