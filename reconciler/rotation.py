"""Replacing expired prebuilds: time-to-live jitter, and surge (replacements first, then deletes).

Pure. Coder deletes every expired prebuild in the pass that finds it expired and creates the
replacements in the same pass, so a pool rotated all at once has nothing to claim until the
replacements are ready. Two settings change that, both off by default:

- `RECONCILER_TTL_JITTER` (a fraction f): each prebuild expires after ttl x (1 - f x u), u in [0, 1)
  derived from its workspace id. The time-to-live stays the longest a prebuild lives; prebuilds built
  together expire spread over the last f of it, and every replica computes the same instant.
- `RECONCILER_SURGE` (a count s): while the pool holds fewer ready fresh prebuilds than its target, the
  ready expired ones stay (claimable) and at most s replacements beyond the target are on their way; an
  expired one is deleted once a replacement is ready to take its place. Expired prebuilds that are not
  ready serve nobody and go at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol
from uuid import UUID


class _Prebuild(Protocol):
    @property
    def workspace_id(self) -> UUID: ...

    @property
    def ready(self) -> bool: ...


def jitter_unit(workspace_id: UUID) -> float:
    """A number in [0, 1) that depends only on the workspace."""
    digest = hashlib.blake2b(workspace_id.bytes, digest_size=8, person=b"ttl-jitter").digest()
    return int.from_bytes(digest, "big") / 2**64


def time_to_live(ttl_seconds: int, jitter: float, workspace_id: UUID) -> timedelta:
    """How long this prebuild lives: the preset's time-to-live, shortened by up to `jitter` of it."""
    ttl = timedelta(seconds=ttl_seconds)
    if jitter <= 0:
        return ttl
    return ttl * (1 - jitter * jitter_unit(workspace_id))


def expired_by_ttl(
    created_at: datetime, workspace_id: UUID, ttl_seconds: int | None, jitter: float, now: datetime
) -> bool:
    """Strictly older than its time-to-live (BEHAVIOR.md section 2); never when the preset has none."""
    if ttl_seconds is None or ttl_seconds <= 0:
        return False
    return now - created_at > time_to_live(ttl_seconds, jitter, workspace_id)


@dataclass(frozen=True, slots=True)
class Rotation:
    """What to do with a preset's expired prebuilds, and how many creates the rotation allows."""

    # Expired prebuilds to delete now, in the order given (oldest first).
    delete: tuple[UUID, ...]
    # Ready expired prebuilds kept (still claimable) until replacements are ready.
    kept: tuple[UUID, ...]
    # Creates wanted: what the target is missing, less what the surge does not allow yet.
    creates: int
    # Creates the surge held back this pass.
    creates_held: int


def rotate(
    *,
    desired: int,
    fresh: int,
    fresh_ready: int,
    starting: int,
    expired: Sequence[_Prebuild],
    surge: int,
) -> Rotation:
    """Expired prebuilds (oldest first) and creates of an active preset.

    `fresh` and `fresh_ready`: the preset's running prebuilds that have not expired, and those of them
    that are ready; `starting`: its creates in progress. With `surge` 0 this is Coder's rule: delete every
    expired prebuild, create what the target is missing.
    """
    missing = max(desired - fresh - starting, 0)
    if surge <= 0 or not expired:
        return Rotation(tuple(prebuild.workspace_id for prebuild in expired), (), missing, 0)
    ready = [prebuild for prebuild in expired if prebuild.ready]
    # Keep the newest ready expired ones that the ready fresh prebuilds cannot stand in for yet.
    keep_count = min(len(ready), max(desired - fresh_ready, 0))
    kept = ready[len(ready) - keep_count :] if keep_count else []
    kept_ids = {prebuild.workspace_id for prebuild in kept}
    delete = tuple(prebuild.workspace_id for prebuild in expired if prebuild.workspace_id not in kept_ids)
    # At most `surge` prebuilds beyond the target while expired ones are kept.
    room = max(desired + surge - fresh - starting - keep_count, 0)
    creates = min(missing, room)
    return Rotation(delete, tuple(prebuild.workspace_id for prebuild in kept), creates, missing - creates)
