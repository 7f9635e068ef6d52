"""What the demo shows: a table per preset drawn from the daemon's own last pass, and the latest events.

The table comes from the pass's plan, so what you see is exactly what the reconciler decided.
On a terminal the table is redrawn in place; otherwise (a pipe, a file, a test) every change is printed
as one plain `key=value` line, easy to read back.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TextIO
from uuid import UUID

from reconciler.demo.simulated_provisioner import JobResult
from reconciler.durations import format_duration
from reconciler.notify.outbox import OutboxMessage
from reconciler.plan import PresetPlan
from reconciler.reconcile import PassOutcome, PassResult
from reconciler.reports import table
from reconciler.snapshot import PrebuildStatus
from reconciler.terminal import printable


@dataclass(frozen=True, slots=True)
class PresetRow:
    name: str
    version: str
    active: bool
    desired: int
    running: int
    eligible: int
    starting: int
    deleting: int
    status: str
    backoff_until: datetime | None

    def plain(self) -> str:
        backoff = f"{self.backoff_until:%H:%M:%S}" if self.backoff_until else "-"
        return (
            f"preset={printable(self.name)} version={printable(self.version)} active={'yes' if self.active else 'no'} "
            f"desired={self.desired} running={self.running} eligible={self.eligible} starting={self.starting} "
            f"deleting={self.deleting} status={self.status} backoff_until={backoff}"
        )


def preset_status(preset_plan: PresetPlan, now: datetime) -> str:
    """One word for the table: the preset's marked status first, then what it is doing."""
    preset = preset_plan.preset
    state = preset_plan.state
    if preset_plan.prebuild_status is not PrebuildStatus.NORMAL:
        return preset_plan.prebuild_status.value
    if not preset.active:
        return "outdated"
    if preset_plan.backoff_until is not None and preset_plan.backoff_until >= now:
        return "backoff"
    if state.eligible >= state.desired:
        return "ready"
    return "filling"


def preset_rows(plan_presets: tuple[PresetPlan, ...], now: datetime) -> list[PresetRow]:
    rows = []
    for preset_plan in plan_presets:
        preset, state = preset_plan.preset, preset_plan.state
        # Outdated presets are shown while they still have prebuilds, to watch them being replaced.
        if not preset.active and state.actual + state.starting + state.deleting == 0:
            continue
        rows.append(
            PresetRow(
                name=f"{preset.template_name}/{preset.name}",
                version=preset.template_version_name,
                active=preset.active,
                desired=state.desired,
                running=state.actual,
                eligible=state.eligible,
                starting=state.starting,
                deleting=state.deleting,
                status=preset_status(preset_plan, now),
                backoff_until=preset_plan.backoff_until,
            )
        )
    rows.sort(key=lambda row: (row.name, not row.active, row.version))
    return rows


def pool_bar(row: PresetRow, width: int = 10) -> str:
    """Eligible (#) and starting (+) prebuilds against the target, e.g. `[##+-] 2/4`."""
    target = max(row.desired, 1)
    eligible = min(row.eligible, target)
    starting = min(row.starting, target - eligible)
    cells = width * eligible // target, width * starting // target
    bar = "#" * cells[0] + "+" * cells[1]
    return f"[{bar.ljust(width, '-')}] {row.eligible}/{row.desired}"


def describe_message(message: OutboxMessage) -> str:
    payload = message.payload
    recipient = f"{message.recipient} <{message.recipient_email}>" if message.recipient else "(no recipient)"
    detail = f'template "{payload.get("template")}" version "{payload.get("template_version")}" '
    detail += f'preset "{payload.get("preset")}"'
    if payload.get("last_error"):
        detail += f" after {payload.get('failure_count')} failures; last error: {payload.get('last_error')}"
    return f"NOTIFICATION {message.notification_template!r} to {recipient}: {detail} [{message.status}]"


WIDE_HEADERS = (
    "PRESET",
    "VERSION",
    "DESIRED",
    "RUNNING",
    "ELIGIBLE",
    "STARTING",
    "DELETING",
    "STATUS",
    "BACKOFF UNTIL",
    "POOL",
)
# For a narrow terminal (80 columns): desired and eligible are in the pool's `eligible/desired`.
COMPACT_HEADERS = ("PRESET", "VER", "RUN", "START", "DEL", "STATUS", "BACKOFF", "POOL")
_SHORT_STATUS = {"hard_limited": "limited", "validation_failed": "invalid"}
_ELLIPSIS = "…"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + _ELLIPSIS


