"""Thin REST routers over core services: parse, call core, shape the response.

Each module exposes `router`; handlers reach the services through `get_system` (the app's `state.system`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI, Request

if TYPE_CHECKING:
    from core.system import System


def get_system(request: Request) -> System:
    return request.app.state.system


def include_all(app: FastAPI) -> None:
    """Register every API router. Call before any catch-all page is defined."""
    from core.api import config, health, logs, models, models_control, monitoring, parameters, requests

    for module in (health, config, models, models_control, parameters, requests, monitoring, logs):
        app.include_router(module.router)
