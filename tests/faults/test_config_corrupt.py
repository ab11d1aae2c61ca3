"""A config file the app could not use is never destroyed by a save (issue 14, item 1): the save first keeps it,
byte for byte, as `config.json.corrupt-<YYYYmmdd-HHMMSS>` beside it, and says where (`describe`, GET /api/config,
the Settings page). If no copy can be kept, the save is refused and the file left as it is."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from core.settings import ConfigInvalid, SettingsManager
from tests.conftest import start_app, stop_process

CORRUPT = [
    pytest.param(b'{"port": 9001, "concurrency_limit": 3,', id='bad-json'),
    pytest.param(b'[1, 2, 3]\n', id='not-an-object'),
    pytest.param(b'{"port": 9001}\xff\xfe\n', id='not-utf8'),
]
COPY_NAME = re.compile(r'^config\.json\.corrupt-\d{8}-\d{6}(-\d+)?$')


def copies(folder: Path, name: str = 'config.json') -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(f'{name}.corrupt-'))


@pytest.mark.parametrize('raw', CORRUPT)
def test_a_save_keeps_the_unreadable_file_first(
    settings_factory: Callable[..., SettingsManager], tmp_path: Path, raw: bytes
) -> None:
    config = tmp_path / 'config.json'
    config.write_bytes(raw)
    m = settings_factory()
    assert m.settings.port == 8080  # started on defaults
    assert [w.field for w in m.warnings] == ['(file)']
    assert 'before the first save' in m.warnings[0].message
    assert config.read_bytes() == raw and copies(tmp_path) == []  # nothing is touched until a save

    m.update({'sse_heartbeat': 20})

    [kept] = copies(tmp_path)
    assert COPY_NAME.match(kept.name)
    assert kept.read_bytes() == raw  # the user's file, byte for byte
    assert kept.stat().st_mode & 0o077 == 0  # it may hold API keys
    assert json.loads(config.read_text()) == {'sse_heartbeat': 20}
    described = m.describe()
    assert described['kept_copies'] == [
        {'file': str(config), 'copy': str(kept), 'reason': described['kept_copies'][0]['reason']}
    ]
    assert [w['field'] for w in described['warnings']] == ['(file)']
    assert str(kept) in described['warnings'][0]['message']  # where it went, not the stale "using defaults"
    m.update({'sse_heartbeat': 21})
    assert copies(tmp_path) == [kept]  # the file is the app's own now: no copy of it


def test_a_hand_edit_broken_while_running_is_kept_before_the_next_save(
    settings_factory: Callable[..., SettingsManager], tmp_path: Path
) -> None:
    config = tmp_path / 'config.json'
    m = settings_factory()
    m.update({'concurrency_limit': 4})
    assert copies(tmp_path) == []  # an ordinary save keeps nothing
    for n, edit in enumerate([b'{"concurrency_limit": 5,', b'{"concurrency_limit": -1, "sse_heartbeat": 9}'], 1):
        config.write_bytes(edit)
        with pytest.raises(ConfigInvalid):
            m.reload_file()
        assert m.settings.concurrency_limit == 4  # the settings in force are kept
        m.update({'sse_heartbeat': 20 + n})
        kept = copies(tmp_path)
        assert len(kept) == n and kept[-1].read_bytes() == edit
        assert m.describe()['kept_copies'][-1]['copy'] == str(kept[-1])
        assert any(str(kept[-1]) in w['message'] for w in m.describe()['warnings'])
        assert json.loads(config.read_text()) == {'concurrency_limit': 4, 'sse_heartbeat': 20 + n}


def test_a_file_that_cannot_be_copied_is_not_saved_over(
    settings_factory: Callable[..., SettingsManager], tmp_path: Path
) -> None:
    # A config path that cannot be read (a folder here: root reads any file, so no chmod) cannot be copied either.
    config = tmp_path / 'config.json'
    config.mkdir()
    (config / 'inside.txt').write_text('mine')
    m = settings_factory()
    assert [w.field for w in m.warnings] == ['(file)']
    with pytest.raises(ConfigInvalid) as exc:
        m.update({'sse_heartbeat': 20})
    [error] = exc.value.errors
    assert error.field == '(file)' and 'nothing was saved' in error.message and str(config) in error.message
    assert (config / 'inside.txt').read_text() == 'mine' and copies(tmp_path) == []
    assert m.settings.sse_heartbeat == 15.0


def _wait_until(predicate: Callable[[], bool], deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while not predicate():
        assert time.monotonic() < end, f'not within {deadline_s}s'
        time.sleep(0.05)


def test_the_running_app_keeps_the_file_on_put_and_says_where(tmp_path: Path, models_dir: Path) -> None:
    raw = b'{"concurrency_limit": 3, "sse_heartbeat": 7\n'  # a hand edit missing its closing brace
    config = tmp_path / 'app-config.json'
    config.write_bytes(raw)
    app = start_app(tmp_path, '--models-dir', str(models_dir))
    try:
        base = app.base_url
        before = httpx.get(f'{base}/api/config').json()
        assert before['kept_copies'] == [] and [w['field'] for w in before['warnings']] == ['(file)']

        saved = httpx.put(f'{base}/api/config', json={'sse_heartbeat': 20})
        assert saved.status_code == 200, saved.text
        [kept] = copies(tmp_path, 'app-config.json')
        assert kept.read_bytes() == raw
        assert json.loads(config.read_text()) == {'sse_heartbeat': 20}
        described = httpx.get(f'{base}/api/config').json()
        assert [k['copy'] for k in described['kept_copies']] == [str(kept)]
        assert described['kept_copies'][0]['file'] == str(config)
        assert any(str(kept) in w['message'] for w in described['warnings'])
        assert str(kept) in httpx.get(f'{base}/settings').text  # the Settings page shows where it went

        # Broken again by hand while the app runs: the watcher keeps the settings in force, the next PUT keeps it.
        edit = b'{"sse_heartbeat": 30, oops}'
        config.write_bytes(edit)
        _wait_until(lambda: httpx.get(f'{base}/api/config').json()['file_errors'] != [], 10)
        assert httpx.get(f'{base}/api/config').json()['settings']['sse_heartbeat'] == 20
        assert httpx.put(f'{base}/api/config', json={'concurrency_limit': 2}).status_code == 200
        second = [p for p in copies(tmp_path, 'app-config.json') if p != kept]
        assert len(second) == 1 and second[0].read_bytes() == edit
        assert json.loads(config.read_text()) == {'concurrency_limit': 2, 'sse_heartbeat': 20}
        assert str(second[0]) in json.dumps(httpx.get(f'{base}/api/config').json()['kept_copies'])
    finally:
        stop_process(app.proc, timeout=20)
