"""Other machines over REST: the remotes' state, models and figures, a node's models loaded or unloaded there, and
this machine's RPC worker."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from core.api import get_system
from core.supervisor.rpc_worker import RpcError
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


@router.get('/rpc-server')
def rpc_server(system: System = Depends(get_system)) -> dict[str, Any]:
    """This machine's llama.cpp RPC worker: state, endpoint, the devices it lends with their memory, pid, restarts,
    last error and its last log lines. Its settings are `rpc_server`."""
    return system.rpc.describe()


@router.post(
    '/rpc-server/{action}',
    responses={
        403: {'description': 'Its host is not loopback and the app has no API keys'},
        409: {
            'description': 'No rpc-server binary (llama.cpp built without -DGGML_RPC=ON), or its endpoint is taken or '
            'not an address of this machine'
        },
        502: {'description': 'It did not start (with its last log lines)'},
    },
)
async def control_rpc_server(action: Literal['start', 'stop'], system: System = Depends(get_system)) -> Any:
    """Start the worker with the `rpc_server` settings (and wait until it listens), or stop it."""
    try:
        return await (system.rpc.run() if action == 'start' else system.rpc.halt())
    except RpcError as e:
        return JSONResponse(status_code=e.status, content={'detail': {'message': e.message}})
