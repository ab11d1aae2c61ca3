"""Monitoring REST: the latest sample, history, alerts, and Prometheus `/metrics` (no /api prefix)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from core import gpu
from core.api import get_system
from core.system import System

api = APIRouter(prefix='/api', tags=['monitoring'])
exposition = APIRouter(tags=['monitoring'])  # Prometheus scrapes /metrics at the root


@api.get('/monitoring')
async def monitoring(system: System = Depends(get_system)) -> dict[str, Any]:
    """The latest sample: system, GPUs, running models (process, llama-server figures), proxy figures."""
    return await system.metrics.current()


@api.get('/monitoring/history')
async def history(
    window: Literal['5m', '1h', '24h', '7d'] = '5m',
    series: str | None = Query(None, description='Comma-separated series names; `prefix*` matches a group'),
    system: System = Depends(get_system),
) -> dict[str, Any]:
    """Points `[ts, value]` per series: full resolution for 5m/1h, 10 s means for 24h, 1 min means for 7d."""
    wanted = [s.strip() for s in series.split(',') if s.strip()] if series else None
    return await system.metrics.history_query(window, wanted)


@api.get('/monitoring/gpu')
async def gpu_info() -> dict[str, Any]:
    """NVML's view right now (or `available: false` with "no NVIDIA GPU detected")."""
    import asyncio

    return await asyncio.to_thread(gpu.status)


@api.get('/alerts')
def alerts(system: System = Depends(get_system)) -> dict[str, Any]:
    """Active alerts, recent ones (raised and cleared), and the thresholds in force."""
    return {**system.metrics.alerts.snapshot(), 'rules': system.metrics.alerts.rules()}


@exposition.get('/metrics', response_class=Response)
def prometheus(system: System = Depends(get_system)) -> Response:
    """Prometheus text: system, GPU, per-model llama-server figures (`model` label), proxy counters."""
    return Response(system.metrics.prometheus_text(), media_type=CONTENT_TYPE_LATEST)


router = APIRouter()
router.include_router(api)
router.include_router(exposition)
