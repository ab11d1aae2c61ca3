"""The Settings page through NiceGUI's simulated user: typed fields in groups, a refused save marks its field and
writes nothing, overrides by env are shown, the binary Test, API keys shown once, and the model folder list."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from nicegui import ui
from nicegui.testing import User

from core.settings import Settings
from tests.conftest import wait_for
from ui.settings import ALL_GROUPS, bounds, kind_of


def config_file() -> Path:
    return Path(os.environ['LAP_CONFIG'])


def saved() -> dict[str, Any]:
    path = config_file()
    return json.loads(path.read_text()) if path.exists() else {}


def element(user: User, marker: str) -> Any:
    found = user.find(marker=marker).elements
    assert len(found) == 1, (marker, found)
    return next(iter(found))


def test_every_field_is_in_exactly_one_group() -> None:
    names = [name for group in ALL_GROUPS for name in group.fields]
    assert sorted(names) == sorted(Settings.model_fields)
    assert len(names) == len(set(names))


def test_inputs_take_their_type_and_limits_from_the_model() -> None:
    fields = Settings.model_fields
    assert kind_of(fields['concurrency_limit']) == 'int'
    assert kind_of(fields['memory_budget_mb']) == 'int'  # int | None
    assert kind_of(fields['log_level']) == 'choice'
    assert kind_of(fields['send_loading_state']) == 'bool'
    assert kind_of(fields['cors_origins']) == 'list'
    assert kind_of(fields['llama_server_path']) == 'text'
    assert bounds(fields['port']) == (1, 65535)
    assert bounds(fields['alert_ram_pct']) == (0, 100)


async def test_a_bad_value_is_marked_on_its_field_and_nothing_is_written(user: User) -> None:
    await user.open('/settings')
    await user.should_see('Scheduler')
    await user.should_see('Concurrency limit')
    limit = element(user, 'setting-concurrency_limit')
    assert isinstance(limit, ui.number) and limit.props['min'] == 1
    user.find(marker='setting-concurrency_limit').clear().type('0')
    user.find(marker='save-settings').click()
    await user.should_see('Not saved')
    await wait_for(lambda: limit.error)
    assert 'greater than or equal to 1' in limit.error
    assert not config_file().exists()
    user.find(marker='setting-concurrency_limit').clear().type('6')  # editing clears the mark
    assert not limit.error


async def test_a_good_value_is_saved_to_the_config_file(user: User) -> None:
    await user.open('/settings')
    user.find(marker='setting-concurrency_limit').clear().type('6')
    element(user, 'setting-log_level').set_value('debug')
    await user.should_see('2 unsaved changes')
    user.find(marker='save-settings').click()
    await user.should_see('Saved Concurrency limit, Log level.')
    assert saved() == {'concurrency_limit': 6, 'log_level': 'debug'}
    await user.should_not_see('unsaved change')
    await user.should_see('Saved Concurrency limit, Log level.', marker='save-status')  # stays after the toast
    user.find(marker='save-settings').click()  # only what changed is sent: nothing now
    await user.should_see('Nothing changed')


async def test_saving_the_port_says_the_app_needs_a_restart(user: User) -> None:
    await user.open('/settings')
    user.find(marker='setting-port').clear().type('9123')
    user.find(marker='save-settings').click()
    await user.should_see('Restart the app to apply Port.')
    assert saved() == {'port': 9123}


@pytest.fixture
def limit_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set before the app starts (request it before `user`)."""
    monkeypatch.setenv('LAP_CONCURRENCY_LIMIT', '4')


async def test_a_field_set_by_the_environment_shows_it_is_overridden(limit_from_env: None, user: User) -> None:
    await user.open('/settings')
    await user.should_see('from env', marker='source-concurrency_limit')
    await user.should_see('In force: 4 from LAP_CONCURRENCY_LIMIT', marker='override-concurrency_limit')
    limit = element(user, 'setting-concurrency_limit')
    assert limit.value == 10  # the input edits the saved value (here the default), not the one env forces
    user.find(marker='setting-concurrency_limit').clear().type('7')
    user.find(marker='save-settings').click()
    await user.should_see('is set by LAP_CONCURRENCY_LIMIT')
    assert saved() == {'concurrency_limit': 7}
    from nicegui import app

    assert app.state.system.config.settings.concurrency_limit == 4


async def test_local_only_fields_are_read_only(user: User) -> None:
    await user.open('/settings')
    binary = element(user, 'setting-llama_server_path')
    assert binary.props.get('readonly') is True
    assert binary.props['aria-label'] == 'llama-server path (llama_server_path)'
    assert 'Read-only here: set llama_server_path in the config file or LAP_LLAMA_SERVER_PATH' in binary.props['hint']


async def test_the_binary_test_shows_its_version(user: User) -> None:
    await user.open('/settings')
    info = element(user, 'binary-info')
    info.set_text('')
    user.find(marker='test-binary').click()
    await wait_for(lambda: info.text)
    assert 'llama-server 0.' in info.text
    await user.should_see('0.', marker='binary-info')
    await user.should_see('works')


async def test_an_api_key_is_shown_once_saved_and_removed(user: User) -> None:
    await user.open('/settings')
    await user.should_see('No key saved.')
    user.find(marker='add-api-key').click()
    await user.should_see(marker='confirm-api-key')
    user.find(marker='confirm-api-key').click()  # empty: a generated key
    await user.should_see(marker='new-key-value')
    key = element(user, 'new-key-value').text
    assert key.startswith('lap-') and len(key) > 20
    assert saved()['api_keys'] == [key]
    await user.should_see(key[-4:], marker='api-key-row')  # masked in the list
    await user.should_see('this browser')  # signed in with it, so this page keeps working
    assert not any(key in str(getattr(e, 'text', '')) for e in user.find(marker='api-key-row').elements)
    user.find(marker='close-api-key').click()

    user.find(marker='add-api-key').click()
    user.find(marker='new-api-key').type('short')
    user.find(marker='confirm-api-key').click()
    await wait_for(lambda: 'At least 8 characters' in (element(user, 'new-api-key').error or ''))
    user.find(marker='new-api-key').clear().type('my-typed-key-1234')
    user.find(marker='confirm-api-key').click()
    await user.should_see(marker='new-key-value')
    assert saved()['api_keys'] == [key, 'my-typed-key-1234']
    user.find(marker='close-api-key').click()

    rows = sorted(user.find(marker='remove-api-key').elements, key=lambda e: e.id)
    user.find(marker='remove-api-key').click()  # the first key's button (lowest id)
    assert rows
    await user.should_see(marker='confirm-remove-key')
    user.find(marker='confirm-remove-key').click()
    await user.should_see('API key removed.')
    assert saved()['api_keys'] == ['my-typed-key-1234']


async def test_model_folders_add_remove_and_flag_a_missing_one(user: User, tmp_path: Path) -> None:
    here = tmp_path / 'models-here'
    here.mkdir()
    missing = tmp_path / 'not-there'
    await user.open('/settings')
    for path in (here, missing):
        user.find(marker='setting-models_dirs-new').type(str(path))
        user.find(marker='setting-models_dirs-add').click()
    await user.should_see(str(missing), marker='setting-models_dirs-path')
    await user.should_see('not found', marker='setting-models_dirs-missing')
    assert len(user.find(marker='setting-models_dirs-missing').elements) == 1  # the existing folder is not flagged
    user.find(marker='setting-models_dirs-remove-1').click()
    await user.should_not_see(marker='setting-models_dirs-missing')
    user.find(marker='save-settings').click()
    await user.should_see('Saved Model folders.')
    assert saved() == {'models_dirs': [str(here)]}