def _backing_off(row: PresetRow, now: datetime) -> int | None:
    """Seconds left of the row's backoff, or None when it is not backing off."""
    if row.backoff_until is None or row.backoff_until < now:
        return None
    return max(0, int((row.backoff_until - now).total_seconds()))


def _wide_cells(row: PresetRow, now: datetime) -> tuple[object, ...]:
    left = _backing_off(row, now)
    return (
        row.name,
        row.version + ("" if row.active else " (old)"),
        row.desired,
        row.running,
        row.eligible,
        row.starting,
        row.deleting,
        row.status,
        "-" if left is None or row.backoff_until is None else f"{row.backoff_until:%H:%M:%S} (in {left}s)",
        pool_bar(row),
    )


def _compact_cells(row: PresetRow, now: datetime, name_width: int) -> tuple[object, ...]:
    left = _backing_off(row, now)
    return (
        _cut(row.name, name_width),
        _cut(row.version, 8),
        row.running,
        row.starting,
        row.deleting,
        _SHORT_STATUS.get(row.status, row.status),
        "-" if left is None else f"in {format_duration(timedelta(seconds=left))}",
        pool_bar(row, width=4),
    )


def preset_table(rows: list[PresetRow], now: datetime, width: int | None) -> list[str]:
    """The presets' table, its header and rule first: every column when it fits in `width` (None: any
    width), else the compact columns, with preset names shortened as far as needed."""
    if not rows:
        return ["(waiting for the first pass)"]
    lines = table(WIDE_HEADERS, [_wide_cells(row, now) for row in rows]).splitlines()
    if width is None or max(len(line) for line in lines) <= width:
        return lines
    name_width = max(len(row.name) for row in rows)
    while True:
        lines = table(COMPACT_HEADERS, [_compact_cells(row, now, name_width) for row in rows]).splitlines()
        excess = max(len(line) for line in lines) - width
        if excess <= 0 or name_width <= 8:
            return lines
        name_width = max(name_width - excess, 8)


def frame(
    *,
    header: list[str],
    details: list[str],
    stats: str,
    table_lines: list[str],
    events: list[str],
    columns: int,
    rows: int,
) -> list[str]:
    """The interactive screen for a terminal of `columns` x `rows`: never more lines than `rows` (more
    would scroll the header, and the database URL in it, off the top) and no line wider than the terminal.

    What must stay: the header, the pass counts, the table's header and the last line. Then, in this
    order while there is room: the table's rows (cut with "... N more", keeping room for the two latest
    events), the latest events, blank lines between the parts, and the details of the seeded platform.
    """
    width = max(columns - 1, 1)
    head, table_rows = table_lines[:2], table_lines[2:]
    footer = "Ctrl-C to stop."
    room = rows - (len(header) + 1 + len(head) + 1)
    # Kept while the table is cut: a blank line, then the events' title and the two latest events.
    event_room = 2 + max(min(len(events), 2), 1)
    table_room = max(room - event_room, 1)
    if len(table_rows) > table_room:
        kept = max(table_room - 1, 0)
        table_rows = [*table_rows[:kept], f"... {len(table_rows) - kept} more"]
    room -= len(table_rows)
    # Blank lines between the parts, the most helpful first: around the table before more events.
    gaps = dict.fromkeys(("table", "events", "stats", "footer"), False)

    def gap(name: str) -> None:
        nonlocal room
        if room > 0:
            gaps[name] = True
            room -= 1

    gap("table")
    event_lines: list[str] = []
    if room >= 2:
        if room > event_room:
            gap("events")
        shown = events[-min(len(events), room - 1) :] if events else ["  (none yet)"]
        event_lines = ["recent events:", *shown]
        room -= len(event_lines)
    gap("stats")
    gap("footer")
    shown_details = details if room >= len(details) else []
    lines = [
        *header,
        *shown_details,
        *([""] if gaps["stats"] else []),
        stats,
        *([""] if gaps["table"] else []),
        *head,
        *table_rows,
        *([""] if gaps["events"] else []),
        *event_lines,
        *([""] if gaps["footer"] else []),
        footer,
    ]
    if len(lines) > rows:
        # A terminal too small for even the fixed parts: the top (the database URL) is what stays.
        lines = lines[: max(rows, 1)]
    return [line[:width] for line in lines]


