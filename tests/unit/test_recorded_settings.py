"""Which settings a read-only command computes with: the daemon's recorded ones, or the caller's (issue 11.3).

Pure: `resolve` is given the caller's environment and the recorded row, and reads nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import pytest

from reconciler.config import (
    BEHAVIOUR_SETTINGS,
    OPERATIONAL_SETTINGS,
    Settings,
    behaviour_values,
    load_settings,
)
from reconciler.recorded_settings import RecordedSettings, SettingsSource, resolve

DSN = "postgresql://reconciler@db.example:5432/prebuilds"
RECORDED_AT = datetime(2026, 12, 1, 4, 0, tzinfo=UTC)
DAEMONS = {
    "RECONCILER_RECONCILIATION_INTERVAL": "5s",
    "RECONCILER_BACKOFF_INTERVAL": "10s",
    "RECONCILER_BACKOFF_LOOKBACK": "1h",
    "RECONCILER_FAILURE_HARD_LIMIT": "2",
    "RECONCILER_MAX_DESIRED_INSTANCES": "100",
    "RECONCILER_NON_RETRYABLE_ERROR_CODES": "REQUIRED_TEMPLATE_VARIABLES",
    "RECONCILER_CAPACITY_ERROR_CODES": "INSUFFICIENT_QUOTA",
}


def recorded(values: Mapping[str, str] = DAEMONS) -> RecordedSettings:
    return RecordedSettings(dict(values), "daemon-host:4242", RECORDED_AT, RECORDED_AT + timedelta(minutes=5))


def caller(**variables: str) -> tuple[dict[str, str], Settings]:
    environ = {"RECONCILER_DATABASE_URL": DSN, **variables}
    return environ, load_settings(environ)


def test_every_setting_is_either_behaviour_or_operational() -> None:
    """A new setting must say whether it decides what a pass does (and so is recorded) or not."""
    behaviour = set(BEHAVIOUR_SETTINGS)
    assert not behaviour & OPERATIONAL_SETTINGS
    assert behaviour | OPERATIONAL_SETTINGS == set(Settings.model_fields)


def test_the_recorded_text_reads_back_as_the_same_settings() -> None:
    _, settings = caller(
        RECONCILER_BACKOFF_INTERVAL="90s",
        RECONCILER_BACKOFF_LOOKBACK="0.5h",
        RECONCILER_NON_RETRYABLE_ERROR_CODES="B, A",
        RECONCILER_CAPACITY_ERROR_CODES="",
    )
    values = behaviour_values(settings)
    assert values["RECONCILER_BACKOFF_INTERVAL"] == "1m30s"
    assert values["RECONCILER_NON_RETRYABLE_ERROR_CODES"] == "A,B"
    again = load_settings({"RECONCILER_DATABASE_URL": DSN, **values})
    assert all(getattr(again, field) == getattr(settings, field) for field in BEHAVIOUR_SETTINGS)


def test_the_recorded_settings_are_used_and_a_different_value_in_the_environment_is_warned_about() -> None:
    environ, settings = caller(RECONCILER_BACKOFF_INTERVAL="1m")
    resolved = resolve(environ, settings, recorded(), SettingsSource.RECORDED)
    assert resolved.used is SettingsSource.RECORDED
    assert resolved.settings.backoff_interval == timedelta(seconds=10)
    assert resolved.settings.failure_hard_limit == 2
    assert resolved.settings.reconciliation_interval == timedelta(seconds=5)
    # What is not a behaviour setting stays the caller's.
    assert resolved.settings.database_url == settings.database_url
    header, *warnings = resolved.messages()
    assert "recorded by daemon-host:4242" in header
    assert "since 2026-12-01 04:00:00 UTC" in header
    assert "last pass 2026-12-01 04:05:00 UTC" in header
    assert "RECONCILER_BACKOFF_INTERVAL=10s" in header
    # Only the variable the caller set is warned about; the defaults that differ are in the header.
    assert warnings == [
        "warning: your environment sets RECONCILER_BACKOFF_INTERVAL=1m, but the daemon uses 10s; "
        "shown with the daemon's (--settings=environment to use yours)"
    ]
    assert {difference.variable for difference in resolved.differences} == {
        "RECONCILER_RECONCILIATION_INTERVAL",
        "RECONCILER_BACKOFF_INTERVAL",
        "RECONCILER_FAILURE_HARD_LIMIT",
    }
    document = resolved.as_json()
    assert document["source"] == "recorded"
    assert document["values"]["RECONCILER_BACKOFF_INTERVAL"] == "10s"
    assert document["recorded_by"] == "daemon-host:4242"


def test_coders_name_for_a_setting_is_warned_about_too() -> None:
    environ, settings = caller(CODER_WORKSPACE_PREBUILDS_FAILURE_HARD_LIMIT="7")
    resolved = resolve(environ, settings, recorded(), SettingsSource.RECORDED)
    assert resolved.settings.failure_hard_limit == 2
    assert any("RECONCILER_FAILURE_HARD_LIMIT=7, but the daemon uses 2" in line for line in resolved.messages())


def test_the_environment_when_asked() -> None:
    environ, settings = caller(RECONCILER_BACKOFF_INTERVAL="1m")
    resolved = resolve(environ, settings, recorded(), SettingsSource.ENVIRONMENT)
    assert resolved.used is SettingsSource.ENVIRONMENT
    assert resolved.settings is settings
    header, *warnings = resolved.messages()
    assert header.startswith("settings: your environment's (--settings=environment)")
    assert (
        "warning: the daemon (daemon-host:4242, last pass 2026-12-01 04:05:00 UTC) uses "
        "RECONCILER_BACKOFF_INTERVAL=10s, not your 1m"
    ) in warnings
    assert resolved.as_json()["source"] == "environment"


def test_the_environment_when_nothing_is_recorded_and_it_says_so() -> None:
    environ, settings = caller(RECONCILER_BACKOFF_INTERVAL="1m")
    resolved = resolve(environ, settings, None, SettingsSource.RECORDED)
    assert resolved.used is SettingsSource.ENVIRONMENT
    assert resolved.settings is settings
    assert resolved.messages() == [
        "settings: your environment's (no daemon has recorded settings in this database yet): "
        + ", ".join(f"{variable}={value}" for variable, value in behaviour_values(settings).items())
    ]
    assert resolved.as_json()["recorded_by"] is None


def test_one_value_written_two_ways_is_no_difference() -> None:
    environ, settings = caller(RECONCILER_BACKOFF_INTERVAL="60s")
    resolved = resolve(environ, settings, recorded({"RECONCILER_BACKOFF_INTERVAL": "1m"}), SettingsSource.RECORDED)
    assert resolved.differences == ()
    assert len(resolved.messages()) == 1


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"RECONCILER_SURGE_OF_THE_FUTURE": "3"}, "does not know; ignored"),
        ({"RECONCILER_BACKOFF_INTERVAL": "forever"}, "RECONCILER_BACKOFF_INTERVAL is not valid here"),
        ({"RECONCILER_FAILURE_HARD_LIMIT": "100000"}, "RECONCILER_FAILURE_HARD_LIMIT is not valid here"),
    ],
)
def test_a_recorded_value_this_version_cannot_use_is_said_and_the_callers_applies(
    values: dict[str, str], problem: str
) -> None:
    environ, settings = caller()
    resolved = resolve(
        environ, settings, recorded({**values, "RECONCILER_MAX_DESIRED_INSTANCES": "7"}), SettingsSource.RECORDED
    )
    assert resolved.settings.max_desired_instances == 7
    assert resolved.settings.backoff_interval == settings.backoff_interval
    assert resolved.settings.failure_hard_limit == settings.failure_hard_limit
    assert any(problem in line for line in resolved.messages())


def test_a_record_whose_latest_pass_is_several_intervals_old_is_said_to_be_stale() -> None:
    environ, settings = caller()
    # The daemon's interval is 5 s: its latest pass (04:05:00) is stale after 3 x 5 s and a minute.
    last_pass = RECORDED_AT + timedelta(minutes=5)
    fresh = resolve(environ, settings, recorded(), SettingsSource.RECORDED, now=last_pass + timedelta(seconds=75))
    stale = resolve(environ, settings, recorded(), SettingsSource.RECORDED, now=last_pass + timedelta(seconds=76))
    assert not fresh.stale
    assert not any("latest recorded pass" in line for line in fresh.messages())
    assert stale.stale
    assert stale.as_json()["stale"] is True
    assert (
        "warning: the daemon's latest recorded pass was at 2026-12-01 04:05:00 UTC, several of its intervals "
        "ago: if it is down, or has been restarted with other settings since, these are not what it will use"
    ) in stale.messages()
    # Stale or not, the recorded settings are still the best answer there is.
    assert stale.settings.backoff_interval == timedelta(seconds=10)
