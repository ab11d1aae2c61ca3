"""Supervisor and scheduler: every llama-server process (see scheduler.py and process.py)."""

from __future__ import annotations

from core.supervisor.errors import ModelNotFound, NoCapacity, StartFailed, SupervisorError, Unloaded
from core.supervisor.process import Upstream
from core.supervisor.scheduler import Scheduler
from core.supervisor.states import ModelState

__all__ = [
    'ModelNotFound',
    'ModelState',
    'NoCapacity',
    'Scheduler',
    'StartFailed',
    'SupervisorError',
    'Unloaded',
    'Upstream',
]
