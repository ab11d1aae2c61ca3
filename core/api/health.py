from __future__ import annotations

import asyncio
import gc
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from core.api import get_system
from core.runtime import GC_CLOCK, process_figures
from core.system import System

router = APIRouter(prefix='/api', tags=['health'])


class LlamaServerInfo(BaseModel):
    path: str
    version: str
    source: str


class Health(BaseModel):
    status: str = Field(description='ok, or degraded: serving, but writes to the data dir fail (see problems)')
    problems: list[str] = Field(default_factory=list, description='What is degraded, e.g. a full data dir')
    version: str
    llama_server: LlamaServerInfo | None


@router.get('/health', response_model=Health)
def health(system: System = Depends(get_system)) -> dict[str, Any]:
    return system.health()


class DiskBytes(BaseModel):
    sqlite: int = Field(description='The SQLite database')
    sqlite_wal: int = Field(description='Its write-ahead log and index: up to ~4 MiB between checkpoints')
    logs: int = Field(description='Log files, with their rotated copies')
    other: int = Field(description='Everything else in the data dir (pid registry, keys, downloads)')


class Runtime(BaseModel):
    pid: int
    rss_bytes: int = Field(description="The app process's resident memory (not its llama-servers')")
    open_fds: int | None = Field(description='Open file descriptors (None where the platform has no count)')
    threads: int
    asyncio_tasks: int = Field(description='Tasks on the event loop: one per request in flight, plus the services')
    children: int = Field(description='Running child processes (llama-servers)')
    event_subscribers: int = Field(description='Subscriptions to core events: pages, /api/events clients, services')
    gc_frozen_objects: int = Field(
        description="Objects built at startup and left out of the garbage collector's full passes (main.py)"
    )
    gc_passes: int = Field(description="The garbage collector's passes since the app started (main.py)")
    gc_seconds: float = Field(description='The time those passes took, the loop stopped meanwhile')
    fast_lane_requests: int = Field(
        description='Requests served in the fast lane, from the HTTP protocol with no task (core/proxy/fastlane.py)'
    )
    disk_bytes: DiskBytes


@router.get('/health/runtime', response_model=Runtime)
async def runtime(system: System = Depends(get_system)) -> dict[str, Any]:
    """What the app process holds now; each should stay flat while it runs (see `bench/soak.py`)."""
    tasks = len(asyncio.all_tasks())  # on the loop, before the thread below adds its own work
    figures = await asyncio.to_thread(process_figures, system.data_dir)
    return {
        **figures,
        'asyncio_tasks': tasks,
        'event_subscribers': system.bus.subscriber_count,
        'gc_frozen_objects': gc.get_freeze_count(),
        'gc_passes': GC_CLOCK.passes,
        'gc_seconds': round(GC_CLOCK.seconds, 6),
        'fast_lane_requests': system.fast_lane.taken,
    }
