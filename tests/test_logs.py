"""Logs: filters over the ring buffer via GET /api/logs, rotating files per source, the download."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.events import EventBus
from core.logs import LogService, llama_line_level
from tests.conftest import wait_for
from tests.metrics_helpers import serve


async def test_log_filters(system_factory) -> None:
    system = await system_factory(metrics_interval=60)
    logs = system.logs
    logs.add('app', 'starting up', 'info')
    logs.add_llama_line('alpha', 'srv  load_model: loading model')
    logs.add_llama_line('alpha', 'E llama_model_load: failed to read header')
    logs.add_llama_line('beta', 'W context shift disabled')
    since = logs.query(limit=1)[-1].ts
    await wait_for(lambda: time.time() > since)  # a distinct timestamp for `since`
    logging.getLogger('core.test').warning('disk nearly full', extra={'model': 'beta'})

    async with serve(system) as served, httpx.AsyncClient(base_url=served.base_url) as client:

        async def get(**params: object) -> list[str]:
            r = await client.get('/api/logs', params={k: v for k, v in params.items() if v is not None})
            assert r.status_code == 200, r.text
            return [line['message'] for line in r.json()['lines']]

        assert await get(model='alpha') == [
            'srv  load_model: loading model',
            'E llama_model_load: failed to read header',
        ]
        assert await get(level='warning', source='llama-server') == [
            'E llama_model_load: failed to read header',
            'W context shift disabled',
        ]
        assert await get(level='error') == ['E llama_model_load: failed to read header']
        assert await get(q='CONTEXT shift') == ['W context shift disabled']
        assert await get(since=since, source='app', model='beta') == ['disk nearly full']
        assert (await get(source='llama-server', limit=1)) == ['W context shift disabled']
        r = await client.get('/api/logs', params={'level': 'loud'})
        assert r.status_code == 422
        assert (await client.get('/api/logs', params={'limit': 0})).status_code == 422


async def test_a_subscriber_hears_the_lines_added_while_it_listens() -> None:
    """With no one listening a line is kept, not published; a page that opens hears the next lines at once, and
    one that closed hears none."""
    bus = EventBus()
    bus.attach_loop(asyncio.get_running_loop())
    logs = LogService(bus)
    logs.add_llama_line('alpha', 'I before anyone listened')
    heard: list[str] = []
    other: list[str] = []
    with bus.subscribe(['metrics'], lambda e: other.append(e.type)):
        logs.add_llama_line('alpha', 'I still nobody on logs')
        sub = bus.subscribe(['logs'], lambda e: heard.append(e.data['message']))
        logs.add_llama_line('alpha', 'W while listening')
        sub.close()
        logs.add_llama_line('alpha', 'I after it left')
        with bus.subscribe(None, lambda e: heard.append(e.data['message'])):  # all topics
            logs.add_llama_line('alpha', 'E to everyone')
    assert heard == ['W while listening', 'E to everyone']
    assert other == []
    assert [r.message for r in logs.query()] == [
        'I before anyone listened',
        'I still nobody on logs',
        'W while listening',
        'I after it left',
        'E to everyone',
    ]


def test_llama_levels_from_real_server_output(llama_binary, tmp_path: Path) -> None:
    """A model file that is not GGUF: llama-server explains and exits; its error lines are classified as errors."""
    bad = tmp_path / 'broken.gguf'
    bad.write_bytes(b'not a gguf file at all')
    out = subprocess.run(
        [str(llama_binary.path), '-m', str(bad), '--port', '0'],
        env=llama_binary.child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    service = LogService(EventBus())
    for line in (out.stdout + out.stderr).splitlines():
        service.add_llama_line('broken', line)
    errors = service.query(level='error', model='broken')
    assert errors and any('broken.gguf' in r.message or 'failed' in r.message.lower() for r in errors)
    assert llama_line_level('main: server is listening on http://127.0.0.1:8080') == 'info'


async def test_rotating_files_and_download(system_factory) -> None:
    system = await system_factory(metrics_interval=60, log_file_max_bytes=20_000, log_file_backups=2)
    for i in range(1000):
        system.logs.add_llama_line('alpha', f'line {i:04d} ' + 'x' * 80)
    system.logs.add('app', 'hello from the app')
    system.logs.flush()
    log_dir = system.data_dir / 'logs'
    files = sorted(p.name for p in log_dir.iterdir())
    assert files == ['app.log', 'llama-server.log', 'llama-server.log.1', 'llama-server.log.2']
    assert all(p.stat().st_size <= 20_000 + 200 for p in log_dir.iterdir())  # bounded disk

    async with serve(system) as served, httpx.AsyncClient(base_url=served.base_url) as client:
        r = await client.get('/api/logs/download', params={'source': 'llama-server'})
        assert r.status_code == 200 and 'attachment' in r.headers['content-disposition']
        lines = r.text.splitlines()
        numbers = [int(line.split('line ')[1][:4]) for line in lines]
        assert numbers == sorted(numbers) and numbers[-1] == 999  # oldest kept first, newest last
        assert all('[alpha]' in line for line in lines)
        listed = (await client.get('/api/logs', params={'limit': 1})).json()['sources']
        assert listed == ['app', 'llama-server']
        missing = await client.get('/api/logs/download', params={'source': 'nope'})
        assert missing.status_code == 404 and 'app' in missing.json()['detail']
        assert (await client.get('/api/logs/download')).status_code == 422


def test_rotation_without_backups_starts_the_file_over(tmp_path: Path) -> None:
    logs = LogService(EventBus(), log_dir=tmp_path, max_bytes=10_000, backups=0)
    for i in range(400):
        logs.add_llama_line('alpha', f'line {i:04d} ' + 'x' * 80)
    logs.flush()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ['llama-server.log'] and (tmp_path / 'llama-server.log').stat().st_size <= 10_000
    assert 'line 0399' in (tmp_path / 'llama-server.log').read_text()  # the newest lines are kept
    logs.close()


def test_a_failed_rotation_does_not_stop_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs = LogService(EventBus(), log_dir=tmp_path, max_bytes=10_000, backups=2)
    real_replace, failures = os.replace, []

    def failing_once(src: Any, dst: Any) -> None:
        if not failures:
            failures.append(src)
            raise OSError(28, 'No space left on device')
        real_replace(src, dst)

    monkeypatch.setattr(os, 'replace', failing_once)
    for i in range(200):
        logs.add('app', f'first {i:04d} ' + 'y' * 80)
    logs.flush()
    assert failures  # a rotation was tried and failed
    logs.add('app', 'after the failure')
    logs.add_llama_line('alpha', 'another source')
    logs.flush()
    assert 'after the failure' in (tmp_path / 'app.log').read_text()
    assert 'another source' in (tmp_path / 'llama-server.log').read_text()
    logs.close()
