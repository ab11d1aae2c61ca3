"""Helpers for the metrics, logs and event-stream tests: the System's API served by a real uvicorn in-process
(so tests can look at the bus and the service while real HTTP clients connect), and a stand-in for
`scheduler.running()` that points the sampler at a llama-server the test started itself."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI

from tests.conftest import free_port


@dataclass
class Served:
    system: Any
    base_url: str
    server: uvicorn.Server


def build_app(system: Any) -> FastAPI:
    from core.api import health, logs, monitoring

    app = FastAPI()
    app.state.system = system
    for module in (health, monitoring, logs):
        app.include_router(module.router)
    system.frontdoor.install(app)
    return app


@contextlib.asynccontextmanager
async def serve(system: Any) -> AsyncIterator[Served]:
    port = free_port()
    config = uvicorn.Config(
        build_app(system),
        host='127.0.0.1',
        port=port,
        log_level='warning',
        lifespan='off',
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield Served(system, f'http://127.0.0.1:{port}', server)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


@dataclass(frozen=True)
class StandIn:
    """What `scheduler.running()` returns for one ready server."""

    model_id: str
    host: str
    port: int
    base_url: str
    pid: int


def stand_in_running(system: Any, servers: dict[str, Any]) -> None:
    """Make the sampler see `servers` (model id -> conftest.RunningServer) as the running llama-servers."""
    entries = [StandIn(m, '127.0.0.1', s.port, s.base_url, s.proc.pid) for m, s in servers.items()]
    system.metrics.running = lambda: list(entries)
