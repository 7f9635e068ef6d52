"""/healthz's "stuck": no pass has ended by itself for the interval, the pass deadline and a margin."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry

from reconciler.config import load_settings
from reconciler.reconcile import PassOutcome, PassResult
from reconciler.service import STUCK_MARGIN_SECONDS, Daemon

SETTINGS = load_settings(
    {
        "RECONCILER_DATABASE_URL": "postgresql://reconciler@db.example/coder",
        "RECONCILER_RECONCILIATION_INTERVAL": "10s",
        "RECONCILER_STATEMENT_TIMEOUT": "10s",
        "RECONCILER_PASS_TIMEOUT": "30s",
    }
)
LIMIT = 10 + 30 + STUCK_MARGIN_SECONDS


def result(outcome: PassOutcome, *, deadline_exceeded: bool = False) -> PassResult:
    return PassResult(
        run_id="r",
        outcome=outcome,
        started_at=datetime.now(UTC),
        duration_seconds=1.0,
        error="PassDeadlineError: ..." if deadline_exceeded else None,
        deadline_exceeded=deadline_exceeded,
    )


def test_not_stuck_before_the_passes_start() -> None:
    daemon = Daemon(SETTINGS, registry=CollectorRegistry())
    assert daemon.stuck_reason(now=time.monotonic() + 10 * LIMIT) is None


def test_a_pass_that_ends_by_itself_is_progress_one_cut_by_its_deadline_is_not() -> None:
    daemon = Daemon(SETTINGS, registry=CollectorRegistry())
    daemon.record_pass(result(PassOutcome.FAILED))  # failed with the database's answer: the loop works
    ended = time.monotonic()
    assert daemon.stuck_reason(now=ended + LIMIT - 1) is None
    daemon.record_pass(result(PassOutcome.FAILED, deadline_exceeded=True))
    reason = daemon.stuck_reason(now=ended + LIMIT + 1)
    assert reason is not None
    assert f"limit {LIMIT:.0f}s" in reason
    daemon.record_pass(result(PassOutcome.SKIPPED_LOCK))
    assert daemon.stuck_reason(now=time.monotonic() + LIMIT - 1) is None
