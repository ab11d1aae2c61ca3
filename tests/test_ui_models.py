"""The Models page over real models: list, search, sort, filter, load/unload with feedback, pin, details (metadata,
command line, parameter editor that restarts a running model only when its command line changes), unusable files
and new files appearing by themselves."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from nicegui import app
from nicegui.testing import User

from tests.conftest import wait_for
from tests.gguf_factory import write_tiny_gguf


@pytest.fixture
def shelf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: Path, tiny_model_b: Path) -> Path:
    """Two real models and one corrupt file, in a folder of this test's own."""
    shelf = tmp_path / 'shelf'
    shelf.mkdir()
    shutil.copy(tiny_model, shelf / 'tiny-llama.gguf')
    shutil.copy(tiny_model_b, shelf / 'tiny-llama-b.gguf')
    (shelf / 'broken.gguf').write_bytes(b'GGUF' + b'\x03\x00\x00\x00' + b'\xff' * 20)
    monkeypatch.setenv('LAP_MODELS_DIRS', str(shelf))
    return shelf


def texts(user: User, marker: str) -> list[str]:
    return [getattr(e, 'text', '') for e in user.find(marker=marker).elements]


def card_ids(user: User) -> list[str]:
    """The model ids of the cards shown, in page order."""
    listing = user.find(marker='models-list').elements.pop()
    return [m.removeprefix('model-') for e in listing.descendants() for m in e._markers if m.startswith('model-')]


async def _open_with_models(user: User, n: int = 3) -> None:
    await user.open('/models')
    system = app.state.system
    await wait_for(lambda: len(system.library.models()) >= n, deadline_s=20)
    await user.open('/models')


async def test_models_page_lists_loads_and_unloads(models_env: Path, user: User) -> None:
    await _open_with_models(user, 1)
    system = app.state.system
    await user.should_see(marker='model-tiny-llama')
    await user.should_see('llama')  # architecture read from the GGUF
    await user.should_see(marker='fit-tiny-llama')
    user.find(marker='load-tiny-llama').click()
    await wait_for(lambda: system.scheduler.describe('tiny-llama')['status'] == 'ready', deadline_s=60)
    await user.should_see('tiny-llama is ready', retries=50)  # the toast arrives though its button was redrawn
    await user.should_see(marker='unload-tiny-llama', retries=30)
    await user.should_see('port ', retries=30)  # running figures: pid, port, uptime, slots
    user.find(marker='unload-tiny-llama').click()
    await wait_for(lambda: system.scheduler.describe('tiny-llama')['status'] == 'stopped', deadline_s=30)
    await user.should_see('tiny-llama stopped', retries=30)
    await user.should_see(marker='load-tiny-llama', retries=30)


async def test_search_sort_and_filters(shelf: Path, user: User) -> None:
    await _open_with_models(user)
    assert card_ids(user) == ['broken', 'tiny-llama', 'tiny-llama-b']
    user.find(marker='models-search').type('-b')
    await wait_for(lambda: card_ids(user) == ['tiny-llama-b'])
    user.find(marker='models-search').clear()
    await wait_for(lambda: len(card_ids(user)) == 3)
    user.find(marker='models-status').elements.pop().set_value('unusable')
    await wait_for(lambda: card_ids(user) == ['broken'])
    user.find(marker='models-status').elements.pop().set_value('all')
    user.find(marker='models-capability').elements.pop().set_value('chat')
    await wait_for(lambda: card_ids(user) == ['tiny-llama', 'tiny-llama-b'])
    user.find(marker='models-capability').elements.pop().set_value('all')
    user.find(marker='models-sort').elements.pop().set_value('size')
    await wait_for(lambda: card_ids(user)[-1] == 'broken')  # the smallest file last
    await user.should_see('3 of 3 models shown')


async def test_an_unusable_file_shows_only_its_error(shelf: Path, user: User) -> None:
    await _open_with_models(user)
    assert texts(user, 'status-broken') == ['unusable']
    assert texts(user, 'error-broken') and texts(user, 'error-broken')[0]
    await user.should_not_see(marker='load-broken')
    await user.should_not_see(marker='fit-broken')


async def test_pin_is_saved_and_shown(shelf: Path, user: User) -> None:
    await _open_with_models(user)
    user.find(marker='pin-tiny-llama').click()
    await user.should_see('tiny-llama pinned', retries=30)
    saved = json.loads(Path(os.environ['LAP_CONFIG']).read_text())
    assert saved['models']['tiny-llama']['pinned'] is True
    assert app.state.system.config.settings.models['tiny-llama'].pinned


async def test_new_files_appear_by_themselves(shelf: Path, user: User) -> None:
    await _open_with_models(user)
    write_tiny_gguf(shelf / 'fresh-arrival.gguf', name='fresh-arrival', seed=5)
    await wait_for(lambda: 'fresh-arrival' in card_ids(user), deadline_s=20)


