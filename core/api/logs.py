"""Logs REST: filtered lines from the ring buffer, and a download of one source's log file."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import StreamingResponse

from core.api import get_system
from core.system import System

router = APIRouter(prefix='/api', tags=['logs'])


@router.get('/logs')
def logs(
    level: Literal['debug', 'info', 'warning', 'error'] | None = Query(None, description='Minimum level'),
    source: str | None = Query(None, description="'app' or 'llama-server'"),
    model: str | None = None,
    q: str | None = Query(None, description='Case-insensitive substring of the message'),
    since: float | None = Query(None, description='Only lines after this Unix time'),
    limit: int = Query(500, ge=1, le=10_000),
    system: System = Depends(get_system),
) -> dict[str, Any]:
    """The newest `limit` lines that match every filter, oldest first."""
    records = system.logs.query(level=level, source=source, model=model, q=q, since=since, limit=limit)
    return {'lines': [r.as_dict() for r in records], 'sources': system.logs.file_sources()}


@router.get('/logs/download', responses={404: {'description': 'No log file for that source'}})
async def download(
    source: str = Query(..., description="The source whose file to download, e.g. 'app' or 'llama-server'"),
    system: System = Depends(get_system),
) -> StreamingResponse:
    """The source's whole log file (rotated backups first) as text."""
    await asyncio.to_thread(system.logs.flush)
    if source not in system.logs.file_sources():
        raise HTTPException(404, f'no log file for source {source!r}; have {system.logs.file_sources()}')
    name = f'{source}-{time.strftime("%Y%m%d-%H%M%S")}.log'
    return StreamingResponse(
        system.logs.iter_file_bytes(source),
        media_type='text/plain; charset=utf-8',
        headers={'content-disposition': f'attachment; filename="{name}"'},
    )
