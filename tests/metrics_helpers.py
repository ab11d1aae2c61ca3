"""Helpers for the metrics, logs and event-stream tests: the System's API served by a real uvicorn in-process
(so tests can look at the bus and the service while real HTTP clients connect), and a stand-in for
`scheduler.running()` that points the sampler at a llama-server the test started itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.serving import serve

__all__ = ['StandIn', 'serve', 'stand_in_running']


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
