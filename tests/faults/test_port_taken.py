"""The port picked for a llama-server is taken by someone else between the pick and the spawn (issue 14's fault
suite): the server cannot bind, and the supervisor starts it again on another port instead of failing the load."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.supervisor import process


@pytest.fixture
def taken() -> Iterator[socket.socket]:
    """A port that someone else is listening on."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        s.listen()
        yield s


async def test_a_port_taken_after_it_was_picked_is_not_a_failed_load(
    system_factory: Callable[..., Any],
    models_dir: Path,
    tiny_model: Path,
    taken: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = taken.getsockname()[1]
    picks = iter([port])  # the first pick is the taken port, then free ones as usual
    real = process.free_port
    monkeypatch.setattr(process, 'free_port', lambda: next(picks, None) or real())
    system = await system_factory(models_dirs=[models_dir], scan_well_known_dirs=False)
    up = await system.scheduler.load('tiny-llama')
    assert up.port != port
    assert system.scheduler.describe('tiny-llama')['status'] == 'ready'
    lines = [r.message for r in system.logs.query(model='tiny-llama', source='llama-server', limit=500)]
    assert any('bind' in line.lower() for line in lines)  # it did try the taken port first
