"""The benchmark: a synthetic fleet, then the pass measured against it.

    python -m bench.run                        # fleet L on an embedded PostgreSQL
    python -m bench.run --presets 100 --history 100000
    RECONCILER_DATABASE_URL=postgresql://... python -m bench.run   # a server of yours (a scratch database
                                                                  # is created on it and dropped after)

Measures, in one run: the steady-state pass (median and p95 over --passes passes, nothing to write), the
time PostgreSQL itself spends executing that pass's statements (pg_stat_statements) and the ratio of the
two, statements per pass, a pass that must create --creates prebuilds (creates per second), the time of a
`/metrics` scrape served from the last pass, and the peak RSS of this process. Prints one JSON document,
then a short table. Figures are ratios within one run where possible: these machines are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from bench import fleet
from reconciler import db
from reconciler.config import load_settings
from reconciler.demo.embedded_postgres import EmbeddedPostgres
from reconciler.dsn import redact_dsn
from reconciler.logs import configure_logging
from reconciler.metrics import Metrics
from reconciler.reconcile import PassOutcome, PassResult, run_pass

# Statements of pg_stat_statements' own bookkeeping, and of the benchmark's reads, are not the pass's.
_STATEMENT_TOTALS = """
select count(*) as statements, coalesce(sum(calls), 0)::bigint as calls,
       coalesce(sum(total_exec_time), 0)::float8 as exec_ms,
       coalesce(sum(total_plan_time), 0)::float8 as plan_ms
