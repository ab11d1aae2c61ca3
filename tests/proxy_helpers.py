"""Helpers for the proxy tests; the System itself is served by `tests.serving`."""

from __future__ import annotations

import httpx

from core.supervisor import Upstream
from tests.serving import Served, serve
from tests.supervisor_helpers import direct

__all__ = ['Served', 'serve', 'slot_busy']


async def slot_busy(up: Upstream, client: httpx.AsyncClient | None = None) -> bool:
    """Whether any slot of that llama-server is processing (its own `/slots`)."""
    if client is None:
        async with direct(up, timeout=5) as c:
            return await slot_busy(up, c)
    slots = (await client.get('/slots')).json()
    return any(s['is_processing'] for s in slots)
