"""Errors the scheduler raises to its callers (the proxy maps them to HTTP statuses)."""

from __future__ import annotations


class SupervisorError(Exception):
    """Base class; `message` is what a user should read."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelNotFound(SupervisorError):
    """No model with that id or alias in the library (404)."""


class StartFailed(SupervisorError):
    """llama-server did not become ready; `log_tail` holds its last output lines (502)."""

    def __init__(self, message: str, log_tail: list[str] | None = None, model: str | None = None) -> None:
        super().__init__(message)
        self.log_tail = list(log_tail or [])
        self.model = model


class NoCapacity(SupervisorError):
    """Nothing can be evicted to make room within the limits (503)."""
