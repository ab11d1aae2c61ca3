from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Body, Depends
from fastapi.responses import JSONResponse

from core.api import BODY_NOT_JSON, get_system
from core.settings import ConfigInvalid
from core.system import System

router = APIRouter(prefix='/api', tags=['config'])


@router.get('/config')
def get_config(system: System = Depends(get_system)) -> dict[str, Any]:
    """Effective settings (API keys redacted), the source of each value, and any rejected values."""
    return system.config.describe()


@router.put('/config', responses={400: BODY_NOT_JSON, 422: {'description': 'Field errors; nothing was saved'}})
async def put_config(patch: dict[str, Any] = Body(...), system: System = Depends(get_system)) -> Any:
    """Validate and save the given fields atomically, then apply them: `applied` lists the running models that
    restart for it and those that keep running; `restart_required` the fields that need the app restarted."""
    try:
        result = await asyncio.to_thread(system.config.update, patch)
    except ConfigInvalid as e:
        return JSONResponse(status_code=422, content={'detail': [err.as_dict() for err in e.errors]})
    applied = await system.apply_config()
    return {
        'saved': True,
        'changed': result.changed,
        'restart_required': result.restart_required,
        'overridden': result.overridden,
        'applied': applied,
        **system.config.describe(),
    }
