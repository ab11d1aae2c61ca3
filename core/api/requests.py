"""Request activity: finished requests, the ones in flight, and cancelling one."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query

from core.api import get_system
from core.system import System

router = APIRouter(prefix='/api', tags=['requests'])


@router.get('/requests')
def list_requests(
    model: str | None = None,
    status: str | None = Query(None, pattern=r'^(ok|error|\d{3})$', description='ok, error or an HTTP status'),
    limit: int = Query(100, ge=1, le=10_000),
    system: System = Depends(get_system),
) -> dict[str, Any]:
    return {'requests': system.proxy.activity.recent(model, status, limit), 'stats': system.proxy.stats()}


@router.get('/requests/inflight')
async def inflight(system: System = Depends(get_system)) -> dict[str, Any]:
    return {'requests': system.proxy.activity.inflight()}


@router.post('/requests/{request_id}/cancel', responses={404: {'description': 'No such request in flight'}})
async def cancel(request_id: str, system: System = Depends(get_system)) -> dict[str, Any]:
    if not system.proxy.activity.cancel(request_id):
        raise HTTPException(404, f'no request {request_id!r} in flight')
    return {'cancelled': request_id}
