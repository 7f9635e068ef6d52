"""Text from the database shown on a terminal: control and bidirectional characters become visible escapes."""

from __future__ import annotations

import unicodedata

from hypothesis import given
from hypothesis import strategies as st

from reconciler.demo.view import PresetRow
from reconciler.reports import table
from reconciler.terminal import printable


def test_plain_names_are_unchanged() -> None:
    for name in ("python-dev", "Größe 3", "日本語", "a b", "emoji 😀", "\u00a0nbsp"):
        assert printable(name) == name


def test_controls_and_bidi_characters_are_shown_as_escapes() -> None:
    assert printable("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert printable("\x1b]0;title\x07") == "\\x1b]0;title\\x07"
    assert printable("row\r\nfake") == "row\\r\\nfake"
    assert printable("tab\there") == "tab\\there"
    assert printable("exe.\u202etxt") == "exe.\\u202etxt"
    assert printable("\u2066isolate\u2069") == "\\u2066isolate\\u2069"
    assert printable("zero\u200bwidth") == "zero\\u200bwidth"
    assert printable("c1\x9bcsi") == "c1\\x9bcsi"
    assert printable("del\x7f") == "del\\x7f"
    assert printable("line\u2028sep") == "line\\u2028sep"
    assert printable("tag\U000e0041") == "tag\\U000e0041"
    # A backslash is escaped too: a name cannot pass for an escape the table shows.
    assert printable("a\\x1b") == "a\\\\x1b"


@given(st.text())
def test_nothing_that_controls_a_terminal_survives(text: str) -> None:
    shown = printable(text)
    for character in shown:
        assert unicodedata.category(character) not in {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}, repr(character)


def test_tables_escape_every_cell_and_keep_their_shape() -> None:
    text = table(("NAME", "N"), [("evil\x1b[2J\r\nFAKE\u202e", 1), ("fine", 2)])
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[2] == "evil\\x1b[2J\\r\\nFAKE\\u202e  1"
    for character in ("\x1b", "\r", "\u202e"):
        assert character not in text


def test_a_table_shortens_columns_in_stages_to_fit_its_width() -> None:
    text = table(("X", "Y", "Z"), [("a" * 30, "b" * 30, "c" * 70)], width=80, shrink=({0: 12, 1: 12}, {2: 20}))
    assert max(len(line) for line in text.splitlines()) == 80
    # The first stage took the names down to 12 characters, then the last column gave the rest.
    assert text.splitlines()[2] == "a" * 11 + "…  " + "b" * 11 + "…  " + "c" * 51 + "…"
    # A table that fits is left whole.
    assert table(("X",), [("a" * 30,)], width=80, shrink=({0: 5},)).splitlines()[2] == "a" * 30


def test_the_demo_escapes_names_in_its_lines() -> None:
    row = PresetRow(
        name="t/evil\x1b[2J\u202e",
        version="v\r\n1",
        active=True,
        desired=1,
        running=0,
        eligible=0,
        starting=0,
        deleting=0,
        status="filling",
        backoff_until=None,
    )
    assert "preset=t/evil\\x1b[2J\\u202e version=v\\r\\n1 " in row.plain()
