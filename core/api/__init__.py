"""Thin REST routers over core services: parse, call core, shape the response.

Each module exposes `router`; handlers reach the services through `get_system` (the app's `state.system`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request

if TYPE_CHECKING:
    from core.system import System


# What the front door may answer for any route before it runs (core/auth.py, core/cors.py, core/frontdoor.py).
PERIMETER: dict[int | str, dict[str, Any]] = {
    401: {'description': 'Missing or invalid API key (when api_keys are set)'},
    403: {'description': 'Host or Origin not allowed (allowed_hosts, cors_origins)'},
    413: {'description': 'Request body over max_body_bytes'},
    429: {'description': 'Over rate_limit_per_minute for this key'},
}
BODY_NOT_JSON: dict[str, Any] = {'description': 'The body is not JSON'}


def get_system(request: Request) -> System:
    return request.app.state.system


def include_all(app: FastAPI) -> None:
    """Register every API router. Call before any catch-all page is defined."""
    from core.api import config, health, hub, logs, models, models_control, monitoring, parameters, remotes, requests

    # None of the routers has a lifespan, but each include wraps the app's in one more merged context: the test
    # suite builds the app once per page test in one process, and ~1000 nested contexts end in a RecursionError.
    lifespan = app.router.lifespan_context
    for module in (health, config, models, models_control, parameters, requests, monitoring, logs, hub, remotes):
        app.include_router(module.router, responses=PERIMETER)
    app.router.lifespan_context = lifespan
    _document_front_door_routes(app)


def _document_front_door_routes(app: FastAPI) -> None:
    """Add the Ollama routes (served on the front door, unseen by FastAPI) to the OpenAPI schema."""
    from core.ollama import schema

    build = app.openapi

    def openapi() -> dict[str, Any]:
        first = app.openapi_schema is None
        document = build()  # FastAPI's, cached on the app after the first call
        return schema.add_to(document) if first else document

    app.openapi = openapi  # type: ignore[method-assign]
