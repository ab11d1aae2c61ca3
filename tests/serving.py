"""Serve a real System's HTTP surface in-process (uvicorn on a free loopback port), wired as main.py wires it:
every API router plus the front door (proxy, event stream, guards). Pages are left out; tests of pages use
NiceGUI's `user` fixture or the app subprocess."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from core.api import include_all
from core.httpguard import uvicorn_options
from tests.conftest import free_port


@dataclass
class Served:
    system: Any
    base_url: str
    server: uvicorn.Server

    def client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, timeout=60, **kw)

    def upstream(self, model_id: str) -> Any:
        """The model's running llama-server (`core.supervisor.Upstream`: base_url, api_key, ...)."""
        for up in self.system.scheduler.running():
            if up.model_id == model_id:
                return up
        raise AssertionError(f'{model_id} is not running')


@contextlib.asynccontextmanager
async def serve(system: Any) -> AsyncIterator[Served]:
    app = FastAPI()
    app.state.system = system
    include_all(app)
    system.frontdoor.install(app)
    config = uvicorn.Config(
        app,
        host='127.0.0.1',
        port=free_port(),
        log_level='warning',
        lifespan='off',
        timeout_graceful_shutdown=2,
        **uvicorn_options(system.config.settings, system.config, system.fast_lane),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield Served(system, f'http://127.0.0.1:{config.port}', server)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
