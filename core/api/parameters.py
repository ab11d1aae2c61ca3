"""Launch parameters: global defaults and per-model overrides, validated (also against llama-server --help)
and saved through the settings manager so the atomic write and the settings validation apply (core/parameters.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends
from fastapi.responses import JSONResponse

from core import parameters
from core.api import BODY_NOT_JSON, get_system
from core.settings import ConfigInvalid
from core.system import System

router = APIRouter(prefix='/api', tags=['parameters'])

_422: dict[int | str, dict[str, Any]] = {400: BODY_NOT_JSON, 422: {'description': 'Field errors; nothing was saved'}}


def _field_errors(e: ConfigInvalid) -> JSONResponse:
    return JSONResponse(
        status_code=422, content={'detail': [{'field': x.field, 'message': x.message} for x in e.errors]}
    )


def _not_found(model_id: str) -> JSONResponse:
    return JSONResponse(status_code=404, content={'detail': f'model {model_id!r} not found'})


@router.get('/parameters')
def get_parameters(system: System = Depends(get_system)) -> dict[str, Any]:
    """Launch parameters every model starts with (unset = llama-server's own default)."""
    return {'params': parameters.dump(system.config.settings.defaults), 'descriptions': parameters.descriptions()}


@router.put('/parameters', responses=_422)
async def put_parameters(body: dict[str, Any] = Body(...), system: System = Depends(get_system)) -> Any:
    """Replace the global defaults. A running model whose launch they change restarts (after its requests drain);
    `applied` says which."""
    try:
        applied = await parameters.save_defaults(system, body)
    except ConfigInvalid as e:
        return _field_errors(e)
    return {**get_parameters(system), 'applied': applied}


@router.get('/models/{model_id:path}/parameters', responses={404: {'description': 'Model not found'}})
def get_model_parameters(model_id: str, system: System = Depends(get_system)) -> Any:
    """The model's own overrides, the defaults, and the effective result it launches with."""
    entry = system.library.get(model_id)
    return _not_found(model_id) if entry is None else parameters.model_view(system, entry.id)


@router.put('/models/{model_id:path}/parameters', responses={404: {'description': 'Model not found'}, **_422})
async def put_model_parameters(model_id: str, body: dict[str, Any] = Body(...), system: System = Depends(get_system)):
    """Replace the model's overrides (an empty object removes them). If the model runs and its launch changes, it
    restarts after its requests drain; ttl, pinned and request params apply at once. `applied` says which."""
    entry = system.library.get(model_id)
    if entry is None:
        return _not_found(model_id)
    try:
        applied = await parameters.save_model(system, entry.id, body)
    except ConfigInvalid as e:
        return _field_errors(e)
    return {**parameters.model_view(system, entry.id), 'applied': applied}