@dataclass
class DemoView:
    """What the demo prints; fed by the daemon's pass listener, the provisioner and the outbox."""

    output: TextIO
    interactive: bool
    started: float = field(default_factory=time.monotonic)
    # Always shown, the database URL among them; `details` only when the terminal has room for them.
    header: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    last_pass: PassResult | None = None
    passes: int = 0
    passes_failed: int = 0
    jobs_succeeded: int = 0
    jobs_failed: int = 0
    events: list[str] = field(default_factory=list)
    _printed_rows: dict[tuple[str, str], str] = field(default_factory=dict)
    _seen_messages: set[UUID] = field(default_factory=set)
    _pass_shown: int = 0

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.started:6.1f}s"

    def on_pass(self, result: PassResult) -> None:
        self.passes += 1
        if result.outcome is PassOutcome.FAILED:
            self.passes_failed += 1
            self.event(f"PASS FAILED: {result.error}")
        if result.plan is not None:
            self.last_pass = result

    def on_targeted_pass(self, result: PassResult) -> None:
        """A pass for the presets of the templates a change event named (a claim, a publish, a finished
        job): it acts at once, before the next full pass, so what it decided is shown when it happens.
        Its plan covers those templates only; the table keeps following the full passes."""
        if result.outcome is PassOutcome.FAILED:
            self.event(f"EVENT PASS FAILED: {result.error}")
        if self.interactive or result.plan is None:
            return
        for row in preset_rows(result.plan.presets, datetime.now(UTC)):
            key = (row.name, row.version)
            text = row.plain()
            if self._printed_rows.get(key) != text:
                self._printed_rows[key] = text
                self._print(f"{self.elapsed()}  event pass={self.passes} {text}")

    def on_job(self, result: JobResult) -> None:
        if result.canceled:
            return
        if result.succeeded:
            self.jobs_succeeded += 1
        else:
            self.jobs_failed += 1
            job = result.job
            self.event(
                f"BUILD FAILED {job.template_name}/{job.preset_name or '-'} {job.workspace_name}: {result.error}"
            )

    def on_messages(self, messages: list[OutboxMessage]) -> None:
        for message in sorted(messages, key=lambda message: (message.created_at, str(message.id))):
            if message.id not in self._seen_messages:
                self._seen_messages.add(message.id)
                self.event(describe_message(message))

    def event(self, text: str) -> None:
        # Events quote names and error messages from the database: shown escaped, like every table.
        line = f"{self.elapsed()}  {printable(text)}"
        self.events.append(line)
        del self.events[:-8]
        if not self.interactive:
            self._print(line)

    def _print(self, line: str) -> None:
        self.output.write(line + "\n")
        self.output.flush()

    def rows(self) -> list[PresetRow]:
        if self.last_pass is None or self.last_pass.plan is None:
            return []
        return preset_rows(self.last_pass.plan.presets, datetime.now(UTC))

    def refresh(self) -> None:
        if self.interactive:
            self._redraw()
        elif self.passes != self._pass_shown:
            self._pass_shown = self.passes
            for row in self.rows():
                key = (row.name, row.version)
                text = row.plain()
                if self._printed_rows.get(key) != text:
                    self._printed_rows[key] = text
                    self._print(f"{self.elapsed()}  pass={self.passes} {text}")

    def table_text(self) -> str:
        return "\n".join(preset_table(self.rows(), datetime.now(UTC), width=None))

    def stats(self) -> str:
        return (
            f"elapsed {self.elapsed().strip()}   passes {self.passes} ({self.passes_failed} failed)   "
            f"builds: {self.jobs_succeeded} succeeded, {self.jobs_failed} failed"
        )

    def _redraw(self) -> None:
        size = shutil.get_terminal_size((120, 40))
        lines = frame(
            header=self.header,
            details=self.details,
            stats=self.stats(),
            table_lines=preset_table(self.rows(), datetime.now(UTC), width=size.columns - 1),
            events=self.events,
            columns=size.columns,
            rows=size.lines,
        )
        # Home, draw, clear what is left of the previous frame: no flicker from a full clear. No newline
        # after the last line: on the terminal's last row it would scroll the top line (the database URL) off.
        self.output.write("\x1b[H" + "\n".join(line + "\x1b[K" for line in lines) + "\x1b[J")
        self.output.flush()

    def begin(self) -> None:
        if self.interactive:
            self.output.write("\x1b[?25l\x1b[2J")
        else:
            for line in (*self.header, *self.details):
                self._print(line)

    def finish(self, reason: str) -> None:
        if self.interactive:
            self._redraw()
            self.output.write("\n\x1b[?25h")
        self._print(f"{self.elapsed()}  stopping ({reason})")

    def summary(self) -> None:
        self._print("final state:")
        for line in self.table_text().splitlines():
            self._print("  " + line)
