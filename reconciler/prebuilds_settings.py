"""The platform's `prebuilds_settings` value (site_configs): read leniently, never silently wrong.

The value is JSON written by an operator, by `reconciler pause` / `resume`, or by another component:
`{"reconciliation_paused": true}`. The obvious spellings of a yes or a no are accepted (`true`, `"true"`,
`1`, `"yes"`, `"on"`, any case, and their opposites). Anything else (text that is not JSON, a value that
is not an object, `"maybe"`) is malformed: an operator who wrote it meant something, so it is not read as
"not paused". The daemon then keeps the last value it read successfully, logs the problem on every pass,
and exposes it as a metric (see `SettingsKeeper`); with no value read yet, it does not reconcile.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

PAUSED_KEY = "reconciliation_paused"
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


@dataclass(frozen=True, slots=True)
class PrebuildsSettings:
    reconciliation_paused: bool = False


class MalformedSettingsError(ValueError):
    """The stored value says something this code cannot read; `detail` says what, without the whole value."""


def _flag(value: object) -> bool:
    # bool before int: True is an int too.
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return value == 1
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    shown = json.dumps(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    raise MalformedSettingsError(f"{PAUSED_KEY} is {shown}: expected true or false")


def parse(value: str | None) -> PrebuildsSettings:
    """The settings a stored value means; no row (None) means the defaults. Raises MalformedSettingsError."""
    if value is None:
        return PrebuildsSettings()
    try:
        document = json.loads(value)
    except ValueError as error:
        raise MalformedSettingsError(f"not JSON: {error}") from None
    if not isinstance(document, dict):
        raise MalformedSettingsError(f"not a JSON object but {type(document).__name__}")
    # Unknown keys belong to others (or to later versions): left alone.
    return PrebuildsSettings(reconciliation_paused=_flag(document.get(PAUSED_KEY)))


@dataclass(frozen=True, slots=True)
class SettingsRead:
    """What a pass goes by: the settings (None: none readable yet, do not reconcile), and the problem."""

    settings: PrebuildsSettings | None
    malformed: str | None = None


class SettingsKeeper:
    """The last `prebuilds_settings` read successfully by this process; one lives as long as the daemon."""

    def __init__(self) -> None:
        self.last_good: PrebuildsSettings | None = None

    def read(self, value: str | None) -> SettingsRead:
        try:
            settings = parse(value)
        except MalformedSettingsError as error:
            return SettingsRead(self.last_good, str(error))
        self.last_good = settings
        return SettingsRead(settings)
