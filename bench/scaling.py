"""The scaling table of bench/README.md: the benchmark at several fleet sizes, on one server, in one run.

    python -m bench.scaling                  # P = 100, 1,000, 10,000 at 1M builds, and 10,000 at 4M
    python -m bench.scaling --quick          # smaller histories, for a look in a minute

Prints a Markdown table (and the JSON of every run to --output when given).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from bench.run import measure, parse_arguments, scratch_database, server
from reconciler.logs import configure_logging

FULL = [(100, 1_000_000), (1_000, 1_000_000), (10_000, 1_000_000), (10_000, 4_000_000)]
QUICK = [(100, 50_000), (1_000, 100_000), (10_000, 200_000)]


def row(report: dict[str, Any]) -> str:
    steady = report["steady_state_pass"]
    counts = report["fleet"]["row_counts"]
    create = report["create_pass"]
    return (
        f"| {counts['presets']:,} | {counts['builds']:,} | {counts['live_prebuilds']:,} | {steady['median_ms']} "
        f"| {steady['p95_ms']} | {steady['database_ms_per_pass']} | {steady['pass_to_database_ratio']} "
        f"| {steady['statements_per_pass']} | {create['creates_per_second']} | {report['metrics_scrape']['ms']} "
        f"| {report['peak_rss_mb']} |"
    )


HEADER = (
    "| presets | builds | live prebuilds | pass median ms | p95 ms | db ms | pass/db | statements | creates/s "
    "| scrape ms | peak RSS MB |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


async def run(configurations: list[tuple[int, int]], creates: int) -> list[dict[str, Any]]:
    reports = []
    async with server(os.environ.get("RECONCILER_DATABASE_URL"), None) as server_dsn:
        for presets, history in configurations:
            arguments = parse_arguments(
                ["--presets", str(presets), "--history", str(history), "--creates", str(min(creates, presets))]
            )
            async with scratch_database(server_dsn) as database_url:
                report = await measure(database_url, arguments)
            print(row(report), file=sys.stderr)
            reports.append(report)
    return reports


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller histories")
    parser.add_argument("--creates", type=int, default=10_000, help="creates of the create pass (capped at P)")
    parser.add_argument("--output", default=None, help="write every run's JSON here")
    arguments = parser.parse_args()
    # As in production: JSON at warning level (the hard-limited presets warn every pass), written to a
    # sink that costs nothing, so that the pass pays for its logging but the report stays readable.
    configure_logging("json", "warning", stream=open(os.devnull, "w"))  # noqa: SIM115 - for the process
    reports = asyncio.run(run(QUICK if arguments.quick else FULL, arguments.creates))
    print(HEADER)
    for report in reports:
        print(row(report))
    if arguments.output:
        Path(arguments.output).write_text(json.dumps(reports, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
