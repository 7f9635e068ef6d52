"""Statements that differ in a line or two are written once, with variant markers (`sql/queries`)."""

from __future__ import annotations

from reconciler import db

TEXT = """-- name: read_things
select t.id
from things t
where t.visible  -- not in one
    and t.kind = any($1::text[])  -- targeted
where t.id = $1  -- only in one
"""


def test_each_variant_has_its_own_lines_and_not_the_others() -> None:
    queries = db.parse_queries(TEXT, "x.sql")
    assert set(queries) == {"read_things", "read_things_one", "read_things_targeted"}
    assert queries["read_things"].splitlines() == ["select t.id", "from things t", "where t.visible  -- not in one"]
    assert queries["read_things_targeted"].splitlines()[2:] == [
        "where t.visible  -- not in one",
        "    and t.kind = any($1::text[])  -- targeted",
    ]
    assert queries["read_things_one"].splitlines()[2:] == ["where t.id = $1  -- only in one"]


def test_a_statement_without_markers_is_one_statement() -> None:
    assert db.parse_queries("-- name: plain\nselect 1 -- a comment\n", "y.sql") == {"plain": "select 1 -- a comment"}
