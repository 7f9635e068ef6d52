"""Which failed prebuilds to delete: the evidence an operator may still need is kept, the rest is cost.

Pure. Per preset, kept: the newest `keep` failed prebuilds, any younger than `keep_for`, and always the
ones the verdicts rest on (the snapshot marks them `protected`: the newest failures the hard limit and
the validation check look at, and every failure inside the backoff lookback), so that a cleanup never
changes a backoff, hard-limit or validation verdict. The rest are deleted oldest first, at most
`per_pass` per preset and pass, so that even `keep=0, keep_for=0` never asks for every delete at once
(and the in-flight budget, when set, bounds them further).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID


@dataclass(frozen=True, slots=True)
class CleanupPolicy:
    keep: int = 3
    keep_for: timedelta = timedelta(hours=24)
    # A bound of our own on one preset's cleanup deletes in one pass.
    per_pass: int = 10


@dataclass(frozen=True, slots=True)
class FailedPrebuild:
    workspace_id: UUID
    # When its failed build was created.
    failed_at: datetime
    # Part of the evidence of a verdict: never deleted.
    protected: bool = False


def select(failed: Sequence[FailedPrebuild], policy: CleanupPolicy, now: datetime) -> tuple[UUID, ...]:
    """The failed prebuilds of one preset to delete this pass, oldest first."""
    newest_first = sorted(failed, key=lambda prebuild: (prebuild.failed_at, str(prebuild.workspace_id)), reverse=True)
    cutoff = now - policy.keep_for
    candidates = [
        prebuild
        for prebuild in newest_first[max(policy.keep, 0) :]
        if not prebuild.protected and prebuild.failed_at <= cutoff
    ]
    candidates.reverse()
    return tuple(prebuild.workspace_id for prebuild in candidates[: max(policy.per_pass, 0)])
