"""Load and unload models: thin wrappers over the scheduler."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from core.api import get_system
from core.supervisor import ModelNotFound, StartFailed, SupervisorError
from core.system import System

router = APIRouter(prefix='/api', tags=['models'])

_ERRORS = {
    404: 'Model not found',
    409: 'The file cannot be served (the library says why), or it was unloaded while loading',
    502: 'llama-server did not start (with its last log lines)',
    503: 'No capacity',
}


def _error(e: SupervisorError) -> JSONResponse:
    detail: dict[str, Any] = {'message': e.message}
    if isinstance(e, StartFailed):
        detail['log_tail'] = e.log_tail
    return JSONResponse(status_code=e.status, content={'detail': detail})


@router.post('/models/unload')
async def unload_all(system: System = Depends(get_system)) -> dict[str, Any]:
    """Stop every running llama-server."""
    return {'unloaded': await system.scheduler.unload_all()}


@router.post('/models/{model_id:path}/load', responses={c: {'description': d} for c, d in _ERRORS.items()})
async def load_model(model_id: str, system: System = Depends(get_system)) -> Any:
    """Start the model (evicting others if the limits say so) and wait until it is ready."""
    try:
        upstream = await system.scheduler.load(model_id)
    except SupervisorError as e:
        return _error(e)
    return {'model': upstream.model_id, **system.scheduler.describe(upstream.model_id)}


@router.post('/models/{model_id:path}/unload', responses={404: {'description': _ERRORS[404]}})
async def unload_model(model_id: str, system: System = Depends(get_system)) -> Any:
    """Stop the model's llama-server now (requests in flight are cut)."""
    entry = system.library.get(model_id)
    if entry is None:
        return _error(ModelNotFound(f'model {model_id!r} not found'))
    was_running = await system.scheduler.unload(entry.id)
    return {'model': entry.id, 'was_running': was_running, **system.scheduler.describe(entry.id)}
