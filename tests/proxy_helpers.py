"""Helpers for the proxy tests; the System itself is served by `tests.serving`."""

from __future__ import annotations

import httpx

from tests.serving import Served, serve

__all__ = ['Served', 'serve', 'slot_busy']


async def slot_busy(base_url: str, client: httpx.AsyncClient | None = None) -> bool:
    """Whether any slot of that llama-server is processing (its own `/slots`)."""
    if client is None:
        async with httpx.AsyncClient(timeout=5) as c:
            return await slot_busy(base_url, c)
    slots = (await client.get(f'{base_url}/slots')).json()
    return any(s['is_processing'] for s in slots)
