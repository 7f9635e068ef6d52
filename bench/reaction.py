"""Reaction to a claim at fleet L (issue 16.1): from the claim's commit to its replacement's create commit.

    RECONCILER_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m bench.reaction

On a scratch database with the fleet (default fleet L: 10,000 active presets x 5 prebuilds, 2,000
outdated, 1,000,000 builds), a `reconciler run` process (the daemon, as deployed: its own process, the
default 1-minute interval, change events on) reconciles while this benchmark claims --claims prebuilds
(200) at random moments (uniform gaps of 0 to --max-gap seconds), each in a transaction of its own as the
platform would, each of a different template. A row trigger of the benchmark's own on `workspaces`
inserts notifies `bench_created` with the new workspace's template: its delivery is the commit of the
replacement's create. The reaction is the time from the claim's COMMIT returning here to that delivery,
both read on this process's clock. Also reported: the targeted passes' durations (the daemon's
`reconcile.pass` log lines, `scope` targeted), and the daemon's RSS.

With `--interval` short (say 3s), full passes run back to back, so that claims land during them; each
claim is told apart by whether a full pass held the pass lock at its commit (the full passes'
`lock_held_from`/`lock_held_until`). With `--compare-with DIR` (a source tree of another build of the
reconciler, e.g. `git archive COMMIT reconciler sql | tar -x -C DIR`), the run alternates phases of that
build's daemon (`before`) and this one's (`after`) on the same fleet, `--rounds` times each, every phase
with `--claims` claims of templates no other phase claimed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg

from bench import fleet
from bench.run import scratch_database, server
from reconciler import db
from reconciler.dsn import redact_dsn
from reconciler.logs import configure_logging
from reconciler.snapshot import PREBUILDS_SYSTEM_USER_ID

_CREATED_TRIGGER = """
create function bench_workspace_created() returns trigger language plpgsql as $$
begin
    if new.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0' then
        perform pg_notify('bench_created', new.template_id::text);
    end if;
    return null;
end $$;
create trigger bench_workspace_created after insert on workspaces
    for each row execute function bench_workspace_created();
