"""Settings layering, provenance, validation by field, atomic saves and keeping the last good config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from core.settings import ConfigInvalid, SettingsManager


def manager(tmp_path: Path, cli: dict | None = None, env_file: Path | None = None) -> SettingsManager:
    return SettingsManager(config_path=tmp_path / 'cfg.json', cli=cli, env_file=env_file or tmp_path / 'none.env')


def test_defaults(tmp_path: Path) -> None:
    m = manager(tmp_path)
    assert m.settings.host == '127.0.0.1'
    assert m.settings.port == 8080
    assert m.settings.api_keys == []
    assert m.sources['port'] == 'default'
    assert m.warnings == []


def test_layering_file_env_dotenv_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / 'cfg.json').write_text(json.dumps({'port': 9001, 'log_level': 'debug', 'max_loaded_models': 2}))
    (tmp_path / '.env').write_text('LAP_LOG_LEVEL=warning\nLAP_CONCURRENCY_LIMIT=3\n')
    monkeypatch.setenv('LAP_PORT', '9002')
    monkeypatch.setenv('LAP_MODELS_DIRS', '/m1:/m2')
    m = manager(tmp_path, cli={'port': 9003}, env_file=tmp_path / '.env')
    s = m.settings
    assert (s.port, m.sources['port']) == (9003, 'cli')
    assert (s.log_level, m.sources['log_level']) == ('warning', 'env')  # .env beats the file
    assert (s.concurrency_limit, m.sources['concurrency_limit']) == (3, 'env')
    assert (s.max_loaded_models, m.sources['max_loaded_models']) == (2, 'file')
    assert [str(p) for p in s.models_dirs] == ['/m1', '/m2']
    assert m.sources['host'] == 'default'


def test_env_json_list_and_nested(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('LAP_API_KEYS', '["k1", "k2"]')
    monkeypatch.setenv('LAP_DEFAULTS', '{"ctx_size": 1024}')
    m = manager(tmp_path)
    assert m.settings.api_keys == ['k1', 'k2']
    assert m.settings.defaults.ctx_size == 1024


def test_invalid_values_are_reported_by_field_and_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / 'cfg.json').write_text(json.dumps({'port': 70000, 'concurrency_limit': 4}))
    monkeypatch.setenv('LAP_METRICS_INTERVAL', 'fast')
    m = manager(tmp_path)
    assert m.settings.port == 8080  # the bad file value is dropped, not fatal
    assert m.settings.concurrency_limit == 4  # the good ones stay
    assert m.settings.metrics_interval == 1.0
    by_field = {w.field: w for w in m.warnings}
    assert by_field['port'].source == 'file'
    assert 'less than or equal to 65535' in by_field['port'].message
    assert by_field['metrics_interval'].source == 'env'


def test_unreadable_json_keeps_defaults_with_a_message(tmp_path: Path) -> None:
    (tmp_path / 'cfg.json').write_text('{"port": 90')
    m = manager(tmp_path)
    assert m.settings.port == 8080
    assert any('cannot read' in w.message for w in m.warnings)


def test_update_saves_atomically_and_reports_restart(tmp_path: Path) -> None:
    m = manager(tmp_path)
    seen: list[list[str]] = []
    m.on_change(lambda s, changed: seen.append(changed))
    result = m.update({'port': 9100, 'concurrency_limit': 5})
    assert result.restart_required == ['port']
    assert set(result.changed) == {'port', 'concurrency_limit'}
    saved = json.loads((tmp_path / 'cfg.json').read_text())
    assert saved == {'concurrency_limit': 5, 'port': 9100}
    assert not [p for p in os.listdir(tmp_path) if p.endswith('.tmp')]  # no temp file left behind
    assert seen == [['port', 'concurrency_limit']]
    assert manager(tmp_path).settings.port == 9100  # survives a restart


def test_invalid_update_keeps_old_config_and_file(tmp_path: Path) -> None:
    m = manager(tmp_path)
    m.update({'port': 9100})
    before = (tmp_path / 'cfg.json').read_bytes()
    with pytest.raises(ConfigInvalid) as exc:
        m.update({'port': 'eighty', 'concurrency_limit': 0})
    fields = {e.field for e in exc.value.errors}
    assert fields == {'port', 'concurrency_limit'}
    assert m.settings.port == 9100
    assert (tmp_path / 'cfg.json').read_bytes() == before
    with pytest.raises(ConfigInvalid) as exc:
        m.update({'no_such_setting': 1})
    assert exc.value.errors[0].field == 'no_such_setting'


def test_env_still_wins_after_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('LAP_CONCURRENCY_LIMIT', '7')
    m = manager(tmp_path)
    result = m.update({'concurrency_limit': 2})
    assert result.overridden == {'concurrency_limit': 'env'}
    assert m.settings.concurrency_limit == 7


def test_api_keys_are_redacted(tmp_path: Path) -> None:
    m = manager(tmp_path, cli={'api_keys': ['secret-key']})
    described = m.describe()
    assert described['settings']['api_keys'] == ['***']
    assert 'secret-key' not in json.dumps(described)
