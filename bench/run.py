"""The benchmark: a synthetic fleet, then the pass measured against it.

    python -m bench.run                        # fleet L on an embedded PostgreSQL
    python -m bench.run --presets 100 --history 100000
    RECONCILER_DATABASE_URL=postgresql://... python -m bench.run   # a server of yours (a scratch database
                                                                  # is created on it and dropped after)

Measures, in one run: the server (version, fsync, synchronous_commit, full_page_writes); the reference
floor (bench/floor.sql) run alternately with the steady-state passes (median and p95 over --passes passes,
nothing to write), each pass with and without the cyclic garbage collection it defers, and its Python
(client CPU) time; the time PostgreSQL itself spends executing the pass's statements (pg_stat_statements),
its main statement's, and everything as multiples of the floor; statements per pass; a pass that must
create --creates prebuilds (creates per second); then a `reconciler run` daemon against the same database:
`/metrics` scraped over HTTP (the first scrape after each of its passes, and others; plain and gzip) and
its RSS. Prints one JSON document, then a short table. Figures are ratios within one run where possible:
these machines are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import signal
import socket
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

import aiohttp
import asyncpg

from bench import fleet
from reconciler import db, executor
from reconciler.config import load_settings
from reconciler.demo.embedded_postgres import EmbeddedPostgres
from reconciler.dsn import redact_dsn
from reconciler.logs import configure_logging
from reconciler.reconcile import PassOutcome, PassResult, run_pass

# Statements of pg_stat_statements' own bookkeeping are not the pass's.
# The statements of the pass, per statement: the main one (the snapshot) is the one that takes longest.
_STATEMENT_STATS = """
select regexp_replace(query, '\\s+', ' ', 'g') as query, calls, total_exec_time::float8 as exec_ms,
       total_plan_time::float8 as plan_ms, mean_exec_time::float8 as mean_exec_ms
