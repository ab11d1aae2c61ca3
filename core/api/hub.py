"""Finding models on Hugging Face: search repos with GGUF files, and one repo's files by quantization with a fit."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from core.api import get_system
from core.hub import HubError
from core.system import System

router = APIRouter(prefix='/api', tags=['hub'])
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {'description': 'Not a repo id, revision or variant that can be'},
    401: {'description': 'The repo needs a Hugging Face token (HF_TOKEN or the hf_token setting)'},
    403: {'description': 'A gated repo: accept its terms on Hugging Face'},
    404: {'description': 'No such repo'},
    429: {'description': 'Hugging Face is rate-limiting'},
    502: {'description': 'Hugging Face (or the mirror) cannot be reached or failed'},
}


def _job_view(job_id: str, job: Any) -> Any:
    return JSONResponse(status_code=404, content={'detail': f'no download {job_id!r}'}) if job is None else job.view()


def _refused(e: HubError) -> JSONResponse:
    return JSONResponse(status_code=e.status, content={'detail': e.message})


@router.get('/hub/search', responses=_ERRORS)
async def search(
    q: str = Query('', max_length=200, description='Words in the repo name, e.g. "qwen 7b"'),
    limit: int = Query(40, ge=1, le=100),
    system: System = Depends(get_system),
) -> Any:
    """Repos with GGUF files, most downloaded first: repo, downloads, likes, updated, gated."""
    try:
        return {'endpoint': system.hub.endpoint(), 'repos': await system.hub.search(q, limit)}
    except HubError as e:
        return _refused(e)


@router.get('/hub/repos/{repo_id:path}', responses=_ERRORS)
async def repo(
    repo_id: str,
    revision: str | None = Query(None, max_length=200, description='A branch, tag or commit; default: main'),
    system: System = Depends(get_system),
) -> Any:
    """The repo's GGUF files as variants (one per quantization; split parts as one; mmproj files marked), with sizes,
    SHA-256 and a fit estimate (from the file's header fetched by range request, else from its size)."""
    try:
        return await system.hub.repo(repo_id, revision)
    except HubError as e:
        return _refused(e)


class DownloadRequest(BaseModel):
    repo: str = Field(
        min_length=3, max_length=200, pattern=r'^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$', description='owner/name'
    )
    variant: str = Field(min_length=1, max_length=300, description='A GGUF file name, or a quantization like Q4_K_M')
    revision: str | None = Field(None, max_length=200, description='A branch, tag or commit; default: main')
    mmproj: bool = Field(False, description="Also the repo's vision projector (mmproj)")


@router.get('/downloads', tags=['downloads'])
def downloads(system: System = Depends(get_system)) -> Any:
    """Every job, newest first: state (queued, downloading, done, failed, cancelled), bytes, speed, ETA, error."""
    return {'downloads': system.downloads.list()}


@router.post('/downloads', status_code=201, tags=['downloads'], responses={**_ERRORS, 507: {'description': 'No room'}})
async def start_download(body: DownloadRequest, system: System = Depends(get_system)) -> Any:
    """Start downloading one variant of a repo into the models folder; it appears in the library when done."""
    try:
        job = await system.downloads.add(body.repo, body.variant, body.revision, body.mmproj)
    except HubError as e:
        return _refused(e)
    return job.view()


@router.delete('/downloads/{job_id}', tags=['downloads'], responses={404: {'description': 'No such job'}})
async def cancel_download(job_id: str, system: System = Depends(get_system)) -> Any:
    """Cancel a job (its partial files are removed) or forget a finished one (its files stay)."""
    return _job_view(job_id, await system.downloads.cancel(job_id))


@router.post('/downloads/{job_id}/pause', tags=['downloads'], responses={404: {'description': 'No such job'}})
async def pause_download(job_id: str, system: System = Depends(get_system)) -> Any:
    """Pause a queued or running job; its partial file is kept."""
    return _job_view(job_id, await system.downloads.pause(job_id))


@router.post('/downloads/{job_id}/resume', tags=['downloads'], responses={404: {'description': 'No such job'}})
async def resume_download(job_id: str, system: System = Depends(get_system)) -> Any:
    """Go on with a paused or failed job from the bytes it has."""
    return _job_view(job_id, system.downloads.resume(job_id))
