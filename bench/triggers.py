"""What the change-event triggers (migration 0007) cost the platform's own writes.

    RECONCILER_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m bench.triggers

On a scratch database with a small fleet (--presets, default 1,000 presets of 5 prebuilds, 100,000 builds), the
platform's writes that the triggers watch are timed one transaction each, as the platform runs them,
with the triggers enabled and disabled in alternating rounds of the same run (these machines are noisy;
each round starts by re-planning every statement, untimed, since the ALTER TABLE that switches the
triggers invalidates the cached plans):

- claim: a prebuild's owner becomes a user (notifies);
- touch: another update of a claimed workspace (the trigger runs, finds nothing to say);
- job start: a provisioner takes a prebuild's job (runs, nothing to say);
- job finish: `complete_provisioner_job` of the platform's provisioner (notifies);
- preset change: a preset's target raised (notifies).

Each is reported as the median time of the statement alone and of the statement with its commit (the
notification is queued at commit), with and without triggers, and the ratio. A connection LISTENs
throughout, as the daemon would. Inserts are not watched by any trigger (creates are the daemon's own).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench import fleet
from bench.run import scratch_database, server
from reconciler import db
from reconciler.dsn import redact_dsn
from reconciler.logs import configure_logging
from reconciler.snapshot import PREBUILDS_SYSTEM_USER_ID

_TRIGGERS = {
    "workspaces": ("reconciler_workspaces_changed",),
    "provisioner_jobs": ("reconciler_jobs_finished",),
    "template_version_presets": ("reconciler_presets_inserted", "reconciler_presets_updated"),
}
_CLAIM = "update workspaces set owner_id = $2, updated_at = now() where id = $1"
_TOUCH = "update workspaces set updated_at = now() where id = $1"
_START = "update provisioner_jobs set started_at = now(), worker_id = $2, updated_at = now() where id = $1"
_RAISE = "update template_version_presets set desired_instances = desired_instances + 1 where id = $1"
_NOBODY = uuid.UUID(int=0)
_WORKER = uuid.UUID("00000000-0000-0000-0000-00000000b0b0")

# Prebuilds that get a pending job of their own (a stop build), for the provisioner's writes to act on.
_PENDING_JOBS = """
with picked as (
    select w.id as workspace_id, w.organization_id,
           (select max(b.build_number) from workspace_builds b where b.workspace_id = w.id) as last_number,
           (select b.template_version_id from workspace_builds b where b.workspace_id = w.id
            order by b.build_number desc limit 1) as version_id,
           gen_random_uuid() as job_id
    from workspaces w
    where w.owner_id = $1 and not w.deleted and w.id <> all($3::uuid[])
    order by w.id
    limit $2
),
jobs as (
    insert into provisioner_jobs (id, organization_id, initiator_id, created_at, updated_at)
    select job_id, organization_id, $1, now(), now() from picked
)
insert into workspace_builds (workspace_id, build_number, transition, template_version_id, job_id, initiator_id)
select workspace_id, last_number + 1, 'stop', version_id, job_id, $1 from picked
returning job_id
"""


def _median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 3)


async def _set_triggers(connection: asyncpg.Connection, enabled: bool) -> None:
    verb = "enable" if enabled else "disable"
    for table, names in _TRIGGERS.items():
        for name in names:
            await connection.execute(f"alter table {table} {verb} trigger {name}")


async def _timed(connection: asyncpg.Connection, sql: str, *arguments: object) -> tuple[float, float]:
    """(statement seconds, statement + commit seconds) of one transaction."""
    started = time.perf_counter()
    transaction = connection.transaction()
    await transaction.start()
    await connection.fetch(sql, *arguments)
    executed = time.perf_counter()
    await transaction.commit()
    return executed - started, time.perf_counter() - started


async def measure(database_url: str, arguments: argparse.Namespace) -> dict[str, Any]:
    parameters = fleet.FleetParameters(
        presets=arguments.presets, outdated_presets=arguments.presets // 5, history_builds=arguments.history
    )
    connection = await db.connect(database_url, statement_timeout=timedelta(hours=1))
    listener = await db.connect(database_url)
    received: list[str] = []
    try:
        await db.migrate(connection)
        generated = await fleet.generate(connection, parameters)
        await listener.add_listener("reconciler_events", lambda *event: received.append(event[3]))
        per_mode = arguments.rounds * arguments.operations
        user = await connection.fetchval("select id from users where not is_system limit 1")
        prebuilds = [
            row["id"]
            for row in await connection.fetch(
                "select id from workspaces where owner_id = $1 and not deleted order by id limit $2",
                PREBUILDS_SYSTEM_USER_ID,
                2 * per_mode,
            )
        ]
        job_ids = [
            row["job_id"]
            for row in await connection.fetch(_PENDING_JOBS, PREBUILDS_SYSTEM_USER_ID, 2 * per_mode, prebuilds)
        ]
        claimed = [
            row["id"]
            for row in await connection.fetch(
                "select id from workspaces where owner_id <> $1 and not deleted order by id limit $2",
                PREBUILDS_SYSTEM_USER_ID,
                per_mode,
            )
        ]
        presets = [
            row["id"]
            for row in await connection.fetch(
                "select id from template_version_presets where desired_instances is not null order by id limit $1",
                per_mode,
            )
        ]
        await connection.execute("vacuum analyze workspaces, provisioner_jobs, workspace_builds")
        complete = db.queries_in("platform.sql")["complete_provisioner_job"]
        if len(prebuilds) < 2 * per_mode or len(job_ids) < 2 * per_mode or not claimed or not presets:
            raise SystemExit("benchmark: the fleet is too small for this many operations; raise --presets")
        # Claims and jobs are used once each: the first half of each list for one mode, the rest for the
        # other, interleaved by round.
        claim_ids, start_ids, finish_ids = iter(prebuilds), iter(job_ids), iter(job_ids)
        timings: dict[str, dict[bool, tuple[list[float], list[float]]]] = {}

        def record(name: str, enabled: bool, pair: tuple[float, float]) -> None:
            statement, committed = timings.setdefault(name, {True: ([], []), False: ([], [])})[enabled]
            statement.append(pair[0])
            committed.append(pair[1])

        for round_number in range(arguments.rounds):
            # Alternate which mode goes first, so that a drift of the machine favours neither.
            for enabled in (True, False) if round_number % 2 == 0 else (False, True):
                await _set_triggers(connection, enabled)
                # The ALTER invalidated the cached plans: re-plan each statement (on no row) untimed.
                for sql in (_CLAIM, _START):
                    await connection.execute(sql, _NOBODY, _WORKER)
                for sql in (_TOUCH, _RAISE):
                    await connection.execute(sql, _NOBODY)
                await connection.fetch(complete, _NOBODY, _WORKER, datetime.now(UTC), None, None)
                for index in range(arguments.operations):
                    record("claim", enabled, await _timed(connection, _CLAIM, next(claim_ids), user))
                    record("touch", enabled, await _timed(connection, _TOUCH, claimed[index % len(claimed)]))
                    record("job start", enabled, await _timed(connection, _START, next(start_ids), _WORKER))
                    record("preset change", enabled, await _timed(connection, _RAISE, presets[index % len(presets)]))
                # Finish the jobs this mode started, in the same order.
                for _ in range(arguments.operations):
                    finished = (next(finish_ids), _WORKER, datetime.now(UTC), None, None)
                    record("job finish", enabled, await _timed(connection, complete, *finished))
        await _set_triggers(connection, True)
        await asyncio.sleep(0.2)
    finally:
        await listener.close()
        await connection.close()

    operations: dict[str, Any] = {}
    for name, modes in timings.items():
        with_statement, with_committed = modes[True]
        without_statement, without_committed = modes[False]
        operations[name] = {
            "count_per_mode": len(with_statement),
            "statement_ms": {"with": _median_ms(with_statement), "without": _median_ms(without_statement)},
            "statement_ratio": round(statistics.median(with_statement) / statistics.median(without_statement), 3),
            "with_commit_ms": {"with": _median_ms(with_committed), "without": _median_ms(without_committed)},
            "with_commit_ratio": round(statistics.median(with_committed) / statistics.median(without_committed), 3),
        }
    return {
        "fleet": generated.as_json(),
        "rounds": arguments.rounds,
        "operations_per_round": arguments.operations,
        "notifications_received": len(received),
        "operations": operations,
    }


async def _server_settings(database_url: str) -> dict[str, str]:
    connection = await asyncpg.connect(database_url)
    try:
        names = ("server_version", "fsync", "synchronous_commit", "full_page_writes")
        return {name: str(await connection.fetchval(f"show {name}")) for name in names}
    finally:
        await connection.close()


def table(report: dict[str, Any]) -> str:
    lines = [
        "| write | statement ms with / without | ratio | with commit ms with / without | ratio |",
        "|---|---|---|---|---|",
    ]
    for name, figures in report["operations"].items():
        statement, committed = figures["statement_ms"], figures["with_commit_ms"]
        lines.append(
            f"| {name} | {statement['with']} / {statement['without']} | {figures['statement_ratio']} "
            f"| {committed['with']} / {committed['without']} | {figures['with_commit_ratio']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.triggers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", type=int, default=1_000, help="active presets of the fleet (default 1000)")
    parser.add_argument("--history", type=int, default=100_000, help="builds of history (default 100000)")
    parser.add_argument("--rounds", type=int, default=20, help="alternating rounds per mode (default 20)")
    parser.add_argument("--operations", type=int, default=30, help="writes of each kind per round (default 30)")
    arguments = parser.parse_args(argv)
    dsn = os.environ.get("RECONCILER_DATABASE_URL")
    # The migrations' log lines would mix with the JSON document on stdout.
    configure_logging("json", "warning", stream=open(os.devnull, "w"))  # noqa: SIM115 - for the process

    async def run() -> dict[str, Any]:
        if dsn:
            print(f"benchmark: using the server of {redact_dsn(dsn)} (a scratch database)", file=sys.stderr)
        async with server(dsn, None) as server_dsn, scratch_database(server_dsn) as database_url:
            report = await measure(database_url, arguments)
            report["server"] = await _server_settings(database_url)
            return report

    report = {"generated_by": "bench.triggers", "arguments": vars(arguments), **asyncio.run(run())}
    print(json.dumps(report, indent=2, default=str))
    print(table(report), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