"""

# One ready, running prebuild of an active plain preset per template, in random order.
_CANDIDATES = """
select distinct on (w.template_id) w.id, w.template_id
from workspaces w
join lateral (
    select b.template_version_preset_id, b.job_id from workspace_builds b
    where b.workspace_id = w.id order by b.build_number desc limit 1
) latest on true
join provisioner_jobs j on j.id = latest.job_id and j.job_status = 'succeeded'
join template_version_presets p on p.id = latest.template_version_preset_id and p.name like 'plain-%'
join templates t on t.id = w.template_id and t.active_version_id = p.template_version_id
where w.owner_id = $1 and not w.deleted
order by w.template_id, random()
"""


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


async def _wait_for(condition: Any, what: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not await condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"benchmark: timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def measure(database_url: str, arguments: argparse.Namespace) -> dict[str, Any]:
    parameters = fleet.FleetParameters(
        presets=arguments.presets, outdated_presets=arguments.presets // 5, history_builds=arguments.history
    )
    connection = await db.connect(database_url, statement_timeout=timedelta(hours=1))
    try:
        await db.migrate(connection)
        generated = await fleet.generate(connection, parameters)
        await connection.execute(_CREATED_TRIGGER)
        candidates = await connection.fetch(_CANDIDATES, PREBUILDS_SYSTEM_USER_ID)
        user = await connection.fetchval("select id from users where not is_system limit 1")
    finally:
        await connection.close()
    print(f"fleet generated: {generated.row_counts}", file=sys.stderr)
    random.seed(arguments.seed)
    builds: list[tuple[str, str | None]] = [("after", None)]
    if arguments.compare_with:
        builds = [("before", arguments.compare_with), ("after", None)]
    phases = [build for _ in range(arguments.rounds) for build in builds]
    chosen = random.sample(list(candidates), min(arguments.claims * len(phases), len(candidates)))
    report: dict[str, Any] = {"fleet": generated.as_json(), "phases": []}
    for number, (name, source) in enumerate(phases):
        load_before = os.getloadavg()
        rows = chosen[number * arguments.claims : (number + 1) * arguments.claims]
        phase = await _phase(database_url, arguments, rows, user, source)
        phase = {"build": name, "source": source or "this tree", **phase}
        phase["load_average_1m"] = {"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)}
        print(f"phase {number + 1}/{len(phases)} ({name}): {json.dumps(phase['reaction_ms'])}", file=sys.stderr)
        report["phases"].append(phase)
    for name, _ in builds:
        reactions = [value for phase in report["phases"] if phase["build"] == name for value in phase["_reactions"]]
        report[f"{name}_all_phases"] = _split(reactions)
    for phase in report["phases"]:
        del phase["_reactions"]
    return report


def _summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "p50": _ms(statistics.median(values)),
        "p90": _ms(_percentile(values, 0.9)),
        "p99": _ms(_percentile(values, 0.99)),
        "max": _ms(max(values)),
    }


def _split(reactions: list[tuple[float, bool]]) -> dict[str, Any]:
    """Reaction percentiles of every claim, and of those that landed during a full pass or not."""
    return {
        "all": _summary([value for value, _ in reactions]),
        "during_full_pass": _summary([value for value, during in reactions if during]),
        "outside_full_passes": _summary([value for value, during in reactions if not during]),
    }


async def _phase(
    database_url: str, arguments: argparse.Namespace, chosen: list[Any], user: Any, source: str | None
) -> dict[str, Any]:
    log_file = tempfile.NamedTemporaryFile(prefix="reconciler-bench-", suffix=".log", delete=False)  # noqa: SIM115
    environment = {
        **os.environ,
        "RECONCILER_DATABASE_URL": database_url,
        "RECONCILER_HTTP_ADDRESS": "127.0.0.1:0",
        "RECONCILER_LOG_FORMAT": "json",
        "RECONCILER_LOG_LEVEL": "info",
        "RECONCILER_FAILURE_HARD_LIMIT": str(fleet.FAILURE_HARD_LIMIT),
        "RECONCILER_EVENT_COALESCE": arguments.coalesce,
        "RECONCILER_RECONCILIATION_INTERVAL": arguments.interval,
    }
    if source:
        # The other build's package first on the path (and as the working directory, which `-m` puts first).
        environment["PYTHONPATH"] = source
    daemon = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "reconciler",
        "run",
        env=environment,
        stdout=log_file,
        stderr=log_file,
        cwd=source or None,
    )
    observer = await db.connect(database_url)
    listener = await db.connect(database_url)
    created: dict[uuid.UUID, list[float]] = {}
    try:

        async def started() -> bool:
            # The start-up pass has ended (its log line is written), and the event connection listens.
            log = await asyncio.to_thread(Path(log_file.name).read_text)
            listening = await observer.fetchval(
                "select count(*) from pg_stat_activity where application_name = 'reconciler-events'"
                " and datname = current_database()"
            )
            return '"reconcile.pass"' in log and bool(listening)

        await _wait_for(started, "the daemon's first pass and its listening connection", 600)

        def on_created(*event: Any) -> None:
            created.setdefault(uuid.UUID(event[3]), []).append(time.perf_counter())

        await listener.add_listener("bench_created", on_created)
        claimed: dict[uuid.UUID, float] = {}
        # The claims' commits in wall-clock time, to compare with the full passes' logged lock intervals.
        claimed_wall: dict[uuid.UUID, float] = {}
        for row in chosen:
            await asyncio.sleep(random.uniform(0, arguments.max_gap))
            async with observer.transaction():
                await observer.execute(
                    "update workspaces set owner_id = $1, updated_at = now() where id = $2", user, row["id"]
                )
            claimed[row["template_id"]] = time.perf_counter()
            claimed_wall[row["template_id"]] = time.time()

        def replaced_at(template: uuid.UUID) -> float | None:
            after = [at for at in created.get(template, []) if at > claimed[template]]
            return min(after) if after else None

        async def all_replaced() -> bool:
            return all(replaced_at(template) is not None for template in claimed)

        await _wait_for(all_replaced, "every replacement", 180)
        rss = _rss_mb(daemon.pid)
    finally:
        await listener.close()
        await observer.close()
        if daemon.returncode is None:
            daemon.send_signal(signal.SIGTERM)
            await asyncio.wait_for(daemon.wait(), timeout=60)
        log_file.close()
    targeted: list[float] = []
    full: list[float] = []
    full_locks: list[tuple[float, float]] = []
    deferred = 0
    text = await asyncio.to_thread(Path(log_file.name).read_text)
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "reconcile.pass" and event.get("outcome") == "success":
            (targeted if event.get("scope") == "targeted" else full).append(float(event["duration_seconds"]))
            if event.get("scope") != "targeted":
                full_locks.append((float(event["lock_held_from"]), float(event["lock_held_until"])))
                deferred += int(event.get("presets_deferred", 0))
    os.unlink(log_file.name)
    reactions = [
        (
            replaced_at(template) - at,  # type: ignore[operator]
            any(start <= claimed_wall[template] <= end for start, end in full_locks),
        )
        for template, at in claimed.items()
    ]
    return {
        "claims": len(reactions),
        "reaction_ms": _split(reactions),
        "_reactions": reactions,
        "targeted_passes": {
            "count": len(targeted),
            "median_ms": _ms(statistics.median(targeted)) if targeted else None,
            "p99_ms": _ms(_percentile(targeted, 0.99)) if targeted else None,
        },
        "full_passes": {
            "count": len(full),
            "median_ms": _ms(statistics.median(full)) if full else None,
            "presets_deferred": deferred,
        },
        "daemon_rss_mb": rss,
    }


async def _server_settings(database_url: str) -> dict[str, str]:
    connection = await asyncpg.connect(database_url)
    try:
        names = ("server_version", "fsync", "synchronous_commit", "full_page_writes")
        return {name: str(await connection.fetchval(f"show {name}")) for name in names}
    finally:
        await connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reaction", description=__doc__.split("\n\n")[0])
    defaults = fleet.FleetParameters()
    parser.add_argument("--presets", type=int, default=defaults.presets, help="active presets (default 10000)")
    parser.add_argument("--history", type=int, default=defaults.history_builds, help="builds of history")
    parser.add_argument("--claims", type=int, default=200, help="claims measured (default 200)")
    parser.add_argument("--max-gap", type=float, default=0.5, help="longest pause between claims, seconds")
    parser.add_argument("--coalesce", default="100ms", help="RECONCILER_EVENT_COALESCE of the daemon")
    parser.add_argument("--seed", type=int, default=16, help="random seed of the claims")
    parser.add_argument("--interval", default="1m", help="RECONCILER_RECONCILIATION_INTERVAL of the daemon")
    parser.add_argument("--compare-with", default=None, help="source tree of another build, run as 'before'")
    parser.add_argument("--rounds", type=int, default=1, help="phases of each build, alternated")
    arguments = parser.parse_args(argv)
    configure_logging("json", "warning", stream=open(os.devnull, "w"))  # noqa: SIM115 - for the process
    dsn = os.environ.get("RECONCILER_DATABASE_URL")

    async def run() -> dict[str, Any]:
        if dsn:
            print(f"benchmark: using the server of {redact_dsn(dsn)} (a scratch database)", file=sys.stderr)
        async with server(dsn, None) as server_dsn, scratch_database(server_dsn) as database_url:
            report = await measure(database_url, arguments)
            report["server"] = await _server_settings(database_url)
            return report

    report = {"generated_by": "bench.reaction", "arguments": vars(arguments), **asyncio.run(run())}
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
