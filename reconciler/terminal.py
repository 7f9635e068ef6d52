"""Text from the database made safe to print on a terminal: one function for every table the CLI shows.

Names (templates, versions, presets, organizations), error messages and cron texts are written by other
components and by users. Printed raw, an ESC starts a control sequence (`ESC[2J` clears the screen, an
OSC sequence retitles the window or writes a hyperlink), a CR or LF draws a fake row over a real one, and
a bidirectional override (U+202E) makes a name read backwards. Every such character is shown as a
visible escape instead (`\\x1b`, `\\r`, `\\u202e`), so the text is still recognisable and can be copied
into a search. JSON output needs none of this: JSON escapes control characters itself, and a program
reading it wants the raw text.

Escaped: every character of the Unicode categories Cc (C0 and C1 controls, DEL), Cf (format: bidi
embeddings, overrides, isolates and marks, zero-width characters, the BOM, soft hyphen), Zl and Zp (line
and paragraph separators), Cs (lone surrogates) and Co/Cn (private use, unassigned), and the backslash
itself, so that an escape shown cannot be mistaken for a name that contains one.
"""

from __future__ import annotations

import unicodedata

_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r", "\\": "\\\\"}
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _escape_character(character: str) -> str:
    short = _SHORT.get(character)
    if short is not None:
        return short
    code = ord(character)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _needs_escape(character: str) -> bool:
    return character in _SHORT or unicodedata.category(character) in _ESCAPED_CATEGORIES


def printable(text: object) -> str:
    """`str(text)` with every control, format and bidirectional character shown as a visible escape."""
    value = str(text)
    # The common case (plain names) costs one scan and no copy.
    if value.isprintable() and "\\" not in value:
        return value
    return "".join(_escape_character(character) if _needs_escape(character) else character for character in value)
