"""The whole chain: the real ModelLibrary and System drive the scheduler; the app as a subprocess leaves no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from core.supervisor import StartFailed
from core.supervisor.errors import ModelUnusable
from core.supervisor.pidfile import PidRegistry
from core.supervisor.scheduler import REGISTRY_FILE
from tests.conftest import start_app, start_llama_server, stop_process, wait_for
from tests.gguf_factory import write_tiny_gguf
from tests.serving import serve
from tests.supervisor_helpers import chat


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _model_id(system: Any, path: Path) -> str:
    return next(e.id for e in system.library.models() if Path(e.path) == path)


async def test_system_lease_chat_unload(system_factory: Callable[..., Any], models_dir: Path, tiny_model: Path) -> None:
    system = await system_factory(models_dirs=[models_dir], scan_well_known_dirs=False)
    mid = _model_id(system, tiny_model)
    events = system.bus.queue(['models'])
    async with system.scheduler.lease(mid) as up:
        assert up.model_id == mid
        assert (await chat(up))['choices'][0]['message']['content']
        assert system.scheduler.describe(mid)['inflight'] == 1
    assert system.scheduler.describe(mid)['inflight'] == 0
    seen = []
    while not events.queue.empty():
        e = await events.get()
        if e.type == 'state':
            seen.append(e.data['state'])
    assert 'starting' in seen and seen[-1] == 'ready'
    await system.scheduler.unload(mid)
    assert system.scheduler.describe(mid)['status'] == 'stopped'


async def test_unusable_files_are_refused_by_every_load_path_and_never_spawned(
    system_factory: Callable[..., Any], tmp_path: Path, tiny_model: Path
) -> None:
    folder = tmp_path / 'models'
    folder.mkdir()
    (folder / 'broken.gguf').write_bytes(tiny_model.read_bytes()[: tiny_model.stat().st_size // 2])
    (folder / 'not-a-model.gguf').write_bytes(b'GGML' + bytes(64))
    system = await system_factory(models_dirs=[folder], scan_well_known_dirs=False)
    spawned = system.bus.queue(['models'])
    for mid in ('broken', 'not-a-model'):
        assert system.library.get(mid).error
        for load in (system.scheduler.load, system.scheduler.ensure_ready):
            with pytest.raises(ModelUnusable, match=f'{mid} cannot be loaded: .*') as e:
                await load(mid)
            assert e.value.status == 409
        with pytest.raises(ModelUnusable):
            async with system.scheduler.lease(mid):
                pass
    assert spawned.queue.empty()  # not one state change: nothing was started
    async with serve(system) as s, s.client() as c:
        r = await c.post('/api/models/broken/load')
        assert r.status_code == 409 and 'truncated' in r.json()['detail']['message']
        r = await c.post('/v1/completions', json={'model': 'broken', 'prompt': 'x'})
        assert r.status_code == 409 and r.json()['error']['code'] == 'model_unusable'
        r = await c.get('/upstream/not-a-model/props')
        assert r.status_code == 409 and 'bad magic' in r.json()['error']['message']


async def test_a_model_llama_server_refuses_fails_with_its_log(
    system_factory: Callable[..., Any], tmp_path: Path
) -> None:
    folder = tmp_path / 'models'
    folder.mkdir()
    # A header the library reads, with a tensor llama.cpp does not expect: only llama-server can tell.
    broken = write_tiny_gguf(folder / 'broken.gguf', n_tensors_extra=1)
    system = await system_factory(models_dirs=[folder], scan_well_known_dirs=False, restart_backoff=0.02)
    mid = _model_id(system, broken)
    assert system.library.get(mid).error is None
    try:
        await system.scheduler.load(mid)
        raise AssertionError('a truncated model must not become ready')
    except StartFailed as e:
        assert e.log_tail, 'the error carries llama-server output'
    await wait_for(lambda: system.scheduler.describe(mid)['status'] == 'failed', 30)
    assert 'giving up' in system.scheduler.describe(mid)['error']


async def test_app_kill9_leaves_no_llama_server(
    system_factory: Callable[..., Any], tmp_path: Path, models_dir: Path, tiny_model: Path, llama_binary: Any
) -> None:
    # The app's library gives the model the same id as an in-process one over the same folder.
    mid = _model_id(await system_factory(models_dirs=[models_dir], scan_well_known_dirs=False), tiny_model)
    app = start_app(tmp_path, '--models-dir', str(models_dir))
    try:
        r = httpx.post(f'{app.base_url}/api/models/{mid}/load', timeout=60)
        assert r.status_code == 200, r.text
        child = r.json()['pid']
        assert alive(child)
        os.kill(app.proc.pid, signal.SIGKILL)
        app.proc.wait(10)
    finally:
        stop_process(app.proc)
    # PDEATHSIG: the kernel kills the child as soon as the app dies.
    await wait_for(lambda: not alive(child), 10)

    # An orphan from an earlier run (simulated: a server we started, written into the registry) is reaped at the
    # next start; a live process whose pid is registered with another start time is left alone.
    orphan = start_llama_server(llama_binary, tiny_model)
    bystander = subprocess.Popen(['sleep', '120'])
    try:
        registry = PidRegistry(app.data_dir / REGISTRY_FILE)
        registry.add(orphan.proc.pid, 'orphan')
        registry.add(bystander.pid, 'bystander')
        data = registry._read()
        data[str(bystander.pid)]['start_time'] -= 1000  # as if the pid had been reused
        registry._write(data)
        app2 = start_app(tmp_path, '--models-dir', str(models_dir))
        try:
            await wait_for(lambda: not alive(orphan.proc.pid), 10)
            assert bystander.poll() is None, 'a reused pid must never be killed'
        finally:
            stop_process(app2.proc, timeout=20)
    finally:
        stop_process(orphan.proc)
        bystander.kill()
        bystander.wait()
