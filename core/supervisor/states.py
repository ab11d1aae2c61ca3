"""The one vocabulary of a model's run state, shared by the supervisor, the API, the events and the pages."""

from __future__ import annotations

from enum import StrEnum


class ModelState(StrEnum):
    """A llama-server's state for one model. A `StrEnum`, so it is its own JSON and compares equal to its text."""

    STOPPED = 'stopped'
    STARTING = 'starting'
    READY = 'ready'
    RESTARTING = 'restarting'  # crashed or changed, coming back by itself
    STOPPING = 'stopping'
    FAILED = 'failed'  # gave up: a load must be asked for again


ACTIVE_STATES = frozenset({ModelState.STARTING, ModelState.READY, ModelState.RESTARTING, ModelState.STOPPING})