from pg_stat_statements s
join pg_database d on d.oid = s.dbid
where d.datname = current_database() and s.query not ilike '%pg_stat_statements%'
order by total_exec_time desc
"""

# Marks the floor's statement in pg_stat_statements (a leading comment is kept in its text).
_FLOOR_MARK = "/* bench.floor */"
FLOOR_SQL = _FLOOR_MARK + "\n" + (Path(__file__).parent / "floor.sql").read_text(encoding="utf-8").strip().rstrip(";")

_SERVER = """
select current_setting('server_version') as version, current_setting('fsync') as fsync,
       current_setting('synchronous_commit') as synchronous_commit,
       current_setting('full_page_writes') as full_page_writes
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
            # Durable, like a production server: fsync, synchronous_commit and full_page_writes on.
            durable=True,
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
        server_row = await connection.fetchrow(_SERVER)
    finally:
        await connection.close()
    assert server_row is not None
    server_settings = dict(server_row)
    print(f"fleet generated in {generated.generate_seconds:.1f}s: {generated.row_counts}", file=sys.stderr)

    environment = {
        "RECONCILER_DATABASE_URL": database_url,
        "RECONCILER_FAILURE_HARD_LIMIT": str(fleet.FAILURE_HARD_LIMIT),
        "RECONCILER_STATEMENT_TIMEOUT": "10m",
        "RECONCILER_PASS_TIMEOUT": "30m",
        "RECONCILER_LOG_LEVEL": "warning",
    }
    settings = load_settings(environment)
    pool = await db.create_pool(database_url, max_size=settings.pool_max_size, statement_timeout=timedelta(minutes=10))
    observer = await db.connect(database_url, statement_timeout=timedelta(minutes=10))
    try:
        # Warm-up passes: the first pass of a process pays for plan caching and cold buffers.
        for _ in range(2):
            _require_success(await run_pass(pool, settings, generated.now))
            await _floor(observer, settings)
        counting = await _reset_statement_counts(observer)
        floors: list[float] = []
        durations: list[float] = []
        with_collection: list[float] = []
        collections: list[float] = []
        python_cpu: list[float] = []
        last: PassResult | None = None
        collector = _CollectionClock()
        gc.callbacks.append(collector)
        try:
            for index in range(arguments.passes + 1):
                # The floor, then a pass, alternately: both see the same machine load, as far as one can.
                floor_seconds = await _floor(observer, settings)
                if index:
                    # The pass pauses the cyclic collector; what it deferred runs once it resumes, as soon as
                    # anything allocates (here, the floor's rows): the collections between a pass and the next.
                    collections.append(collector.take())
                    with_collection.append(durations[-1] + collections[-1])
                    python_cpu[-1] += collector.take_cpu()
                if index == arguments.passes:
                    break
                floors.append(floor_seconds)
                collector.take()
                collector.take_cpu()
                cpu_started = time.process_time()
                started = time.perf_counter()
                last = _require_success(await run_pass(pool, settings, generated.now))
                durations.append(time.perf_counter() - started)
                python_cpu.append(time.process_time() - cpu_started)
                # A full pass ends with the collection it deferred, inside its duration and CPU time: only
                # the collections after it are added below.
                collector.take()
                collector.take_cpu()
        finally:
            gc.callbacks.remove(collector)
        statements = [dict(row) for row in await observer.fetch(_STATEMENT_STATS)] if counting else []
        assert last is not None
        assert last.plan is not None
        assert last.execution is not None
        wrote = last.execution.created + last.execution.deleted + last.execution.canceled

        # Two create passes in the same run: one transaction per preset (a batch of one: as before batching
        # existed), then batched as the daemon does. Each creates --creates prebuilds.
        create_passes: dict[str, dict[str, float]] = {}
        batch_size = executor.CREATE_BATCH_SIZE
        try:
            for mode, size in (("one_per_transaction", 1), ("batched", batch_size)):
                executor.CREATE_BATCH_SIZE = size
                changed = await fleet.raise_targets(observer, arguments.creates)
                await observer.execute("analyze template_version_presets")
                create_started = time.perf_counter()
                creating = _require_success(await run_pass(pool, settings, generated.now))
                create_seconds = time.perf_counter() - create_started
                assert creating.execution is not None
                created = creating.execution.created
                create_passes[mode] = {
                    "batch_size": size,
                    "presets_changed": changed,
                    "created": created,
                    "seconds": round(create_seconds, 3),
                    "creates_per_second": round(created / create_seconds, 1) if create_seconds else 0.0,
                }
        finally:
            executor.CREATE_BATCH_SIZE = batch_size
    finally:
        await observer.close()
        await pool.close()

    daemon = await measure_daemon(environment, arguments.daemon_passes) if arguments.daemon_passes else None

    floor_statement = next((row for row in statements if _FLOOR_MARK in row["query"]), None)
    pass_statements = [row for row in statements if _FLOOR_MARK not in row["query"]]
    main_statement = pass_statements[0] if pass_statements else None
    database_ms = (
        sum(row["exec_ms"] + row["plan_ms"] for row in pass_statements) / arguments.passes if counting else None
    )
    calls = sum(row["calls"] for row in pass_statements)
    floor_median = statistics.median(floors)
    median = statistics.median(durations)
    median_with_collection = statistics.median(with_collection)
    floor_server_ms = floor_statement["mean_exec_ms"] if floor_statement else None
    return {
        "server": server_settings,
        "fleet": generated.as_json(),
        "floor": {
            "median_ms": _milliseconds(floor_median),
            "p95_ms": _milliseconds(_percentile(floors, 0.95)),
            "server_mean_ms": round(floor_server_ms, 1) if floor_server_ms is not None else None,
        },
        "steady_state_pass": {
            "passes": arguments.passes,
            "median_ms": _milliseconds(median),
            "p95_ms": _milliseconds(_percentile(durations, 0.95)),
            "min_ms": _milliseconds(min(durations)),
            "median_with_collection_ms": _milliseconds(median_with_collection),
            "collection_median_ms": _milliseconds(statistics.median(collections)),
            "python_cpu_median_ms": _milliseconds(statistics.median(python_cpu)),
            "to_floor": round(median / floor_median, 2),
            "with_collection_to_floor": round(median_with_collection / floor_median, 2),
            # Each pass against the floor run just before it: less sensitive to load that comes and goes.
            "to_floor_pairwise_median": round(
                statistics.median(d / f for d, f in zip(with_collection, floors, strict=True)), 2
            ),
            # None when the server does not preload pg_stat_statements: nothing counts the statements.
            "database_ms_per_pass": round(database_ms, 1) if database_ms is not None else None,
            "pass_to_database_ratio": round(median * 1000 / database_ms, 2) if database_ms else None,
            "main_statement_server_ms": round(main_statement["mean_exec_ms"], 1) if main_statement else None,
            "main_statement_to_floor": (
                round(main_statement["mean_exec_ms"] / floor_server_ms, 2)
                if main_statement and floor_server_ms
                else None
            ),
            "main_statement": main_statement["query"][:90] if main_statement else None,
            "statements_per_pass": round(calls / arguments.passes, 2) if counting else None,
            "distinct_statements": len(pass_statements) if counting else None,
            "rows_written": wrote,
            "presets_planned": len(last.plan.presets),
            "top_statements": [
                {"query": row["query"][:90], "calls": row["calls"], "ms": round(row["exec_ms"], 1)}
                for row in pass_statements[:5]
            ],
        },
        "create_pass": {"requested": arguments.creates, **create_passes},
        "daemon": daemon,
        # ru_maxrss is in kilobytes on Linux.
        "benchmark_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


class _CollectionClock:
    """A gc callback: the wall and CPU time of the cyclic collections since last taken."""

    def __init__(self) -> None:
        self._started = (0.0, 0.0)
        self._seconds = 0.0
        self._cpu = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        del info
        if phase == "start":
            self._started = (time.perf_counter(), time.process_time())
        else:
            self._seconds += time.perf_counter() - self._started[0]
            self._cpu += time.process_time() - self._started[1]

    def take(self) -> float:
        seconds, self._seconds = self._seconds, 0.0
        return seconds

    def take_cpu(self) -> float:
        cpu, self._cpu = self._cpu, 0.0
        return cpu


async def _floor(connection: asyncpg.Connection, settings: Any) -> float:
    started = time.perf_counter()
    await connection.fetch(FLOOR_SQL, settings.backoff_lookback, settings.failure_hard_limit)
    return time.perf_counter() - started


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _memory_mb(pid: int) -> dict[str, float]:
    """The process's resident set now and its peak (VmRSS, VmHWM), in MB."""
    figures = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            figures[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mb": figures.get("VmRSS", 0.0), "peak_rss_mb": figures.get("VmHWM", 0.0)}


async def _scrape(session: aiohttp.ClientSession, url: str, gzipped: bool) -> tuple[float, int]:
    headers = {"Accept-Encoding": "gzip" if gzipped else "identity"}
    started = time.perf_counter()
    async with session.get(url, headers=headers) as response:
        body = await response.read()
        response.raise_for_status()
    return time.perf_counter() - started, len(body)


async def measure_daemon(environment: dict[str, str], passes: int) -> dict[str, Any]:
    """A `reconciler run` daemon against the bench database: its /metrics over HTTP, and its RSS.

    The first scrape of each pass is sent as soon as the daemon logs the pass (as a Prometheus scrape
    that happens to come right then would); then others, plain and gzipped, until the next pass.
    """
    port = _free_port()
    daemon_environment = {
        **os.environ,
        **environment,
        "RECONCILER_HTTP_ADDRESS": f"127.0.0.1:{port}",
        "RECONCILER_RECONCILIATION_INTERVAL": "8s",
        "RECONCILER_LOG_FORMAT": "json",
        "RECONCILER_LOG_LEVEL": "info",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "reconciler",
        "run",
        env=daemon_environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    url = f"http://127.0.0.1:{port}/metrics"
    first: dict[bool, list[float]] = {True: [], False: []}
    other: dict[bool, list[float]] = {True: [], False: []}
    sizes: dict[bool, int] = {}
    pass_seconds: list[float] = []
    memory: dict[str, float] = {}
    seen = 0
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            while seen < passes:
                line = await asyncio.wait_for(process.stdout.readline(), 600)
                if not line:
                    raise SystemExit("benchmark: the daemon exited")
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") != "reconcile.pass" or event.get("outcome") != "success":
                    continue
                seen += 1
                pass_seconds.append(float(event["duration_seconds"]))
                gzipped = seen % 2 == 0
                seconds, sizes[gzipped] = await _scrape(session, url, gzipped)
                first[gzipped].append(seconds)
                for index in range(6):
                    await asyncio.sleep(0.3)
                    seconds, size = await _scrape(session, url, index % 2 == 0)
                    other[index % 2 == 0].append(seconds)
                    sizes[index % 2 == 0] = size
        memory = _memory_mb(process.pid)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 30)
            if process.returncode is None:
                process.kill()
                await process.wait()

    def figures(values: list[float]) -> dict[str, float] | None:
        if not values:
            return None
        return {"median_ms": _milliseconds(statistics.median(values)), "max_ms": _milliseconds(max(values))}

    return {
        "passes": seen,
        "pass_median_ms": _milliseconds(statistics.median(pass_seconds)),
        "scrape_plain_bytes": sizes.get(False),
        "scrape_gzip_bytes": sizes.get(True),
        "first_scrape_after_pass_plain": figures(first[False]),
        "first_scrape_after_pass_gzip": figures(first[True]),
        "other_scrapes_plain": figures(other[False]),
        "other_scrapes_gzip": figures(other[True]),
        **memory,
    }


def _require_success(result: PassResult) -> PassResult:
    if result.outcome is not PassOutcome.SUCCESS:
        raise SystemExit(f"benchmark: a pass did not succeed: {result.outcome.value} {result.error or ''}")
    return result


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator else "-"


def table(report: dict[str, Any]) -> str:
    steady, create, floor, server = (
        report["steady_state_pass"],
        report["create_pass"],
        report["floor"],
        report["server"],
    )
    counts = report["fleet"]["row_counts"]
    daemon = report["daemon"]
    rows = [
        (
            "server",
            f"PostgreSQL {server['version']}, fsync={server['fsync']}, synchronous_commit="
            f"{server['synchronous_commit']}, full_page_writes={server['full_page_writes']}",
        ),
        ("presets / live prebuilds / builds", f"{counts['presets']} / {counts['live_prebuilds']} / {counts['builds']}"),
        ("floor (bench/floor.sql) median", f"{floor['median_ms']} ms (server {floor['server_mean_ms']} ms)"),
        ("steady pass median / p95", f"{steady['median_ms']} ms / {steady['p95_ms']} ms ({steady['to_floor']}x floor)"),
        (
            "steady pass + deferred GC",
            f"{steady['median_with_collection_ms']} ms ({steady['with_collection_to_floor']}x floor; "
            f"pairwise {steady['to_floor_pairwise_median']}x; GC {steady['collection_median_ms']} ms)",
        ),
        ("Python CPU per pass (with GC)", f"{steady['python_cpu_median_ms']} ms"),
        (
            "main statement, server time",
            f"{steady['main_statement_server_ms']} ms ({steady['main_statement_to_floor']}x floor's server time)",
        ),
        ("database time per pass", f"{steady['database_ms_per_pass']} ms (pass/db {steady['pass_to_database_ratio']})"),
        ("statements per pass", str(steady["statements_per_pass"])),
        *(
            (
                f"create pass, {mode.replace('_', ' ')}",
                f"{create[mode]['created']} in {create[mode]['seconds']} s ({create[mode]['creates_per_second']}/s)",
            )
            for mode in ("one_per_transaction", "batched")
        ),
        (
            "creates batched / one per transaction",
            _ratio(create["batched"]["creates_per_second"], create["one_per_transaction"]["creates_per_second"]),
        ),
    ]
    if daemon:

        def scrape(figures: dict[str, float] | None) -> str:
            return f"median {figures['median_ms']} / max {figures['max_ms']} ms" if figures else "-"

        rows += [
            ("daemon passes (its own log)", f"{daemon['passes']}, median {daemon['pass_median_ms']} ms"),
            ("/metrics first after pass, plain", scrape(daemon["first_scrape_after_pass_plain"])),
            ("/metrics first after pass, gzip", scrape(daemon["first_scrape_after_pass_gzip"])),
            ("/metrics other scrapes, plain", scrape(daemon["other_scrapes_plain"])),
            ("/metrics other scrapes, gzip", scrape(daemon["other_scrapes_gzip"])),
            ("/metrics bytes plain / gzip", f"{daemon['scrape_plain_bytes']} / {daemon['scrape_gzip_bytes']}"),
            ("daemon RSS / peak", f"{daemon['rss_mb']} MB / {daemon['peak_rss_mb']} MB"),
        ]
    rows.append(("benchmark process peak RSS", f"{report['benchmark_peak_rss_mb']} MB"))
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
    parser.add_argument(
        "--daemon-passes", type=int, default=6, help="passes of the `reconciler run` daemon scraped (0: none)"
    )
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
