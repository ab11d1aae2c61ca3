"""Remotes (other machines) over REST: their state, models and figures; a node's models loaded or unloaded there."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from core.api import get_system
from core.system import System

router = APIRouter(prefix='/api', tags=['nodes'])


@router.get('/nodes')
def list_nodes(system: System = Depends(get_system)) -> dict[str, Any]:
    """This app and every configured remote: state (up, down, checking), last error, models with their state
    there, and a node's memory and live figures. API keys are never shown."""
    return {'remotes': [r.as_dict() for r in system.remotes.all()]}


@router.get('/nodes/{name}', responses={404: {'description': 'No remote of that name'}})
def get_node(name: str, system: System = Depends(get_system)) -> Any:
    remote = system.remotes.get(name)
    if remote is None:
        return JSONResponse(status_code=404, content={'detail': {'message': f'no remote named {name!r}'}})
    return remote.as_dict()


@router.post(
    '/nodes/{name}/models/{model_id:path}/{action}',
    responses={
        404: {'description': 'No remote of that name, or no such model there'},
        409: {'description': 'The remote is an OpenAI server, not a node'},
        503: {'description': 'The node is unreachable'},
    },
)
async def control_model(
    name: str, model_id: str, action: Literal['load', 'unload'], system: System = Depends(get_system)
) -> Any:
    """Load or unload a model on a node, through the node's own `/api/models/{id}/load|unload`: its answer (or
    its error, with its status) is returned as it came. `model_id` is its name on the node."""
    status, body = await system.remotes.control(name, model_id, action)
    return body if status == 200 else JSONResponse(status_code=status, content=body)
