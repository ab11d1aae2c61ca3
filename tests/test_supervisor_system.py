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

from core.supervisor import StartFailed
from core.supervisor.pidfile import PidRegistry
from core.supervisor.scheduler import REGISTRY_FILE
from tests.conftest import start_app, start_llama_server, stop_process, wait_for
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
        assert (await chat(up.base_url))['choices'][0]['message']['content']
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


async def test_corrupt_model_fails_with_its_log(
    system_factory: Callable[..., Any], tmp_path: Path, tiny_model: Path
) -> None:
    folder = tmp_path / 'models'
    folder.mkdir()
    broken = folder / 'broken.gguf'
    broken.write_bytes(tiny_model.read_bytes()[: tiny_model.stat().st_size // 2])  # header intact, data cut
    system = await system_factory(models_dirs=[folder], scan_well_known_dirs=False, restart_backoff=0.02)
    mid = _model_id(system, broken)
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
