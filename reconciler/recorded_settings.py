"""The daemon's behaviour settings as recorded in the database, and which settings a read-only command uses.

Every pass records the values of `config.BEHAVIOUR_SETTINGS` it uses (`store/writes.record_settings`).
`plan`, `status` and the other read-only commands use those, not their caller's environment, so that
what they show is what the daemon decides (issue 11 point 3): a backoff computed with the daemon's 10 s,
not with the caller's default of a minute. `--settings=environment` asks for the caller's own, to ask
"what if". Everything else (the database, timeouts, logging) is always the caller's.
"""

from __future__ import annotations

import enum
import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from reconciler.config import (
    BEHAVIOUR_SETTINGS,
    ConfigError,
    Settings,
    behaviour_values,
    load_settings,
    variable_name,
)
from reconciler.durations import parse_duration

# Latest recorded pass older than this many of its intervals (and a minute): said to be stale.
STALE_INTERVALS = 3


def instance_name() -> str:
    """Which process recorded the settings: host name and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True)
class RecordedSettings:
    """The row of `reconciler_settings`: the values, who recorded them, since when, and the latest pass."""

    values: Mapping[str, str]
    instance: str
    recorded_at: datetime
    last_pass_at: datetime

    @classmethod
    def from_text(cls, text: str, instance: str, recorded_at: datetime, last_pass_at: datetime) -> RecordedSettings:
        document = json.loads(text)
        # Only text values are settings as written; anything else (a hand-edited row) is not used.
        values = {str(key): value for key, value in document.items() if isinstance(value, str)}
        return cls(values, instance, recorded_at, last_pass_at)


class SettingsSource(enum.StrEnum):
    RECORDED = "recorded"
    ENVIRONMENT = "environment"


@dataclass(frozen=True, slots=True)
class Difference:
    """A behaviour setting whose recorded value is not the caller's."""

    variable: str
    recorded: str
    environment: str
    # The caller's environment sets the variable (rather than leaving it to its default).
    set_in_environment: bool


@dataclass(frozen=True, slots=True)
class ResolvedSettings:
    """The settings a read-only command uses, and what it tells its user about them."""

    settings: Settings
    # Asked for (the `--settings` flag), and used: `environment` also when nothing is recorded.
    requested: SettingsSource
    used: SettingsSource
    recorded: RecordedSettings | None
    differences: tuple[Difference, ...]
    # Recorded values this version cannot use (unknown, or refused), each with why; the caller's apply.
    unusable: tuple[str, ...]
    # The latest recorded pass is older than a few of its intervals: the daemon may be down, or restarted
    # with other settings that no pass has recorded yet.
    stale: bool = False

    @property
    def values(self) -> dict[str, str]:
        return behaviour_values(self.settings)

    def messages(self) -> list[str]:
        """Lines for standard error: which settings were used and from where, then the warnings."""
        shown = ", ".join(f"{variable}={value}" for variable, value in self.values.items())
        lines = []
        recorded = self.recorded
        if self.used is SettingsSource.RECORDED:
            assert recorded is not None
            lines.append(
                f"settings: the daemon's, recorded by {recorded.instance} "
                f"(since {_when(recorded.recorded_at)}, last pass {_when(recorded.last_pass_at)}): {shown}"
            )
            lines.extend(
                f"warning: your environment sets {difference.variable}={difference.environment}, but the daemon "
                f"uses {difference.recorded}; shown with the daemon's (--settings=environment to use yours)"
                for difference in self.differences
                if difference.set_in_environment
            )
        elif recorded is None:
            lines.append(
                f"settings: your environment's (no daemon has recorded settings in this database yet): {shown}"
            )
        else:
            lines.append(f"settings: your environment's (--settings=environment): {shown}")
            lines.extend(
                f"warning: the daemon ({recorded.instance}, last pass {_when(recorded.last_pass_at)}) uses "
                f"{difference.variable}={difference.recorded}, not your {difference.environment}"
                for difference in self.differences
            )
        lines.extend(f"warning: {problem}" for problem in self.unusable)
        if self.stale and recorded is not None:
            lines.append(
                f"warning: the daemon's latest recorded pass was at {_when(recorded.last_pass_at)}, several of "
                "its intervals ago: if it is down, or has been restarted with other settings since, these are "
                "not what it will use"
            )
        return lines

    def as_json(self) -> dict[str, Any]:
        recorded = self.recorded
        return {
            "source": self.used.value,
            "requested": self.requested.value,
            "values": self.values,
            "recorded_by": recorded.instance if recorded else None,
            "recorded_at": recorded.recorded_at.isoformat() if recorded else None,
            "last_pass_at": recorded.last_pass_at.isoformat() if recorded else None,
            "differences": [
                {
                    "variable": difference.variable,
                    "recorded": difference.recorded,
                    "environment": difference.environment,
                    "set_in_environment": difference.set_in_environment,
                }
                for difference in self.differences
            ],
            "unusable": list(self.unusable),
            "stale": self.stale,
        }


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S %Z}".strip()


