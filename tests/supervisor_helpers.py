"""Shared pieces of the supervisor tests: a minimal library, a scheduler factory and helpers."""

from __future__ import annotations

import asyncio
import json
import shlex
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from core.events import Event, EventBus
from core.llama_binary import BinaryResolver
from core.logs import LogService
from core.supervisor import Scheduler, Upstream

FAKE_SERVER = Path(__file__).with_name('fake_llama_server.py')


@dataclass
class Entry:
    id: str
    path: Path
    mmproj: Path | None = None
    aliases: list[str] = field(default_factory=list)
    size_bytes: int = 0
    error: str | None = None

    @property
    def paths(self) -> list[Path]:
        return [self.path]


@dataclass
class Fit:
    ram_needed_bytes: int
    vram_needed_bytes: int = 0


class FakeLibrary:
    """Only what the scheduler uses: `get` by id or alias and `fit` (sizes given by the test)."""

    def __init__(self, models: dict[str, Path], need_mb: dict[str, int] | None = None) -> None:
        self.entries = {mid: Entry(mid, path, size_bytes=path.stat().st_size) for mid, path in models.items()}
        self.need_mb = need_mb or {}

    def roots(self) -> list[Path]:
        return sorted({e.path.parent for e in self.entries.values()})

    def get(self, name: str) -> Entry | None:
        return self.entries.get(name) or next((e for e in self.entries.values() if name in e.aliases), None)

    def fit(self, entry: Entry, params: Any) -> Fit:
        return Fit(self.need_mb.get(entry.id, 1) * 1024 * 1024)


@dataclass
class Harness:
    scheduler: Scheduler
    bus: EventBus
    logs: LogService
    events: list[Event]

    def states(self, model: str) -> list[str]:
        return [e.data['state'] for e in self.events if e.type == 'state' and e.data['model'] == model]


def make_harness(config: Any, library: Any) -> Harness:
    bus = EventBus()
    bus.attach_loop(asyncio.get_running_loop())
    logs = LogService(bus)
    events: list[Event] = []
    bus.subscribe(['models'], events.append)
    data_dir = config.settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    scheduler = Scheduler(config, library, BinaryResolver(config, data_dir), logs, bus, data_dir)
    return Harness(scheduler, bus, logs, events)


def fake_binary(directory: Path, **behaviour: str) -> Path:
    """An executable that runs tests/fake_llama_server.py with this interpreter, with `FAKE_*` variables set in
    the script (the launch policy passes no such variable to a child)."""
    path = directory / 'fake-llama-server'
    assigns = ''.join(f'{name}={shlex.quote(value)} ' for name, value in behaviour.items())
    path.write_text(f'#!/bin/sh\n{assigns}exec {sys.executable} {FAKE_SERVER} "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def direct(up: Upstream, timeout: float = 60) -> httpx.AsyncClient:
    """A client for the model's own llama-server, with the key only the supervisor's callers have."""
    headers = {'Authorization': f'Bearer {up.api_key}'} if up.api_key else None
    return httpx.AsyncClient(base_url=up.base_url, headers=headers, timeout=timeout)


async def chat(up: Upstream, text: str = 'hello', max_tokens: int = 8) -> dict[str, Any]:
    async with direct(up) as client:
        r = await client.post(
            '/v1/chat/completions',
            json={'messages': [{'role': 'user', 'content': text}], 'max_tokens': max_tokens},
        )
    r.raise_for_status()
    return r.json()


async def stream_chat(up: Upstream, n_predict: int, on_first: Callable[[], None] | None = None) -> list[dict]:
    """Stream a chat completion; return every decoded SSE chunk (the last one is the `[DONE]` marker as {})."""
    chunks: list[dict] = []
    body = {
        'messages': [{'role': 'user', 'content': 'tell a long story'}],
        'max_tokens': n_predict,
        'n_predict': n_predict,
        'ignore_eos': True,
        'stream': True,
    }
    async with (
        direct(up, timeout=120) as client,
        client.stream('POST', '/v1/chat/completions', json=body) as r,
    ):
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith('data: '):
                continue
            payload = line[len('data: ') :]
            chunks.append({} if payload == '[DONE]' else json.loads(payload))
            if on_first is not None and len(chunks) == 1:
                on_first()
    return chunks


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