from pg_stat_statements s
join pg_database d on d.oid = s.dbid
where d.datname = current_database() and s.query not ilike '%pg_stat_statements%'
"""

_TOP_STATEMENTS = """
select left(regexp_replace(query, '\\s+', ' ', 'g'), 90) as query, calls, round(total_exec_time::numeric, 1) as ms
from pg_stat_statements s
join pg_database d on d.oid = s.dbid
where d.datname = current_database() and s.query not ilike '%pg_stat_statements%'
order by total_exec_time desc
limit 5
"""


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


@asynccontextmanager
async def scratch_database(server_dsn: str) -> AsyncIterator[str]:
    """A fresh database on the server, dropped afterwards (the fleet is large; leave nothing behind)."""
    name = f"reconciler_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'create database "{name}"')
        try:
            yield _with_database(server_dsn, name)
        finally:
            await admin.execute(f'drop database if exists "{name}" with (force)')
    finally:
        await admin.close()


@asynccontextmanager
async def server(dsn: str | None, data_directory: str | None) -> AsyncIterator[str]:
    if dsn:
        yield _with_database(dsn, "postgres")
        return
    with tempfile.TemporaryDirectory(prefix="reconciler-bench-") as temporary:
        embedded = EmbeddedPostgres(
            Path(data_directory or temporary) / "data",
            # Room for a fleet of a million builds: the defaults are sized for a laptop's test suite.
            extra_settings={"shared_buffers": "512MB", "max_wal_size": "4GB", "checkpoint_timeout": "30min"},
        )
        embedded.start()
        try:
            yield embedded.dsn()
        finally:
            embedded.stop(mode="immediate")


def _milliseconds(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def _statement_totals(connection: asyncpg.Connection) -> dict[str, float]:
    row = await connection.fetchrow(_STATEMENT_TOTALS)
    assert row is not None
    return {key: float(value) for key, value in row.items()}


async def _reset_statement_counts(connection: asyncpg.Connection) -> bool:
    """Reset pg_stat_statements; False when the server does not preload it (the other figures still count)."""
    try:
        await connection.execute("select pg_stat_statements_reset()")
    except asyncpg.ObjectNotInPrerequisiteStateError:
        print(
            "benchmark: pg_stat_statements is not in shared_preload_libraries: no database time or statement counts",
            file=sys.stderr,
        )
        return False
    return True


async def measure(database_url: str, arguments: argparse.Namespace) -> dict[str, Any]:
    parameters = fleet.FleetParameters(
        presets=arguments.presets,
        desired=arguments.desired,
        outdated_presets=arguments.outdated if arguments.outdated is not None else arguments.presets // 5,
        history_builds=arguments.history,
    )
    connection = await db.connect(database_url, statement_timeout=timedelta(hours=1))
    try:
        await db.migrate(connection)
        await connection.execute("create extension if not exists pg_stat_statements")
        generated = await fleet.generate(connection, parameters)
    finally:
        await connection.close()
    print(f"fleet generated in {generated.generate_seconds:.1f}s: {generated.row_counts}", file=sys.stderr)

    settings = load_settings(
        {
            "RECONCILER_DATABASE_URL": database_url,
            "RECONCILER_FAILURE_HARD_LIMIT": str(fleet.FAILURE_HARD_LIMIT),
            "RECONCILER_STATEMENT_TIMEOUT": "10m",
            "RECONCILER_LOG_LEVEL": "warning",
        }
    )
    pool = await db.create_pool(database_url, max_size=settings.pool_max_size, statement_timeout=timedelta(minutes=10))
    observer = await db.connect(database_url)
    try:
        # Warm-up passes: the first pass of a process pays for plan caching and cold buffers.
        for _ in range(2):
            _require_success(await run_pass(pool, settings, generated.now))
        counting = await _reset_statement_counts(observer)
        durations: list[float] = []
        last: PassResult | None = None
        for _ in range(arguments.passes):
            started = time.perf_counter()
            last = _require_success(await run_pass(pool, settings, generated.now))
            durations.append(time.perf_counter() - started)
        totals = await _statement_totals(observer) if counting else None
        top = [dict(row) for row in await observer.fetch(_TOP_STATEMENTS)] if counting else []
        assert last is not None
        assert last.plan is not None
        assert last.execution is not None
        wrote = last.execution.created + last.execution.deleted + last.execution.canceled

        metrics = Metrics(process_metrics=False)
        metrics.presets.update_from_plan(last.plan)
        scrape_started = time.perf_counter()
        # What /metrics does: the registry's text with the per-preset series rendered from the pass.
        exposition = metrics.render()
        scrape_seconds = time.perf_counter() - scrape_started

        changed = await fleet.raise_targets(observer, arguments.creates)
        await observer.execute("analyze template_version_presets")
        create_started = time.perf_counter()
        creating = _require_success(await run_pass(pool, settings, generated.now))
        create_seconds = time.perf_counter() - create_started
        assert creating.execution is not None
        created = creating.execution.created
    finally:
        await observer.close()
        await pool.close()

    database_ms = (totals["exec_ms"] + totals["plan_ms"]) / arguments.passes if totals else None
    median = statistics.median(durations)
    return {
        "fleet": generated.as_json(),
        "steady_state_pass": {
            "passes": arguments.passes,
            "median_ms": _milliseconds(median),
            "p95_ms": _milliseconds(_percentile(durations, 0.95)),
            "min_ms": _milliseconds(min(durations)),
            # None when the server does not preload pg_stat_statements: nothing counts the statements.
            "database_ms_per_pass": round(database_ms, 1) if database_ms is not None else None,
            "pass_to_database_ratio": round(median * 1000 / database_ms, 2) if database_ms else None,
            "statements_per_pass": round(totals["calls"] / arguments.passes, 2) if totals else None,
            "distinct_statements": int(totals["statements"]) if totals else None,
            "rows_written": wrote,
            "presets_planned": len(last.plan.presets),
            "top_statements": top,
        },
        "create_pass": {
            "requested": arguments.creates,
            "presets_changed": changed,
            "created": created,
            "seconds": round(create_seconds, 3),
            "creates_per_second": round(created / create_seconds, 1) if create_seconds else None,
        },
        "metrics_scrape": {"ms": _milliseconds(scrape_seconds), "bytes": len(exposition)},
        # ru_maxrss is in kilobytes on Linux.
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _require_success(result: PassResult) -> PassResult:
    if result.outcome is not PassOutcome.SUCCESS:
        raise SystemExit(f"benchmark: a pass did not succeed: {result.outcome.value} {result.error or ''}")
    return result


def table(report: dict[str, Any]) -> str:
    steady, create = report["steady_state_pass"], report["create_pass"]
    counts = report["fleet"]["row_counts"]
    rows = [
        ("presets / live prebuilds / builds", f"{counts['presets']} / {counts['live_prebuilds']} / {counts['builds']}"),
        ("steady pass median / p95", f"{steady['median_ms']} ms / {steady['p95_ms']} ms"),
        ("database time per pass", f"{steady['database_ms_per_pass']} ms (pass/db {steady['pass_to_database_ratio']})"),
        ("statements per pass", str(steady["statements_per_pass"])),
        ("create pass", f"{create['created']} in {create['seconds']} s ({create['creates_per_second']}/s)"),
        ("/metrics scrape", f"{report['metrics_scrape']['ms']} ms ({report['metrics_scrape']['bytes']} bytes)"),
        ("peak RSS", f"{report['peak_rss_mb']} MB"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    defaults = fleet.FleetParameters()
    parser.add_argument("--presets", type=int, default=defaults.presets, help="active presets (default 10000)")
    parser.add_argument("--desired", type=int, default=defaults.desired, help="desired prebuilds per preset")
    parser.add_argument("--outdated", type=int, default=None, help="outdated presets (default presets/5)")
    parser.add_argument("--history", type=int, default=defaults.history_builds, help="builds of history")
    parser.add_argument("--passes", type=int, default=10, help="steady-state passes measured (at least 10)")
    parser.add_argument("--creates", type=int, default=10_000, help="prebuilds the create pass must make")
    parser.add_argument("--data-dir", default=None, help="keep the embedded server's data here")
    parser.add_argument("--output", default=None, help="also write the JSON document to this file")
    arguments = parser.parse_args(argv)
    if arguments.passes < 1:
        parser.error("--passes must be at least 1")
    return arguments


async def main_async(arguments: argparse.Namespace) -> dict[str, Any]:
    dsn = os.environ.get("RECONCILER_DATABASE_URL")
    if dsn:
        print(f"benchmark: using the server of {redact_dsn(dsn)} (a scratch database)", file=sys.stderr)
    async with server(dsn, arguments.data_dir) as server_dsn, scratch_database(server_dsn) as database_url:
        return await measure(database_url, arguments)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    # As in production: JSON at warning level (the hard-limited presets warn every pass), written to a
    # sink that costs nothing, so that the pass pays for its logging but the report stays readable.
    configure_logging("json", "warning", stream=open(os.devnull, "w"))  # noqa: SIM115 - for the process
    report = asyncio.run(main_async(arguments))
    report = {"generated_by": "bench.run", "arguments": vars(arguments), **report}
    document = json.dumps(report, indent=2, default=str)
    print(document)
    if arguments.output:
        Path(arguments.output).write_text(document + "\n", encoding="utf-8")
    print(table(report), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
