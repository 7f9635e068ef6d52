"""A full pass ends with the cyclic collection it deferred, inside its own duration: the first allocations
after it (the metrics' render, the first scrape) no longer set off a full collection that holds the
interpreter for as long (~140 ms at fleet L)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import asyncpg

from reconciler.reconcile import PassOutcome, run_pass
from tests.factories import Factory
from tests.integration.reconcile_support import settings_for


@contextmanager
def full_collections() -> Iterator[list[int]]:
    """The generation of every cyclic collection that ends while active."""
    seen: list[int] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            seen.append(info["generation"])

    gc.callbacks.append(callback)
    try:
        yield seen
    finally:
        gc.callbacks.remove(callback)


async def test_a_full_pass_collects_once_at_its_end_and_a_targeted_pass_leaves_it_to_the_full_ones(
    factory: Factory, pool: asyncpg.Pool, database_url: str
) -> None:
    preset = await factory.preset(desired=1)
    settings = settings_for(database_url)
    # From a fresh count, no automatic full collection can come due in the few allocations around a pass.
    gc.collect()
    with full_collections() as seen:
        result = await run_pass(pool, settings, datetime.now(UTC))
    assert result.outcome is PassOutcome.SUCCESS
    # The collector is paused for the pass, so automatic collections cannot run inside it: the one full
    # collection is the pass's own.
    assert seen.count(2) == 1

    gc.collect()
    with full_collections() as seen:
        result = await run_pass(pool, settings, datetime.now(UTC), template_ids=[preset.template.id])
    assert result.outcome is PassOutcome.SUCCESS
    assert seen.count(2) == 0
