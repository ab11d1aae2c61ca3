"""The app through its real command line, as a user starts it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import ROOT, AppProcess, start_app, stop_process, wait_for


def test_help_describes_every_flag() -> None:
    out = subprocess.run([sys.executable, str(ROOT / 'main.py'), '--help'], capture_output=True, text=True, check=True)
    for flag in ('--host', '--port', '--models-dir', '--config', '--native', '--no-browser', '--log-level'):
        assert flag in out.stdout


def test_health_and_home_page(app_process: AppProcess) -> None:
    health = httpx.get(f'{app_process.base_url}/api/health').json()
    assert health['status'] == 'ok'
    assert health['version']
    assert health['llama_server']['path'].endswith('llama-server')
    assert health['llama_server']['version']
    home = httpx.get(f'{app_process.base_url}/')
    assert home.status_code == 200
    assert 'Llama Async Proxy' in home.text
    for label in ('Dashboard', 'Models', 'Monitoring', 'Logs', 'Settings', 'Chat'):
        assert label in home.text
    for path in ('/models', '/activity', '/monitoring', '/logs', '/settings', '/chat'):
        assert httpx.get(f'{app_process.base_url}{path}').status_code == 200


async def test_the_objects_built_at_startup_are_frozen_out_of_full_collections(app_process: AppProcess) -> None:
    # main.py freezes them once the System has started (a full pass over them stopped the loop for ~0.1 s).
    async with httpx.AsyncClient(base_url=app_process.base_url) as c:

        async def frozen() -> bool:
            return (await c.get('/api/health/runtime')).json()['gc_frozen_objects'] > 50_000

        await wait_for(frozen, 30, interval=0.2)
        runtime = (await c.get('/api/health/runtime')).json()
    assert runtime['gc_passes'] >= 1 and runtime['gc_seconds'] > 0  # (the pass before the freeze, at least)


def test_config_api_round_trip(app_process: AppProcess) -> None:
    base = app_process.base_url
    cfg = httpx.get(f'{base}/api/config').json()
    assert cfg['sources']['port'] == 'cli'
    assert cfg['sources']['data_dir'] == 'env'
    bad = httpx.put(f'{base}/api/config', json={'concurrency_limit': 0, 'port': 'x'})
    assert bad.status_code == 422
    assert {e['field'] for e in bad.json()['detail']} == {'concurrency_limit', 'port'}
    assert not app_process.config_path.exists()  # nothing saved
    ok = httpx.put(f'{base}/api/config', json={'concurrency_limit': 4, 'host': '127.0.0.1'})
    assert ok.status_code == 200
    assert ok.json()['settings']['concurrency_limit'] == 4
    assert json.loads(app_process.config_path.read_text())['concurrency_limit'] == 4
    assert httpx.put(f'{base}/api/config', json={'host': '127.0.0.2'}).json()['restart_required'] == ['host']
    overridden = httpx.put(f'{base}/api/config', json={'port': 9999}).json()
    assert overridden['overridden'] == {'port': 'cli'}  # saved, but --port still wins
    assert overridden['restart_required'] == []


def test_bad_config_file_does_not_stop_the_app(tmp_path: Path) -> None:
    (tmp_path / 'app-config.json').write_text('{"port": "not a port", "concurrency_limit": 3}')
    app = start_app(tmp_path)
    try:
        cfg = httpx.get(f'{app.base_url}/api/config').json()
        assert cfg['settings']['concurrency_limit'] == 3
        assert [w['field'] for w in cfg['warnings']] == ['port']
    finally:
        stop_process(app.proc)
    assert 'Traceback' not in (app.proc.stdout.read() if app.proc.stdout and not app.proc.stdout.closed else '')


def test_non_loopback_without_key_is_refused(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / 'main.py'), '--no-browser', '--host', '0.0.0.0', '--config', str(tmp_path / 'c')],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode != 0
    assert 'without an API key' in out.stderr and 'LAP_API_KEYS' in out.stderr
    assert 'Traceback' not in out.stderr


def test_the_real_app_streams_uncompressed_and_unbuffered(app_process: AppProcess) -> None:
    # NiceGUI compresses what it serves; the proxy's streams come from the front door, before that middleware.
    base, gzip = app_process.base_url, {'Accept-Encoding': 'gzip'}
    page = httpx.get(f'{base}/', headers=gzip)
    assert page.headers.get('content-encoding') == 'gzip'  # the middleware is there, and a stream would meet it
    body = {'model': 'tiny-llama', 'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 4, 'stream': True}
    with httpx.stream('POST', f'{base}/v1/chat/completions', json=body, headers=gzip, timeout=60) as r:
        assert r.status_code == 200
        assert 'content-encoding' not in r.headers
        assert r.headers['content-type'].startswith('text/event-stream')
        assert r.headers['cache-control'] == 'no-cache' and r.headers['x-accel-buffering'] == 'no'
        lines = [line for line in r.iter_lines() if line.startswith('data: ')]
    assert lines[-1] == 'data: [DONE]' and len(lines) >= 5
