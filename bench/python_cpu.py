"""Python CPU of a steady full pass, step by step (issue 16.2), on a fleet kept between runs.

    RECONCILER_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m bench.python_cpu

The fleet (fleet L by default) is generated once in a database of its own (`--database`, kept: run the
command again, or from another checkout with PYTHONPATH pointing at it, to alternate two builds on the
same fleet). Each step is CPU time (`time.process_time`, the whole process: the plan's thread included):

- fetch: asyncpg's `fetch` calls while the snapshot is read (the rows' decoding, mostly)
- convert: the rest of `read_snapshot` (rows into the snapshot's objects)
- plan: `planner.plan`, on its thread
- execute: `executor.execute` (nothing to write in a steady pass)
- other: the rest of the pass (the lock, settings, logging, summaries)
- gc: the cyclic collections the pass deferred, until the next pass starts (as `bench.run` counts them)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import asyncpg.connection

from bench import fleet
from bench.run import _with_database
from reconciler import db, executor, planner
from reconciler.config import load_settings
from reconciler.reconcile import run_pass
from reconciler.store import reads

STEPS = ("fetch", "convert", "plan", "execute", "other", "pass", "gc", "pass+gc")


async def ensure_fleet(server: str, database: str, parameters: fleet.FleetParameters) -> tuple[str, datetime]:
    """The fleet's database and its `now`; generated when missing (the `now` is kept in a table of its own)."""
    url = _with_database(server, database)
    admin = await asyncpg.connect(server)
    try:
        if not await admin.fetchval("select 1 from pg_database where datname = $1", database):
            await admin.execute(f'create database "{database}"')
            connection = await db.connect(url, statement_timeout=timedelta(hours=1))
            try:
                await db.migrate(connection)
                generated = await fleet.generate(connection, parameters)
                await connection.execute("create table bench_fleet_now (now timestamptz not null)")
                await connection.execute("insert into bench_fleet_now values ($1)", generated.now)
            finally:
                await connection.close()
    finally:
        await admin.close()
    connection = await db.connect(url)
    try:
        now = await connection.fetchval("select now from bench_fleet_now")
    finally:
        await connection.close()
    assert isinstance(now, datetime)
    return url, now


class _Clock:
    """CPU seconds per step, and the cyclic collections (a gc callback)."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}
        self.reading = False
        self.collections = 0.0
        self._collection_started = 0.0

    def add(self, step: str, seconds: float) -> None:
        self.steps[step] = self.steps.get(step, 0.0) + seconds

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        del info
        if phase == "start":
            self._collection_started = time.process_time()
        else:
            self.collections += time.process_time() - self._collection_started


def _instrument(clock: _Clock) -> None:
    fetch = asyncpg.connection.Connection.fetch

    async def timed_fetch(self: asyncpg.Connection, *arguments: Any, **options: Any) -> Any:
        started = time.process_time()
        try:
            return await fetch(self, *arguments, **options)
        finally:
            if clock.reading:
                clock.add("fetch", time.process_time() - started)

    asyncpg.connection.Connection.fetch = timed_fetch  # type: ignore[method-assign,assignment]
    read_snapshot = reads.read_snapshot

    async def timed_read(*arguments: Any, **options: Any) -> Any:
        clock.reading = True
        started = time.process_time()
        try:
            return await read_snapshot(*arguments, **options)
        finally:
            clock.reading = False
            clock.add("read", time.process_time() - started)

    reads.read_snapshot = timed_read
    plan = planner.plan

    def timed_plan(*arguments: Any, **options: Any) -> Any:
        started = time.process_time()
        try:
            return plan(*arguments, **options)
        finally:
            clock.add("plan", time.process_time() - started)

    planner.plan = timed_plan
    execute = executor.execute

    async def timed_execute(*arguments: Any, **options: Any) -> Any:
        started = time.process_time()
        try:
            return await execute(*arguments, **options)
        finally:
            clock.add("execute", time.process_time() - started)

    executor.execute = timed_execute


async def measure(url: str, now: datetime, passes: int) -> list[dict[str, float]]:
    settings = load_settings(
        {
            "RECONCILER_DATABASE_URL": url,
            "RECONCILER_FAILURE_HARD_LIMIT": "3",
            "RECONCILER_STATEMENT_TIMEOUT": "10m",
            "RECONCILER_PASS_TIMEOUT": "30m",
            "RECONCILER_LOG_LEVEL": "warning",
        }
    )
    pool = await db.create_pool(url, max_size=settings.pool_max_size, statement_timeout=timedelta(minutes=10))
    clock = _Clock()
    _instrument(clock)
    gc.callbacks.append(clock)
    rows: list[dict[str, float]] = []
    kept: object = None
    try:
        for index in range(passes + 2):
            clock.steps.clear()
            clock.collections = 0.0
            started = time.process_time()
            # The last result is kept until the next one, as the daemon keeps its last plan.
            kept = await run_pass(pool, settings, now)
            total = time.process_time() - started
            in_pass = clock.collections
            # What the pass deferred: the collector resumes as soon as anything allocates.
            allocated = [(number,) for number in range(100_000)]
            del allocated
            await asyncio.sleep(0.2)
            if index < 2:
                continue  # warm-up: plan caches, cold buffers
            steps = clock.steps
            row = {
                "fetch": steps.get("fetch", 0.0),
                "convert": steps.get("read", 0.0) - steps.get("fetch", 0.0),
                "plan": steps.get("plan", 0.0),
                "execute": steps.get("execute", 0.0),
            }
            row["other"] = total - sum(row.values()) - in_pass
            row["pass"] = total - in_pass
            row["gc"] = clock.collections
            row["pass+gc"] = row["pass"] + row["gc"]
            rows.append(row)
    finally:
        gc.callbacks.remove(clock)
        await pool.close()
    del kept
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.python_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", default="reconciler_bench_python_cpu", help="the fleet's database (kept)")
    parser.add_argument("--presets", type=int, default=10_000, help="active presets (default 10000)")
    parser.add_argument("--passes", type=int, default=6, help="passes measured")
    arguments = parser.parse_args(argv)
    server = os.environ.get("RECONCILER_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    parameters = fleet.FleetParameters(presets=arguments.presets, outdated_presets=arguments.presets // 5)

    async def run() -> list[dict[str, float]]:
        url, now = await ensure_fleet(server, arguments.database, parameters)
        return await measure(url, now, arguments.passes)

    rows = asyncio.run(run())

    def report(summary: Callable[[list[float]], float]) -> dict[str, float]:
        return {step: round(summary([row[step] for row in rows]) * 1000, 1) for step in STEPS}

    json.dump({"median_ms": report(statistics.median), "min_ms": report(min), "passes": len(rows)}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
