"""Request activity: finished requests (filtered, paged, exported), the ones in flight, and cancelling one."""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import Response

from core.api import get_system
from core.system import System

router = APIRouter(prefix='/api', tags=['requests'])


class _Filters:
    """The history filters shared by the list and the export."""

    def __init__(
        self,
        model: str | None = None,
        status: str | None = Query(
            None, pattern=r'^(ok|error|0|\d{3})$', description='ok, error, 0 (interrupted) or an HTTP status'
        ),
        route: str | None = Query(None, description='Exact route, e.g. /v1/chat/completions'),
        since: float | None = Query(None, ge=0, description='Only requests started at or after this Unix time'),
        until: float | None = Query(None, ge=0, description='Only requests started at or before this Unix time'),
        upstream: str | None = Query(None, description='The remote that served it; `local`: this app itself'),
    ) -> None:
        if since is not None and until is not None and until < since:
            # The same shape as FastAPI's own field errors, so clients handle one kind.
            msg = 'until is before since'
            raise HTTPException(422, [{'type': 'value_error', 'loc': ['query', 'until'], 'msg': msg, 'input': until}])
        self.values: dict[str, Any] = {
            'model': model,
            'status': status,
            'route': route,
            'since': since,
            'until': until,
            'upstream': upstream,
        }


@router.get('/requests')
def list_requests(
    filters: _Filters = Depends(),
    offset: int = Query(0, ge=0, le=2**62, description='Rows to skip (newest first)'),  # SQLite's integers are 64-bit
    limit: int = Query(100, ge=1, le=10_000),
    system: System = Depends(get_system),
) -> dict[str, Any]:
    """Finished requests matching every filter, newest first; `total` counts all that match."""
    rows, total = system.proxy.activity.query(**filters.values, offset=offset, limit=limit)
    return {'requests': rows, 'total': total, 'offset': offset, 'stats': system.proxy.stats()}


EXPORTED: dict[int | str, dict[str, Any]] = {
    200: {'content': {'text/csv': {}, 'application/json': {}}, 'description': 'The rows as a download'}
}


@router.get('/requests/export', response_class=Response, responses=EXPORTED)
def export(
    filters: _Filters = Depends(),
    format: Literal['csv', 'json'] = Query('csv'),
    system: System = Depends(get_system),
) -> Response:
    """Every finished request matching the filters, as a CSV (header row first) or JSON download."""
    body = system.proxy.activity.export(format, **filters.values)
    name = f'requests-{time.strftime("%Y%m%d-%H%M%S")}.{format}'
    media = 'text/csv; charset=utf-8' if format == 'csv' else 'application/json'
    return Response(body, media_type=media, headers={'content-disposition': f'attachment; filename="{name}"'})


@router.get('/requests/inflight')
async def inflight(system: System = Depends(get_system)) -> dict[str, Any]:
    return {'requests': system.proxy.activity.inflight()}


@router.post('/requests/{request_id}/cancel', responses={404: {'description': 'No such request in flight'}})
async def cancel(request_id: str, system: System = Depends(get_system)) -> dict[str, Any]:
    if not system.proxy.activity.cancel(request_id):
        raise HTTPException(404, f'no request {request_id!r} in flight')
    return {'cancelled': request_id}
