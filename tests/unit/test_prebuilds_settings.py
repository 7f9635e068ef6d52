"""Reading `prebuilds_settings`: the obvious spellings accepted, anything else malformed (issue 12.6)."""

from __future__ import annotations

import pytest

from reconciler.prebuilds_settings import MalformedSettingsError, PrebuildsSettings, SettingsKeeper, parse

PAUSED = PrebuildsSettings(reconciliation_paused=True)
RUNNING = PrebuildsSettings(reconciliation_paused=False)


@pytest.mark.parametrize(
    "value",
    [
        '{"reconciliation_paused": true}',
        '{"reconciliation_paused": "true"}',
        '{"reconciliation_paused": " TRUE "}',
        '{"reconciliation_paused": "yes"}',
        '{"reconciliation_paused": "on"}',
        '{"reconciliation_paused": 1}',
        '{"reconciliation_paused": "1"}',
        '{"reconciliation_paused": true, "someone_elses": {"x": 1}}',
    ],
)
def test_spellings_of_paused(value: str) -> None:
    assert parse(value) == PAUSED


@pytest.mark.parametrize(
    "value",
    [
        None,  # no row
        "{}",
        '{"reconciliation_paused": null}',
        '{"reconciliation_paused": false}',
        '{"reconciliation_paused": "False"}',
        '{"reconciliation_paused": "no"}',
        '{"reconciliation_paused": "off"}',
        '{"reconciliation_paused": 0}',
    ],
)
def test_spellings_of_not_paused(value: str | None) -> None:
    assert parse(value) == RUNNING


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        ('{"reconciliation_paused": tru', "not JSON"),
        ("", "not JSON"),
        ('["reconciliation_paused"]', "not a JSON object but list"),
        ("true", "not a JSON object but bool"),
        ('{"reconciliation_paused": "maybe"}', 'reconciliation_paused is "maybe": expected true or false'),
        ('{"reconciliation_paused": 2}', "reconciliation_paused is 2"),
        ('{"reconciliation_paused": ""}', 'reconciliation_paused is ""'),
        ('{"reconciliation_paused": {"on": true}}', "reconciliation_paused is {"),
    ],
)
def test_anything_else_is_malformed(value: str, detail: str) -> None:
    with pytest.raises(MalformedSettingsError, match="^" + detail.replace("{", "\\{").replace("[", "\\[")):
        parse(value)


def test_a_long_value_is_shortened_in_the_detail() -> None:
    with pytest.raises(MalformedSettingsError) as raised:
        parse('{"reconciliation_paused": "' + "x" * 500 + '"}')
    assert len(str(raised.value)) < 100


def test_the_keeper_keeps_the_last_good_value_and_has_none_at_first() -> None:
    keeper = SettingsKeeper()
    first = keeper.read("not json")
    assert first.settings is None
    assert first.malformed is not None
    assert keeper.read('{"reconciliation_paused": "yes"}').settings == PAUSED
    bad = keeper.read('{"reconciliation_paused": "perhaps"}')
    assert bad.settings == PAUSED  # the operator's last readable word stands
    assert bad.malformed is not None
    assert keeper.read(None).settings == RUNNING  # the row deleted: the defaults, readable
