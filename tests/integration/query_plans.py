"""EXPLAIN for the query-plan tests: a named statement's plan as a flat list of nodes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import asyncpg

from reconciler import db


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child)


async def explain(connection: asyncpg.Connection, name: str, *arguments: object) -> list[dict[str, Any]]:
    """Every node of the plan of the named statement of sql/queries, with these parameters."""
    document = await connection.fetchval(f"explain (format json) {db.queries()[name]}", *arguments)
    parsed = json.loads(document) if isinstance(document, str) else document
    return list(plan_nodes(parsed[0]["Plan"]))
