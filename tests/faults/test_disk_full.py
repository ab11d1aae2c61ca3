"""A full disk under the data dir (ENOSPC injected at the two writes a swap makes: the pid registry and a server's
key file): the scheduler never wedges, a refused start says why, and the registry catches up once space returns
(issue 14, item 1: before, a swap returned a plain 500 and left one model `stopping` with a dead pid)."""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.supervisor import ModelState, pidfile, scheduler


def _full(*_args: Any, **_kw: Any) -> None:
    raise OSError(errno.ENOSPC, 'No space left on device')


@pytest.fixture
async def one_slot(system_factory: Callable[..., Any], models_dir: Path, tiny_model: Path, tiny_model_b: Path) -> Any:
    return await system_factory(models_dirs=[models_dir], scan_well_known_dirs=False, max_loaded_models=1)


async def test_a_swap_on_a_full_disk_completes_and_the_registry_catches_up(
    one_slot: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = one_slot.scheduler
    first = await s.load('tiny-llama')
    with monkeypatch.context() as m:
        m.setattr(pidfile, 'atomic_write_text', _full)
        second = await s.load('tiny-llama-b')  # evicts the first: its registry write fails, the stop completes
        assert s.describe('tiny-llama')['status'] == ModelState.STOPPED
        assert s.describe('tiny-llama-b')['status'] == ModelState.READY
        assert s.registry.write_error and 'No space' in s.registry.write_error
        await s.load('tiny-llama')  # and swaps back: nothing is stuck starting or stopping
        assert s.describe('tiny-llama')['status'] == ModelState.READY
    # Space is back: the next change writes the whole registry, with the server that runs now.
    await s.unload('tiny-llama')
    up = await s.load('tiny-llama-b')
    assert s.registry.write_error is None
    on_disk = json.loads(s.registry.path.read_text())
    assert set(on_disk) == {str(up.pid)} and first.pid != up.pid != second.pid


async def test_a_start_that_cannot_write_its_key_file_still_requires_its_key(
    one_slot: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The key goes in the server's environment instead: the model starts, and its port still wants the key."""
    s = one_slot.scheduler
    monkeypatch.setattr(scheduler, 'write_private', _full)
    up = await s.load('tiny-llama')
    assert 'key file not written (No space left on device)' in caplog.text
    assert not scheduler.key_path(s.data_dir, 'tiny-llama').exists()
    async with httpx.AsyncClient(base_url=up.base_url) as client:
        assert (await client.get('/v1/models')).status_code == 401
        auth = {'Authorization': f'Bearer {up.api_key}'}
        assert (await client.get('/v1/models', headers=auth)).status_code == 200


async def test_a_full_disk_is_reported_and_the_history_catches_up(
    make_served: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy keeps serving; /api/health says `degraded` with the reason; request rows wait in memory and are
    written once the disk takes them again."""
    async with await make_served() as served, served.client() as client:
        activity = served.system.proxy.activity
        body = {'model': 'tiny-llama', 'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 4}
        with monkeypatch.context() as m:
            m.setattr(activity.store, 'executemany', _full)
            for _ in range(3):
                assert (await client.post('/v1/chat/completions', json=body)).status_code == 200  # still serving
            activity.flush()
            health = (await client.get('/api/health')).json()
            assert health['status'] == 'degraded'
            assert any('No space left' in p for p in health['problems']), health
        activity.flush()  # space is back
        health = (await client.get('/api/health')).json()
        rows = (await client.get('/api/requests')).json()['requests']
    assert health['status'] == 'ok' and health['problems'] == []
    assert len([r for r in rows if r['status'] == 200]) == 3  # none of the three was lost
