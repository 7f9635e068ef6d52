"""Every named statement of sql/queries loads and prepares against the migrated schema.

PREPARE parses, resolves every table, column, type and operator, and infers the parameter types,
without running anything: a typo in a statement that only a rare path (a reset, a failure episode) runs
is caught here instead of in production.
"""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg

from reconciler import db

PACKAGE = Path(db.__file__).resolve().parent


def test_every_query_file_loads_into_uniquely_named_statements() -> None:
    files = sorted((db.sql_directory() / "queries").glob("*.sql"))
    assert files
    per_file = [db.parse_queries(path.read_text(encoding="utf-8"), path.name) for path in files]
    assert all(per_file)
    names = [name for parsed in per_file for name in parsed]
    assert len(names) == len(set(names)), "a name is defined twice"
    assert set(db.queries()) == set(names)


async def test_every_named_statement_prepares(connection: asyncpg.Connection) -> None:
    statements = db.queries()
    failures = []
    for name, sql in sorted(statements.items()):
        try:
            prepared = await connection.prepare(sql)
        except asyncpg.PostgresError as error:
            failures.append(f"{name}: {type(error).__name__}: {error}")
            continue
        # Every $n the text uses is a parameter PostgreSQL knows the type of.
        used = {int(number) for number in re.findall(r"\$(\d+)", _without_comments(sql))}
        if used != set(range(1, len(prepared.get_parameters()) + 1)):
            failures.append(f"{name}: uses ${sorted(used)} but prepares {len(prepared.get_parameters())} parameters")
    assert failures == []


def _without_comments(sql: str) -> str:
    return re.sub(r"--[^\n]*", "", sql)


def test_every_statement_the_code_names_exists() -> None:
    # Store functions look statements up by name at call time: a misspelt name fails only when called.
    named_in_code = {
        match
        for path in PACKAGE.rglob("*.py")
        for match in re.findall(r"""_query\(\s*["']([a-z_0-9]+)["']""", path.read_text(encoding="utf-8"))
    }
    assert named_in_code, "no statement names found in the code: the pattern is out of date"
    assert named_in_code - set(db.queries()) == set()
