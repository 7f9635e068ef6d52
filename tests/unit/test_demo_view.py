"""The demo's screen laid out for the terminal it has (issue 11 point 10): a pure function of its size.

At 80x24 every column that matters (status, backoff, pool) is on screen, the screen never has more
lines than the terminal (more would scroll the database URL, which the README says to reuse, off the
top), and rows that do not fit are counted in "... N more". A wide terminal gets every column and line.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from reconciler.demo.scenario import BROKEN_PRESET, HEALTHY_PRESETS, DemoOptions, describe_seed
from reconciler.demo.view import PresetRow, frame, preset_table

NOW = datetime(2026, 12, 1, 22, 40, 46, tzinfo=UTC)
DATABASE = "database: postgresql://postgres@127.0.0.1:54321/postgres"
HEADER = [
    "reconciler demo: the real daemon on an embedded PostgreSQL, with a simulated provisioner",
    f"{DATABASE}   logs: /tmp/reconciler-demo-k2j4h5g6/reconciler.log   (temporary: use --data-dir to keep them)",
    "metrics: http://127.0.0.1:40123/metrics   health: http://127.0.0.1:40123/readyz",
    "pass every 5s, backoff 10s per failure, hard limit after 3 failures, random build failures 10%",
]
STATS = "elapsed 62.0s   passes 13 (0 failed)   builds: 31 succeeded, 5 failed"
EVENTS = [
    f"{10.0 + index:6.1f}s  BUILD FAILED legacy-monolith/default prebuild-{index:016d}: image not found"
    for index in range(8)
]


def row(name: str, *, desired: int = 3, eligible: int = 3, status: str = "ready", **changes: object) -> PresetRow:
    fields: dict[str, object] = {
        "name": name,
        "version": "v1",
        "active": True,
        "desired": desired,
        "running": eligible,
        "eligible": eligible,
        "starting": 0,
        "deleting": 0,
        "status": status,
        "backoff_until": None,
    }
    fields.update(changes)
    return PresetRow(**fields)  # type: ignore[arg-type]


def demo_rows(healthy: int) -> list[PresetRow]:
    """The demo's presets: the healthy ones (one filling, one with an outdated version), the broken one."""
    rows = [row(f"{seed.template}/{seed.preset}") for seed in HEALTHY_PRESETS[:healthy]]
    rows[0] = row(rows[0].name, eligible=1, starting=2, status="filling", version="v2")
    rows.insert(1, row(rows[0].name, version="v1", active=False, desired=0, eligible=2, deleting=1, status="outdated"))
    broken = f"{BROKEN_PRESET.template}/{BROKEN_PRESET.preset}"
    rows.append(row(broken, desired=1, eligible=0, status="backoff", backoff_until=NOW + timedelta(seconds=7)))
    rows.append(row(broken, desired=1, eligible=0, status="hard_limited", version="v0"))
    return rows


def screen(rows: list[PresetRow], columns: int, lines: int, healthy: int = 3) -> list[str]:
    return frame(
        header=HEADER,
        details=describe_seed(DemoOptions(presets=healthy)),
        stats=STATS,
        table_lines=preset_table(rows, NOW, width=columns - 1),
        events=EVENTS,
        columns=columns,
        rows=lines,
    )


def table_part(lines: list[str]) -> list[str]:
    start = next(index for index, line in enumerate(lines) if line.startswith("PRESET"))
    end = next(
        index for index, line in enumerate(lines) if index > start and line in ("", "recent events:", "Ctrl-C to stop.")
    )
    return lines[start:end]


def test_at_80x24_the_default_demo_shows_every_column_that_matters_and_keeps_the_database_url() -> None:
    rows = demo_rows(3)
    lines = screen(rows, 80, 24)
    assert len(lines) <= 24
    assert all(len(line) < 80 for line in lines)
    assert lines[1].startswith(DATABASE)
    assert lines[-1] == "Ctrl-C to stop."
    table = table_part(lines)
    for column in ("PRESET", "STATUS", "BACKOFF", "POOL"):
        assert column in table[0]
    shown = table[2:]
    assert len(shown) == len(rows)
    for line, preset in zip(shown, rows, strict=True):
        assert line.startswith(preset.name)
        assert {"hard_limited": "limited"}.get(preset.status, preset.status) in line.split()
        assert line.rstrip().endswith(f"{preset.eligible}/{preset.desired}")
    backing_off = next(line for line in shown if " backoff " in line)
    assert "in 7s" in backing_off
    assert STATS in lines
    assert "recent events:" in lines
    assert EVENTS[-1][:79] in lines


def test_at_80x24_every_preset_of_the_largest_demo_fits() -> None:
    rows = demo_rows(8)
    lines = screen(rows, 80, 24, healthy=8)
    assert len(lines) <= 24
    assert all(len(line) < 80 for line in lines)
    assert lines[1].startswith(DATABASE)
    assert len(table_part(lines)) == 2 + len(rows)
    assert EVENTS[-1][:79] in lines


def test_at_80x24_rows_that_do_not_fit_are_counted_and_the_top_stays() -> None:
    rows = [row(f"template-{index:02d}/preset") for index in range(30)]
    lines = screen(rows, 80, 24, healthy=8)
    assert len(lines) == 24
    assert all(len(line) < 80 for line in lines)
    assert lines[:2] == [HEADER[0][:79], HEADER[1][:79]]
    assert lines[1].startswith(DATABASE)
    start = next(index for index, line in enumerate(lines) if line.startswith("PRESET"))
    more_index = next(index for index, line in enumerate(lines) if line.startswith("... "))
    hidden = int(lines[more_index].split()[1])
    shown = lines[start + 2 : more_index]
    assert [line.split()[0] for line in shown] == [preset.name for preset in rows[: len(shown)]]
    assert len(shown) + hidden == len(rows)
    # The two latest events are still there, and the last line.
    assert lines[-4:-1] == ["recent events:", EVENTS[-2][:79], EVENTS[-1][:79]]
    assert lines[-1] == "Ctrl-C to stop."


def test_a_wide_terminal_gets_every_column_every_row_and_every_line() -> None:
    rows = demo_rows(8)
    lines = screen(rows, 200, 60, healthy=8)
    assert len(lines) <= 60
    assert lines[: len(HEADER)] == HEADER
    for detail in describe_seed(DemoOptions(presets=8)):
        assert detail in lines
    table = table_part(lines)
    assert table[0].split("  ")[0] == "PRESET"
    for column in ("VERSION", "DESIRED", "RUNNING", "ELIGIBLE", "STARTING", "DELETING", "STATUS", "BACKOFF UNTIL"):
        assert column in table[0]
    assert len(table) == 2 + len(rows)
    assert not any(line.startswith("... ") for line in lines)
    assert "22:40:53 (in 7s)" in "\n".join(table)
    assert "hard_limited" in "\n".join(table)
    assert all(event in lines for event in EVENTS)


def test_a_tiny_terminal_keeps_the_top_lines() -> None:
    lines = screen(demo_rows(3), 40, 5)
    assert len(lines) == 5
    assert lines[1] == DATABASE[:39]