async def test_details_show_metadata_template_and_command_line(shelf: Path, user: User) -> None:
    await _open_with_models(user)
    user.find(marker='details-tiny-llama').click()
    await user.should_see(marker='metadata-table')
    table = user.find(marker='metadata-table').elements.pop()
    keys = [r['key'] for r in table.rows]
    assert 'general.architecture' in keys and 'llama.context_length' in keys
    assert next(r['value'] for r in table.rows if r['key'] == 'general.architecture') == 'llama'
    await user.should_see(marker='command-line', retries=100)  # drawn once the launch is worked out, off the loop
    command = user.find(marker='command-line').elements
    line = command.pop().content
    assert '--model' in line and str(shelf / 'tiny-llama.gguf') in line
    assert user.find(marker='details-template').elements.pop().content  # the fixture has a chat template


async def test_parameter_editor_saves_restarts_only_on_a_changed_command_line_and_shows_errors(
    shelf: Path, user: User
) -> None:
    system = app.state.system
    await _open_with_models(user)
    first = await system.scheduler.load('tiny-llama')
    user.find(marker='details-tiny-llama').click()
    await user.should_see(marker='param-ctx_size')
    # A bad value: its field says why, nothing is saved, the server keeps running.
    user.find(marker='param-threads').elements.pop().set_value(0)
    user.find(marker='params-save').click()
    await user.should_see('Not saved', retries=30)
    threads = user.find(marker='param-threads').elements.pop()
    assert threads.props.get('error') and 'greater than or equal to 1' in threads.props['error-message']
    assert 'tiny-llama' not in system.config.settings.models
    # A changed context size changes the command line: the running server restarts with it.
    threads.set_value(None)
    user.find(marker='param-ctx_size').elements.pop().set_value(512)
    user.find(marker='params-save').click()
    await user.should_see('restarts with the new command line', retries=50)
    assert not user.find(marker='param-threads').elements.pop().props.get('error')
    await wait_for(lambda: '512' in user.find(marker='command-line').elements.pop().content.split('--ctx-size ')[-1])
    await wait_for(
        lambda: (
            system.scheduler.describe('tiny-llama')['status'] == 'ready'
            and system.scheduler.describe('tiny-llama')['pid'] != first.pid
        ),
        deadline_s=60,
    )
    # ttl is not on the command line: saved, applied, no restart.
    pid = system.scheduler.describe('tiny-llama')['pid']
    user.find(marker='param-ttl').elements.pop().set_value(600)
    user.find(marker='params-save').click()
    await user.should_see('command line is unchanged', retries=50)
    assert system.config.settings.models['tiny-llama'].ttl == 600
    assert system.scheduler.describe('tiny-llama')['pid'] == pid
    # Reset to defaults removes the overrides.
    user.find(marker='params-reset').click()
    await wait_for(lambda: 'tiny-llama' not in system.config.settings.models, deadline_s=30)


async def test_a_file_name_with_quotes_is_text_never_a_prop(shelf: Path, user: User) -> None:
    """Quasar props parsed from a string would turn `" :title="...` into a bound prop that the browser evaluates:
    the file name shows as text, and no element carries a bound (`:`) prop."""
    evil = 'evil" :title="alert(1)'
    shutil.copy(shelf / 'tiny-llama.gguf', shelf / f'{evil}.gguf')
    await _open_with_models(user, 4)
    await user.should_see(evil)
    assert user.client is not None
    elements = list(user.client.elements.values())
    labels = [e.props.get('aria-label') for e in elements if e.props.get('aria-label')]
    assert 'Pin evil-title-alert-1' in labels, labels  # the library's id for it: quotes and spaces never reach one
    assert not [(e, k) for e in elements for k in e.props if k.startswith(':')]


@pytest.fixture
def refused_value(shelf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A value llama-server itself refuses (the flag exists, so the launch policy lets it through)."""
    monkeypatch.setenv('LAP_RESTART_BACKOFF', '0.05')  # its retries, quickly, before it gives up
    bad = {'models': {'tiny-llama': {'extra_args': ['--rope-scaling', 'sideways']}}}
    Path(os.environ['LAP_CONFIG']).write_text(json.dumps(bad))


async def test_a_failed_load_shows_its_reason_and_the_last_log_lines(
    refused_value: None, user: User, caplog: pytest.LogCaptureFixture
) -> None:
    await _open_with_models(user)
    system = app.state.system
    user.find(marker='load-tiny-llama').click()
    await user.should_see('load tiny-llama failed', retries=100)  # one toast, with the reason
    await wait_for(lambda: system.scheduler.describe('tiny-llama')['status'] == 'failed', deadline_s=30)

    def failure_texts() -> list[str]:
        try:
            found = user.find(marker='failure-tiny-llama').elements
        except AssertionError:  # not drawn yet
            return []
        return [e.text for box in found for e in box.descendants() if hasattr(e, 'text')]

    error = system.scheduler.describe('tiny-llama')['error']
    texts = await wait_for(lambda: (t := failure_texts()) and t[0] == error and t, deadline_s=10)  # the final reason
    assert 'error while handling argument "--rope-scaling": invalid value' in texts[0], texts  # its own words
    assert 'giving up' in texts[0] and any('rope' in t.lower() for t in texts[1:]), texts  # and its last lines
    await user.should_see(marker='load-tiny-llama')  # it can be tried again
    records = caplog.get_records('call')  # the one ERROR this test causes: the supervisor giving up
    expected = [r for r in records if r.levelname == 'ERROR' and 'giving up' in r.getMessage()]
    assert expected
    for r in expected:
        records.remove(r)
