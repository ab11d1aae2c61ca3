"""The data dir on a real, small tmpfs that fills up (issue 14, item 1, as it was found): the proxy keeps serving and
swapping, the app says what is degraded (health, a `health` event), and once space is freed every write catches
up: request rows, metric history, the pid registry and the log files. Needs root to mount; skipped otherwise."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for

CHAT = {'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 4}


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip('mounting a tmpfs needs root')
    mount_point = tmp_path / 'data'
    mount_point.mkdir()
    out = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', str(mount_point)], capture_output=True)
    if out.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here: {out.stderr.decode().strip()}')
    try:
        yield mount_point
    finally:
        subprocess.run(['umount', '-l', str(mount_point)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the file system refuses another byte."""
    filler = folder / f'filler-{uuid.uuid4().hex}'
    with filler.open('wb', buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(b'\0' * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    return filler


async def test_a_full_data_dir_degrades_and_everything_catches_up(
    small_tmpfs: Path, make_served: Any, tiny_model_b: Path
) -> None:
    async with await make_served(data_dir=small_tmpfs, max_loaded_models=1) as served, served.client() as client:
        system = served.system
        health_events = system.bus.queue(['health'])
        assert (await client.post('/v1/chat/completions', json={'model': 'tiny-llama', **CHAT})).status_code == 200

        filler = await asyncio.to_thread(fill, small_tmpfs)
        for model in ('tiny-llama-b', 'tiny-llama', 'tiny-llama-b'):  # each a swap: a registry write, a key file
            r = await client.post('/v1/chat/completions', json={'model': model, **CHAT})
            assert r.status_code == 200, r.text
        await asyncio.to_thread(system.proxy.activity.flush)
        await asyncio.to_thread(system.logs.flush)  # the swaps' llama-server lines
        health = (await client.get('/api/health')).json()
        assert health['status'] == 'degraded'
        assert any(p.startswith('log files not written') for p in health['problems'])
        assert any(p.startswith('pid registry not written') and 'No space left' in p for p in health['problems'])
        event = await asyncio.wait_for(health_events.get(), 5)
        assert event.type == 'problems' and event.data['problems']

        filler.unlink()  # space is back: nothing else is done, the app catches up on its own
        await wait_for(lambda: system.problems() == [], deadline_s=10)
        last = await asyncio.wait_for(_until_empty(health_events), 10)
        assert last.data['problems'] == []
        health = (await client.get('/api/health')).json()
        assert health == {**health, 'status': 'ok', 'problems': []}

        await asyncio.to_thread(system.proxy.activity.flush)
        rows = (await client.get('/api/requests')).json()['requests']
        assert len([r for r in rows if r['status'] == 200]) == 4  # not one row lost
        registry = json.loads(system.scheduler.registry.path.read_text())
        assert set(registry) == {str(served.upstream('tiny-llama-b').pid)}
        await asyncio.to_thread(system.logs.flush)
        assert system.logs.write_error is None
        assert system.metrics.history_error is None
        health_events.close()


async def _until_empty(sub: Any) -> Any:
    while True:
        event = await sub.get()
        if not event.data['problems']:
            return event
