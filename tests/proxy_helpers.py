"""Serve a real System over HTTP in-process (uvicorn on a free loopback port), like main.py wires it."""

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
from tests.conftest import free_port


@dataclass
class Served:
    system: Any
    base_url: str

    def client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, timeout=60, **kw)

    def upstream_url(self, model_id: str) -> str:
        for up in self.system.scheduler.running():
            if up.model_id == model_id:
                return up.base_url
        raise AssertionError(f'{model_id} is not running')


@contextlib.asynccontextmanager
async def serve(system: Any) -> AsyncIterator[Served]:
    app = FastAPI()
    app.state.system = system
    include_all(app)
    system.frontdoor.install(app)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=port, log_level='warning', lifespan='off'))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield Served(system, f'http://127.0.0.1:{port}')
    finally:
        server.should_exit = True
        await task


async def slot_busy(base_url: str, client: httpx.AsyncClient | None = None) -> bool:
    """Whether any slot of that llama-server is processing (its own `/slots`)."""
    if client is None:
        async with httpx.AsyncClient(timeout=5) as c:
            return await slot_busy(base_url, c)
    slots = (await client.get(f'{base_url}/slots')).json()
    return any(s['is_processing'] for s in slots)