def _usable(recorded: RecordedSettings, environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The recorded values this version reads as valid (as it writes them), and a line for each it cannot use."""
    known = {variable_name(field) for field in BEHAVIOUR_SETTINGS}
    usable: dict[str, str] = {}
    unusable: list[str] = []
    for variable, value in sorted(recorded.values.items()):
        if variable not in known:
            # Recorded by a newer (or older) reconciler: this one has no such behaviour setting.
            unusable.append(f"the daemon recorded {variable}={value}, which this version does not know; ignored")
            continue
        try:
            settings = load_settings({**environ, variable: value}, require_database=False)
        except ConfigError as error:
            unusable.append(
                f"the daemon's recorded {variable} is not valid here ({'; '.join(error.problems)}); yours is used"
            )
            continue
        # As this version writes it, so that `60s` and `1m` compare as the one value they are.
        usable[variable] = behaviour_values(settings)[variable]
    return usable, unusable


def resolve(
    environ: Mapping[str, str],
    caller: Settings,
    recorded: RecordedSettings | None,
    requested: SettingsSource,
    now: datetime | None = None,
) -> ResolvedSettings:
    """The settings a read-only command uses: the recorded behaviour settings over the caller's, unless asked.

    `caller` is the settings loaded from `environ`. The recorded values are applied as the variables they
    came from, so they are read, checked and bounded exactly as the daemon read them. With `now`, a record
    whose latest pass is older than STALE_INTERVALS of its intervals (and a minute) is said to be stale.
    """
    differences: list[Difference] = []
    unusable: list[str] = []
    usable: dict[str, str] = {}
    stale = False
    if recorded is not None:
        usable, unusable = _usable(recorded, environ)
        mine = behaviour_values(caller)
        for field in BEHAVIOUR_SETTINGS:
            variable = variable_name(field)
            theirs = usable.get(variable)
            if theirs is not None and theirs != mine[variable]:
                differences.append(Difference(variable, theirs, mine[variable], field in caller.model_fields_set))
        interval_text = usable.get(variable_name("reconciliation_interval"))
        interval = parse_duration(interval_text) if interval_text else caller.reconciliation_interval
        stale = now is not None and now - recorded.last_pass_at > STALE_INTERVALS * interval + timedelta(minutes=1)
    if requested is SettingsSource.ENVIRONMENT or recorded is None:
        return ResolvedSettings(
            caller, requested, SettingsSource.ENVIRONMENT, recorded, tuple(differences), (), stale=stale
        )
    settings = load_settings({**environ, **usable}, require_database=caller.database_url is not None)
    return ResolvedSettings(
        settings, requested, SettingsSource.RECORDED, recorded, tuple(differences), tuple(unusable), stale=stale
    )
