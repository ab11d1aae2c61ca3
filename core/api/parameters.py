"""Launch parameters: global defaults and per-model overrides, validated (also against llama-server --help)
and saved through the settings manager so the atomic write and the settings validation apply."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from core.api import BODY_NOT_JSON, get_system
from core.model_params import ModelParams
from core.settings import ConfigInvalid
from core.supervisor.argv import ArgvError
from core.system import System

router = APIRouter(prefix='/api', tags=['parameters'])

_422: dict[int | str, dict[str, Any]] = {400: BODY_NOT_JSON, 422: {'description': 'Field errors; nothing was saved'}}


def _dump(params: ModelParams | None) -> dict[str, Any]:
    return {} if params is None else params.model_dump(mode='json', exclude_none=True)


def _field_errors(errors: list[dict[str, str]]) -> JSONResponse:
    return JSONResponse(status_code=422, content={'detail': errors})


async def _validated(
    system: System, body: dict[str, Any], current: ModelParams | None, base: ModelParams | None
) -> ModelParams | JSONResponse:
    """`body` as ModelParams (keeping the saved `request` block when the body has none), checked as it would
    launch: on top of `base` (the defaults) for a per-model override."""
    if 'request' not in body and current is not None and current.request is not None:
        body = {**body, 'request': current.request.model_dump(mode='json')}
    try:
        params = ModelParams.model_validate(body)
    except ValidationError as exc:
        return _field_errors(
            [{'field': '.'.join(str(p) for p in e['loc']) or '(root)', 'message': e['msg']} for e in exc.errors()]
        )
    try:
        await system.scheduler.check_params(params if base is None else base.overlay(params))
    except ArgvError as e:
        return _field_errors([{'field': e.field, 'message': e.message}])
    return params


async def _save(system: System, patch: dict[str, Any]) -> JSONResponse | dict[str, Any]:
    """Save, then apply to the running servers: what restarts, what keeps running (see `System.apply_config`)."""
    try:
        return (await system.save_config(patch))[1]
    except ConfigInvalid as e:
        return _field_errors([{'field': err.field, 'message': err.message} for err in e.errors])


def _descriptions() -> dict[str, str]:
    return {name: f.description or '' for name, f in ModelParams.model_fields.items()}


@router.get('/parameters')
def get_parameters(system: System = Depends(get_system)) -> dict[str, Any]:
    """Launch parameters every model starts with (unset = llama-server's own default)."""
    return {'params': _dump(system.config.settings.defaults), 'descriptions': _descriptions()}


@router.put('/parameters', responses=_422)
async def put_parameters(body: dict[str, Any] = Body(...), system: System = Depends(get_system)) -> Any:
    """Replace the global defaults. A running model whose launch they change restarts (after its requests drain);
    `applied` says which."""
    params = await _validated(system, body, system.config.settings.defaults, None)
    if isinstance(params, JSONResponse):
        return params
    applied = await _save(system, {'defaults': _dump(params)})
    return applied if isinstance(applied, JSONResponse) else {**get_parameters(system), 'applied': applied}


@router.get('/models/{model_id:path}/parameters', responses={404: {'description': 'Model not found'}})
def get_model_parameters(model_id: str, system: System = Depends(get_system)) -> Any:
    """The model's own overrides, the defaults, and the effective result it launches with."""
    entry = system.library.get(model_id)
    if entry is None:
        return JSONResponse(status_code=404, content={'detail': f'model {model_id!r} not found'})
    s = system.config.settings
    return {
        'model': entry.id,
        'params': _dump(s.models.get(entry.id)),
        'defaults': _dump(s.defaults),
        'effective': _dump(system.scheduler.params_for(entry.id)),
        'descriptions': _descriptions(),
    }


@router.put('/models/{model_id:path}/parameters', responses={404: {'description': 'Model not found'}, **_422})
async def put_model_parameters(model_id: str, body: dict[str, Any] = Body(...), system: System = Depends(get_system)):
    """Replace the model's overrides (an empty object removes them). If the model runs and its launch changes, it
    restarts after its requests drain; ttl, pinned and request params apply at once. `applied` says which."""
    entry = system.library.get(model_id)
    if entry is None:
        return JSONResponse(status_code=404, content={'detail': f'model {model_id!r} not found'})
    s = system.config.settings
    params = await _validated(system, body, s.models.get(entry.id), s.defaults)
    if isinstance(params, JSONResponse):
        return params
    owners = {name: system.library.get(name) for name in params.aliases or []}
    taken = [f'{name!r} ({other.id})' for name, other in owners.items() if other is not None and other.id != entry.id]
    if taken:
        return _field_errors([{'field': 'aliases', 'message': f"already another model's name: {', '.join(taken)}"}])
    try:
        applied = (await system.save_model_params(entry.id, _dump(params) or None))[1]
    except ConfigInvalid as e:
        return _field_errors([{'field': err.field, 'message': err.message} for err in e.errors])
    return {**get_model_parameters(entry.id, system), 'applied': applied}
