"""A running model whose file goes away or is replaced is stopped (after its requests drain), with an event that
says why; the next request starts the file that is there now (issue 14, item 5)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from core.events import Event
from core.supervisor import ModelState
from tests.conftest import wait_for
from tests.gguf_factory import write_tiny_gguf


async def _running(system_factory: Callable[..., Any], folder: Path, tiny_model: Path) -> tuple[Any, list[Event]]:
    folder.mkdir()
    shutil.copy(tiny_model, folder / 'moving.gguf')
    system = await system_factory(models_dirs=[folder], scan_well_known_dirs=False)
    events: list[Event] = []
    system.bus.subscribe(['models'], events.append)
    await wait_for(lambda: system.library.get('moving'), deadline_s=10)
    await system.scheduler.load('moving')
    return system, events


def _retired(events: list[Event]) -> list[dict[str, Any]]:
    return [e.data for e in events if e.type == 'retired']


async def test_a_replaced_file_stops_the_old_server_and_the_next_load_serves_the_new_one(
    system_factory: Callable[..., Any], tmp_path: Path, tiny_model: Path
) -> None:
    system, events = await _running(system_factory, tmp_path / 'shelf', tiny_model)
    old_pid = system.scheduler.describe('moving')['pid']
    replacement = write_tiny_gguf(tmp_path / 'new.gguf', name='moving', seed=9, n_layer=3)
    shutil.move(replacement, tmp_path / 'shelf' / 'moving.gguf')  # a rename over it, as a download tool does
    changed = {'model': 'moving', 'reason': 'its file changed'}
    await wait_for(lambda: changed in _retired(events), deadline_s=20)  # the watcher saw it, the scheduler acted
    await wait_for(lambda: system.scheduler.describe('moving')['status'] == ModelState.STOPPED, deadline_s=20)
    assert system.library.get('moving').meta.block_count == 3
    up = await system.scheduler.load('moving')
    assert up.pid != old_pid


async def test_a_removed_file_stops_its_server(
    system_factory: Callable[..., Any], tmp_path: Path, tiny_model: Path
) -> None:
    system, events = await _running(system_factory, tmp_path / 'shelf', tiny_model)
    pid = system.scheduler.describe('moving')['pid']
    (tmp_path / 'shelf' / 'moving.gguf').unlink()
    removed = {'model': 'moving', 'reason': 'its file was removed'}
    await wait_for(lambda: removed in _retired(events), deadline_s=20)
    # Stopped, not only no longer ready (`running()` lists ready ones: a stopping server has left it already).
    await wait_for(lambda: system.scheduler.describe('moving')['status'] == ModelState.STOPPED, deadline_s=20)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_a_deleted_folder_stops_its_models_and_is_watched_again_when_it_comes_back(
    system_factory: Callable[..., Any], tmp_path: Path, tiny_model: Path
) -> None:
    system, events = await _running(system_factory, tmp_path / 'shelf', tiny_model)
    shutil.rmtree(tmp_path / 'shelf')
    await wait_for(lambda: {'model': 'moving', 'reason': 'its file was removed'} in _retired(events), deadline_s=20)
    await wait_for(lambda: system.library.get('moving') is None and not system.scheduler.running(), deadline_s=20)

    (tmp_path / 'shelf').mkdir()  # the same path again (a drive mounted back): no rescan is asked for
    shutil.copy(tiny_model, tmp_path / 'shelf' / 'back.gguf')
    await wait_for(lambda: system.library.get('back'), deadline_s=20)
    assert system.library.watching == [tmp_path / 'shelf']
    shutil.copy(tiny_model, tmp_path / 'shelf' / 'later.gguf')  # and inotify watches it again
    await wait_for(lambda: system.library.get('later'), deadline_s=10)
    assert (await system.scheduler.load('back')).port


async def test_a_folder_missing_at_start_is_picked_up_when_it_appears(
    system_factory: Callable[..., Any], tmp_path: Path, tiny_model: Path
) -> None:
    folder = tmp_path / 'not-yet'
    system = await system_factory(models_dirs=[folder], scan_well_known_dirs=False)
    assert system.library.models() == [] and system.library.watching == []
    folder.mkdir()
    shutil.copy(tiny_model, folder / 'arrived.gguf')
    await wait_for(lambda: system.library.get('arrived'), deadline_s=20)
    assert system.library.watching == [folder]
