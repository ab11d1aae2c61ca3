"""REST over the model library: list, details, rescan. Live status comes from the scheduler."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, Field

from core.api import get_system
from core.library import ModelEntry, ScanReport
from core.library.fit import FitEstimate, free_memory
from core.library.meta import kv_for_display
from core.system import System

router = APIRouter(prefix='/api', tags=['models'])


class ModelMetaOut(BaseModel):
    architecture: str | None = None
    name: str | None = None
    basename: str | None = None
    size_label: str | None = None
    general_type: str | None = None
    n_params: int = 0
    file_type: str | None = Field(None, description='Quantization label, e.g. Q4_K_M')
    context_length: int | None = None
    embedding_length: int | None = None
    feed_forward_length: int | None = None
    block_count: int | None = None
    head_count: int | None = None
    head_count_kv: int | None = None
    key_length: int | None = None
    value_length: int | None = None
    expert_count: int | None = None
    expert_used_count: int | None = None
    vocab_size: int | None = None
    tokenizer_model: str | None = None
    has_chat_template: bool = False
    pooling_type: int | None = None
    rope_scaling: dict[str, Any] | None = None
    tensor_count: int = 0
    tensor_bytes: int = 0


class ModelOut(BaseModel):
    id: str
    aliases: list[str]
    path: str
    paths: list[str]
    mmproj: str | None
    size_bytes: int
    mtime: float
    meta: ModelMetaOut
    capabilities: list[str]
    fit: FitEstimate | None = Field(None, description='Memory estimate with the configured launch parameters')
    error: str | None = Field(None, description='Why the file cannot be used (corrupt, missing split part, ...)')
    status: str = Field('stopped', description='From the supervisor: stopped, starting, ready, failed, ...')
    pid: int | None = None
    port: int | None = None
    uptime_s: float | None = None
    restarts: int = 0
    inflight: int = 0
    run_error: str | None = Field(None, description='Last llama-server failure, from the supervisor')


class SkippedOut(BaseModel):
    path: str
    reason: str


class DirErrorOut(BaseModel):
    path: str
    error: str


class ScanOut(BaseModel):
    roots: list[str]
    models: int
    added: list[str]
    removed: list[str]
    changed: list[str]
    skipped: list[SkippedOut]
    dir_errors: list[DirErrorOut]
    files_read: int
    duration_s: float
    finished_at: float


class ModelsOut(BaseModel):
    models: list[ModelOut]
    scan: ScanOut


class ModelDetailOut(ModelOut):
    metadata: dict[str, Any] = Field(description='Every GGUF key/value; big arrays as {"array": type, "length": n}')
    tensor_types: dict[str, int] = Field(description='Tensor count per GGML type')
    layer_bytes: list[int] = Field(description='Weight bytes of each block')
    chat_template: str | None = Field(None, description='Only with ?chat_template=true')


def _model_out(system: System, e: ModelEntry, free: tuple[int | None, int | None]) -> dict[str, Any]:
    state = dict(system.scheduler.describe(e.id) or {})
    fit = None
    if not e.error:
        fit = system.library.fit(e, ram_free=free[0], vram_free=free[1]).as_dict()
    return {
        'id': e.id,
        'aliases': e.aliases,
        'path': str(e.path),
        'paths': [str(p) for p in e.paths],
        'mmproj': None if e.mmproj is None else str(e.mmproj),
        'size_bytes': e.size_bytes,
        'mtime': e.mtime,
        'meta': e.meta.as_dict(),
        'capabilities': e.capabilities,
        'fit': fit,
        'error': e.error,
        'status': state.get('status') or 'stopped',
        'pid': state.get('pid'),
        'port': state.get('port'),
        'uptime_s': state.get('uptime_s'),
        'restarts': state.get('restarts') or 0,
        'inflight': state.get('inflight') or 0,
        'run_error': state.get('error'),
    }


def _scan_out(report: ScanReport) -> dict[str, Any]:
    return asdict(report)


@router.get('/models', response_model=ModelsOut)
async def list_models(system: System = Depends(get_system)) -> dict[str, Any]:
    free = await asyncio.to_thread(free_memory)  # NVML may block
    return {
        'models': [_model_out(system, e, free) for e in system.library.models()],
        'scan': _scan_out(system.library.last_scan),
    }


@router.post('/models/rescan', response_model=ScanOut)
async def rescan(system: System = Depends(get_system)) -> dict[str, Any]:
    return _scan_out(await system.library.rescan())


@router.get('/models/{model_id}', response_model=ModelDetailOut, responses={404: {'description': 'Model not found'}})
async def model_detail(
    model_id: str,
    chat_template: bool = Query(False, description='Include the chat template text'),
    system: System = Depends(get_system),
) -> dict[str, Any]:
    entry = system.library.get(model_id)
    if entry is None:
        raise HTTPException(404, f'model {model_id!r} not found')
    free = await asyncio.to_thread(free_memory)
    out = _model_out(system, entry, free)
    out.update(
        metadata=kv_for_display(entry.kv, include_chat_template=chat_template),
        tensor_types=entry.meta.tensor_types,
        layer_bytes=entry.meta.layer_bytes,
        chat_template=entry.chat_template if chat_template else None,
    )
    return out
