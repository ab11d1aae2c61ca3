"""Errors the scheduler raises to its callers (the proxy maps them to HTTP statuses)."""

from __future__ import annotations

from core.launch_policy import ArgvError, ParamsRefused

__all__ = [
    'ArgvError',
    'ModelNotFound',
    'ModelUnusable',
    'NoCapacity',
    'ParamsRefused',
    'StartFailed',
    'SupervisorError',
    'Unloaded',
]


class SupervisorError(Exception):
    """Base class; `message` is what a user should read, `status` the HTTP status it maps to."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelNotFound(SupervisorError):
    """No model with that id or alias in the library (404)."""

    status = 404


class ModelUnusable(SupervisorError):
    """The library lists the file but it cannot be served (not a model, corrupt, a vocab-only file) (409)."""

    status = 409


class StartFailed(SupervisorError):
    """llama-server did not become ready; `log_tail` holds its last output lines (502)."""

    status = 502

    def __init__(self, message: str, log_tail: list[str] | None = None, model: str | None = None) -> None:
        super().__init__(message)
        self.log_tail = list(log_tail or [])
        self.model = model


class Unloaded(StartFailed):
    """Unloaded while it was loading: the load was cancelled, not failed (409)."""

    status = 409


class NoCapacity(SupervisorError):
    """Nothing can be evicted to make room within the limits (503)."""

    status = 503
